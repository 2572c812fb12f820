/**
 * End-to-end tests of the consumer: real Redis (private), the real openai SDK against a local
 * model server, the real Core client against the Core emulator.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { NO_ENTITIES } from "../lib/handlers/intent_classify.ts";
import { LEDGER_PREFIX } from "../lib/ledger.ts";
import { GROUP, STREAM_OF } from "../lib/streams.ts";
import { chatResponse, promptOf } from "./helpers/model_server.ts";
import { defaultReply, startStack } from "./helpers/stack.ts";
import { fakePng } from "./helpers/images.ts";

const PNG = fakePng(48, 1);
const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** The `XREADGROUP` that delivers a stream's new entries to `consumer` (as if it had read them). */
const readAs = (consumer: string, stream: string) =>
  ["XREADGROUP", "GROUP", GROUP, consumer, "COUNT", 10, "STREAMS", stream, ">"] as const;

Deno.test("followup: XADD to PATCH completed, notification, XACK", async () => {
  await using stack = await startStack();
  await stack.startWorker();
  const jobId = await stack.enqueue(
    "followup",
    { message: "Book the dentist", context: "health" },
    7,
  );
  await stack.waitForJobs([jobId]);

  const job = stack.core.state.jobs.get(jobId)!;
  assert.equal(job.status, "completed");
  assert.deepEqual(job.result, { question: "What time works best for you?" });
  const patches = stack.core.state.requests.filter((r) => r.method === "PATCH");
  assert.deepEqual(patches.map((r) => [r.path, r.body]), [
    [`/llm_jobs/${jobId}`, {
      status: "completed",
      result: { question: "What time works best for you?" },
    }],
  ]);
  await stack.waitFor(async () => (await stack.notifications()).length === 1, "the notification");
  assert.deepEqual(await stack.notifications(), [
    {
      user_id: 7,
      message_type: "llm_followup_result",
      content: { question: "What time works best for you?" },
    },
  ]);
  await stack.waitFor(async () => Object.keys(await stack.pending()).length === 0, "the XACK");
  assert.equal(stack.model.requests.length, 1);
});

Deno.test("image_tag end to end: only new tags are suggested, the PNG is sent as PNG", async () => {
  await using stack = await startStack();
  const memory = stack.core.seedMemory({
    owner_user_id: 3,
    content: "",
    media_type: "image",
    tags: [{ tag: "Dog", status: "confirmed" }],
  });
  const path = join(stack.imageDir, crypto.randomUUID());
  await Deno.writeFile(path, PNG);
  await stack.startWorker();
  const jobId = await stack.enqueue("image_tag", { memory_id: memory.id, image_path: path }, 3);
  await stack.waitForJobs([jobId]);

  assert.equal(stack.core.state.jobs.get(jobId)!.status, "completed");
  const request = stack.model.requests[0];
  const parts = request.body.messages.at(-1)!.content as Array<
    { type: string; image_url?: { url: string } }
  >;
  assert.ok(
    parts.find((p) => p.type === "image_url")!.image_url!.url.startsWith("data:image/png;base64,"),
  );
  assert.equal(request.body.model, "llava");
  assert.deepEqual(memory.tags, [
    { tag: "Dog", status: "confirmed" },
    { tag: "beach", status: "suggested" },
    { tag: "sea", status: "suggested" },
  ]);
  await stack.waitFor(async () => (await stack.notifications()).length === 1, "the notification");
  assert.deepEqual((await stack.notifications())[0], {
    user_id: 3,
    message_type: "llm_image_tag_result",
    content: { memory_id: memory.id, tags: ["beach", "sea"], description: "A dog on a beach." },
  });
});

Deno.test("image_tag outside the storage folder fails at once with no model call", async () => {
  await using stack = await startStack();
  const memory = stack.core.seedMemory({ owner_user_id: 3, media_type: "image" });
  await stack.startWorker();
  const jobId = await stack.enqueue("image_tag", {
    memory_id: memory.id,
    image_path: "../../etc/passwd",
  }, 3);
  await stack.waitForJobs([jobId]);
  const job = stack.core.state.jobs.get(jobId)!;
  assert.equal(job.status, "failed");
  assert.match(job.error_message!, /outside/i);
  assert.equal(stack.model.requests.length, 0);
  await stack.waitFor(async () => (await stack.notifications()).length === 1, "the failure notice");
  const [notice] = await stack.notifications();
  assert.equal(notice.message_type, "llm_failure");
  assert.deepEqual(Object.keys(notice.content).sort(), ["job_type", "memory_id", "message"]);
  assert.equal(notice.content.memory_id, memory.id);
  assert.equal(notice.content.job_type, "image_tag");
});

