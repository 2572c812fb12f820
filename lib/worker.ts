/**
 * Wires one worker process together from its settings: Redis connections, the Core and model
 * clients, the model's health, the ledger and the consumer; and takes it apart again.
 *
 * @module
 */
import { Redis } from "ioredis";
import { redactUrl, type Settings } from "./config.ts";
import { Consumer, type ConsumerEvents } from "./consumer.ts";
import { CoreApiClient } from "./core_api.ts";
import { JobLedger } from "./ledger.ts";
import { type CompletionEvent, LLMClient } from "./llm.ts";
import { describeError, logger } from "./log.ts";
import { ModelGateway, ModelHealth } from "./model.ts";
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
  /** Starts consuming. */
  start(): Promise<void>;
  /** Stops consuming (graceful drain) and closes every connection. Idempotent. */
  close(): Promise<void>;
}

/**
 * Builds a worker from settings. Nothing connects until {@linkcode Worker.start}.
 *
 * @example
 * ```ts
 * const worker = createWorker(loadSettings());
 * await worker.start();
 * Deno.addSignalListener("SIGTERM", () => worker.close());
 * ```
 */
export function createWorker(settings: Settings, options: WorkerOptions = {}): Worker {
  const log = logger("worker");
  const redisOptions = {
    lazyConnect: true,
    protocol: 2 as const, // RESP2: the classic reply shapes, and any Redis answers it
    maxRetriesPerRequest: null, // commands wait for a reconnect instead of failing
    connectionName: settings.workerConsumerName,
    retryStrategy: (times: number) => Math.min(times * 200, 2_000),
  };
  const redis = new Redis(settings.redisUrl, { ...redisOptions, enableAutoPipelining: true });
  const reader = new Redis(settings.redisUrl, redisOptions);
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
  const llm = new LLMClient({
    baseUrl: settings.llmBaseUrl,
    apiKey: settings.llmApiKey,
    onCompletion: options.onCompletion,
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
  });
  const core = new CoreApiClient({ baseUrl: settings.coreApiUrl, fetch: options.fetch });
  const consumer = new Consumer({
    settings,
    redis,
    reader,
    ledger: new JobLedger(redis),
    core,
    model,
    health,
    events: options.events,
  });
  let closed: Promise<void> | undefined;
  return {
    settings,
    consumer,
    redis,
    llm,
    health,
    model,
    async start() {
      await Promise.all([redis.connect(), reader.connect()]);
      await consumer.start();
      log.info(
        "LLM worker {consumer} reading {streams} in group {group}: concurrency {concurrency}, text model {textModel}, vision model {visionModel} at {baseUrl}.",
        {
          consumer: settings.workerConsumerName,
          streams: JOB_STREAMS.join(", "),
          group: GROUP,
          concurrency: settings.workerConcurrency,
          textModel: settings.llmTextModel,
          visionModel: settings.llmVisionModel,
          baseUrl: settings.llmBaseUrl,
        },
      );
    },
    close() {
      closed ??= (async () => {
        await consumer.stop();
        await health.close();
        llm.close();
        // QUIT lets replies in flight arrive; disconnect when Redis is away.
        await Promise.all(
          [redis, reader].map((c) =>
            c.status === "ready" ? c.quit().catch(() => c.disconnect()) : c.disconnect()
          ),
        );
      })();
      return closed;
    },
  };
}
