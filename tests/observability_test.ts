/**
 * Health, readiness and metrics of a real worker (private Redis, local model server, Core
 * emulator), the model gateway's per-job views, and the log format setting.
 */
import assert from "node:assert/strict";
import { loadSettings } from "../lib/config.ts";
import { type CompletionEvent, LLMClient } from "../lib/llm.ts";
import { ModelGateway } from "../lib/model.ts";
import { JOB_STREAMS, STREAM_OF } from "../lib/streams.ts";
import { startModelServer } from "./helpers/model_server.ts";
import { defaultReply, startStack } from "./helpers/stack.ts";

/** GET `url`: status and body text. */
async function get(url: string): Promise<{ status: number; text: string; type: string | null }> {
  const response = await fetch(url);
  return {
    status: response.status,
    text: await response.text(),
    type: response.headers.get("content-type"),
  };
}

/** The value of one sample line of a Prometheus text, or undefined when absent. */
function sample(
  metrics: string,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  for (const line of metrics.split("\n")) {
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/);
    if (!match || match[1] !== name) continue;
    const found = Object.fromEntries(
      [...(match[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]),
    );
    if (Object.entries(labels).every(([k, v]) => found[k] === v)) return Number(match[3]);
  }
  return undefined;
}

Deno.test("/healthz answers; /readyz turns 503 when Redis stops and 200 when it returns", async () => {
  await using stack = await startStack();
  const worker = await stack.startWorker();
  const base = worker.http!.url;
  assert.ok(worker.http!.port > 0, "port 0 picked a free port");

  assert.deepEqual(await get(`${base}/healthz`), {
    status: 200,
    text: "ok\n",
    type: "text/plain; charset=utf-8",
  });
  assert.equal((await get(`${base}/readyz`)).status, 200);

  await stack.redis.kill();
  let ready = await get(`${base}/readyz`);
  await stack.waitFor(async () => (ready = await get(`${base}/readyz`)).status === 503, "503");
  assert.match(ready.text, /^not ready: Redis at redis:\/\/127\.0\.0\.1:\d+\/? is not reachable/);
  assert.equal((await get(`${base}/healthz`)).status, 200, "alive while Redis is away");

  await stack.redis.restart();
  await stack.waitFor(async () => (await get(`${base}/readyz`)).status === 200, "200 again");

  assert.equal((await get(`${base}/nope`)).status, 404);
  const post = await fetch(`${base}/healthz`, { method: "POST" });
  await post.body?.cancel();
  assert.equal(post.status, 405);

  await worker.close();
  assert.deepEqual(worker.readiness(), { ready: false, reason: "the worker is stopping" });
  await assert.rejects(fetch(`${base}/healthz`), "the listener is closed with the worker");
});

