/**
 * Prometheus metrics of one worker, with prom-client: counters and histograms fed by the
 * consumer's and the model client's events, and gauges read when `/metrics` is scraped.
 *
 * Every metric of the worker is named `llm_worker_*`; each worker has its own registry, so several
 * workers in one process (tests) never mix their numbers. Every known label set of a counter
 * (job types, outcomes, streams, models) is there from the start at 0, so `increase()` sees the
 * first event after a restart. The registry also holds prom-client's default process metrics
 * (`process_cpu_seconds_total`, `process_start_time_seconds`, ...; see {@linkcode WorkerMetrics}).
 *
 * @module
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import type { Redis } from "ioredis";
import { type ConsumerEvents, ENDED_OUTCOMES, type JobOutcome } from "./consumer.ts";
import type { Job } from "./job.ts";
import type { CompletionEvent } from "./llm.ts";
import { REPAIRS } from "./accept.ts";
import type { RepairEvent } from "./model.ts";
import { DELAY_REASONS, type DelayReason } from "./request_gate.ts";
import { GROUP, JOB_STREAMS, STREAM_OF } from "./streams.ts";

/** What the gauges read at scrape time. */
export interface MetricsSources {
  /** Jobs running now. */
  jobsInFlight(): number;
  /** Entries held in memory (queued behind their user, running or waiting for a retry). */
  jobsHeld(): number;
  /** Model requests in flight now. */
  modelRequestsInFlight(): number;
  /** Whether any model server is considered available (else jobs wait). */
  modelAvailable(): boolean;
  /** Model requests waiting for a slot shared by every replica (`LLM_MAX_IN_FLIGHT`). */
  modelBudgetWaiting?(): number;
  /** Each configured model server (`primary`, `fallback`) and whether it is considered up. */
  modelServers?(): Record<string, boolean>;
  /** The connection used for `XPENDING`; skipped while it is not ready. */
  redis?: Redis;
  /** The streams read: pending entries and dead letters per stream (default: the five). */
  streams?: readonly string[];
  /** The job types, whose counters start at 0 (default: the five). */
  jobTypes?: readonly string[];
  /** The model names, whose token counters start at 0 (default: none). */
  models?: readonly string[];
  /** How long one scrape waits for `XPENDING` (ms, default 1000). */
  pendingTimeoutMs?: number;
}

/** Job durations: from a quick failure to a slow vision model. */
const JOB_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
/** Model request durations. */
const MODEL_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120];

/** The kinds of `llm_worker_retries_total`, by the outcome of the run that will be tried again. */
const RETRY_KINDS: Partial<Record<JobOutcome, string>> = {
  retry_invalid: "invalid",
  retry_unavailable: "unavailable",
  retry_error: "error",
  abandoned: "abandoned",
  lease_lost: "lease_lost",
};

/**
 * prom-client defaults that Deno cannot measure under the worker's permissions: left out rather
 * than reading 0 or NaN. Files under /proc/self open only with --allow-all (resident memory is
 * read from `Deno.memoryUsage()` instead); Deno's event-loop delay monitor and GC entries report
 * nothing.
 */
const UNMEASURED_DEFAULTS = [
  "process_resident_memory_bytes",
  "process_virtual_memory_bytes",
  "process_heap_bytes",
  "process_open_fds",
  "process_max_fds",
  "nodejs_gc_duration_seconds",
];

/**
 * The worker's metrics. Hand {@linkcode WorkerMetrics.events} to the consumer and
 * {@linkcode WorkerMetrics.onCompletion} to the model client; serve
 * {@linkcode WorkerMetrics.metrics} on `/metrics`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const metrics = new WorkerMetrics({
 *   jobsInFlight: () => 2,
 *   jobsHeld: () => 3,
 *   modelRequestsInFlight: () => 1,
 *   modelAvailable: () => true,
 * });
 * metrics.onCompletion({
 *   model: "mistral",
 *   durationMs: 812,
 *   outcome: "ok",
 *   jobType: "followup",
 *   server: "primary",
 * });
 * const text = await metrics.metrics();
 * assert.match(text, /llm_worker_jobs_in_flight 2/);
 * assert.match(text, /llm_worker_model_request_duration_seconds_count\{.*model="mistral".*\} 1/);
 * ```
 */
export class WorkerMetrics {
  /** The registry holding every metric of this worker. */
  readonly registry: Registry = new Registry();
  /** Observers to give the consumer. */
  readonly events: ConsumerEvents;
  readonly #jobs: Counter<"job_type" | "outcome">;
  readonly #jobDuration: Histogram<"job_type">;
  readonly #modelDuration: Histogram<"job_type" | "model" | "server" | "outcome">;
  readonly #tokens: Counter<"model" | "job_type" | "kind">;
  readonly #retries: Counter<"job_type" | "kind">;
  readonly #deadLettered: Counter<"stream">;
  readonly #repaired: Counter<"job_type" | "repair">;
  readonly #delayed: Counter<"reason">;

