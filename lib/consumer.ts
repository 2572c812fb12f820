/**
 * The consumer: reads the five job streams with one blocking `XREADGROUP`, runs each job through
 * its handler, and ends it exactly as docs/protocol.md section 4 says (PATCH, notify, XACK), with
 * retries, stalled-entry recovery and a graceful stop.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Redis } from "ioredis";
import type { Settings } from "./config.ts";
import { type CoreApiClient, CoreApiError } from "./core_api.ts";
import { InvalidAnswerError, JobFailedError } from "./errors.ts";
import { HANDLERS } from "./handlers/mod.ts";
import type { HandlerResult, JobHandler } from "./handlers/types.ts";
import type { Effects, Job, JobType } from "./job.ts";
import { type JobLedger, type JobRecord, MemoryEffects } from "./ledger.ts";
import { LLMError } from "./llm.ts";
import { describeError, logger, withJobContext } from "./log.ts";
import { sleep } from "./utils.ts";
import type { ModelGateway, ModelHealth } from "./model.ts";
import { entryTimeMs, expiresAt, RetryTracker, unavailableDelayMs } from "./retry.ts";
import { JobScheduler, type RunOutcome } from "./scheduler.ts";
import { traceJob } from "./tracing.ts";
import {
  compareEntryIds,
  ensureGroups,
  GROUP,
  JOB_STREAMS,
  moveToDead,
  type Notification,
  type ParsedEntry,
  parseEntry,
} from "./streams.ts";

/**
 * How a job's run ended, as reported to {@linkcode ConsumerEvents}: the job ended
 * ({@linkcode ENDED_OUTCOMES}), or it will run again (`retry_*`, `abandoned` by a stop).
 * `unrecorded`: the job ended but Core refused its final update (e.g. Core does not know it).
 */
export type JobOutcome =
  | "completed"
  | "failed"
  | "unrecorded"
  | "skipped"
  | "retry_invalid"
  | "retry_unavailable"
  | "retry_error"
  | "abandoned";

/** The outcomes that end a job: its entry is acknowledged. */
export const ENDED_OUTCOMES: readonly JobOutcome[] = [
  "completed",
  "failed",
  "unrecorded",
  "skipped",
];

/** Observers of the consumer (metrics, tests). All optional; none may throw. */
export interface ConsumerEvents {
  /**
   * A job run starts. `attempt` is the one counted against `LLM_MAX_RETRIES` (1-based): waits for
   * an unavailable model server or Core do not raise it.
   */
  jobStarted?(job: Job, attempt: number): void;
  /** A job run ended. */
  jobEnded?(job: Job, outcome: JobOutcome, durationMs: number): void;
  /** A malformed entry was copied to `llm:dead`. */
  deadLettered?(stream: string, reason: string): void;
}

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
  /** Whether the model server answers. */
  health: ModelHealth;
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

/** One entry held in memory, from the read until it is acknowledged or left. */
interface WorkItem {
  stream: string;
  entryId: string;
  fields: string[];
  userId: number | null;
  parsed: ParsedEntry;
  /** Delivered to a consumer before (our own pending list at start, or claimed). */
  redelivered: boolean;
  /** Loaded at the first run. */
  record?: JobRecord;
  effects?: Effects;
  /**
   * The model's valid answers so far, kept while the entry stays in this process: a job retried
   * because Core failed asks the model nothing twice (after a restart it asks again; its effects
   * are still once-only).
   */
  answers: MemoryEffects;
  /** Set once the job's end is decided but not yet written (Core was down). */
  ending?: Ending;
  /** The attempt of the current or last run and the waits before it (for its log lines). */
  run?: { attempt: number; waits: number };
}

