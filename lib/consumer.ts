/**
 * The consumer: reads the five job streams with one blocking `XREADGROUP`, runs each job through
 * its handler, and ends it exactly as docs/protocol.md section 4 says (PATCH, notify, XACK), with
 * retries, stalled-entry recovery and a graceful stop.
 *
 * It wires three parts along their seams, as BullMQ's `Worker` sits beside its `LockManager`:
 * {@linkcode StreamReader} (reading and recovery), {@linkcode EntryLeases} (the entries held,
 * their heartbeat, claims) and {@linkcode JobRunner} (running a job to its end), with the
 * {@linkcode JobScheduler} between reading and running.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Redis } from "ioredis";
import type { Settings } from "./config.ts";
import type { CoreApiClient } from "./core_api.ts";
import type { JobHandler } from "./handlers/types.ts";
import type { JobType } from "./job.ts";
import type { JobLedger } from "./ledger.ts";
import { EntryLeases } from "./leases.ts";
import { describeError, logger } from "./log.ts";
import type { ModelAvailability, ModelGateway } from "./model.ts";
import { StreamReader } from "./reader.ts";
import { type ConsumerEvents, JobRunner } from "./runner.ts";
import { JobScheduler } from "./scheduler.ts";
import { ensureGroups, JOB_STREAMS, moveToDead } from "./streams.ts";
import { sleep } from "./utils.ts";
import type { WorkItem } from "./work_item.ts";

export { type ConsumerEvents, ENDED_OUTCOMES, type JobOutcome } from "./runner.ts";

/** Options of {@linkcode Consumer}. */
export interface ConsumerOptions {
  /** The worker's settings. */
  settings: Settings;
  /** Connection for ordinary commands. */
  redis: Redis;
  /** A second connection, for the blocking `XREADGROUP` only. */
  reader: Redis;
  /** The job ledger (on `redis`). */
  ledger: JobLedger;
  /** Core's REST API. */
  core: CoreApiClient;
  /** The model. */
  model: ModelGateway;
  /** Whether a model server answers (the primary or, when there is one, the fallback). */
  health: ModelAvailability;
  /** Handlers by job type (default: the five of `lib/handlers`). */
  handlers?: Readonly<Record<JobType, JobHandler>>;
  /** Observers. */
  events?: ConsumerEvents;
  /** The clock in ms (default `Date.now`). */
  now?: () => number;
  /** How long one `XREADGROUP` blocks (ms); also bounds how fast a stop is noticed. */
  blockMs?: number;
  /** Streams to read (default: the five job streams). */
  streams?: readonly string[];
}

/**
 * The LLM worker's consumer loop.
 *
 * @example
 * ```ts ignore
 * const consumer = new Consumer({ settings, redis, reader, ledger, core, model, health });
 * await consumer.start();
 * // ... on SIGTERM:
 * await consumer.stop();
 * ```
 */
export class Consumer {
  readonly #s: Settings;
  readonly #redis: Redis;
  readonly #blockMs: number;
  readonly #streams: readonly string[];
  readonly #log: Logger = logger("consumer");
  readonly #scheduler: JobScheduler<WorkItem>;
  readonly #leases: EntryLeases;
  readonly #reader: StreamReader;
  readonly #runner: JobRunner;
  /** Aborted when the consumer starts stopping: the reader and the waits end. */
  readonly #stopping = new AbortController();
  /** Aborted when the drain time is over: jobs still running are cut short. */
  readonly #hardStop = new AbortController();
  #loops: Promise<void>[] = [];
  #running = false;
  #stopped?: Promise<void>;

