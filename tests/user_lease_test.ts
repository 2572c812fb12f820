/**
 * The per-user lease protocol (lib/user_lease.ts) against a real private Redis: delivery in
 * entry-id order across streams, one holder per user, hand-over from job to job across
 * consumers, takeover of expired leases, and fencing of a holder that lost its lease.
 */
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { LeaseLostError } from "../lib/errors.ts";
import { JobLedger } from "../lib/ledger.ts";
import type { Job } from "../lib/job.ts";
import { closeRedis, createRedis } from "../lib/redis.ts";
import { ensureGroups, GROUP, NOTIFY_STREAM } from "../lib/streams.ts";
import { type LeasedRun, UserLeases } from "../lib/user_lease.ts";
import { startRedis } from "../testing/redis_server.ts";

const STREAMS = ["llm:intent", "llm:followup"];

async function withRedis(test: (redis: Redis) => Promise<void>) {
  await using server = await startRedis();
  const redis = createRedis(server.url, { eager: true });
  try {
    await ensureGroups(redis, STREAMS);
    await test(redis);
  } finally {
    await closeRedis(redis);
  }
}

let nextMs = Date.now();

/**
 * Adds an entry of `user` (null: nobody's) to `stream`; answers its id. Ids are a millisecond
 * apart, so the order across streams is total (ids of one millisecond in two streams tie).
 */
async function add(redis: Redis, stream: string, user: number | null, job: string) {
  const data = JSON.stringify({ job_id: job, job_type: "x", payload: {}, user_id: user });
  return (await redis.xadd(stream, `${++nextMs}-0`, "data", data))!;
}

const leases = (redis: Redis, consumer: string, leaseMs = 60_000, instance?: string) =>
  new UserLeases({ redis, consumer, leaseMs, streams: STREAMS, instance });

const jobOf = (run: LeasedRun) => JSON.parse(run.fields![1]).job_id as string;

Deno.test("a read takes the oldest entries across the streams and grants each free user once", async () => {
  await withRedis(async (redis) => {
    await add(redis, "llm:followup", 1, "a"); // oldest
    await add(redis, "llm:intent", 1, "b");
    await add(redis, "llm:followup", 2, "c");
    await add(redis, "llm:intent", null, "d");
    await add(redis, "llm:intent", 3, "e"); // past the count: stays undelivered
    const r = leases(redis, "r1");
    const read = await r.read(4, 100);
    assert.equal(read.read, 4);
    assert.deepEqual(read.runs.map(jobOf), ["a", "c"]); // user 1 once, at its oldest entry
    assert.deepEqual(read.nobody.map((e) => JSON.parse(e.fields![1]).job_id), ["d"]);
    assert.equal(r.held, 2);
    assert.deepEqual(await redis.zcard(r.queueKey("1")), 2);
    // The undelivered entry is the only one the next read gets.
    const next = await r.read(10, 100);
    assert.deepEqual(next.runs.map(jobOf), ["e"]);
    assert.equal(next.capped, false);
  });
});

Deno.test("a user's next entry, read by another consumer, is handed to the holder in order", async () => {
  await withRedis(async (redis) => {
    const r1 = leases(redis, "r1");
    const r2 = leases(redis, "r2");
    await add(redis, "llm:intent", 7, "first");
    const [run1] = (await r1.read(1, 100)).runs;
    await add(redis, "llm:followup", 7, "second");
    await add(redis, "llm:intent", 7, "third");
    // r2 reads the later entries of user 7 but gets no turn: r1 holds the user.
    const read2 = await r2.read(10, 100);
    assert.equal(read2.read, 2);
    assert.deepEqual(read2.runs, []);
    const [run2] = await r1.advance(run1.lease, run1);
    assert.equal(run2 && jobOf(run2), "second");
    assert.equal(run2!.redelivered, false);
    // The entry moved to r1's pending list.
    const [[, owner]] = await redis.xpending("llm:followup", GROUP, "-", "+", 1) as [
      [string, string],
    ];
    assert.equal(owner, "r1");
    const [run3] = await r1.advance(run2!.lease, run2!);
    assert.equal(run3 && jobOf(run3), "third");
    assert.deepEqual(await r1.advance(run3!.lease, run3!), []); // queue empty: lease dropped
    assert.equal(r1.held, 0);
    assert.equal(await redis.exists(r1.leaseKey("7")), 0);
    // Free again: the next reader takes the user.
    await add(redis, "llm:intent", 7, "fourth");
    assert.deepEqual((await r2.read(10, 100)).runs.map(jobOf), ["fourth"]);
  });
});

