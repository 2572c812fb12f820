/**
 * One budget of model slots shared by every replica (`LLM_MAX_IN_FLIGHT`), kept in Redis.
 *
 * The slots are a sorted set: one member per slot held, scored by when its lease runs out
 * (Redis's own clock, so replicas' clocks never matter). Lua scripts take and give back slots
 * atomically:
 *
 * - **acquire** drops expired members, then adds as many as there is room for (at most `limit`
 *   members) and answers how long until the next lease runs out;
 * - **release** removes the caller's own member only (each slot has a fresh random id), so a
 *   replica whose lease ran out can never give back a slot another replica holds; then it
 *   publishes on a channel so waiting replicas try again at once;
 * - **refresh** pushes every held member's expiry one lease ahead, every quarter lease, and takes
 *   back a member that expired meanwhile when there is room (else the slot counts as lost: logged).
 *
 * Invariants: members never exceed `limit` (every replica must use the same value); a replica
 * that dies without giving its slots back holds them for at most {@linkcode SLOT_LEASE_MS}.
 * Waiters of one replica are served in FIFO order by one loop that asks for all of them at once;
 * between replicas, whoever asks first after a release wins. A waiter wakes on the channel, or at
 * the next lease's expiry, or after `pollMs` at the latest (a lost message costs no more).
 *
 * A replica that stalls longer than a lease (a `SIGSTOP`, a frozen VM) may find its slot taken:
 * its request in flight then counts against no slot until it ends. A slot is always taken after
 * the replica's own `WORKER_CONCURRENCY` slot (see `stackSlots`), so one replica never waits in
 * Redis for more slots than it could use.
 *
 * @module
 */
import type { Redis } from "ioredis";
import type { Logger } from "@logtape/logtape";
import { describeError, logger } from "./log.ts";
import type { Release, Slots } from "./slots.ts";

/** How long a slot stays held without a refresh: a dead replica's slots come back within this. */
export const SLOT_LEASE_MS = 10_000;

/** The sorted set of held slots; releases are announced on `<key>:released`. */
export const SLOTS_KEY = "llm-worker:model-slots";

/**
 * KEYS = slots; ARGV = limit, lease ms, then the ids wanted. Returns `{granted, ms}`: how many of
 * the ids (the first ones) now hold a slot, and ms until the earliest lease runs out (-1: none).
 */
const ACQUIRE_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local lease = tonumber(ARGV[2])
local granted = 0
for i = 3, #ARGV do
  if granted >= free then break end
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  granted = granted + 1
end
if granted > 0 then redis.call('PEXPIRE', KEYS[1], lease) end
local next = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then next = tonumber(first[2]) - now end
return {granted, next}
`;

/** KEYS = slots; ARGV = channel, id. Removes the id's own member; 1 when it was still held. */
const RELEASE_SCRIPT = `
local removed = redis.call('ZREM', KEYS[1], ARGV[2])
if removed == 1 then redis.call('PUBLISH', ARGV[1], '1') end
return removed
`;

/**
 * KEYS = slots; ARGV = limit, lease ms, then the ids held. Pushes each id's expiry a lease ahead;
 * an id found expired is taken back when there is room. Returns the ids that were lost.
 */
const REFRESH_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) or redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], lease)
return lost
`;

/** Options of {@linkcode SharedSlots}. */
export interface SharedSlotsOptions {
  /** Connection for the scripts. */
  redis: Redis;
  /** A connection of its own for the release channel (it enters subscriber mode). */
  subscriber: Redis;
  /** Slots in all, across every replica (`LLM_MAX_IN_FLIGHT`). */
  limit: number;
  /** Part of each slot's id, shown by `ZRANGE` (the consumer name). */
  owner?: string;
  /** How long a slot stays held without a refresh (ms, default {@linkcode SLOT_LEASE_MS}). */
  leaseMs?: number;
  /** The longest a waiter sleeps without a wake-up before asking again (ms, default 1000). */
  pollMs?: number;
}

interface Waiter {
  resolve(release: Release): void;
  reject(reason: unknown): void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

/**
 * Model slots shared through Redis by every replica. Call {@linkcode SharedSlots.start} once
 * (it subscribes to the release channel) and {@linkcode SharedSlots.close} at the end.
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
  readonly #key: string;
  readonly #channel: string;
  readonly #leaseMs: number;
  readonly #pollMs: number;
  readonly #prefix: string;
  readonly #log: Logger = logger("model");
  /** Ids of the slots held, refreshed while held. */
  readonly #held = new Set<string>();
  /** Ids found lost by a refresh, until their release. */
  readonly #lost = new Set<string>();
  readonly #waiters: Waiter[] = [];
  #next = 0;
  #pumping = false;
  /** A release was announced since the loop last asked. */
  #woken = false;
  #wake?: PromiseWithResolvers<void>;
  #refresher?: ReturnType<typeof setInterval>;
  #closed = false;
  readonly #onMessage = (channel: string) => {
    if (channel !== this.#channel) return;
    this.#woken = true;
    this.#wake?.resolve();
  };

  /** Builds the slots; nothing is sent until {@linkcode SharedSlots.start}. */
  constructor(options: SharedSlotsOptions) {
    if (!(options.limit >= 1)) {
      throw new RangeError(`limit must be at least 1, got ${options.limit}`);
    }
    this.#redis = options.redis;
    this.#subscriber = options.subscriber;
    this.#limit = options.limit;
    this.#key = SLOTS_KEY;
    this.#channel = `${this.#key}:released`;
    this.#leaseMs = options.leaseMs ?? SLOT_LEASE_MS;
    this.#pollMs = options.pollMs ?? 1000;
    this.#prefix = `${options.owner ?? "worker"}:${crypto.randomUUID().slice(0, 8)}`;
  }

