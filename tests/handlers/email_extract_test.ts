import assert from "node:assert/strict";
import type { Logger } from "@logtape/logtape";
import { startCoreEmulator } from "../../testing/core_emulator.ts";
import { InvalidAnswerError } from "../../lib/errors.ts";
import {
  dropQuotedHistory,
  emailExtractHandler,
  emailToText,
  isForwarded,
} from "../../lib/handlers/email_extract.ts";
import { type ContextOptions, makeContext, MemoryEffects } from "../helpers/context.ts";
import { promptOf, startModelServer } from "../helpers/model_server.ts";

const NOW = new Date("2026-11-25T10:00:00Z");

type Event = { description: string; event_time: string | null; confidence: number };
const events = (...list: Event[]) => JSON.stringify({ events: list });

/** A logger that keeps what was logged, so tests can check warnings. */
function recordingLogger(lines: Array<{ level: string; message: string }>): Logger {
  const record = (level: string) => (message: unknown, props?: unknown) => {
    const text = String(message).replace(
      /\{(\w+)\}/g,
      (_, key) => String((props as Record<string, unknown> | undefined)?.[key]),
    );
    lines.push({ level, message: text });
  };
  return new Proxy({} as Logger, {
    get: (_, prop) =>
      ["debug", "info", "warn", "warning", "error", "fatal", "trace"].includes(String(prop))
        ? record(String(prop))
        : () => undefined,
  });
}

async function run(
  options: Omit<ContextOptions, "jobType"> & { logs?: Array<{ level: string; message: string }> },
) {
  const { ctx, effects } = makeContext({ jobType: "email_extract", now: () => NOW, ...options });
  if (options.logs) ctx.log = recordingLogger(options.logs);
  const payload = emailExtractHandler.payloadSchema.parse(options.payload);
  return { out: await emailExtractHandler.run(ctx, payload), effects };
}

Deno.test("email_extract requires a user (the consumer enforces it)", () => {
  assert.equal(emailExtractHandler.jobType, "email_extract");
  assert.equal(emailExtractHandler.requiresUser, true);
  assert.equal(emailExtractHandler.payloadSchema.safeParse({ subject: "x" }).success, false);
  assert.deepEqual(emailExtractHandler.payloadSchema.parse({ body: "b" }), {
    subject: "",
    body: "b",
  });
});

Deno.test("HTML and quoted history are reduced before the model sees them", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(1, "Europe/Berlin");
  await using model = startModelServer(() => events());
  const body = `<html><head><style>.promo { color: red }</style></head><body>
    <div dir="ltr"><p>Hi Ann,</p>
    <p>Your <b>dentist</b> appointment is on <a href="https://clinic.example/track?id=123">Tuesday 1 December</a> at 15:00.</p>
    <img src="https://tracker.example/pixel.gif" alt="pixel">
    <table><tr><td>Where</td><td>Smile&nbsp;Clinic</td></tr></table></div>
    <div class="gmail_quote"><div class="gmail_attr">On Mon, 23 Nov 2026 at 09:12, Ann &lt;ann@example.com&gt; wrote:<br></div>
    <blockquote class="gmail_quote">Could we do the secret-quoted-slot on Friday instead?</blockquote></div>
    </body></html>`;
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { subject: "Re: Appointment", body },
  });
  assert.deepEqual(out.notifications, []);
  assert.deepEqual(out.result, { events: [], left_out: [] });
  const prompt = promptOf(model.requests[0]);
  assert.ok(prompt.includes('Subject: """Re: Appointment"""'), prompt);
  assert.ok(prompt.includes("Your dentist appointment is on Tuesday 1 December at 15:00."), prompt);
  assert.ok(prompt.includes("Smile Clinic"), prompt);
  for (
    const noise of ["<", "href", "https://", "pixel", "color: red", "secret-quoted-slot", "wrote:"]
  ) {
    assert.ok(!prompt.includes(noise), `prompt contains ${noise}: ${prompt}`);
  }
  // The user's timezone and the current time in it.
  assert.ok(prompt.includes("Wednesday 2026-11-25T11:00:00+01:00 (Europe/Berlin, UTC+01:00)"));
  assert.ok(prompt.includes("User's timezone: Europe/Berlin"));
  assert.equal(model.requests[0].body.messages[0].role, "system");
  assert.equal(model.requests[0].body.response_format?.type, "json_schema");
});

