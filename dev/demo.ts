/**
 * `deno task demo`: the whole pipeline on this machine in one command, with nothing to set up
 * but Deno and `redis-server`.
 *
 * It starts a private `redis-server`, the Core emulator, the scripted model and one worker;
 * publishes sample jobs of all five types from `dev/samples/` the way Core does (a photo saved
 * without a file extension, messages with relative times, one written hours ago, an HTML email
 * with quoted history, a note that completes a task, a follow-up answered by the user); shows
 * each job as it ends; prints what reached Core and what the user was told; stops everything and
 * exits 0 when every job completed (1 otherwise).
 *
 * @module
 */
import { join } from "node:path";
import type { EmulatedJob } from "../testing/core_emulator.ts";
import type { JobType } from "../lib/job.ts";
import { setupLogging, teardownLogging } from "../lib/log.ts";
import { DEAD_STREAM, NOTIFY_STREAM, STREAM_OF } from "../lib/streams.ts";
import { dead } from "../cli/dead.ts";
import { writePrompts } from "../cli/prompts.ts";
import { loadSettings, SettingsError } from "../lib/config.ts";
import { createWorker } from "../lib/worker.ts";
import { freePort } from "../testing/redis_server.ts";
import { type LocalStack, SAMPLE_USER, SAMPLES_DIR, startLocalStack } from "./local_stack.ts";

/** One job of the demo and how it ended. */
export interface DemoJob {
  /** Short description of the input, for the table. */
  label: string;
  /** Job type. */
  jobType: JobType;
  /** Core's job id. */
  jobId: string;
  /** The job as Core has it at the end. */
  job: EmulatedJob;
}

/** A notification as the Telegram gateway reads it. */
export interface DemoNotification {
  /** Recipient. */
  user_id: number;
  /** e.g. `llm_intent_result`. */
  message_type: string;
  /** The content. */
  content: Record<string, unknown>;
}

/** What the demo did, for the tables and for tests. */
export interface DemoReport {
  /** Every job, in the order published. */
  jobs: DemoJob[];
  /** Every notification published, in order. */
  notifications: DemoNotification[];
  /** Core's state at the end (memories, events, tasks, jobs). */
  core: LocalStack["core"]["state"];
  /** The worker's `/metrics` text at the end. */
  metrics: string;
  /** The question a French-speaking user got (their Core settings say `language: fr`). */
  frenchQuestion: string;
  /** What `deno task dead list` printed for the malformed entry, and whether `drop` removed it. */
  deadLetters: { listed: string; dropped: boolean };
  /** Tokens the model reported, per job type: `[prompt, completion]`. */
  tokens: Record<string, [number, number]>;
  /** The fallback scenario: the job's status, the server that answered, and the notices sent. */
  fallback: { status: string; server: string; notices: string[] };
  /** True when every job completed. */
  ok: boolean;
}

/** Options of {@linkcode runDemo}. */
export interface DemoOptions {
  /** Prints one line (default `console.log`). */
  out?: (line: string) => void;
  /** Delay of each scripted model answer (ms, default 150), so progress can be watched. */
  latencyMs?: number;
  /** How long the jobs may take in all (ms, default 60000). */
  timeoutMs?: number;
}

interface Sample {
  label: string;
  jobType: JobType;
  payload: Record<string, unknown>;
}

async function readSample(name: string): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(join(SAMPLES_DIR, name)));
}