Deno.test("an expired lease is taken over with a new token; the old holder is fenced", async () => {
  await withRedis(async (redis) => {
    const r1 = leases(redis, "r1", 300);
    const r2 = leases(redis, "r2", 300);
    await add(redis, "llm:intent", 5, "j1");
    await add(redis, "llm:intent", 5, "j2");
    const [run] = (await r1.read(10, 100)).runs;
    assert.equal(jobOf(run), "j1");
    assert.deepEqual(await r2.sweep(), []); // alive: nothing to take
    await new Promise((resolve) => setTimeout(resolve, 400)); // r1 "paused" past its lease
    const [taken] = await r2.sweep();
    assert.equal(jobOf(taken), "j1");
    assert.equal(taken.redelivered, true); // r1 had it: it may have run
    assert.ok(Number(taken.lease.token) > Number(run.lease.token));
    // r1 comes back: its check, its ledger writes and its hand-over are refused.
    await assert.rejects(r1.check(run.lease), LeaseLostError);
    const job: Job = {
      jobId: "j1",
      jobType: "intent_classify",
      payload: {},
      userId: 5,
      stream: run.stream,
      entryId: run.entryId,
    };
    const stale = new JobLedger(redis).fenced(r1.fence(run.lease));
    const notification = { user_id: 5, message_type: "m", content: {} };
    await assert.rejects(stale.finish(job, "completed", [notification]), LeaseLostError);
    await assert.rejects(stale.ack(job), LeaseLostError);
    await assert.rejects(stale.countInvalid("j1"), LeaseLostError);
    await assert.rejects(r1.advance(run.lease, run), LeaseLostError);
    assert.equal(await redis.xlen(NOTIFY_STREAM), 0);
    assert.equal((await redis.xpending(run.stream, GROUP) as [number])[0], 2);
    assert.equal(await redis.exists("llm-worker:job:j1"), 0);
    // The new holder's writes go through, and it runs j2 next.
    const fresh = new JobLedger(redis).fenced(r2.fence(taken.lease));
    assert.equal(await fresh.finish(job, "completed", [notification]), true);
    const [next] = await r2.advance(taken.lease, taken);
    assert.equal(next && jobOf(next), "j2");
  });
});

Deno.test("refresh keeps a lease alive and reports a lost one", async () => {
  await withRedis(async (redis) => {
    const r1 = leases(redis, "r1", 300);
    const r2 = leases(redis, "r2", 300);
    await add(redis, "llm:intent", 1, "a");
    await add(redis, "llm:intent", 2, "b");
    const runs = (await r1.read(10, 100)).runs;
    for (let i = 0; i < 4; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.deepEqual(await r1.refresh(), []);
    }
    assert.deepEqual(await r2.sweep(), []); // refreshed: still alive after 400 ms
    await new Promise((resolve) => setTimeout(resolve, 400));
    const taken = await r2.sweep();
    assert.equal(taken.length, 2);
    const lost = await r1.refresh();
    assert.deepEqual(lost.map((l) => l.userId).sort(), ["1", "2"]);
    assert.ok(runs.every((run) => run.lease.lost));
    assert.equal(r1.held, 0);
  });
});