Deno.test("intent_classify end to end: reminder in the user's timezone creates a memory", async () => {
  await using stack = await startStack({
    reply: (request) =>
      request.body.response_format?.json_schema?.name === "intent_result"
        ? JSON.stringify({
          ...NO_ENTITIES,
          intent: "reminder",
          action: "call mum",
          time: "tomorrow at 9am",
          resolved_time: "2026-01-05T09:00:00",
        })
        : defaultReply(request),
  });
  stack.core.seedSettings(5, "Europe/Berlin");
  await stack.startWorker();
  const jobId = await stack.enqueue("intent_classify", {
    message: "remind me to call mum tomorrow at 9am",
    memory_id: null,
    original_timestamp: "2026-01-04T10:00:00Z",
  }, 5);
  await stack.waitForJobs([jobId]);
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "completed");
  assert.match(promptOf(stack.model.requests[0]), /Europe\/Berlin/);
  const memories = [...stack.core.state.memories.values()];
  assert.equal(memories.length, 1);
  assert.equal(memories[0].content, "remind me to call mum tomorrow at 9am");
  await stack.waitFor(async () => (await stack.notifications()).length === 1, "the notification");
  const [note] = await stack.notifications();
  assert.equal(note.message_type, "llm_intent_result");
  assert.equal(note.content.query, "remind me to call mum tomorrow at 9am");
  assert.equal(note.content.intent, "reminder");
  assert.equal(note.content.memory_id, memories[0].id);
  assert.equal(note.content.resolved_time, "2026-01-05T09:00:00+01:00");
  assert.equal(note.content.stale, true, "January 2026 is already past");
  assert.deepEqual(note.content.results, []);
});

Deno.test("intent_classify with user_id null fails at once without a model call", async () => {
  await using stack = await startStack();
  await stack.startWorker();
  const jobId = await stack.enqueue("intent_classify", { message: "hello", memory_id: null }, null);
  await stack.waitForJobs([jobId]);
  const job = stack.core.state.jobs.get(jobId)!;
  assert.equal(job.status, "failed");
  assert.match(job.error_message!, /user_id is null/);
  assert.equal(stack.model.requests.length, 0);
  assert.deepEqual(await stack.notifications(), [], "nobody to notify");
});

Deno.test("task_match end to end: a hallucinated id is no match, a real one is", async () => {
  let answerId = "no-such-task";
  await using stack = await startStack({
    reply: () =>
      JSON.stringify({ matched_task_id: answerId, confidence: 0.95, reason: "same topic" }),
  });
  const task = stack.core.seedTask({ owner_user_id: 4, description: "Buy milk" });
  await stack.startWorker();
  const first = await stack.enqueue(
    "task_match",
    { memory_id: "m1", memory_content: "got milk" },
    4,
  );
  await stack.waitForJobs([first]);
  answerId = task.id;
  const second = await stack.enqueue("task_match", {
    memory_id: "m2",
    memory_content: "bought the milk",
  }, 4);
  await stack.waitForJobs([second]);
  await stack.waitFor(async () => (await stack.notifications()).length === 1, "one notification");
  assert.deepEqual(await stack.notifications(), [{
    user_id: 4,
    message_type: "llm_task_match_result",
    content: { task_id: task.id, task_description: "Buy milk", memory_id: "m2" },
  }]);
  assert.equal(task.state, "NOT_DONE", "a match never changes the task");
});

