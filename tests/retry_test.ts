import assert from "node:assert/strict";
import {
  entryTimeMs,
  expiresAt,
  exponentialBackoffSeconds,
  JOB_EXPIRY_MS,
  RetryTracker,
  UNAVAILABLE_SLOW_DELAY_MS,
  unavailableDelayMs,
} from "../lib/retry.ts";

Deno.test("RetryTracker.recordAttempt counts 1, 2, 3 per job", () => {
  const tracker = new RetryTracker();
  assert.equal(tracker.recordAttempt("a"), 1);
  assert.equal(tracker.recordAttempt("a"), 2);
  assert.equal(tracker.recordAttempt("b"), 1);
  assert.equal(tracker.recordAttempt("a"), 3);
  assert.equal(tracker.attempts("a"), 3);
  assert.equal(tracker.attempts("b"), 1);
  assert.equal(tracker.attempts("never-seen"), 0);
});

Deno.test("RetryTracker defaults to 5 attempts", () => {
  assert.equal(new RetryTracker().maxRetries, 5);
});

Deno.test("RetryTracker.shouldRetry is true under the limit and false at it", () => {
  const tracker = new RetryTracker(3);
  assert.equal(tracker.shouldRetry("job"), true);
  tracker.recordAttempt("job");
  assert.equal(tracker.shouldRetry("job"), true);
  tracker.recordAttempt("job");
  assert.equal(tracker.shouldRetry("job"), true);
  tracker.recordAttempt("job");
  assert.equal(tracker.shouldRetry("job"), false);
  tracker.recordAttempt("job");
  assert.equal(tracker.shouldRetry("job"), false);
});

Deno.test("RetryTracker.clear resets a job and leaves others alone", () => {
  const tracker = new RetryTracker(2);
  tracker.recordAttempt("a");
  tracker.recordAttempt("a");
  tracker.recordAttempt("b");
  assert.equal(tracker.shouldRetry("a"), false);
  tracker.clear("a");
  assert.equal(tracker.attempts("a"), 0);
  assert.equal(tracker.shouldRetry("a"), true);
  assert.equal(tracker.recordAttempt("a"), 1);
  assert.equal(tracker.attempts("b"), 1);
});

Deno.test("RetryTracker.backoffSeconds doubles from 1 s and caps at 60 s", () => {
  const tracker = new RetryTracker(100);
  const seen: number[] = [];
  for (let i = 0; i < 8; i++) {
    tracker.recordAttempt("job");
    seen.push(tracker.backoffSeconds("job"));
  }
  assert.deepEqual(seen, [1, 2, 4, 8, 16, 32, 60, 60]);
});

Deno.test("RetryTracker.backoffSeconds is 1 s for an unknown job", () => {
  assert.equal(new RetryTracker().backoffSeconds("unknown"), 1);
});

Deno.test("RetryTracker.restore seeds a count and a zero forgets the job", () => {
  const tracker = new RetryTracker(5);
  tracker.restore("job", 4);
  assert.equal(tracker.attempts("job"), 4);
  assert.equal(tracker.backoffSeconds("job"), 8);
  assert.equal(tracker.shouldRetry("job"), true);
  assert.equal(tracker.recordAttempt("job"), 5);
  assert.equal(tracker.shouldRetry("job"), false);
  tracker.restore("job", 0);
  assert.equal(tracker.attempts("job"), 0);
  assert.equal(tracker.shouldRetry("job"), true);
});

Deno.test("exponentialBackoffSeconds honours its cap and treats attempt 0 as 1 s", () => {
  assert.equal(exponentialBackoffSeconds(0), 1);
  assert.equal(exponentialBackoffSeconds(1), 1);
  assert.equal(exponentialBackoffSeconds(5, 10), 10);
  assert.equal(exponentialBackoffSeconds(40), 60);
});

Deno.test("unavailableDelayMs waits 1, 2, 4, 8, 16 s then 30 minutes", () => {
  const delays = [1, 2, 3, 4, 5, 6, 7, 20].map((attempt) => unavailableDelayMs(attempt));
  const thirtyMinutes = 30 * 60 * 1000;
  assert.equal(UNAVAILABLE_SLOW_DELAY_MS, thirtyMinutes);
  assert.deepEqual(delays, [
    1000,
    2000,
    4000,
    8000,
    16000,
    thirtyMinutes,
    thirtyMinutes,
    thirtyMinutes,
  ]);
});

Deno.test("unavailableDelayMs: a longer Retry-After wins, a shorter one does not", () => {
  assert.equal(unavailableDelayMs(1, 10_000), 10_000);
  assert.equal(unavailableDelayMs(4, 1_000), 8_000);
  assert.equal(unavailableDelayMs(6, 5_000), 30 * 60 * 1000);
});

Deno.test("unavailableDelayMs caps Retry-After at 30 minutes", () => {
  assert.equal(unavailableDelayMs(1, 24 * 60 * 60 * 1000), 30 * 60 * 1000);
  assert.equal(unavailableDelayMs(7, 2 * 60 * 60 * 1000), 30 * 60 * 1000);
});

Deno.test("entryTimeMs reads the milliseconds of a stream entry id", () => {
  assert.equal(entryTimeMs("1700000000000-0"), 1_700_000_000_000);
  assert.equal(entryTimeMs("1700000000123-42"), 1_700_000_000_123);
});

Deno.test("expiresAt is 14 days after the job was queued", () => {
  assert.equal(JOB_EXPIRY_MS, 14 * 24 * 60 * 60 * 1000);
  assert.equal(expiresAt(1_000), 1_000 + 14 * 24 * 60 * 60 * 1000);
});