Deno.test("a huge body is capped at LLM_MAX_INPUT_CHARS", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => events());
  const body = "Meeting notes. ".repeat(50_000);
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    env: { LLM_MAX_INPUT_CHARS: "2000" },
    payload: { subject: "Long", body },
  });
  const prompt = promptOf(model.requests[0]);
  assert.ok(prompt.length < 2400, `prompt is ${prompt.length} chars`);
  assert.ok(prompt.includes("Meeting notes."));
});

Deno.test("confident events are created with source email and the subject; others skipped", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(5, "Europe/Berlin");
  await using model = startModelServer(() =>
    events(
      {
        description: "Dentist at Smile Clinic",
        event_time: "2026-12-01T15:00:00",
        confidence: 0.9,
      },
      { description: "Maybe drinks", event_time: "2026-12-02T19:00:00", confidence: 0.5 },
      { description: "Exactly the threshold", event_time: "2026-12-03T19:00:00", confidence: 0.7 },
      { description: "Flight LH123", event_time: "2026-12-04T08:00:00Z", confidence: 0.95 },
      { description: "Conference day", event_time: "2026-12-05", confidence: 0.8 },
    )
  );
  const subject = "Your bookings";
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    userId: 5,
    payload: { subject, body: "Dentist on 1 Dec 15:00, flight LH123 4 Dec, conference 5 Dec." },
  });
  const posts = core.state.requests.filter((r) => r.method === "POST" && r.path === "/events");
  assert.deepEqual(posts.map((r) => r.body), [
    {
      owner_user_id: 5,
      event_time: "2026-12-01T15:00:00+01:00",
      description: "Dentist at Smile Clinic",
      source_type: "email",
      source_detail: subject,
    },
    {
      owner_user_id: 5,
      event_time: "2026-12-04T09:00:00+01:00",
      description: "Flight LH123",
      source_type: "email",
      source_detail: subject,
    },
    {
      owner_user_id: 5,
      event_time: "2026-12-05T09:00:00+01:00",
      description: "Conference day",
      source_type: "email",
      source_detail: subject,
    },
  ]);
  assert.ok(posts.every((r) => r.status === 201));
  const stored = [...core.state.events.values()];
  assert.equal(stored.length, 3);
  assert.deepEqual(
    out.notifications,
    stored.map((event) => ({
      message_type: "event_confirmation",
      content: {
        description: event.description,
        event_date:
          (posts.find((p) => (p.body as { description: string }).description === event.description)!
            .body as { event_time: string }).event_time,
        event_id: event.id,
      },
    })),
  );
  const result = out.result as { events: unknown[]; left_out: Array<{ description: string }> };
  assert.equal(result.events.length, 3);
  assert.deepEqual(result.left_out.map((e) => e.description), [
    "Maybe drinks",
    "Exactly the threshold",
  ]);
});

Deno.test("an offset-less time is read in the user's timezone", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(1, "Europe/Berlin");
  await using model = startModelServer(() =>
    events({ description: "Concert", event_time: "2026-12-01T15:00:00", confidence: 0.9 })
  );
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { subject: "Tickets", body: "Concert on 1 December at 15:00" },
  });
  assert.deepEqual(out.notifications[0].content.event_date, "2026-12-01T15:00:00+01:00");
  const [event] = core.state.events.values();
  assert.equal(event.event_time, "2026-12-01T15:00:00+01:00");
  assert.equal(new Date(event.event_time).toISOString(), "2026-12-01T14:00:00.000Z");
});