Deno.test("email_extract end to end: confident events only, each confirmed once", async () => {
  await using stack = await startStack({
    reply: () =>
      JSON.stringify({
        events: [
          { description: "Dentist", event_time: "2026-12-03T15:00:00", confidence: 0.9 },
          { description: "Maybe lunch", event_time: "2026-12-04T12:00:00", confidence: 0.4 },
        ],
      }),
  });
  stack.core.seedSettings(9, "Europe/London");
  await stack.startWorker();
  const jobId = await stack.enqueue("email_extract", {
    subject: "Appointment",
    body: "<p>Your appointment is on <b>3 December at 3pm</b>.</p>",
  }, 9);
  await stack.waitForJobs([jobId]);
  const events = [...stack.core.state.events.values()];
  assert.equal(events.length, 1);
  assert.equal(events[0].event_time, "2026-12-03T15:00:00+00:00");
  assert.equal(events[0].source_type, "email");
  assert.equal(events[0].source_detail, "Appointment");
  await stack.waitFor(async () => (await stack.notifications()).length === 1, "the confirmation");
  const [note] = await stack.notifications();
  assert.equal(note.message_type, "event_confirmation");
  assert.equal(note.content.event_date, "2026-12-03T15:00:00+00:00");
  assert.equal(note.content.description, "Dentist");
});

Deno.test(
  "a model answering chatty, fenced or broken output is asked again, then gives up",
  async () => {
    const answers = [
      'Sure! Here you go:\n```json\n{"matched_task_id": "t", "confidence": 2}\n```', // breaks the schema
      "I think it's the first one.", // no JSON
    ];
    await using stack = await startStack({
      reply: () =>
        answers.shift() ??
          `Sure! {"matched_task_id": null, "confidence": 0.2, "reason": "none"} Bye`,
    });
    stack.core.seedTask({ owner_user_id: 2, id: "t", description: "Call Bob" });
    await stack.startWorker({ LLM_STRUCTURED_OUTPUT: "off", LLM_MAX_RETRIES: "3" });
    const jobId = await stack.enqueue("task_match", { memory_id: "m", memory_content: "note" }, 2);
    await stack.waitForJobs([jobId], 20_000);
    assert.equal(
      stack.core.state.jobs.get(jobId)!.status,
      "completed",
      "the third, chatty answer is read",
    );
    assert.equal(stack.model.requests.length, 3);
    assert.ok(
      stack.model.requests.every((r) => r.body.response_format === undefined),
      "off means off",
    );
    const patches = stack.core.state.requests.filter((r) => r.method === "PATCH");
    assert.deepEqual(
      patches.map((r) => (r.body as { status: string }).status),
      ["processing", "completed"],
      "a job waiting to ask again is processing in Core, once",
    );

    // A model that never makes sense: LLM_MAX_RETRIES attempts in all, then failed + llm_failure.
    stack.model.setReply(() => "no idea");
    const before = stack.model.requests.length;
    const bad = await stack.enqueue("task_match", { memory_id: "m2", memory_content: "note" }, 2);
    await stack.waitForJobs([bad], 20_000);
    const job = stack.core.state.jobs.get(bad)!;
    assert.equal(job.status, "failed");
    assert.match(job.error_message!, /no valid answer in 3 attempts/);
    assert.equal(stack.model.requests.length - before, 3);
  },
);

Deno.test("attempt counts survive a restart: the new worker does not start from one", async () => {
  await using stack = await startStack({ reply: () => "nonsense" });
  stack.core.seedTask({ owner_user_id: 2, description: "Call Bob" });
  const env = {
    LLM_MAX_RETRIES: "3",
    WORKER_CONSUMER_NAME: "same-name",
    WORKER_SHUTDOWN_TIMEOUT_MS: "0",
  };
  const first = await stack.startWorker(env);
  const jobId = await stack.enqueue("task_match", { memory_id: "m", memory_content: "note" }, 2);
  await stack.waitFor(
    async () => await stack.client.hget(`${LEDGER_PREFIX}${jobId}`, "invalid") === "2",
    "the second invalid answer to be recorded",
  );
  await first.close(); // the job waits 2 s for its third attempt: it is left pending
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "processing"); // it waits to ask again
  assert.equal(await stack.client.hget(`${LEDGER_PREFIX}${jobId}`, "invalid"), "2");

  await stack.startWorker(env);
  await stack.waitForJobs([jobId]);
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "failed");
  assert.equal(stack.model.requests.length, 3, "one more attempt, not three");
});

