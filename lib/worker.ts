/**
 * Wires one worker process together from its settings: Redis connections, the Core and model
 * clients, the model's health, the ledger, the consumer, the metrics and the health and metrics
 * listener; and takes it apart again.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { type FallbackSettings, redactUrl, type Settings } from "./config.ts";
import { Consumer, type ConsumerEvents } from "./consumer.ts";
import { CoreApiClient } from "./core_api.ts";
import { JobLedger } from "./ledger.ts";
import {
  type CompletionEvent,
  LLMClient,
  type LLMClientOptions,
  type LLMError,
  toLLMError,
} from "./llm.ts";
import { type HttpServer, type Readiness, startHttpServer } from "./http.ts";
import { logger } from "./log.ts";
import { WorkerMetrics } from "./metrics.ts";
import { eitherAvailable, ModelGateway, ModelHealth, type ModelServer } from "./model.ts";
import { closeRedis, createRedis, watchRedis } from "./redis.ts";
import { SharedRequestGate } from "./request_gate.ts";
import { SharedSlots } from "./shared_slots.ts";
import { GROUP, JOB_STREAMS, STREAM_OF } from "./streams.ts";

/** Options of {@linkcode createWorker} besides the settings. */
export interface WorkerOptions {
  /** Observers of the consumer. */
  events?: ConsumerEvents;
  /** Told after every model request. */
  onCompletion?: (event: CompletionEvent) => void;
  /** Told when the model server goes down or comes back. */
  onModelAvailability?: (available: boolean) => void;
  /** The `fetch` for Core and the model (tracing, tests). */
  fetch?: typeof fetch;
  /** Start the health and metrics listener on `WORKER_HTTP_PORT` (default true). */
  http?: boolean;
}

/** A wired worker. */
export interface Worker {
  /** The settings it runs with. */
  settings: Settings;
  /** The consumer. */
  consumer: Consumer;
  /** Connection for ordinary commands. */
  redis: Redis;
  /** The model client. */
  llm: LLMClient;
  /** The model's health. */
  health: ModelHealth;
  /** The model gateway. */
  model: ModelGateway;
  /** The worker's Prometheus metrics. */
  metrics: WorkerMetrics;
  /** The health and metrics listener, once started (none with `http: false`). */
  readonly http: HttpServer | undefined;
  /** What `/readyz` answers now. */
  readiness(): Readiness;
  /**
   * Starts the listener (throws when its port cannot be bound), probes the model server, waits
   * for Redis as long as it takes (until {@linkcode Worker.close}), then starts consuming and
   * logs one line saying so.
   */
  start(): Promise<void>;
  /** Stops consuming (graceful drain) and closes every connection. Idempotent. */
  close(): Promise<void>;
}

/**
 * Builds a worker from settings. Nothing connects until {@linkcode Worker.start}.
 *
 * @example
 * ```ts ignore
 * const worker = createWorker(loadSettings());
 * await worker.start();
 * Deno.addSignalListener("SIGTERM", () => worker.close());
 * ```
 */
