/**
 * Redis connections as the worker wants them: RESP2 replies, commands that wait for a reconnect
 * instead of failing, and a close that never hangs on a dead server.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { Redis } from "ioredis";
import { sleep } from "./utils.ts";

/** How long a closing connection may take before its socket is destroyed (ms). */
const DISCONNECT_TIMEOUT_MS = 500;

/** Options of {@linkcode createRedis}. */
export interface RedisConnectionOptions {
  /** Shown by `CLIENT LIST` (the consumer name). */
  connectionName?: string;
  /** Send commands in batches (for the command connection, not the blocking reader). */
  autoPipelining?: boolean;
  /** Connect at once (default: on the first command or `connect()`). */
  eager?: boolean;
}

/**
 * A connection to `url` that reconnects for ever (backing off to 2 s) and keeps commands queued
 * while it does.
 *
 * @example
 * ```ts ignore
 * const redis = createRedis("redis://localhost:6379");
 * await redis.ping();
 * await closeRedis(redis);
 * ```
 */
export function createRedis(url: string, options: RedisConnectionOptions = {}): Redis {
  return new Redis(url, {
    lazyConnect: !options.eager,
    protocol: 2, // RESP2: the classic reply shapes, and any Redis answers it
    maxRetriesPerRequest: null,
    connectionName: options.connectionName,
    retryStrategy: (times: number) => Math.min(times * 200, 2_000),
    disconnectTimeout: DISCONNECT_TIMEOUT_MS,
    enableAutoPipelining: options.autoPipelining ?? false,
  });
}

/** Closes a connection for good: QUIT lets replies in flight arrive; a dead one is dropped. */
export async function closeRedis(connection: Redis): Promise<void> {
  if (connection.status === "end") return;
  const ended = new Promise<void>((resolve) => connection.once("end", () => resolve()));
  if (connection.status === "ready") await connection.quit().catch(() => connection.disconnect());
  else connection.disconnect();
  // A connection that was already reconnecting may never say "end" (its socket closed long ago):
  // ioredis destroys it after `disconnectTimeout` all the same.
  const timeout = new AbortController();
  await Promise.race([ended, sleep(DISCONNECT_TIMEOUT_MS + 100, timeout.signal).catch(() => {})]);
  timeout.abort();
}

/** Options of {@linkcode watchRedis}. */
export interface RedisWatchOptions {
  /** Told on every change between reachable (`true`) and not (`false`), with why not. */
  onChange?: (up: boolean, reason: string) => void;
}

/** Whether a set of connections to one Redis are all ready; see {@linkcode watchRedis}. */
export interface RedisWatch {
  /** True while every connection is ready. */
  readonly up: boolean;
  /** Why Redis is not reachable (the last connection error, or the connections' states). */
  readonly reason: string;
  /** Resolves once every connection is ready (rejects when `signal` aborts). */
  untilUp(signal?: AbortSignal): Promise<void>;
  /** Stops watching (the connections' errors are still swallowed: close them next). */
  close(): void;
}

/**
 * Follows `connections` (to one Redis) and calls `onChange` once per change between "all ready"
 * and "not all ready": a Redis that refuses every reconnect for an hour is one change, not one per
 * attempt. Starts as neither, so the first state (ready, or a failed first attempt) is a change
 * too. Closing the watch leaves a pending {@linkcode RedisWatch.untilUp} to its signal.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const redis = createRedis("redis://127.0.0.1:1"); // nothing listens there
 * const changes: boolean[] = [];
 * const watch = watchRedis([redis], { onChange: (up) => changes.push(up) });
 * redis.connect().catch(() => {}); // ioredis keeps reconnecting after a refused first connect
 * await watch.untilUp(AbortSignal.timeout(500)).catch(() => {}); // a few refused attempts
 * assert.deepEqual(changes, [false]); // one change, not one per attempt
 * assert.equal(watch.up, false);
 * watch.close();
 * await closeRedis(redis);
 * ```
 */
export function watchRedis(connections: Redis[], options: RedisWatchOptions = {}): RedisWatch {
  let known: boolean | undefined;
  let lastError = "";
  let changed = Promise.withResolvers<void>();
  const allReady = () => connections.every((c) => c.status === "ready");
  const reason = () => {
    if (lastError) return lastError;
    const status = connections.find((c) => c.status !== "ready")?.status ?? "ready";
    return ["close", "reconnecting", "end"].includes(status)
      ? "the connection was closed"
      : `connection ${status}`;
  };
  const update = () => {
    const up = allReady();
    if (up) lastError = "";
    if (up === known) return;
    // Before the first attempt has failed, "not ready yet" is no news.
    if (known === undefined && !up && !lastError) return;
    known = up;
    options.onChange?.(up, up ? "" : reason());
    changed.resolve();
    changed = Promise.withResolvers<void>();
  };
  let closed = false;
  const onError = (error: Error) => {
    if (closed) return; // still listening: ioredis prints errors nobody listens to
    lastError = error.message.split("\n")[0];
    update();
  };
  const onEvent = () => {
    if (!closed) update();
  };
  const events = ["ready", "close", "end", "reconnecting"] as const;
  for (const connection of connections) {
    connection.on("error", onError);
    for (const event of events) connection.on(event, onEvent);
  }
  return {
    get up() {
      return allReady();
    },
    get reason() {
      return reason();
    },
    async untilUp(signal) {
      while (!allReady()) {
        signal?.throwIfAborted();
        const next = changed.promise;
        await (signal
          ? new Promise<void>((resolve, reject) => {
            const onAbort = () => reject(signal.reason);
            signal.addEventListener("abort", onAbort, { once: true });
            next.then(() => {
              signal.removeEventListener("abort", onAbort);
              resolve();
            });
          })
          : next);
      }
    },
    close() {
      closed = true;
      for (const connection of connections) {
        for (const event of events) connection.off(event, onEvent);
      }
    },
  };
}

/** The SHA1 of each script run by {@linkcode runScript}, by its text. */
const scriptShas = new Map<string, string>();

/**
 * Runs the Lua `script` with `numKeys` keys then arguments, as `EVAL` would, but by its SHA1
 * (`EVALSHA`), sending the text only when Redis does not have it yet (`NOSCRIPT`: the first run,
 * or a restarted Redis). Scripts of a few KB run several times per job; sent whole each time they
 * cost the worker's CPU and Redis a hash of the text per call. (ioredis's own `defineCommand`
 * does the same but breaks under auto-pipelining.)
 *
 * @example
 * ```ts ignore
 * const value = await runScript(redis, "return redis.call('GET', KEYS[1])", 1, "some-key");
 * ```
 */
export async function runScript(
  redis: Redis,
  script: string,
  numKeys: number,
  ...args: Array<string | number>
): Promise<unknown> {
  let sha = scriptShas.get(script);
  if (sha === undefined) {
    sha = createHash("sha1").update(script).digest("hex");
    scriptShas.set(script, sha);
  }
  try {
    return await redis.evalsha(sha, numKeys, ...args);
  } catch (error) {
    if (!(error instanceof Error && error.message.startsWith("NOSCRIPT"))) throw error;
    return await redis.eval(script, numKeys, ...args); // which also caches it in Redis
  }
}
