/**
 * One model budget for every replica, end to end: workers (in process, and one as a real
 * process) sharing one private Redis, in front of one local model server whose own counts are
 * the evidence.
 *
 * @module
 */
import assert from "node:assert/strict";
import { closeRedis, createRedis } from "../lib/redis.ts";
import { SharedSlots, SLOT_LEASE_MS } from "../lib/shared_slots.ts";
import type { Worker } from "../lib/worker.ts";
import { startWorkerProcess } from "../testing/worker_process.ts";
import { defaultReply, type Stack, startStack } from "./helpers/stack.ts";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The value of one sample of a worker's metrics, or undefined when absent. */
async function metric(
  worker: Worker,
  name: string,
  labels: Record<string, string> = {},
): Promise<number | undefined> {
  const wanted = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).join(",");
  const line = (await worker.metrics.metrics()).split("\n")
    .find((l) => l.startsWith(wanted ? `${name}{${wanted}} ` : `${name} `));
  return line === undefined ? undefined : Number(line.split(" ").at(-1));
}

/** Publishes `count` followup jobs, each for its own user; returns their ids. */
function followups(stack: Stack, count: number): Promise<string[]> {
  return Promise.all(
    Array.from(
      { length: count },
      (_, i) => stack.enqueue("followup", { message: `Call the plumber ${i}` }, 100 + i),
    ),
  );
}

Deno.test("workers sharing LLM_MAX_IN_FLIGHT never send the model more at once", async () => {
  await using stack = await startStack({
    reply: async (request) => {
      await sleep(20 + Math.random() * 40);
      return defaultReply(request);
    },
    // Each worker alone would send 4: three of them 12.
    env: { WORKER_CONCURRENCY: "4", LLM_MAX_IN_FLIGHT: "5" },
  });
  const sent = [0, 0, 0];
  const workers = await Promise.all(
    sent.map((_, i) => stack.startWorker({}, { onCompletion: () => sent[i]++ })),
  );
  let mostWaiting = 0;
  const watching = setInterval(async () => {
    for (const worker of workers) {
      mostWaiting = Math.max(
        mostWaiting,
        await metric(worker, "llm_worker_model_budget_waiting") ?? 0,
      );
    }
  }, 30);
  try {
    await stack.waitForJobs(await followups(stack, 90), 60_000);
  } finally {
    clearInterval(watching);
  }
  assert.equal(stack.model.maxInFlight, 5);
  assert.ok(sent.every((count) => count > 0), `requests per worker: ${sent}`);
  assert.ok(mostWaiting > 0, "no worker ever waited for the shared budget");
  const statuses = [...stack.core.state.jobs.values()].map((job) => job.status);
  assert.ok(statuses.every((status) => status === "completed"), `${statuses}`);
});

Deno.test("a 429 with Retry-After: 2 seen by one worker holds back every worker for 2 s", async () => {
  const arrivals: number[] = [];
  let refusedAt = 0;
  await using stack = await startStack({
    reply: async (request) => {
      arrivals.push(performance.now());
      if (arrivals.length === 8) {
        refusedAt = performance.now();
        return Response.json({ error: { message: "rate limited" } }, {
          status: 429,
          headers: { "retry-after": "2" },
        });
      }
      await sleep(40);
      return defaultReply(request);
    },
    env: { WORKER_CONCURRENCY: "3" },
  });
  const workers = [await stack.startWorker(), await stack.startWorker()];
  const jobs = await followups(stack, 40);
  await stack.waitForJobs(jobs, 30_000);
  assert.ok(refusedAt > 0);
  // Requests that reached the server within 100 ms of the 429 left their worker before it could
  // know (the 429's way back, then Redis's message to the other worker: a few ms here).
  const during = arrivals.filter((t) => t > refusedAt + 100 && t < refusedAt + 2000);
  assert.deepEqual(during.map((t) => Math.round(t - refusedAt)), [], "ms after the 429");
  assert.ok(arrivals.some((t) => t >= refusedAt + 2000), "requests went on after the pause");
  for (const worker of workers) {
    const paused = await metric(worker, "llm_worker_model_requests_delayed_total", {
      reason: "paused",
    });
    assert.ok(paused! >= 1, `a worker was not held back (${paused})`);
    assert.equal(
      await metric(worker, "llm_worker_model_requests_delayed_total", { reason: "rate_limit" }),
      0,
    );
  }
  const statuses = [...stack.core.state.jobs.values()].map((job) => job.status);
  assert.ok(statuses.every((status) => status === "completed"), `${statuses}`);
});

Deno.test("LLM_MAX_REQUESTS_PER_MINUTE holds across workers", async () => {
  await using stack = await startStack({
    env: { LLM_MAX_REQUESTS_PER_MINUTE: "6", WORKER_SHUTDOWN_TIMEOUT_MS: "200" },
  });
  const workers = [await stack.startWorker(), await stack.startWorker()];
  await followups(stack, 10);
  await stack.waitFor(() => stack.model.requests.length === 6, "the first six requests");
  await sleep(1500);
  assert.equal(stack.model.requests.length, 6, "a seventh request within the minute");
  let delayed = 0;
  for (const worker of workers) {
    delayed += await metric(worker, "llm_worker_model_requests_delayed_total", {
      reason: "rate_limit",
    }) ?? 0;
  }
  assert.equal(delayed, 4); // the other four wait for their turn, a minute after the first
});

Deno.test("a killed worker's shared slots come back within the lease", async () => {
  const hang = Promise.withResolvers<void>();
  await using stack = await startStack({
    reply: async (request) => {
      await hang.promise; // the worker's requests stay in flight until it dies
      return defaultReply(request);
    },
  });
  const worker = startWorkerProcess({
    REDIS_URL: stack.redis.url,
    LLM_BASE_URL: stack.model.url,
    CORE_API_URL: stack.core.url,
    IMAGE_STORAGE_PATH: stack.imageDir,
    WORKER_CONCURRENCY: "2",
    LLM_MAX_IN_FLIGHT: "2",
    LOG_LEVEL: "error",
  });
  const redis = createRedis(stack.redis.url, { eager: true });
  const subscriber = createRedis(stack.redis.url, { eager: true });
  const other = new SharedSlots({ redis, subscriber, limit: 2, owner: "other" });
  try {
    await followups(stack, 2);
    await stack.waitFor(() => stack.model.inFlight === 2, "both slots in use", 30_000);
    await other.start();
    let got = false;
    const acquired = other.acquire().then((release) => (got = true, release));
    await sleep(300);
    assert.equal(got, false, "a slot was free while the worker held both");
    await worker.kill("SIGKILL");
    const killed = performance.now();
    (await acquired)();
    const took = performance.now() - killed;
    // The worker refreshed its leases every quarter lease until it died.
    assert.ok(took >= SLOT_LEASE_MS * 0.75 - 500, `the slot came back after only ${took} ms`);
    assert.ok(took <= SLOT_LEASE_MS + 1000, `the slot came back after ${took} ms`);
  } finally {
    hang.resolve();
    await worker.kill("SIGKILL");
    await other.close();
    await Promise.all([redis, subscriber].map(closeRedis));
  }
});
