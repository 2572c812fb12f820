/**
 * An entry the consumer holds in memory, from its read (or claim) until it is acknowledged or
 * left for another consumer: what the reader makes, the leases keep fresh and the runner runs.
 *
 * @module
 */
import type { Effects } from "./job.ts";
import { type JobRecord, MemoryEffects } from "./ledger.ts";
import type { TokenUsage } from "./model.ts";
import { type Notification, type ParsedEntry, parseEntry } from "./streams.ts";
import type { Lease } from "./user_lease.ts";

/** One entry held in memory, from the read until it is acknowledged or left. */
export interface WorkItem {
  /** The stream it was read from. */
  stream: string;
  /** Its entry id. */
  entryId: string;
  /** Its raw fields (kept for the dead-letter stream). */
  fields: string[];
  /** The job's user; `null` for nobody's (and for malformed entries). */
  userId: number | null;
  /** The entry as parsed: a job, or why it is malformed. */
  parsed: ParsedEntry;
  /** Delivered to a consumer before (our own pending list at start, or claimed). */
  redelivered: boolean;
  /** Loaded at the first run. */
  record?: JobRecord;
  /** The job's once-only effects (loaded with the record). */
  effects?: Effects;
  /**
   * The model's valid answers so far, kept while the entry stays in this process: a job retried
   * because Core failed asks the model nothing twice (after a restart it asks again; its effects
   * are still once-only).
   */
  answers: MemoryEffects;
  /** Tokens the model servers reported for this job's requests in this process, all runs. */
  usage: TokenUsage;
  /** Set once the job's end is decided but not yet written (Core was down). */
  ending?: Ending;
  /** The attempt of the current or last run and the waits before it (for its log lines). */
  run?: { attempt: number; waits: number };
  /** The user's lease the job runs under (lib/user_lease.ts); none for a job of nobody. */
  lease?: Lease;
  /** Resolved when the lease is found lost: a job waiting for a retry stops waiting. */
  lostWake?: PromiseWithResolvers<void>;
  /** Set once the job's end handed its user on (the user's next job, or free users, taken). */
  handedOn?: boolean;
}

/** How a job ends, decided before it is written (kept while Core is down). */
export interface Ending {
  /** The status for Core. */
  status: "completed" | "failed";
  /** The handler's result (`null` for a failure). */
  result: Record<string, unknown> | null;
  /** Why it failed. */
  errorMessage?: string;
  /** What the user is told once Core has the end. */
  notifications: Notification[];
}

/**
 * A work item for an entry as `XREADGROUP`/`XAUTOCLAIM` return it (`fields` is `null` for an
 * entry deleted from the stream since it was delivered), run under `lease` when it has a user.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const item = workItem("llm:followup", "1-0", ["data", "{}"], false);
 * assert.equal(item.parsed.ok, false); // the envelope has no job_id
 * assert.equal(item.userId, null);
 * ```
 */
export function workItem(
  stream: string,
  entryId: string,
  fields: string[] | null,
  redelivered: boolean,
  lease?: Lease,
): WorkItem {
  const parsed = fields
    ? parseEntry(stream, entryId, fields)
    : { ok: false as const, reason: "the entry was deleted from the stream" };
  return {
    stream,
    entryId,
    fields: fields ?? [],
    // A job under a lease keeps its user's turn in this process too; malformed entries of
    // nobody never hold a user's jobs back.
    userId: lease ? Number(lease.userId) : parsed.ok ? parsed.job.userId : null,
    parsed,
    redelivered,
    answers: new MemoryEffects(),
    usage: { promptTokens: 0, completionTokens: 0 },
    lease,
  };
}

/**
 * The key of an entry among those held: its stream and id.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(entryKey("llm:followup", "1-0"), "llm:followup 1-0");
 * ```
 */
export function entryKey(stream: string, entryId: string): string {
  return `${stream} ${entryId}`;
}
