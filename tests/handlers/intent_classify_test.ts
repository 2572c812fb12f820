import assert from "node:assert/strict";
import { startCoreEmulator } from "../../testing/core_emulator.ts";
import { InvalidAnswerError } from "../../lib/errors.ts";
import {
  cleanKeywords,
  type IntentAnswer,
  intentClassifyHandler,
  memoryTitle,
  NO_ENTITIES,
} from "../../lib/handlers/intent_classify.ts";
import { type ContextOptions, makeContext, MemoryEffects } from "../helpers/context.ts";
import { type ChatRequest, promptOf, startModelServer } from "../helpers/model_server.ts";

const NOW = new Date("2026-07-01T12:00:00Z");

/** A full model answer: every field null unless given. */
function answer(fields: Partial<IntentAnswer> & Pick<IntentAnswer, "intent">): string {
  return JSON.stringify({ ...NO_ENTITIES, ...fields });
}

const ANSWERS: Record<string, string> = {
  reminder: answer({
    intent: "reminder",
    action: "Call mum",
    time: "tomorrow at 9",
    resolved_time: "2026-07-02T09:00:00",
  }),
  task: answer({
    intent: "task",
    description: "Renew passport",
    due_time: "before August",
    resolved_due_time: "2026-07-31",
  }),
  general_note: answer({ intent: "general_note", suggested_tags: ["wifi", " cabin ", "", "wifi"] }),
  ambiguous: answer({
    intent: "ambiguous",
    followup_question: "Should I remind you, or keep it as a note?",
    possible_intents: ["reminder", "General note", "nonsense", "ambiguous"],
  }),
};

const EXPECTED_ENTITIES: Record<string, Record<string, unknown>> = {
  reminder: {
    action: "Call mum",
    time: "tomorrow at 9",
    resolved_time: "2026-07-02T09:00:00+01:00",
  },
  task: {
    description: "Renew passport",
    due_time: "before August",
    resolved_due_time: "2026-07-31T09:00:00+01:00",
  },
  general_note: { suggested_tags: ["wifi", "cabin"] },
  ambiguous: {
    followup_question: "Should I remind you, or keep it as a note?",
    possible_intents: ["reminder", "general_note"],
  },
};

async function run(
  options: Omit<ContextOptions, "jobType" | "coreUrl" | "modelUrl"> & {
    coreUrl: string;
    modelUrl: string;
  },
) {
  const { ctx, effects } = makeContext({ jobType: "intent_classify", now: () => NOW, ...options });
  const payload = intentClassifyHandler.payloadSchema.parse(options.payload);
  return { out: await intentClassifyHandler.run(ctx, payload), effects };
}

Deno.test("intent_classify requires a user (the consumer enforces it)", () => {
  assert.equal(intentClassifyHandler.jobType, "intent_classify");
  assert.equal(intentClassifyHandler.requiresUser, true);
});

Deno.test("payload: legacy query becomes message; neither fails", () => {
  const schema = intentClassifyHandler.payloadSchema;
  assert.deepEqual(schema.parse({ query: "buy milk", memory_id: null, original_timestamp: null }), {
    message: "buy milk",
    memory_id: null,
    original_timestamp: null,
  });
  assert.equal(schema.parse({ message: "new", query: "old" }).message, "new");
  assert.equal(schema.parse({ message: "hi", memory_id: "" }).memory_id, null);
  assert.equal(schema.safeParse({ memory_id: null, original_timestamp: null }).success, false);
  assert.equal(schema.safeParse({ message: "   " }).success, false);
  assert.equal(schema.safeParse("buy milk").success, false);
});

Deno.test("legacy query payload runs end to end", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWERS.reminder);
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { query: "remind me to call mum tomorrow at 9", memory_id: null },
  });
  const content = out.notifications[0].content;
  assert.equal(content.query, "remind me to call mum tomorrow at 9");
  assert.ok(promptOf(model.requests[0]).includes("remind me to call mum tomorrow at 9"));
  const posts = core.state.requests.filter((r) => r.method === "POST" && r.path === "/memories");
  assert.deepEqual(posts.map((r) => r.body), [
    { owner_user_id: 1, content: "remind me to call mum tomorrow at 9" },
  ]);
});