Deno.test("a model server that is down makes jobs wait, tells the user once, and resumes when it is back", async () => {
  let up = false;
  await using stack = await startStack({
    reply: (request) => up ? defaultReply(request) : new Response("loading model", { status: 503 }),
  });
  await stack.startWorker();
  const jobId = await stack.enqueue("followup", { message: "Plan the trip" }, 11);
  await stack.waitFor(
    () => stack.core.state.jobs.get(jobId)!.status === "processing",
    "processing in Core",
  );
  await delay(3_500); // attempts at 0, 1 s, 3 s: the user still hears once
  const notices = await stack.notifications();
  assert.equal(notices.length, 1);
  assert.equal(notices[0].message_type, "llm_failure");
  assert.match(String(notices[0].content.message), /unavailable.*when it is back/);
  assert.ok(stack.model.requests.length >= 2, "retried while down");

  // While the model is down the reader takes no new jobs.
  const second = await stack.enqueue("followup", { message: "And the hotel" }, 12);
  await delay(300);
  assert.equal(await stack.client.xlen(STREAM_OF.followup), 2);
  const [, , , consumers] = await stack.client.xpending(STREAM_OF.followup, GROUP) as [
    number,
    string,
    string,
    unknown,
  ];
  assert.ok(consumers, "first entry pending");
  assert.equal(
    (await stack.client.xpending(STREAM_OF.followup, GROUP) as [number])[0],
    1,
    "second not read yet",
  );

  up = true; // back: the probe notices within seconds, far sooner than the job's own backoff
  await stack.waitForJobs([jobId, second], 10_000);
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "completed");
  assert.equal(
    (await stack.notifications()).filter((n) => n.message_type === "llm_failure").length,
    1,
  );
});

Deno.test("Core answering 5xx: nothing acknowledged, retried, no duplicate events", async () => {
  await using stack = await startStack({
    reply: () =>
      JSON.stringify({
        events: [
          { description: "Flight", event_time: "2026-12-10T08:00:00Z", confidence: 0.95 },
          { description: "Hotel", event_time: "2026-12-10T15:00:00Z", confidence: 0.9 },
        ],
      }),
  });
  let patchFailures = 2;
  stack.core.setFault(({ method, path }) => {
    if (method === "PATCH" && path.startsWith("/llm_jobs/") && patchFailures > 0) {
      patchFailures--;
      return new Response("database is locked", { status: 503 });
    }
  });
  await stack.startWorker();
  const jobId = await stack.enqueue(
    "email_extract",
    { subject: "Trip", body: "Flight and hotel" },
    9,
  );
  await stack.waitFor(() => patchFailures === 1, "a first refused PATCH");
  assert.equal((await stack.client.xpending(STREAM_OF.email_extract, GROUP) as [number])[0], 1);
  await stack.waitForJobs([jobId], 15_000);
  assert.equal(stack.core.state.events.size, 2, "events created once");
  assert.equal(stack.model.requests.length, 1, "the model's answer is kept across Core retries");
  await stack.waitFor(async () => (await stack.notifications()).length === 2, "two confirmations");
  await stack.waitFor(async () => Object.keys(await stack.pending()).length === 0, "the XACK");
});

