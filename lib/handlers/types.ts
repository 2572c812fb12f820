/**
 * What a job handler is and what it is given: the contract between the consumer and the five
 * handlers of `lib/handlers/`.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { z } from "zod";
import type { Settings } from "../config.ts";
import type { CoreApiClient } from "../core_api.ts";
import type { Effects, Job, JobType, NotificationDraft } from "../job.ts";
import type { ModelGateway } from "../model.ts";

/** What a handler hands back when its job succeeded. */
export interface HandlerResult {
  /** Stored in Core as the job's `result` (`null` when there is none). */
  result: Record<string, unknown> | null;
  /** Sent to the user in this order (none when `user_id` is null: the consumer checks). */
  notifications: NotificationDraft[];
}

/** Everything a handler may use while it runs one job. */
export interface JobContext {
  /** The job. */
  job: Job;
  /** Core's REST API. */
  core: CoreApiClient;
  /** The model, with slots, structured output and validation. */
  model: ModelGateway;
  /** Once-only effects. */
  effects: Effects;
  /** The worker's settings. */
  settings: Settings;
  /** The current time (injectable for tests). */
  now: () => Date;
  /** Aborted when the worker must stop at once. */
  signal: AbortSignal;
  /** Logger with the job's id and type. */
  log: Logger;
}

/** A job type's handler: its payload schema and what it does. */
export interface JobHandler<P = unknown> {
  /** The job type it handles. */
  jobType: JobType;
  /** Checks the envelope's `payload`; a payload that fails it fails the job at once. */
  payloadSchema: z.ZodType<P>;
  /** True when the job acts for an owner and fails at once with `user_id` null. */
  requiresUser: boolean;
  /** Runs the job; throws `JobFailedError`, `InvalidAnswerError`, `LLMError` or `CoreApiError`. */
  run(ctx: JobContext, payload: P): Promise<HandlerResult>;
}
