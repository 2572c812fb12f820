import assert from "node:assert/strict";
import { startCoreEmulator } from "../../testing/core_emulator.ts";
import { InvalidAnswerError, JobFailedError } from "../../lib/errors.ts";
import {
  buildTaskMatchPrompt,
  taskMatchHandler,
  taskMatchPayloadSchema,
} from "../../lib/handlers/task_match.ts";
import type { JobContext, JobHandler } from "../../lib/handlers/types.ts";
import { promptOf, startModelServer } from "../helpers/model_server.ts";
import { makeContext } from "../helpers/context.ts";

async function runJob<P>(handler: JobHandler<P>, ctx: JobContext) {
  const payload = handler.payloadSchema.parse(ctx.job.payload);
  return await handler.run(ctx, payload);
}

const answer = (matched: string | null, confidence: number, reason = "because") =>
  JSON.stringify({ matched_task_id: matched, confidence, reason });

type Core = ReturnType<typeof startCoreEmulator>;

function seedTasks(core: Core) {
  const milk = core.seedTask({
    id: "task-milk",
    owner_user_id: 7,
    description: "Buy milk",
    due_at: "2026-03-01T09:00:00Z",
  });
  const dentist = core.seedTask({
    id: "task-dentist",
    owner_user_id: 7,
    description: "Call dentist",
  });
  core.seedTask({ id: "task-done", owner_user_id: 7, description: "Pay rent", state: "DONE" });
  core.seedTask({ id: "task-other", owner_user_id: 8, description: "Walk the dog" });
  return { milk, dentist };
}

function context(core: Core, modelUrl: string, payload: Record<string, unknown>, env = {}) {
  return makeContext({
    jobType: "task_match",
    payload,
    userId: 7,
    coreUrl: core.url,
    modelUrl,
    env,
  }).ctx;
}

const PAYLOAD = { memory_id: "mem-1", memory_content: "Got the milk from the corner shop" };

Deno.test("task_match: a confident match on an offered task notifies with its description", async () => {
  await using core = startCoreEmulator();
  const { milk } = seedTasks(core);
  await using model = startModelServer(() =>
    answer("task-milk", 0.9, "The memory says milk was bought.")
  );
  const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));

  assert.deepEqual(out.result, {
    matched_task_id: "task-milk",
    confidence: 0.9,
    reason: "The memory says milk was bought.",
  });
  assert.deepEqual(out.notifications, [{
    message_type: "llm_task_match_result",
    content: { task_id: "task-milk", task_description: milk.description, memory_id: "mem-1" },
  }]);

  // GET /tasks with the owner and NOT_DONE, and nothing else sent to Core: no task is changed.
  assert.deepEqual(
    core.state.requests.map((r) => ({ method: r.method, path: r.path, query: r.query })),
    [{ method: "GET", path: "/tasks", query: { owner_user_id: "7", state: "NOT_DONE" } }],
  );
  assert.equal(core.state.tasks.get("task-milk")!.state, "NOT_DONE");

  assert.equal(model.requests.length, 1);
  const request = model.requests[0];
  assert.equal(request.body.model, "mistral");
  assert.equal(request.body.response_format?.type, "json_schema");
  const prompt = promptOf(request);
  assert.match(prompt, /Got the milk from the corner shop/);
  assert.match(prompt, /1\. \[id: task-milk\] Buy milk \(due 2026-03-01T09:00:00Z\)/);
  assert.match(prompt, /2\. \[id: task-dentist\] Call dentist \(no due date\)/);
  assert.doesNotMatch(prompt, /Pay rent|Walk the dog/);
});

Deno.test("task_match: no open tasks means no model call and no notification", async () => {
  await using core = startCoreEmulator();
  core.seedTask({ owner_user_id: 7, description: "Pay rent", state: "DONE" });
  await using model = startModelServer(() => answer(null, 0));
  const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));

  assert.equal(model.requests.length, 0);
  assert.deepEqual(out.notifications, []);
  assert.deepEqual(out.result, {
    matched_task_id: null,
    confidence: null,
    reason: "The user has no open tasks.",
  });
  assert.equal(core.state.requests.length, 1);
});

Deno.test("task_match: an id that was not offered is no match", async () => {
  await using core = startCoreEmulator();
  seedTasks(core);
  for (const hallucinated of ["task-invented", "task-other", "task-done", "1"]) {
    await using model = startModelServer(() => answer(hallucinated, 0.99));
    const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));
    assert.equal(out.result?.matched_task_id, null, hallucinated);
    assert.deepEqual(out.notifications, [], hallucinated);
  }
});

Deno.test("task_match: confidence must be above 0.7: exactly 0.7 is no match", async () => {
  await using core = startCoreEmulator();
  seedTasks(core);
  await using model = startModelServer(() => answer("task-milk", 0.7));
  const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));
  assert.deepEqual(out.result, { matched_task_id: null, confidence: 0.7, reason: "because" });
  assert.deepEqual(out.notifications, []);

  model.setReply(() => answer("task-milk", 0.71));
  const above = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));
  assert.equal(above.result?.matched_task_id, "task-milk");
  assert.equal(above.notifications.length, 1);
});

Deno.test("task_match: the model saying null is no match", async () => {
  await using core = startCoreEmulator();
  seedTasks(core);
  await using model = startModelServer(() => answer(null, 0.95, "Nothing fits."));
  const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));
  assert.deepEqual(out.result, {
    matched_task_id: null,
    confidence: 0.95,
    reason: "Nothing fits.",
  });
  assert.deepEqual(out.notifications, []);
});

