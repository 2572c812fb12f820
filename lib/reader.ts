/**
 * Reading the job streams, and taking back what was lost: one blocking `XREADGROUP` over every
 * job stream, in batches once a quarter of the room is free; this consumer's own pending entries
 * read again at start and after every reconnect; a missing group created again.
 *
 * Invariant: a user's entries reach the scheduler in entry-id order across all streams. A stream
 * whose read filled its COUNT may hold entries older than those read from another stream, so
 * entries past that stream's last id are staged (held, not yet handed over) until it is read
 * further.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Redis } from "ioredis";
import { describeError, logger } from "./log.ts";
import { compareEntryIds, ensureGroups, GROUP } from "./streams.ts";
import { entryKey, type WorkItem, workItem } from "./work_item.ts";

/** Options of {@linkcode StreamReader}. */
export interface StreamReaderOptions {
  /** Connection for ordinary commands (groups; its reconnects count too). */
  redis: Redis;
  /** A second connection, for the blocking `XREADGROUP` only. */
  reader: Redis;
  /** This consumer's name in the group. */
  consumerName: string;
  /** The streams to read. */
  streams: readonly string[];
  /** How long one `XREADGROUP` blocks (ms); also bounds how fast a stop is noticed. */
  blockMs: number;
  /** The most entries held at once. */
  maxHeld: number;
  /** Where entries go: how many are held, and waiting for room. */
  scheduler: {
    readonly held: number;
    whenHeldBelow(limit: number, signal?: AbortSignal): Promise<void>;
  };
  /** Reading waits while the model server is down. */
  health: { untilAvailable(signal?: AbortSignal): Promise<void> };
  /** Hands an entry over; false when it is held already. */
  admit: (item: WorkItem) => boolean;
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
 *   admit: (item) => leases.add(item), claimStalled: () => leases.claimStalled() });
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
  readonly #admit: (item: WorkItem) => boolean;
  readonly #claimStalled: () => Promise<void>;
  readonly #now: () => number;
  readonly #log: Logger = logger("consumer");
  /** Entries read but not handed to the scheduler yet (see `#readEntries`); ours all the same. */
  #staged: WorkItem[] = [];
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
    this.#admit = options.admit;
    this.#claimStalled = options.claimStalled;
    this.#now = options.now;
  }

  /** Entries read but not handed over yet (held all the same: the heartbeat keeps them). */
  get staged(): readonly WorkItem[] {
    return this.#staged;
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
          for (const [id, fields] of entries) items.push(workItem(stream, id, fields, false));
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
    const signal = this.#signal;
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
            if (this.#admit(workItem(stream, id, fields, true))) recovered++;
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

  async #xreadgroup(
    streams: readonly string[],
    after: string,
    count: number,
    blockMs?: number,
  ): Promise<Array<[string, Array<[string, string[] | null]>]>> {
    const args: (string | number)[] = ["GROUP", GROUP, this.#consumerName, "COUNT", count];
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
}

/** The oldest of some entry ids (`undefined` for none). */
function oldestOf(ids: Iterable<string>): string | undefined {
  let oldest: string | undefined;
  for (const id of ids) if (oldest === undefined || compareEntryIds(id, oldest) < 0) oldest = id;
  return oldest;
}
