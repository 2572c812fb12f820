/**
 * Retry policy: how many attempts a job gets and how long it waits between them.
 *
 * Two schedules, from docs/protocol.md section 4:
 * - an *invalid answer* from the model is asked again up to `LLM_MAX_RETRIES` attempts in all,
 *   waiting 1, 2, 4, 8, 16 s ({@linkcode RetryTracker});
 * - *unavailability* (model or Core down, overloaded, rate limiting) waits 1, 2, 4, 8, 16 s,
 *   then 30 minutes at a time, until the job is 14 days old ({@linkcode unavailableDelayMs}).
 *
 * @module
 */

/** Exponential backoff in seconds for attempt `n` (1-based): 1, 2, 4, … capped at `cap`. */
export function exponentialBackoffSeconds(attempts: number, cap = 60): number {
  if (attempts < 1) return 1;
  return Math.min(2 ** (attempts - 1), cap);
}

/**
 * Counts attempts per job in memory and says whether another is allowed.
 *
 * The worker seeds it from the attempts stored in Redis ({@linkcode RetryTracker.restore}), so a
 * restart does not hand a bad job fresh attempts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const tracker = new RetryTracker(3);
 * assert.equal(tracker.recordAttempt("job-1"), 1);
 * assert.equal(tracker.shouldRetry("job-1"), true);
 * assert.equal(tracker.backoffSeconds("job-1"), 1);
 * ```
 */
export class RetryTracker {
  /** Attempts in all before a job gives up. */
  readonly maxRetries: number;
  readonly #attempts = new Map<string, number>();

  /** A tracker that allows `maxRetries` attempts in all (default 5). */
  constructor(maxRetries = 5) {
    this.maxRetries = maxRetries;
  }

  /** Counts one more attempt of `jobId` and returns the new count. */
  recordAttempt(jobId: string): number {
    const count = (this.#attempts.get(jobId) ?? 0) + 1;
    this.#attempts.set(jobId, count);
    return count;
  }

  /** Sets the count of `jobId`, e.g. from a record that survived a restart. */
  restore(jobId: string, attempts: number): void {
    if (attempts > 0) this.#attempts.set(jobId, attempts);
    else this.#attempts.delete(jobId);
  }

  /** Attempts recorded for `jobId` so far. */
  attempts(jobId: string): number {
    return this.#attempts.get(jobId) ?? 0;
  }

  /** True while `jobId` has had fewer attempts than allowed. */
  shouldRetry(jobId: string): boolean {
    return this.attempts(jobId) < this.maxRetries;
  }

  /** Forgets `jobId`. */
  clear(jobId: string): void {
    this.#attempts.delete(jobId);
  }

  /** Seconds to wait before the next attempt: min(2^(attempts-1), 60), 1 for an unknown job. */
  backoffSeconds(jobId: string): number {
    return exponentialBackoffSeconds(this.attempts(jobId));
  }
}

/** Waits of the unavailability schedule that back off exponentially (1, 2, 4, 8, 16 s). */
export const UNAVAILABLE_FAST_ATTEMPTS = 5;
/** The fixed wait from attempt 6 on. */
export const UNAVAILABLE_SLOW_DELAY_MS = 30 * 60 * 1000;
/** A job expires this long after it was queued. */
export const JOB_EXPIRY_MS = 14 * 24 * 60 * 60 * 1000;

/**
 * How long a job waits after its `attempt`-th failure for unavailability (1-based): 1, 2, 4, 8,
 * 16 s, then 30 minutes; a longer `Retry-After` from the server wins (capped at 30 minutes).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(unavailableDelayMs(3), 4000);
 * assert.equal(unavailableDelayMs(6), 1_800_000);
 * assert.equal(unavailableDelayMs(1, 10_000), 10_000); // the server asked for 10 s
 * ```
 */
export function unavailableDelayMs(attempt: number, retryAfterMs?: number): number {
  const base = attempt <= UNAVAILABLE_FAST_ATTEMPTS
    ? exponentialBackoffSeconds(attempt) * 1000
    : UNAVAILABLE_SLOW_DELAY_MS;
  return Math.max(base, Math.min(retryAfterMs ?? 0, UNAVAILABLE_SLOW_DELAY_MS));
}

/**
 * When a job queued at `queuedAtMs` expires (ms since the epoch).
 *
 * A stream entry's id starts with the milliseconds at which it was added: `entryTimeMs("1700000000000-0")`.
 */
export function expiresAt(queuedAtMs: number): number {
  return queuedAtMs + JOB_EXPIRY_MS;
}

/** The milliseconds at which a stream entry was added, read from its id (`<ms>-<seq>`). */
export function entryTimeMs(entryId: string): number {
  return Number(entryId.split("-")[0]);
}
