import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { closeRedis, createRedis } from "../lib/redis.ts";
import { SharedSlots, type SharedSlotsOptions, SLOTS_KEY } from "../lib/shared_slots.ts";
import { startRedis } from "../testing/redis_server.ts";

/** A replica's side of the budget: its own two connections and its slots. */
interface Replica {
  slots: SharedSlots;
  redis: Redis;
  close(): Promise<void>;
}

async function replica(
  url: string,
  options: Omit<SharedSlotsOptions, "redis" | "subscriber">,
): Promise<Replica> {
  const redis = createRedis(url, { eager: true, autoPipelining: true });
  const subscriber = createRedis(url, { eager: true });
  const slots = new SharedSlots({ redis, subscriber, ...options });
  await slots.start();
  return {
    slots,
    redis,
    async close() {
      await slots.close();
      await Promise.all([redis, subscriber].map(closeRedis));
    },
  };
}

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

Deno.test("replicas sharing one Redis never hold more slots than the limit", async () => {
  await using server = await startRedis();
  const replicas = await Promise.all(
    ["a", "b", "c"].map((owner) => replica(server.url, { limit: 3, owner })),
  );
  try {
    let holding = 0;
    let most = 0;
    await Promise.all(replicas.flatMap(({ slots }) =>
      Array.from({ length: 10 }, async () => {
        const release = await slots.acquire();
        holding++;
        most = Math.max(most, holding);
        await pause(5 + Math.random() * 15);
        holding--;
        release();
      })
    ));
    assert.equal(most, 3);
    await pause(50); // the last releases reach Redis
    assert.equal(await replicas[0].redis.zcard(SLOTS_KEY), 0);
  } finally {
    await Promise.all(replicas.map((r) => r.close()));
  }
});

Deno.test("a slot given back wakes a waiter on another replica at once", async () => {
  await using server = await startRedis();
  // Without the release channel, the waiter would ask again only after `pollMs` (1 s).
  const a = await replica(server.url, { limit: 1, owner: "a" });
  const b = await replica(server.url, { limit: 1, owner: "b" });
  try {
    const handovers: number[] = [];
    let release = await a.slots.acquire();
    for (let i = 0; i < 20; i++) {
      const [from, to] = i % 2 === 0 ? [a, b] : [b, a];
      const next = to.slots.acquire();
      await pause(5);
      assert.equal(to.slots.waiting, 1);
      const released = performance.now();
      release();
      release = await next;
      handovers.push(performance.now() - released);
      assert.equal(from.slots.held + to.slots.held, 1);
    }
    release();
    handovers.sort((x, y) => x - y);
    const median = handovers[10];
    console.log(`handover: median ${median.toFixed(2)} ms, max ${handovers[19].toFixed(2)} ms`);
    assert.ok(median < 100, `median handover ${median.toFixed(1)} ms`);
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("replicas are served first come, first served", async () => {
  await using server = await startRedis();
  const a = await replica(server.url, { limit: 1, owner: "a" });
  const b = await replica(server.url, { limit: 1, owner: "b" });
  try {
    const order: string[] = [];
    let release = await a.slots.acquire();
    const waitingB = b.slots.acquire().then((r) => (order.push("b"), r));
    await pause(20);
    release();
    // `a` asks again at once, after `b`: the slot goes to `b` first.
    const againA = a.slots.acquire().then((r) => (order.push("a"), r));
    release = await waitingB;
    await pause(50);
    assert.deepEqual(order, ["b"]);
    release();
    (await againA)();
    assert.deepEqual(order, ["b", "a"]);
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("a holder that stops refreshing gives its slot back within its lease", async () => {
  await using server = await startRedis();
  const leaseMs = 1000;
  const dead = await replica(server.url, { limit: 1, owner: "dead", leaseMs });
  const live = await replica(server.url, { limit: 1, owner: "live", leaseMs });
  try {
    await dead.slots.acquire();
    await pause(leaseMs / 2); // refreshed at least once meanwhile
    dead.redis.disconnect(); // it can neither refresh nor give the slot back: as if it died
    const died = performance.now();
    await live.slots.acquire();
    const took = performance.now() - died;
    assert.ok(took >= leaseMs / 2, `a slot held by a live lease came back after ${took} ms`);
    assert.ok(took <= leaseMs + 500, `the dead holder's slot came back after ${took} ms`);
  } finally {
    await dead.close();
    await live.close();
  }
});

Deno.test("a held slot is refreshed past its lease and others wait meanwhile", async () => {
  await using server = await startRedis();
  const a = await replica(server.url, { limit: 1, owner: "a", leaseMs: 400 });
  const b = await replica(server.url, { limit: 1, owner: "b", leaseMs: 400 });
  try {
    const release = await a.slots.acquire();
    let got = false;
    const next = b.slots.acquire().then((r) => (got = true, r));
    await pause(1500);
    assert.equal(got, false, "the slot was taken from a live holder");
    release();
    (await next)();
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("a holder whose lease was lost cannot give back the slot another holds", async () => {
  await using server = await startRedis();
  const a = await replica(server.url, { limit: 1, owner: "a" });
  const b = await replica(server.url, { limit: 1, owner: "b" });
  try {
    const releaseA = await a.slots.acquire();
    // As if `a` stalled past its lease and the slot was reclaimed.
    await a.redis.del(SLOTS_KEY);
    const releaseB = await b.slots.acquire();
    const [holderB] = await b.redis.zrange(SLOTS_KEY, "0", "-1");
    assert.match(holderB, /^b:/);
    releaseA(); // removes only its own member: nothing
    await pause(50);
    assert.deepEqual(await b.redis.zrange(SLOTS_KEY, "0", "-1"), [holderB]);
    // And `b`'s slot still bounds others.
    let got = false;
    const next = a.slots.acquire().then((r) => (got = true, r));
    await pause(100);
    assert.equal(got, false);
    releaseB();
    (await next)();
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("a waiter whose signal aborts takes no slot; close rejects the others", async () => {
  await using server = await startRedis();
  const a = await replica(server.url, { limit: 1, owner: "a" });
  try {
    const release = await a.slots.acquire();
    const stop = new AbortController();
    const aborted = a.slots.acquire(stop.signal);
    const left = a.slots.acquire();
    await pause(20);
    assert.equal(a.slots.waiting, 2);
    stop.abort(new Error("stopping"));
    await assert.rejects(aborted, /stopping/);
    assert.equal(a.slots.waiting, 1);
    release();
    (await left)();
    const last = a.slots.acquire();
    const held = await last;
    const waiter = assert.rejects(a.slots.acquire(), /closed/);
    await pause(20);
    await a.slots.close(); // gives back the held slot too
    await waiter;
    held(); // nothing left to give back
    assert.equal(await a.redis.zcard(SLOTS_KEY), 0);
  } finally {
    await a.close();
  }
});

Deno.test("replicas set with different limits share the last started one's", async () => {
  await using server = await startRedis();
  const first = await replica(server.url, { limit: 1, owner: "a" });
  const second = await replica(server.url, { limit: 2, owner: "b" });
  try {
    assert.equal(await first.redis.get(`${SLOTS_KEY}:limit`), "2");
    // The first replica counts against the budget in Redis (2), not its own setting (1).
    const releases = [await first.slots.acquire(), await first.slots.acquire()];
    const third = second.slots.acquire();
    let served = false;
    third.then(() => served = true);
    await pause(100);
    assert.equal(served, false); // 2 held: the budget is full for every replica
    releases[0]();
    releases[1]();
    (await third)();
  } finally {
    await Promise.all([first, second].map((r) => r.close()));
  }
});
