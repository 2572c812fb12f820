/**
 * Real models' answers, run through a whole worker: the real `openai` SDK against a local model
 * server, a private Redis and the Core emulator, with the strict schema turned off as with a
 * model server that ignores `response_format`.
 *
 * Each usable answer must complete its job on the first model call with the right effect in
 * Core and the right notification; each unusable one must be asked again and fail as before.
 *
 * @module
 */
import assert from "node:assert/strict";
import type { JobType } from "../lib/job.ts";
import { type ChatRequest, promptOf } from "./helpers/model_server.ts";
import { type SentNotification, type Stack, startStack } from "./helpers/stack.ts";
import { fakePng } from "./helpers/images.ts";

/** One model answer and what the worker must make of it. */
interface Case {
  /** A unique marker put into the job's input, so the model server knows which answer to give. */
  id: string;
  /** The model's answer, as the model server sends it. */
  answer: string;
  /** The repairs the answer needs (read from the metric). */
  check: (outcome: Outcome) => void;
}

interface Outcome {
  jobId: string;
  stack: Stack;
  notifications: SentNotification[];
  result: Record<string, unknown>;
}

const think = "<think>\nThe user wants... let me think about the fields.\n</think>\n";

/** Answers by the case marker found in the prompt. */
function replyByMarker(cases: readonly { id: string; answer: string }[]) {
  return (request: ChatRequest) => {
    const prompt = promptOf(request);
    const found = cases.find((c) => prompt.includes(`[${c.id}]`));
    return found ? found.answer : "no case for this prompt";
  };
}

function callsFor(stack: Stack, id: string): number {
  return stack.model.requests.filter((r) => promptOf(r).includes(`[${id}]`)).length;
}

async function repairedTotals(stack: Stack, worker: { metrics: { metrics(): Promise<string> } }) {
  const text = await worker.metrics.metrics();
  const totals: Record<string, number> = {};
  for (const match of text.matchAll(/^llm_worker_answers_repaired_total\{([^}]*)\} (\d+)/gm)) {
    const labels = Object.fromEntries(
      [...match[1].matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]),
    );
    totals[`${labels.job_type}/${labels.repair}`] = Number(match[2]);
  }
  void stack;
  return totals;
}

/**
 * Runs every case of one job type in one stack: usable ones must complete on the first call,
 * and the metric must count the repairs named.
 */
async function runUsable(
  jobType: JobType,
  cases: Case[],
  enqueue: (stack: Stack, c: Case) => Promise<string>,
  repairsExpected: string[],
  seed?: (stack: Stack) => void | Promise<void>,
) {
  await using stack = await startStack({ reply: replyByMarker(cases) });
  stack.core.seedSettings(7, "Europe/Berlin");
  await seed?.(stack);
  const worker = await stack.startWorker({ LLM_STRUCTURED_OUTPUT: "off", LLM_MAX_RETRIES: "2" });
  const jobIds = new Map<string, string>();
  for (const c of cases) jobIds.set(c.id, await enqueue(stack, c));
  await stack.waitForJobs([...jobIds.values()], 30_000);
  await stack.waitForAcks();
  const notifications = await stack.notifications();
  for (const c of cases) {
    const jobId = jobIds.get(c.id)!;
    const job = stack.core.state.jobs.get(jobId)!;
    assert.equal(job.status, "completed", `${jobType} ${c.id}: ${job.error_message ?? ""}`);
    assert.equal(callsFor(stack, c.id), 1, `${jobType} ${c.id}: one model call`);
    c.check({ jobId, stack, notifications, result: job.result as Record<string, unknown> });
  }
  const totals = await repairedTotals(stack, worker);
  for (const repair of repairsExpected) {
    assert.ok((totals[`${jobType}/${repair}`] ?? 0) > 0, `${jobType}: ${repair} counted`);
  }
}