for (const intent of ["reminder", "task", "general_note", "ambiguous"]) {
  Deno.test(`${intent}: the message is kept as a memory and notified with its entities`, async () => {
    await using core = startCoreEmulator();
    core.seedSettings(7, "Europe/London");
    await using model = startModelServer(() => ANSWERS[intent]);
    const message = `a ${intent} message`;
    const { out } = await run({
      coreUrl: core.url,
      modelUrl: model.url,
      userId: 7,
      payload: { message, memory_id: null, original_timestamp: "2026-07-01T11:00:00Z" },
    });
    const posts = core.state.requests.filter((r) => r.method === "POST" && r.path === "/memories");
    assert.equal(posts.length, 1);
    assert.deepEqual(posts[0].body, { owner_user_id: 7, content: message });
    const memory = [...core.state.memories.values()][0];
    assert.equal(memory.content, message);

    assert.equal(out.notifications.length, 1);
    assert.equal(out.notifications[0].message_type, "llm_intent_result");
    const expected = {
      query: message,
      intent,
      memory_id: memory.id,
      results: [],
      ...EXPECTED_ENTITIES[intent],
    };
    assert.deepEqual(out.notifications[0].content, expected);
    assert.deepEqual(out.result, expected);
    assert.ok(!core.state.requests.some((r) => r.path === "/search"));
  });
}

Deno.test("a payload memory_id is reused: no POST /memories", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWERS.task);
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: {
      message: "renew passport",
      memory_id: "mem-42",
      original_timestamp: null,
      followup_context: { followup_question: "Task or note?", user_answer: "a task" },
    },
  });
  assert.equal(out.notifications[0].content.memory_id, "mem-42");
  assert.ok(!core.state.requests.some((r) => r.method === "POST" && r.path === "/memories"));
});

Deno.test("running twice with the same effects creates one memory", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWERS.general_note);
  const effects = new MemoryEffects();
  const options = {
    coreUrl: core.url,
    modelUrl: model.url,
    effects,
    payload: { message: "cabin wifi is sunshine42", memory_id: null, original_timestamp: null },
  };
  const first = await run(options);
  const second = await run(options);
  assert.equal(core.state.memories.size, 1);
  assert.equal(
    core.state.requests.filter((r) => r.method === "POST" && r.path === "/memories").length,
    1,
  );
  assert.equal(
    first.out.notifications[0].content.memory_id,
    second.out.notifications[0].content.memory_id,
  );
});

Deno.test("search: cleaned keywords, q and owner, titles, query stays the user's message", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(3, "UTC");
  const text = core.seedMemory({ owner_user_id: 3, content: "Cabin wifi password: sunshine42" });
  const photo = core.seedMemory({
    owner_user_id: 3,
    content: "",
    media_type: "image",
    tags: ["cabin", "lake", "wifi", "sunset", "dog"].map((tag) => ({ tag, status: "confirmed" })),
  });
  const captioned = core.seedMemory({
    owner_user_id: 3,
    content: "Router at the cabin",
    media_type: "image",
  });
  const fewTags = core.seedMemory({
    owner_user_id: 3,
    content: null,
    tags: [{ tag: "cabin", status: "suggested" }, { tag: "keys", status: "confirmed" }],
  });
  core.seedMemory({ owner_user_id: 4, content: "someone else's cabin wifi" });
  await using model = startModelServer(() =>
    answer({ intent: "search", query: "the cabin wifi", keywords: ['"cabin"', " wifi ", "", '"'] })
  );
  const message = "what's the wifi password at the cabin?";
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    userId: 3,
    payload: { message, memory_id: "ignored-for-search", original_timestamp: null },
  });
  const searches = core.state.requests.filter((r) => r.path === "/search");
  assert.equal(searches.length, 1);
  assert.deepEqual(searches[0].query, { q: "cabin wifi", owner: "3" });
  assert.equal(searches[0].status, 200);

  const content = out.notifications[0].content;
  assert.equal(content.query, message);
  assert.equal(content.intent, "search");
  assert.equal(content.memory_id, null);
  assert.deepEqual(content.keywords, ["cabin", "wifi"]);
  assert.deepEqual(Object.keys(content).sort(), [
    "intent",
    "keywords",
    "memory_id",
    "query",
    "results",
  ]);
  const titles = new Map(
    (content.results as Array<{ memory_id: string; title: string }>).map((r) => [
      r.memory_id,
      r.title,
    ]),
  );
  assert.equal(titles.size, 4);
  assert.equal(titles.get(text.id), "Cabin wifi password: sunshine42");
  assert.equal(titles.get(photo.id), "[Image] cabin, lake, wifi (+2 more)");
  assert.equal(titles.get(captioned.id), "[Image] Router at the cabin");
  assert.equal(titles.get(fewTags.id), "cabin, keys");
  assert.ok(!core.state.requests.some((r) => r.method === "POST"));
});

