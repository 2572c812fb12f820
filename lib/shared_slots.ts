/**
 * One budget of model slots shared by every replica (`LLM_MAX_IN_FLIGHT`), kept in Redis.
 *
 * Holders are a sorted set scored by when each lease runs out (Redis's own clock, so replicas'
 * clocks never matter); waiters are a FIFO queue of tickets across all replicas, each ticket with
 * its own expiry. Lua scripts change them atomically:
 *
 * - **acquire** takes a free slot at once when nobody waits, else queues a ticket;
 * - **release** removes the caller's own holder only (each slot has a fresh random id, so a
 *   replica whose lease ran out can never give back a slot another replica holds) and hands the
 *   slot to the oldest live ticket, publishing that ticket's id: its replica wakes on the message,
 *   already holding the slot (one round trip and one message per handover, first come first
 *   served across replicas);
 * - **refresh**, every quarter lease while a replica holds or waits for slots, pushes its
 *   holders' and tickets' expiry one lease ahead, takes back a holder that expired meanwhile when
 *   there is room (else the slot counts as lost: logged), and reports tickets granted while their
 *   message was lost. A replica that waits also refreshes as soon as the earliest lease runs out.
 *
 * The budget itself is kept in Redis too (`<key>:limit`): each replica writes its own at start
 * and warns when another replica had written a different one, and every script counts against
 * the one in Redis, so all replicas share one limit even when their settings differ (the last
 * started wins; with the key gone, each replica's own).
 *
 * Every script first drops expired holders and gives the freed slots to the queue. Invariants:
 * holders never exceed the limit in Redis; a replica that dies holds its slots, and its tickets,
 * for at most {@linkcode SLOT_LEASE_MS} (a slot handed to a ticket keeps that ticket's expiry
 * until its replica refreshes it).
 *
 * A replica that stalls longer than a lease (a `SIGSTOP`, a frozen VM) may find its slot taken:
 * its request in flight then counts against no slot until it ends. A slot is always taken after
 * the replica's own `WORKER_CONCURRENCY` slot (see `stackSlots`), so one replica never queues in
 * Redis for more slots than it could use.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { runScript } from "./redis.ts";
import type { Logger } from "@logtape/logtape";
import { describeError, logger } from "./log.ts";
import type { Release, Slots } from "./slots.ts";
import { sleep } from "./utils.ts";

/** How long a slot stays held without a refresh: a dead replica's slots come back within this. */
export const SLOT_LEASE_MS = 10_000;

/**
 * The sorted set of slot holders; beside it `<key>:queue` (tickets in order), `<key>:tickets`
 * (each ticket's expiry), `<key>:seq` and `<key>:limit` (the budget); handovers are published on
 * `<key>:granted`.
 */
export const SLOTS_KEY = "llm-worker:model-slots";

/**
 * What every script starts with. KEYS = holders, queue, tickets, sequence, limit; ARGV = this
 * replica's limit (used when Redis has none), lease ms, channel, then the script's own arguments.
 */
const PRELUDE = `
local H, Q, T, C = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(redis.call('GET', KEYS[5])) or tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local channel = ARGV[3]
-- Drops expired holders, gives free slots to the oldest live tickets; returns the slots left.
local function serve()
  redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
  local free = limit - redis.call('ZCARD', H)
  while free > 0 do
    local head = redis.call('ZRANGE', Q, 0, 0)[1]
    if not head then break end
    redis.call('ZREM', Q, head)
    local expiry = tonumber(redis.call('HGET', T, head))
    redis.call('HDEL', T, head)
    if expiry and expiry > now then
      redis.call('ZADD', H, expiry, head)
      redis.call('PUBLISH', channel, head)
      free = free - 1
    end
  end
  return free
end
local function keep()
  for _, key in ipairs({H, Q, T, C}) do redis.call('PEXPIRE', key, lease * 2) end
end
-- Ms until the earliest holder's lease runs out; -1 when none.
local function nextExpiry()
  local first = redis.call('ZRANGE', H, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) - now end
  return -1
end
`;

/**
 * ARGV after the prelude's: the ids wanted, in order. The first ones take the free slots when
 * nobody waits; the others are queued. Returns `{granted, ms until the next expiry}`.
 */