/** Runs unusable answers: each is asked LLM_MAX_RETRIES (2) times, then the job fails. */
async function runRefused(
  jobType: JobType,
  cases: Array<{ id: string; answer: string }>,
  enqueue: (stack: Stack, c: { id: string }) => Promise<string>,
  seed?: (stack: Stack) => void | Promise<void>,
) {
  await using stack = await startStack({ reply: replyByMarker(cases) });
  stack.core.seedSettings(7, "Europe/Berlin");
  await seed?.(stack);
  await stack.startWorker({ LLM_STRUCTURED_OUTPUT: "off", LLM_MAX_RETRIES: "2" });
  const jobIds = new Map<string, string>();
  for (const c of cases) jobIds.set(c.id, await enqueue(stack, c));
  await stack.waitForJobs([...jobIds.values()], 30_000);
  await stack.waitForAcks();
  for (const c of cases) {
    const job = stack.core.state.jobs.get(jobIds.get(c.id)!)!;
    assert.equal(job.status, "failed", `${jobType} ${c.id} must be refused`);
    assert.match(job.error_message ?? "", /no valid answer in 2 attempts/, c.id);
    assert.equal(callsFor(stack, c.id), 2, `${jobType} ${c.id}: asked again once`);
  }
  const notifications = await stack.notifications();
  assert.equal(
    notifications.filter((n) => n.message_type === "llm_failure").length,
    cases.length,
    "each refused job tells its user once",
  );
}

// ---------------------------------------------------------------------------------------------
// intent_classify

const intentOf = (id: string, notifications: SentNotification[]) => {
  const found = notifications.find((n) =>
    n.message_type === "llm_intent_result" && String(n.content.query).includes(`[${id}]`)
  );
  assert.ok(found, `a notification for ${id}`);
  return found.content;
};

const INTENT_CASES: Case[] = [
  {
    id: "I1",
    // The shape docs/protocol.md lists: only the chosen intent's fields.
    answer: '{"intent": "search", "query": "butter cake recipe", "keywords": ["butter", "cake", ' +
      '"recipe"]}',
    check: ({ stack, notifications }) => {
      const content = intentOf("I1", notifications);
      assert.equal(content.intent, "search");
      assert.deepEqual(content.keywords, ["butter", "cake", "recipe"]);
      assert.equal(content.memory_id, null);
      const search = stack.core.state.requests.find((r) =>
        r.path === "/search" && r.query.q?.includes("butter")
      );
      assert.equal(search?.query.q, "butter cake recipe");
    },
  },
  {
    id: "I2",
    answer: 'Sure! Here is the classification:\n```json\n{"intent": "Reminder", "action": ' +
      '"Call mum", "time": "tomorrow at 9", "resolved_time": "2026-12-08 09:00"}\n```\nLet me ' +
      "know if you need anything else.",
    check: ({ notifications }) => {
      const content = intentOf("I2", notifications);
      assert.equal(content.intent, "reminder");
      assert.equal(content.action, "Call mum");
      assert.equal(content.time, "tomorrow at 9");
      assert.equal(content.resolved_time, "2026-12-08T09:00:00+01:00");
      assert.equal(typeof content.memory_id, "string");
    },
  },
  {
    id: "I3",
    answer: think + '{"intent": "General note", "suggested_tags": "cabin, wifi",}',
    check: ({ stack, notifications }) => {
      const content = intentOf("I3", notifications);
      assert.equal(content.intent, "general_note");
      assert.deepEqual(content.suggested_tags, ["cabin", "wifi"]);
      const memory = stack.core.state.memories.get(String(content.memory_id));
      assert.match(String(memory?.content), /\[I3\]/);
    },
  },
  {
    id: "I4",
    answer: "{intent: 'task', description: 'Renew passport', // the deadline\n" +
      "due_time: 'before June', resolved_due_time: '2027-06-01T09:00'}",
    check: ({ notifications }) => {
      const content = intentOf("I4", notifications);
      assert.equal(content.intent, "task");
      assert.equal(content.description, "Renew passport");
      assert.equal(content.due_time, "before June");
      assert.equal(content.resolved_due_time, "2027-06-01T09:00:00+02:00");
    },
  },
  {
    id: "I5",
    answer: '{"intent": "AMBIGUOUS", "followup_question": "Do you want a reminder or a task?", ' +
      '"possible_intents": "reminder, general-note"}',
    check: ({ notifications }) => {
      const content = intentOf("I5", notifications);
      assert.equal(content.intent, "ambiguous");
      assert.equal(content.followup_question, "Do you want a reminder or a task?");
      assert.deepEqual(content.possible_intents, ["reminder", "general_note"]);
    },
  },
  {
    id: "I6",
    answer: 'The user is looking for photos. {"Keywords": ["lisbon", "photos"], "INTENT": ' +
      '"search"}',
    check: ({ notifications }) => {
      const content = intentOf("I6", notifications);
      assert.equal(content.intent, "search");
      assert.deepEqual(content.keywords, ["lisbon", "photos"]);
    },
  },
  {
    id: "I7",
    answer: '{"intent": "search", "keywords": [{"keyword": "wifi"}, {"name": "cabin"}]}',
    check: ({ notifications }) => {
      assert.deepEqual(intentOf("I7", notifications).keywords, ["wifi", "cabin"]);
    },
  },
  {
    id: "I8",
    answer: '{"intent": "task", "description": "Call the plumber", "due_time": "None", ' +
      '"resolved_due_time": "null"}',
    check: ({ notifications }) => {
      const content = intentOf("I8", notifications);
      assert.equal(content.intent, "task");
      assert.equal(content.due_time, null);
      assert.equal(content.resolved_due_time, null);
      assert.equal(content.stale, undefined);
    },
  },
  {
    id: "I9",
    answer: '{"confidence": "0.9", "resolved_time": "2026-12-08T18:30", "action": "Water the ' +
      'plants", "intent": "reminder", "notes": "extra field", "time": "tomorrow evening"}',
    check: ({ notifications }) => {
      const content = intentOf("I9", notifications);
      assert.equal(content.resolved_time, "2026-12-08T18:30:00+01:00");
      assert.equal("notes" in content, false, "extra fields are not passed on");
      assert.equal("confidence" in content, false);
    },
  },
  {
    id: "I10",
    answer: 'Answer: {"intent": "general_note", "suggested_tags": [{"tag": "recipe"}, {"tag": ' +
      '"baking"}]}',
    check: ({ notifications }) => {
      assert.deepEqual(intentOf("I10", notifications).suggested_tags, ["recipe", "baking"]);
    },
  },
];

