/**
 * A whole local stack for end-to-end tests: a private Redis, a local model server, a Core
 * emulator, an image folder, and workers built exactly as `main.ts` builds them.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { closeRedis, createRedis } from "../../lib/redis.ts";
import { loadSettings, type Settings } from "../../lib/config.ts";
import type { JobType } from "../../lib/job.ts";
import { NO_ENTITIES } from "../../lib/handlers/intent_classify.ts";
import { DEAD_STREAM, NOTIFY_STREAM, STREAM_OF } from "../../lib/streams.ts";
import { createWorker, type Worker, type WorkerOptions } from "../../lib/worker.ts";
import { type CoreEmulator, startCoreEmulator } from "../../testing/core_emulator.ts";
import {
  type ChatRequest,
  type ModelReply,
  type ModelServer,
  startModelServer,
} from "./model_server.ts";
import { pollUntil } from "./poll.ts";
import { type PrivateRedis, startRedis } from "../../testing/redis_server.ts";

/** A notification read back from `notify:telegram`. */
export interface SentNotification {
  user_id: number;
  message_type: string;
  content: Record<string, unknown>;
}

/** Options of {@linkcode startStack}. */
export interface StackOptions {
  /** Answers the model's chat requests (default: a reply by schema name, see `defaultReply`). */
  reply?: (request: ChatRequest) => ModelReply | Promise<ModelReply>;
  /** Settings for every worker, as environment variables. */
  env?: Record<string, string>;
  /** Start Redis with append-only persistence. */
  appendOnly?: boolean;
}