Deno.test("task_match: chatty, fenced output with a reasoning block is still read", async () => {
  await using core = startCoreEmulator();
  seedTasks(core);
  await using model = startModelServer(() =>
    "<think>milk... corner shop</think>Sure! Here is my answer:\n```json\n" +
    '{"matched_task_id": " task-milk ", "confidence": 0.92, "reason": "Milk bought."}\n```\nHope it helps.'
  );
  const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));
  assert.equal(out.result?.matched_task_id, "task-milk");
  assert.equal(out.notifications.length, 1);
});

Deno.test("task_match: numeric task ids work, as numbers or strings in the answer", async () => {
  await using core = startCoreEmulator();
  // Core's ids are strings in the contract; a numeric one must not break the comparison.
  core.state.tasks.set("42", {
    id: 42 as unknown as string,
    owner_user_id: 7,
    description: "Buy milk",
    state: "NOT_DONE",
    due_at: null,
  });
  await using model = startModelServer(() =>
    '{"matched_task_id": 42, "confidence": 0.8, "reason": "milk"}'
  );
  const out = await runJob(taskMatchHandler, context(core, model.url, PAYLOAD));
  assert.equal(out.result?.matched_task_id, 42);
  assert.deepEqual(out.notifications[0].content, {
    task_id: 42,
    task_description: "Buy milk",
    memory_id: "mem-1",
  });
});

Deno.test("task_match: an answer that breaks the schema is an invalid answer", async () => {
  await using core = startCoreEmulator();
  seedTasks(core);
  await using model = startModelServer(() => answer("task-milk", 1.5));
  await assert.rejects(
    runJob(taskMatchHandler, context(core, model.url, PAYLOAD)),
    InvalidAnswerError,
  );
  model.setReply(() => '{"matched_task_id": "task-milk", "reason": "no confidence"}');
  await assert.rejects(
    runJob(taskMatchHandler, context(core, model.url, PAYLOAD)),
    InvalidAnswerError,
  );
});

Deno.test("task_match: the prompt stays within LLM_MAX_INPUT_CHARS and only offered tasks count", async () => {
  await using core = startCoreEmulator();
  for (let i = 0; i < 100; i++) {
    core.seedTask({
      id: `t${i}`,
      owner_user_id: 7,
      description: `Task number ${i} ${"x".repeat(80)}`,
    });
  }
  await using model = startModelServer(() => answer("t99", 0.95));
  const out = await runJob(
    taskMatchHandler,
    context(core, model.url, { memory_id: "m", memory_content: "y".repeat(5000) }, {
      LLM_MAX_INPUT_CHARS: "2000",
    }),
  );
  const prompt = promptOf(model.requests[0]);
  assert.ok(prompt.length <= 2000, `prompt is ${prompt.length} characters`);
  assert.match(prompt, /\[id: t0\]/);
  assert.doesNotMatch(prompt, /\[id: t99\]/);
  // t99 was not offered, so naming it is no match.
  assert.equal(out.result?.matched_task_id, null);
  assert.deepEqual(out.notifications, []);
});

Deno.test("task_match: buildTaskMatchPrompt skips tasks without an id and duplicates", () => {
  const { offered, prompt } = buildTaskMatchPrompt(
    "note",
    [
      { id: "", description: "no id" },
      { id: "a", description: "first" },
      { id: "a", description: "again" },
      { id: "b", description: "  two\n lines " },
    ],
    12000,
  );
  assert.deepEqual(offered.map((o) => o.id), ["a", "b"]);
  assert.match(prompt, /1\. \[id: a\] first \(no due date\)\n2\. \[id: b\] two lines/);
});

Deno.test("task_match: a memory with no text is no match, with no model call", async () => {
  await using core = startCoreEmulator();
  seedTasks(core);
  await using model = startModelServer(() => answer("task-milk", 0.9));
  const out = await runJob(
    taskMatchHandler,
    context(core, model.url, { memory_id: "m", memory_content: "  " }),
  );
  assert.equal(model.requests.length, 0);
  assert.equal(out.result?.matched_task_id, null);
  assert.deepEqual(out.notifications, []);
});

Deno.test("task_match: needs a user and a valid payload", async () => {
  assert.equal(taskMatchHandler.requiresUser, true);
  assert.equal(taskMatchHandler.jobType, "task_match");
  assert.equal(taskMatchPayloadSchema.safeParse({ memory_content: "x" }).success, false);
  assert.equal(
    taskMatchPayloadSchema.safeParse({ memory_id: "", memory_content: "x" }).success,
    false,
  );
  assert.equal(
    taskMatchPayloadSchema.safeParse({ memory_id: "m", memory_content: 3 }).success,
    false,
  );
  assert.equal(
    taskMatchPayloadSchema.safeParse({ memory_id: "m", memory_content: "x" }).success,
    true,
  );

  await using core = startCoreEmulator();
  await using model = startModelServer(() => answer(null, 0));
  const { ctx } = makeContext({
    jobType: "task_match",
    payload: PAYLOAD,
    userId: null,
    coreUrl: core.url,
    modelUrl: model.url,
  });
  await assert.rejects(runJob(taskMatchHandler, ctx), JobFailedError);
  assert.equal(core.state.requests.length, 0);
  assert.equal(model.requests.length, 0);
});
