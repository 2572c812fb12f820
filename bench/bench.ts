/**
 * `deno task bench`: the worker under load, measured against the ideal and against a bare client.
 *
 * Starts a private Redis, a fake OpenAI-compatible model server (`testing/fake_model.ts`) with a
 * fixed latency and the Core emulator (request log off), then runs the real worker as its own
 * process, exactly as `deno task start` does, and measures six scenarios. In the same run a bare
 * client (`bench/bare_client.ts`: the worker's model client alone, same concurrency, same requests,
 * no Redis or Core) gives the ceiling, and throughput targets are shares of it
 * (`bench/report.ts`). Prints a table; a full run writes `bench/results.json` and renders the
 * tables of `bench/README.md` and `README.md` from it.
 *
 * Options: `--only=1,3` runs only those scenarios; `--scale=0.2` runs fewer jobs (a quick look);
 * `--render` runs nothing and renders the tables again from `bench/results.json`.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { Redis } from "ioredis";
import { startCoreEmulator } from "../testing/core_emulator.ts";
import { freePort, startRedis } from "../testing/redis_server.ts";
import {
  processMemory,
  START_FLAGS,
  startWorkerProcess,
  type WorkerProcess,
} from "../testing/worker_process.ts";
import { machineInfo, processCpuMs, round, startSpeedGauge } from "../testing/machine.ts";
import {
  type BenchResults,
  type BenchRow,
  renderReadmes,
  resultsTable,
  runLine,
} from "./report.ts";
import type { BareRequest, BareSpec } from "./bare_client.ts";
import { clockMs, type FakeChatRequest, startFakeModel, tokenOf } from "../testing/fake_model.ts";
import {
  makeWorkload,
  publish,
  seedCore,
  watchJobs,
  type WorkloadJob,
  writeImages,
  xaddArgs,
} from "../testing/workload.ts";

const { values: flags } = parseArgs({
  args: Deno.args,
  options: { only: { type: "string" }, scale: { type: "string" }, render: { type: "boolean" } },
});
const ALL = "1,2,3,4,5,6";
const only = new Set((flags.only ?? ALL).split(",").map((s) => s.trim()));
const scale = Number(flags.scale ?? "1");
const n = (count: number) => Math.max(10, Math.round(count * scale));

const BENCH_DIR = new URL(".", import.meta.url);
const RESULTS = new URL("results.json", BENCH_DIR);

if (flags.render) {
  await renderReadmes(JSON.parse(await Deno.readTextFile(RESULTS)));
  console.log("Rendered bench/README.md and README.md from bench/results.json.");
  Deno.exit(0);
}

// ------------------------------------------------------------------------------------ the stack

const redis = await startRedis();
const client = new Redis(redis.url, { maxRetriesPerRequest: null, protocol: 2 });
const core = startCoreEmulator({ recordRequests: false });
let latencyMs = 0;
const seen = new Map<string, number>(); // token -> when its first model request arrived
const bareLatencies: number[] = [];
const model = startFakeModel({
  latencyMs: () => latencyMs,
  onRequest: (request: FakeChatRequest) => {
    const sent = / sent=(\d+(\.\d+)?)/.exec(request.text);
    if (sent) bareLatencies.push(request.receivedAt - Number(sent[1]));
    else {
      const token = tokenOf(request.text);
      if (!seen.has(token)) seen.set(token, request.receivedAt);
    }
  },
});
const imageDir = await Deno.makeTempDir({ prefix: "llm-worker-bench-images-" });
const workDir = await Deno.makeTempDir({ prefix: "llm-worker-bench-" });
const rows: BenchRow[] = [];
let nextToken = 1;

function resetState(): void {
  core.state.jobs.clear();
  core.state.memories.clear();
  core.state.events.clear();
  core.state.tasks.clear();
  seen.clear();
  bareLatencies.length = 0;
}

function workload(
  count: number,
  options: {
    users?: number;
    balanced?: boolean;
    images: string[];
    mix?: WorkloadJob["jobType"][];
  },
): WorkloadJob[] {
  const jobs = makeWorkload({
    count,
    users: options.users ?? count,
    distinctUsers: options.users === undefined || options.balanced,
    images: options.images,
    firstToken: nextToken,
    seed: nextToken,
    mix: options.mix ? Object.fromEntries(options.mix.map((t) => [t, 1])) : undefined,
  });
  nextToken += count;
  return jobs;
}

/** The V8 flags of the start task: the heap settings the worker ships with. */
const START_V8_FLAGS = START_FLAGS.find((flag) => flag.startsWith("--v8-flags="))
  ?.slice("--v8-flags=".length) ?? "";

