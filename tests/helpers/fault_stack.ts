/**
 * The stack of the fault-injection suite: a private Redis, the fake model (`testing/fake_model.ts`),
 * the Core emulator with a fault hook, and real worker processes started as `deno task start`
 * starts one; plus the final audit: every job ended in Core, nothing pending, no effect or
 * notification twice.
 *
 * Every job enqueued by the stack has its own user, so each notification can be traced back to its
 * job (`llm_failure` carries no job id); jobs that share users are audited by the job token each
 * result notification carries.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { type CoreEmulator, startCoreEmulator } from "../../testing/core_emulator.ts";
import { closeRedis, createRedis } from "../../lib/redis.ts";
import { GROUP, JOB_STREAMS, NOTIFY_STREAM } from "../../lib/streams.ts";
import { type FakeChatRequest, type FakeModel, startFakeModel } from "../../testing/fake_model.ts";
import {
  type JobMix,
  makeWorkload,
  publish,
  seedCore,
  type WorkloadJob,
  writeImages,
} from "../../testing/workload.ts";
import { pollUntil } from "./poll.ts";
import { type PrivateRedis, startRedis } from "../../testing/redis_server.ts";
import { startWorkerProcess, type WorkerProcess } from "../../testing/worker_process.ts";

/** Options of {@linkcode startFaultStack}. */
export interface FaultStackOptions {
  /** Redis with append-only persistence (so a restart keeps the data). */
  appendOnly?: boolean;
  /** Model latency (ms), fixed or per request. */
  latencyMs?: number | ((request: FakeChatRequest) => number);
  /** Told about every chat request as it arrives (the model's own call log). */
  onRequest?: (request: FakeChatRequest) => void;
  /** Told when each chat request is answered, on the shared clock. */
  onAnswered?: (request: FakeChatRequest, answeredAt: number) => void;
  /** The model's answer (default: a valid one, `testing/fake_model.ts`). */
  answer?: (request: FakeChatRequest) => string;
  /** Settings for every worker (on top of the stack's). */
  env?: Record<string, string>;
  /**
   * Delay of Core's reads and of `PATCH /llm_jobs` (ms), through a proxy in front of the
   * emulator: it widens the windows between an effect, Core's PATCH and the XACK, where a crash
   * is most likely to repeat something. The POSTs that make effects are not delayed: a crash
   * while one is in flight (sent, not yet answered) can repeat that effect whatever the worker
   * does, because Core takes no idempotency key; delaying them would only widen that window.
   */
  coreLatencyMs?: () => number;
}

/** The figures of one case, for the suite's summary. */
export interface CaseFigures {
  /** The case. */
  name: string;
  /** Jobs published. */
  jobs: number;
  /** Faults injected (kills, restarts, 503s, nonsense answers, ...). */
  faults: number;
  /** Jobs not ended in Core, entries left pending, result notifications missing. */
  lost: number;
  /** Effects and notifications made more than once. */
  duplicated: number;
  /** Jobs that ended `failed` (allowed: e.g. a model that kept answering nonsense). */
  failed: number;
  /** Wall time of the case (s), for information only. */
  seconds: number;
  /** What went wrong, one line each. */
  problems: string[];
}

/** A request to Core as the fault injection sees it. */
export interface CoreRequest {
  /** HTTP method. */
  method: string;
  /** Path, e.g. `/events`. */
  path: string;
  /** The body as text (`""` for none). */
  body: string;
}