  /** Slots this process holds now. */
  get held(): number {
    return this.#held.size + this.#lost.size;
  }

  /** Callers of this process waiting for a slot. */
  get waiting(): number {
    return this.#waiters.length;
  }

  /** Subscribes to the release channel, so waiters wake as soon as a slot comes back. */
  async start(): Promise<void> {
    this.#subscriber.on("message", this.#onMessage);
    await this.#subscriber.subscribe(this.#channel);
  }

  /**
   * Waits for a slot (FIFO among this process's callers) and resolves with its release. When
   * `signal` aborts first, rejects with its reason and takes no slot.
   */
  acquire(signal?: AbortSignal): Promise<Release> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#closed) return Promise.reject(new Error("The shared model slots are closed."));
    return new Promise<Release>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, signal };
      if (signal) {
        waiter.onAbort = () => {
          const index = this.#waiters.indexOf(waiter);
          if (index >= 0) this.#waiters.splice(index, 1);
          reject(signal.reason);
        };
        signal.addEventListener("abort", waiter.onAbort, { once: true });
      }
      this.#waiters.push(waiter);
      this.#pump();
    });
  }

  /** Stops refreshing, gives back every slot still held and unsubscribes. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.resolve();
    for (const waiter of this.#waiters.splice(0)) {
      if (waiter.onAbort) waiter.signal?.removeEventListener("abort", waiter.onAbort);
      waiter.reject(new Error("The shared model slots are closed."));
    }
    this.#stopRefreshing();
    const held = [...this.#held, ...this.#lost];
    this.#held.clear();
    this.#lost.clear();
    await Promise.all(held.map((id) => this.#giveBack(id)));
    this.#subscriber.off("message", this.#onMessage);
    if (this.#subscriber.status === "ready") {
      await this.#subscriber.unsubscribe(this.#channel).catch(() => {});
    }
  }

  /** Asks Redis for slots for every waiter, in turns, until none waits. */
  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#waiters.length > 0 && !this.#closed) {
        this.#woken = false;
        const ids = this.#waiters.map(() => `${this.#prefix}:${++this.#next}`);
        let granted = 0;
        let untilExpiryMs = -1;
        try {
          [granted, untilExpiryMs] = await this.#redis.eval(
            ACQUIRE_SCRIPT,
            1,
            this.#key,
            this.#limit,
            this.#leaseMs,
            ...ids,
          ) as [number, number];
        } catch (error) {
          this.#log.warn("Could not take a shared model slot: {reason} Trying again.", {
            reason: describeError(error),
          });
        }
        for (const id of ids.slice(0, granted)) {
          const waiter = this.#waiters.shift();
          if (waiter && !this.#closed) this.#grant(waiter, id);
          else void this.#giveBack(id); // its caller gave up meanwhile
        }
        if (granted === ids.length || this.#woken) continue;
        const sleepMs = untilExpiryMs >= 0 ? Math.min(untilExpiryMs, this.#pollMs) : this.#pollMs;
        await this.#sleepUntilWoken(sleepMs + Math.random() * 10);
      }
    } finally {
      this.#pumping = false;
    }
  }

  /** Resolves after `ms`, or sooner when a release is announced or the slots close. */
  async #sleepUntilWoken(ms: number): Promise<void> {
    if (this.#woken || this.#closed) return;
    const wake = Promise.withResolvers<void>();
    this.#wake = wake;
    const timer = setTimeout(wake.resolve, ms);
    try {
      await wake.promise;
    } finally {
      clearTimeout(timer);
      this.#wake = undefined;
    }
  }

  #grant(waiter: Waiter, id: string): void {
    if (waiter.onAbort) waiter.signal?.removeEventListener("abort", waiter.onAbort);
    this.#held.add(id);
    this.#refresher ??= setInterval(() => this.#refresh(), this.#leaseMs / 4);
    let released = false;
    waiter.resolve(() => {
      if (released) return;
      released = true;
      const held = this.#held.delete(id);
      const lost = this.#lost.delete(id);
      if (this.#held.size === 0) this.#stopRefreshing();
      if (held || lost) void this.#giveBack(id, lost);
    });
  }

  /** Removes the slot's member; logs when it was gone though it had not been found lost. */
  async #giveBack(id: string, knownLost = false): Promise<void> {
    try {
      const removed = await this.#redis.eval(RELEASE_SCRIPT, 1, this.#key, this.#channel, id);
      if (removed === 0 && !knownLost) {
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

  async #refresh(): Promise<void> {
    const ids = [...this.#held];
    if (ids.length === 0) return;
    try {
      const lost = await this.#redis.eval(
        REFRESH_SCRIPT,
        1,
        this.#key,
        this.#limit,
        this.#leaseMs,
        ...ids,
      ) as string[];
      for (const id of lost) {
        if (!this.#held.delete(id)) continue; // released meanwhile
        this.#lost.add(id);
        this.#log.warn(
          "Lost a shared model slot: its lease ran out (this process stalled longer than {leaseMs} ms) and every slot is taken; its request in flight counts against none until it ends.",
          { leaseMs: this.#leaseMs },
        );
      }
      if (this.#held.size === 0) this.#stopRefreshing();
    } catch (error) {
      this.#log.debug("Could not refresh the shared model slots: {reason}", {
        reason: describeError(error),
      });
    }
  }

  #stopRefreshing(): void {
    clearInterval(this.#refresher);
    this.#refresher = undefined;
  }
}
