/**
 * Fault injection: real worker processes (started as `deno task start` starts one) against a
 * private Redis, the fake model and the Core emulator, with crashes, restarts and failing
 * services. Each case ends with the same audit: every job `completed` or `failed` in Core,
 * nothing pending in the group, no memory, tag upsert or event made twice, every notification
 * sent once. The last test prints one line per case.
 *
 * No timings are asserted; the waits only bound how long a broken worker can hang the suite.
 */
import assert from "node:assert/strict";
import { benchAnswer, type FakeChatRequest, tokenOf } from "../testing/fake_model.ts";
import { makeWorkload, random, seedCore, type WorkloadJob, xaddArgs } from "../testing/workload.ts";
import type { WorkerProcess } from "../testing/worker_process.ts";
import {
  type CaseFigures,
  type FaultStack,
  type FaultStackOptions,
  startFaultStack,
  summaryLine,
} from "./helpers/fault_stack.ts";

const figures: CaseFigures[] = [];

/** A 300 ms model and a Core taking up to 60 ms a call: jobs spend time between their effects. */
const slowCore: FaultStackOptions = {
  latencyMs: 300,
  coreLatencyMs: () => Math.floor(Math.random() * 60),
};

/** Runs one case on a fresh stack and audits it. */
async function faultCase(
  name: string,
  options: FaultStackOptions,
  run: (stack: FaultStack) => Promise<{ jobs: WorkloadJob[]; faults: () => number }>,
): Promise<void> {
  const stack = await startFaultStack(options);
  try {
    const { jobs, faults } = await run(stack);
    // Bounds how long a broken worker can hang the suite; the audit says what is missing.
    await stack.waitForEnd(jobs, 90_000);
    stack.setCoreFault(undefined);
    const result = await stack.audit(name, jobs, faults());
    figures.push(result);
    assert.deepEqual(result.problems.slice(0, 20), [], `${name}: ${summaryLine(result)}`);
  } finally {
    await stack.close();
  }
}

const until = async (stack: FaultStack, check: () => boolean, what: string, ms = 30_000) => {
  assert.ok(await stack.waitFor(check, ms), `timed out waiting for ${what}`);
};
/** Kills `worker` (SIGKILL) once jobs are inside model calls, then lets the model answer again. */
const killInsideModelCalls = async (stack: FaultStack, worker: WorkerProcess) => {
  await stack.holdInsideModelCalls();
  assert.ok(stack.model.inFlight > 0, "jobs are inside model calls");
  await worker.kill("SIGKILL");
  stack.model.resume();
};
const ended = (stack: FaultStack, jobs: { token: string }[]) =>
  jobs.filter((j) => ["completed", "failed"].includes(stack.core.state.jobs.get(j.token)!.status))
    .length;

Deno.test("faults: kill -9 during model calls, a second worker claims and finishes", async () => {
  await faultCase("kill -9, another consumer claims", slowCore, async (stack) => {
    const short = { WORKER_CLAIM_IDLE_MS: "1500" };
    const a = stack.startWorker("fault-a", short);
    const jobs = await stack.enqueue(60);
    await until(stack, () => ended(stack, jobs) >= 10, "the first jobs");
    await killInsideModelCalls(stack, a);
    stack.startWorker("fault-b", short);
    return { jobs, faults: () => 1 };
  });
});

Deno.test("faults: kill -9, the same consumer restarts and recovers its entries", async () => {
  await faultCase("kill -9, same consumer restarts", slowCore, async (stack) => {
    const a = stack.startWorker("fault-same");
    const jobs = await stack.enqueue(60);
    await until(stack, () => ended(stack, jobs) >= 10, "the first jobs");
    await killInsideModelCalls(stack, a);
    stack.startWorker("fault-same");
    return { jobs, faults: () => 1 };
  });
});

Deno.test("faults: kill -9 after Core's PATCH, before the XACK: acknowledged, told once", async () => {
  await faultCase("kill -9 between PATCH and XACK", { latencyMs: 100 }, async (stack) => {
    const a = stack.startWorker("fault-patch", { WORKER_CLAIM_IDLE_MS: "1500" });
    // The job types that make effects in Core: memories and events.
    const jobs = await stack.enqueue(40, { intent_classify: 1, email_extract: 1 });
    await until(stack, () => ended(stack, jobs) >= 5, "the first jobs");
    stack.coreProxy.holdPatches = true;
    await until(stack, () => stack.coreProxy.held >= 3, "jobs ended in Core, not yet acknowledged");
    await stack.holdInsideModelCalls();
    const held = stack.coreProxy.held;
    await a.kill("SIGKILL");
    stack.coreProxy.holdPatches = false;
    stack.model.resume();
    stack.startWorker("fault-patch-b", { WORKER_CLAIM_IDLE_MS: "1500" });
    return { jobs, faults: () => 1 + held };
  });
});

