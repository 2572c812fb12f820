/**
 * Prometheus metrics of one worker, with prom-client: counters and histograms fed by the
 * consumer's and the model client's events, and gauges read when `/metrics` is scraped.
 *
 * Every metric is named `llm_worker_*`; each worker has its own registry, so several workers in
 * one process (tests) never mix their numbers.
 *
 * @module
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { Redis } from "ioredis";
import type { ConsumerEvents, JobOutcome } from "./consumer.ts";
import type { Job } from "./job.ts";
import type { CompletionEvent } from "./llm.ts";
import { REPAIRS } from "./accept.ts";
import type { RepairEvent } from "./model.ts";
import { GROUP, JOB_STREAMS, STREAM_OF } from "./streams.ts";

/** What the gauges read at scrape time. */
export interface MetricsSources {
  /** Jobs running now. */
  jobsInFlight(): number;
  /** Entries held in memory (queued behind their user, running or waiting for a retry). */
  jobsHeld(): number;
  /** Model requests in flight now. */
  modelRequestsInFlight(): number;
  /** Whether the model server is considered available. */
  modelAvailable(): boolean;
  /** The connection used for `XPENDING`; skipped while it is not ready. */
  redis?: Redis;
  /** The streams whose pending entries are counted (default: the five job streams). */
  streams?: readonly string[];
  /** How long one scrape waits for `XPENDING` (ms, default 1000). */
  pendingTimeoutMs?: number;
}

/** Job durations: from a quick failure to a slow vision model. */
const JOB_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
/** Model request durations. */
const MODEL_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120];

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
 * metrics.onCompletion({ model: "mistral", durationMs: 812, outcome: "ok", jobType: "followup" });
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
  readonly #modelDuration: Histogram<"job_type" | "model" | "outcome">;
  readonly #tokens: Counter<"model" | "kind">;
  readonly #retries: Counter<"job_type" | "kind">;
  readonly #deadLettered: Counter<"stream">;
  readonly #repaired: Counter<"job_type" | "repair">;

  /** Registers every metric; the gauges read `sources` when scraped. */
  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    this.#jobs = new Counter({
      name: "llm_worker_jobs_total",
      help:
        "Job runs that ended, by job type and outcome (completed, failed, skipped, retry_invalid, retry_unavailable, abandoned).",
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
        "Duration of one model request, by job type, model and outcome (ok, unavailable, rejected, aborted).",
      labelNames: ["job_type", "model", "outcome"],
      buckets: MODEL_BUCKETS,
      registers,
    });
    this.#tokens = new Counter({
      name: "llm_worker_model_tokens_total",
      help: "Tokens the model server reported, by model and kind (prompt, completion).",
      labelNames: ["model", "kind"],
      registers,
    });
    this.#retries = new Counter({
      name: "llm_worker_retries_total",
      help:
        "Job runs that will be tried again, by job type and kind (invalid: the model's answer was unusable; unavailable: the model server or Core was down).",
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
    // Every series exists from the start, so increase() sees the first sloppy answer.
    for (const jobType of Object.keys(STREAM_OF)) {
      for (const repair of REPAIRS) this.#repaired.inc({ job_type: jobType, repair }, 0);
    }
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
      name: "llm_worker_model_unavailable",
      help: "1 while the model server is considered unavailable (jobs wait), else 0.",
      registers,
      collect() {
        this.set(sources.modelAvailable() ? 0 : 1);
      },
    });
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
        this.#jobs.inc({ job_type: job.jobType, outcome });
        if (outcome === "retry_invalid") {
          this.#retries.inc({ job_type: job.jobType, kind: "invalid" });
        }
        if (outcome === "retry_unavailable") {
          this.#retries.inc({ job_type: job.jobType, kind: "unavailable" });
        }
        if (outcome !== "skipped" && outcome !== "abandoned") {
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
    this.#modelDuration.observe(
      { job_type: event.jobType ?? "none", model: event.model, outcome: event.outcome },
      event.durationMs / 1000,
    );
    if (event.completion) {
      this.#tokens.inc({ model: event.model, kind: "prompt" }, event.completion.promptTokens);
      this.#tokens.inc(
        { model: event.model, kind: "completion" },
        event.completion.completionTokens,
      );
    }
  }

  /** Counts an answer used after mending (give this to the model gateway's `onRepair`). */
  onRepair(event: RepairEvent): void {
    const jobType = event.jobType ?? "none";
    for (const repair of event.repairs) this.#repaired.inc({ job_type: jobType, repair });
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
