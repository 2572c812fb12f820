/**
 * The local stack of `deno task dev` and `deno task demo`: Redis (a private `redis-server`, or one
 * that `REDIS_URL` points at), the Core emulator, optionally the scripted model, and one worker
 * built by `createWorker` exactly as `main.ts` builds it, all on loopback.
 *
 * @module
 */
import { Redis } from "ioredis";
import { fileURLToPath } from "node:url";
import { loadSettings, redactUrl, type Settings } from "../lib/config.ts";
import { LLMClient } from "../lib/llm.ts";
import { describeError } from "../lib/log.ts";
import { createWorker, type Worker } from "../lib/worker.ts";
import { type CoreEmulator, startCoreEmulator } from "../testing/core_emulator.ts";
import { type PrivateRedis, startRedis } from "../testing/redis_server.ts";
import { type ScriptedModel, startScriptedModel } from "../testing/scripted_model.ts";

/** The value of `LLM_BASE_URL` that asks the dev tooling for the scripted model. */
export const SCRIPTED = "scripted";

/** The folder of the sample files (`dev/samples/`). */
export const SAMPLES_DIR: string = fileURLToPath(new URL("./samples/", import.meta.url));

/** The user the samples belong to. */
export const SAMPLE_USER = 1;

/** The timezone of {@linkcode SAMPLE_USER} in the emulator. */
export const SAMPLE_TIME_ZONE = "Europe/London";

/** Options of {@linkcode startLocalStack}. */
export interface LocalStackOptions {
  /** Settings as environment variables (e.g. `readEnvironment()`); the stack overrides its own. */
  env?: Record<string, string>;
  /**
   * `private` starts a `redis-server` child on a free port; `auto` uses `env.REDIS_URL` when a
   * Redis answers there, else a private one.
   */
  redis: "private" | "auto";
  /** Start the scripted model instead of using `env.LLM_BASE_URL` (also when that says `scripted`). */
  scripted?: boolean;
  /** Delay of each scripted answer (ms). */
  scriptedLatencyMs?: number;
  /** IMAGE_STORAGE_PATH when `env` has none (default: the samples folder). */
  imageDir?: string;
  /** Start the worker's health and metrics listener (default true). */
  http?: boolean;
}