export function createWorker(settings: Settings, options: WorkerOptions = {}): Worker {
  const log = logger("worker");
  const connectionName = settings.workerConsumerName;
  const redis = createRedis(settings.redisUrl, { connectionName, autoPipelining: true });
  const reader = createRedis(settings.redisUrl, { connectionName });
  // The channels of the shared model budget and pause (see lib/shared_slots.ts, request_gate.ts).
  const subscriber = createRedis(settings.redisUrl, { connectionName });
  const redisUrl = redactUrl(settings.redisUrl);
  let redisLost = false;
  const redisWatch = watchRedis([redis, reader, subscriber], {
    onChange: (up, reason) => {
      if (!up) {
        redisLost = true;
        log.warn(
          "Redis at {url} is not reachable: {reason}. Waiting for it (retrying every 0.2 to 2 s); /readyz answers 503 until it is back.",
          { url: redisUrl, reason },
        );
      } else if (redisLost) {
        log.info("Redis at {url} answers again.", { url: redisUrl });
      }
    },
  });
  /** Aborted by `close()`: a start still waiting for Redis gives up. */
  const closing = new AbortController();
  const metrics: WorkerMetrics = new WorkerMetrics({
    jobsInFlight: () => consumer.inFlight,
    jobsHeld: () => consumer.held,
    modelRequestsInFlight: () => model.inFlight,
    modelAvailable: () => availability.available,
    modelBudgetWaiting: () => sharedSlots?.waiting ?? 0,
    modelServers: () => ({
      primary: health.available,
      ...(fallback ? { fallback: fallback.health.available } : {}),
    }),
    redis,
    streams: JOB_STREAMS,
    jobTypes: Object.keys(STREAM_OF),
    models: [
      ...new Set([
        settings.llmTextModel,
        settings.llmVisionModel,
        ...(settings.llmFallback
          ? [settings.llmFallback.textModel, settings.llmFallback.visionModel]
          : []),
      ]),
    ],
  });
  const owner = settings.workerConsumerName;
  const sharedSlots = settings.llmMaxInFlight === null
    ? undefined
    : new SharedSlots({ redis, subscriber, limit: settings.llmMaxInFlight, owner });
  const gate = new SharedRequestGate({
    redis,
    subscriber,
    limit: settings.llmMaxRequestsPerMinute ?? undefined,
    owner,
    onDelay: (reason) => metrics.onModelDelay(reason),
  });
  const onCompletion = (event: CompletionEvent) => {
    metrics.onCompletion(event);
    options.onCompletion?.(event);
  };
  const llm = new LLMClient({
    baseUrl: settings.llmBaseUrl,
    apiKey: settings.llmApiKey,
    onCompletion,
    fetch: options.fetch,
  });
  const health = new ModelHealth({
    probe: async (signal) => {
      await gate.untilUnpaused(signal); // no probe while the server asked for a pause
      await llm.probe(signal);
    },
    onChange: options.onModelAvailability,
    ...(settings.llmFallback
      ? {
        label: "Primary model server",
        whileDown: "Requests go to the fallback server while it answers.",
        whenBack: "requests go to it again.",
      }
      : {}),
  });
  const fallback = settings.llmFallback
    ? fallbackServer(settings.llmFallback, { onCompletion, fetch: options.fetch })
    : undefined;
  const availability = eitherAvailable(health, fallback?.health);
  const model = new ModelGateway({
    llm,
    models: { text: settings.llmTextModel, vision: settings.llmVisionModel },
    fallback,
    concurrency: settings.workerConcurrency,
    sharedSlots,
    gate,
    structuredOutput: settings.llmStructuredOutput,
    health,
    onRepair: (event) => metrics.onRepair(event),
  });
  const core = new CoreApiClient({ baseUrl: settings.coreApiUrl, fetch: options.fetch });
  const consumer: Consumer = new Consumer({
    settings,
    redis,
    reader,
    ledger: new JobLedger(redis),
    core,
    model,
    health: availability,
    events: combineEvents(metrics.events, options.events),
  });
  const readiness = (): Readiness => {
    const answer = (ready: boolean, reason?: string): Readiness => {
      const readiness: Readiness = { ready };
      if (reason) readiness.reason = reason;
      if (!availability.available) {
        readiness.detail = fallback
          ? `no model server answers, jobs wait for one: ${availability.reason}`
          : `the model server does not answer, jobs wait for it: ${health.reason}`;
      } else if (!health.available) {
        readiness.detail =
          `the primary model server does not answer, the fallback serves: ${health.reason}`;
      }
      return readiness;
    };
    if (closed) return answer(false, "the worker is stopping");
    if (!redisWatch.up) {
      return answer(false, `Redis at ${redisUrl} is not reachable (${redisWatch.reason})`);
    }
    if (!consumer.running) return answer(false, "the worker is starting");
    return answer(true);
  };
  let http: HttpServer | undefined;
  let closed: Promise<void> | undefined;
  return {
    settings,
    consumer,
    redis,
    llm,
    health,
    model,
    metrics,
    get http() {
      return http;
    },
    readiness,
    async start() {
      if (options.http !== false) {
        http = startHttpServer({
          port: settings.workerHttpPort,
          readiness,
          metrics: async () => ({
            contentType: metrics.contentType,
            body: await metrics.metrics(),
          }),
        });
      }
      // The model's health follows this probe at once (the gauge, /readyz), Redis or not.
      const probe = probeModel(llm, health, closing.signal);
      if (fallback) void probeModel(fallback.llm, fallback.health, closing.signal);
      // A refused first connect rejects, but ioredis goes on trying (backing off to 2 s): the
      // worker waits for Redis as it does after losing it later.
      for (const connection of [redis, reader, subscriber]) connection.connect().catch(() => {});
      try {
        await redisWatch.untilUp(closing.signal);
      } catch (error) {
        if (closing.signal.aborted) return;
        throw error;
      }
      await Promise.all([gate.start(), sharedSlots?.start()]);
      await consumer.start();
      const modelProblem = await probe;
      if (settings.llmFallback) {
        log.info(
          "Fallback model server at {fallbackUrl} (text model {textModel}, vision model {visionModel}) serves while the primary does not answer.",
          {
            fallbackUrl: settings.llmFallback.baseUrl,
            textModel: settings.llmFallback.textModel,
            visionModel: settings.llmFallback.visionModel,
          },
        );
      }
      log.info(
        "LLM worker {consumer} started: reading {streams} in group {group}, concurrency {concurrency}{shared}, text model {textModel}, vision model {visionModel} at {baseUrl} ({modelStatus}); health and metrics {httpStatus}.",
        {
          consumer: settings.workerConsumerName,
          streams: JOB_STREAMS.join(", "),
          group: GROUP,
          concurrency: settings.workerConcurrency,
          shared: sharedLimits(settings),
          maxInFlight: settings.llmMaxInFlight,
          maxRequestsPerMinute: settings.llmMaxRequestsPerMinute,
          textModel: settings.llmTextModel,
          visionModel: settings.llmVisionModel,
          baseUrl: settings.llmBaseUrl,
          modelStatus: modelProblem === undefined
            ? "the model server answered"
            : `the model server did not answer: ${modelProblem.message} Jobs wait until it does`,
          modelAnswered: modelProblem === undefined,
          httpStatus: http ? `on port ${http.port}` : "listener off",
          httpPort: http?.port ?? null,
        },
      );
    },
    close() {
      closed ??= (async () => {
        closing.abort(new Error("the worker is closing"));
        redisWatch.close();
        await consumer.stop();
        await health.close();
        await Promise.all([sharedSlots?.close(), gate.close()]);
        await fallback?.health.close();
        llm.close();
        await Promise.all([redis, reader, subscriber].map(closeRedis));
        await http?.close();
      })();
      return closed;
    },
  };
}

