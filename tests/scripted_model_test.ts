/**
 * The scripted model of the dev tooling: its reading of times, and the real handlers against it
 * with structured output off (no schema name to go by, only the prompts).
 */
import assert from "node:assert/strict";
import { startCoreEmulator } from "../testing/core_emulator.ts";
import { findTime, recogniseTask, startScriptedModel } from "../testing/scripted_model.ts";
import { emailExtractHandler } from "../lib/handlers/email_extract.ts";
import { followupHandler } from "../lib/handlers/followup.ts";
import { intentClassifyHandler } from "../lib/handlers/intent_classify.ts";
import { taskMatchHandler } from "../lib/handlers/task_match.ts";
import type { JobContext, JobHandler } from "../lib/handlers/types.ts";
import { makeContext } from "./helpers/context.ts";

/** Wednesday 25 November 2026, 13:00. */
const REF = { y: 2026, mo: 11, d: 25, h: 13, mi: 0 };

Deno.test("findTime reads relative and absolute times against the reference", () => {
  const cases: Array<[string, string | null, boolean]> = [
    ["call mum tomorrow at 9am", "2026-11-26 09:00 tomorrow at 9am", true],
    ["take the bread out in 2 hours", "2026-11-25 15:00 in 2 hours", true],
    ["in half an hour", "2026-11-25 13:30 in half an hour", true],
    ["dinner tonight", "2026-11-25 20:00 tonight", true],
    ["buy milk by Friday", "2026-11-27 09:00 Friday", false],
    ["on Wednesday at 3", "2026-12-02 15:00 on Wednesday at 3", true],
    ["Thursday 14 May at 3:30 PM", "2027-05-14 15:30 Thursday 14 May at 3:30 PM", true],
    ["December 3rd, 18:45", "2026-12-03 18:45 December 3rd, 18:45", true],
    ["on 2026-12-24", "2026-12-24 09:00 2026-12-24", false],
    ["renew it before June", "2027-06-01 09:00 before June", false],
    ["at noon", "2026-11-26 12:00 at noon", true],
    ["no time here at all", null, false],
  ];
  for (const [text, expected, hasTime] of cases) {
    const found = findTime(text, REF);
    if (expected === null) {
      assert.equal(found, null, text);
      continue;
    }
    assert.ok(found, text);
    const w = found.wall;
    const p = (n: number) => String(n).padStart(2, "0");
    assert.equal(
      `${w.y}-${p(w.mo)}-${p(w.d)} ${p(w.h)}:${p(w.mi)} ${found.words}`,
      expected,
      text,
    );
    assert.equal(found.hasTime, hasTime, `${text}: hasTime`);
  }
});

Deno.test("recogniseTask goes by the schema name first, then by the prompts", () => {
  assert.equal(
    recogniseTask({ response_format: { json_schema: { name: "email_events" } }, messages: [] }),
    "email_events",
  );
  assert.equal(
    recogniseTask({ messages: [{ role: "user", content: "Open tasks:\n1. [id: a] x" }] }),
    "task_match",
  );
  assert.equal(recogniseTask({ messages: [{ role: "user", content: "hello" }] }), "unknown");
});

async function runJob<P>(handler: JobHandler<P>, ctx: JobContext) {
  return await handler.run(ctx, handler.payloadSchema.parse(ctx.job.payload));
}

Deno.test("the handlers get sensible answers from the scripted model without a schema", async () => {
  await using core = startCoreEmulator();
  await using model = startScriptedModel();
  core.seedTask({ id: "t-milk", owner_user_id: 1, description: "Buy milk" });
  core.seedTask({ id: "t-car", owner_user_id: 1, description: "Book the car service" });
  const context = (jobType: JobContext["job"]["jobType"], payload: Record<string, unknown>) =>
    makeContext({
      jobType,
      payload,
      coreUrl: core.url,
      modelUrl: model.url,
      env: { LLM_STRUCTURED_OUTPUT: "off" },
      now: () => new Date("2026-11-25T13:00:00Z"),
    }).ctx;

  const intent = await runJob(
    intentClassifyHandler,
    context("intent_classify", {
      message: "Remind me to water the plants tomorrow at 7pm",
      original_timestamp: "2026-11-25T12:59:00Z",
    }),
  );
  assert.equal(intent.result?.intent, "reminder");
  assert.equal(intent.result?.action, "water the plants");
  assert.equal(intent.result?.resolved_time, "2026-11-26T19:00:00+00:00");

  const match = await runJob(
    taskMatchHandler,
    context("task_match", { memory_id: "m1", memory_content: "The car service is booked" }),
  );
  assert.equal(match.result?.matched_task_id, "t-car");

  const email = await runJob(
    emailExtractHandler,
    context("email_extract", {
      subject: "Team lunch",
      body: "<p>Our team lunch is on 3 December at 12:30 at Luigi's.</p>",
    }),
  );
  const events = email.result?.events as Array<Record<string, unknown>>;
  assert.equal(events.length, 1);
  assert.equal(events[0].event_time, "2026-12-03T12:30:00+00:00");
  assert.match(String(events[0].description), /team lunch/i);

  const followup = await runJob(followupHandler, context("followup", { message: "the thing" }));
  assert.match(
    String(followup.result?.question),
    /^What would you like me to do with "the thing"\?$/,
  );
  assert.equal(model.requests, 4);
});