/** The first samples: every job type, the intents from `messages.json`. */
async function samples(imagePath: string, now: number): Promise<Sample[]> {
  const messages = JSON.parse(
    await Deno.readTextFile(join(SAMPLES_DIR, "messages.json")),
  ) as Array<{ message: string; written_minutes_ago: number }>;
  const email = await readSample("email_extract.json");
  const followup = await readSample("followup.json");
  const taskMatch = await readSample("task_match.json");
  return [
    {
      label: "a photo saved with no file name (sunset.png)",
      jobType: "image_tag",
      payload: { ...(await readSample("image_tag.json")), image_path: imagePath },
    },
    ...messages.map((m): Sample => ({
      label: `"${m.message}"${
        m.written_minutes_ago >= 60 ? ` (written ${m.written_minutes_ago / 60} h ago)` : ""
      }`,
      jobType: "intent_classify",
      payload: {
        message: m.message,
        memory_id: null,
        original_timestamp: new Date(now - m.written_minutes_ago * 60_000).toISOString(),
      },
    })),
    { label: `"${followup.message}"`, jobType: "followup", payload: followup },
    { label: `note "${taskMatch.memory_content}"`, jobType: "task_match", payload: taskMatch },
    {
      label: `email "${email.subject}" (HTML, quoted history)`,
      jobType: "email_extract",
      payload: email,
    },
  ];
}

/** Publishes a job the way Core does: the job row first, then the envelope on its stream. */
async function publish(stack: LocalStack, sample: Sample): Promise<string> {
  const job = stack.core.seedJob({
    job_type: sample.jobType,
    payload: sample.payload,
    user_id: SAMPLE_USER,
  });
  await stack.client.xadd(
    STREAM_OF[sample.jobType],
    "*",
    "data",
    JSON.stringify({
      job_id: job.id,
      job_type: sample.jobType,
      payload: sample.payload,
      user_id: SAMPLE_USER,
    }),
  );
  return job.id;
}

/**
 * Runs the demo and returns what happened; everything it started is stopped before it returns.
 *
 * @example
 * ```ts
 * const report = await runDemo({ out: () => {} });
 * report.ok; // true when every job completed
 * ```
 */