/**
 * The V8 flags of the comparison rows (1V, 5V, 2V): none, so V8 sizes the heap itself, unless
 * `BENCH_V8_FLAGS` names others to measure.
 */
const OTHER_V8_FLAGS = Deno.env.get("BENCH_V8_FLAGS") ?? "";

/** How a row's V8 flags are described. */
function describeFlags(v8Flags: string): string {
  return v8Flags ? `--v8-flags=${v8Flags}` : "V8's own heap sizing";
}

/** The bare client sending the same warm-up and jobs at the same concurrency, all at once. */
function bareThroughput(
  concurrency: number,
  warmup: WorkloadJob[],
  jobs: WorkloadJob[],
  v8Flags: string,
): Promise<{ elapsedMs: number; peakRss: number }> {
  return runBare({
    url: model.url,
    concurrency,
    warmup: bareRequests(warmup),
    requests: bareRequests(jobs),
    mode: "throughput",
  }, v8Flags);
}

async function startWorker(
  concurrency: number,
  v8Flags: string,
  env: Record<string, string> = {},
): Promise<WorkerProcess> {
  const httpPort = freePort();
  const worker = startWorkerProcess({
    REDIS_URL: redis.url,
    LLM_BASE_URL: model.url,
    CORE_API_URL: core.url,
    IMAGE_STORAGE_PATH: imageDir,
    WORKER_CONCURRENCY: String(concurrency),
    WORKER_SHUTDOWN_TIMEOUT_MS: "5000",
    WORKER_HTTP_PORT: String(httpPort),
    LOG_LEVEL: "warning",
    ...env,
  }, { extraArgs: Deno.env.get("BENCH_WORKER_ARGS")?.split(" ").filter(Boolean), v8Flags });
  // Ready as an operator sees it: /readyz answers 200 once the consumer reads.
  const deadline = Date.now() + 60_000;
  while (true) {
    const ready = await fetch(`http://127.0.0.1:${httpPort}/readyz`)
      .then(async (response) => (await response.body?.cancel(), response.ok))
      .catch(() => false);
    if (ready) return worker;
    if (Date.now() > deadline) {
      await worker.kill("SIGKILL");
      throw new Error(`the worker did not start:\n${worker.output()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** What a run cost, per job. */
interface Costs {
  /** Redis commands processed (all clients: the bench's XADDs count too). */
  redisCommands: number;
  /** Requests Core received. */
  coreCalls: number;
  /** Requests the model received. */
  modelCalls: number;
  /** CPU time of the worker processes (ms). */
  workerCpuMs: number;
  /** CPU time of the bench process: fake model, Core emulator, publishing (ms). */
  benchCpuMs: number;
  /** CPU time of redis-server (ms). */
  redisCpuMs: number;
}

let coreCalls = 0;
core.setFault(() => {
  coreCalls++;
  return undefined;
});

async function redisInfo(): Promise<{ commands: number; cpuMs: number }> {
  const info = await client.info("all");
  const num = (name: string) => Number(new RegExp(`^${name}:([\\d.]+)`, "m").exec(info)?.[1] ?? 0);
  return {
    commands: num("total_commands_processed"),
    cpuMs: (num("used_cpu_user") + num("used_cpu_sys")) * 1000,
  };
}

async function snapshot(workers: WorkerProcess[]): Promise<Costs> {
  const redisNow = await redisInfo();
  let workerCpuMs = 0;
  for (const worker of workers) workerCpuMs += await processCpuMs(worker.pid);
  return {
    redisCommands: redisNow.commands,
    coreCalls,
    modelCalls: model.requests,
    workerCpuMs,
    benchCpuMs: await processCpuMs(Deno.pid),
    redisCpuMs: redisNow.cpuMs,
  };
}

function perJob(before: Costs, after: Costs, jobs: number): Costs {
  const out = {} as Costs;
  for (const key of Object.keys(before) as Array<keyof Costs>) {
    out[key] = round((after[key] - before[key]) / jobs, 2);
  }
  return out;
}

function describeCosts(c: Costs): string {
  return `per job: ${c.redisCommands} Redis commands, ${c.coreCalls} Core calls, ${c.modelCalls} model calls; CPU ms: worker ${c.workerCpuMs}, bench ${c.benchCpuMs}, redis ${c.redisCpuMs}`;
}

/** Seeds, publishes and waits for every job to end; resolves with the wall time and failures. */
async function runJobs(
  jobs: WorkloadJob[],
  worker: WorkerProcess | WorkerProcess[],
): Promise<{ elapsedMs: number; failed: number; costs: Costs }> {
  const workers = Array.isArray(worker) ? worker : [worker];
  seedCore(core, jobs);
  let ended = 0;
  let failed = 0;
  let lastProgress = Date.now();
  const done = Promise.withResolvers<void>();
  watchJobs(core, jobs.map((j) => j.token), (_token, status) => {
    ended++;
    lastProgress = Date.now();
    if (status === "failed") failed++;
    if (ended === jobs.length) done.resolve();
  });
  const stall = setInterval(() => {
    if (Date.now() - lastProgress > 60_000) {
      done.reject(
        new Error(
          `no job ended for 60 s (${ended}/${jobs.length}):\n${
            workers.map((w) => w.output()).join("\n")
          }`,
        ),
      );
    }
  }, 1_000);
  const before = await snapshot(workers);
  const started = performance.now();
  try {
    await publish(client, jobs);
    await done.promise;
  } finally {
    clearInterval(stall);
  }
  const elapsedMs = performance.now() - started;
  return { elapsedMs, failed, costs: perJob(before, await snapshot(workers), jobs.length) };
}

function bareRequests(jobs: WorkloadJob[]): BareRequest[] {
  const schemaOf: Record<string, string | undefined> = {
    image_tag: "image_tags",
    intent_classify: "intent_result",
    task_match: "task_match",
    email_extract: "email_events",
    followup: undefined,
  };
  return jobs.map((job) => ({
    schema: schemaOf[job.jobType],
    text: `${job.jobType} ${job.token} ${JSON.stringify(job.payload)}`,
    image: job.jobType === "image_tag" ? String(job.payload.image_path) : undefined,
  }));
}

/** Runs the bare client with `v8Flags` (default: the worker's, from the start task). */
async function runBare(
  spec: BareSpec,
  v8Flags = START_V8_FLAGS,
): Promise<{ elapsedMs: number; peakRss: number }> {
  const path = `${workDir}/bare-${crypto.randomUUID()}.json`;
  await Deno.writeTextFile(path, JSON.stringify(spec));
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-net",
      "--allow-read",
      ...(v8Flags ? [`--v8-flags=${v8Flags}`] : []),
      "--config",
      new URL("../deno.json", BENCH_DIR).pathname,
      new URL("bare_client.ts", BENCH_DIR).pathname,
      path,
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let peakRss = 0;
  const sampler = setInterval(async () => {
    peakRss = Math.max(peakRss, (await processMemory(child.pid)).peak);
  }, 25);
  const output = await child.output();
  clearInterval(sampler);
  if (!output.success) {
    throw new Error(`bare client failed: ${new TextDecoder().decode(output.stderr)}`);
  }
  const result = JSON.parse(new TextDecoder().decode(output.stdout).trim().split("\n").at(-1)!);
  return { elapsedMs: result.elapsedMs, peakRss };
}

function withWorker<T>(
  concurrency: number,
  run: (w: WorkerProcess) => Promise<T>,
  v8Flags = START_V8_FLAGS,
) {
  return withWorkers(1, concurrency, {}, ([worker]) => run(worker), v8Flags);
}

/** Runs `run` with `count` worker processes (replicas) started with `env`, then stops them. */
async function withWorkers<T>(
  count: number,
  concurrency: number,
  env: Record<string, string>,
  run: (workers: WorkerProcess[]) => Promise<T>,
  v8Flags = START_V8_FLAGS,
) {
  await client.flushall();
  resetState();
  const workers: WorkerProcess[] = [];
  try {
    for (let i = 0; i < count; i++) workers.push(await startWorker(concurrency, v8Flags, env));
    return await run(workers);
  } finally {
    for (const worker of workers) {
      const status = await worker.kill("SIGTERM");
      const logTo = Deno.env.get("BENCH_WORKER_LOG"); // e.g. with BENCH_WORKER_ARGS=--v8-flags=--trace-gc
      if (logTo) {
        const heading = `=== worker at concurrency ${concurrency}, ${describeFlags(v8Flags)}\n`;
        await Deno.writeTextFile(logTo, heading + worker.output(), { append: true });
      }
      if (!status.success) console.error(`worker exited with ${status.code}:\n${worker.output()}`);
    }
  }
}

/** What `run` resolves with, and the fake model's mean latency over the requests it made (ms). */
async function measuringLatency<T>(run: () => Promise<T>): Promise<[T, number]> {
  const [count, total] = [model.delayed, model.delayedMs];
  const result = await run();
  const mean = (model.delayedMs - total) / Math.max(1, model.delayed - count);
  return [result, round(mean, 2)];
}

const percentile = (values: number[], p: number) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
};
const log = (message: string) => console.error(`[bench] ${message}`);

// ---------------------------------------------------------------------------------- scenarios

/**
 * 1 and 5: model-bound efficiency, with the worker's memory; run with 1 MB images (as the issue
 * asks) and again with 1 KB ones, to tell the worker's cost from the cost of moving images; and
 * with 1 MB images under the comparison's V8 flags (`other`, rows 1V and 5V: by default V8's own
 * heap sizing, which is what the worker had before the start task sized it).
 */
async function modelBound(imageBytes: number, other = false): Promise<void> {
  const big = imageBytes >= 1024 * 1024;
  const v8Flags = other ? OTHER_V8_FLAGS : START_V8_FLAGS;
  const images = await writeImages(imageDir, 16, imageBytes);
  const concurrency = 32;
  latencyMs = 100;
  const jobs = workload(n(2000), { images });
  const warmup = workload(2 * concurrency, { images });
  const size = big ? `${imageBytes / (1024 * 1024)} MB` : `${imageBytes / 1024} KB`;
  log(
    `1. model-bound: ${jobs.length} jobs, 100 ms, concurrency ${concurrency}, ${size} images${
      other ? `, ${describeFlags(v8Flags)}` : ""
    }`,
  );
  const [{ result, memory, started, idle }, latency] = await measuringLatency(() =>
    withWorker(concurrency, async (worker) => {
      const started = await worker.memory();
      await runJobs(warmup, worker);
      const idle = await worker.memory();
      let sampled = 0;
      const sampler = setInterval(async () => {
        sampled = Math.max(sampled, (await worker.memory()).rss);
      }, 25);
      try {
        const result = await runJobs(jobs, worker);
        const memory = await worker.memory();
        return { result, memory: { ...memory, sampled }, started, idle };
      } finally {
        clearInterval(sampler);
      }
    }, v8Flags)
  );
  const [bare, bareLatency] = await measuringLatency(() =>
    bareThroughput(concurrency, warmup, jobs, v8Flags)
  );
  const ideal = concurrency / 0.1;
  const rate = jobs.length / (result.elapsedMs / 1000);
  const bareRate = jobs.length / (bare.elapsedMs / 1000);
  const suffix = other ? "V" : big ? "" : "b";
  const profile = other ? `, ${describeFlags(v8Flags)}` : "";
  if (only.has("1")) {
    rows.push({
      scenario: `1${suffix} model-bound`,
      figure: `throughput (100 ms model, c=32, 2000 users, ${size} images${profile})`,
      unit: "jobs/s",
      worker: round(rate),
      bare: round(bareRate),
      ideal,
      note:
        `${result.failed} failed; 20% image_tag with ${size} images; the fake model's mean latency ${latency} ms (bare client: ${bareLatency} ms); ${
          describeCosts(result.costs)
        }`,
    });
  }
  if (only.has("5")) {
    const mb = (bytes: number) => round(bytes / (1024 * 1024));
    const peak = Math.max(memory.peak, memory.sampled);
    rows.push({
      scenario: `5${suffix} memory`,
      figure: `peak RSS of the worker process in run 1${suffix} (${size} images${profile})`,
      unit: "MB",
      worker: mb(peak),
      bare: mb(bare.peakRss),
      note: `after start ${mb(started.rss)} MB, after warm-up ${
        mb(idle.rss)
      } MB; VmHWM of /proc/<pid>/status`,
    });
  }
}

/** 2: the worker's own overhead, model and Core answering at once. */
async function overhead(): Promise<void> {
  const images = await writeImages(imageDir, 8, 1024);
  latencyMs = 0;
  const runs: Array<[number, boolean]> = [[1, false], [8, false], [64, false], [64, true]];
  for (const [concurrency, other] of runs) {
    const v8Flags = other ? OTHER_V8_FLAGS : START_V8_FLAGS;
    const jobs = workload(n(5000), { images });
    const warmup = workload(200, { images });
    log(
      `2. overhead: ${jobs.length} jobs, instant model, concurrency ${concurrency}${
        other ? `, ${describeFlags(v8Flags)}` : ""
      }`,
    );
    const result = await withWorker(concurrency, async (worker) => {
      await runJobs(warmup, worker);
      return await runJobs(jobs, worker);
    }, v8Flags);
    const bare = await bareThroughput(concurrency, warmup, jobs, v8Flags);
    const rate = jobs.length / (result.elapsedMs / 1000);
    rows.push({
      scenario: other ? "2V overhead" : "2 overhead",
      figure: `throughput (instant model and Core, c=${concurrency}${
        other ? `, ${describeFlags(v8Flags)}` : ""
      })`,
      unit: "jobs/s",
      worker: round(rate),
      bare: round(jobs.length / (bare.elapsedMs / 1000)),
      note: `${result.failed} failed; ${describeCosts(result.costs)}`,
    });
  }
}

/** 3: pick-up latency of an idle worker, XADD to the model request. */
async function pickUp(): Promise<void> {
  latencyMs = 0;
  const count = n(200);
  const jobs = workload(count, { images: [], mix: ["followup"] });
  const warmup = workload(20, { images: [], mix: ["followup"] });
  log(`3. pick-up latency: ${count} followup jobs one by one`);
  const latencies = await withWorker(8, async (worker) => {
    await runJobs(warmup, worker);
    seedCore(core, jobs);
    const out: number[] = [];
    for (const job of jobs) {
      const ended = Promise.withResolvers<void>();
      watchJobs(core, [job.token], () => ended.resolve());
      const sent = clockMs();
      await client.xadd(...xaddArgs(job));
      await ended.promise;
      out.push(seen.get(job.token)! - sent);
      await new Promise((resolve) => setTimeout(resolve, 20)); // idle again
    }
    return out;
  });
  bareLatencies.length = 0;
  await runBare({
    url: model.url,
    concurrency: 1,
    warmup: bareRequests(warmup),
    requests: bareRequests(jobs),
    mode: "latency",
    gapMs: 20,
  });
  const p50 = percentile(latencies, 50);
  const p99 = percentile(latencies, 99);
  rows.push({
    scenario: "3 pick-up",
    figure: "p50 XADD → model request",
    unit: "ms",
    worker: round(p50, 2),
    bare: round(percentile(bareLatencies, 50), 2),
    note: "bare: SDK call → request at the server",
  });
  rows.push({
    scenario: "3 pick-up",
    figure: "p99 XADD → model request",
    unit: "ms",
    worker: round(p99, 2),
    bare: round(percentile(bareLatencies, 99), 2),
    note: `max ${round(Math.max(...latencies), 2)} ms over ${latencies.length} jobs`,
  });
}

/** 4: the cost of one job per user at a time. */
async function perUser(): Promise<void> {
  const images = await writeImages(imageDir, 8, 1024);
  latencyMs = 100;
  const users = 20;
  const concurrency = 32;
  // Round robin: every user has the same number of jobs, so the ideal is reachable.
  const jobs = workload(n(2000), { images, users, balanced: true });
  const warmup = workload(40, { images, users, balanced: true });
  log(`4. per-user ordering: ${jobs.length} jobs over ${users} users, 100 ms, c=${concurrency}`);
  const result = await withWorker(concurrency, async (worker) => {
    await runJobs(warmup, worker);
    return await runJobs(jobs, worker);
  });
  const bare = await runBare({
    url: model.url,
    concurrency: users,
    warmup: bareRequests(warmup),
    requests: bareRequests(jobs),
    mode: "throughput",
  });
  const ideal = Math.min(users, concurrency) / 0.1;
  const rate = jobs.length / (result.elapsedMs / 1000);
  rows.push({
    scenario: "4 per-user order",
    figure: `throughput (${users} users, 100 ms model, c=${concurrency})`,
    unit: "jobs/s",
    worker: round(rate),
    bare: round(jobs.length / (bare.elapsedMs / 1000)),
    ideal,
    note: `${result.failed} failed; bare client at concurrency ${users}; ${
      describeCosts(result.costs)
    }`,
  });
}

/**
 * 6: three replicas sharing one model budget (`LLM_MAX_IN_FLIGHT=32`, each at
 * `WORKER_CONCURRENCY=32`), 100 ms model, 1 MB images as in run 1: what sharing the slots through
 * Redis costs, against the bare client at concurrency 32.
 */
async function sharedBudget(): Promise<void> {
  const images = await writeImages(imageDir, 16, 1024 * 1024);
  const replicas = 3;
  const budget = 32;
  latencyMs = 100;
  const jobs = workload(n(2000), { images });
  const warmup = workload(2 * budget, { images });
  log(
    `6. shared budget: ${jobs.length} jobs, 100 ms, ${replicas} replicas sharing ${budget} slots`,
  );
  const env = { LLM_MAX_IN_FLIGHT: String(budget) };
  const [{ result, most }, latency] = await measuringLatency(() =>
    withWorkers(replicas, budget, env, async (workers) => {
      await runJobs(warmup, workers);
      model.maxInFlight = 0;
      const result = await runJobs(jobs, workers);
      return { result, most: model.maxInFlight };
    })
  );
  const [bare, bareLatency] = await measuringLatency(() =>
    bareThroughput(budget, warmup, jobs, START_V8_FLAGS)
  );
  rows.push({
    scenario: "6 shared budget",
    figure: `throughput (${replicas} replicas sharing LLM_MAX_IN_FLIGHT=${budget}, 100 ms model, ` +
      "2000 users, 1 MB images)",
    unit: "jobs/s",
    worker: round(jobs.length / (result.elapsedMs / 1000)),
    bare: round(jobs.length / (bare.elapsedMs / 1000)),
    ideal: budget / 0.1,
    note:
      `${result.failed} failed; the model's most requests in flight ${most}; the fake model's mean latency ${latency} ms (bare client: ${bareLatency} ms); ${
        describeCosts(result.costs)
      } (CPU of all three workers)`,
  });
}

// ----------------------------------------------------------------------------------- the run

const began = performance.now();
const gauge = await startSpeedGauge();
try {
  if (only.has("1") || only.has("5")) {
    await modelBound(1024 * 1024);
    await modelBound(1024);
    await modelBound(1024 * 1024, true);
  }
  if (only.has("2")) await overhead();
  if (only.has("3")) await pickUp();
  if (only.has("4")) await perUser();
  if (only.has("6")) await sharedBudget();
  const info = await machineInfo();
  const speed = await gauge.finish();
  const results: BenchResults = {
    date: new Date().toISOString(),
    machine: info,
    speed,
    scale,
    durationS: round((performance.now() - began) / 1000),
    rows,
  };
  console.log(`\nLLM worker benchmark: ${runLine(results)}\n`);
  console.log(resultsTable(rows));
  for (const row of rows) {
    if (row.note) console.log(`- ${row.scenario}, ${row.figure}: ${row.note}`);
  }
  console.log(`\n(${results.durationS} s)`);
  if (scale === 1 && [...only].sort().join(",") === ALL) {
    await Deno.writeTextFile(RESULTS, `${JSON.stringify(results, null, 2)}\n`);
    await renderReadmes(results);
    console.log("Wrote bench/results.json and rendered bench/README.md and README.md from it.");
  } else {
    await Deno.writeTextFile(
      new URL("results.json.tmp", BENCH_DIR),
      `${JSON.stringify(results, null, 2)}\n`,
    );
  }
} finally {
  client.disconnect();
  await model.close();
  await core.close();
  await redis.close();
  await Deno.remove(imageDir, { recursive: true }).catch(() => {});
  await Deno.remove(workDir, { recursive: true }).catch(() => {});
}