interface Ending {
  status: "completed" | "failed";
  result: Record<string, unknown> | null;
  errorMessage?: string;
  notifications: Notification[];
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
  readonly #reader: Redis;
  readonly #ledger: JobLedger;
  readonly #core: CoreApiClient;
  readonly #model: ModelGateway;
  readonly #health: ModelHealth;
  readonly #handlers: Readonly<Record<JobType, JobHandler>>;
  readonly #events: ConsumerEvents;
  readonly #now: () => number;
  readonly #blockMs: number;
  readonly #streams: readonly string[];
  readonly #log: Logger = logger("consumer");
  readonly #scheduler: JobScheduler<WorkItem>;
  readonly #tracker: RetryTracker;
  /** Entries held in memory, by {@linkcode entryKey}. */
  readonly #held = new Map<string, WorkItem>();
  /** Entries read but not handed to the scheduler yet (see `#readLoop`); ours all the same. */
  #staged: WorkItem[] = [];
  /** The most entries held in memory at once. */
  readonly #maxHeld: number;
  /** Aborted when the consumer starts stopping: the reader and the waits end. */
  readonly #stopping = new AbortController();
  /** Aborted when the drain time is over: jobs still running are cut short. */
  readonly #hardStop = new AbortController();
  #loops: Promise<void>[] = [];
  #running = false;
  #stopped?: Promise<void>;
  #lastReadError = 0;
  /** Set when a Redis connection came back: the read loop reads our pending list again. */
  #reconnected = false;

