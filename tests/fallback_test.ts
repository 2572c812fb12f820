/**
 * The fallback model server (`LLM_FALLBACK_*`) and token accounting, through a whole worker: a
 * private Redis, the Core emulator and local model servers that the real `openai` SDK talks to.
 *
 * @module
 */
import assert from "node:assert/strict";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { freePort } from "../testing/redis_server.ts";
import { chatResponse, startModelServer } from "./helpers/model_server.ts";
import { defaultReply, startStack } from "./helpers/stack.ts";

/** The value of one series in Prometheus text, or undefined. */
function series(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(`${name} `) && Object.keys(labels).length === 0) {
      return Number(line.slice(name.length + 1));
    }
    if (!line.startsWith(`${name}{`)) continue;
    const inside = line.slice(name.length + 1, line.indexOf("}"));
    const found = Object.fromEntries(
      [...inside.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]),
    );
    if (Object.entries(labels).every(([k, v]) => found[k] === v)) {
      return Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return undefined;
}

Deno.test("fallback: serves while the primary refuses, no outage notice, back to the primary after its probe", async () => {
  const primaryPort = freePort();
  await using stack = await startStack({
    reply: () => "Which day do you mean on the fallback?",
  });
  const worker = await stack.startWorker({
    LLM_BASE_URL: `http://127.0.0.1:${primaryPort}/v1`,
    LLM_FALLBACK_BASE_URL: stack.model.url,
    LLM_FALLBACK_TEXT_MODEL: "small-fallback",
  });
  const first = await stack.enqueue("followup", { message: "dentist" }, 1);
  await stack.waitForJobs([first]);
  await stack.waitForAcks();
  assert.equal(stack.core.state.jobs.get(first)!.status, "completed");
  assert.deepEqual(stack.core.state.jobs.get(first)!.result, {
    question: "Which day do you mean on the fallback?",
  });
  assert.equal(stack.model.requests.length, 1);
  assert.equal(stack.model.requests[0].body.model, "small-fallback");
  assert.deepEqual(
    (await stack.notifications()).map((n) => n.message_type),
    ["llm_followup_result"],
    "no outage notice while the fallback serves",
  );
  let text = await worker.metrics.metrics();
  assert.equal(series(text, "llm_worker_model_server_up", { server: "primary" }), 0);
  assert.equal(series(text, "llm_worker_model_server_up", { server: "fallback" }), 1);
  assert.equal(series(text, "llm_worker_model_unavailable", {}), 0, "jobs do not wait");
  assert.equal(
    series(text, "llm_worker_model_request_duration_seconds_count", {
      server: "fallback",
      outcome: "ok",
    }),
    1,
  );

  // The primary comes up: its probe marks it up, and new requests go to it.
  await using primary = startModelServer(() => "Which day on the primary?", { port: primaryPort });
  await stack.waitFor(() => worker.health.available, "the primary's probe to succeed", 20_000);
  const second = await stack.enqueue("followup", { message: "dentist again" }, 1);
  await stack.waitForJobs([second]);
  assert.deepEqual(stack.core.state.jobs.get(second)!.result, {
    question: "Which day on the primary?",
  });
  assert.equal(primary.requests.length, 1);
  assert.equal(primary.requests[0].body.model, "mistral");
  assert.equal(stack.model.requests.length, 1, "the fallback is not asked while the primary is up");
  text = await worker.metrics.metrics();
  assert.equal(series(text, "llm_worker_model_server_up", { server: "primary" }), 1);
});

Deno.test("fallback: a request the primary fails mid-job goes to the fallback at once", async () => {
  await using fallback = startModelServer(() => "When is it, fallback?");
  await using stack = await startStack({
    reply: () => new Response("overloaded", { status: 503 }),
  });
  await stack.startWorker({ LLM_FALLBACK_BASE_URL: fallback.url });
  const job = await stack.enqueue("followup", { message: "party" }, 1);
  await stack.waitForJobs([job]);
  await stack.waitForAcks();
  assert.deepEqual(stack.core.state.jobs.get(job)!.result, { question: "When is it, fallback?" });
  assert.equal(stack.model.requests.length, 1, "the primary was asked once");
  assert.equal(fallback.requests.length, 1, "then the fallback, in the same attempt");
  assert.deepEqual((await stack.notifications()).map((n) => n.message_type), [
    "llm_followup_result",
  ]);
});