Deno.test("a restarted consumer takes its users back at once; a released user goes at the next sweep", async () => {
  await withRedis(async (redis) => {
    const before = leases(redis, "r1", 60_000, "run-1");
    await add(redis, "llm:intent", 3, "a");
    await add(redis, "llm:intent", 3, "b");
    const [run] = (await before.read(10, 100)).runs;
    // The same consumer name, a new process: its pending entries are adopted at once.
    const after = leases(redis, "r1", 60_000, "run-2");
    const pending = await redis.xpending("llm:intent", GROUP, "-", "+", 10) as [string][];
    const adopted = await after.adopt(
      pending.map(([id]) => ({ stream: "llm:intent", entryId: id })),
    );
    assert.deepEqual(adopted.runs.map(jobOf), ["a"]);
    assert.equal(adopted.runs[0].redelivered, true);
    await assert.rejects(before.check({ ...run.lease, deadline: 0 }), LeaseLostError);
    // Another consumer cannot take a live lease, but takes a released one.
    const other = leases(redis, "r2");
    assert.deepEqual(await other.sweep(), []);
    await after.release(adopted.runs[0].lease);
    assert.deepEqual((await other.sweep()).map(jobOf), ["a"]);
  });
});

Deno.test("entries acknowledged elsewhere are skipped; a deleted entry is handed out without fields", async () => {
  await withRedis(async (redis) => {
    const r = leases(redis, "r1");
    await add(redis, "llm:intent", 4, "a");
    const b = await add(redis, "llm:intent", 4, "b");
    const c = await add(redis, "llm:followup", 4, "c");
    const d = await add(redis, "llm:intent", 4, "d");
    const [run] = (await r.read(10, 100)).runs;
    await redis.xack("llm:intent", GROUP, b);
    await redis.xdel("llm:followup", c);
    const [next] = await r.advance(run.lease, run);
    assert.equal(next?.entryId, c);
    assert.equal(next?.fields, null);
    const [last] = await r.advance(next!.lease, next!);
    assert.equal(last?.entryId, d);
  });
});

Deno.test("a consumer with too many entries pending reads no more", async () => {
  await withRedis(async (redis) => {
    const r1 = leases(redis, "r1");
    for (let i = 0; i < 5; i++) await add(redis, "llm:intent", 9, `j${i}`);
    const read = await r1.read(10, 3);
    assert.equal(read.read, 3);
    assert.equal(read.capped, true);
    assert.equal((await r1.read(10, 3)).read, 0);
    // Another consumer reads the rest; they wait in user 9's queue for r1.
    const r2 = leases(redis, "r2");
    assert.equal((await r2.read(10, 3)).read, 2);
    assert.equal(await redis.zcard(r1.queueKey("9")), 5);
  });
});

Deno.test("a missing group is reported as NOGROUP", async () => {
  await withRedis(async (redis) => {
    await redis.del(...STREAMS);
    await assert.rejects(leases(redis, "r1").read(10, 100), /NOGROUP/);
  });
});

Deno.test("a replica takes no more users than it has room for; the rest wait free for another", async () => {
  await withRedis(async (redis) => {
    await add(redis, "llm:intent", 1, "a");
    await add(redis, "llm:followup", 2, "b");
    await add(redis, "llm:intent", 3, "c");
    const r1 = leases(redis, "r1");
    const read = await r1.read(10, 100, 1);
    assert.equal(read.read, 3);
    assert.deepEqual(read.runs.map(jobOf), ["a"]);
    const r2 = leases(redis, "r2");
    assert.deepEqual((await r2.sweep(1)).map(jobOf), ["b"]); // r1 read it; r2 runs it
    assert.deepEqual((await r2.read(10, 100, 5)).runs.map(jobOf), ["c"]); // a read sweeps too
  });
});

Deno.test("a restarted consumer with no room for all its users leaves the rest free at once", async () => {
  await withRedis(async (redis) => {
    const before = leases(redis, "r1", 60_000, "run-1");
    await add(redis, "llm:intent", 1, "a");
    await add(redis, "llm:intent", 2, "b");
    assert.equal((await before.read(10, 100)).runs.length, 2);
    const after = leases(redis, "r1", 60_000, "run-2");
    const pending = await redis.xpending("llm:intent", GROUP, "-", "+", 10) as [string][];
    const adopted = await after.adopt(
      pending.map(([id]) => ({ stream: "llm:intent", entryId: id })),
      1,
    );
    assert.deepEqual(adopted.runs.map(jobOf), ["a"]);
    // User 2's lease of the previous run is free now, not held for 60 s.
    assert.deepEqual((await leases(redis, "r2").sweep()).map(jobOf), ["b"]);
  });
});