/** A running local stack. */
export interface LocalStack {
  /** The worker's settings. */
  settings: Settings;
  /** The worker (started). */
  worker: Worker;
  /** The Core emulator. */
  core: CoreEmulator;
  /** The private Redis, when one was started. */
  privateRedis?: PrivateRedis;
  /** The scripted model, when it runs. */
  scripted?: ScriptedModel;
  /** A Redis client for the tooling itself. */
  client: Redis;
  /** `undefined` when the model server answered at start, else why not. */
  modelProblem?: string;
  /** Stops the worker (graceful drain), then everything else. Idempotent. */
  close(): Promise<void>;
  /** `[Symbol.asyncDispose]` = close. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** True when a Redis answers `PING` at `url` within `timeoutMs`. */
export async function redisAnswers(url: string, timeoutMs = 1_000): Promise<boolean> {
  const client = new Redis(url, {
    lazyConnect: true,
    connectTimeout: timeoutMs,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    enableOfflineQueue: false,
  });
  client.on("error", () => {});
  try {
    await client.connect();
    return (await client.ping()) === "PONG";
  } catch {
    return false;
  } finally {
    client.disconnect();
  }
}

/** Asks the model server whether it answers: `undefined`, or why not. */
export async function probeModelServer(
  baseUrl: string,
  apiKey?: string,
  timeoutMs = 3_000,
): Promise<string | undefined> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    await new LLMClient({ baseUrl, apiKey }).probe(controller.signal);
    return undefined;
  } catch (error) {
    return controller.signal.aborted
      ? `nothing answered at ${baseUrl} within ${timeoutMs / 1000} s`
      : describeError(error);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Seeds the Core emulator with what the samples refer to: the sample user's timezone, the photo
 * memory of `image_tag.json`, the memory of `task_match.json`, a note the search message finds,
 * and a few open tasks.
 */
export function seedSampleData(core: CoreEmulator): void {
  // Set directly, not with seedSettings: that would make the emulator refuse other users.
  core.state.settings.set(SAMPLE_USER, {
    user_id: SAMPLE_USER,
    timezone: SAMPLE_TIME_ZONE,
    language: "en",
  });
  core.seedMemory({
    id: "sample-photo",
    owner_user_id: SAMPLE_USER,
    content: "",
    media_type: "image",
  });
  core.seedMemory({
    id: "sample-receipt",
    owner_user_id: SAMPLE_USER,
    content: "Bought milk and eggs at the corner shop on the way home",
  });
  core.seedMemory({
    id: "sample-cabin-wifi",
    owner_user_id: SAMPLE_USER,
    content: "The cabin wifi password is sunshine42",
    tags: [{ tag: "cabin", status: "confirmed" }],
  });
  core.seedTask({ id: "task-milk", owner_user_id: SAMPLE_USER, description: "Buy milk" });
  core.seedTask({ id: "task-passport", owner_user_id: SAMPLE_USER, description: "Renew passport" });
  core.seedTask({
    id: "task-car",
    owner_user_id: SAMPLE_USER,
    description: "Book the car service",
  });
}

/**
 * Starts the local stack and its worker. On failure, whatever was started is stopped again.
 *
 * @example
 * ```ts
 * await using stack = await startLocalStack({ redis: "private", scripted: true });
 * console.log(stack.core.url, stack.settings.redisUrl);
 * ```
 */
export async function startLocalStack(options: LocalStackOptions): Promise<LocalStack> {
  const env = { ...options.env };
  const cleanups: Array<() => Promise<void> | void> = [];
  const cleanup = async () => {
    for (const step of cleanups.reverse()) await step();
    cleanups.length = 0;
  };
  try {
    let redisUrl = env.REDIS_URL;
    let privateRedis: PrivateRedis | undefined;
    if (options.redis === "private" || !redisUrl || !(await redisAnswers(redisUrl))) {
      privateRedis = await startRedis({ detached: true });
      cleanups.push(() => privateRedis!.close());
      redisUrl = privateRedis.url;
    }
    const core = startCoreEmulator();
    cleanups.push(() => core.close());
    seedSampleData(core);

    let scripted: ScriptedModel | undefined;
    let modelUrl = env.LLM_BASE_URL ?? "http://localhost:8080/v1";
    if (options.scripted || modelUrl.trim().toLowerCase() === SCRIPTED) {
      scripted = startScriptedModel({ latencyMs: options.scriptedLatencyMs });
      cleanups.push(() => scripted!.close());
      modelUrl = scripted.url;
    }
    const settings = loadSettings({
      IMAGE_STORAGE_PATH: options.imageDir ?? SAMPLES_DIR,
      ...env,
      REDIS_URL: redisUrl,
      CORE_API_URL: core.url,
      LLM_BASE_URL: modelUrl,
    });
    const client = new Redis(redisUrl, { maxRetriesPerRequest: null, protocol: 2 });
    client.on("error", () => {});
    cleanups.push(() => client.disconnect());

    const modelProblem = scripted
      ? undefined
      : await probeModelServer(modelUrl, settings.llmApiKey);
    const worker = createWorker(settings, { http: options.http });
    cleanups.push(() => worker.close());
    await worker.start();

    let closed: Promise<void> | undefined;
    const stack: LocalStack = {
      settings,
      worker,
      core,
      privateRedis,
      scripted,
      client,
      modelProblem,
      close: () => closed ??= cleanup(),
      [Symbol.asyncDispose]: () => stack.close(),
    };
    return stack;
  } catch (error) {
    await cleanup();
    throw error;
  }
}

/** Where the stack's Redis is, for people: `redis://127.0.0.1:6379 (private)`. */
export function describeRedis(stack: LocalStack): string {
  return `${redactUrl(stack.settings.redisUrl)}${
    stack.privateRedis ? " (a private redis-server, gone when this stops)" : ""
  }`;
}