Deno.test("/metrics: counters move as jobs complete, fail and are dead-lettered", async () => {
  let invalid = false;
  await using stack = await startStack({
    env: { LLM_MAX_RETRIES: "2" },
    reply: (request) =>
      invalid && request.body.response_format ? "no json here" : defaultReply(request),
  });
  const worker = await stack.startWorker();
  const scrape = async () => {
    const { status, text, type } = await get(`${worker.http!.url}/metrics`);
    assert.equal(status, 200);
    assert.match(type ?? "", /^text\/plain; version=0\.0\.4/);
    return text;
  };
  // Core sees a job's end (its PATCH) a moment before the worker acknowledges and counts it.
  const scrapeWhenCounted = async (jobType: string, outcome: string, count: number) => {
    let text = "";
    await stack.waitFor(async () => {
      text = await scrape();
      return sample(text, "llm_worker_jobs_total", { job_type: jobType, outcome }) === count;
    }, `${count} ${outcome} ${jobType} job(s) counted`);
    return text;
  };

  const before = await scrape();
  // Every known label set is there from the start, at 0: `increase()` sees the first event.
  for (const jobType of Object.keys(STREAM_OF)) {
    for (const outcome of ["completed", "failed", "unrecorded", "skipped"]) {
      assert.equal(sample(before, "llm_worker_jobs_total", { job_type: jobType, outcome }), 0);
    }
    for (const kind of ["invalid", "unavailable", "error", "abandoned", "lease_lost"]) {
      assert.equal(sample(before, "llm_worker_retries_total", { job_type: jobType, kind }), 0);
    }
  }
  for (const stream of JOB_STREAMS) {
    assert.equal(sample(before, "llm_worker_dead_lettered_total", { stream }), 0);
  }
  for (const kind of ["prompt", "completion"]) {
    assert.equal(sample(before, "llm_worker_model_tokens_total", { model: "mistral", kind }), 0);
  }
  // prom-client's process metrics, those Deno can measure under the start task's permissions.
  const startTime = sample(before, "process_start_time_seconds") ?? NaN;
  assert.ok(Math.abs(startTime - Date.now() / 1000) < 600, `process start time ${startTime}`);
  assert.ok((sample(before, "process_cpu_seconds_total") ?? 0) > 0);
  assert.ok(
    (sample(before, "process_resident_memory_bytes") ?? 0) > 10_000_000,
    "resident memory",
  );
  assert.ok(!/NaN|Nan/.test(before), "no metric reads NaN");
  assert.equal(sample(before, "llm_worker_model_unavailable"), 0);
  assert.equal(sample(before, "llm_worker_jobs_in_flight"), 0);
  assert.equal(sample(before, "llm_worker_pending_entries", { stream: "llm:followup" }), 0);
  const memory = (kind: string) => sample(before, "llm_worker_memory_bytes", { kind }) ?? NaN;
  const used = Deno.memoryUsage().heapUsed;
  assert.ok(memory("rss") > memory("heap_total"), "the process is larger than V8's heap");
  assert.ok(memory("heap_total") >= memory("heap_used"), "V8's heap holds what it uses");
  assert.ok(memory("heap_used") > used / 4 && memory("heap_used") < used * 4, "this process' heap");
  assert.ok(memory("external") > 0);

  const done = await stack.enqueue("followup", { message: "Book the dentist" });
  const refused = await stack.enqueue("followup", { context: "no message" });
  await stack.publishRaw("llm:followup", ["data", "not json"]);
  await stack.waitForJobs([done, refused]);
  await stack.waitFor(async () => (await stack.deadLetters()).length === 1, "the dead letter");
  await scrapeWhenCounted("followup", "completed", 1);

  let after = await scrapeWhenCounted("followup", "failed", 1);
  assert.equal(
    sample(after, "llm_worker_jobs_total", { job_type: "followup", outcome: "completed" }),
    1,
  );
  assert.equal(
    sample(after, "llm_worker_jobs_total", { job_type: "followup", outcome: "failed" }),
    1,
  );
  assert.equal(sample(after, "llm_worker_job_duration_seconds_count", { job_type: "followup" }), 2);
  assert.equal(sample(after, "llm_worker_dead_lettered_total", { stream: "llm:followup" }), 1);
  assert.equal(
    sample(after, "llm_worker_model_request_duration_seconds_count", {
      job_type: "followup",
      model: "mistral",
      outcome: "ok",
    }),
    1,
    "one model request, labelled with its job type; the refused payload never asked the model",
  );
  assert.equal(
    sample(after, "llm_worker_model_tokens_total", {
      model: "mistral",
      job_type: "followup",
      kind: "prompt",
    }),
    10,
  );
  assert.equal(
    sample(after, "llm_worker_model_tokens_total", {
      model: "mistral",
      job_type: "followup",
      kind: "completion",
    }),
    5,
  );
  assert.equal(sample(after, "llm_worker_pending_entries", { stream: "llm:followup" }), 0);

  // An invalid answer: one retry, then the job fails (LLM_MAX_RETRIES=2).
  invalid = true;
  const nonsense = await stack.enqueue("task_match", { memory_id: "m", memory_content: "milk" });
  stack.core.seedTask({ owner_user_id: 1, description: "Buy milk" });
  await stack.waitForJobs([nonsense], 10_000);
  after = await scrapeWhenCounted("task_match", "failed", 1);
  assert.equal(
    sample(after, "llm_worker_retries_total", { job_type: "task_match", kind: "invalid" }),
    1,
  );
  assert.equal(
    sample(after, "llm_worker_jobs_total", { job_type: "task_match", outcome: "failed" }),
    1,
  );
  assert.equal(
    sample(after, "llm_worker_jobs_total", { job_type: "task_match", outcome: "retry_invalid" }),
    undefined,
    "jobs_total counts jobs ended; the retry is in retries_total",
  );
});