Deno.test("fallback: both down, jobs wait as without one, and resume when the fallback is back", async () => {
  const primaryPort = freePort();
  const fallbackPort = freePort();
  await using stack = await startStack();
  const worker = await stack.startWorker({
    LLM_BASE_URL: `http://127.0.0.1:${primaryPort}/v1`,
    LLM_FALLBACK_BASE_URL: `http://127.0.0.1:${fallbackPort}/v1`,
  });
  const job = await stack.enqueue("followup", { message: "dinner" }, 1);
  await stack.waitFor(
    async () => series(await worker.metrics.metrics(), "llm_worker_model_unavailable", {}) === 1,
    "the gauge to say jobs wait",
  );
  assert.notEqual(stack.core.state.jobs.get(job)!.status, "completed");
  assert.match(worker.readiness().detail ?? "", /no model server answers/);

  await using late = startModelServer(defaultReply, { port: fallbackPort });
  await stack.waitForJobs([job], 40_000);
  assert.equal(stack.core.state.jobs.get(job)!.status, "completed");
  assert.equal(late.requests.length, 1);
});

Deno.test("fallback: an unusable answer is asked again of the same server, never the fallback", async () => {
  await using fallback = startModelServer(defaultReply);
  await using stack = await startStack({ reply: () => "no idea" });
  await stack.startWorker({ LLM_FALLBACK_BASE_URL: fallback.url, LLM_MAX_RETRIES: "2" });
  const job = await stack.enqueue("task_match", { memory_id: "m", memory_content: "note" }, 1);
  stack.core.seedTask({ owner_user_id: 1, id: "t", description: "Call Bob" });
  await stack.waitForJobs([job], 20_000);
  assert.equal(stack.core.state.jobs.get(job)!.status, "failed");
  assert.equal(stack.model.requests.length, 2);
  assert.equal(fallback.requests.length, 0);
});

Deno.test("tokens: counted per model and job type, and each job's end line carries its own", async () => {
  const records: LogRecord[] = [];
  await configure({
    reset: true,
    sinks: { buffer: (record) => records.push(record) },
    loggers: [
      { category: ["llm-worker", "consumer"], lowestLevel: "info", sinks: ["buffer"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["buffer"] },
    ],
  });
  try {
    await using stack = await startStack({
      // 10 prompt and 5 completion tokens per answer (chatResponse's usage); a nonsense answer
      // first for the task match, so that job spends two requests.
      reply: (request) =>
        request.body.response_format?.json_schema?.name === "task_match" &&
          !stack.model.requests.some((r) =>
            r !== request && r.body.response_format?.json_schema?.name === "task_match"
          )
          ? chatResponse("no idea")
          : chatResponse(defaultReply(request)),
    });
    stack.core.seedTask({ owner_user_id: 1, id: "t", description: "Call Bob" });
    const worker = await stack.startWorker();
    const followup = await stack.enqueue("followup", { message: "dentist" }, 1);
    const match = await stack.enqueue("task_match", { memory_id: "m", memory_content: "n" }, 1);
    await stack.waitForJobs([followup, match], 20_000);
    const text = await worker.metrics.metrics();
    const tokens = (job_type: string, kind: string) =>
      series(text, "llm_worker_model_tokens_total", { model: "mistral", job_type, kind });
    assert.equal(tokens("followup", "prompt"), 10);
    assert.equal(tokens("followup", "completion"), 5);
    assert.equal(tokens("task_match", "prompt"), 20);
    assert.equal(tokens("task_match", "completion"), 10);
    assert.equal(tokens("email_extract", "prompt"), 0, "every job type's series starts at 0");

    const ended = (jobId: string) =>
      records.filter((r) =>
        r.properties.jobId === jobId && r.properties.outcome === "completed" &&
        "promptTokens" in r.properties
      ).map((r) => [r.properties.promptTokens, r.properties.completionTokens]);
    // The end line comes after Core heard of the end: wait for it.
    await stack.waitFor(() => ended(followup).length + ended(match).length === 2, "end lines");
    assert.deepEqual(ended(followup), [[10, 5]]);
    assert.deepEqual(ended(match), [[20, 10]], "both runs of the job count");
  } finally {
    await reset();
  }
});