const enqueueIntent = (stack: Stack, c: { id: string }) =>
  stack.enqueue("intent_classify", {
    message: `message [${c.id}]`,
    memory_id: null,
    original_timestamp: "2026-12-07T10:00:00Z",
  }, 7);

Deno.test("answers: intent_classify uses every usable answer on the first call", async () => {
  await runUsable("intent_classify", INTENT_CASES, enqueueIntent, [
    "missing_field",
    "json_in_text",
    "json_syntax",
    "enum_spelling",
    "list_from_text",
    "key_spelling",
    "list_item_from_object",
    "null_text",
  ]);
});

Deno.test("answers: intent_classify still refuses what cannot be used", async () => {
  await runRefused("intent_classify", [
    { id: "R1", answer: "I think this is a reminder to call mum." },
    { id: "R2", answer: '{"action": "Call mum", "resolved_time": "2026-12-08T09:00:00"}' },
    { id: "R3", answer: '{"intent": "reminder", "action": "Call mum", "time": "someday"}' },
    { id: "R4", answer: '{"intent": "search", "keywords": []}' },
    { id: "R5", answer: '{"intent": "ambiguous", "possible_intents": ["task", "reminder"]}' },
    { id: "R6", answer: '{"intent": "shopping", "keywords": ["milk"]}' },
    { id: "R7", answer: '{"intent": "reminder", "action": "x", "resolved_time": "soon"}' },
  ], enqueueIntent);
});

// ---------------------------------------------------------------------------------------------
// image_tag

const tagPostOf = (stack: Stack, memoryId: string) =>
  stack.core.state.requests.find((r) =>
    r.method === "POST" && r.path === `/memories/${memoryId}/tags`
  )
    ?.body as { tags: string[]; status: string } | undefined;

const imageNotification = (memoryId: string, notifications: SentNotification[]) => {
  const found = notifications.find((n) =>
    n.message_type === "llm_image_tag_result" && n.content.memory_id === memoryId
  );
  assert.ok(found, `a notification for memory ${memoryId}`);
  return found.content;
};

const memories = new Map<string, string>();

