import assert from "node:assert/strict";
import { Semaphore } from "../lib/semaphore.ts";

/** Lets every pending promise callback run. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

Deno.test("Semaphore refuses a limit below 1", () => {
  assert.throws(() => new Semaphore(0), RangeError);
  assert.throws(() => new Semaphore(-3), RangeError);
  assert.throws(() => new Semaphore(Number.NaN), RangeError);
});

Deno.test("Semaphore hands out up to `limit` slots at once, the rest wait", async () => {
  const slots = new Semaphore(2);
  const a = await slots.acquire();
  const b = await slots.acquire();
  assert.equal(slots.held, 2);
  let gotThird = false;
  const third = slots.acquire().then((release) => {
    gotThird = true;
    return release;
  });
  await settle();
  assert.equal(gotThird, false);
  assert.equal(slots.waiting, 1);
  a();
  const c = await third;
  assert.equal(gotThird, true);
  assert.equal(slots.held, 2);
  assert.equal(slots.waiting, 0);
  b();
  c();
  assert.equal(slots.held, 0);
});

Deno.test("Semaphore wakes waiters in FIFO order", async () => {
  const slots = new Semaphore(1);
  const first = await slots.acquire();
  const order: number[] = [];
  const waiters = [1, 2, 3].map((n) =>
    slots.acquire().then((release) => {
      order.push(n);
      release();
    })
  );
  await settle();
  assert.equal(slots.waiting, 3);
  first();
  await Promise.all(waiters);
  assert.deepEqual(order, [1, 2, 3]);
  assert.equal(slots.held, 0);
});

Deno.test("releasing twice gives back only one slot", async () => {
  const slots = new Semaphore(1);
  const release = await slots.acquire();
  release();
  release();
  assert.equal(slots.held, 0);
  const again = await slots.acquire();
  assert.equal(slots.held, 1);
  let gotSecond = false;
  const second = slots.acquire().then((r) => {
    gotSecond = true;
    return r;
  });
  release(); // the stale release must not free the slot `again` holds
  await settle();
  assert.equal(gotSecond, false);
  again();
  (await second)();
  assert.equal(slots.held, 0);
});

Deno.test("run holds a slot while the function runs and frees it when it throws", async () => {
  const slots = new Semaphore(1);
  const value = await slots.run(() => {
    assert.equal(slots.held, 1);
    return Promise.resolve(42);
  });
  assert.equal(value, 42);
  assert.equal(slots.held, 0);
  await assert.rejects(slots.run(() => Promise.reject(new Error("boom"))), /boom/);
  assert.equal(slots.held, 0);
});

Deno.test("run never lets more than `limit` functions run at once", async () => {
  const slots = new Semaphore(3);
  let running = 0;
  let most = 0;
  await Promise.all(
    Array.from({ length: 12 }, () =>
      slots.run(async () => {
        running++;
        most = Math.max(most, running);
        await new Promise((resolve) => setTimeout(resolve, 5));
        running--;
      })),
  );
  assert.equal(most, 3);
  assert.equal(slots.held, 0);
});

Deno.test("a waiter whose signal aborts leaves the queue and takes no slot", async () => {
  const slots = new Semaphore(1);
  const release = await slots.acquire();
  const stop = new AbortController();
  const aborted = slots.acquire(stop.signal);
  const next = slots.acquire();
  assert.equal(slots.waiting, 2);
  stop.abort(new Error("stopping"));
  await assert.rejects(aborted, /stopping/);
  assert.equal(slots.waiting, 1);
  release(); // the slot passes to `next`, not to the aborted waiter
  (await next)();
  assert.equal(slots.held, 0);
  await assert.rejects(slots.acquire(stop.signal), /stopping/); // aborted before: no slot
  assert.equal(slots.held, 0);
});
