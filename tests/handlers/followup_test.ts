import assert from "node:assert/strict";
import { startCoreEmulator } from "../../testing/core_emulator.ts";
import { InvalidAnswerError } from "../../lib/errors.ts";
import {
  capFollowupInput,
  cleanQuestion,
  followupHandler,
  MAX_QUESTION_CHARS,
} from "../../lib/handlers/followup.ts";
import type { JobContext, JobHandler } from "../../lib/handlers/types.ts";
import { promptOf, startModelServer } from "../helpers/model_server.ts";
import { makeContext } from "../helpers/context.ts";

async function runJob<P>(handler: JobHandler<P>, ctx: JobContext) {
  const payload = handler.payloadSchema.parse(ctx.job.payload);
  return await handler.run(ctx, payload);
}

Deno.test("followup: asks the text model and sends back one cleaned question", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    '<think>The user is vague.</think>\nSure! Here\'s my question: "What time is the dentist appointment?" Let me know.'
  );
  const { ctx } = makeContext({
    jobType: "followup",
    payload: { message: "dentist thing", context: "Earlier: the user booked a dentist." },
    coreUrl: core.url,
    modelUrl: model.url,
  });
  const out = await runJob(followupHandler, ctx);

  const question = "What time is the dentist appointment?";
  assert.deepEqual(out.result, { question });
  assert.deepEqual(out.notifications, [{
    message_type: "llm_followup_result",
    content: { question },
  }]);
  assert.equal(model.requests.length, 1);
  const request = model.requests[0];
  assert.equal(request.body.model, "mistral");
  assert.equal(request.body.response_format, undefined, "plain text: no JSON schema");
  assert.match(promptOf(request), /dentist thing/);
  assert.match(promptOf(request), /the user booked a dentist/);
  assert.equal(request.body.messages[0].role, "system");
  assert.match(request.body.messages[0].content as string, /Write in English,/);
  assert.deepEqual(
    core.state.requests.map((r) => `${r.method} ${r.path}`),
    ["GET /settings/1"],
    "followup only reads the user's language",
  );
});

Deno.test("followup: the message and context are capped at LLM_MAX_INPUT_CHARS", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => "Which one?");
  const { ctx } = makeContext({
    jobType: "followup",
    payload: { message: "m".repeat(5000), context: "c".repeat(5000) },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { LLM_MAX_INPUT_CHARS: "3000" },
  });
  await runJob(followupHandler, ctx);
  const prompt = promptOf(model.requests[0]);
  const sent = (prompt.match(/m{20,}|c{20,}/g) ?? []).join("").length;
  assert.ok(sent <= 3000, `sent ${sent} characters of input`);
  assert.ok(prompt.includes("m".repeat(2900)), "the message comes first");
});

Deno.test("followup: capFollowupInput gives the message priority and drops a squeezed context", () => {
  assert.deepEqual(capFollowupInput("hi", " ctx ", 1000), { message: "hi", context: "ctx" });
  assert.deepEqual(capFollowupInput("hi", null, 1000), { message: "hi", context: null });
  const long = capFollowupInput("m".repeat(990), "c".repeat(50), 1000);
  assert.equal(long.context, null);
  const both = capFollowupInput("m".repeat(500), "c".repeat(1000), 1000);
  assert.equal(both.message.length + both.context!.length, 1000);
});

Deno.test("followup: cleanQuestion strips labels, quotes, fences and preambles", () => {
  const cases: Array<[string, string]> = [
    ["What time?", "What time?"],
    ['"When is the meeting?"', "When is the meeting?"],
    ["Question: Do you want a reminder or a task?", "Do you want a reminder or a task?"],
    ["**Clarifying question:** Which Tom do you mean?", "Which Tom do you mean?"],
    ["Q: Which day?", "Which day?"],
    ["“Which day?”", "Which day?"],
    ["```\nWhich day next week?\n```", "Which day next week?"],
    ["Sure. Which day did you mean?", "Which day did you mean?"],
    ["I need more detail.\nWhen should I remind you?\nAlso, where?", "When should I remind you?"],
    ["When is it? And where?", "When is it?"],
    ["- Should I save this as a task?", "Should I save this as a task?"],
    ["Do you mean Dr. Smith or Dr. Jones?", "Do you mean Dr. Smith or Dr. Jones?"],
    ["Is that 3 p.m. Or 3 a.m.?", "Is that 3 p.m. Or 3 a.m.?"],
    ["Could you tell me more", "Could you tell me more"],
  ];
  for (const [raw, want] of cases) assert.equal(cleanQuestion(raw), want, raw);
  assert.equal(cleanQuestion(`${"why ".repeat(200)}?`).length, MAX_QUESTION_CHARS);
  assert.throws(() => cleanQuestion('""'), InvalidAnswerError);
  assert.throws(() => cleanQuestion("Question:"), InvalidAnswerError);
});

Deno.test("followup: an answer with no question left is an invalid answer", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => "```\n```");
  const { ctx } = makeContext({
    jobType: "followup",
    payload: { message: "hmm" },
    coreUrl: core.url,
    modelUrl: model.url,
  });
  await assert.rejects(runJob(followupHandler, ctx), InvalidAnswerError);
});

Deno.test("followup: the payload needs a non-empty message; context is optional", () => {
  const schema = followupHandler.payloadSchema;
  assert.equal(schema.safeParse({}).success, false);
  assert.equal(schema.safeParse({ context: "x" }).success, false);
  assert.equal(schema.safeParse({ message: "   " }).success, false);
  assert.equal(schema.safeParse({ message: 42 }).success, false);
  assert.equal(schema.safeParse({ message: "hi" }).success, true);
  assert.equal(schema.safeParse({ message: "hi", context: null }).success, true);
  assert.equal(schema.safeParse({ message: "hi", context: "earlier" }).success, true);
  assert.equal(followupHandler.jobType, "followup");
  assert.equal(followupHandler.requiresUser, false);
});
