/**
 * `deno task enqueue <job_type> [payload.json|-] [--user N|none] [--wait] [--timeout S]`:
 * publishes one job the way Core does, for trying the worker by hand.
 *
 * 1. Checks the job type and the payload against the handler's own schema before anything is
 *    published: a mistake ends with a clear message and exit code 2. With no payload file, the
 *    sample `dev/samples/<job_type>.json` is used; `-` reads the payload from standard input.
 * 2. Creates the job in Core with `POST /llm_jobs` at `CORE_API_URL`. The Core emulator (it
 *    answers with `x-core-emulator: true`) only stores the job, so this tool publishes it; a real
 *    Core publishes the job itself, so this tool does not publish it a second time. When Core
 *    does not take the job, a warning says so and the job is published with a new id of its own
 *    (the worker then cannot record its outcome in Core).
 * 3. Publishes the envelope `{"job_id", "job_type", "payload", "user_id"}` in the `data` field of
 *    the job type's stream at `REDIS_URL`.
 * 4. With `--wait`, polls `GET /llm_jobs/{id}` until the job is `completed` or `failed` (or
 *    `--timeout` seconds, default 120, pass), then prints the outcome and the notifications the
 *    user got meanwhile. Exit code 0 when completed, 1 when failed or still running.
 *
 * @module
 */
import { Redis } from "ioredis";
import { readEnvironment, redactUrl } from "../lib/config.ts";
import { HANDLERS } from "../lib/handlers/mod.ts";
import type { JobType } from "../lib/job.ts";
import { describeError } from "../lib/log.ts";
import { NOTIFY_STREAM, STREAM_OF } from "../lib/streams.ts";
import { SAMPLE_USER, SAMPLES_DIR } from "./local_stack.ts";

/** Where {@linkcode enqueue} reads and writes; the defaults are the process's. */
export interface EnqueueIO {
  /** Environment (REDIS_URL, CORE_API_URL); default `.env` under the real environment. */
  env: Record<string, string>;
  /** Prints one line of output. */
  out: (line: string) => void;
  /** Prints one line of error. */
  err: (line: string) => void;
  /** Reads standard input (for `-`). */
  stdin: () => Promise<string>;
}

const USAGE =
  `Usage: deno task enqueue <job_type> [payload.json|-] [--user N|none] [--wait] [--timeout S]
  job_type   ${Object.keys(HANDLERS).join(", ")}
  payload    a JSON file, or - for standard input (default: dev/samples/<job_type>.json)
  --user     the envelope's user_id (default ${SAMPLE_USER}; "none" sends null)
  --wait     wait for the outcome in Core and print it
  --timeout  seconds --wait waits at most (default 120)
Environment: REDIS_URL, CORE_API_URL (as the worker reads them).`;

/** Thrown for bad input: printed with the usage hint, exit code 2. */
class InputError extends Error {}

interface Arguments {
  jobType: string;
  payloadPath?: string;
  userId: number | null;
  wait: boolean;
  timeoutS: number;
}

function parseArguments(args: string[]): Arguments | "help" {
  const positional: string[] = [];
  let userId: number | null = SAMPLE_USER;
  let wait = false;
  let timeoutS = 120;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const [flag, inline] = arg.startsWith("--") ? arg.split(/=(.*)/s, 2) : [arg, undefined];
    const value = () => {
      const v = inline ?? args[++i];
      if (v === undefined) throw new InputError(`${flag} needs a value.`);
      return v;
    };
    if (flag === "--help" || flag === "-h") return "help";
    else if (flag === "--wait") wait = true;
    else if (flag === "--user") {
      const v = value();
      if (v === "none" || v === "null") userId = null;
      else if (/^-?\d+$/.test(v)) userId = Number(v);
      else {throw new InputError(
          `--user expects a whole number or "none", not ${JSON.stringify(v)}.`,
        );}
    } else if (flag === "--timeout") {
      const v = Number(value());
      if (!(v > 0)) throw new InputError("--timeout expects a number of seconds above 0.");
      timeoutS = v;
    } else if (arg.startsWith("--")) throw new InputError(`Unknown option ${flag}.`);
    else positional.push(arg);
  }
  if (positional.length === 0) throw new InputError("Name a job type.");
  if (positional.length > 2) {
    throw new InputError(`Too many arguments: ${positional.slice(2).join(" ")}.`);
  }
  return { jobType: positional[0], payloadPath: positional[1], userId, wait, timeoutS };
}