Deno.test("malformed entries go to llm:dead with their fields while later jobs still run", async () => {
  await using stack = await startStack();
  await stack.startWorker();
  const bad = [
    await stack.publishRaw(STREAM_OF.followup, ["payload", "{}"]),
    await stack.publishRaw(STREAM_OF.followup, ["data", "{not json"]),
    await stack.publishRaw(STREAM_OF.followup, [
      "data",
      JSON.stringify({ job_type: "followup", payload: {} }),
    ]),
  ];
  const unknown = stack.core.seedJob({ job_type: "horoscope", payload: {}, user_id: 1 });
  bad.push(
    await stack.publishRaw(STREAM_OF.followup, [
      "data",
      JSON.stringify({ job_id: unknown.id, job_type: "horoscope", payload: {}, user_id: 1 }),
    ]),
  );
  const misplaced = stack.core.seedJob({ job_type: "image_tag", payload: {}, user_id: 1 });
  bad.push(
    await stack.publishRaw(STREAM_OF.followup, [
      "data",
      JSON.stringify({ job_id: misplaced.id, job_type: "image_tag", payload: {}, user_id: 1 }),
    ]),
  );
  const good = await stack.enqueue("followup", { message: "still works" }, 1);
  await stack.waitForJobs([good]);
  await stack.waitFor(async () => (await stack.deadLetters()).length === 5, "five dead letters");
  const dead = await stack.deadLetters();
  assert.deepEqual(dead.map((d) => d.id), bad);
  assert.ok(dead.every((d) => d.stream === STREAM_OF.followup));
  assert.match(dead[0].reason, /no `data` field/);
  assert.equal(dead[0].payload, "{}", "original fields are kept");
  assert.match(dead[1].reason, /not JSON/);
  assert.equal(dead[1].data, "{not json");
  assert.match(dead[2].reason, /no `job_id`/);
  assert.match(dead[3].reason, /unknown job_type "horoscope"/);
  assert.match(dead[4].reason, /belongs to llm:image_tag/);
  assert.equal(unknown.status, "failed");
  assert.match(unknown.error_message!, /unknown job_type/);
  assert.equal(misplaced.status, "failed");
  await stack.waitFor(
    async () => Object.keys(await stack.pending()).length === 0,
    "everything acknowledged",
  );
});

Deno.test("a consumer that dies mid-job: another claims the entry and completes it once", async () => {
  const release = Promise.withResolvers<void>();
  let calls = 0;
  await using stack = await startStack({
    reply: async (request) => {
      calls++;
      if (calls === 1) await release.promise; // the first worker's call never comes back in time
      return defaultReply(request);
    },
  });
  const dying = await stack.startWorker({
    WORKER_SHUTDOWN_TIMEOUT_MS: "0",
    WORKER_CLAIM_IDLE_MS: "60000",
  });
  const jobId = await stack.enqueue("followup", { message: "who claims me?" }, 21);
  await stack.waitFor(() => calls === 1, "the first model call");
  await dying.close(); // drain time 0: the job is cut short and stays pending under the dead name
  release.resolve();
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "queued");
  assert.equal((await stack.client.xpending(STREAM_OF.followup, GROUP) as [number])[0], 1);

  await stack.startWorker({ WORKER_CLAIM_IDLE_MS: "1000" });
  await stack.waitForJobs([jobId], 10_000);
  await stack.waitFor(async () => Object.keys(await stack.pending()).length === 0, "the XACK");
  assert.equal((await stack.notifications()).length, 1);
  assert.equal(stack.core.state.requests.filter((r) => r.method === "PATCH").length, 1);
});

Deno.test("a redelivered job already completed in Core is acknowledged without being redone", async () => {
  await using stack = await startStack();
  const jobId = await stack.enqueue("followup", { message: "done already" }, 1);
  // Another consumer read it and finished the job in Core, then died before its XACK.
  await stack.client.xgroup("CREATE", STREAM_OF.followup, GROUP, "0", "MKSTREAM");
  await stack.client.call(...readAs("ghost", STREAM_OF.followup));
  stack.core.state.jobs.get(jobId)!.status = "completed";
  await stack.startWorker({ WORKER_CLAIM_IDLE_MS: "1000" });
  await stack.waitFor(
    async () => Object.keys(await stack.pending()).length === 0,
    "the claim and XACK",
    10_000,
  );
  assert.equal(stack.model.requests.length, 0);
  assert.deepEqual(await stack.notifications(), []);
});

