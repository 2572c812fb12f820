/**
 * The entries a consumer holds, and keeping them its own (as BullMQ's `LockManager` keeps a
 * worker's locks): every `WORKER_CLAIM_IDLE_MS / 4` the idle time of every entry pending under
 * it is reset (those it runs, and those it read for users another replica holds), so no replica
 * claims work that is still alive, and every `WORKER_CLAIM_IDLE_MS / 2` (at most every minute)
 * entries another consumer has held longer than `WORKER_CLAIM_IDLE_MS` are claimed. Users' order
 * is kept by the users' leases (lib/user_lease.ts), not here.
 *
 * An entry is held from its read (or claim) until it is acknowledged or left for another
 * consumer; the same entry is never held twice.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Redis } from "ioredis";
import { runScript } from "./redis.ts";
import { describeError, logger } from "./log.ts";
import { GROUP } from "./streams.ts";
import { repeatEvery } from "./utils.ts";
import { entryKey, type WorkItem } from "./work_item.ts";

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
  /** The most entries pending under this consumer (heartbeat's bound). */
  maxPending: number;
  /** How many more entries may be held now. */
  room: () => number;
  /** Takes claimed entries over (queued for their users; those this replica runs, handed over). */
  adopt: (entries: Array<{ stream: string; entryId: string }>) => Promise<unknown>;
}

/**
 * The held entries, their heartbeat and the claims of stalled ones.
 *
 * @example
 * ```ts ignore
 * const leases = new EntryLeases({ redis, consumerName: "w1", claimIdleMs: 600_000,
 *   streams: JOB_STREAMS, maxPending: 128, room: () => 32, adopt });
 * const loops = leases.start(stopping.signal);
 * ```
 */
export class EntryLeases {
  readonly #redis: Redis;
  readonly #consumerName: string;
  readonly #claimIdleMs: number;
  readonly #streams: readonly string[];
  readonly #maxPending: number;
  readonly #room: () => number;
  readonly #adopt: (entries: Array<{ stream: string; entryId: string }>) => Promise<unknown>;
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
    this.#maxPending = options.maxPending;
    this.#room = options.room;
    this.#adopt = options.adopt;
  }

  /** Holds `item` unless an entry with its key is held already; true when it was new. */
  add(item: WorkItem): boolean {
    const key = entryKey(item.stream, item.entryId);
    if (this.#held.has(key)) return false;
    this.#held.set(key, item);
    return true;
  }

  /** True while an entry is held. */
  has(stream: string, entryId: string): boolean {
    return this.#held.has(entryKey(stream, entryId));
  }

  /** Calls `visit` with every entry held. */
  forEach(visit: (item: WorkItem) => void): void {
    for (const item of this.#held.values()) visit(item);
  }

  /** Stops holding `item` (acknowledged, or dead-lettered). */
  release(item: WorkItem): void {
    const key = entryKey(item.stream, item.entryId);
    if (this.#held.get(key) === item) this.#held.delete(key);
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
        const [next, ids] = await this.#redis.xautoclaim(
          stream,
          GROUP,
          this.#consumerName,
          this.#claimIdleMs,
          cursor,
          "COUNT",
          room,
          "JUSTID",
        ) as [string, string[], string[]];
        const claimed = ids.filter((id) => !this.#held.has(entryKey(stream, id)));
        for (const id of claimed) {
          this.#log.info("Claimed stalled entry {id} from {stream}.", { id, stream });
        }
        await this.#adopt(claimed.map((entryId) => ({ stream, entryId })));
        cursor = next;
      } while (cursor !== "0-0");
    }
  }

  /**
   * Resets the idle time of every entry pending under this consumer, in one step per stream (so
   * an entry another replica takes meanwhile is never taken back).
   */
  async heartbeat(): Promise<void> {
    for (const stream of this.#streams) {
      await runScript(
        this.#redis,
        HEARTBEAT_SCRIPT,
        1,
        stream,
        GROUP,
        this.#consumerName,
        this.#maxPending,
      );
    }
  }

  #every(intervalMs: number, task: () => Promise<void>): Promise<void> {
    return repeatEvery(
      intervalMs,
      task,
      this.#signal,
      (error) =>
        this.#log.warn("Background task failed: {message}", { message: describeError(error) }),
    );
  }
}

/** `heartbeat`: KEYS = job stream; ARGV = group, consumer, most entries. */
const HEARTBEAT_SCRIPT = `
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[3]), ARGV[2])
for i = 1, #pending, 100 do
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for j = i, math.min(i + 99, #pending) do args[#args + 1] = pending[j][1] end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return #pending`;
