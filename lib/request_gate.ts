/**
 * The gate every model request passes right before it is sent, shared by every replica through
 * Redis: a pause that any replica can start when the server answers 429 with `Retry-After`, and
 * an optional limit of requests per minute (`LLM_MAX_REQUESTS_PER_MINUTE`).
 *
 * **Pause.** A replica told to wait sets `llm-worker:model-paused` (expiring with the pause) and
 * publishes the pause's length on a channel of the same name; every replica keeps the end of the
 * pause in memory (from the message, and from the key at start and after a reconnect), so a
 * request checks it without a round trip. A pause only ever grows longer. A request sent by
 * another replica in the instant between the 429 and the message (under a millisecond on a local
 * network) cannot be held back.
 *
 * **Rate limit.** A sliding window over Redis's clock: `llm-worker:model-requests` is a sorted
 * set of send times, including times reserved ahead. One script drops times older than the
 * window and reserves the earliest time at which at most `limit` sends fall in any window; the
 * request sleeps until then. So the limit holds across replicas, requests are served in the order
 * they asked, and one round trip admits a request. A reservation given up (the request aborted,
 * or a pause began) is removed.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { runScript } from "./redis.ts";
import type { Logger } from "@logtape/logtape";
import { describeError, logger } from "./log.ts";
import { sleep } from "./utils.ts";

/** Why a request waited at the gate. */
export type DelayReason = "rate_limit" | "paused";

/** Every {@linkcode DelayReason}. */
export const DELAY_REASONS: readonly DelayReason[] = ["rate_limit", "paused"];

/** What stands between a model request and the server. */
export interface RequestGate {
  /** Resolves when a request may be sent now; rejects with the reason when `signal` aborts. */
  admit(signal?: AbortSignal): Promise<void>;
  /** The server asked for `ms` without requests (a 429 with `Retry-After`): pause everyone. */
  pause(ms: number): void;
  /** Resolves when no pause is on (the model server's health probe waits for it too). */
  untilUnpaused(signal?: AbortSignal): Promise<void>;
}

/** The pause's key, and the channel its length is published on. */
export const PAUSE_KEY = "llm-worker:model-paused";
/** The sorted set of send times of the rate limit. */
export const RATE_KEY = "llm-worker:model-requests";
/** The longest pause a `Retry-After` can start (30 minutes, the longest retry delay). */
export const MAX_PAUSE_MS = 1_800_000;

/**
 * KEYS = pause key; ARGV = channel, ms. Sets the pause unless a longer one is on, and publishes
 * its length. Returns 1 when it set it.
 */
const PAUSE_SCRIPT = `
local ms = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) >= ms then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ms)
redis.call('PUBLISH', ARGV[1], ms)
return 1
`;

/**
 * KEYS = send times; ARGV = limit, window ms, id. Reserves the earliest time at which at most
 * `limit` sends fall in any window, and returns how many ms from now it is (0: at once).
 */
const RESERVE_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
local at = now
if n >= limit then
  local edge = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  at = math.max(now, tonumber(edge[2]) + window)
