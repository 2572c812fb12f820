/**
 * Traces through OpenTelemetry's API. Deno's built-in OpenTelemetry (`OTEL_DENO=true`) registers
 * itself as the global tracer provider and exports over OTLP; without it no span is made at all
 * (not even a no-op one: at a thousand jobs a second the API's no-op spans and their context
 * switches cost the worker's thread a few per cent).
 *
 * A job's span is active while the job runs, so the spans Deno makes for `fetch` (Core's REST
 * API, the model server) and the model client's `chat <model>` spans become its children.
 *
 * @module
 */
import {
  INVALID_SPAN_CONTEXT,
  ProxyTracerProvider,
  type Span,
  SpanKind,
  type SpanOptions,
  SpanStatusCode,
  trace,
  type Tracer,
} from "@opentelemetry/api";
import type { Job } from "./job.ts";

/** The tracer of the worker (instrumentation scope `llm-worker`). */
export const tracer: Tracer = trace.getTracer("llm-worker");

/** The API's no-op provider: what a proxy with no provider registered behind it hands out. */
const NOOP_PROVIDER = new ProxyTracerProvider().getDelegate();

/** The span handed to {@linkcode withSpan}'s callback when nothing traces: it records nothing. */
const NON_RECORDING: Span = trace.wrapSpanContext(INVALID_SPAN_CONTEXT);

/**
 * True when a tracer provider is registered (Deno's, with `OTEL_DENO=true`, or one set with
 * `trace.setGlobalTracerProvider`); false when every span would be a no-op.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * // Without OTEL_DENO=true (and no provider registered), nothing traces.
 * assert.equal(tracingEnabled(), Deno.env.get("OTEL_DENO") === "true");
 * ```
 */
export function tracingEnabled(): boolean {
  const provider = trace.getTracerProvider();
  return !(provider instanceof ProxyTracerProvider && provider.getDelegate() === NOOP_PROVIDER);
}

/**
 * Runs `fn` inside an active span of the worker's tracer, as `tracer.startActiveSpan` does; when
 * nothing traces, runs it at once with a span that records nothing. `fn` ends the span.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const n = await withSpan("count", {}, async (span) => {
 *   try {
 *     return await Promise.resolve(1);
 *   } finally {
 *     span.end();
 *   }
 * });
 * assert.equal(n, 1);
 * ```
 */
export function withSpan<T>(
  name: string,
  options: SpanOptions,
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  if (!tracingEnabled()) return fn(NON_RECORDING);
  return tracer.startActiveSpan(name, options, fn);
}

/**
 * Runs one run of a job inside an active span named `job <job_type>`, with the job's id, type,
 * user and stream as attributes; `run` returns the outcome, recorded as `llm_worker.outcome`
 * (`failed` also sets the span's status to error).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const job = {
 *   jobId: "job-1",
 *   jobType: "followup" as const,
 *   payload: { message: "dentist" },
 *   userId: 7,
 *   stream: "llm:followup",
 *   entryId: "1-0",
 * };
 * const result = await traceJob(job, () => Promise.resolve({ outcome: "completed" as const }));
 * assert.equal(result.outcome, "completed");
 * ```
 */
export function traceJob<T extends { outcome: string }>(
  job: Job,
  run: () => Promise<T>,
): Promise<T> {
  if (!tracingEnabled()) return run();
  return withSpan(`job ${job.jobType}`, {
    kind: SpanKind.CONSUMER,
    attributes: {
      "messaging.system": "redis",
      "messaging.operation.type": "process",
      "messaging.destination.name": job.stream,
      "messaging.message.id": job.entryId,
      "llm_worker.job_id": job.jobId,
      "llm_worker.job_type": job.jobType,
      ...(job.userId === null ? {} : { "llm_worker.user_id": job.userId }),
    },
  }, async (span: Span) => {
    try {
      const result = await run();
      span.setAttribute("llm_worker.outcome", result.outcome);
      if (result.outcome === "failed") span.setStatus({ code: SpanStatusCode.ERROR });
      return result;
    } catch (error) {
      span.setStatus({
        code: SpanStatusCode.ERROR,
        message: error instanceof Error ? error.message : String(error),
      });
      throw error;
    } finally {
      span.end();
    }
  });
}