function imageCase(id: string, answer: string, tags: string[], description: string): Case {
  return {
    id,
    answer,
    check: ({ stack, notifications }) => {
      const memoryId = memories.get(id)!;
      assert.deepEqual(tagPostOf(stack, memoryId), { tags, status: "suggested" }, id);
      assert.deepEqual(imageNotification(memoryId, notifications), {
        memory_id: memoryId,
        tags,
        description,
      });
    },
  };
}

const IMAGE_CASES: Case[] = [
  imageCase(
    "P1",
    '{"description": "A red bicycle against a wall.", "tags": "bicycle, red, street"}',
    ["bicycle", "red", "street"],
    "A red bicycle against a wall.",
  ),
  imageCase("P2", '{"tags": ["bicycle", "street"]}', ["bicycle", "street"], ""),
  imageCase(
    "P3",
    'Here is the JSON you asked for:\n```json\n{"description": "A cat on a sofa.", "tags": ' +
      '["cat", "sofa"]}\n```\nLet me know if you need more tags!',
    ["cat", "sofa"],
    "A cat on a sofa.",
  ),
  imageCase(
    "P4",
    think + '{"tags": ["receipt", "groceries"], "description": "A supermarket receipt."}',
    ["receipt", "groceries"],
    "A supermarket receipt.",
  ),
  imageCase(
    "P5",
    '{"description": "A dog in a park.", "tags": [{"tag": "dog"}, {"name": "park"}, ' +
      '{"value": "grass"}]}',
    ["dog", "park", "grass"],
    "A dog in a park.",
  ),
  imageCase(
    "P6",
    '{"Description": "A mountain lake.", "Tags": ["lake", "mountains"]}',
    ["lake", "mountains"],
    "A mountain lake.",
  ),
  imageCase(
    "P7",
    "{'description': 'A birthday cake.', 'tags': ['cake', 'birthday', 'candles',],}",
    ["cake", "birthday", "candles"],
    "A birthday cake.",
  ),
  imageCase("P8", '["beach", "sea", "sunset"]', ["beach", "sea", "sunset"], ""),
];

async function enqueueImage(stack: Stack, c: { id: string }) {
  await Deno.writeFile(`${stack.imageDir}/${c.id}`, fakePng());
  const memory = stack.core.seedMemory({
    owner_user_id: 7,
    media_type: "image",
    content: `caption [${c.id}]`,
  });
  memories.set(c.id, memory.id);
  return stack.enqueue("image_tag", { memory_id: memory.id, image_path: c.id }, 7);
}

Deno.test("answers: image_tag uses every usable answer on the first call", async () => {
  await runUsable("image_tag", IMAGE_CASES, enqueueImage, [
    "list_from_text",
    "missing_field",
    "json_in_text",
    "list_item_from_object",
    "key_spelling",
    "json_syntax",
    "root_array",
  ]);
});

Deno.test("answers: image_tag still refuses what cannot be used", async () => {
  await runRefused("image_tag", [
    { id: "Q1", answer: "I'm sorry, I cannot see the image clearly." },
    { id: "Q2", answer: '{"description": "A photo of something."}' },
    { id: "Q3", answer: '{"description": "A photo.", "tags": []}' },
    { id: "Q4", answer: '{"description": "A photo.", "tags": 5}' },
  ], enqueueImage);
});

// ---------------------------------------------------------------------------------------------
// task_match

function matchCase(id: string, answer: string, matched: string | null, reason: string): Case {
  return {
    id,
    answer,
    check: ({ notifications, result }) => {
      assert.equal(result.matched_task_id, matched, id);
      assert.equal(result.reason, reason, id);
      const sent = notifications.filter((n) =>
        n.message_type === "llm_task_match_result" && n.content.memory_id === `m-${id}`
      );
      if (matched === null) assert.equal(sent.length, 0, id);
      else {
        assert.deepEqual(sent.map((n) => n.content), [{
          task_id: matched,
          task_description: matched === "42" ? "Pay the rent" : "Call Bob",
          memory_id: `m-${id}`,
        }]);
      }
    },
  };
}