Deno.test("one job per user at a time, in entry order across streams; other users in parallel", async () => {
  const log: Array<{ user: string; event: "start" | "end"; at: number }> = [];
  await using stack = await startStack({
    reply: async (request) => {
      const user = /user-(\d+)-job-(\d+)/.exec(promptOf(request))!;
      log.push({ user: `${user[1]}:${user[2]}`, event: "start", at: performance.now() });
      await delay(150);
      log.push({ user: `${user[1]}:${user[2]}`, event: "end", at: performance.now() });
      return request.body.response_format?.json_schema?.name === "task_match"
        ? JSON.stringify({ matched_task_id: null, confidence: 0, reason: "no" })
        : "Which one?";
    },
  });
  stack.core.seedTask({ owner_user_id: 1, description: "x" });
  // Queue first, then start the worker: one read sees everything, as after a restart.
  const ids = [
    await stack.enqueue("followup", { message: "user-1-job-1" }, 1),
    await stack.enqueue("task_match", { memory_id: "m", memory_content: "user-1-job-2" }, 1),
    await stack.enqueue("followup", { message: "user-2-job-1" }, 2),
    await stack.enqueue("followup", { message: "user-1-job-3" }, 1),
  ];
  await stack.startWorker({ WORKER_CONCURRENCY: "4" });
  await stack.waitForJobs(ids);
  const starts = log.filter((e) => e.event === "start").map((e) => e.user);
  const user1 = starts.filter((u) => u.startsWith("1:"));
  assert.deepEqual(user1, ["1:1", "1:2", "1:3"], "user 1 in entry order across two streams");
  for (let i = 0; i < log.length - 1; i++) {
    if (log[i].user.startsWith("1:") && log[i].event === "start") {
      const end = log.findIndex((e) => e.user === log[i].user && e.event === "end");
      const overlapping = log.slice(i + 1, end).filter((e) =>
        e.user.startsWith("1:") && e.event === "start"
      );
      assert.deepEqual(overlapping, [], "user 1 never has two jobs at the model at once");
    }
  }
  const user2Start = log.find((e) => e.user === "2:1" && e.event === "start")!.at;
  const user1FirstEnd = log.find((e) => e.user === "1:1" && e.event === "end")!.at;
  assert.ok(user2Start < user1FirstEnd, "user 2 does not wait for user 1");
});

Deno.test("WORKER_CONCURRENCY bounds model requests in flight", async () => {
  await using stack = await startStack({
    reply: async (request) => {
      await delay(100);
      return defaultReply(request);
    },
  });
  await stack.startWorker({ WORKER_CONCURRENCY: "3" });
  const ids = [];
  for (let user = 1; user <= 12; user++) {
    ids.push(await stack.enqueue("followup", { message: `question ${user}` }, user));
  }
  await stack.waitForJobs(ids);
  assert.equal(stack.model.maxInFlight, 3);
});

Deno.test("a job writing its results to a slow Core leaves its model slot to the next job", async () => {
  const events: string[] = [];
  await using stack = await startStack({
    reply: (request) => {
      events.push(`model: ${promptOf(request).includes("first") ? "first" : "second"}`);
      return defaultReply(request);
    },
  });
  const first = await stack.enqueue("followup", { message: "the first question" }, 1);
  // Core takes 1.5 s over the first job's final PATCH.
  stack.core.setFault(async ({ method, path }) => {
    if (method === "PATCH" && path === `/llm_jobs/${first}`) {
      events.push("PATCH first: sent");
      await delay(1_500);
      events.push("PATCH first: answered");
    }
    return undefined;
  });
  await stack.startWorker({ WORKER_CONCURRENCY: "1" });
  await stack.waitFor(() => events.includes("PATCH first: sent"), "the first PATCH");
  const second = await stack.enqueue("followup", { message: "the second question" }, 2);
  await stack.waitForJobs([first, second]);
  assert.deepEqual(events, [
    "model: first",
    "PATCH first: sent",
    "model: second",
    "PATCH first: answered",
  ]);
});

Deno.test("an expired job fails without a model call", async () => {
  await using stack = await startStack();
  const job = stack.core.seedJob({ job_type: "followup", payload: { message: "old" }, user_id: 1 });
  const fifteenDaysAgo = Date.now() - 15 * 24 * 3600 * 1000;
  await stack.client.xadd(
    STREAM_OF.followup,
    `${fifteenDaysAgo}-0`,
    "data",
    JSON.stringify({
      job_id: job.id,
      job_type: "followup",
      payload: { message: "old" },
      user_id: 1,
    }),
  );
  await stack.startWorker();
  await stack.waitForJobs([job.id]);
  assert.equal(job.status, "failed");
  assert.match(job.error_message!, /expired/);
  assert.equal(stack.model.requests.length, 0);
});