Deno.test("search: a memory with no content and no tags is Untitled", async () => {
  await using core = startCoreEmulator();
  core.setFault(({ path }) =>
    path === "/search"
      ? Response.json([
        { memory: { id: "m1", content: null, media_type: "text", tags: [] }, score: 1 },
        { memory: { id: "m2", content: "", media_type: "image", tags: [] }, score: 0.5 },
        { memory: { id: "m3", content: "   ", tags: [{ tag: "x" }] }, score: 0.2 },
      ])
      : undefined
  );
  await using model = startModelServer(() => answer({ intent: "search", keywords: ["photos"] }));
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { message: "find my photos", memory_id: null, original_timestamp: null },
  });
  assert.deepEqual(out.notifications[0].content.results, [
    { memory_id: "m1", title: "Untitled" },
    { memory_id: "m2", title: "[Image] Untitled" },
    { memory_id: "m3", title: "x" },
  ]);
});

Deno.test("search: no keyword left after cleaning makes no Core call", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    answer({ intent: "search", query: '"', keywords: ['"', '  ""  '] })
  );
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { message: 'find "', memory_id: null, original_timestamp: null },
  });
  assert.ok(!core.state.requests.some((r) => r.path === "/search"));
  const content = out.notifications[0].content;
  assert.deepEqual(content.results, []);
  assert.deepEqual(content.keywords, []);
  assert.equal(content.query, 'find "');
});

Deno.test("search: the model's query stands in for missing keywords but never replaces query", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    answer({ intent: "search", query: 'passport "scan"', keywords: [] })
  );
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { message: "where did I put the passport scan", memory_id: null },
  });
  const search = core.state.requests.find((r) => r.path === "/search");
  assert.equal(search?.query.q, "passport scan");
  assert.equal(out.notifications[0].content.query, "where did I put the passport scan");
});

Deno.test("stale: true when the resolved time is already past; absent otherwise", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(1, "Europe/London");
  let reply = answer({
    intent: "reminder",
    action: "Take the bins out",
    time: "this morning at 9",
    resolved_time: "2026-07-01T09:00:00", // 08:00Z, before NOW (12:00Z)
  });
  await using model = startModelServer(() => reply);
  const payload = { message: "remind me to take the bins out at 9", memory_id: null };
  const past = await run({ coreUrl: core.url, modelUrl: model.url, payload });
  assert.equal(past.out.notifications[0].content.stale, true);
  assert.equal(past.out.notifications[0].content.resolved_time, "2026-07-01T09:00:00+01:00");

  reply = answer({
    intent: "task",
    description: "File taxes",
    due_time: "by noon",
    resolved_due_time: "2026-07-01T11:30:00Z",
  });
  const pastTask = await run({ coreUrl: core.url, modelUrl: model.url, payload });
  assert.equal(pastTask.out.notifications[0].content.stale, true);
  assert.equal(
    pastTask.out.notifications[0].content.resolved_due_time,
    "2026-07-01T12:30:00+01:00",
  );

  reply = answer({
    intent: "reminder",
    action: "Take the bins out",
    time: "tonight",
    resolved_time: "2026-07-01T21:00:00",
  });
  const future = await run({ coreUrl: core.url, modelUrl: model.url, payload });
  assert.equal("stale" in future.out.notifications[0].content, false);
});

Deno.test("the prompt carries original_timestamp in the user's timezone, not the job's clock", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(1, "Europe/London");
  await using model = startModelServer(() => ANSWERS.reminder);
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: {
      message: "remind me tomorrow at 9 to call mum",
      memory_id: null,
      original_timestamp: "2026-06-29T23:30:00Z", // Tuesday 00:30 in London
    },
  });
  const prompt = promptOf(model.requests[0]);
  assert.ok(prompt.includes("Tuesday 2026-06-30T00:30:00+01:00"), prompt);
  assert.ok(prompt.includes("Europe/London"), prompt);
  assert.ok(!prompt.includes("2026-07-01T"), "the job's clock is not the reference");
  assert.ok(prompt.includes("remind me tomorrow at 9 to call mum"));
  const system = model.requests[0].body.messages[0];
  assert.equal(system.role, "system");
  assert.ok(String(system.content).includes("resolved_time"));
  // The answer's schema travels as response_format.
  assert.equal(model.requests[0].body.response_format?.type, "json_schema");
});