export async function runDemo(options: DemoOptions = {}): Promise<DemoReport> {
  const out = options.out ?? ((line: string) => console.log(line));
  const timeoutMs = options.timeoutMs ?? 60_000;
  const imageDir = await Deno.makeTempDir({ prefix: "llm-worker-demo-images-" });
  try {
    // Core names an upload <IMAGE_STORAGE_PATH>/<uuid> when the photo came without a file name.
    const imagePath = join(imageDir, crypto.randomUUID());
    await Deno.copyFile(join(SAMPLES_DIR, "sunset.png"), imagePath);

    const promptsDir = join(imageDir, "prompts");
    await promptsScenario(promptsDir, out);

    out("Starting a private redis-server, the Core emulator, the scripted model and a worker…");
    await using stack = await startLocalStack({
      env: {
        WORKER_HTTP_PORT: "0",
        WORKER_CONSUMER_NAME: "demo-worker",
        WORKER_CONCURRENCY: "4",
        LLM_PROMPTS_DIR: promptsDir,
      },
      redis: "private",
      scripted: true,
      scriptedLatencyMs: options.latencyMs ?? 150,
      imageDir,
    });
    const started = Date.now();
    const jobs: DemoJob[] = [];
    const reported = new Set<string>();
    let total = 0;
    const enqueue = async (sample: Sample) => {
      const jobId = await publish(stack, sample);
      jobs.push({ ...sample, jobId, job: stack.core.state.jobs.get(jobId)! });
    };
    /** Prints the jobs that ended since the last call; true when all have. */
    const progress = () => {
      for (const job of jobs) {
        const status = stack.core.state.jobs.get(job.jobId)!.status;
        if ((status === "completed" || status === "failed") && !reported.has(job.jobId)) {
          reported.add(job.jobId);
          const seconds = ((Date.now() - started) / 1000).toFixed(1);
          out(
            `  ${status === "completed" ? "✓" : "✗"} [${
              String(reported.size).padStart(2)
            }/${total}] ${job.jobType.padEnd(15)} ${status} at ${seconds} s  ${
              clip(job.label, 60)
            }`,
          );
        }
      }
      return reported.size === total;
    };
    const waitUntil = async (done: () => boolean, what: string) => {
      while (!done()) {
        progress();
        if (Date.now() - started > timeoutMs) {
          throw new Error(`The demo timed out after ${timeoutMs / 1000} s waiting for ${what}.`);
        }
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      progress();
    };

    const first = await samples(imagePath, Date.now());
    total = first.length + 1; // + the answer to the follow-up question
    out(`Publishing ${first.length} sample jobs of all five types for user ${SAMPLE_USER}…`);
    for (const sample of first) await enqueue(sample);

    // The ambiguous message gets a question; the user's answer is classified with the exchange
    // and reuses the memory of the first message.
    const ambiguous = jobs.find((j) => j.jobType === "intent_classify" && j.label === '"Friday"');
    if (!ambiguous) throw new Error('messages.json must hold the ambiguous message "Friday".');
    await waitUntil(() => reported.has(ambiguous.jobId), "the ambiguous message");
    const asked = stack.core.state.jobs.get(ambiguous.jobId)!.result as Record<string, unknown>;
    const answer = "A reminder at 5pm to pick up the cake";
    await enqueue({
      label: `"Friday" + answer "${answer}"`,
      jobType: "intent_classify",
      payload: {
        message: "Friday",
        memory_id: asked?.memory_id ?? null,
        original_timestamp: new Date().toISOString(),
        followup_context: {
          followup_question: String(asked?.followup_question ?? "What do you mean?"),
          user_answer: answer,
        },
      },
    });
    await waitUntil(() => reported.size === total, "every job to end");

    const notifications = (await stack.client.xrange(NOTIFY_STREAM, "-", "+")).map(
      ([, fields]) => JSON.parse(fields[1]) as DemoNotification,
    );
    for (const job of jobs) job.job = stack.core.state.jobs.get(job.jobId)!;
    const frenchQuestion = await languageScenario(stack, out, started + timeoutMs);
    const deadLetters = await deadLetterScenario(stack, out, started + timeoutMs);
    const metrics = await stack.worker.metrics.metrics();
    const tokens = tokensScenario(metrics, out);
    const fallback = await fallbackScenario(stack, out, started + timeoutMs);
    const report: DemoReport = {
      jobs,
      notifications,
      core: stack.core.state,
      metrics,
      deadLetters,
      frenchQuestion,
      tokens,
      fallback,
      ok: jobs.every((j) => j.job.status === "completed") && deadLetters.dropped &&
        fallback.status === "completed",
    };
    printReport(report, out);
    out("");
    out("Stopping the worker, the Core emulator, the scripted model and redis-server…");
    return report;
  } finally {
    await Deno.remove(imageDir, { recursive: true }).catch(() => {});
  }
}

/**
 * Editable prompts: `deno task prompts` writes the built-ins, the followup prompt is edited and
 * the others removed (they stay built in); a copy with a mistake shows the check that stops a
 * start. The demo's worker then runs with `LLM_PROMPTS_DIR` set to the folder.
 */
async function promptsScenario(dir: string, out: (line: string) => void): Promise<void> {
  out(`Prompts: deno task prompts ${dir}`);
  await writePrompts([dir], { out: (line) => out(`  ${line}`), err: (line) => out(`  ${line}`) });
  const file = join(dir, "followup.txt");
  const builtIn = await Deno.readTextFile(file);
  const edited = builtIn.replace(
    "friendly and brief (at most 25 words)",
    "warm and very brief (at most 15 words)",
  );
  await Deno.writeTextFile(file, edited);
  for await (const entry of Deno.readDir(dir)) {
    if (entry.name !== "followup.txt") await Deno.remove(join(dir, entry.name));
  }
  out("  followup.txt edited (a warmer, shorter question); the other four removed (built in).");
  await Deno.writeTextFile(file, edited.replace("<<<\n{{message}}", "<<<\n{{mesage}}"));
  try {
    loadSettings({ LLM_PROMPTS_DIR: dir });
  } catch (error) {
    if (!(error instanceof SettingsError)) throw error;
    out("  With a typo in a placeholder, the start stops with exit 2:");
    for (const problem of error.problems) out(`    ${problem}`);
  }
  await Deno.writeTextFile(file, edited);
  out(`  Typo fixed; the worker runs with LLM_PROMPTS_DIR=${dir}.`);
  out("");
}

/**
 * The user's language: user 2's Core settings say `language: fr`, so the worker asks the model to
 * write their follow-up question in French (the scripted model has one French phrase for it).
 */
async function languageScenario(
  stack: LocalStack,
  out: (line: string) => void,
  deadline: number,
): Promise<string> {
  const userId = SAMPLE_USER + 1;
  stack.core.state.users.add(userId);
  stack.core.state.settings.set(userId, {
    user_id: userId,
    timezone: "Europe/Paris",
    language: "fr",
  });
  const payload = { message: "le truc de la semaine prochaine" };
  out("");
  out(`The user's language: user ${userId}'s settings in Core say language "fr".`);
  const ended = await runFollowup(stack, payload, userId, deadline, "the French job");
  const question = String((ended.result as Record<string, unknown> | null)?.question ?? "");
  out(`  followup "${payload.message}" → ${ended.status}: ${question}`);
  return question;
}

/** Publishes a followup job as Core does and waits until it ended in Core. */
async function runFollowup(
  stack: LocalStack,
  payload: Record<string, unknown>,
  userId: number,
  deadline: number,
  what: string,
): Promise<EmulatedJob> {
  const job = stack.core.seedJob({ job_type: "followup", payload, user_id: userId });
  const envelope = { job_id: job.id, job_type: "followup", payload, user_id: userId };
  await stack.client.xadd(STREAM_OF.followup, "*", "data", JSON.stringify(envelope));
  let ended = stack.core.state.jobs.get(job.id)!;
  while (ended.status !== "completed" && ended.status !== "failed") {
    if (Date.now() > deadline) throw new Error(`The demo timed out waiting for ${what}.`);
    await new Promise((resolve) => setTimeout(resolve, 50));
    ended = stack.core.state.jobs.get(job.id)!;
  }
  return ended;
}

/**
 * A producer bug: an envelope with no `job_id`. The worker keeps it in `llm:dead`; the demo then
 * runs `deno task dead list`, `show` and `drop` on it.
 */
async function deadLetterScenario(
  stack: LocalStack,
  out: (line: string) => void,
  deadline: number,
): Promise<DemoReport["deadLetters"]> {
  out("");
  out("Dead letters: a producer publishes an envelope with no job_id to llm:intent…");
  const envelope = { job_type: "intent_classify", payload: { message: "hello" }, user_id: 1 };
  await stack.client.xadd(STREAM_OF.intent_classify, "*", "data", JSON.stringify(envelope));
  while (await stack.client.xlen(DEAD_STREAM) === 0) {
    if (Date.now() > deadline) throw new Error("The demo timed out waiting for the dead letter.");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const env = { REDIS_URL: stack.settings.redisUrl };
  const run = async (args: string[]) => {
    const lines: string[] = [];
    out(`  $ deno task dead ${args.join(" ")}`);
    const code = await dead(args, { env, out: (l) => lines.push(l), err: (l) => lines.push(l) });
    for (const line of lines) out(`    ${line}`);
    return { code, text: lines.join("\n") };
  };
  const listed = await run(["list"]);
  const [id] = listed.text.split("\n")[1]?.split(" ") ?? [];
  await run(["show", id]);
  out(
    "  (requeue would publish it unchanged to llm:intent; with no job_id it can never run: drop)",
  );
  const dropped = await run(["drop", id]);
  return { listed: listed.text, dropped: dropped.code === 0 };
}

/** Token accounting: what `llm_worker_model_tokens_total` says per job type after the demo. */
function tokensScenario(metrics: string, out: (line: string) => void): DemoReport["tokens"] {
  const tokens: DemoReport["tokens"] = {};
  for (const match of metrics.matchAll(/^llm_worker_model_tokens_total\{([^}]*)\} (\d+)/gm)) {
    const labels = Object.fromEntries(
      [...match[1].matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]),
    );
    const counts = tokens[labels.job_type] ??= [0, 0];
    counts[labels.kind === "prompt" ? 0 : 1] += Number(match[2]);
  }
  out("");
  out("Token accounting (llm_worker_model_tokens_total, from each answer's usage):");
  for (const [jobType, [prompt, completion]] of Object.entries(tokens)) {
    if (prompt + completion > 0) {
      out(`  ${jobType.padEnd(15)} ${prompt} prompt, ${completion} completion tokens`);
    }
  }
  return tokens;
}