async function readPayload(
  args: Arguments,
  io: EnqueueIO,
): Promise<Record<string, unknown>> {
  let text: string;
  let source: string;
  if (args.payloadPath === "-") {
    source = "standard input";
    text = await io.stdin();
  } else {
    source = args.payloadPath ?? `${SAMPLES_DIR}${args.jobType}.json`;
    if (!args.payloadPath) io.out(`Payload: the sample ${source}`);
    try {
      text = await Deno.readTextFile(source);
    } catch (error) {
      throw new InputError(`Cannot read the payload file ${source}: ${describeError(error)}`);
    }
  }
  let payload: unknown;
  try {
    payload = JSON.parse(text);
  } catch (error) {
    throw new InputError(`The payload in ${source} is not JSON: ${describeError(error)}`);
  }
  if (!payload || typeof payload !== "object" || Array.isArray(payload)) {
    throw new InputError(`The payload in ${source} must be a JSON object.`);
  }
  return payload as Record<string, unknown>;
}

/** The job type named on the command line; throws {@linkcode InputError} for an unknown one. */
function checkJobType(name: string): JobType {
  if (!(name in HANDLERS)) {
    throw new InputError(
      `Unknown job type ${JSON.stringify(name)}. Job types: ${Object.keys(HANDLERS).join(", ")}.`,
    );
  }
  return name as JobType;
}

/** Checks the payload as the worker will; throws {@linkcode InputError} with every problem. */
function checkPayload(
  jobType: JobType,
  args: Arguments,
  payload: Record<string, unknown>,
): void {
  const handler = HANDLERS[jobType];
  const parsed = handler.payloadSchema.safeParse(payload);
  const problems = parsed.success
    ? []
    : parsed.error.issues.map((issue) =>
      `  - ${issue.path.join(".") || "payload"}: ${issue.message}`
    );
  if (handler.requiresUser && args.userId === null) {
    problems.push(`  - user_id: a ${jobType} job acts for an owner; give --user N`);
  }
  if (problems.length > 0) {
    throw new InputError(
      `The ${jobType} payload would fail in the worker:\n${problems.join("\n")}`,
    );
  }
}

/** `POST /llm_jobs`: the job's id, who publishes it, or `undefined` with a warning printed. */
async function createInCore(
  coreUrl: string,
  body: { job_type: string; payload: Record<string, unknown>; user_id: number | null },
  io: EnqueueIO,
): Promise<{ id: string; emulator: boolean } | undefined> {
  try {
    const response = await fetch(`${coreUrl}/llm_jobs`, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(5_000),
    });
    const text = await response.text();
    if (response.ok) {
      const id = JSON.parse(text)?.id;
      if (typeof id === "string" || typeof id === "number") {
        return { id: String(id), emulator: response.headers.get("x-core-emulator") === "true" };
      }
    }
    io.err(
      `Warning: Core at ${coreUrl} answered POST /llm_jobs with ${response.status} ${
        text.slice(0, 200)
      }; the job is published without a record in Core.`,
    );
  } catch (error) {
    io.err(
      `Warning: Core at ${coreUrl} did not answer POST /llm_jobs (${
        describeError(error)
      }); the job is published without a record in Core, so the worker cannot record its outcome (set CORE_API_URL).`,
    );
  }
  return undefined;
}