Deno.test("a hand-on with no next job takes free users in its place; giving up leaves the user free", async () => {
  await withRedis(async (redis) => {
    await add(redis, "llm:intent", 1, "a");
    await add(redis, "llm:intent", 2, "b");
    await add(redis, "llm:intent", 3, "c");
    await add(redis, "llm:followup", 3, "d");
    const r1 = leases(redis, "r1");
    const [run] = (await r1.read(10, 100, 1)).runs; // room for one user: 2 and 3 wait, free
    assert.equal(jobOf(run), "a");
    const taken = await r1.advance(run.lease, run, { users: 1 });
    assert.deepEqual(taken.map(jobOf), ["b"]); // user 1 had no next job: one free user instead
    assert.equal(r1.held, 1);
    assert.equal(await redis.exists(r1.leaseKey("1")), 0);
    const [c] = await r1.advance(taken[0].lease, taken[0], { users: 1 });
    assert.equal(jobOf(c), "c");
    // A stopping replica gives user 3 up with d still queued: another replica runs d.
    assert.deepEqual(await r1.advance(c.lease, c, { giveUp: true, users: 5 }), []);
    assert.equal(r1.held, 0);
    assert.deepEqual((await leases(redis, "r2").sweep()).map(jobOf), ["d"]);
  });
});

Deno.test("a job's end acknowledges, notifies and hands its user on in one script, fenced", async () => {
  await withRedis(async (redis) => {
    const r1 = leases(redis, "r1", 300);
    await add(redis, "llm:intent", 6, "j1");
    await add(redis, "llm:followup", 6, "j2");
    await add(redis, "llm:intent", 8, "k1");
    const [run] = (await r1.read(10, 100, 1)).runs;
    const job: Job = {
      jobId: "j1",
      jobType: "intent_classify",
      payload: {},
      userId: 6,
      stream: run.stream,
      entryId: run.entryId,
    };
    const handed: LeasedRun[][] = [];
    const ending = (from: UserLeases, lease = run.lease) =>
      new JobLedger(redis).fenced({
        ...from.fence(lease),
        handOn: from.handOn(lease, run, {
          giveUp: () => false,
          users: () => 1,
          took: (runs) => handed.push(runs),
        }),
      });
    const notification = { user_id: 6, message_type: "m", content: {} };
    const calls = await redis.info("commandstats");
    assert.equal(await ending(r1).finish(job, "completed", [notification]), true);
    assert.equal(
      countOf(await redis.info("commandstats"), "evalsha") - countOf(calls, "evalsha"),
      1,
    );
    assert.deepEqual(handed.map((runs) => runs.map(jobOf)), [["j2"]]);
    assert.equal(handed[0][0].lease, run.lease); // the same lease runs the user's next job
    assert.equal(await redis.xlen(NOTIFY_STREAM), 1);
    assert.equal(await redis.zcard(r1.queueKey("6")), 1); // j1 left the queue, j2 is its head
    // Sent again (a reply lost with its connection): nothing twice, the same next job.
    assert.equal(await ending(r1).finish(job, "completed", [notification]), false);
    assert.deepEqual(handed[1].map(jobOf), ["j2"]);
    assert.equal(handed[1][0].redelivered, true);
    assert.equal(await redis.xlen(NOTIFY_STREAM), 1);
    // A replica that lost the user writes nothing and hands nothing on.
    await new Promise((resolve) => setTimeout(resolve, 400));
    const r2 = leases(redis, "r2", 300);
    assert.deepEqual((await r2.sweep()).map(jobOf).sort(), ["j2", "k1"]);
    await assert.rejects(ending(r1).ack(job), LeaseLostError);
    assert.equal(handed.length, 2);
    assert.equal(await redis.zcard(r1.queueKey("6")), 1);
  });
});

function countOf(commandstats: string, command: string): number {
  return Number(commandstats.match(new RegExp(`cmdstat_${command}:calls=(\\d+)`))?.[1] ?? 0);
}