const ACQUIRE_SCRIPT = `${PRELUDE}
local free = serve()
local granted = 0
for i = 4, #ARGV do
  if free > 0 then
    redis.call('ZADD', H, now + lease, ARGV[i])
    free = free - 1
    granted = granted + 1
  else
    redis.call('ZADD', Q, 'NX', redis.call('INCR', C), ARGV[i])
    redis.call('HSET', T, ARGV[i], now + lease)
  end
end
keep()
return {granted, nextExpiry()}
`;

/**
 * ARGV after the prelude's: the id. Removes it as holder or ticket and hands a freed slot on.
 * Returns 1 when it held a slot.
 */
const RELEASE_SCRIPT = `${PRELUDE}
redis.call('ZREM', Q, ARGV[4])
redis.call('HDEL', T, ARGV[4])
local removed = redis.call('ZREM', H, ARGV[4])
serve()
return removed
`;

/**
 * ARGV after the prelude's: how many ids are held, those ids, then the ids of tickets waiting.
 * Returns `{lost holders, tickets granted, tickets gone, ms until the next expiry}`.
 */
const REFRESH_SCRIPT = `${PRELUDE}
redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
local held = tonumber(ARGV[4])
local lost, granted, gone = {}, {}, {}
for i = 5, 4 + held do
  if redis.call('ZSCORE', H, ARGV[i]) or redis.call('ZCARD', H) < limit then
    redis.call('ZADD', H, now + lease, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
for i = 5 + held, #ARGV do
  if redis.call('ZSCORE', Q, ARGV[i]) then
    redis.call('HSET', T, ARGV[i], now + lease)
  elseif redis.call('ZSCORE', H, ARGV[i]) then
    redis.call('ZADD', H, now + lease, ARGV[i])
    table.insert(granted, ARGV[i])
  else
    table.insert(gone, ARGV[i])
  end
end
serve()
keep()
return {lost, granted, gone, nextExpiry()}
`;

/** Options of {@linkcode SharedSlots}. */
export interface SharedSlotsOptions {
  /** Connection for the scripts. */
  redis: Redis;
  /** A connection of its own for the handover channel (it enters subscriber mode). */
  subscriber: Redis;
  /** Slots in all, across every replica (`LLM_MAX_IN_FLIGHT`). */
  limit: number;
  /** Part of each slot's id, shown by `ZRANGE` (the consumer name). */
  owner?: string;
  /** How long a slot stays held without a refresh (ms, default {@linkcode SLOT_LEASE_MS}). */
  leaseMs?: number;
}

interface Waiter {
  /** The slot's id, once asked for in Redis. */
  id?: string;
  resolve(release: Release): void;
  reject(reason: unknown): void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

const CLOSED = "The shared model slots are closed.";

/**
 * Model slots shared through Redis by every replica. Call {@linkcode SharedSlots.start} once
 * (it subscribes to the handover channel) and {@linkcode SharedSlots.close} at the end.
 *
 * @example
 * ```ts ignore
 * const slots = new SharedSlots({ redis, subscriber, limit: 8, owner: "worker-a" });
 * await slots.start();
 * const release = await slots.acquire();
 * try {
 *   // ... one model request ...
 * } finally {
 *   release();
 * }
 * await slots.close();
 * ```
 */
export class SharedSlots implements Slots {
  readonly #redis: Redis;
  readonly #subscriber: Redis;
  readonly #limit: number;
  readonly #keys: string[];
  readonly #channel: string;
  readonly #leaseMs: number;
  readonly #prefix: string;
  readonly #log: Logger = logger("model");
  /** Ids of the slots held, refreshed while held. */
  readonly #held = new Set<string>();
  /** Ids found lost by a refresh, until their release. */
  readonly #lost = new Set<string>();
  /** Waiters not asked for in Redis yet. */
  readonly #fresh: Waiter[] = [];
  /** Waiters with a ticket in the queue, by id. */
  readonly #queued = new Map<string, Waiter>();
  #next = 0;
  #pumping = false;
  #timer?: ReturnType<typeof setTimeout>;
  /** When the timer fires (`performance.now()`). */
  #dueAt = Infinity;
  #closed = false;
  readonly #onMessage = (channel: string, id: string) => {
    if (channel !== this.#channel || this.#take(id) || this.#held.has(id)) return;
    // A slot handed to a ticket of ours whose waiter gave up: pass it on.
    if (id.startsWith(`${this.#prefix}:`)) void this.#giveBack(id, true);
  };
  readonly #onReady = () => this.#schedule(0); // handovers published while cut off are lost

