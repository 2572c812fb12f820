/**
 * A private `redis-server` child process on a free loopback port, for the local stack
 * (`deno task dev`, `deno task demo`) and the tests, which stop and restart it on purpose.
 *
 * Needs `redis-server` on the PATH (Debian/Ubuntu: `apt-get install redis-server`; macOS:
 * `brew install redis`).
 *
 * @module
 */
/** A private Redis started by {@linkcode startRedis}. */
export interface PrivateRedis {
  /** `redis://127.0.0.1:<port>`. */
  url: string;
  /** The port it listens on (kept across restarts). */
  port: number;
  /** Kills it at once (`SIGKILL`), as a crash would. */
  kill(): Promise<void>;
  /** Starts it again on the same port (with its data when append-only was on). */
  restart(): Promise<void>;
  /** Stops it and removes its data folder. */
  close(): Promise<void>;
  /** `[Symbol.asyncDispose]` = close, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** A free TCP port on 127.0.0.1 (the OS picks it; it is released before returning). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Options of {@linkcode startRedis}. */
export interface StartRedisOptions {
  /** The port to listen on (default: a free one). */
  port?: number;
  /** Turn on append-only persistence (data survives `restart()`). */
  appendOnly?: boolean;
  /**
   * Run it in its own session, so a Ctrl-C in the terminal reaches only this process, which then
   * stops its workers before Redis (`deno task dev`, `deno task demo`).
   */
  detached?: boolean;
}

/**
 * Starts `redis-server` on a free port and waits until it answers.
 *
 * @example
 * ```ts
 * await using redis = await startRedis();
 * const client = new Redis(redis.url);
 * ```
 */
export async function startRedis(options: StartRedisOptions = {}): Promise<PrivateRedis> {
  const port = options.port ?? freePort();
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-redis-" });
  let child: Deno.ChildProcess | undefined;

  const spawn = async () => {
    const command = new Deno.Command("redis-server", {
      args: [
        "--port",
        String(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        dir,
        "--save",
        "",
        "--appendonly",
        options.appendOnly ? "yes" : "no",
        "--appendfsync",
        "always",
      ],
      stdout: "null",
      stderr: "null",
      detached: options.detached ?? false,
    });
    try {
      child = command.spawn();
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
      throw new Error(
        "redis-server is not installed: install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or point REDIS_URL at a running Redis.",
        { cause: error },
      );
    }
    await waitForPort(port);
  };
  const stop = async (signal: Deno.Signal) => {
    if (!child) return;
    const current = child;
    child = undefined;
    try {
      current.kill(signal);
    } catch {
      // already gone
    }
    await current.status;
  };

  await spawn();
  const redis: PrivateRedis = {
    url: `redis://127.0.0.1:${port}`,
    port,
    kill: () => stop("SIGKILL"),
    restart: async () => {
      await stop("SIGKILL");
      await spawn();
    },
    close: async () => {
      await stop("SIGTERM");
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
    [Symbol.asyncDispose]: () => redis.close(),
  };
  return redis;
}

async function waitForPort(port: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conn.close();
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
  throw new Error(`redis-server did not start on port ${port} within 10 s`);
}
