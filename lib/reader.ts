/**
 * Reading the job streams, and taking back what was lost: reads through the per-user leases
 * (lib/user_lease.ts: the oldest new entries across the streams, each queued for its user), in
 * batches once a quarter of the room is free, waiting with a blocking `XREAD` when nothing is
 * new, and for a quarter of the room's jobs to end when too many entries are pending under it;
 * this consumer's own pending entries taken back at start and after every reconnect; a missing
 * group created again.
 *
 * Invariant: a user's entries are queued for the user in Redis in the step that delivers them, so
 * no replica runs one before an older entry of the same user.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Redis } from "ioredis";
import { describeError, logger } from "./log.ts";
import { ensureGroups, GROUP } from "./streams.ts";
import { sleep } from "./utils.ts";

/** What one read delivered (see `UserLeases.read`). */
export interface ReadSummary {
  /** Entries delivered to this consumer. */
  read: number;
  /** Fewer were read than asked because too many entries are pending under this consumer. */
  capped: boolean;
  /** Per stream, the group's last delivered id after the read. */
  lastIds: string[];
}

/** Options of {@linkcode StreamReader}. */
export interface StreamReaderOptions {
  /** Connection for ordinary commands (groups; its reconnects count too). */
  redis: Redis;
  /** A second connection, for the blocking `XREAD` only. */
  reader: Redis;
  /** This consumer's name in the group. */
  consumerName: string;
  /** The streams to read. */
  streams: readonly string[];
  /** How long one `XREADGROUP` blocks (ms); also bounds how fast a stop is noticed. */
  blockMs: number;
  /** The most entries held at once. */
  maxHeld: number;
  /** Where entries go: how many are held and over, and waiting for room. */
  scheduler: {
    readonly held: number;
    readonly ended: number;
    whenHeldBelow(limit: number, signal?: AbortSignal): Promise<void>;
    whenEnded(count: number, signal?: AbortSignal): Promise<void>;
  };
  /** Reading waits while the model server is down. */
  health: { untilAvailable(signal?: AbortSignal): Promise<void> };
  /** Reads up to `room` new entries and hands over those this replica runs. */
  read: (room: number) => Promise<ReadSummary>;
  /** Takes back entries pending under this consumer; answers how many were handed over. */
  adopt: (entries: Array<{ stream: string; entryId: string }>) => Promise<number>;
  /** Claims stalled entries of other consumers (once, after the own pending list). */
  claimStalled: () => Promise<void>;
  /** The clock in ms. */
  now: () => number;
}

/**
 * The read loop of one consumer.
 *
 * @example
 * ```ts ignore
 * const reader = new StreamReader({ redis, reader: blocking, consumerName: "w1",
 *   streams: JOB_STREAMS, blockMs: 1000, maxHeld: 32, scheduler, health, now: Date.now,
 *   read, adopt, claimStalled: () => leases.claimStalled() });
 * const loop = reader.run(stopping.signal);
 * ```
 */
export class StreamReader {
  readonly #redis: Redis;
  readonly #reader: Redis;
  readonly #consumerName: string;
  readonly #streams: readonly string[];
  readonly #blockMs: number;
  readonly #maxHeld: number;
  readonly #scheduler: StreamReaderOptions["scheduler"];
  readonly #health: StreamReaderOptions["health"];
  readonly #read: (room: number) => Promise<ReadSummary>;
  readonly #adopt: (entries: Array<{ stream: string; entryId: string }>) => Promise<number>;
  readonly #claimStalled: () => Promise<void>;
  readonly #now: () => number;
  readonly #log: Logger = logger("consumer");
  #signal: AbortSignal = new AbortController().signal;
  #lastReadError = 0;
  /** Set when a Redis connection came back: the read loop reads our pending list again. */
  #reconnected = false;

  /** Reads nothing until {@linkcode StreamReader.run}. */
  constructor(options: StreamReaderOptions) {
    this.#redis = options.redis;
    this.#reader = options.reader;
    this.#consumerName = options.consumerName;
    this.#streams = options.streams;
    this.#blockMs = options.blockMs;
    this.#maxHeld = options.maxHeld;
    this.#scheduler = options.scheduler;
    this.#health = options.health;
    this.#read = options.read;
    this.#adopt = options.adopt;
    this.#claimStalled = options.claimStalled;
    this.#now = options.now;
  }

  /**
   * Takes back this consumer's own pending entries, claims stalled ones once, then reads until
   * `signal` aborts. Entries read after the abort stay pending for recovery.
   */
  async run(signal: AbortSignal): Promise<void> {
    this.#signal = signal;
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

  /** The read loop proper (see {@linkcode StreamReader.run}). */
  async #readEntries(signal: AbortSignal): Promise<void> {
    await this.#recoverOwnPending();
    this.#reconnected = false; // the first connects: nothing can have been lost yet
    // Redis lost and back during this first claim (NOGROUP): the periodic claim tries again.
    await this.#claimStalled().catch((error) => {
      if (!signal.aborted) return this.#onRedisError(error);
    });
    // A busy worker reads in batches, once a quarter of its room is free: one read then serves
    // many jobs instead of one (an idle worker reads at once).
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
        const read = await this.#read(room);
        if (signal.aborted) break; // a stopped scheduler takes nothing: they stay pending
        if (read.read < room) await this.#waitForEntries(read, batch, signal);
      } catch (error) {
        if (signal.aborted) break;
        await this.#onRedisError(error);
      }
    }
  }

  /**
   * Waits for entries newer than the last read (at most `blockMs`); with too many entries pending
   * under this consumer, until `batch` of them are over here, or for 100 ms at most (entries
   * whose users other replicas hold leave as those replicas take them).
   */
  async #waitForEntries(read: ReadSummary, batch: number, signal: AbortSignal): Promise<void> {
    if (read.capped) {
      const waited = new AbortController();
      const either = AbortSignal.any([signal, waited.signal]);
      await Promise.race([
        sleep(Math.min(this.#blockMs, 100), either),
        this.#scheduler.whenEnded(this.#scheduler.ended + batch, either),
      ]).finally(() => waited.abort());
      return;
    }
    await this.#reader.call(
      "XREAD",
      "COUNT",
      1,
      "BLOCK",
      this.#blockMs,
      "STREAMS",
      ...this.#streams,
      ...read.lastIds,
    );
  }

  /**
   * Takes back this consumer's own pending entries: at start, those of a previous run under the
   * same name (and its users' leases, at once); `again` after a reconnect, those whose delivery
   * was lost with the connection (the entries already held are skipped).
   */
  async #recoverOwnPending(again = false): Promise<void> {
    const signal = this.#signal;
    let recovered = 0;
    for (const stream of this.#streams) {
      let after = "-";
      while (!signal.aborted) {
        try {
          const pending = await this.#redis.xpending(
            stream,
            GROUP,
            after,
            "+",
            this.#maxHeld,
            this.#consumerName,
          ) as Array<[string, string, number, number]>;
          if (pending.length === 0) break;
          recovered += await this.#adopt(pending.map(([entryId]) => ({ stream, entryId })));
          after = `(${pending[pending.length - 1][0]}`;
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
}