Deno.test("digits-only and unreadable times are left out and logged; the rest are created", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    events(
      { description: "Digits", event_time: "20990301", confidence: 0.9 },
      { description: "Party", event_time: "2026-12-12T20:00:00", confidence: 0.9 },
      { description: "Words", event_time: "April 2, 3 PM", confidence: 0.9 },
      { description: "Slashes", event_time: "02/04/2026", confidence: 0.9 },
      { description: "No time", event_time: null, confidence: 0.9 },
    )
  );
  const logs: Array<{ level: string; message: string }> = [];
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    logs,
    payload: { subject: "Plans", body: "lots of plans" },
  });
  const posts = core.state.requests.filter((r) => r.path === "/events");
  assert.equal(posts.length, 1);
  assert.equal((posts[0].body as { description: string }).description, "Party");
  assert.equal(posts[0].status, 201);
  assert.equal(out.notifications.length, 1);
  const warnings = logs.filter((l) => l.level === "warn").map((l) => l.message);
  assert.equal(warnings.length, 4);
  for (const value of ["20990301", "April 2, 3 PM", "02/04/2026", "null"]) {
    assert.ok(warnings.some((w) => w.includes(value)), `no warning names ${value}`);
  }
  const leftOut = (out.result as { left_out: Array<{ description: string }> }).left_out;
  assert.deepEqual(leftOut.map((e) => e.description), ["Digits", "Words", "Slashes", "No time"]);
});

Deno.test("running twice with the same effects creates the events once", async () => {
  await using core = startCoreEmulator();
  let calls = 0;
  await using model = startModelServer(() => {
    calls++;
    // A second answer would differ; the recorded plan keeps the job to its first one.
    return calls === 1
      ? events(
        { description: "Dinner", event_time: "2026-12-01T19:00:00", confidence: 0.9 },
        { description: "Lunch", event_time: "2026-12-02T12:00:00", confidence: 0.9 },
      )
      : events({ description: "Dinner party", event_time: "2026-12-01T19:30:00", confidence: 1 });
  });
  const effects = new MemoryEffects();
  const options = {
    coreUrl: core.url,
    modelUrl: model.url,
    effects,
    payload: { subject: "Plans", body: "dinner and lunch" },
  };
  const first = await run(options);
  const second = await run(options);
  assert.equal(core.state.events.size, 2);
  assert.equal(calls, 1);
  assert.deepEqual(second.out, first.out);
});

Deno.test("Core failing half way: the retry creates only the missing events", async () => {
  await using core = startCoreEmulator();
  let posts = 0;
  core.setFault(({ method, path }) =>
    method === "POST" && path === "/events" && ++posts === 2
      ? new Response("Internal Server Error", { status: 503 })
      : undefined
  );
  await using model = startModelServer(() =>
    events(
      { description: "One", event_time: "2026-12-01T10:00:00", confidence: 0.9 },
      { description: "Two", event_time: "2026-12-02T10:00:00", confidence: 0.9 },
      { description: "Three", event_time: "2026-12-03T10:00:00", confidence: 0.9 },
    )
  );
  const effects = new MemoryEffects();
  const options = {
    coreUrl: core.url,
    modelUrl: model.url,
    effects,
    payload: { subject: "Three things", body: "one two three" },
  };
  await assert.rejects(run(options), (error: Error) => error.name === "CoreApiError");
  const { out } = await run(options);
  assert.deepEqual([...core.state.events.values()].map((e) => e.description).sort(), [
    "One",
    "Three",
    "Two",
  ]);
  assert.equal(out.notifications.length, 3);
  assert.equal(model.requests.length, 1);
});

Deno.test("an event Core still refuses with 422 is left out; the others are created", async () => {
  await using core = startCoreEmulator();
  let posts = 0;
  core.setFault(({ method, path }) =>
    method === "POST" && path === "/events" && ++posts === 1
      ? Response.json({ detail: [{ loc: ["body", "description"], msg: "too long", type: "x" }] }, {
        status: 422,
      })
      : undefined
  );
  await using model = startModelServer(() =>
    events(
      { description: "Refused", event_time: "2026-12-01T10:00:00", confidence: 0.9 },
      { description: "Kept", event_time: "2026-12-02T10:00:00", confidence: 0.9 },
    )
  );
  const logs: Array<{ level: string; message: string }> = [];
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    logs,
    payload: { subject: "s", body: "b" },
  });
  assert.deepEqual([...core.state.events.values()].map((e) => e.description), ["Kept"]);
  assert.equal(out.notifications.length, 1);
  assert.ok(logs.some((l) => l.level === "error" && l.message.includes("Refused")));
});