Deno.test("faults: Redis restarted mid-run (append-only), the worker reconnects", async () => {
  await faultCase(
    "Redis kill -9 + restart (AOF), twice",
    { appendOnly: true, latencyMs: 5, env: { WORKER_CONCURRENCY: "32" } },
    async (stack) => {
      // Busy, so that commands are in flight when Redis dies: the client sends them again.
      stack.startWorker("fault-redis");
      const jobs = await stack.enqueue(600);
      await until(stack, () => ended(stack, jobs) >= 200, "a third of the jobs");
      await stack.redis.restart();
      await until(stack, () => ended(stack, jobs) >= 400, "two thirds of the jobs");
      await stack.redis.restart();
      return { jobs, faults: () => 2 };
    },
  );
});

Deno.test("faults: model server refusing connections, then 503, then back", async () => {
  await faultCase("model down (refused, then 503), back", { latencyMs: 50 }, async (stack) => {
    stack.startWorker("fault-model");
    const jobs = await stack.enqueue(60);
    await until(stack, () => ended(stack, jobs) >= 10, "the first jobs");
    await stack.stopModel();
    await new Promise((resolve) => setTimeout(resolve, 2_500));
    stack.restartModel();
    stack.model.failing = true;
    await new Promise((resolve) => setTimeout(resolve, 2_500));
    stack.model.failing = false;
    const answered503 = stack.model.answered503;
    return { jobs, faults: () => 1 + answered503 };
  });
});

Deno.test("faults: Core answers 503 to one call in three for the whole run", async () => {
  await faultCase("Core 503 on 1 call in 3", { latencyMs: 20 }, async (stack) => {
    const rand = random(3);
    // And, so that jobs are retried between their effects, the second event of every email
    // is refused three times (more than the client's quick retries).
    const refused = new Map<string, number>();
    stack.setCoreFault(({ method, path, body }) => {
      const second = method === "POST" && path === "/events" && /"Call J\d+/.exec(body)?.[0];
      if (second && (refused.get(second) ?? 0) < 3) {
        refused.set(second, (refused.get(second) ?? 0) + 1);
        return true;
      }
      return rand() < 1 / 3;
    });
    stack.startWorker("fault-core");
    const jobs = await stack.enqueue(60);
    return { jobs, faults: () => stack.coreFaults() };
  });
});

Deno.test("faults: soak, 1000 mixed jobs, nonsense answers, Core 503s, a worker killed and restarted", async () => {
  const rand = random(7);
  let nonsense = 0;
  const answer = (request: FakeChatRequest) => {
    if (rand() < 0.15) {
      nonsense++;
      // No JSON where JSON is wanted; an empty answer where text is.
      return request.schemaName ? `Sorry, I can't help with ${tokenOf(request.text)}.` : "";
    }
    return benchAnswer(request);
  };
  await faultCase(
    "soak: 1000 jobs, 2 workers, one kill -9",
    {
      latencyMs: () => 5 + Math.floor(rand() * 150),
      answer,
      env: { LLM_MAX_RETRIES: "3", WORKER_CONCURRENCY: "16", WORKER_CLAIM_IDLE_MS: "3000" },
    },
    async (stack) => {
      stack.setCoreFault(() => rand() < 0.05);
      const a = stack.startWorker("soak-a");
      stack.startWorker("soak-b");
      const jobs = await stack.enqueue(1000);
      await until(stack, () => ended(stack, jobs) >= 500, "half of the jobs", 60_000);
      await stack.holdInsideModelCalls();
      await a.kill("SIGKILL");
      stack.model.resume();
      stack.startWorker("soak-a");
      return { jobs, faults: () => 1 + nonsense + stack.coreFaults() };
    },
  );
});