/**
 * A fallback model server: the demo's worker stops and another starts whose primary server
 * (`LLM_BASE_URL`) does not answer and whose `LLM_FALLBACK_BASE_URL` is the scripted model. A
 * follow-up job completes through the fallback, and the user gets no outage notice.
 */
async function fallbackScenario(
  stack: LocalStack,
  out: (line: string) => void,
  deadline: number,
): Promise<DemoReport["fallback"]> {
  out("");
  const down = `http://127.0.0.1:${freePort()}/v1`;
  out(`Fallback: a worker whose primary model server (${down}) does not answer,`);
  out(`  with LLM_FALLBACK_BASE_URL=${stack.settings.llmBaseUrl} (the scripted model).`);
  await stack.worker.close();
  const worker = createWorker(
    {
      ...stack.settings,
      llmBaseUrl: down,
      llmFallback: {
        baseUrl: stack.settings.llmBaseUrl,
        apiKey: "not-needed",
        textModel: "scripted-fallback",
        visionModel: "scripted-fallback",
      },
    },
    { http: false },
  );
  try {
    await worker.start();
    const before = await stack.client.xlen(NOTIFY_STREAM);
    const payload = { message: "the thing on Friday" };
    const ended = await runFollowup(stack, payload, SAMPLE_USER, deadline, "the fallback");
    const metrics = await worker.metrics.metrics();
    const server =
      /llm_worker_model_request_duration_seconds_count\{[^}]*server="fallback"[^}]*outcome="ok"[^}]*\} [1-9]/
          .test(metrics)
        ? "fallback"
        : "primary";
    const notices = (await stack.client.xrange(NOTIFY_STREAM, "-", "+")).slice(before).map(
      ([, fields]) => (JSON.parse(fields[1]) as DemoNotification).message_type,
    );
    const question = String((ended.result as Record<string, unknown> | null)?.question ?? "");
    out(`  followup "${payload.message}" → ${ended.status} by the ${server} server: ${question}`);
    out(`  notifications: ${notices.join(", ")} (no outage notice while the fallback serves)`);
    return { status: ended.status, server, notices };
  } finally {
    await worker.close();
  }
}

