/**
 * The worker's HTTP listener for operators: `GET /healthz` (the process is alive: a liveness
 * probe), `GET /readyz` (Redis reachable and the consumer loop running: a readiness probe; its
 * text also names a model server that does not answer) and `GET /metrics` (Prometheus text).
 *
 * @module
 */
import { describeError, logger } from "./log.ts";

/** Whether the worker can take jobs; `reason` says why not. */
export interface Readiness {
  /** True when ready. */
  ready: boolean;
  /** One plain sentence when not ready. */
  reason?: string;
  /** Something wrong that does not make the worker unready (e.g. the model server is down). */
  detail?: string;
}

/** Options of {@linkcode startHttpServer}. */
export interface HttpServerOptions {
  /** Port; `0` picks a free one (logged). */
  port: number;
  /** Interface to listen on (default `0.0.0.0`, so a container's health check reaches it). */
  hostname?: string;
  /** Answers `/readyz`. */
  readiness: () => Readiness;
  /** Answers `/metrics`: the text and its Content-Type. */
  metrics: () => Promise<{ contentType: string; body: string }>;
}

/** A running listener. */
export interface HttpServer {
  /** The port it listens on (the picked one when asked for `0`). */
  port: number;
  /** Base URL on loopback, e.g. `http://127.0.0.1:9464`. */
  url: string;
  /** Stops listening. Idempotent. */
  close(): Promise<void>;
}

/**
 * Starts the listener.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const http = startHttpServer({
 *   port: 0, // a free port
 *   hostname: "127.0.0.1",
 *   readiness: () => ({ ready: false, reason: "starting" }),
 *   metrics: () => Promise.resolve({ contentType: "text/plain", body: "" }),
 * });
 * const health = await fetch(`${http.url}/healthz`);
 * assert.equal(health.status, 200);
 * await health.body?.cancel();
 * const ready = await fetch(`${http.url}/readyz`);
 * assert.equal(ready.status, 503);
 * assert.match(await ready.text(), /starting/);
 * await http.close();
 * ```
 */
export function startHttpServer(options: HttpServerOptions): HttpServer {
  const log = logger("http");
  const text = (body: string, status = 200) =>
    new Response(body.endsWith("\n") ? body : `${body}\n`, {
      status,
      headers: { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" },
    });
  const server = Deno.serve({
    hostname: options.hostname ?? "0.0.0.0",
    port: options.port,
    onListen: () => {},
  }, async (request) => {
    const { pathname } = new URL(request.url);
    if (request.method !== "GET" && request.method !== "HEAD") {
      return text("method not allowed", 405);
    }
    switch (pathname) {
      case "/healthz":
        return text("ok");
      case "/readyz": {
        const { ready, reason, detail } = options.readiness();
        const also = detail ? `; ${detail}` : "";
        return ready ? text(`ready${also}`) : text(`not ready: ${reason ?? "unknown"}${also}`, 503);
      }
      case "/metrics":
        try {
          const { contentType, body } = await options.metrics();
          return new Response(body, { headers: { "content-type": contentType } });
        } catch (error) {
          log.warn("Collecting metrics failed: {message}", { message: describeError(error) });
          return text(`metrics unavailable: ${describeError(error)}`, 500);
        }
      default:
        return text("not found: try /healthz, /readyz or /metrics", 404);
    }
  });
  const port = server.addr.port;
  let closed: Promise<void> | undefined;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    close() {
      closed ??= server.shutdown();
      return closed;
    },
  };
}