Deno.test("faults: three replicas, one kill -9, one SIGSTOP past its lease: user order, one model budget", async () => {
  /** The model's own call log: per job token, when each of its requests came and was answered. */
  const calls: Array<{ token: string; receivedAt: number; answeredAt?: number }> = [];
  const open = new Map<FakeChatRequest, (typeof calls)[number]>();
  const LEASE_MS = 1500;
  const MAX_IN_FLIGHT = 12; // of the 3 × 8 the replicas could send on their own
  await faultCase(
    "3 replicas, kill -9 + SIGSTOP, user order",
    {
      latencyMs: () => 150 + Math.floor(Math.random() * 150),
      coreLatencyMs: () => Math.floor(Math.random() * 30),
      env: {
        WORKER_CONCURRENCY: "8",
        LLM_MAX_IN_FLIGHT: String(MAX_IN_FLIGHT),
        WORKER_LEASE_MS: String(LEASE_MS),
        WORKER_CLAIM_IDLE_MS: "3000",
      },
      onRequest: (request) => {
        const call = { token: tokenOf(request.text), receivedAt: request.receivedAt };
        calls.push(call);
        open.set(request, call);
      },
      onAnswered: (request, answeredAt) => {
        open.get(request)!.answeredAt = answeredAt;
        open.delete(request);
      },
    },
    async (stack) => {
      const a = stack.startWorker("order-a");
      const b = stack.startWorker("order-b");
      stack.startWorker("order-c");
      // 300 jobs of the five types over 30 users, each user's jobs interleaved with the
      // others' and spread over the streams. Explicit entry ids, one millisecond apart, make
      // the order across streams total (Core's `*` ids may tie within a millisecond).
      const jobs = makeWorkload({ count: 300, users: 30, seed: 21, images: stack.images });
      for (const job of jobs) job.userId += 5000;
      seedCore(stack.core, jobs);
      const base = Date.now();
      const order = new Map(jobs.map((job, i) => [job.token, i]));
      const pipeline = stack.client.pipeline();
      jobs.forEach((job, i) => {
        const [stream, , ...fields] = xaddArgs(job);
        pipeline.xadd(stream, `${base + i}-0`, ...fields);
      });
      await pipeline.exec();
      assert.equal(new Set(jobs.map((job) => job.jobType)).size, 5);
      await until(stack, () => ended(stack, jobs) >= 50, "the first jobs");
      await stack.holdInsideModelCalls();
      await a.kill("SIGKILL");
      stack.model.resume();
      await until(stack, () => ended(stack, jobs) >= 120, "more jobs");
      await stack.holdInsideModelCalls();
      b.child.kill("SIGSTOP");
      stack.model.resume();
      // Paused for three lease times: its users are taken over meanwhile.
      await new Promise((resolve) => setTimeout(resolve, 3 * LEASE_MS));
      b.child.kill("SIGCONT");
      await stack.waitForEnd(jobs, 90_000);
      // From the model's call log: per user, no request while an earlier one is unanswered,
      // and the jobs in entry-id order (a job interrupted by a fault may be asked again next).
      const userOf = new Map(jobs.map((job) => [job.token, job.userId]));
      const problems: string[] = [];
      const byUser = Map.groupBy(calls, (call) => userOf.get(call.token));
      assert.ok(!byUser.has(undefined), "every model request names its job");
      for (const [user, list] of byUser) {
        list.sort((x, y) => x.receivedAt - y.receivedAt);
        for (let i = 1; i < list.length; i++) {
          const before = list[i - 1];
          if (before.answeredAt === undefined || list[i].receivedAt < before.answeredAt) {
            problems.push(`user ${user}: ${list[i].token} asked while ${before.token} ran`);
          }
          if (order.get(list[i].token)! < order.get(before.token)!) {
            problems.push(`user ${user}: ${list[i].token} ran after ${before.token}`);
          }
        }
      }
      // From the same log: never more requests at the model than the shared budget.
      const edges = calls.flatMap((call) => [
        { at: call.receivedAt, step: 1 },
        { at: call.answeredAt ?? Infinity, step: -1 },
      ]).sort((x, y) => x.at - y.at || x.step - y.step);
      let inFlight = 0;
      let most = 0;
      for (const edge of edges) most = Math.max(most, inFlight += edge.step);
      if (most > MAX_IN_FLIGHT) problems.push(`${most} model requests in flight at once`);
      assert.ok(most >= 2, `the replicas ran in parallel (${most} at most)`);
      const asked = new Set(calls.map((call) => call.token));
      for (const job of jobs) if (!asked.has(job.token)) problems.push(`${job.token} never ran`);
      assert.deepEqual(problems, []);
      return { jobs, faults: () => 2 };
    },
  );
});

Deno.test("faults: summary", () => {
  console.log("\nFault-injection suite:");
  for (const figure of figures) console.log(`  ${summaryLine(figure)}`);
  const unusable = figures.filter((f) => f.lost > 0 || f.duplicated > 0);
  assert.equal(unusable.length, 0);
});