Deno.test("Redis going away and coming back: the worker reconnects and carries on", async () => {
  await using stack = await startStack({ appendOnly: true });
  const worker = await stack.startWorker();
  const first = await stack.enqueue("followup", { message: "before" }, 1);
  await stack.waitForJobs([first]);
  await stack.redis.kill();
  await delay(1_500);
  await stack.redis.restart();
  await stack.waitFor(() => worker.redis.status === "ready", "the reconnect", 10_000);
  const second = await stack.enqueue("followup", { message: "after" }, 1);
  await stack.waitForJobs([second], 15_000);
  assert.ok(worker.consumer.running);
});

Deno.test("entries delivered in a reply lost with the connection are taken back on reconnect", async () => {
  await using stack = await startStack();
  // The default claim idle time (10 minutes): no claim can rescue the entry during the test.
  const worker = await stack.startWorker({ WORKER_CONSUMER_NAME: "lost-reply" });
  const first = await stack.enqueue("followup", { message: "before" }, 1);
  await stack.waitForJobs([first]);
  // Redis delivers an entry to the worker's name, and the reply never reaches it: as when Redis
  // dies (or the network drops) with the worker's XREADGROUP answered but not yet read.
  const payload = { message: "delivered, reply lost" };
  const job = stack.core.seedJob({ job_type: "followup", payload, user_id: 1 });
  const data = JSON.stringify({ job_id: job.id, job_type: "followup", payload, user_id: 1 });
  await stack.client.multi()
    .xadd(STREAM_OF.followup, "*", "data", data)
    .call(...readAs("lost-reply", STREAM_OF.followup))
    .exec();
  await delay(300);
  assert.equal(stack.core.state.jobs.get(job.id)!.status, "queued", "no read returns it");
  // The connection drops and comes back.
  const clients = await stack.client.call("CLIENT", "LIST") as string;
  const ids = clients.split("\n").filter((line) => line.includes(" name=lost-reply "))
    .map((line) => /^id=(\d+)/.exec(line)![1]);
  assert.equal(ids.length, 3, "the worker's connections: commands, reading, subscriptions");
  for (const id of ids) await stack.client.call("CLIENT", "KILL", "ID", id);
  await stack.waitForJobs([job.id], 10_000);
  assert.equal(stack.core.state.jobs.get(job.id)!.status, "completed");
  await stack.waitFor(async () => Object.keys(await stack.pending()).length === 0, "the XACK");
  assert.equal((await stack.notifications()).length, 2);
  assert.ok(worker.consumer.running);
});

Deno.test("a model that rejects the request (4xx) fails the job with a clear message", async () => {
  await using stack = await startStack({
    reply: () =>
      Response.json({ error: { message: "model 'mistral' not found" } }, { status: 404 }),
  });
  await stack.startWorker({ LLM_STRUCTURED_OUTPUT: "off" });
  const jobId = await stack.enqueue("followup", { message: "hi" }, 1);
  await stack.waitForJobs([jobId]);
  const job = stack.core.state.jobs.get(jobId)!;
  assert.equal(job.status, "failed");
  assert.match(job.error_message!, /refused the request.*LLM_TEXT_MODEL/);
});

Deno.test("structured output: auto falls back once per model when the server refuses the schema", async () => {
  await using stack = await startStack({
    reply: (request) =>
      request.body.response_format
        ? Response.json({ error: { message: "response_format not supported" } }, { status: 400 })
        : chatResponse(JSON.stringify({ matched_task_id: null, confidence: 0, reason: "none" })),
  });
  stack.core.seedTask({ owner_user_id: 1, description: "x" });
  await stack.startWorker();
  const a = await stack.enqueue("task_match", { memory_id: "a", memory_content: "a" }, 1);
  await stack.waitForJobs([a]);
  const b = await stack.enqueue("task_match", { memory_id: "b", memory_content: "b" }, 1);
  await stack.waitForJobs([b]);
  assert.deepEqual(stack.model.requests.map((r) => r.body.response_format?.type ?? "none"), [
    "json_schema",
    "none",
    "none",
  ]);
});

Deno.test("stopping while Redis is away still returns", async () => {
  await using stack = await startStack();
  const worker = await stack.startWorker({ WORKER_SHUTDOWN_TIMEOUT_MS: "500" });
  await stack.redis.kill();
  const started = performance.now();
  await worker.close();
  assert.ok(performance.now() - started < 10_000, "close did not hang on the dead connection");
  assert.equal(worker.consumer.running, false);
});

