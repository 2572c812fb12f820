/**
 * Redis connections as the worker wants them: RESP2 replies, commands that wait for a reconnect
 * instead of failing, and a close that never hangs on a dead server.
 *
 * @module
 */
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