/** A running fault stack. */
export interface FaultStack {
  /** The private Redis. */
  redis: PrivateRedis;
  /** The test's own connection. */
  client: Redis;
  /** The Core emulator. */
  core: CoreEmulator;
  /** The fake model (replaced by {@linkcode FaultStack.restartModel}). */
  model: FakeModel;
  /** Image files for image_tag jobs. */
  images: string[];
  /** Injects a Core fault: return true to answer this request 503. */
  setCoreFault(inject: ((request: CoreRequest) => boolean) | undefined): void;
  /** Core requests answered 503 so far. */
  coreFaults(): number;
  /** The proxy between the workers and Core (`holdPatches`, `held`). */
  coreProxy: CoreProxy;
  /**
   * Holds the model's answers until no Core request has come for `quietMs`: every job is then
   * inside a model call, waiting for a model slot or waiting for a retry, none is between an
   * effect and its record. The model stays paused: {@linkcode FakeModel.resume} it.
   */
  holdInsideModelCalls(quietMs?: number): Promise<void>;
  /** Starts a worker process (consumer name `name`). */
  startWorker(name: string, env?: Record<string, string>): WorkerProcess;
  /** Closes the model server (connection refused from now on). */
  stopModel(): Promise<void>;
  /** Starts a model server again on the same port. */
  restartModel(): void;
  /** Builds, seeds and publishes `count` jobs; each job has its own user. */
  enqueue(count: number, mix?: JobMix): Promise<WorkloadJob[]>;
  /** Waits until every job has ended in Core, or `timeoutMs` passed; true when all ended. */
  waitForEnd(jobs: readonly WorkloadJob[], timeoutMs: number): Promise<boolean>;
  /** Waits until `check` holds (polled every 20 ms), at most `timeoutMs`; its last value. */
  waitFor(check: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean>;
  /** Audits the end state (see the module doc). */
  audit(name: string, jobs: readonly WorkloadJob[], faults: number): Promise<CaseFigures>;
  /** Stops every worker (SIGTERM, then SIGKILL), the servers and Redis. */
  close(): Promise<void>;
}

const PNG_HEAD = 8;

/** Starts a fault stack. */
export async function startFaultStack(options: FaultStackOptions = {}): Promise<FaultStack> {
  const started = performance.now();
  const redis = await startRedis({ appendOnly: options.appendOnly });
  const client = createRedis(redis.url, { eager: true });
  client.on("error", () => {}); // Redis is restarted on purpose
  const core = startCoreEmulator({ recordRequests: false });
  const proxy = startCoreProxy(core.url, options.coreLatencyMs);
  const modelOptions = {
    latencyMs: options.latencyMs,
    answer: options.answer,
    onRequest: options.onRequest,
    onAnswered: options.onAnswered,
  };
  let model = startFakeModel(modelOptions);
  const port = model.port;
  const imageDir = await Deno.makeTempDir({ prefix: "llm-worker-faults-" });
  const images = await writeImages(imageDir, 4, 64 + PNG_HEAD);
  const workers: WorkerProcess[] = [];
  let nextToken = 1;
  let injected = 0;
  let inject: ((request: CoreRequest) => boolean) | undefined;
  /** Tag upserts Core really made, per memory. */
  const tagPosts = new Map<string, number>();
  let lastCoreRequest = performance.now();
  proxy.fault = (request) => {
    lastCoreRequest = performance.now();
    if (!inject?.(request)) return undefined;
    injected++;
    return Response.json({ detail: "injected fault" }, { status: 503 });
  };
  core.setFault((request) => {
    lastCoreRequest = performance.now();
    const tags = /^\/memories\/([^/]+)\/tags$/.exec(request.path);
    if (request.method === "POST" && tags) {
      tagPosts.set(tags[1], (tagPosts.get(tags[1]) ?? 0) + 1);
    }
    return undefined;
  });

  const waitFor = pollUntil;
  const ended = (job: WorkloadJob) =>
    ["completed", "failed"].includes(core.state.jobs.get(job.token)?.status ?? "");

  const pending = async () => {
    let total = 0;
    for (const stream of JOB_STREAMS) {
      const reply = await client.xpending(stream, GROUP).catch(() => [0]) as [number];
      total += Number(reply[0] ?? 0);
    }
    return total;
  };

  const stack: FaultStack = {
    redis,
    client,
    core,
    get model() {
      return model;
    },
    images,
    setCoreFault: (next) => inject = next,
    coreFaults: () => injected,
    coreProxy: proxy,
    async holdInsideModelCalls(quietMs = 300) {
      model.pause();
      const quiet = await waitFor(() => performance.now() - lastCoreRequest > quietMs, 30_000);
      if (!quiet) throw new Error("Core never went quiet with the model paused");
    },
    startWorker(name, env = {}) {
      const worker = startWorkerProcess({
        REDIS_URL: redis.url,
        LLM_BASE_URL: model.url,
        CORE_API_URL: proxy.url,
        IMAGE_STORAGE_PATH: imageDir,
        WORKER_CONCURRENCY: "8",
        WORKER_SHUTDOWN_TIMEOUT_MS: "3000",
        // A killed worker's users go to another within 2 s and a second, not 31 s.
        WORKER_LEASE_MS: "2000",
        LOG_LEVEL: "error",
        ...options.env,
        ...env,
        WORKER_CONSUMER_NAME: name,
      });
      workers.push(worker);
      return worker;
    },
    stopModel: () => model.close(),
    restartModel() {
      model = startFakeModel({ ...modelOptions, port });
    },
    async enqueue(count, mix) {
      const jobs = makeWorkload({
        count,
        users: 1_000_000,
        distinctUsers: true,
        firstToken: nextToken,
        seed: nextToken,
        images,
        mix,
      });
      // One user per job, distinct across the stack's batches.
      for (const job of jobs) job.userId = 1000 + Number(job.token.slice(1));
      nextToken += count;
      seedCore(core, jobs);
      await publish(client, jobs);
      return jobs;
    },
    waitForEnd: (jobs, timeoutMs) => waitFor(() => jobs.every(ended), timeoutMs),
    waitFor,
    async audit(name, jobs, faults) {
      const problems: string[] = [];
      let lost = 0;
      let duplicated = 0;
      let failed = 0;
      // XACK follows Core's PATCH: give it a moment before reading the pending lists.
      await waitFor(async () => await pending() === 0, 10_000);
      const left = await pending();
      if (left > 0) {
        lost += left;
        problems.push(`${left} entr(y/ies) still pending in ${GROUP}`);
      }
      const notifications = (await client.xrange(NOTIFY_STREAM, "-", "+")).map(([, fields]) =>
        JSON.parse(fields[1]) as { user_id: number; message_type: string; content: unknown }
      );
      // With a user per job a notification is traced by its user; with users shared by several
      // jobs, by the job token in its content (results always carry it).
      const shared = new Set(jobs.map((job) => job.userId)).size < jobs.length;
      const byUser = Map.groupBy(
        notifications,
        (n): string | number | undefined =>
          shared ? /J\d+/.exec(JSON.stringify(n.content))?.[0] : n.user_id,
      );
      const memories = Map.groupBy(
        [...core.state.memories.values()].filter((m) => m.content?.startsWith("Note J")),
        (m) => /J\d+/.exec(m.content ?? "")?.[0],
      );
      const events = Map.groupBy(
        [...core.state.events.values()],
        (e) => /J\d+/.exec(e.description)?.[0],
      );
      for (const job of jobs) {
        const status = core.state.jobs.get(job.token)?.status;
        if (status !== "completed" && status !== "failed") {
          lost++;
          problems.push(`${job.token} (${job.jobType}) is ${status} in Core`);
          continue;
        }
        if (status === "failed") failed++;
        const sent = byUser.get(shared ? job.token : job.userId) ?? [];
        const waiting = sent.filter((n) =>
          n.message_type === "llm_failure" && /unavailable/.test(JSON.stringify(n.content))
        );
        const finals = sent.filter((n) => !waiting.includes(n));
        const wanted = status === "completed" ? RESULT_TYPE[job.jobType] : "llm_failure";
        const right = finals.filter((n) => n.message_type === wanted).length;
        const count = status === "completed" && job.jobType === "email_extract" ? EMAIL_EVENTS : 1;
        if (right < count) {
          lost += count - right;
          problems.push(
            `${job.token} (${job.jobType}, ${status}): ${right} ${wanted} notification(s)`,
          );
        }
        if (right > count) {
          duplicated += right - count;
          problems.push(`${job.token} (${job.jobType}): ${right} ${wanted} notifications`);
        }
        if (finals.length > right) {
          duplicated += finals.length - right;
          problems.push(`${job.token}: unexpected ${JSON.stringify(finals)}`);
        }
        if (waiting.length > 1) {
          duplicated += waiting.length - 1;
          problems.push(`${job.token}: told ${waiting.length} times that the model is down`);
        }
        const once = (what: string, count: number, wanted = 1) => {
          const expected = status === "completed" ? wanted : Math.min(count, wanted);
          if (count > expected) {
            duplicated += count - expected;
            problems.push(`${job.token} (${job.jobType}): ${count} ${what}`);
          } else if (count < expected) {
            lost += expected - count;
            problems.push(`${job.token} (${job.jobType}, ${status}): no ${what}`);
          }
        };
        if (job.jobType === "intent_classify") {
          once("memories", memories.get(job.token)?.length ?? 0);
        }
        if (job.jobType === "email_extract") {
          once("events", events.get(job.token)?.length ?? 0, EMAIL_EVENTS);
        }
        if (job.jobType === "image_tag") once("tag upserts", tagPosts.get(job.memoryId!) ?? 0);
      }
      return {
        name,
        jobs: jobs.length,
        faults,
        lost,
        duplicated,
        failed,
        seconds: Math.round((performance.now() - started) / 100) / 10,
        problems,
      };
    },
    async close() {
      for (const worker of workers) await stopWorker(worker);
      await closeRedis(client);
      await model.close().catch(() => {});
      await proxy.shutdown();
      await core.close();
      await redis.close();
      await Deno.remove(imageDir, { recursive: true }).catch(() => {});
    },
  };
  return stack;
}

/** The proxy in front of the Core emulator (see `startCoreProxy`). */
export interface CoreProxy {
  /** Its base URL (the workers' `CORE_API_URL`). */
  url: string;
  /** While true, `PATCH /llm_jobs/...` is applied in Core but its answer is held back. */
  holdPatches: boolean;
  /** Answers held back now. */
  held: number;
  /** Asked before each request is passed on: a `Response` answers it instead. */
  fault?: (request: CoreRequest) => Response | undefined;
  /** Lets everything go and stops. */
  shutdown(): Promise<void>;
}

/**
 * An HTTP proxy to `target`: it delays GETs and PATCHes by `delayMs()` and can hold back the
 * answers of `PATCH /llm_jobs` (the job's end is in Core, the worker does not know yet).
 */
function startCoreProxy(target: string, delayMs?: () => number): CoreProxy {
  let release = Promise.withResolvers<void>();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const url = new URL(req.url);
    const body = req.method === "GET" ? undefined : await req.arrayBuffer();
    const wait = req.method === "POST" ? 0 : delayMs?.() ?? 0;
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    const injected = proxy.fault?.({
      method: req.method,
      path: url.pathname,
      body: body ? new TextDecoder().decode(body) : "",
    });
    if (injected) return injected;
    const response = await fetch(`${target}${url.pathname}${url.search}`, {
      method: req.method,
      headers: req.headers,
      body,
    });
    const answer = await response.arrayBuffer();
    if (proxy.holdPatches && req.method === "PATCH" && url.pathname.startsWith("/llm_jobs/")) {
      proxy.held++;
      await release.promise;
      proxy.held--;
    }
    return new Response(answer, { status: response.status, headers: response.headers });
  });
  const proxy: CoreProxy = {
    url: `http://127.0.0.1:${server.addr.port}`,
    holdPatches: false,
    held: 0,
    shutdown: async () => {
      release.resolve();
      await server.shutdown();
    },
  };
  Object.defineProperty(proxy, "holdPatches", {
    get: () => holding,
    set: (on: boolean) => {
      holding = on;
      if (!on) {
        release.resolve();
        release = Promise.withResolvers<void>();
      }
    },
  });
  let holding = false;
  return proxy;
}

/** Events the fake model finds in every email (`testing/fake_model.ts`). */
const EMAIL_EVENTS = 2;

/** The notification a completed job of each type sends (the bench's answers always match). */
const RESULT_TYPE: Record<WorkloadJob["jobType"], string> = {
  image_tag: "llm_image_tag_result",
  intent_classify: "llm_intent_result",
  followup: "llm_followup_result",
  task_match: "llm_task_match_result",
  email_extract: "event_confirmation",
};

/** Stops a worker: SIGTERM, and SIGKILL when it has not exited within 10 s. */
export async function stopWorker(worker: WorkerProcess): Promise<Deno.CommandStatus> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<void>((resolve) => timer = setTimeout(resolve, 10_000));
  const status = worker.kill("SIGTERM");
  await Promise.race([status, late]);
  clearTimeout(timer);
  return await worker.kill("SIGKILL");
}

/** One line of the suite's summary. */
export function summaryLine(figures: CaseFigures): string {
  return `${figures.name.padEnd(44)} jobs ${String(figures.jobs).padStart(5)}  faults ${
    String(figures.faults).padStart(5)
  }  lost ${figures.lost}  duplicated ${figures.duplicated}  (failed ${figures.failed}, ${figures.seconds} s)`;
}
