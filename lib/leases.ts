/**
 * The entries a consumer holds, and keeping them its own (as BullMQ's `LockManager` keeps a
 * worker's locks): every `WORKER_CLAIM_IDLE_MS / 4` their idle time is reset, so no replica claims
 * work that is still alive, and every `WORKER_CLAIM_IDLE_MS / 2` (at most every minute) entries
 * another consumer has held longer than `WORKER_CLAIM_IDLE_MS` are claimed.
 *
 * An entry is held from its read (or claim) until it is acknowledged or left for another
 * consumer; the same entry is never held twice.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Redis } from "ioredis";
import { describeError, logger } from "./log.ts";
import { compareEntryIds, GROUP } from "./streams.ts";
import { sleep } from "./utils.ts";
import { entryKey, type WorkItem, workItem } from "./work_item.ts";

/** Options of {@linkcode EntryLeases}. */
export interface EntryLeasesOptions {
  /** Connection for ordinary commands. */
  redis: Redis;
  /** This consumer's name in the group. */
  consumerName: string;
  /** `WORKER_CLAIM_IDLE_MS`. */
  claimIdleMs: number;
  /** The streams read. */
  streams: readonly string[];
  /** Entries read but not handed over yet: held all the same. */
  staged: () => readonly WorkItem[];
  /** How many more entries may be held now. */
  room: () => number;
  /** Hands a claimed entry over (it is added to the held ones there). */
  admit: (item: WorkItem) => void;
}

/**
 * The held entries, their heartbeat and the claims of stalled ones.
 *
 * @example
 * ```ts ignore
 * const leases = new EntryLeases({ redis, consumerName: "w1", claimIdleMs: 600_000,
 *   streams: JOB_STREAMS, staged: () => [], room: () => 32, admit: (item) => leases.add(item) });
 * const loops = leases.start(stopping.signal);
 * ```
 */
export class EntryLeases {
  readonly #redis: Redis;
  readonly #consumerName: string;
  readonly #claimIdleMs: number;
  readonly #streams: readonly string[];
  readonly #staged: () => readonly WorkItem[];
  readonly #room: () => number;
  readonly #admit: (item: WorkItem) => void;
  readonly #log: Logger = logger("consumer");
  /** Entries held in memory, by {@linkcode entryKey}. */
  readonly #held = new Map<string, WorkItem>();
  #signal: AbortSignal = new AbortController().signal;

  /** Holds nothing until entries are added. */
  constructor(options: EntryLeasesOptions) {
    this.#redis = options.redis;
    this.#consumerName = options.consumerName;
    this.#claimIdleMs = options.claimIdleMs;
    this.#streams = options.streams;
    this.#staged = options.staged;
    this.#room = options.room;
    this.#admit = options.admit;
  }

  /** Holds `item` unless an entry with its key is held already; true when it was new. */
  add(item: WorkItem): boolean {
    const key = entryKey(item.stream, item.entryId);
    if (this.#held.has(key)) return false;
    this.#held.set(key, item);
    return true;
  }

  /** Stops holding `item` (acknowledged, or dead-lettered). */
  release(item: WorkItem): void {
    this.#held.delete(entryKey(item.stream, item.entryId));
  }

  /**
   * Starts the heartbeat and the periodic claims, until `signal` aborts; resolves with their
   * loops (which end then). A claim also runs when the reader asks ({@linkcode claimStalled}).
   */
  start(signal: AbortSignal): Promise<void>[] {
    this.#signal = signal;
    return [
      this.#every(
        Math.min(60_000, Math.max(200, Math.floor(this.#claimIdleMs / 2))),
        () => this.claimStalled(),
      ),
      this.#every(Math.max(250, Math.floor(this.#claimIdleMs / 4)), () => this.heartbeat()),
    ];
  }

  /** Claims entries another consumer has held longer than `WORKER_CLAIM_IDLE_MS`. */
  async claimStalled(): Promise<void> {
    for (const stream of this.#streams) {
      let cursor = "0-0";
      do {
        if (this.#signal.aborted) return;
        const room = this.#room();
        if (room <= 0) return;
        const [next, entries] = await this.#redis.xautoclaim(
          stream,
          GROUP,
          this.#consumerName,
          this.#claimIdleMs,
          cursor,
          "COUNT",
          room,
        ) as [string, Array<[string, string[] | null]>, string[]];
        for (const [id, fields] of entries) {
          if (this.#held.has(entryKey(stream, id))) continue;
          this.#log.info("Claimed stalled entry {id} from {stream}.", { id, stream });
          this.#admit(workItem(stream, id, fields, true));
        }
        cursor = next;
      } while (cursor !== "0-0");
    }
  }

  /** Resets the idle time of the entries this consumer holds, so no replica claims them. */
  async heartbeat(): Promise<void> {
    const byStream = new Map<string, string[]>();
    for (const item of [...this.#held.values(), ...this.#staged()]) {
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
        this.#consumerName,
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
        await this.#redis.xclaim(stream, GROUP, this.#consumerName, 0, ...mine, "JUSTID");
      }
    }
  }

  async #every(intervalMs: number, task: () => Promise<void>): Promise<void> {
    const signal = this.#signal;
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
}
