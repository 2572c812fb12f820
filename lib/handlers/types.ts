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
import type { ModelGateway } from "../model.ts";

/** The five job types of CONTRACT.md section 1. */
export type JobType = "image_tag" | "intent_classify" | "followup" | "task_match" | "email_extract";

/** One job as read from its stream, after the envelope was checked. */
export interface Job {
  /** Core's job id. */
  jobId: string;
  /** The job type (matches the stream it came from). */
  jobType: JobType;
  /** The envelope's payload, not yet checked against the handler's schema. */
  payload: Record<string, unknown>;
  /** The owner, or `null`. */
  userId: number | null;
  /** The stream the entry came from, e.g. `llm:intent`. */
  stream: string;
  /** The stream entry id, e.g. `1700000000000-0`. */
  entryId: string;
}

/** A notification for the user, before the consumer adds `user_id`. */
export interface NotificationDraft {
  /** e.g. `llm_intent_result`. */
  message_type: string;
  /** Exactly the fields CONTRACT.md lists for that type. */
  content: Record<string, unknown>;
}

/** What a handler hands back when its job succeeded. */
export interface HandlerResult {
  /** Stored in Core as the job's `result` (`null` when there is none). */
  result: Record<string, unknown> | null;
  /** Sent to the user in this order (none when `user_id` is null: the consumer checks). */
  notifications: NotificationDraft[];
}

/**
 * Effects that must happen once per job, however often the job runs (retries, redelivery after a
 * crash, a claim by another replica). Backed by a record in Redis keyed by the job id.
 */
export interface Effects {
  /**
   * Runs `action` unless an action with this `key` already succeeded for this job, and returns
   * its (JSON-serialisable) result either way.
   */
  once<T>(key: string, action: () => Promise<T>): Promise<T>;
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