  /** Creates the consumer; nothing is read until {@linkcode Consumer.start}. */
  constructor(options: ConsumerOptions) {
    this.#s = options.settings;
    this.#redis = options.redis;
    this.#blockMs = options.blockMs ?? 1000;
    this.#streams = options.streams ?? JOB_STREAMS;
    const concurrency = this.#s.workerConcurrency;
    // Model slots bound the model. A quarter more jobs (at least 2) may run, so jobs reading from
    // Core before their model call or writing their results after it never keep a slot idle;
    // more than that would only wait at the slots, holding what they had read (twice the slots
    // held 4 MB more at the peak of run 1 of the bench for the same throughput). Entries held in
    // memory (queued behind their user) are bounded too.
    const maxHeld = Math.max(4 * concurrency, 32);
    this.#runner = new JobRunner({
      settings: this.#s,
      ledger: options.ledger,
      core: options.core,
      model: options.model,
      health: options.health,
      handlers: options.handlers,
      events: options.events,
      now: options.now,
      moveToDead: (item, reason) =>
        moveToDead(this.#redis, item.stream, item.entryId, reason, item.fields),
      release: (item) => this.#leases.release(item),
      signal: this.#hardStop.signal,
    });
    this.#scheduler = new JobScheduler<WorkItem>({
      maxRunning: maxRunningJobs(concurrency),
      run: (item) => this.#runner.run(item),
      onError: (item, error) =>
        this.#log.error("Unexpected error in job {entryId} from {stream}: {error}", {
          entryId: item.entryId,
          stream: item.stream,
          error: describeError(error),
        }),
    });
    this.#leases = new EntryLeases({
      redis: this.#redis,
      consumerName: this.#s.workerConsumerName,
      claimIdleMs: this.#s.workerClaimIdleMs,
      streams: this.#streams,
      staged: () => this.#reader.staged,
      room: () => maxHeld - this.#scheduler.held,
      admit: (item) => this.#admit(item),
    });
    this.#reader = new StreamReader({
      redis: this.#redis,
      reader: options.reader,
      consumerName: this.#s.workerConsumerName,
      streams: this.#streams,
      blockMs: this.#blockMs,
      maxHeld,
      scheduler: this.#scheduler,
      health: options.health,
      admit: (item) => this.#admit(item),
      claimStalled: () => this.#leases.claimStalled(),
      now: options.now ?? Date.now,
    });
  }

  /** True while the read loop runs (for `/readyz`). */
  get running(): boolean {
    return this.#running;
  }

  /** Jobs running now (a job waiting for a retry is not running). */
  get inFlight(): number {
    return this.#scheduler.running;
  }

  /** Entries held in memory (read and not yet handed over, queued, running or waiting). */
  get held(): number {
    return this.#scheduler.held + this.#reader.staged.length;
  }

  /**
   * Creates the groups, takes back this consumer's own pending entries, then starts reading,
   * claiming stalled entries of other consumers and keeping its own entries fresh.
   */
  async start(): Promise<void> {
    await ensureGroups(this.#redis, this.#streams);
    this.#running = true;
    const signal = this.#stopping.signal;
    const leases = this.#leases.start(signal);
    this.#loops = [this.#reader.run(signal), ...leases];
  }

  /**
   * Stops: no more reads, jobs in flight get up to `WORKER_SHUTDOWN_TIMEOUT_MS` to finish, the
   * rest stays unacknowledged for the next consumer. Calling it again returns the same promise.
   */
  stop(): Promise<void> {
    this.#stopped ??= this.#stop();
    return this.#stopped;
  }

  async #stop(): Promise<void> {
    const inFlight = this.#scheduler.running;
    this.#log.info("Stopping: {inFlight} job(s) in flight get up to {timeout} ms to finish.", {
      inFlight,
      timeout: this.#s.workerShutdownTimeoutMs,
    });
    this.#stopping.abort(new Error("the worker is stopping"));
    const left = this.#scheduler.stop();
    // A read in flight returns within blockMs; with Redis away it would wait for ever, so don't
    // wait for it longer than that (closing the connection ends it).
    const giveUp = new AbortController();
    await Promise.race([
      Promise.allSettled(this.#loops),
      sleep(this.#blockMs + 1_000, giveUp.signal).catch(() => {}),
    ]);
    giveUp.abort();
    this.#running = false;
    if (!await this.#scheduler.drain(this.#s.workerShutdownTimeoutMs)) {
      this.#log.warn(
        "Drain time is over: cutting {n} job(s) short; they stay pending for recovery.",
        {
          n: this.#scheduler.running,
        },
      );
      this.#hardStop.abort(new Error("the drain time is over"));
      await this.#scheduler.drain(5_000);
    }
    this.#log.info("Stopped; {left} entr(y/ies) left unacknowledged for the next consumer.", {
      left: left + this.#scheduler.running,
    });
  }

  /** Hands an entry to the scheduler unless it is held already; true when it was new. */
  #admit(item: WorkItem): boolean {
    if (!this.#leases.add(item)) return false;
    const placed = this.#scheduler.add(item);
    if (this.#log.isEnabledFor("debug")) this.#logRead(item, placed);
    return true;
  }

  #logRead(item: WorkItem, placed: "scheduled" | "queued" | "refused"): void {
    const where = { entryId: item.entryId, stream: item.stream, redelivered: item.redelivered };
    if (!item.parsed.ok) {
      this.#log.debug("Read entry {entryId} of {stream}: malformed ({reason}).", {
        ...where,
        reason: item.parsed.reason,
      });
      return;
    }
    const { jobId, jobType, userId } = item.parsed.job;
    const values = { ...where, jobId, jobType, userId, placed };
    if (placed === "queued") {
      this.#log.debug(
        "Read job {jobId} ({jobType}) for user {userId}: entry {entryId} of {stream}; it waits for the user's earlier job.",
        values,
      );
    } else {
      this.#log.debug(
        "Read job {jobId} ({jobType}) for user {userId}: entry {entryId} of {stream}; {placed}.",
        values,
      );
    }
  }
}

/**
 * How many jobs may run at once for `concurrency` model slots: the slots and a quarter more, at
 * least 2 more (docs/protocol.md section 5: `WORKER_CONCURRENCY` bounds the model's requests,
 * not the jobs).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(maxRunningJobs(4), 6);
 * assert.equal(maxRunningJobs(32), 40);
 * ```
 */
export function maxRunningJobs(concurrency: number): number {
  return concurrency + Math.max(2, Math.ceil(concurrency / 4));
}
