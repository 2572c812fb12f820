/**
 * Tracing in-process: with no tracer provider registered no span is made; with one registered
 * (as Deno's `OTEL_DENO=true` does, see `otel_test.ts` for that end to end) a job's run is a
 * `job <type>` span with its attributes and outcome.
 */
import assert from "node:assert/strict";
import {
  type Attributes,
  context,
  type Span,
  type SpanOptions,
  type SpanStatus,
  trace,
  type Tracer,
  type TracerProvider,
} from "@opentelemetry/api";
import type { Job } from "../lib/job.ts";
import { traceJob, tracingEnabled, withSpan } from "../lib/tracing.ts";

/** A span as the recording provider below keeps it. */
interface Recorded {
  name: string;
  attributes: Attributes;
  status?: SpanStatus;
  ended: boolean;
}

/** The smallest provider that records its spans: enough to see what the worker makes. */
function recordingProvider(spans: Recorded[]): TracerProvider {
  const startSpan = (name: string, options: SpanOptions = {}): Span => {
    const recorded: Recorded = { name, attributes: { ...options.attributes }, ended: false };
    spans.push(recorded);
    const span: Span = {
      spanContext: () => ({ traceId: "1".repeat(32), spanId: "2".repeat(16), traceFlags: 1 }),
      setAttribute: (key, value) => {
        recorded.attributes[key] = value;
        return span;
      },
      setAttributes: (attributes) => {
        Object.assign(recorded.attributes, attributes);
        return span;
      },
      addEvent: () => span,
      addLink: () => span,
      addLinks: () => span,
      setStatus: (status) => {
        recorded.status = status;
        return span;
      },
      updateName: () => span,
      end: () => {
        recorded.ended = true;
      },
      isRecording: () => true,
      recordException: () => {},
    };
    return span;
  };
  const tracer = {
    startSpan,
    startActiveSpan(name: string, ...rest: unknown[]) {
      const fn = rest.at(-1) as (span: Span) => unknown;
      const options = (rest.length > 1 ? rest[0] : {}) as SpanOptions;
      const span = startSpan(name, options);
      return context.with(trace.setSpan(context.active(), span), fn, undefined, span);
    },
  } as Tracer;
  return { getTracer: () => tracer };
}

const JOB: Job = {
  jobId: "job-7",
  jobType: "image_tag",
  payload: { memory_id: "m1" },
  userId: 42,
  stream: "llm:image_tag",
  entryId: "1700000000000-0",
};

Deno.test("with no tracer provider registered, no span is made and the run's result comes back", async () => {
  assert.equal(tracingEnabled(), false);
  const result = await traceJob(JOB, () => Promise.resolve({ outcome: "completed", n: 3 }));
  assert.deepEqual(result, { outcome: "completed", n: 3 });
  const recording = await withSpan("chat m", {}, (span) => Promise.resolve(span.isRecording()));
  assert.equal(recording, false);
});

Deno.test("with a tracer provider registered, a job's run is a span with its attributes and outcome", async () => {
  const spans: Recorded[] = [];
  assert.ok(trace.setGlobalTracerProvider(recordingProvider(spans)));
  try {
    assert.equal(tracingEnabled(), true);
    await traceJob(JOB, async () => {
      // The model client's span opens inside the job's.
      await withSpan("chat bench-model", {}, (span) => {
        span.end();
        return Promise.resolve();
      });
      return { outcome: "failed" };
    });
    await assert.rejects(
      traceJob({ ...JOB, jobId: "job-8", userId: null }, () => Promise.reject(new Error("boom"))),
      /boom/,
    );
  } finally {
    trace.disable();
  }
  assert.equal(tracingEnabled(), false);
  assert.deepEqual(spans.map((s) => [s.name, s.ended]), [
    ["job image_tag", true],
    ["chat bench-model", true],
    ["job image_tag", true],
  ]);
  assert.deepEqual(spans[0].attributes, {
    "messaging.system": "redis",
    "messaging.operation.type": "process",
    "messaging.destination.name": "llm:image_tag",
    "messaging.message.id": "1700000000000-0",
    "llm_worker.job_id": "job-7",
    "llm_worker.job_type": "image_tag",
    "llm_worker.user_id": 42,
    "llm_worker.outcome": "failed",
  });
  assert.equal(spans[0].status?.code, 2); // SpanStatusCode.ERROR
  assert.equal(spans[2].attributes["llm_worker.job_id"], "job-8");
  assert.equal("llm_worker.user_id" in spans[2].attributes, false);
  assert.deepEqual(spans[2].status, { code: 2, message: "boom" });
});
