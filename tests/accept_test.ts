import assert from "node:assert/strict";
import { z } from "zod";
import { acceptAnswer, whenMissing } from "../lib/accept.ts";
import { readJson } from "../lib/utils.ts";

const Events = z.object({
  events: z.array(z.object({
    description: whenMissing(z.string(), ""),
    event_time: z.string().nullable(),
    confidence: z.number().min(0).max(1),
  })),
});

Deno.test("accept: mends nested answers without changing the input", () => {
  const input = [{ Confidence: "0.9", description: "Dentist" }];
  const frozen = structuredClone(input);
  const { value, repairs } = acceptAnswer(Events, input);
  assert.deepEqual(value, {
    events: [{ confidence: 0.9, description: "Dentist", event_time: null }],
  });
  assert.deepEqual(repairs, ["root_array", "missing_field", "key_spelling", "number_from_text"]);
  assert.deepEqual(input, frozen, "the input is left as it was");
  assert.equal(Events.safeParse(value).success, true);
});

Deno.test("accept: what needs guessing is left for validation to refuse", () => {
  const Intent = z.object({ intent: z.enum(["reminder", "task"]), when: z.string().nullable() });
  const cases: unknown[] = [
    { intent: "shopping" }, // no member of that spelling
    { when: "today" }, // no intent at all
    "reminder", // not an object
    { intent: ["reminder"] },
  ];
  for (const answer of cases) {
    const { value } = acceptAnswer(Intent, answer);
    assert.equal(Intent.safeParse(value).success, false, JSON.stringify(answer));
  }
  const Score = z.object({ score: z.number().min(0).max(1) });
  for (const score of ["1.5", "high", "95%", null]) {
    assert.equal(Score.safeParse(acceptAnswer(Score, { score }).value).success, false, `${score}`);
  }
  // An object with two arrays gives a bare array no home.
  const Two = z.object({ a: z.array(z.string()), b: z.array(z.string()) });
  assert.deepEqual(acceptAnswer(Two, ["x"]), { value: ["x"], repairs: [] });
});

Deno.test("accept: a key spelled two ways keeps the exact one", () => {
  const Schema = z.object({ tags: z.array(z.string()) });
  const { value, repairs } = acceptAnswer(Schema, { tags: ["a"], Tags: ["b"] });
  assert.deepEqual((value as { tags: string[] }).tags, ["a"]);
  assert.deepEqual(repairs, []);
});

Deno.test("readJson: strict first, JSON5 only when nothing parses strictly", () => {
  assert.deepEqual(readJson('{"a": 1}'), { value: { a: 1 }, embedded: false, tolerant: false });
  assert.deepEqual(readJson("{a: 1,}"), { value: { a: 1 }, embedded: false, tolerant: true });
  assert.deepEqual(readJson('Here: {"a": "it\'s [x]"} ok'), {
    value: { a: "it's [x]" },
    embedded: true,
    tolerant: false,
  });
  assert.deepEqual(readJson("```json\n{'a': 'b}', /* c */ }\n```"), {
    value: { a: "b}" },
    embedded: true,
    tolerant: true,
  });
  assert.throws(() => readJson("no json here"), /No JSON found/);
});
