/**
 * The consumer: reads the five job streams through the per-user leases, runs each job through its
 * handler, and ends it exactly as docs/protocol.md section 4 says (PATCH, notify, XACK), with
 * retries, stalled-entry recovery and a graceful stop.
 *
 * A job of a user runs only under the user's lease ({@linkcode UserLeases}): its Redis writes are
 * fenced by the lease's token, its model requests and Core effects check the lease first, and its
 * end hands this replica the user's next job. Each replica takes only the users it has room for.
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
import { LeaseLostError } from "./errors.ts";
import type { JobLedger } from "./ledger.ts";
import { EntryLeases } from "./leases.ts";
import { describeError, logger } from "./log.ts";
import type { ModelAvailability, ModelGateway } from "./model.ts";
import { StreamReader } from "./reader.ts";
import { type ConsumerEvents, JobRunner } from "./runner.ts";
import { JobScheduler } from "./scheduler.ts";
import { ensureGroups, JOB_STREAMS, moveToDead } from "./streams.ts";
import { repeatEvery, sleep } from "./utils.ts";
import {
  type Fence,
  type Lease,
  type LeasedEntry,
  type LeasedRun,
  refreshIntervalMs,
  sweepIntervalMs,
  UserLeases,
} from "./user_lease.ts";
import { entryKey, type WorkItem, workItem } from "./work_item.ts";

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
  /** The per-user leases (default: over `redis`, `WORKER_LEASE_MS` long). */
  userLeases?: UserLeases;
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
  readonly #users: UserLeases;
  readonly #ledger: JobLedger;
  /** The most jobs running at once. */
  readonly #maxRunning: number;
  /** Runs whose entry an earlier item still holds (a lease lost in a pause and taken back). */
  readonly #deferred = new Map<string, WorkItem>();
  /** Aborted once the drain is over: the leases are no longer refreshed. */
  readonly #drained = new AbortController();
  #refreshing?: Promise<void>;
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
    this.#maxRunning = maxRunningJobs(concurrency);
    this.#ledger = options.ledger;
    this.#users = options.userLeases ?? new UserLeases({
      redis: this.#redis,
      consumer: this.#s.workerConsumerName,
      leaseMs: this.#s.workerLeaseMs,
      streams: this.#streams,
    });
    const fenced = new WeakMap<WorkItem, JobLedger>();
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
      release: (item) => this.#release(item),
      signal: this.#hardStop.signal,
      storeFor: (item) => {
        if (!item.lease) return this.#ledger;
        let ledger = fenced.get(item);
        if (!ledger) fenced.set(item, ledger = this.#ledger.fenced(this.#fence(item, item.lease)));
        return ledger;
      },
      guard: (item) => {
        const lease = item.lease;
        return lease ? () => this.#users.check(lease) : undefined;
      },
      handOn: (item) => this.#handOn(item),
    });
    this.#scheduler = new JobScheduler<WorkItem>({
      maxRunning: this.#maxRunning,
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
      maxPending: 4 * maxHeld + 100,
      room: () => maxHeld - this.#scheduler.held,
      adopt: (entries) => this.#adopt(entries),
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
      read: async (room) => {
        const read = await this.#users.read(room, maxHeld, this.#userRoom());
        this.#admitLeased(read.nobody, read.runs, false);
        return read;
      },
      adopt: (entries) => this.#adopt(entries),
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
    return this.#scheduler.held;
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
    this.#loops = [
      this.#reader.run(signal),
      ...leases,
      this.#every(sweepIntervalMs(this.#users.leaseMs), () => this.#sweep(), signal),
    ];
    // Leases are refreshed until the drain is over: jobs finishing then keep their users.
    this.#refreshing = this.#every(
      refreshIntervalMs(this.#users.leaseMs),
      () => this.#refresh(),
      this.#drained.signal,
    );
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
    this.#drained.abort(new Error("the drain is over"));
    await this.#refreshing;
    // Users whose jobs did not end here go to other replicas at their next sweep.
    await this.#users.releaseAll().catch((error) =>
      this.#log.warn("Could not give the users' leases up ({message}); they expire.", {
        message: describeError(error),
      })
    );
    this.#log.info("Stopped; {left} entr(y/ies) left unacknowledged for the next consumer.", {
      left: left + this.#scheduler.running,
    });
  }

  /**
   * Hands an entry to the scheduler unless it is held already; true when it was new. A run whose
   * entry an earlier item still holds (a lease lost in a pause and taken back) starts once that
   * item has left.
   */
  #admit(item: WorkItem): boolean {
    if (!this.#leases.add(item)) {
      if (item.lease) this.#deferred.set(entryKey(item.stream, item.entryId), item);
      return false;
    }
    const placed = this.#scheduler.add(item);
    if (this.#log.isEnabledFor("debug")) this.#logRead(item, placed);
    return true;
  }

  /** An item is over (ended, dead-lettered, or its lease lost): a deferred run may start. */
  #release(item: WorkItem): void {
    this.#leases.release(item);
    const key = entryKey(item.stream, item.entryId);
    const next = this.#deferred.get(key);
    if (next && next !== item) {
      this.#deferred.delete(key);
      this.#admit(next);
    }
  }

  /** Hands entries of nobody and the runs of users granted to this replica to the scheduler. */
  #admitLeased(nobody: LeasedEntry[], runs: LeasedRun[], redelivered: boolean): number {
    let added = 0;
    for (const entry of nobody) {
      if (this.#admit(workItem(entry.stream, entry.entryId, entry.fields, redelivered))) added++;
    }
    for (const run of runs) {
      const item = workItem(run.stream, run.entryId, run.fields, run.redelivered, run.lease);
      if (this.#admit(item)) added++;
    }
    return added;
  }

  /** Takes entries pending under this consumer over (recovered or claimed). */
  async #adopt(entries: Array<{ stream: string; entryId: string }>): Promise<number> {
    const fresh = entries.filter((e) => !this.#leases.has(e.stream, e.entryId));
    const { nobody, runs } = await this.#users.adopt(fresh, this.#userRoom());
    return this.#admitLeased(nobody, runs, true);
  }

  /**
   * The fence of a job's writes under `lease`. The write that ends the job (its acknowledgement)
   * hands the user on in the same script: its entry leaves the user's queue, and this replica
   * runs the user's next job, or gives the lease up when there is none (or when it stops) and
   * takes free users instead.
   */
  #fence(item: WorkItem, lease: Lease): Fence {
    const handOn = this.#users.handOn(lease, item, {
      giveUp: () => this.#stopping.signal.aborted,
      users: () => this.#stopping.signal.aborted ? 0 : this.#userRoom() + 1,
      took: (runs) => {
        item.handedOn = true;
        this.#took(runs, lease);
      },
    });
    return { ...this.#users.fence(lease), handOn };
  }

  /**
   * After a job of a user ended without the hand-on in its last write (a dead letter): the same
   * hand-on, alone. A failure to reach Redis is tried again; a lost lease ends it.
   */
  async #handOn(item: WorkItem): Promise<void> {
    const lease = item.lease;
    if (!lease || item.handedOn) return;
    for (let attempt = 0;; attempt++) {
      try {
        const stopping = this.#stopping.signal.aborted;
        this.#took(
          await this.#users.advance(lease, item, {
            giveUp: stopping,
            users: stopping ? 0 : this.#userRoom() + 1,
          }),
          lease,
        );
        item.handedOn = true;
        return;
      } catch (error) {
        if (error instanceof LeaseLostError) return;
        if (attempt === 0) {
          this.#log.warn("Could not hand user {userId} on yet: {message}", {
            userId: lease.userId,
            message: describeError(error),
          });
        }
        // After the drain the lease is left to expire: another replica takes the user then.
        if (this.#hardStop.signal.aborted) return;
        await sleep(1_000);
      }
    }
  }

  /**
   * How many more users this replica takes: as many as it runs jobs at once, not counting those
   * waiting for a retry, so users spread over the replicas with room.
   */
  #userRoom(): number {
    return this.#maxRunning + this.#scheduler.waiting - this.#users.held;
  }

  /** Refreshes the leases held; jobs of a lease found lost stop at their next step. */
  async #refresh(): Promise<void> {
    const lost = await this.#users.refresh();
    if (lost.length === 0) return;
    this.#log.warn(
      "Lost the lease of {n} user(s) to another replica (this one was paused or cut off); their jobs stop here.",
      { n: lost.length },
    );
    this.#leases.forEach((item) => {
      if (item.lease?.lost) item.lostWake?.resolve();
    });
  }

  /** Takes free users: those whose holder let its lease expire, and those left for room. */
  async #sweep(): Promise<void> {
    if (this.#stopping.signal.aborted) return;
    this.#took(await this.#users.sweep(this.#userRoom()));
  }

  /**
   * Runs handed to this replica by a sweep or by the hand-on of `from` (whose user's next job
   * is no takeover): to the scheduler.
   */
  #took(runs: LeasedRun[], from?: Lease): void {
    if (runs.length === 0) return;
    const taken = runs.filter((run) => run.redelivered && run.lease !== from).length;
    if (taken > 0) {
      this.#log.info("Took over {n} user(s) whose replica stopped refreshing its lease.", {
        n: taken,
      });
    }
    this.#admitLeased([], runs, true);
  }

  #every(intervalMs: number, task: () => Promise<void>, signal: AbortSignal): Promise<void> {
    return repeatEvery(
      intervalMs,
      task,
      signal,
      (error) =>
        this.#log.warn("Background task failed: {message}", { message: describeError(error) }),
    );
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