  /** Creates the consumer; nothing is read until {@linkcode Consumer.start}. */
  constructor(options: ConsumerOptions) {
    this.#s = options.settings;
    this.#redis = options.redis;
    this.#reader = options.reader;
    this.#ledger = options.ledger;
    this.#core = options.core;
    this.#model = options.model;
    this.#health = options.health;
    this.#handlers = options.handlers ?? HANDLERS;
    this.#events = options.events ?? {};
    this.#now = options.now ?? Date.now;
    this.#blockMs = options.blockMs ?? 1000;
    this.#streams = options.streams ?? JOB_STREAMS;
    this.#tracker = new RetryTracker(this.#s.llmMaxRetries);
    const concurrency = this.#s.workerConcurrency;
    // Model slots bound the model. A quarter more jobs (at least 2) may run, so jobs reading from
    // Core before their model call or writing their results after it never keep a slot idle;
    // more than that would only wait at the slots, holding what they had read (twice the slots
    // held 4 MB more at the peak of run 1 of the bench for the same throughput). Entries held in
    // memory (queued behind their user) are bounded too.
    this.#maxHeld = Math.max(4 * concurrency, 32);
    this.#scheduler = new JobScheduler<WorkItem>({
      maxRunning: maxRunningJobs(concurrency),
      run: (item) => this.#runItem(item),
      onError: (item, error) =>
        this.#log.error("Unexpected error in job {entryId} from {stream}: {error}", {
          entryId: item.entryId,
          stream: item.stream,
          error: describeError(error),
        }),
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
    return this.#scheduler.held + this.#staged.length;
  }

  /**
   * Creates the groups, takes back this consumer's own pending entries, then starts reading,
   * claiming stalled entries of other consumers and keeping its own entries fresh.
   */
  async start(): Promise<void> {
    await ensureGroups(this.#redis, this.#streams);
    this.#running = true;
    this.#loops = [
      this.#readLoop(),
      this.#every(this.#claimIntervalMs(), () => this.#claimStalled()),
      this.#every(
        Math.max(250, Math.floor(this.#s.workerClaimIdleMs / 4)),
        () => this.#heartbeat(),
      ),
    ];
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

  // ---------------------------------------------------------------- reading

  async #readLoop(): Promise<void> {
    const signal = this.#stopping.signal;
    // A reply lost with its connection (Redis restarted, the network cut) leaves the entries it
    // delivered pending under our name, where no `>` read returns them and no claim looks before
    // `WORKER_CLAIM_IDLE_MS` (10 minutes by default): after every reconnect this consumer's
    // pending list is read again.
    const onReady = () => this.#reconnected = true;
    this.#reader.on("ready", onReady);
    this.#redis.on("ready", onReady);
    try {
      await this.#readEntries(signal);
    } finally {
      this.#reader.off("ready", onReady);
      this.#redis.off("ready", onReady);
    }
  }

  /** The read loop proper (see `#readLoop`). */
  async #readEntries(signal: AbortSignal): Promise<void> {
    await this.#recoverOwnPending();
    this.#reconnected = false; // the first connects: nothing can have been lost yet
    // Redis lost and back during this first claim (NOGROUP): the periodic claim tries again.
    await this.#claimStalled().catch((error) => {
      if (!signal.aborted) return this.#onRedisError(error);
    });
    // A user's jobs run in entry-id order across all streams. A stream whose read filled its
    // COUNT may hold entries older than those read from another stream: entries past the oldest
    // such stream's last id ("frontier") are staged until that stream is read further.
    /** Streams whose last read filled its COUNT, with the last id read from each. */
    const ahead = new Map<string, string>();
    // A busy worker reads in batches, once a quarter of its room is free: one read and one sort
    // then serve many jobs instead of one (an idle worker reads at once).
    const batch = Math.max(1, Math.floor(this.#maxHeld / 4));
    while (!signal.aborted) {
      try {
        if (this.#reconnected) {
          this.#reconnected = false;
          await this.#recoverOwnPending(true);
        }
        await this.#health.untilAvailable(signal);
        await this.#scheduler.whenHeldBelow(this.#maxHeld - batch + 1, signal);
        const room = Math.max(1, this.#maxHeld - this.#scheduler.held);
        let frontier = oldestOf(ahead.values());
        // Only the streams that hold the frontier back are read while entries are staged; the
        // others are ahead of it already.
        const streams = frontier === undefined
          ? this.#streams
          : [...ahead].filter(([, last]) => last === frontier).map(([stream]) => stream);
        const reply = await this.#xreadgroup(
          streams,
          ">",
          room,
          frontier === undefined ? this.#blockMs : undefined,
        );
        if (signal.aborted) break; // entries read now stay pending for recovery
        for (const stream of streams) ahead.delete(stream);
        const items = this.#staged;
        for (const [stream, entries] of reply) {
          if (entries.length >= room) ahead.set(stream, entries[entries.length - 1][0]);
          for (const [id, fields] of entries) items.push(this.#item(stream, id, fields, false));
        }
        items.sort((a, b) => compareEntryIds(a.entryId, b.entryId));
        frontier = oldestOf(ahead.values());
        let admitted = items.length;
        if (frontier !== undefined) {
          admitted = 0;
          while (
            admitted < items.length && compareEntryIds(items[admitted].entryId, frontier) <= 0
          ) {
            admitted++;
          }
        }
        this.#staged = items.slice(admitted);
        for (let i = 0; i < admitted; i++) this.#admit(items[i]);
      } catch (error) {
        if (signal.aborted) break;
        await this.#onRedisError(error);
      }
    }
  }

  /**
   * Reads this consumer's own pending entries: at start, those of a previous run under the same
   * name; `again` after a reconnect, those whose delivery was lost with the connection (the
   * entries already held are skipped, so at most one lost read's worth is added past the room).
   */
  async #recoverOwnPending(again = false): Promise<void> {
    const signal = this.#stopping.signal;
    let recovered = 0;
    // Staged entries are ours and known; they wait for their turn (see `#readEntries`).
    const staged = new Set(this.#staged.map((item) => entryKey(item.stream, item.entryId)));
    for (const stream of this.#streams) {
      let after = "0";
      while (!signal.aborted) {
        try {
          if (!again) await this.#scheduler.whenHeldBelow(this.#maxHeld, signal);
          const reply = await this.#xreadgroup(
            [stream],
            after,
            again ? this.#maxHeld : this.#maxHeld - this.#scheduler.held,
          );
          const entries = reply[0]?.[1] ?? [];
          if (entries.length === 0) break;
          for (const [id, fields] of entries) {
            if (staged.has(entryKey(stream, id))) continue;
            if (this.#admit(this.#item(stream, id, fields, true))) recovered++;
          }
          after = entries[entries.length - 1][0];
        } catch (error) {
          if (signal.aborted) return;
          await this.#onRedisError(error);
        }
      }
    }
    if (again && recovered > 0) {
      this.#log.warn(
        "Redis came back: {n} pending entr(y/ies) of ours, delivered in a reply lost with the connection, taken back.",
        { n: recovered },
      );
    }
  }

  /** Claims entries another consumer has held longer than `WORKER_CLAIM_IDLE_MS`. */
  async #claimStalled(): Promise<void> {
    for (const stream of this.#streams) {
      let cursor = "0-0";
      do {
        if (this.#stopping.signal.aborted) return;
        const room = this.#maxHeld - this.#scheduler.held;
        if (room <= 0) return;
        const [next, entries] = await this.#redis.xautoclaim(
          stream,
          GROUP,
          this.#s.workerConsumerName,
          this.#s.workerClaimIdleMs,
          cursor,
          "COUNT",
          room,
        ) as [string, Array<[string, string[] | null]>, string[]];
        for (const [id, fields] of entries) {
          if (this.#held.has(entryKey(stream, id))) continue;
          this.#log.info("Claimed stalled entry {id} from {stream}.", { id, stream });
          this.#admit(this.#item(stream, id, fields, true));
        }
        cursor = next;
      } while (cursor !== "0-0");
    }
  }

  /** Resets the idle time of the entries this consumer holds, so no replica claims them. */
  async #heartbeat(): Promise<void> {
    const byStream = new Map<string, string[]>();
    for (const item of [...this.#held.values(), ...this.#staged]) {
      const ids = byStream.get(item.stream) ?? [];
      ids.push(item.entryId);
      byStream.set(item.stream, ids);
    }
    for (const [stream, ids] of byStream) {
      const pending = await this.#redis.xpending(
        stream,
        GROUP,
        ids.reduce((a, b) => compareEntryIds(a, b) <= 0 ? a : b),
        "+",
        ids.length + 100,
        this.#s.workerConsumerName,
      ) as Array<[string, string, number, number]>;
      const ours = new Set(pending.map(([id]) => id));
      const mine = ids.filter((id) => ours.has(id));
      for (const id of ids) {
        if (!ours.has(id)) {
          this.#log.warn(
            "Entry {id} of {stream} is no longer ours (another consumer claimed it).",
            { id, stream },
          );
        }
      }
      if (mine.length > 0) {
        await this.#redis.xclaim(stream, GROUP, this.#s.workerConsumerName, 0, ...mine, "JUSTID");
      }
    }
  }

  async #xreadgroup(
    streams: readonly string[],
    after: string,
    count: number,
    blockMs?: number,
  ): Promise<Array<[string, Array<[string, string[] | null]>]>> {
    const args: (string | number)[] = ["GROUP", GROUP, this.#s.workerConsumerName, "COUNT", count];
    if (blockMs !== undefined) args.push("BLOCK", blockMs);
    args.push("STREAMS", ...streams, ...streams.map(() => after));
    const reply = await this.#reader.call("XREADGROUP", ...args);
    return (reply ?? []) as Array<[string, Array<[string, string[] | null]>]>;
  }

  async #onRedisError(error: unknown): Promise<void> {
    const message = describeError(error);
    if (message.includes("NOGROUP")) {
      // Redis lost its data (restarted without persistence): the groups come back empty.
      this.#log.warn("Consumer group missing ({message}); creating it again.", { message });
      await ensureGroups(this.#redis, this.#streams).catch(() => {});
    } else if (this.#now() - this.#lastReadError > 10_000) {
      this.#lastReadError = this.#now();
      this.#log.error(
        "Reading the job streams failed: {message}. Retrying; check REDIS_URL and that Redis is up.",
        {
          message,
        },
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }

  #item(stream: string, entryId: string, fields: string[] | null, redelivered: boolean): WorkItem {
    const parsed = fields
      ? parseEntry(stream, entryId, fields)
      : { ok: false as const, reason: "the entry was deleted from the stream" };
    return {
      stream,
      entryId,
      fields: fields ?? [],
      // Malformed entries are nobody's: they never hold a user's jobs back.
      userId: parsed.ok ? parsed.job.userId : null,
      parsed,
      redelivered,
      answers: new MemoryEffects(),
    };
  }

  /** Hands an entry to the scheduler unless it is held already; true when it was new. */
  #admit(item: WorkItem): boolean {
    const key = entryKey(item.stream, item.entryId);
    if (this.#held.has(key)) return false;
    this.#held.set(key, item);
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

  #release(item: WorkItem): void {
    this.#held.delete(entryKey(item.stream, item.entryId));
  }

  async #every(intervalMs: number, task: () => Promise<void>): Promise<void> {
    const signal = this.#stopping.signal;
    while (!signal.aborted) {
      try {
        await sleep(intervalMs, signal);
        await task();
      } catch (error) {
        if (signal.aborted) return;
        this.#log.warn("Background task failed: {message}", { message: describeError(error) });
      }
    }
  }

  #claimIntervalMs(): number {
    return Math.min(60_000, Math.max(200, Math.floor(this.#s.workerClaimIdleMs / 2)));
  }

  // ---------------------------------------------------------------- running

  async #runItem(item: WorkItem): Promise<RunOutcome> {
    if (!item.parsed.ok) return await this.#deadLetter(item, item.parsed);
    const job = item.parsed.job;
    const started = performance.now();
    let outcome: JobOutcome = "retry_error";
    try {
      const context = { jobId: job.jobId, jobType: job.jobType, userId: job.userId };
      const result = await withJobContext(
        context,
        () => traceJob(job, () => this.#runJob(item, job)),
      );
      outcome = result.outcome;
      if (ENDED_OUTCOMES.includes(outcome)) {
        this.#release(item);
        this.#tracker.clear(job.jobId);
      }
      return result.retry;
    } catch (error) {
      // Redis unreachable while ending the job, or a bug: try again later, nothing acknowledged.
      this.#log.error(
        "Job {jobId} ({jobType}) hit an unexpected error: {message}. It will be retried.",
        {
          jobId: job.jobId,
          jobType: job.jobType,
          message: describeError(error),
        },
      );
      return { retryInMs: 5_000 };
    } finally {
      const durationMs = performance.now() - started;
      this.#events.jobEnded?.(job, outcome, durationMs);
      const level = outcome === "failed" ? "warn" : "info";
      this.#log[level](
        "Job {jobId} ({jobType}) for user {userId} ended: {outcome} in {durationMs} ms (attempt {attempt} of {maxAttempts}, after {waits} wait(s)).",
        {
          jobId: job.jobId,
          jobType: job.jobType,
          userId: job.userId,
          outcome,
          durationMs: Math.round(durationMs),
          attempt: item.run?.attempt ?? this.#attempt(item),
          maxAttempts: this.#tracker.maxRetries,
          waits: item.run?.waits ?? item.record?.unavailableAttempts ?? 0,
        },
      );
    }
  }

  async #runJob(item: WorkItem, job: Job): Promise<{ outcome: JobOutcome; retry?: RunOutcome }> {
    if (this.#hardStop.signal.aborted) return { outcome: "abandoned" };
    const log = this.#log.with({ jobId: job.jobId, jobType: job.jobType, userId: job.userId });
    try {
      if (!item.record) {
        item.record = await this.#ledger.load(job.jobId);
        item.effects = this.#ledger.effects(job.jobId, item.record);
        if (item.record.done) {
          await this.#ledger.ack(job);
          log.debug(
            "Job {jobId} had ended here already ({status}); entry {entryId} acknowledged.",
            {
              status: item.record.done,
              entryId: job.entryId,
            },
          );
          return { outcome: "skipped" };
        }
        if (item.redelivered || item.record.exists) {
          const skipped = await this.#skipIfFinishedInCore(item, job);
          if (skipped) return { outcome: "skipped" };
        }
      }
    } catch (error) {
      return this.#onRunError(item, job, error, log);
    }
    const run = { attempt: this.#attempt(item), waits: item.record.unavailableAttempts };
    item.run = run;
    return await withJobContext(run, async () => {
      try {
        this.#events.jobStarted?.(job, run.attempt);
        const values = { ...run, maxAttempts: this.#tracker.maxRetries };
        if (run.waits === 0) {
          log.info(
            "Job {jobId} ({jobType}) for user {userId} started: attempt {attempt} of {maxAttempts}.",
            values,
          );
        } else {
          log.info(
            "Job {jobId} ({jobType}) for user {userId} started: attempt {attempt} of {maxAttempts}, after {waits} wait(s) for the model server or Core (waits are not attempts).",
            values,
          );
        }
        item.ending ??= await this.#decide(item, job, log);
        if (!item.ending) return { outcome: "abandoned" };
        return { outcome: await this.#end(job, item.ending, log) };
      } catch (error) {
        return this.#onRunError(item, job, error, log);
      }
    });
  }

  /** Runs the handler, or decides a failure without it; `undefined` when the stop cut it short. */
  async #decide(item: WorkItem, job: Job, log: Logger): Promise<Ending | undefined> {
    const handler = this.#handlers[job.jobType];
    if (this.#now() >= expiresAt(entryTimeMs(job.entryId))) {
      return this.#failure(job, "The job expired: it was queued more than 14 days ago.");
    }
    if (handler.requiresUser && job.userId === null) {
      return this.#failure(
        job,
        `A ${job.jobType} job acts for an owner, but its user_id is null; the producer must send the user.`,
      );
    }
    const payload = handler.payloadSchema.safeParse(job.payload);
    if (!payload.success) {
      const issues = payload.error.issues.slice(0, 5).map((i) =>
        `${i.path.join(".") || "payload"}: ${i.message}`
      );
      return this.#failure(job, `The ${job.jobType} payload is invalid: ${issues.join("; ")}.`);
    }
    let result: HandlerResult;
    try {
      result = await handler.run({
        job,
        core: this.#core,
        model: this.#model.forJob(job.jobType, item.answers, log),
        effects: item.effects!,
        settings: this.#s,
        now: () => new Date(this.#now()),
        signal: this.#hardStop.signal,
        log,
      }, payload.data);
    } catch (error) {
      if (this.#hardStop.signal.aborted) return undefined;
      throw error;
    }
    return {
      status: "completed",
      result: result.result,
      notifications: job.userId === null
        ? []
        : result.notifications.map((n) => ({ user_id: job.userId!, ...n })),
    };
  }

  /**
   * Writes the end of a job: outbox, Core's PATCH, then notifications + XACK at once. Resolves
   * with the job's outcome: its status, or `unrecorded` when Core refused the PATCH for good.
   */
  async #end(
    job: Job,
    ending: Ending,
    log: Logger,
  ): Promise<"completed" | "failed" | "unrecorded"> {
    if (ending.notifications.length > 0) {
      await this.#ledger.saveOutbox(job.jobId, ending.notifications);
    }
    let outcome: "completed" | "failed" | "unrecorded" = ending.status;
    try {
      await this.#core.updateJob(
        job.jobId,
        ending.status === "completed"
          ? { status: "completed", result: ending.result }
          : { status: "failed", error_message: ending.errorMessage },
        this.#hardStop.signal,
      );
    } catch (error) {
      if (!(error instanceof CoreApiError) || error.retryable) throw error;
      // Core can never take this update (e.g. it does not know the job): say so, end it anyway.
      outcome = "unrecorded";
      log.warn(
        "Job {jobId} ({jobType}) {status}, but its result could not be recorded in Core: {why}. The entry is acknowledged; the job counts as unrecorded.",
        {
          status: ending.status,
          why: error.status === 404
            ? "Core does not know the job (404 to the final PATCH)"
            : `Core refused the final PATCH with ${error.status}: ${error.body}`,
          coreStatus: error.status,
          errorMessage: ending.errorMessage,
        },
      );
    }
    await this.#ledger.finish(job, ending.status, ending.notifications);
    log.debug(
      "Job {jobId}: entry {entryId} of {stream} acknowledged, {notifications} notification(s) sent.",
      { entryId: job.entryId, stream: job.stream, notifications: ending.notifications.length },
    );
    if (outcome === "failed") {
      log.warn("Job {jobId} ({jobType}) failed: {reason}", { reason: ending.errorMessage });
    }
    return outcome;
  }

  /** A redelivered job that Core already shows as ended is acknowledged, not redone. */
  async #skipIfFinishedInCore(item: WorkItem, job: Job): Promise<boolean> {
    let status: string;
    try {
      status = (await this.#core.getJob(job.jobId, this.#hardStop.signal)).status;
    } catch (error) {
      if (!(error instanceof CoreApiError && error.status === 404)) throw error;
      // Core does not know the job: nothing it could ever take, so the handler does not run.
      item.ending = this.#failure(job, `Core does not know job ${job.jobId} (404).`);
      return false;
    }
    if (status !== "completed" && status !== "failed") return false;
    // Crashed after Core's PATCH but before the notifications: send what was saved.
    await this.#ledger.finish(job, status, item.record?.outbox ?? []);
    this.#log.info("Job {jobId} was already {status} in Core; acknowledged without redoing it.", {
      jobId: job.jobId,
      status,
    });
    return true;
  }

  async #onRunError(
    item: WorkItem,
    job: Job,
    error: unknown,
    log: Logger,
  ): Promise<{ outcome: JobOutcome; retry?: RunOutcome }> {
    if (this.#hardStop.signal.aborted) return { outcome: "abandoned" };
    let ending: Ending | undefined;
    if (error instanceof InvalidAnswerError) {
      // The handler may refuse an answer the gateway found valid (and kept): ask afresh.
      item.answers.done.clear();
      this.#tracker.restore(job.jobId, await this.#ledger.countInvalid(job.jobId));
      item.record!.invalidAttempts = this.#tracker.attempts(job.jobId);
      if (this.#tracker.shouldRetry(job.jobId)) {
        const delay = this.#tracker.backoffSeconds(job.jobId) * 1000;
        await this.#markProcessing(job, log);
        log.warn(
          "Job {jobId}: invalid model answer at attempt {attempt} of {maxAttempts} ({reason}); attempt {next} in {delay} ms.",
          {
            attempt: item.record!.invalidAttempts,
            maxAttempts: this.#tracker.maxRetries,
            next: item.record!.invalidAttempts + 1,
            reason: error.message,
            delay,
            answer: error.answer,
          },
        );
        return { outcome: "retry_invalid", retry: { retryInMs: delay } };
      }
      ending = this.#failure(
        job,
        `The model gave no valid answer in ${this.#tracker.maxRetries} attempts; last problem: ${error.message}`,
      );
    } else if (isUnavailable(error)) {
      return { outcome: "retry_unavailable", retry: await this.#wait(item, job, error, log) };
    } else if (error instanceof JobFailedError) {
      ending = this.#failure(job, error.message, error.userMessage);
    } else if (error instanceof LLMError) {
      ending = this.#failure(
        job,
        `The model server refused the request (check LLM_TEXT_MODEL / LLM_VISION_MODEL and LLM_API_KEY): ${error.message}`,
      );
    } else if (error instanceof CoreApiError) {
      ending = this.#failure(job, `Core refused a call the job needs: ${error.message}`);
    } else {
      throw error;
    }
    item.ending = ending;
    try {
      return { outcome: await this.#end(job, ending, log) };
    } catch (endError) {
      if (isUnavailable(endError)) {
        return { outcome: "retry_unavailable", retry: await this.#wait(item, job, endError, log) };
      }
      throw endError;
    }
  }

  /** Schedules the next try of a job that met an unavailable model server or Core. */
  async #wait(
    item: WorkItem,
    job: Job,
    error: LLMError | CoreApiError,
    log: Logger,
  ): Promise<RunOutcome> {
    const count = await this.#ledger.countUnavailable(job.jobId);
    item.record!.unavailableAttempts = count;
    const fromModel = error instanceof LLMError;
    if (fromModel) {
      await this.#markProcessing(job, log);
      if (job.userId !== null) {
        // The flag and the notice in one step: a retry, or a command sent again after a lost
        // connection, never tells the user twice.
        await this.#ledger.notifyOnce(job.jobId, "told", {
          user_id: job.userId,
          message_type: "llm_failure",
          content: {
            job_type: job.jobType,
            memory_id: memoryIdOf(job),
            message:
              "The assistant's language model is unavailable right now; your request is saved and will run when it is back.",
          },
        });
      }
    }
    let delay = unavailableDelayMs(
      count,
      error instanceof LLMError ? error.retryAfterMs : undefined,
    );
    const left = expiresAt(entryTimeMs(job.entryId)) - this.#now();
    delay = Math.max(0, Math.min(delay, left)); // at expiry the next run gives up
    log.warn(
      "Job {jobId} waits {delay} ms (wait {waits}, not counted against LLM_MAX_RETRIES): {reason}",
      { delay, waits: count, reason: error.message },
    );
    return { retryInMs: delay, wake: fromModel ? this.#health.nextRecovery() : undefined };
  }

  /** A job that waits is `processing` in Core; told once per job (best effort: Core may be down). */
  async #markProcessing(job: Job, log: Logger): Promise<void> {
    if (!await this.#ledger.setOnce(job.jobId, "processing")) return;
    await this.#core.updateJob(job.jobId, { status: "processing" }).catch((e) =>
      log.debug("Could not mark job {jobId} processing: {message}", { message: describeError(e) })
    );
  }

  #failure(job: Job, errorMessage: string, userMessage?: string): Ending {
    return {
      status: "failed",
      result: null,
      errorMessage,
      notifications: job.userId === null ? [] : [{
        user_id: job.userId,
        message_type: "llm_failure",
        content: {
          job_type: job.jobType,
          memory_id: memoryIdOf(job),
          message: userMessage ?? USER_FAILURE_MESSAGES[job.jobType],
        },
      }],
    };
  }

  /** Copies a malformed entry to `llm:dead`, marks its job failed when it names one, then acks. */
  async #deadLetter(
    item: WorkItem,
    parsed: { reason: string; jobId?: string },
  ): Promise<RunOutcome> {
    const reason = `malformed job entry: ${parsed.reason}`;
    try {
      if (parsed.jobId) {
        await this.#core.updateJob(parsed.jobId, { status: "failed", error_message: reason }).catch(
          (error) => {
            if (error instanceof CoreApiError && !error.retryable) {
              this.#log.warn("Core refused to mark job {jobId} failed: {message}", {
                jobId: parsed.jobId,
                message: error.message,
              });
            } else throw error;
          },
        );
      }
      await moveToDead(this.#redis, item.stream, item.entryId, reason, item.fields);
    } catch (error) {
      this.#log.warn("Could not dead-letter entry {id} of {stream} yet: {message}", {
        id: item.entryId,
        stream: item.stream,
        message: describeError(error),
      });
      return { retryInMs: 5_000 };
    }
    this.#release(item);
    this.#events.deadLettered?.(item.stream, parsed.reason);
    this.#log.warn("Entry {id} of {stream} moved to llm:dead: {reason}", {
      id: item.entryId,
      stream: item.stream,
      reason: parsed.reason,
    });
  }

  /** The attempt counted against `LLM_MAX_RETRIES`: invalid answers so far, plus one. */
  #attempt(item: WorkItem): number {
    return 1 + (item.record?.invalidAttempts ?? 0);
  }
}

/** One plain sentence per job type for a job that gave up. */
const USER_FAILURE_MESSAGES: Record<JobType, string> = {
  image_tag: "Sorry, I couldn't describe and tag your photo.",
  intent_classify: "Sorry, I couldn't understand that message; please try rephrasing it.",
  followup: "Sorry, I couldn't come up with a follow-up question.",
  task_match: "Sorry, I couldn't check whether your note matches one of your tasks.",
  email_extract: "Sorry, I couldn't read the events in that email.",
};

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

/** The key of an entry in `#held`: its stream and id. */
function entryKey(stream: string, entryId: string): string {
  return `${stream} ${entryId}`;
}

/** The oldest of some entry ids (`undefined` for none). */
function oldestOf(ids: Iterable<string>): string | undefined {
  let oldest: string | undefined;
  for (const id of ids) if (oldest === undefined || compareEntryIds(id, oldest) < 0) oldest = id;
  return oldest;
}

function memoryIdOf(job: Job): string {
  const id = job.payload.memory_id;
  return typeof id === "string" ? id : "";
}

function isUnavailable(error: unknown): error is LLMError | CoreApiError {
  return (error instanceof LLMError && error.kind === "unavailable") ||
    (error instanceof CoreApiError && error.retryable);
}