/** The fallback model server of `LLM_FALLBACK_*`: its client (named `fallback`) and health. */
function fallbackServer(
  settings: FallbackSettings,
  options: Pick<LLMClientOptions, "onCompletion" | "fetch">,
): ModelServer & { health: ModelHealth } {
  const llm = new LLMClient({
    baseUrl: settings.baseUrl,
    apiKey: settings.apiKey,
    name: "fallback",
    ...options,
  });
  const health = new ModelHealth({
    probe: (signal) => llm.probe(signal),
    label: "Fallback model server",
    whileDown: "It is not asked until it answers again.",
    whenBack: "it serves while the primary is down.",
  });
  return { llm, models: { text: settings.textModel, vision: settings.visionModel }, health };
}

/** One set of consumer observers that calls each of `all` in turn. */
function combineEvents(...all: Array<ConsumerEvents | undefined>): ConsumerEvents {
  const list = all.filter((events): events is ConsumerEvents => events !== undefined);
  return {
    jobStarted: (job, attempt) => list.forEach((e) => e.jobStarted?.(job, attempt)),
    jobEnded: (job, outcome, ms) => list.forEach((e) => e.jobEnded?.(job, outcome, ms)),
    deadLettered: (stream, reason) => list.forEach((e) => e.deadLettered?.(stream, reason)),
  };
}

/** What the start line says of the limits shared with other replicas ("" when none is set). */
function sharedLimits(settings: Settings): string {
  const limits = [
    settings.llmMaxInFlight === null ? "" : `${settings.llmMaxInFlight} in flight`,
    settings.llmMaxRequestsPerMinute === null ? "" : `${settings.llmMaxRequestsPerMinute} a minute`,
  ].filter(Boolean);
  return limits.length ? ` (model requests across replicas: ${limits.join(", ")})` : "";
}

/**
 * Asks the model server once and marks `health` down at once when it is unavailable; resolves
 * with why it did not answer, or `undefined` when it did.
 */
async function probeModel(
  llm: LLMClient,
  health: ModelHealth,
  signal: AbortSignal,
): Promise<LLMError | undefined> {
  try {
    await llm.probe(signal);
    return undefined;
  } catch (error) {
    const problem = toLLMError(error);
    if (problem.kind === "unavailable") health.reportFailure(problem);
    return problem;
  }
}