end
redis.call('ZADD', KEYS[1], at, ARGV[3])
redis.call('PEXPIRE', KEYS[1], at - now + window)
return at - now
`;

/** Options of {@linkcode SharedRequestGate}. */
export interface SharedRequestGateOptions {
  /** Connection for the scripts and reading the pause. */
  redis: Redis;
  /** A connection of its own for the pause channel (it enters subscriber mode). */
  subscriber: Redis;
  /** Requests per window across every replica (`LLM_MAX_REQUESTS_PER_MINUTE`); none: no limit. */
  limit?: number;
  /** The rate limit's window (ms, default one minute). */
  windowMs?: number;
  /** Part of each reservation's id (the consumer name). */
  owner?: string;
  /** Told once per request and reason when a request has to wait. */
  onDelay?: (reason: DelayReason) => void;
  /** The clock (ms), injectable for tests. */
  now?: () => number;
}

/**
 * The {@linkcode RequestGate} shared through Redis. Call {@linkcode SharedRequestGate.start} once
 * (it subscribes to the pause channel and reads a pause already on) and
 * {@linkcode SharedRequestGate.close} at the end.
 *
 * @example
 * ```ts ignore
 * const gate = new SharedRequestGate({ redis, subscriber, limit: 60 });
 * await gate.start();
 * await gate.admit(); // at most 60 requests a minute across every replica
 * gate.pause(2000); // the server said Retry-After: 2; no replica sends for 2 s
 * await gate.close();
 * ```
 */
export class SharedRequestGate implements RequestGate {
  readonly #redis: Redis;
  readonly #subscriber: Redis;
  readonly #limit?: number;
  readonly #windowMs: number;
  readonly #pauseKey: string;
  readonly #rateKey: string;
  readonly #prefix: string;
  readonly #onDelay?: (reason: DelayReason) => void;
  readonly #now: () => number;
  readonly #log: Logger = logger("model");
  #next = 0;
  /** When the pause ends, by this process's clock (0: none). */
  #pausedUntil = 0;
  #started = false;
  readonly #onMessage = (channel: string, message: string) => {
    if (channel === this.#pauseKey) this.#pauseLocally(Number(message));
  };
  readonly #onReady = () => void this.#readPause();

  /** Builds the gate; nothing is sent until {@linkcode SharedRequestGate.start}. */
  constructor(options: SharedRequestGateOptions) {
    if (options.limit !== undefined && !(options.limit >= 1)) {
      throw new RangeError(`limit must be at least 1, got ${options.limit}`);
    }
    this.#redis = options.redis;
    this.#subscriber = options.subscriber;
    this.#limit = options.limit;
    this.#windowMs = options.windowMs ?? 60_000;
    this.#pauseKey = PAUSE_KEY;
    this.#rateKey = RATE_KEY;
    this.#prefix = `${options.owner ?? "worker"}:${crypto.randomUUID().slice(0, 8)}`;
    this.#onDelay = options.onDelay;
    this.#now = options.now ?? Date.now;
  }

  /** Milliseconds left of the pause this process knows of (0: none). */
  get pausedForMs(): number {
    return Math.max(0, this.#pausedUntil - this.#now());
  }

  /** Subscribes to the pause channel and reads a pause already on. */
  async start(): Promise<void> {
    this.#started = true;
    this.#subscriber.on("message", this.#onMessage);
    this.#subscriber.on("ready", this.#onReady); // messages sent while cut off are lost
    await this.#subscriber.subscribe(this.#pauseKey);
    await this.#readPause();
  }

  /** Unsubscribes. Idempotent. */
  async close(): Promise<void> {
    if (!this.#started) return;
    this.#started = false;
    this.#subscriber.off("message", this.#onMessage);
    this.#subscriber.off("ready", this.#onReady);
    if (this.#subscriber.status === "ready") {
      await this.#subscriber.unsubscribe(this.#pauseKey).catch(() => {});
    }
  }

  /** Waits out a pause, then (with a limit) the request's turn in the window. */
  async admit(signal?: AbortSignal): Promise<void> {
    const told = new Set<DelayReason>();
    const delayed = (reason: DelayReason) => {
      if (told.has(reason)) return;
      told.add(reason);
      this.#onDelay?.(reason);
    };
    while (true) {
      const pausedMs = this.pausedForMs;
      if (pausedMs > 0) {
        delayed("paused");
        await sleep(pausedMs, signal);
        continue;
      }
      if (this.#limit === undefined) return;
      const id = `${this.#prefix}:${++this.#next}`;
      const waitMs = await this.#reserve(id, signal);
      if (waitMs > 0) {
        delayed("rate_limit");
        try {
          await sleep(waitMs, signal);
        } catch (error) {
          void this.#drop(id);
          throw error;
        }
      }
      if (this.pausedForMs > 0) {
        void this.#drop(id); // sent after the pause, it needs a new turn
        continue;
      }
      return;
    }
  }

  /** Pauses every replica for `ms` (at most {@linkcode MAX_PAUSE_MS}); a longer pause stays. */
  pause(ms: number): void {
    if (!(ms > 0)) return;
    ms = Math.min(Math.ceil(ms), MAX_PAUSE_MS);
    this.#pauseLocally(ms);
    this.#log.warn("The model server asked for {ms} ms without requests; every replica waits.", {
      ms,
    });
    runScript(this.#redis, PAUSE_SCRIPT, 1, this.#pauseKey, this.#pauseKey, ms).catch((error) =>
      this.#log.warn("Could not tell the other replicas to pause: {reason}", {
        reason: describeError(error),
      })
    );
  }

  /** Resolves when no pause is on. */
  async untilUnpaused(signal?: AbortSignal): Promise<void> {
    for (let ms = this.pausedForMs; ms > 0; ms = this.pausedForMs) await sleep(ms, signal);
  }

  #pauseLocally(ms: number): void {
    if (!(ms > 0)) return;
    this.#pausedUntil = Math.max(this.#pausedUntil, this.#now() + ms);
  }

  async #readPause(): Promise<void> {
    try {
      this.#pauseLocally(Number(await this.#redis.pttl(this.#pauseKey)));
    } catch (error) {
      this.#log.debug("Could not read the model pause: {reason}", { reason: describeError(error) });
    }
  }

  /** Reserves a send time; ms from now until it. Retries every second while Redis refuses. */
  async #reserve(id: string, signal?: AbortSignal): Promise<number> {
    while (true) {
      try {
        return Number(
          await runScript(
            this.#redis,
            RESERVE_SCRIPT,
            1,
            this.#rateKey,
            this.#limit!,
            this.#windowMs,
            id,
          ),
        );
      } catch (error) {
        this.#log.warn("Could not take a turn of the model rate limit: {reason} Trying again.", {
          reason: describeError(error),
        });
        await sleep(1000, signal);
      }
    }
  }

  async #drop(id: string): Promise<void> {
    await this.#redis.zrem(this.#rateKey, id).catch(() => {});
  }
}
