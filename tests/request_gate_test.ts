import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { closeRedis, createRedis } from "../lib/redis.ts";
import {
  type DelayReason,
  PAUSE_KEY,
  RATE_KEY,
  SharedRequestGate,
  type SharedRequestGateOptions,
} from "../lib/request_gate.ts";
import { startRedis } from "../testing/redis_server.ts";

interface Replica {
  gate: SharedRequestGate;
  redis: Redis;
  delays: DelayReason[];
  close(): Promise<void>;
}

async function replica(
  url: string,
  options: Omit<SharedRequestGateOptions, "redis" | "subscriber"> = {},
): Promise<Replica> {
  const redis = createRedis(url, { eager: true, autoPipelining: true });
  const subscriber = createRedis(url, { eager: true });
  const delays: DelayReason[] = [];
  const gate = new SharedRequestGate({
    redis,
    subscriber,
    onDelay: (reason) => delays.push(reason),
    ...options,
  });
  await gate.start();
  return {
    gate,
    redis,
    delays,
    async close() {
      await gate.close();
      await Promise.all([redis, subscriber].map(closeRedis));
    },
  };
}

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

Deno.test("the rate limit holds across replicas, in any window", async () => {
  await using server = await startRedis();
  const limit = 5;
  const windowMs = 500;
  const replicas = await Promise.all(
    [1, 2, 3].map(() => replica(server.url, { limit, windowMs })),
  );
  try {
    const started = performance.now();
    const admitted: number[] = [];
    await Promise.all(replicas.flatMap(({ gate }) =>
      Array.from({ length: 8 }, async () => {
        await gate.admit();
        admitted.push(performance.now() - started);
      })
    ));
    admitted.sort((a, b) => a - b);
    // The first `limit` at once; then never more than `limit` in any window. Timers fire late,
    // never early, so a window a little shorter than the limit's (by 25 ms) is what can be held.
    assert.ok(admitted[limit - 1] < 200, `the first ${limit} waited: ${admitted}`);
    for (let i = limit; i < admitted.length; i++) {
      const gap = admitted[i] - admitted[i - limit];
      assert.ok(gap >= windowMs - 25, `${limit + 1} requests within ${gap} ms: ${admitted}`);
    }
    // 24 requests, 5 per window: the last one's turn comes in the fifth window.
    assert.ok(admitted.at(-1)! >= 4 * windowMs - 25, `${admitted}`);
    const delayed = replicas.flatMap((r) => r.delays);
    assert.equal(delayed.length, 24 - limit);
    assert.ok(delayed.every((reason) => reason === "rate_limit"));
  } finally {
    await Promise.all(replicas.map((r) => r.close()));
  }
});

Deno.test("a request that gives up its turn leaves it to the others", async () => {
  await using server = await startRedis();
  const a = await replica(server.url, { limit: 1, windowMs: 60_000 });
  try {
    await a.gate.admit();
    const stop = new AbortController();
    const waiting = a.gate.admit(stop.signal); // its turn is a minute away
    await pause(50);
    assert.equal(await a.redis.zcard(RATE_KEY), 2);
    stop.abort(new Error("stopping"));
    await assert.rejects(waiting, /stopping/);
    await pause(50);
    assert.equal(await a.redis.zcard(RATE_KEY), 1); // the given-up turn is gone
  } finally {
    await a.close();
  }
});

Deno.test("a pause started by one replica holds back every replica", async () => {
  await using server = await startRedis();
  const a = await replica(server.url);
  const b = await replica(server.url);
  try {
    a.gate.pause(600);
    await pause(20); // the message's way to b
    assert.ok(b.gate.pausedForMs > 500, `b knows of ${b.gate.pausedForMs} ms`);
    const started = performance.now();
    await Promise.all([a.gate.admit(), b.gate.admit()]);
    const waited = performance.now() - started;
    assert.ok(waited >= 550, `admitted after ${waited} ms`);
    assert.deepEqual([a.delays, b.delays], [["paused"], ["paused"]]);
    // A shorter pause does not cut a longer one short.
    a.gate.pause(800);
    b.gate.pause(100);
    await pause(50);
    assert.ok(b.gate.pausedForMs > 600);
    assert.ok(await a.redis.pttl(PAUSE_KEY) > 600);
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("a replica that starts during a pause reads it from Redis", async () => {
  await using server = await startRedis();
  const a = await replica(server.url);
  try {
    a.gate.pause(1000);
    await pause(20);
    const late = await replica(server.url);
    try {
      assert.ok(late.gate.pausedForMs > 800, `${late.gate.pausedForMs}`);
      const stop = new AbortController();
      const waiting = late.gate.untilUnpaused(stop.signal);
      stop.abort(new Error("stopping"));
      await assert.rejects(waiting, /stopping/);
    } finally {
      await late.close();
    }
  } finally {
    await a.close();
  }
});

Deno.test("a pause during a request's wait for its turn sends it only after the pause", async () => {
  await using server = await startRedis();
  const a = await replica(server.url, { limit: 1, windowMs: 300 });
  try {
    await a.gate.admit();
    const started = performance.now();
    const second = a.gate.admit().then(() => performance.now() - started); // turn in ~300 ms
    await pause(100);
    a.gate.pause(600); // ends ~700 ms after start
    const waited = await second;
    assert.ok(waited >= 650, `sent after ${waited} ms, during the pause`);
    assert.deepEqual(a.delays, ["rate_limit", "paused"]);
  } finally {
    await a.close();
  }
});
