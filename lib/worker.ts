/**
 * Wires one worker process together from its settings: Redis connections, the Core and model
 * clients, the model's health, the ledger, the consumer, the metrics and the health and metrics
 * listener; and takes it apart again.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { redactUrl, type Settings } from "./config.ts";
import { Consumer, type ConsumerEvents } from "./consumer.ts";
import { CoreApiClient } from "./core_api.ts";
import { JobLedger } from "./ledger.ts";
import { type CompletionEvent, LLMClient } from "./llm.ts";
import { type HttpServer, type Readiness, startHttpServer } from "./http.ts";
import { describeError, logger } from "./log.ts";
import { WorkerMetrics } from "./metrics.ts";
import { ModelGateway, ModelHealth } from "./model.ts";
import { closeRedis, createRedis } from "./redis.ts";
import { GROUP, JOB_STREAMS } from "./streams.ts";

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
  /** Starts the listener, connects, starts consuming and logs one line saying so. */
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
  let lastRedisError = 0;
  for (const connection of [redis, reader]) {
    connection.on("error", (error: Error) => {
      if (Date.now() - lastRedisError < 10_000) return;
      lastRedisError = Date.now();
      log.warn("Redis at {url}: {message}. Reconnecting.", {
        url: redactUrl(settings.redisUrl),
        message: describeError(error),
      });
    });
  }
  const metrics: WorkerMetrics = new WorkerMetrics({
    jobsInFlight: () => consumer.inFlight,
    jobsHeld: () => consumer.held,
    modelRequestsInFlight: () => model.inFlight,
    modelAvailable: () => health.available,
    redis,
  });
  const llm = new LLMClient({
    baseUrl: settings.llmBaseUrl,
    apiKey: settings.llmApiKey,
    onCompletion: (event) => {
      metrics.onCompletion(event);
      options.onCompletion?.(event);
    },
    fetch: options.fetch,
  });
  const health = new ModelHealth({
    probe: (signal) => llm.probe(signal),
    onChange: options.onModelAvailability,
  });
  const model = new ModelGateway({
    llm,
    models: { text: settings.llmTextModel, vision: settings.llmVisionModel },
    concurrency: settings.workerConcurrency,
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
    health,
    events: combineEvents(metrics.events, options.events),
  });
  const readiness = (): Readiness => {
    if (!consumer.running) {
      return {
        ready: false,
        reason: closed ? "the worker is stopping" : "the consumer is not running",
      };
    }
    const down = [redis, reader].find((c) => c.status !== "ready");
    if (down) {
      return {
        ready: false,
        reason: `Redis at ${
          redactUrl(settings.redisUrl)
        } is not reachable (connection ${down.status})`,
      };
    }
    return { ready: true };
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
      const probe = probeModel(llm);
      await Promise.all([redis.connect(), reader.connect()]);
      await consumer.start();
      const modelProblem = await probe;
      log.info(
        "LLM worker {consumer} started: reading {streams} in group {group}, concurrency {concurrency}, text model {textModel}, vision model {visionModel} at {baseUrl} ({modelStatus}); health and metrics {httpStatus}.",
        {
          consumer: settings.workerConsumerName,
          streams: JOB_STREAMS.join(", "),
          group: GROUP,
          concurrency: settings.workerConcurrency,
          textModel: settings.llmTextModel,
          visionModel: settings.llmVisionModel,
          baseUrl: settings.llmBaseUrl,
          modelStatus: modelProblem === undefined
            ? "the model server answered"
            : `the model server did not answer: ${modelProblem} Jobs wait until it does`,
          modelAnswered: modelProblem === undefined,
          httpStatus: http ? `on port ${http.port}` : "listener off",
          httpPort: http?.port ?? null,
        },
      );
    },
    close() {
      closed ??= (async () => {
        await consumer.stop();
        await health.close();
        llm.close();
        await Promise.all([redis, reader].map(closeRedis));
        await http?.close();
      })();
      return closed;
    },
  };
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

/** Asks the model server once; resolves with why it did not answer, or `undefined` when it did. */
async function probeModel(llm: LLMClient): Promise<string | undefined> {
  try {
    await llm.probe();
    return undefined;
  } catch (error) {
    return describeError(error);
  }
}
