/**
 * The ledger's and the dead letters' Redis writes are safe to send twice: after a lost
 * connection the Redis client sends again every command that got no answer.
 */
import assert from "node:assert/strict";
import { JobLedger } from "../lib/ledger.ts";
import { closeRedis, createRedis } from "../lib/redis.ts";
import {
  compareEntryIds,
  DEAD_STREAM,
  ensureGroups,
  GROUP,
  moveToDead,
  NOTIFY_STREAM,
} from "../lib/streams.ts";
import type { Job } from "../lib/job.ts";
import { startRedis } from "../testing/redis_server.ts";

async function withRedis(test: (redis: ReturnType<typeof createRedis>) => Promise<void>) {
  await using server = await startRedis();
  const redis = createRedis(server.url, { eager: true });
  try {
    await test(redis);
  } finally {
    await closeRedis(redis);
  }
}

/** Publishes one entry to `llm:followup` and reads it as consumer `c`; returns its job. */
async function delivered(redis: ReturnType<typeof createRedis>, jobId: string): Promise<Job> {
  await ensureGroups(redis, ["llm:followup"]);
  const entryId = (await redis.xadd("llm:followup", "*", "data", "{}"))!;
  await redis.xreadgroup("GROUP", GROUP, "c", "STREAMS", "llm:followup", ">");
  return { jobId, jobType: "followup", payload: {}, userId: 1, stream: "llm:followup", entryId };
}

Deno.test("finish sent twice publishes once and acknowledges the entry", async () => {
  await withRedis(async (redis) => {
    const ledger = new JobLedger(redis);
    const job = await delivered(redis, "job-1");
    const notification = { user_id: 1, message_type: "llm_followup_result", content: { q: 1 } };
    assert.equal(await ledger.finish(job, "completed", [notification, notification]), true);
    assert.equal(await ledger.finish(job, "completed", [notification, notification]), false);
    assert.equal(await redis.xlen(NOTIFY_STREAM), 2);
    assert.equal((await redis.xpending(job.stream, GROUP) as [number])[0], 0);
    assert.equal((await ledger.load("job-1")).done, "completed");
  });
});

Deno.test("finish drops the record's effects and outbox and keeps it for the TTL", async () => {
  await withRedis(async (redis) => {
    const ledger = new JobLedger(redis);
    const job = await delivered(redis, "job-2");
    await ledger.effects("job-2", await ledger.load("job-2")).once(
      "memory",
      () => Promise.resolve({ id: "m" }),
    );
    await ledger.saveOutbox("job-2", []);
    await ledger.finish(job, "failed", []);
    assert.deepEqual(await redis.hgetall(ledger.key("job-2")), { done: "failed" });
    assert.ok(await redis.pttl(ledger.key("job-2")) > 0);
  });
});

Deno.test("notifyOnce tells once however often it is sent", async () => {
  await withRedis(async (redis) => {
    const ledger = new JobLedger(redis);
    const notice = { user_id: 1, message_type: "llm_failure", content: { message: "down" } };
    assert.equal(await ledger.notifyOnce("job-3", "told", notice), true);
    assert.equal(await ledger.notifyOnce("job-3", "told", notice), false);
    const entries = await redis.xrange(NOTIFY_STREAM, "-", "+");
    assert.deepEqual(entries.map(([, fields]) => JSON.parse(fields[1])), [notice]);
    assert.ok(await redis.pttl(ledger.key("job-3")) > 0);
  });
});

Deno.test("moveToDead sent twice copies once", async () => {
  await withRedis(async (redis) => {
    const job = await delivered(redis, "job-4");
    const fields = ["data", "{not json"];
    assert.equal(await moveToDead(redis, job.stream, job.entryId, "not JSON", fields), true);
    assert.equal(await moveToDead(redis, job.stream, job.entryId, "not JSON", fields), false);
    const dead = await redis.xrange(DEAD_STREAM, "-", "+");
    assert.deepEqual(dead.map(([, f]) => f), [[
      "stream",
      job.stream,
      "id",
      job.entryId,
      "reason",
      "not JSON",
      "data",
      "{not json",
    ]]);
    assert.equal((await redis.xpending(job.stream, GROUP) as [number])[0], 0);
  });
});

Deno.test("compareEntryIds reads ids without a sequence, and leading zeros, as numbers", () => {
  assert.equal(compareEntryIds("10", "10-0"), 0);
  assert.ok(compareEntryIds("9", "10-0") < 0);
  assert.ok(compareEntryIds("010-2", "10-10") < 0);
  assert.equal(compareEntryIds("0010-01", "10-1"), 0);
  assert.ok(compareEntryIds("1795616846661-10", "1795616846661-9") > 0);
  const ids = ["3-1", "1-0", "20-0", "3-0", "2", "3-10"];
  assert.deepEqual(ids.sort(compareEntryIds), ["1-0", "2", "3-0", "3-1", "3-10", "20-0"]);
});