// ------------------------------------------------------------------ tables

function clip(text: string, max: number): string {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > max ? `${flat.slice(0, max - 1)}…` : flat;
}

/** A plain-text table: a header row, a rule, one row per item; cells clipped to `widths`. */
export function table(headers: string[], rows: string[][], widths: number[]): string[] {
  const cells = [headers, ...rows].map((row) => row.map((cell, i) => clip(cell, widths[i])));
  const size = headers.map((_, i) => Math.max(...cells.map((row) => row[i].length)));
  const line = (row: string[]) => row.map((cell, i) => cell.padEnd(size[i])).join("  ").trimEnd();
  return [line(cells[0]), size.map((n) => "─".repeat(n)).join("  "), ...cells.slice(1).map(line)];
}

/** One line saying what a job's result means. */
function summarise(job: DemoJob): string {
  const r = (job.job.result ?? {}) as Record<string, unknown>;
  if (job.job.status === "failed") return `failed: ${job.job.error_message}`;
  const list = (value: unknown) => Array.isArray(value) ? value.join(", ") : "";
  switch (job.jobType) {
    case "image_tag":
      return `${r.description} Tags: ${list(r.tags)}`;
    case "followup":
      return String(r.question);
    case "task_match":
      return r.matched_task_id
        ? `matches task ${r.matched_task_id} (confidence ${r.confidence})`
        : `no match: ${r.reason}`;
    case "email_extract": {
      const events = (r.events ?? []) as Array<Record<string, unknown>>;
      const left = (r.left_out ?? []) as Array<Record<string, unknown>>;
      return `${events.map((e) => `${e.description} @ ${e.event_time}`).join("; ")}` +
        (left.length ? ` (${left.length} left out: ${left.map((e) => e.reason).join("; ")})` : "");
    }
    case "intent_classify": {
      const stale = r.stale ? " [stale]" : "";
      switch (r.intent) {
        case "reminder":
          return `reminder: ${r.action} @ ${r.resolved_time}${stale}`;
        case "task":
          return `task: ${r.description}${
            r.resolved_due_time ? ` due ${r.resolved_due_time}` : ""
          }${stale}`;
        case "search": {
          const results = (r.results ?? []) as Array<{ title: string }>;
          return `search ${list(r.keywords)}: ${results.length} found${
            results.length ? ` (${results.map((x) => x.title).join("; ")})` : ""
          }`;
        }
        case "general_note":
          return `note, tags: ${list(r.suggested_tags)}`;
        case "ambiguous":
          return `ambiguous: ${r.followup_question}`;
      }
      return String(r.intent);
    }
  }
}

