/**
 * `deno task enqueue`: refuses bad input before publishing anything, publishes like Core, and
 * waits for the outcome; against a private Redis, the Core emulator and a real worker.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { enqueue } from "../dev/enqueue.ts";
import { JOB_STREAMS } from "../lib/streams.ts";
import { freePort } from "../testing/redis_server.ts";
import { type Stack, startStack } from "./helpers/stack.ts";

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

/** Runs the tool in-process against the stack; collects what it prints. */
async function run(stack: Stack, args: string[], stdin = "", env: Record<string, string> = {}) {
  const out: string[] = [];
  const err: string[] = [];
  const code = await enqueue(args, {
    env: { REDIS_URL: stack.redis.url, CORE_API_URL: stack.core.url, ...env },
    out: (line) => out.push(line),
    err: (line) => err.push(line),
    stdin: () => Promise.resolve(stdin),
  });
  return { code, out: out.join("\n"), err: err.join("\n") };
}

/** Entries in all five job streams. */
async function published(stack: Stack): Promise<number> {
  let total = 0;
  for (const stream of JOB_STREAMS) total += await stack.client.xlen(stream);
  return total;
}

Deno.test("enqueue refuses bad input with exit code 2 and publishes nothing", async () => {
  await using stack = await startStack();
  const cases: Array<[string[], string, RegExp]> = [
    [["summarise"], "", /Unknown job type "summarise"\. Job types: image_tag, intent_classify/],
    [["followup", "-"], '{"context": "no message"}', /followup payload would fail[\s\S]*message/],
    [["followup", "-"], "{not json", /is not JSON/],
    [["followup", "-"], "[1, 2]", /must be a JSON object/],
    [
      ["image_tag", "-"],
      '{"memory_id": "", "image_path": "x.png"}',
      /memory_id must be a non-empty/,
    ],
    [["task_match", "--user", "none"], "", /acts for an owner; give --user N/],
    [["followup", "/nonexistent/payload.json"], "", /Cannot read the payload file/],
    [["followup", "--user", "abc"], "", /--user expects a whole number/],
    [[], "", /Name a job type/],
  ];
  for (const [args, stdin, message] of cases) {
    const result = await run(stack, args, stdin);
    assert.equal(result.code, 2, `${args.join(" ")}: ${result.err}`);
    assert.match(result.err, message);
    assert.match(result.err, /Nothing was published/);
  }
  assert.equal(await published(stack), 0, "no stream got an entry");
  assert.equal(stack.core.state.jobs.size, 0, "no job was created in Core");
});

Deno.test("enqueue --wait publishes like Core and prints the outcome and notifications", async () => {
  await using stack = await startStack();
  await stack.startWorker();
  const result = await run(
    stack,
    ["followup", "-", "--user", "7", "--wait", "--timeout", "20"],
    '{"message": "Book the dentist"}',
  );
  assert.equal(result.code, 0, result.err);
  const [job] = [...stack.core.state.jobs.values()];
  assert.equal(job.status, "completed");
  assert.equal(job.user_id, 7);
  const [[, fields]] = await stack.client.xrange("llm:followup", "-", "+");
  assert.deepEqual(JSON.parse(fields[1]), {
    job_id: job.id,
    job_type: "followup",
    payload: { message: "Book the dentist" },
    user_id: 7,
  });
  assert.match(result.out, new RegExp(`Published followup job ${job.id} to llm:followup`));
  assert.match(result.out, new RegExp(`Job ${job.id}: completed`));
  assert.match(result.out, /"question": "What time works best for you\?"/);
  assert.match(
    result.out,
    /Notifications to user 7 since it was enqueued: 1\n {2}llm_followup_result/,
  );
});

Deno.test("enqueue uses the sample payload by default and reports a failed job with exit 1", async () => {
  await using stack = await startStack();
  await stack.startWorker();
  // dev/samples/image_tag.json names a memory the test's Core does not have: the job fails.
  const result = await run(stack, ["image_tag", "--wait", "--timeout", "20"]);
  assert.equal(result.code, 1);
  assert.match(result.out, /Payload: the sample .*dev\/samples\/image_tag\.json/);
  assert.match(result.out, /: failed\nError: /);
});

Deno.test("enqueue warns when Core does not answer, and still publishes", async () => {
  await using stack = await startStack();
  const result = await run(stack, ["followup", "-"], '{"message": "hm"}', {
    CORE_API_URL: `http://127.0.0.1:${freePort()}`,
  });
  assert.equal(result.code, 0, result.err);
  assert.match(result.err, /Warning: Core at .* did not answer POST \/llm_jobs/);
  assert.equal(await published(stack), 1);
});

Deno.test("deno task enqueue: the command line refuses an unknown job type", async () => {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["task", "--quiet", "enqueue", "nonsense"],
    cwd: REPO_ROOT,
    env: { REDIS_URL: `redis://127.0.0.1:${freePort()}`, NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(output.code, 2);
  assert.match(new TextDecoder().decode(output.stderr), /Unknown job type "nonsense"/);
});