  /** Builds the slots; nothing is sent until {@linkcode SharedSlots.start}. */
  constructor(options: SharedSlotsOptions) {
    if (!(options.limit >= 1)) {
      throw new RangeError(`limit must be at least 1, got ${options.limit}`);
    }
    this.#redis = options.redis;
    this.#subscriber = options.subscriber;
    this.#limit = options.limit;
    this.#keys = ["", ":queue", ":tickets", ":seq", ":limit"].map((suffix) => SLOTS_KEY + suffix);
    this.#channel = `${SLOTS_KEY}:granted`;
    this.#leaseMs = options.leaseMs ?? SLOT_LEASE_MS;
    this.#prefix = `${options.owner ?? "worker"}:${crypto.randomUUID().slice(0, 8)}`;
  }

  /** Slots this process holds now. */
  get held(): number {
    return this.#held.size + this.#lost.size;
  }

  /** Callers of this process waiting for a slot. */
  get waiting(): number {
    return this.#fresh.length + this.#queued.size;
  }

  /**
   * Writes this replica's limit as the budget of all (warning when another replica had written a
   * different one) and subscribes to the handover channel, so a slot handed to a waiter reaches
   * it at once.
   */
  async start(): Promise<void> {
    const before = await this.#redis.set(this.#keys[4], String(this.#limit), "GET");
    if (before !== null && before !== String(this.#limit)) {
      this.#log.warn(
        "LLM_MAX_IN_FLIGHT is {limit} here but was {before} on another replica; {limit} now holds for every replica. Set the same value on all of them.",
        { limit: this.#limit, before: Number(before) },
      );
    }
    this.#subscriber.on("message", this.#onMessage);
    this.#subscriber.on("ready", this.#onReady);
    await this.#subscriber.subscribe(this.#channel);
  }

  /**
   * Waits for a slot (first come, first served across replicas) and resolves with its release.
   * When `signal` aborts first, rejects with its reason and takes no slot.
   */
  acquire(signal?: AbortSignal): Promise<Release> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#closed) return Promise.reject(new Error(CLOSED));
    return new Promise<Release>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, signal };
      if (signal) {
        waiter.onAbort = () => {
          const index = this.#fresh.indexOf(waiter);
          if (index >= 0) this.#fresh.splice(index, 1);
          else if (waiter.id && this.#queued.delete(waiter.id)) {
            void this.#giveBack(waiter.id, true); // its ticket, or the slot just handed to it
          }
          reject(signal.reason);
        };
        signal.addEventListener("abort", waiter.onAbort, { once: true });
      }
      this.#fresh.push(waiter);
      void this.#pump();
    });
  }

  /** Stops refreshing, gives back every slot and ticket and unsubscribes. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#timer);
    const ids = [...this.#held, ...this.#lost, ...this.#queued.keys()];
    for (const waiter of [...this.#fresh.splice(0), ...this.#queued.values()]) {
      if (waiter.onAbort) waiter.signal?.removeEventListener("abort", waiter.onAbort);
      waiter.reject(new Error(CLOSED));
    }
    this.#queued.clear();
    this.#held.clear();
    this.#lost.clear();
    await Promise.all(ids.map((id) => this.#giveBack(id, true)));
    this.#subscriber.off("message", this.#onMessage);
    this.#subscriber.off("ready", this.#onReady);
    if (this.#subscriber.status === "ready") {
      await this.#subscriber.unsubscribe(this.#channel).catch(() => {});
    }
  }

  /** Asks Redis for a slot or a ticket for every fresh waiter, a batch at a time. */
  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#fresh.length > 0 && !this.#closed) {
        const batch = this.#fresh.splice(0);
        for (const waiter of batch) {
          waiter.id = `${this.#prefix}:${++this.#next}`;
          this.#queued.set(waiter.id, waiter); // before asking: a handover may come first
        }
        const ids = batch.map((waiter) => waiter.id!);
        let reply: [number, number];
        try {
          reply = await this.#eval(ACQUIRE_SCRIPT, ids) as [number, number];
        } catch (error) {
          this.#log.warn("Could not ask for a shared model slot: {reason} Trying again.", {
            reason: describeError(error),
          });
          for (const id of ids) this.#queued.delete(id);
          this.#fresh.unshift(...batch.filter((waiter) => !waiter.signal?.aborted));
          await sleep(1000);
          continue;
        }
        for (const id of ids.slice(0, reply[0])) {
          if (!this.#take(id) && !this.#held.has(id)) void this.#giveBack(id, true);
        }
        this.#scheduleAfter(reply[1]);
      }
    } finally {
      this.#pumping = false;
    }
  }

  /** Gives the slot `id` to its waiter when it still waits; false otherwise. */
  #take(id: string): boolean {
    const waiter = this.#queued.get(id);
    if (!waiter) return false;
    this.#queued.delete(id);
    if (waiter.onAbort) waiter.signal?.removeEventListener("abort", waiter.onAbort);
    this.#held.add(id);
    this.#schedule(this.#leaseMs / 4);
    let released = false;
    waiter.resolve(() => {
      if (released) return;
      released = true;
      const lost = this.#lost.delete(id);
      if (this.#held.delete(id) || lost) void this.#giveBack(id, lost);
    });
    return true;
  }

  /** Schedules the next refresh given the ms until the earliest lease runs out. */
  #scheduleAfter(untilExpiryMs: number): void {
    const quarter = this.#leaseMs / 4;
    // A replica that waits refreshes as soon as a lease (maybe a dead replica's) runs out.
    const waits = this.#queued.size > 0 && untilExpiryMs >= 0;
    this.#schedule(waits ? Math.min(untilExpiryMs + 5, quarter) : quarter);
  }

  /** Runs the refresh in `ms`, unless it is due sooner already. */
  #schedule(ms: number): void {
    if (this.#closed || this.#held.size + this.#queued.size === 0) return;
    const at = performance.now() + ms;
    if (this.#timer !== undefined && this.#dueAt <= at) return;
    clearTimeout(this.#timer);
    this.#dueAt = at;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#dueAt = Infinity;
      void this.#refresh();
    }, ms);
  }

  async #refresh(): Promise<void> {
    const held = [...this.#held];
    const queued = [...this.#queued.keys()];
    if (held.length + queued.length === 0) return;
    let untilExpiryMs = -1;
    try {
      const [lost, granted, gone, next] = await this.#eval(
        REFRESH_SCRIPT,
        [held.length, ...held, ...queued],
      ) as [string[], string[], string[], number];
      untilExpiryMs = next;
      for (const id of lost) {
        if (!this.#held.delete(id)) continue; // released meanwhile
        this.#lost.add(id);
        this.#log.warn(
          "Lost a shared model slot: its lease ran out (this process stalled longer than {leaseMs} ms) and every slot is taken; its request in flight counts against none until it ends.",
          { leaseMs: this.#leaseMs },
        );
      }
      for (const id of granted) this.#take(id); // their handover message was lost
      for (const id of gone) {
        // The ticket ran out (this process stalled): queue again.
        const waiter = this.#queued.get(id);
        if (!waiter) continue;
        this.#queued.delete(id);
        this.#fresh.push(waiter);
      }
      if (gone.length > 0) void this.#pump();
    } catch (error) {
      this.#log.debug("Could not refresh the shared model slots: {reason}", {
        reason: describeError(error),
      });
    }
    this.#scheduleAfter(untilExpiryMs);
  }

  /** Removes the slot or ticket `id`; logs when a slot held was gone though not known lost. */
  async #giveBack(id: string, quiet = false): Promise<void> {
    try {
      const removed = await this.#eval(RELEASE_SCRIPT, [id]);
      if (removed === 0 && !quiet) {
        this.#log.warn(
          "A shared model slot's lease ran out while its request was in flight (this process stalled longer than {leaseMs} ms, or Redis lost its data).",
          { leaseMs: this.#leaseMs },
        );
      }
    } catch (error) {
      this.#log.debug("Could not give back a shared model slot: {reason}", {
        reason: describeError(error),
      });
    }
  }

  #eval(script: string, args: Array<string | number>): Promise<unknown> {
    return runScript(
      this.#redis,
      script,
      this.#keys.length,
      ...this.#keys,
      this.#limit,
      this.#leaseMs,
      this.#channel,
      ...args,
    );
  }
}