const TASK_CASES: Case[] = [
  matchCase("T1", '{"matched_task_id": "t1", "confidence": 0.9}', "t1", ""),
  matchCase(
    "T2",
    '{"matched_task_id": "t1", "confidence": "0.95", "reason": "The note says Bob was called."}',
    "t1",
    "The note says Bob was called.",
  ),
  matchCase(
    "T3",
    '{"matched_task_id": 42, "confidence": 0.8, "reason": "rent paid"}',
    "42",
    "rent paid",
  ),
  matchCase(
    "T4",
    '{"Matched Task ID": "t1", "Confidence": 0.85, "Reason": "called"}',
    "t1",
    "called",
  ),
  matchCase(
    "T5",
    think + 'Looking at the tasks:\n```json\n{"matched_task_id": "t1", "confidence": 0.9, ' +
      '"reason": "done"}\n```',
    "t1",
    "done",
  ),
  matchCase(
    "T6",
    "{matched_task_id: 't1', confidence: .9, reason: 'Bob called back', /* sure */}",
    "t1",
    "Bob called back",
  ),
  matchCase("T7", '{"matched_task_id": "null", "confidence": "0.1", "reason": "no"}', null, "no"),
  matchCase("T8", '{"confidence": 0.1, "reason": "nothing fits"}', null, "nothing fits"),
];

const seedTasks = (stack: Stack) => {
  stack.core.seedTask({ owner_user_id: 7, id: "t1", description: "Call Bob" });
  stack.core.seedTask({ owner_user_id: 7, id: "42", description: "Pay the rent" });
};

const enqueueMatch = (stack: Stack, c: { id: string }) =>
  stack.enqueue("task_match", { memory_id: `m-${c.id}`, memory_content: `note [${c.id}]` }, 7);

Deno.test("answers: task_match uses every usable answer on the first call", async () => {
  await runUsable("task_match", TASK_CASES, enqueueMatch, [
    "missing_field",
    "number_from_text",
    "text_from_number",
    "key_spelling",
    "json_in_text",
    "json_syntax",
    "null_text",
  ], seedTasks);
});

Deno.test("answers: task_match still refuses what cannot be used", async () => {
  await runRefused(
    "task_match",
    [
      { id: "U1", answer: '{"matched_task_id": "t1", "confidence": 1.5, "reason": "sure"}' },
      { id: "U2", answer: '{"matched_task_id": "t1", "confidence": "high", "reason": "sure"}' },
      { id: "U3", answer: "The first task matches." },
      { id: "U4", answer: '{"matched_task_id": "t1", "reason": "no confidence given"}' },
    ],
    enqueueMatch,
    seedTasks,
  );
});

// ---------------------------------------------------------------------------------------------
// email_extract

function emailCase(
  id: string,
  answer: string,
  events: Array<{ description: string; event_time: string }>,
): Case {
  return {
    id,
    answer,
    check: ({ stack, notifications, jobId }) => {
      const created = [...stack.core.state.events.values()].filter((e) =>
        e.source_detail === `Subject [${id}]`
      );
      assert.deepEqual(
        created.map((e) => ({ description: e.description, event_time: e.event_time })),
        events,
        id,
      );
      const ids = new Set(created.map((e) => String(e.id)));
      const sent = notifications.filter((n) =>
        n.message_type === "event_confirmation" && ids.has(String(n.content.event_id))
      );
      assert.deepEqual(
        sent.map((n) => ({ description: n.content.description, event_time: n.content.event_date })),
        events,
        `${id} (${jobId})`,
      );
    },
  };
}

const DENTIST = { description: "Dentist appointment", event_time: "2026-12-10T15:00:00+01:00" };
const DINNER = { description: "Dinner with Anna", event_time: "2026-12-12T19:30:00+01:00" };