Deno.test("original_timestamp null uses the job's clock; an offset-less one is UTC", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(1, "America/New_York");
  await using model = startModelServer(() => ANSWERS.general_note);
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { message: "note", memory_id: null },
  });
  assert.ok(promptOf(model.requests[0]).includes("Wednesday 2026-07-01T08:00:00-04:00"));
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { message: "note", memory_id: null, original_timestamp: "2026-06-01T16:00:00.123456" },
  });
  assert.ok(promptOf(model.requests[1]).includes("Monday 2026-06-01T12:00:00-04:00"));
});

Deno.test("an unknown timezone falls back to UTC", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(1, "Not/AZone");
  await using model = startModelServer(() => ANSWERS.reminder);
  const { out } = await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: { message: "call mum tomorrow 9", memory_id: null, original_timestamp: null },
  });
  assert.ok(promptOf(model.requests[0]).includes("User's timezone: UTC"));
  assert.equal(out.notifications[0].content.resolved_time, "2026-07-02T09:00:00+00:00");
});

Deno.test("followup_context: the whole exchange is in the prompt", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWERS.task);
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    payload: {
      message: "passport",
      memory_id: "m-1",
      original_timestamp: null,
      followup_context: {
        followup_question: "Do you want a reminder about your passport?",
        user_answer: "no, it's a task: renew it before August",
      },
    },
  });
  const prompt = promptOf(model.requests[0]);
  assert.ok(prompt.includes('Original message:\n"""passport"""'), prompt);
  assert.ok(prompt.includes("Do you want a reminder about your passport?"));
  assert.ok(prompt.includes("no, it's a task: renew it before August"));
  assert.ok(/whole exchange/i.test(prompt));
});

Deno.test("the message sent to the model is capped at LLM_MAX_INPUT_CHARS; the memory keeps it all", async () => {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWERS.general_note);
  const message = "x".repeat(5000);
  await run({
    coreUrl: core.url,
    modelUrl: model.url,
    env: { LLM_MAX_INPUT_CHARS: "1000" },
    payload: { message, memory_id: null, original_timestamp: null },
  });
  const prompt = promptOf(model.requests[0]);
  // The cap is on the message; the reference time and language lines come on top.
  assert.ok(prompt.length < 1400, `prompt is ${prompt.length} chars`);
  assert.equal([...core.state.memories.values()][0].content, message);
});

Deno.test("an answer that breaks the per-intent rules is an InvalidAnswerError", async () => {
  await using core = startCoreEmulator();
  const replies = [
    answer({ intent: "reminder", action: "Call mum", resolved_time: null }),
    answer({ intent: "reminder", action: "Call mum", resolved_time: "tomorrow at 9" }),
    answer({ intent: "reminder", action: "Call mum", resolved_time: "20260702" }),
    answer({ intent: "task", description: "  " }),
    answer({ intent: "search", query: null, keywords: [] }),
    answer({ intent: "ambiguous", followup_question: null }),
    JSON.stringify({ action: "Call mum", resolved_time: "2026-07-02T09:00:00" }),
    JSON.stringify({ intent: "note", suggested_tags: ["a"] }),
  ];
  let next = 0;
  await using model = startModelServer((_: ChatRequest) => replies[next++]);
  for (const _ of replies) {
    await assert.rejects(
      run({
        coreUrl: core.url,
        modelUrl: model.url,
        payload: { message: "hello", memory_id: null, original_timestamp: null },
      }),
      InvalidAnswerError,
    );
  }
  assert.ok(!core.state.requests.some((r) => r.method === "POST"));
});

Deno.test("memoryTitle and cleanKeywords", () => {
  assert.equal(memoryTitle({ id: "1", content: "hello" }), "hello");
  assert.equal(memoryTitle({ id: "1", content: null, media_type: "image" }), "[Image] Untitled");
  assert.equal(
    memoryTitle({ id: "1", content: "", tags: [{ tag: "a" }, { tag: "b" }, { tag: "c" }] }),
    "a, b, c",
  );
  assert.equal(
    memoryTitle({
      id: "1",
      content: "",
      tags: ["a", "b", "c", "d"].map((tag) => ({ tag })),
    }),
    "a, b, c (+1 more)",
  );
  assert.deepEqual(cleanKeywords(['"a"', " b ", "", '"', "A", 'new "york"']), [
    "a",
    "b",
    "new york",
  ]);
});
