import assert from "node:assert/strict";
import {
  compareEntryIds,
  deadLetterArgs,
  JOB_STREAMS,
  originalFields,
  parseEntry,
  STREAM_OF,
} from "../lib/streams.ts";

const envelope = (fields: Record<string, unknown>) => ["data", JSON.stringify(fields)];

Deno.test("streams: the five streams of the contract", () => {
  assert.deepEqual([...JOB_STREAMS].sort(), [
    "llm:email_extract",
    "llm:followup",
    "llm:image_tag",
    "llm:intent",
    "llm:task_match",
  ]);
  assert.equal(STREAM_OF.intent_classify, "llm:intent");
});

Deno.test("parseEntry: a valid envelope becomes a job", () => {
  const parsed = parseEntry(
    "llm:intent",
    "17-3",
    envelope({ job_id: "j1", job_type: "intent_classify", payload: { message: "hi" }, user_id: 4 }),
  );
  assert.deepEqual(parsed, {
    ok: true,
    job: {
      jobId: "j1",
      jobType: "intent_classify",
      payload: { message: "hi" },
      userId: 4,
      stream: "llm:intent",
      entryId: "17-3",
    },
  });
});

Deno.test("parseEntry: every kind of malformed entry is refused with its reason", () => {
  const cases: Array<[string[], RegExp, string | undefined]> = [
    [["payload", "{}"], /no `data` field/, undefined],
    [["data", "{oops"], /not JSON/, undefined],
    [["data", "[1]"], /not a JSON object/, undefined],
    [envelope({ job_type: "followup", payload: {} }), /no `job_id`/, undefined],
    [envelope({ job_id: "j", payload: {} }), /no `job_type`/, "j"],
    [envelope({ job_id: "j", job_type: "tarot", payload: {} }), /unknown job_type "tarot"/, "j"],
    [
      envelope({ job_id: "j", job_type: "image_tag", payload: {} }),
      /belongs to llm:image_tag/,
      "j",
    ],
    [envelope({ job_id: "j", job_type: "followup", user_id: "7" }), /user_id/, "j"],
  ];
  for (const [fields, reason, jobId] of cases) {
    const parsed = parseEntry("llm:followup", "1-0", fields);
    assert.equal(parsed.ok, false, JSON.stringify(fields));
    if (parsed.ok) continue;
    assert.match(parsed.reason, reason);
    assert.equal(parsed.jobId, jobId);
  }
});

Deno.test("compareEntryIds orders by milliseconds, then sequence, numerically", () => {
  assert.ok(compareEntryIds("9-0", "10-0") < 0);
  assert.ok(compareEntryIds("10-2", "10-10") < 0);
  assert.equal(compareEntryIds("10-1", "10-1"), 0);
  assert.ok(compareEntryIds("11-0", "10-99") > 0);
});

Deno.test("deadLetterArgs keeps the original fields after stream, id and reason", () => {
  assert.deepEqual(deadLetterArgs("llm:followup", "5-0", "bad", ["data", "x", "id", "clash"]), [
    "llm:dead",
    "*",
    "stream",
    "llm:followup",
    "id",
    "5-0",
    "reason",
    "bad",
    "data",
    "x",
    "orig_id",
    "clash",
  ]);
});

Deno.test("originalFields gives back exactly the fields deadLetterArgs copied", () => {
  const fields = ["data", "x", "id", "clash", "orig_id", "twice", "reason", "r", "stream", "s"];
  const [, , ...copy] = deadLetterArgs("llm:intent", "5-0", "bad", fields);
  assert.deepEqual(originalFields(copy), fields);
});