Deno.test("a job retried because Core failed mid-way does not ask the model again", async () => {
  await using stack = await startStack();
  let refusals = 4; // more than the Core client's two quick retries: the job itself is retried
  stack.core.setFault(({ method, path }) => {
    if (method === "POST" && path === "/memories" && refusals-- > 0) {
      return new Response("busy", { status: 503 });
    }
  });
  await stack.startWorker();
  const jobId = await stack.enqueue(
    "intent_classify",
    { message: "the cabin wifi is sunshine42" },
    6,
  );
  await stack.waitForJobs([jobId]);
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "completed");
  assert.equal(stack.model.requests.length, 1, "the kept answer is reused");
  assert.equal(stack.core.state.memories.size, 1);
});

Deno.test("an answer the handler refuses is not kept: the retry asks afresh", async () => {
  const tooLong = "a tag that is much longer than forty characters in all";
  const answers = [
    JSON.stringify({ description: "Odd.", tags: [tooLong, `${tooLong}!`, `${tooLong}?`] }),
    JSON.stringify({ description: "A cat.", tags: ["cat", "sofa", "nap"] }),
  ];
  await using stack = await startStack({ reply: () => answers.shift()! });
  const memory = stack.core.seedMemory({ owner_user_id: 3, media_type: "image" });
  const path = join(stack.imageDir, "photo");
  await Deno.writeFile(path, PNG);
  await stack.startWorker();
  const jobId = await stack.enqueue("image_tag", { memory_id: memory.id, image_path: path }, 3);
  await stack.waitForJobs([jobId]);
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "completed");
  assert.equal(stack.model.requests.length, 2);
  assert.deepEqual(memory.tags.map((t) => t.tag), ["cat", "sofa", "nap"]);
});

Deno.test("a redelivered job Core does not know fails without running, and is acknowledged", async () => {
  await using stack = await startStack();
  const payload = { message: "orphan" };
  await stack.client.xgroup("CREATE", STREAM_OF.followup, GROUP, "0", "MKSTREAM");
  await stack.client.xadd(
    STREAM_OF.followup,
    "*",
    "data",
    JSON.stringify({ job_id: "no-such-job", job_type: "followup", payload, user_id: 8 }),
  );
  await stack.client.call(...readAs("ghost", STREAM_OF.followup));
  await stack.startWorker({ WORKER_CLAIM_IDLE_MS: "1000" });
  await stack.waitFor(
    async () => Object.keys(await stack.pending()).length === 0,
    "the XACK",
    10_000,
  );
  assert.equal(stack.model.requests.length, 0, "the handler did not run");
  const notices = await stack.notifications();
  assert.equal(notices.length, 1);
  assert.equal(notices[0].message_type, "llm_failure");
  assert.equal(notices[0].user_id, 8);
});

Deno.test("a replica whose user was taken over writes nothing more and counts the run as lease_lost", async () => {
  const release = Promise.withResolvers<void>();
  let calls = 0;
  await using stack = await startStack({
    reply: async (request) => {
      if (++calls === 1) await release.promise;
      return defaultReply(request);
    },
  });
  const outcomes: string[] = [];
  const worker = await stack.startWorker({}, {
    events: { jobEnded: (_job, outcome) => outcomes.push(outcome) },
  });
  const jobId = await stack.enqueue("followup", { message: "whose am I?" }, 31);
  await stack.waitFor(() => calls === 1, "the model call");
  // Another replica took user 31 over (as after this one's pause past its lease).
  await stack.client.hset("llm-worker:user:31:lease", "owner", "other", "token", "999999");
  release.resolve();
  await stack.waitFor(() => outcomes.length === 1, "the run's end");
  assert.deepEqual(outcomes, ["lease_lost"]);
  assert.equal(stack.core.state.jobs.get(jobId)!.status, "queued");
  assert.equal(stack.core.state.requests.filter((r) => r.method === "PATCH").length, 0);
  assert.deepEqual(await stack.notifications(), []);
  assert.deepEqual(await stack.pending(), { [STREAM_OF.followup]: 1 });
  assert.match(
    await worker.metrics.metrics(),
    /^llm_worker_retries_total\{job_type="followup",kind="lease_lost"\} 1$/m,
  );
});
