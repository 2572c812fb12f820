/**
 * Traces through OpenTelemetry's API. Deno's built-in OpenTelemetry (`OTEL_DENO=true`) registers
 * itself as the global tracer provider and exports over OTLP; without it every span is a no-op.
 *
 * A job's span is active while the job runs, so the spans Deno makes for `fetch` (Core's REST
 * API, the model server) and the model client's `chat <model>` spans become its children.
 *
 * @module
 */
import { type Span, SpanKind, SpanStatusCode, trace, type Tracer } from "@opentelemetry/api";
import type { Job } from "./handlers/types.ts";

/** The tracer of the worker (instrumentation scope `llm-worker`). */
export const tracer: Tracer = trace.getTracer("llm-worker");

/**
 * Runs one run of a job inside an active span named `job <job_type>`, with the job's id, type,
 * user and stream as attributes; `run` returns the outcome, recorded as `llm_worker.outcome`
 * (`failed` also sets the span's status to error).
 *
 * @example
 * ```ts
 * const result = await traceJob(job, async () => ({ outcome: "completed" as const }));
 * ```
 */
export function traceJob<T extends { outcome: string }>(
  job: Job,
  run: () => Promise<T>,
): Promise<T> {
  return tracer.startActiveSpan(`job ${job.jobType}`, {
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
