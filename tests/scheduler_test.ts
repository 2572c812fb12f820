import assert from "node:assert/strict";
import { JobScheduler, type RunOutcome } from "../lib/scheduler.ts";

interface Item {
  userId: number | null;
  entryId: string;
  name: string;
}

const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

/** A scheduler whose runs end when the test says so. */
function controlled(maxRunning: number) {
  const started: string[] = [];
  const finishers = new Map<string, (outcome?: RunOutcome) => void>();
  const scheduler = new JobScheduler<Item>({
    maxRunning,
    run: (item) =>
      new Promise<RunOutcome>((resolve) => {
        started.push(item.name);
        finishers.set(item.name, resolve);
      }),
  });
  const finish = async (name: string, outcome?: RunOutcome) => {
    finishers.get(name)!(outcome);
    finishers.delete(name);
    await tick();
  };
  return { scheduler, started, finish };
}

Deno.test("scheduler: at most maxRunning at once, the rest start as places free up", async () => {
  const { scheduler, started, finish } = controlled(2);
  for (const name of ["a", "b", "c"]) scheduler.add({ userId: null, entryId: "1-0", name });
  assert.deepEqual(started, ["a", "b"]);
  assert.equal(scheduler.running, 2);
  assert.equal(scheduler.held, 3);
  await finish("a");
  assert.deepEqual(started, ["a", "b", "c"]);
  await finish("b");
  await finish("c");
  assert.equal(scheduler.held, 0);
});

Deno.test("scheduler: one item per user, in entry-id order even when added out of order", async () => {
  const { scheduler, started, finish } = controlled(10);
  scheduler.add({ userId: 1, entryId: "5-0", name: "u1-first" });
  scheduler.add({ userId: 1, entryId: "9-0", name: "u1-third" });
  scheduler.add({ userId: 1, entryId: "7-0", name: "u1-second" });
  scheduler.add({ userId: 2, entryId: "6-0", name: "u2" });
  assert.deepEqual(started, ["u1-first", "u2"]);
  await finish("u1-first");
  assert.deepEqual(started, ["u1-first", "u2", "u1-second"]);
  await finish("u1-second");
  assert.deepEqual(started.at(-1), "u1-third");
});

Deno.test("scheduler: a waiting item frees its running place but keeps its user's turn", async () => {
  const { scheduler, started, finish } = controlled(1);
  scheduler.add({ userId: 1, entryId: "1-0", name: "u1-a" });
  scheduler.add({ userId: 1, entryId: "2-0", name: "u1-b" });
  scheduler.add({ userId: 2, entryId: "3-0", name: "u2" });
  await finish("u1-a", { retryInMs: 30 });
  assert.deepEqual(started, ["u1-a", "u2"], "u2 runs while u1-a waits; u1-b does not");
  assert.equal(scheduler.waiting, 1);
  await finish("u2");
  await tick(60);
  assert.deepEqual(started, ["u1-a", "u2", "u1-a"], "the retry runs again before u1-b");
  await finish("u1-a");
  assert.deepEqual(started.at(-1), "u1-b");
});

Deno.test("scheduler: a wake promise cuts a wait short", async () => {
  const { scheduler, started, finish } = controlled(1);
  scheduler.add({ userId: 1, entryId: "1-0", name: "a" });
  const wake = Promise.withResolvers<void>();
  await finish("a", { retryInMs: 60_000, wake: wake.promise });
  assert.deepEqual(started, ["a"]);
  wake.resolve();
  await tick();
  assert.deepEqual(started, ["a", "a"]);
  await finish("a");
  assert.equal(scheduler.held, 0);
});

Deno.test("scheduler: whenHeldBelow waits for room; stop forgets queued and waiting items", async () => {
  const { scheduler, finish } = controlled(1);
  scheduler.add({ userId: null, entryId: "1-0", name: "a" });
  scheduler.add({ userId: null, entryId: "2-0", name: "b" });
  let roomy = false;
  const room = scheduler.whenHeldBelow(2).then(() => roomy = true);
  await tick();
  assert.equal(roomy, false);
  await finish("a");
  await room;
  assert.equal(roomy, true);

  scheduler.add({ userId: 3, entryId: "3-0", name: "c" }); // queued behind b (one place)
  assert.equal(scheduler.stop(), 1);
  assert.equal(await scheduler.drain(10), false, "b still runs");
  await finish("b");
  assert.equal(await scheduler.drain(10), true);
  assert.equal(scheduler.held, 0);
});

Deno.test("scheduler: a run that throws is reported and retried", async () => {
  const errors: unknown[] = [];
  let calls = 0;
  const scheduler = new JobScheduler<Item>({
    maxRunning: 1,
    run: () => {
      calls++;
      return calls === 1 ? Promise.reject(new Error("boom")) : Promise.resolve();
    },
    onError: (_item, error) => errors.push(error),
  });
  scheduler.add({ userId: null, entryId: "1-0", name: "x" });
  await tick();
  assert.equal(errors.length, 1);
  assert.equal(scheduler.waiting, 1);
  scheduler.stop();
});

Deno.test("scheduler: whenEnded counts items over, not retries", async () => {
  const { scheduler, finish } = controlled(3);
  for (const name of ["a", "b", "c"]) scheduler.add({ userId: null, entryId: "1-0", name });
  let two = false;
  const ended = scheduler.whenEnded(2).then(() => two = true);
  await finish("a");
  await finish("b", { retryInMs: 60_000 }); // waits to run again: not over
  assert.equal(scheduler.ended, 1);
  assert.equal(two, false);
  await finish("c");
  await ended;
  assert.equal(two, true);
  assert.equal(scheduler.ended, 2);
  const aborted = new AbortController();
  const never = scheduler.whenEnded(10, aborted.signal);
  aborted.abort(new Error("stop"));
  await assert.rejects(never, /stop/);
  scheduler.stop();
});