async function waitForOutcome(
  coreUrl: string,
  jobId: string,
  timeoutS: number,
  io: EnqueueIO,
): Promise<Record<string, unknown> | undefined> {
  const deadline = Date.now() + timeoutS * 1000;
  let last = "";
  while (Date.now() < deadline) {
    try {
      const response = await fetch(`${coreUrl}/llm_jobs/${encodeURIComponent(jobId)}`, {
        headers: { accept: "application/json" },
        signal: AbortSignal.timeout(5_000),
      });
      if (response.ok) {
        const job = await response.json();
        if (job.status !== last) io.out(`  … ${job.status}`);
        last = job.status;
        if (job.status === "completed" || job.status === "failed") return job;
      } else await response.body?.cancel();
    } catch {
      // Core away for a moment: keep polling until the deadline
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return undefined;
}

/**
 * Runs the tool; resolves with the exit code (0 done, 1 failed or unreachable, 2 bad input).
 *
 * @example
 * ```ts
 * const code = await enqueue(["followup", "-", "--wait"], { stdin: async () => '{"message":"hm"}' });
 * ```
 */
export async function enqueue(args: string[], io: Partial<EnqueueIO> = {}): Promise<number> {
  const env = io.env ?? readEnvironment();
  const ioFull: EnqueueIO = {
    env,
    out: io.out ?? ((line) => console.log(line)),
    err: io.err ?? ((line) => console.error(line)),
    stdin: io.stdin ?? (() => new Response(Deno.stdin.readable).text()),
  };
  const { out, err } = ioFull;
  let opts: Arguments;
  let jobType: JobType;
  let payload: Record<string, unknown>;
  try {
    const parsed = parseArguments(args);
    if (parsed === "help") {
      out(USAGE);
      return 0;
    }
    opts = parsed;
    jobType = checkJobType(opts.jobType);
    payload = await readPayload(opts, ioFull);
    checkPayload(jobType, opts, payload);
  } catch (error) {
    if (!(error instanceof InputError)) throw error;
    err(error.message);
    err("Nothing was published. `deno task enqueue --help` shows the usage.");
    return 2;
  }

  const redisUrl = env.REDIS_URL || "redis://redis:6379";
  const coreUrl = (env.CORE_API_URL || "http://core:8000").replace(/\/+$/, "");
  const redis = new Redis(redisUrl, {
    lazyConnect: true,
    connectTimeout: 3_000,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    protocol: 2,
  });
  redis.on("error", () => {});
  try {
    try {
      await redis.connect();
    } catch (error) {
      err(
        `Redis at ${redactUrl(redisUrl)} is not reachable (${
          describeError(error)
        }); set REDIS_URL.`,
      );
      err("Nothing was published.");
      return 1;
    }
    const since = (await redis.xrevrange(NOTIFY_STREAM, "+", "-", "COUNT", 1))[0]?.[0] ?? "0-0";
    const created = await createInCore(
      coreUrl,
      { job_type: jobType, payload, user_id: opts.userId },
      ioFull,
    );
    const jobId = created?.id ?? crypto.randomUUID();
    const stream = STREAM_OF[jobType];
    if (created && !created.emulator) {
      out(`Core created ${jobType} job ${jobId} and publishes it to ${stream} itself.`);
    } else {
      const envelope = { job_id: jobId, job_type: jobType, payload, user_id: opts.userId };
      const entryId = await redis.xadd(stream, "*", "data", JSON.stringify(envelope));
      out(`Published ${jobType} job ${jobId} to ${stream} (entry ${entryId}).`);
    }
    if (!opts.wait) return 0;
    if (!created) {
      err("--wait reads the outcome from Core, which has no record of this job: not waiting.");
      return 1;
    }
    out(`Waiting up to ${opts.timeoutS} s for the outcome…`);
    const job = await waitForOutcome(coreUrl, jobId, opts.timeoutS, ioFull);
    if (!job) {
      err(
        `The job did not end within ${opts.timeoutS} s; is a worker running against ${
          redactUrl(redisUrl)
        }?`,
      );
      return 1;
    }
    out(`Job ${jobId}: ${job.status}`);
    if (job.error_message) out(`Error: ${job.error_message}`);
    if (job.result !== null && job.result !== undefined) {
      out(`Result: ${JSON.stringify(job.result, null, 2)}`);
    }
    if (opts.userId !== null) {
      const sent = (await redis.xrange(NOTIFY_STREAM, `(${since}`, "+"))
        .map(([, fields]) => JSON.parse(fields[1] ?? "{}"))
        .filter((n) => n.user_id === opts.userId);
      out(`Notifications to user ${opts.userId} since it was enqueued: ${sent.length}`);
      for (const n of sent) out(`  ${n.message_type}: ${JSON.stringify(n.content)}`);
    }
    return job.status === "completed" ? 0 : 1;
  } finally {
    redis.disconnect();
  }
}

if (import.meta.main) Deno.exit(await enqueue(Deno.args));