Deno.test("/metrics: the model server going down shows as unavailable, with unavailable retries", async () => {
  let down = true;
  await using stack = await startStack({
    reply: (request) => down ? new Response("overloaded", { status: 503 }) : defaultReply(request),
  });
  const worker = await stack.startWorker();
  const jobId = await stack.enqueue("followup", { message: "When?" });
  await stack.waitFor(() => !worker.health.available, "the model to be marked down");
  // The model is marked down as its answer arrives; the job's retry is counted once the job has
  // recorded it, a moment later.
  let metrics = "";
  await stack.waitFor(async () => {
    metrics = await (await fetch(`${worker.http!.url}/metrics`)).text();
    return sample(metrics, "llm_worker_retries_total", {
      job_type: "followup",
      kind: "unavailable",
    }) === 1;
  }, "the job's retry to be counted");
  assert.equal(sample(metrics, "llm_worker_model_unavailable"), 1);
  assert.equal(
    sample(metrics, "llm_worker_retries_total", { job_type: "followup", kind: "unavailable" }),
    1,
  );
  assert.equal(
    sample(metrics, "llm_worker_model_request_duration_seconds_count", {
      job_type: "followup",
      model: "mistral",
      outcome: "unavailable",
    }),
    1,
  );
  assert.equal(sample(metrics, "llm_worker_pending_entries", { stream: "llm:followup" }), 1);

  down = false;
  await stack.waitForJobs([jobId]);
  // Core sees the job end (its PATCH) a moment before the worker acknowledges the entry.
  await stack.waitFor(async () => {
    metrics = await (await fetch(`${worker.http!.url}/metrics`)).text();
    return sample(metrics, "llm_worker_pending_entries", { stream: "llm:followup" }) === 0;
  }, "the entry to be acknowledged");
  assert.equal(sample(metrics, "llm_worker_model_unavailable"), 0);
});

Deno.test("ModelGateway.forJob labels requests with the job type and shares the slots", async () => {
  let release = () => {};
  const gate = new Promise<void>((resolve) => release = resolve);
  await using server = startModelServer(async () => {
    await gate;
    return "fine?";
  });
  const events: CompletionEvent[] = [];
  const llm = new LLMClient({ baseUrl: server.url, onCompletion: (e) => events.push(e) });
  const gateway = new ModelGateway({
    llm,
    models: { text: "mistral", vision: "llava" },
    concurrency: 1,
  });
  const a = gateway.forJob("followup");
  const b = gateway.forJob("email_extract");
  assert.equal(a.jobType, "followup");
  assert.equal(gateway.jobType, undefined);
  const first = a.askText({ role: "text", prompt: "one" });
  const second = b.askText({ role: "text", prompt: "two" });
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(server.maxInFlight, 1, "the views share one slot");
  assert.equal(gateway.inFlight, 1);
  release();
  await Promise.all([first, second]);
  assert.deepEqual(events.map((e) => e.jobType).sort(), ["email_extract", "followup"]);
});

Deno.test("LOG_FORMAT accepts text, json and pretty (an alias of text)", () => {
  assert.equal(loadSettings({}).logFormat, "text");
  assert.equal(loadSettings({ LOG_FORMAT: "json" }).logFormat, "json");
  assert.equal(loadSettings({ LOG_FORMAT: "Pretty" }).logFormat, "text");
  assert.throws(() => loadSettings({ LOG_FORMAT: "xml" }), /LOG_FORMAT="xml" expects one of/);
});