function printReport(report: DemoReport, out: (line: string) => void): void {
  const state = report.core;
  out("");
  out("Jobs");
  for (
    const line of table(
      ["#", "job type", "input", "status", "outcome"],
      report.jobs.map((job, i) => [
        String(i + 1),
        job.jobType,
        job.label,
        job.job.status,
        summarise(job),
      ]),
      [3, 15, 48, 9, 90],
    )
  ) out(`  ${line}`);

  out("");
  out("What reached Core");
  const rows: string[][] = [];
  for (const memory of state.memories.values()) {
    const suggested = memory.tags.filter((t) => t.status === "suggested").map((t) => t.tag);
    if (memory.id.startsWith("sample-") && suggested.length === 0) continue; // seeded, untouched
    rows.push([
      "memory",
      memory.id.startsWith("sample-") ? memory.id : memory.id.slice(0, 8),
      memory.content || `(${memory.media_type})`,
      suggested.length ? `suggested tags: ${suggested.join(", ")}` : "created",
    ]);
  }
  for (const event of state.events.values()) {
    rows.push([
      "event",
      event.id.slice(0, 8),
      `${event.description} @ ${event.event_time}`,
      `${event.status}, from ${event.source_type}: ${event.source_detail}`,
    ]);
  }
  const openTasks = [...state.tasks.values()].filter((t) => t.state === "NOT_DONE").length;
  rows.push([
    "tasks",
    "",
    `${state.tasks.size} seeded, ${openTasks} still open`,
    "never changed by the worker",
  ]);
  for (const line of table(["what", "id", "content", "status"], rows, [6, 14, 60, 60])) {
    out(`  ${line}`);
  }

  out("");
  out(`What user ${SAMPLE_USER} is told (notify:telegram)`);
  for (
    const line of table(
      ["#", "message_type", "content"],
      report.notifications.map((
        n,
        i,
      ) => [String(i + 1), n.message_type, JSON.stringify(n.content)]),
      [3, 22, 130],
    )
  ) out(`  ${line}`);

  const completed = report.jobs.filter((j) => j.job.status === "completed").length;
  const tokens = [...report.metrics.matchAll(/^llm_worker_model_tokens_total\{[^}]*\} (\d+)/gm)]
    .reduce((sum, m) => sum + Number(m[1]), 0);
  out("");
  out(
    `${completed} of ${report.jobs.length} jobs completed; ${report.notifications.length} notifications; ${tokens} tokens reported by the (scripted) model.`,
  );
}

/** `deno task demo`: runs the demo; 0 when every job completed. */
export async function main(): Promise<number> {
  await setupLogging({ logLevel: "error", logFormat: "text" });
  try {
    const report = await runDemo();
    console.log(
      report.ok ? "Demo finished: every job completed." : "Demo finished with failed jobs.",
    );
    return report.ok ? 0 : 1;
  } catch (error) {
    console.error(`The demo failed: ${error instanceof Error ? error.message : error}`);
    return 1;
  } finally {
    await teardownLogging();
  }
}

if (import.meta.main) Deno.exit(await main());
