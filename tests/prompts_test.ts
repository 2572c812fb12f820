/**
 * Editable prompts (`LLM_PROMPTS_DIR`, `deno task prompts`): the file format and its checks, the
 * start refused with exit 2 for a bad file, and a worker sending a custom prompt to a real model
 * server through the openai SDK.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadSettings, SettingsError } from "../lib/config.ts";
import { BUILT_IN_PROMPTS } from "../lib/handlers/mod.ts";
import type { JobType } from "../lib/job.ts";
import {
  formatPromptFile,
  parsePrompt,
  PROMPT_PLACEHOLDERS,
  PromptError,
  readPromptsDir,
  renderPrompt,
} from "../lib/prompts.ts";
import { writePrompts } from "../cli/prompts.ts";
import { promptOf } from "./helpers/model_server.ts";
import { startStack } from "./helpers/stack.ts";

const REPO_ROOT = new URL("../", import.meta.url).pathname;
const JOB_TYPES = Object.keys(PROMPT_PLACEHOLDERS) as JobType[];

async function withDir(test: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-prompts-" });
  try {
    await test(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function problemsOf(action: () => unknown): string {
  try {
    action();
  } catch (error) {
    if (error instanceof PromptError || error instanceof SettingsError) {
      return error.problems.join("\n");
    }
    throw error;
  }
  assert.fail("no problem was found");
}

Deno.test("every built-in prompt round-trips through its file and uses every required placeholder", () => {
  for (const jobType of JOB_TYPES) {
    const builtIn = BUILT_IN_PROMPTS[jobType];
    assert.deepEqual(parsePrompt(jobType, formatPromptFile(jobType, builtIn)), builtIn, jobType);
  }
});

Deno.test("a prompt file is refused for unknown or missing placeholders and a bad layout", () => {
  const unknown = problemsOf(() =>
    parsePrompt(
      "intent_classify",
      "=== user ===\n{{message}} {{timezone}} {{reference_time}} {{mood}}",
      "x.txt",
    )
  );
  assert.match(unknown, /x\.txt: unknown placeholder \{\{mood\}\} \(intent_classify knows/);
  const missing = problemsOf(() =>
    parsePrompt("email_extract", "=== user ===\n{{email}} {{ subject }}", "e.txt")
  );
  assert.match(missing, /e\.txt: \{\{current_time\}\} is missing/);
  assert.match(missing, /e\.txt: \{\{timezone\}\} is missing/);
  assert.doesNotMatch(missing, /subject/, "spaces inside the braces are fine");
  assert.match(
    problemsOf(() => parsePrompt("followup", "=== system ===\nAsk {{message}}", "f.txt")),
    /f\.txt: the "=== user ===" section is missing or empty/,
  );
  assert.match(
    problemsOf(() => parsePrompt("followup", "Ask well\n=== user ===\n{{message}}", "f.txt")),
    /f\.txt: line 1 is outside a section/,
  );
  assert.match(
    problemsOf(() =>
      parsePrompt("followup", "=== user ===\n{{message}}\n=== system ===\nAsk", "f.txt")
    ),
    /must come before/,
  );
  // Placeholders in the comment lines do not count.
  assert.match(
    problemsOf(() => parsePrompt("task_match", "# {{memory}} {{tasks}}\n=== user ===\nHi")),
    /\{\{memory\}\} is missing/,
  );
});

Deno.test("rendering is one pass and leaves out a line whose only placeholder is empty", () => {
  const template = parsePrompt(
    "followup",
    "=== system ===\n=== user ===\nMessage: {{message}}\n  {{context}}  \nYour question:",
  );
  assert.deepEqual(
    renderPrompt(template, { message: "{{context}} is {{ message }}", context: "" }),
    {
      system: undefined,
      prompt: "Message: {{context}} is {{ message }}\nYour question:",
    },
  );
  assert.equal(
    renderPrompt(template, { message: "hi", context: "C" }).prompt,
    "Message: hi\n  C  \nYour question:",
  );
});

Deno.test("readPromptsDir reads the known files, skips dotfiles and names every bad file", async () => {
  await withDir(async (dir) => {
    await Deno.writeTextFile(join(dir, ".gitkeep"), "");
    await Deno.writeTextFile(join(dir, "followup.txt"), "=== user ===\nAsk about {{message}}\n");
    assert.deepEqual(readPromptsDir(dir), {
      followup: { system: "", user: "Ask about {{message}}" },
    });
    await Deno.writeTextFile(join(dir, "intent.txt"), "=== user ===\n{{message}}");
    await Deno.writeTextFile(join(dir, "task_match.txt"), "=== user ===\n{{memory}}");
    await Deno.mkdir(join(dir, "image_tag.txt"));
    const problems = problemsOf(() => readPromptsDir(dir));
    assert.match(problems, /intent\.txt: unknown prompt file \(expected one of image_tag\.txt, /);
    assert.match(problems, /image_tag\.txt: unknown prompt file/, "a folder is no prompt file");
    assert.match(problems, /task_match\.txt: \{\{tasks\}\} is missing/);
    assert.match(
      problemsOf(() => readPromptsDir(join(dir, "nope"))),
      /nope: cannot read the prompts folder/,
    );
  });
});

Deno.test("LLM_PROMPTS_DIR: loadSettings refuses a bad file with the other settings problems", async () => {
  await withDir(async (dir) => {
    await Deno.writeTextFile(join(dir, "followup.txt"), "=== user ===\n{{question}}");
    const problems = problemsOf(() => loadSettings({ LLM_PROMPTS_DIR: dir, LLM_MAX_RETRIES: "0" }));
    assert.match(problems, /LLM_MAX_RETRIES/);
    assert.match(
      problems,
      /LLM_PROMPTS_DIR: .*followup\.txt: unknown placeholder \{\{question\}\}/,
    );
    assert.match(problems, /followup\.txt: \{\{message\}\} is missing/);
  });
});

Deno.test("deno task start stops with exit 2 naming a bad prompt file", async () => {
  await withDir(async (dir) => {
    await Deno.writeTextFile(join(dir, "emails.txt"), "=== user ===\nhi");
    const { code, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["task", "--quiet", "start"],
      cwd: REPO_ROOT,
      env: { LLM_PROMPTS_DIR: dir, NO_COLOR: "1", REDIS_URL: "redis://127.0.0.1:1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(stderr);
    assert.equal(code, 2, text);
    assert.match(text, /LLM_PROMPTS_DIR: .*emails\.txt: unknown prompt file/);
    assert.doesNotMatch(text, /\bat .*\.ts:\d+/, "no stack trace");
  });
});

Deno.test("deno task prompts writes the built-ins, which the worker reads back unchanged", async () => {
  await withDir(async (dir) => {
    const target = join(dir, "prompts");
    const run = await new Deno.Command(Deno.execPath(), {
      args: ["task", "--quiet", "prompts", target],
      cwd: REPO_ROOT,
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(run.code, 0, new TextDecoder().decode(run.stderr));
    assert.deepEqual(
      [...Deno.readDirSync(target)].map((e) => e.name).sort(),
      JOB_TYPES.map((t) => `${t}.txt`).sort(),
    );
    assert.deepEqual(loadSettings({ LLM_PROMPTS_DIR: target }).llmPrompts, BUILT_IN_PROMPTS);

    // An edited file is never overwritten without --force.
    await Deno.writeTextFile(join(target, "followup.txt"), "=== user ===\nMine: {{message}}");
    const errors: string[] = [];
    assert.equal(await writePrompts([target], { out: () => {}, err: (l) => errors.push(l) }), 1);
    assert.match(errors.join("\n"), /followup\.txt already exists/);
    assert.equal(readPromptsDir(target).followup?.user, "Mine: {{message}}");
    assert.equal(await writePrompts([target, "--force"], { out: () => {}, err: () => {} }), 0);
    assert.deepEqual(readPromptsDir(target).followup, BUILT_IN_PROMPTS.followup);
    assert.equal(await writePrompts([], { out: () => {}, err: () => {} }), 2);
  });
});

Deno.test("a worker sends the custom prompt, filled in, and the built-in one elsewhere", async () => {
  await withDir(async (dir) => {
    await Deno.writeTextFile(
      join(dir, "followup.txt"),
      "# Shorter, for a small model.\n=== system ===\nYou ask one short question.\n" +
        "=== user ===\nMessage: {{message}}\n{{context}}\nQuestion:\n",
    );
    await Deno.writeTextFile(
      join(dir, "task_match.txt"),
      "=== user ===\nNote: {{memory}}\nTasks:\n{{tasks}}\nJSON only.",
    );
    await using stack = await startStack({ env: { LLM_PROMPTS_DIR: dir } });
    stack.core.seedTask({ id: "t-1", owner_user_id: 1, description: "Buy milk" });
    await stack.startWorker();
    const followup = await stack.enqueue("followup", { message: "the {{context}} thing" });
    const match = await stack.enqueue("task_match", { memory_id: "m", memory_content: "milk" });
    const intent = await stack.enqueue("intent_classify", { message: "note this" });
    await stack.waitForJobs([followup, match, intent]);

    const bySchema = (name?: string) =>
      stack.model.requests.find((r) => r.body.response_format?.json_schema?.name === name)!;
    const followupRequest = stack.model.requests.find((r) => !r.body.response_format)!;
    assert.deepEqual(followupRequest.body.messages.map((m) => [m.role, m.content]), [
      ["system", "You ask one short question."],
      ["user", "Message: the {{context}} thing\nQuestion:"],
    ]);
    const matchRequest = bySchema("task_match");
    assert.deepEqual(matchRequest.body.messages.map((m) => m.role), ["user"], "no system part");
    assert.equal(
      promptOf(matchRequest),
      "Note: milk\nTasks:\n1. [id: t-1] Buy milk (no due date)\nJSON only.",
    );
    const intentRequest = bySchema("intent_result");
    assert.equal(intentRequest.body.messages[0].content, BUILT_IN_PROMPTS.intent_classify.system);
    assert.equal(stack.core.state.jobs.get(followup)?.status, "completed");
  });
});