  /** Registers every metric; the gauges read `sources` when scraped. */
  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    this.#jobs = new Counter({
      name: "llm_worker_jobs_total",
      help:
        "Jobs ended, by job type and outcome (completed; failed; unrecorded: Core refused the final update; skipped: already ended). Runs tried again are in llm_worker_retries_total.",
      labelNames: ["job_type", "outcome"],
      registers,
    });
    this.#jobDuration = new Histogram({
      name: "llm_worker_job_duration_seconds",
      help: "Duration of one run of a job (skipped runs left out), by job type.",
      labelNames: ["job_type"],
      buckets: JOB_BUCKETS,
      registers,
    });
    this.#modelDuration = new Histogram({
      name: "llm_worker_model_request_duration_seconds",
      help:
        "Duration of one model request, by job type, model, server (primary, fallback) and outcome (ok, unavailable, rejected, aborted).",
      labelNames: ["job_type", "model", "server", "outcome"],
      buckets: MODEL_BUCKETS,
      registers,
    });
    this.#tokens = new Counter({
      name: "llm_worker_model_tokens_total",
      help: "Tokens the model servers reported, by model, job type and kind (prompt, completion).",
      labelNames: ["model", "job_type", "kind"],
      registers,
    });
    this.#retries = new Counter({
      name: "llm_worker_retries_total",
      help:
        "Job runs that will be tried again, by job type and kind (invalid: the model's answer was unusable; unavailable: the model server or Core was down; error: an unexpected error, e.g. Redis lost; abandoned: cut short by a stop; lease_lost: another replica took the user over).",
      labelNames: ["job_type", "kind"],
      registers,
    });
    this.#deadLettered = new Counter({
      name: "llm_worker_dead_lettered_total",
      help: "Malformed entries copied to llm:dead, by the stream they came from.",
      labelNames: ["stream"],
      registers,
    });
    this.#repaired = new Counter({
      name: "llm_worker_answers_repaired_total",
      help:
        "Model answers used after mending, by job type and repair (json_in_text, json_syntax, missing_field, enum_spelling, ...; one answer counts once per kind of repair).",
      labelNames: ["job_type", "repair"],
      registers,
    });
    this.#delayed = new Counter({
      name: "llm_worker_model_requests_delayed_total",
      help:
        "Model requests that waited before being sent, by reason (rate_limit: LLM_MAX_REQUESTS_PER_MINUTE; paused: a 429 with Retry-After seen by any replica).",
      labelNames: ["reason"],
      registers,
    });
    for (const reason of DELAY_REASONS) this.#delayed.inc({ reason }, 0);
    const jobTypes = sources.jobTypes ?? Object.keys(STREAM_OF);
    for (const job_type of jobTypes) {
      for (const outcome of ENDED_OUTCOMES) this.#jobs.inc({ job_type, outcome }, 0);
      for (const kind of Object.values(RETRY_KINDS)) this.#retries.inc({ job_type, kind }, 0);
      for (const repair of REPAIRS) this.#repaired.inc({ job_type, repair }, 0);
    }
    for (const model of sources.models ?? []) {
      for (const job_type of jobTypes) {
        for (const kind of ["prompt", "completion"]) this.#tokens.inc({ model, job_type, kind }, 0);
      }
    }
    for (const stream of sources.streams ?? JOB_STREAMS) this.#deadLettered.inc({ stream }, 0);
    collectDefaultMetrics({ register: this.registry });
    for (const name of UNMEASURED_DEFAULTS) this.registry.removeSingleMetric(name);
    for (const name of this.registry.getMetricsAsArray().map((m) => m.name)) {
      if (name.startsWith("nodejs_eventloop_lag")) this.registry.removeSingleMetric(name);
    }
    new Gauge({
      name: "process_resident_memory_bytes",
      help: "Resident memory size in bytes.",
      registers,
      collect() {
        this.set(Deno.memoryUsage().rss);
      },
    });
    new Gauge({
      name: "llm_worker_jobs_in_flight",
      help: "Jobs running now.",
      registers,
      collect() {
        this.set(sources.jobsInFlight());
      },
    });
    new Gauge({
      name: "llm_worker_jobs_held",
      help: "Entries held in memory: queued behind their user's earlier job, running, or waiting.",
      registers,
      collect() {
        this.set(sources.jobsHeld());
      },
    });
    new Gauge({
      name: "llm_worker_model_requests_in_flight",
      help: "Model requests in flight now (at most WORKER_CONCURRENCY).",
      registers,
      collect() {
        this.set(sources.modelRequestsInFlight());
      },
    });
    new Gauge({
      name: "llm_worker_model_budget_waiting",
      help:
        "Model requests of this replica waiting for one of the LLM_MAX_IN_FLIGHT slots all replicas share (0 without it).",
      registers,
      collect() {
        this.set(sources.modelBudgetWaiting?.() ?? 0);
      },
    });
    new Gauge({
      name: "llm_worker_model_unavailable",
      help: "1 while the model server is considered unavailable (jobs wait), else 0.",
      registers,
      collect() {
        this.set(sources.modelAvailable() ? 0 : 1);
      },
    });
    if (sources.modelServers) {
      const servers = sources.modelServers;
      new Gauge({
        name: "llm_worker_model_server_up",
        help:
          "1 while the model server (primary, fallback) is considered up, else 0; requests go to the first one up.",
        labelNames: ["server"],
        registers,
        collect() {
          for (const [server, up] of Object.entries(servers())) this.set({ server }, up ? 1 : 0);
        },
      });
    }
    new Gauge({
      name: "llm_worker_memory_bytes",
      help:
        "Memory of the worker's process, by kind: rss (resident), heap_total and heap_used (V8's heap), external (ArrayBuffers and other memory outside V8's heap that V8 accounts for).",
      labelNames: ["kind"],
      registers,
      collect() {
        const memory = Deno.memoryUsage();
        this.set({ kind: "rss" }, memory.rss);
        this.set({ kind: "heap_total" }, memory.heapTotal);
        this.set({ kind: "heap_used" }, memory.heapUsed);
        this.set({ kind: "external" }, memory.external);
      },
    });
    const streams = sources.streams ?? JOB_STREAMS;
    const timeoutMs = sources.pendingTimeoutMs ?? 1000;
    new Gauge({
      name: "llm_worker_pending_entries",
      help:
        "Entries delivered to the group but not acknowledged yet (XPENDING), per stream, for all consumers. Absent while Redis does not answer.",
      labelNames: ["stream"],
      registers,
      async collect() {
        this.reset();
        const redis = sources.redis;
        if (!redis || redis.status !== "ready") return;
        const counts = await pendingCounts(redis, streams, timeoutMs);
        for (const [stream, count] of Object.entries(counts)) this.set({ stream }, count);
      },
    });

    this.events = {
      jobEnded: (job: Job, outcome: JobOutcome, durationMs: number) => {
        const kind = RETRY_KINDS[outcome];
        if (kind) this.#retries.inc({ job_type: job.jobType, kind });
        else this.#jobs.inc({ job_type: job.jobType, outcome });
        if (outcome !== "skipped" && outcome !== "abandoned" && outcome !== "lease_lost") {
          this.#jobDuration.observe({ job_type: job.jobType }, durationMs / 1000);
        }
      },
      deadLettered: (stream: string) => {
        this.#deadLettered.inc({ stream });
      },
    };
  }

  /** Records one model request (give this to the model client's `onCompletion`). */
  onCompletion(event: CompletionEvent): void {
    const job_type = event.jobType ?? "none";
    this.#modelDuration.observe(
      { job_type, model: event.model, server: event.server, outcome: event.outcome },
      event.durationMs / 1000,
    );
    if (event.completion) {
      const { promptTokens, completionTokens } = event.completion;
      this.#tokens.inc({ model: event.model, job_type, kind: "prompt" }, promptTokens);
      this.#tokens.inc({ model: event.model, job_type, kind: "completion" }, completionTokens);
    }
  }

  /** Counts an answer used after mending (give this to the model gateway's `onRepair`). */
  onRepair(event: RepairEvent): void {
    const jobType = event.jobType ?? "none";
    for (const repair of event.repairs) this.#repaired.inc({ job_type: jobType, repair });
  }

  /** Counts a model request that waited at the gate (give this to the gate's `onDelay`). */
  onModelDelay(reason: DelayReason): void {
    this.#delayed.inc({ reason });
  }

  /** The Content-Type of {@linkcode WorkerMetrics.metrics}'s text. */
  get contentType(): string {
    return this.registry.contentType;
  }

  /** Every metric in Prometheus' text format. */
  metrics(): Promise<string> {
    return this.registry.metrics();
  }
}

/**
 * Pending entries per stream (`XPENDING <stream> llm-worker-group`), or `{}` when Redis does not
 * answer within `timeoutMs`. A stream without the group yet counts 0.
 */
export async function pendingCounts(
  redis: Redis,
  streams: readonly string[],
  timeoutMs: number,
): Promise<Record<string, number>> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), timeoutMs);
  });
  const query = Promise.all(streams.map(async (stream) => {
    try {
      const [count] = await redis.xpending(stream, GROUP) as [number];
      return [stream, Number(count) || 0] as const;
    } catch (error) {
      if (String((error as Error)?.message).includes("NOGROUP")) return [stream, 0] as const;
      throw error;
    }
  }));
  try {
    const result = await Promise.race([query, timeout]);
    return result ? Object.fromEntries(result) : {};
  } catch {
    return {};
  } finally {
    clearTimeout(timer);
    query.catch(() => {}); // a late failure after the timeout is of no interest
  }
}
