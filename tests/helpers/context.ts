/**
 * Builds a real {@linkcode JobContext} for handler tests: the real `CoreApiClient` against a Core
 * emulator, the real `ModelGateway` + `LLMClient` against a local model server, and once-only
 * effects kept in memory.
 *
 * @module
 */
import { loadSettings, type Settings } from "../../lib/config.ts";
import { CoreApiClient } from "../../lib/core_api.ts";
import type { JobContext } from "../../lib/handlers/types.ts";
import type { Job, JobType } from "../../lib/job.ts";
import { LLMClient } from "../../lib/llm.ts";
import { logger } from "../../lib/log.ts";
import { ModelGateway } from "../../lib/model.ts";
import { MemoryEffects } from "../../lib/ledger.ts";

export { MemoryEffects };

/** What {@linkcode makeContext} needs. */
export interface ContextOptions {
  /** The job type. */
  jobType: JobType;
  /** The payload. */
  payload: Record<string, unknown>;
  /** The owner (default 1). */
  userId?: number | null;
  /** Core emulator URL. */
  coreUrl: string;
  /** Model server URL (`.../v1`). */
  modelUrl: string;
  /** Extra settings, as environment variables. */
  env?: Record<string, string>;
  /** The clock (default: real). */
  now?: () => Date;
  /** Effects store shared between runs (default: a new one). */
  effects?: MemoryEffects;
}

/** A context plus what the test may want to inspect. */
export interface TestContext {
  ctx: JobContext;
  effects: MemoryEffects;
  settings: Settings;
}

/** Builds a job context wired to real local servers. */
export function makeContext(options: ContextOptions): TestContext {
  const settings = loadSettings({
    LLM_BASE_URL: options.modelUrl,
    CORE_API_URL: options.coreUrl,
    ...options.env,
  });
  const job: Job = {
    jobId: crypto.randomUUID(),
    jobType: options.jobType,
    payload: options.payload,
    userId: options.userId === undefined ? 1 : options.userId,
    stream: "llm:test",
    entryId: `${Date.now()}-0`,
  };
  const effects = options.effects ?? new MemoryEffects();
  const llm = new LLMClient({ baseUrl: settings.llmBaseUrl, apiKey: settings.llmApiKey });
  const ctx: JobContext = {
    job,
    // No quick retries: a handler test sees each refusal of Core it injects.
    core: new CoreApiClient({ baseUrl: settings.coreApiUrl, timeoutMs: 5_000, retryDelaysMs: [] }),
    model: new ModelGateway({
      llm,
      models: { text: settings.llmTextModel, vision: settings.llmVisionModel },
      concurrency: settings.workerConcurrency,
      structuredOutput: settings.llmStructuredOutput,
    }),
    effects,
    settings,
    now: options.now ?? (() => new Date()),
    signal: new AbortController().signal,
    log: logger("test"),
  };
  return { ctx, effects, settings };
}