Deno.test("the same event twice in one answer is created once", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    events(
      { description: "Dinner", event_time: "2026-12-01T19:00:00", confidence: 0.9 },
      { description: "dinner ", event_time: "2026-12-01T20:00:00+01:00", confidence: 0.8 },
    )
  );
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { subject: "s", body: "dinner" },
  });
  assert.equal(core.state.events.size, 1);
  assert.equal(out.notifications.length, 1);
});

Deno.test("an empty email makes no model call", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => events());
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { subject: "  ", body: "<html><body> <img src='x'> </body></html>" },
  });
  assert.equal(model.requests.length, 0);
  assert.deepEqual(out, { result: { events: [], left_out: [] }, notifications: [] });
});

Deno.test("a confidence outside 0..1 is an invalid answer", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    events({ description: "x", event_time: "2026-12-01T10:00:00", confidence: 90 })
  );
  await assert.rejects(
    run({ coreUrl: core.url, modelUrl: model.url, payload: { subject: "s", body: "b" } }),
    InvalidAnswerError,
  );
  assert.equal(core.state.events.size, 0);
});

Deno.test("emailToText: plain-text replies lose quotes, forwards keep them", () => {
  const reply = [
    "Thursday works for me.",
    "",
    "On Mon, 23 Nov 2026 at 09:12, Bob <bob@example.com>",
    "wrote:",
    "> Can we meet on Wednesday at 10?",
    "> > Older quote",
  ].join("\r\n");
  assert.equal(emailToText(reply, { maxChars: 1000 }), "Thursday works for me.");

  const inline =
    "Hi\n\nOn 23 Nov, Bob wrote:\n> Lunch Friday?\nYes, 12:30 at Luigi's.\n> Bring the docs\nWill do.";
  assert.equal(
    emailToText(inline, { maxChars: 1000 }),
    "Hi\n\nYes, 12:30 at Luigi's.\nWill do.",
  );

  const topPosted = "Confirmed.\n\nOn 23 Nov 2026, Bob wrote:\nOld thread text\nmore old text";
  assert.equal(emailToText(topPosted, { maxChars: 1000 }), "Confirmed.");

  const outlook =
    "See you there.\n\n________________________________\nFrom: Bob <bob@example.com>\nSent: Monday\nOld";
  assert.equal(emailToText(outlook, { maxChars: 1000 }), "See you there.");
  assert.equal(dropQuotedHistory("Ok\n-----Original Message-----\nold"), "Ok");
  // A "From:" line without "Sent:" is content (an itinerary), not a header.
  assert.equal(
    emailToText("Flight\nFrom: London <LHR>\nTo: Paris\nDate: 2026-12-01", { maxChars: 1000 }),
    "Flight\nFrom: London <LHR>\nTo: Paris\nDate: 2026-12-01",
  );

  const forward = "---------- Forwarded message ---------\n> Flight LH123 on 2026-12-04 at 08:00";
  assert.equal(isForwarded("Fwd: Booking", ""), true);
  assert.equal(isForwarded("Booking", forward), true);
  assert.equal(isForwarded("Re: Booking", "hello"), false);
  assert.equal(
    emailToText(forward, { maxChars: 1000, forwarded: true }),
    "---------- Forwarded message ---------\nFlight LH123 on 2026-12-04 at 08:00",
  );
  assert.equal(
    emailToText("a   b\t\tc\n\n\n\n\nd\u200b", { maxChars: 1000 }),
    "a b c\n\nd",
  );
  assert.equal(emailToText("x".repeat(5000), { maxChars: 600 }).length, 600);
});

Deno.test("a forwarded email's quoted part reaches the model", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => events());
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: {
      subject: "Fwd: Your flight",
      body:
        "FYI\n\nOn Mon, Airline <no-reply@air.example> wrote:\n> Flight LH123 departs 2026-12-04 08:00",
    },
  });
  assert.ok(promptOf(model.requests[0]).includes("Flight LH123 departs 2026-12-04 08:00"));
});
