/**
 * A job as the worker sees it, and what it may do once per job: the types every layer shares,
 * from the streams and the ledger up to the handlers. This module imports nothing, so any module
 * may import it.
 *
 * @module
 */

/** The five job types of docs/protocol.md section 1. */
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
  /** Exactly the fields docs/protocol.md lists for that type. */
  content: Record<string, unknown>;
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