const EMAIL_CASES: Case[] = [
  emailCase(
    "E1",
    '[{"description": "Dentist appointment", "event_time": "2026-12-10T15:00:00", ' +
      '"confidence": 0.9}]',
    [DENTIST],
  ),
  emailCase(
    "E2",
    '{"events": [{"description": "Dentist appointment", "event_time": "2026-12-10T15:00:00", ' +
      '"confidence": "0.95"}]}',
    [DENTIST],
  ),
  emailCase(
    "E3",
    '{"events": [{"description": "Dentist appointment", "event_time": "2026-12-10 15:00", ' +
      '"confidence": 0.9}]}',
    [DENTIST],
  ),
  emailCase(
    "E4",
    'I found two events in this email:\n```json\n{"events": [{"description": "Dentist ' +
      'appointment", "event_time": "2026-12-10T15:00:00", "confidence": 0.9}, {"description": ' +
      '"Dinner with Anna", "event_time": "2026-12-12T19:30:00", "confidence": 0.8}]}\n```',
    [DENTIST, DINNER],
  ),
  emailCase(
    "E5",
    "{\n  // the only event\n  events: [{description: 'Dinner with Anna', event_time: " +
      "'2026-12-12T19:30', confidence: 0.9,},],\n}",
    [DINNER],
  ),
  emailCase(
    "E6",
    '{"events": [{"event_time": "2026-12-11T10:00:00", "confidence": 0.9}, {"description": ' +
      '"Call the bank", "confidence": 0.9}, {"description": "Dentist appointment", ' +
      '"event_time": "2026-12-10T15:00:00", "confidence": 0.9}]}',
    [DENTIST],
  ),
  emailCase(
    "E7",
    '{"Events": [{"Description": "Dinner with Anna", "Event_Time": "2026-12-12T19:30:00", ' +
      '"Confidence": 0.9}]}',
    [DINNER],
  ),
  emailCase(
    "E8",
    think + '{"events": [{"confidence": "0.9", "description": "Dentist appointment", ' +
      '"event_time": "2026-12-10T15:00"}]}',
    [DENTIST],
  ),
];

const enqueueEmail = (stack: Stack, c: { id: string }) =>
  stack.enqueue("email_extract", { subject: `Subject [${c.id}]`, body: `Email body [${c.id}]` }, 7);

Deno.test("answers: email_extract uses every usable answer on the first call", async () => {
  await runUsable("email_extract", EMAIL_CASES, enqueueEmail, [
    "root_array",
    "number_from_text",
    "json_in_text",
    "json_syntax",
    "missing_field",
    "key_spelling",
  ]);
});

Deno.test("answers: email_extract still refuses what cannot be used", async () => {
  await runRefused("email_extract", [
    { id: "F1", answer: "There is a dentist appointment on Thursday." },
    {
      id: "F2",
      answer: '{"events": [{"description": "Dentist", "event_time": "2026-12-10T15:00:00", ' +
        '"confidence": 2}]}',
    },
    { id: "F3", answer: '{"events": "dentist on Thursday"}' },
    { id: "F4", answer: '{"events": [{"description": "Dentist", "event_time": "2026-12-10"}]}' },
  ], enqueueEmail);
});

// ---------------------------------------------------------------------------------------------
// followup

function questionCase(id: string, answer: string, question: string): Case {
  return {
    id,
    answer,
    check: ({ result }) => assert.deepEqual(result, { question }, id),
  };
}

const FOLLOWUP_CASES: Case[] = [
  questionCase("Q1", "What time should I remind you?", "What time should I remind you?"),
  questionCase("Q2", '{"question": "Which day do you mean?"}', "Which day do you mean?"),
  questionCase(
    "Q3",
    '```json\n{"followup_question": "Is this a task or a note?"}\n```',
    "Is this a task or a note?",
  ),
  questionCase(
    "Q4",
    think + "Question: Which Tom do you mean, Tom Smith or Tom Jones?",
    "Which Tom do you mean, Tom Smith or Tom Jones?",
  ),
  questionCase("Q5", "{question: 'When is the meeting?',}", "When is the meeting?"),
  questionCase(
    "Q6",
    "Sure! Here's my question: What time works best for you?",
    "What time works best for you?",
  ),
  questionCase("Q7", '{"clarifying_question": "Where is the party?"}', "Where is the party?"),
  questionCase("Q8", "**Clarifying question:** Which Tom do you mean?", "Which Tom do you mean?"),
];

const enqueueFollowup = (stack: Stack, c: { id: string }) =>
  stack.enqueue("followup", { message: `message [${c.id}]` }, 7);

Deno.test("answers: followup uses every usable answer on the first call", async () => {
  await runUsable("followup", FOLLOWUP_CASES, enqueueFollowup, ["text_from_json"]);
});

Deno.test("answers: followup still refuses what cannot be used", async () => {
  await runRefused("followup", [
    { id: "V1", answer: "```\n```" },
    { id: "V2", answer: '{"answer": 42}' },
    { id: "V3", answer: think },
  ], enqueueFollowup);
});