/** A running stack. */
export interface Stack {
  redis: PrivateRedis;
  model: ModelServer;
  core: CoreEmulator;
  /** A Redis client for the test itself. */
  client: Redis;
  /** The image folder (IMAGE_STORAGE_PATH). */
  imageDir: string;
  /** Settings for a worker, with `env` on top of the stack's. */
  settings(env?: Record<string, string>): Settings;
  /** Builds and starts an in-process worker; the stack closes it. */
  startWorker(env?: Record<string, string>, options?: WorkerOptions): Promise<Worker>;
  /** Seeds the job in Core and publishes its envelope as Core does; returns the job id. */
  enqueue(
    jobType: JobType,
    payload: Record<string, unknown>,
    userId?: number | null,
  ): Promise<string>;
  /** Publishes raw fields to a stream (for malformed entries). */
  publishRaw(stream: string, fields: string[]): Promise<string>;
  /** Every notification published so far. */
  notifications(): Promise<SentNotification[]>;
  /** Every entry of `llm:dead`, as field maps. */
  deadLetters(): Promise<Array<Record<string, string>>>;
  /** Pending entries of the group, per stream (only non-zero ones). */
  pending(): Promise<Record<string, number>>;
  /** Waits until `check` is true (polled), or fails after `timeoutMs`. */
  waitFor(check: () => boolean | Promise<boolean>, what: string, timeoutMs?: number): Promise<void>;
  /** Waits until every given job is `completed` or `failed` in Core. */
  waitForJobs(jobIds: string[], timeoutMs?: number): Promise<void>;
  /**
   * Waits until no entry is pending: Core hears of a job's end before the script that
   * acknowledges its entry publishes its notifications, so read notifications after this.
   */
  waitForAcks(timeoutMs?: number): Promise<void>;
  /** Stops the workers, the servers and Redis. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Answers by the schema the worker asked for; plain text when there is none. */
export function defaultReply(request: ChatRequest): string {
  switch (request.body.response_format?.json_schema?.name) {
    case "image_tags":
      return JSON.stringify({ description: "A dog on a beach.", tags: ["dog", "beach", "sea"] });
    case "intent_result":
      return JSON.stringify({
        ...NO_ENTITIES,
        intent: "general_note",
        suggested_tags: ["note", "misc"],
      });
    case "task_match":
      return JSON.stringify({ matched_task_id: null, confidence: 0.1, reason: "no match" });
    case "email_events":
      return JSON.stringify({ events: [] });
    default:
      return "What time works best for you?";
  }
}

/** Starts a stack; close it with `await using` or `close()`. */
export async function startStack(options: StackOptions = {}): Promise<Stack> {
  const redis = await startRedis({ appendOnly: options.appendOnly });
  const model = startModelServer(options.reply ?? defaultReply);
  const core = startCoreEmulator();
  const imageDir = await Deno.makeTempDir({ prefix: "llm-worker-images-" });
  const client = createRedis(redis.url, { eager: true });
  client.on("error", () => {}); // tests restart Redis on purpose
  const workers: Worker[] = [];

  const settings = (env: Record<string, string> = {}) =>
    loadSettings({
      REDIS_URL: redis.url,
      LLM_BASE_URL: model.url,
      CORE_API_URL: core.url,
      IMAGE_STORAGE_PATH: imageDir,
      WORKER_CONSUMER_NAME: `test-${crypto.randomUUID().slice(0, 8)}`,
      WORKER_HTTP_PORT: "0",
      WORKER_SHUTDOWN_TIMEOUT_MS: "5000",
      LOG_LEVEL: "error",
      ...options.env,
      ...env,
    });

  const waitFor = async (
    check: () => boolean | Promise<boolean>,
    what: string,
    timeoutMs = 15_000,
  ) => {
    if (!await pollUntil(check, timeoutMs)) {
      throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    }
  };

  const stack: Stack = {
    redis,
    model,
    core,
    client,
    imageDir,
    settings,
    async startWorker(env, workerOptions) {
      const worker = createWorker(settings(env), workerOptions);
      workers.push(worker);
      await worker.start();
      return worker;
    },
    async enqueue(jobType, payload, userId = 1) {
      const job = core.seedJob({ job_type: jobType, payload, user_id: userId });
      await client.xadd(
        STREAM_OF[jobType],
        "*",
        "data",
        JSON.stringify({ job_id: job.id, job_type: jobType, payload, user_id: userId }),
      );
      return job.id;
    },
    publishRaw: async (stream, fields) => (await client.xadd(stream, "*", ...fields))!,
    async notifications() {
      const entries = await client.xrange(NOTIFY_STREAM, "-", "+");
      return entries.map(([, fields]) => JSON.parse(fields[1]));
    },
    async deadLetters() {
      const entries = await client.xrange(DEAD_STREAM, "-", "+");
      return entries.map(([, fields]) => {
        const map: Record<string, string> = {};
        for (let i = 0; i < fields.length; i += 2) map[fields[i]] = fields[i + 1];
        return map;
      });
    },
    async pending() {
      const out: Record<string, number> = {};
      for (const stream of Object.values(STREAM_OF)) {
        try {
          const [count] = await client.xpending(stream, "llm-worker-group") as [number];
          if (count > 0) out[stream] = count;
        } catch {
          // no group yet
        }
      }
      return out;
    },
    waitFor,
    waitForJobs: (jobIds, timeoutMs) =>
      waitFor(
        () =>
          jobIds.every((id) =>
            ["completed", "failed"].includes(core.state.jobs.get(id)?.status ?? "")
          ),
        `jobs ${jobIds.length > 3 ? `${jobIds.length} jobs` : jobIds.join(", ")} to end`,
        timeoutMs,
      ),
    waitForAcks: (timeoutMs) =>
      waitFor(async () => Object.keys(await stack.pending()).length === 0, "the acks", timeoutMs),
    async close() {
      await Promise.all(workers.map((w) => w.close()));
      await closeRedis(client);
      await model.close();
      await core.close();
      await redis.close();
      await Deno.remove(imageDir, { recursive: true }).catch(() => {});
    },
    [Symbol.asyncDispose]: () => stack.close(),
  };
  return stack;
}
