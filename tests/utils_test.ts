import assert from "node:assert/strict";
import {
  readJson,
  scopedSignal,
  sleep,
  sniffImageType,
  stripThinking,
  truncate,
} from "../lib/utils.ts";

Deno.test("readJson parses a clean object", () => {
  assert.deepEqual(readJson('{"intent": "search", "keywords": ["beach"]}').value, {
    intent: "search",
    keywords: ["beach"],
  });
});

Deno.test("readJson parses surrounding whitespace", () => {
  assert.deepEqual(readJson('\n  {"a": 1}  \n').value, { a: 1 });
});

Deno.test("readJson finds an object inside chatty text", () => {
  const text = 'Sure! Here is the result: {"tags": ["sea", "sand", "sun"]} Hope that helps.';
  assert.deepEqual(readJson(text).value, { tags: ["sea", "sand", "sun"] });
});

Deno.test("readJson reads a fenced ```json block", () => {
  const text =
    'Here you go:\n```json\n{"description": "A dog", "tags": ["dog"]}\n```\nAnything else?';
  assert.deepEqual(readJson(text).value, { description: "A dog", tags: ["dog"] });
});

Deno.test("readJson reads a fence with no language", () => {
  assert.deepEqual(readJson("```\n[1, 2]\n```").value, [1, 2]);
});

Deno.test("readJson keeps nested objects and arrays whole", () => {
  const text =
    'Result: {"events": [{"description": "Dentist", "when": {"day": 2, "slots": [9, 10]}}, ' +
    '{"description": "Gym", "when": {"day": 3, "slots": []}}]} -- done';
  assert.deepEqual(readJson(text).value, {
    events: [
      { description: "Dentist", when: { day: 2, slots: [9, 10] } },
      { description: "Gym", when: { day: 3, slots: [] } },
    ],
  });
});

Deno.test("readJson reads a top-level array", () => {
  assert.deepEqual(readJson('The tags are ["a", "b", {"c": 1}] as requested.').value, [
    "a",
    "b",
    { c: 1 },
  ]);
});

Deno.test("readJson does not count braces inside strings", () => {
  assert.deepEqual(readJson('Answer: {"a": "x } y"} and that is all').value, { a: "x } y" });
  assert.deepEqual(readJson('Answer: {"a": "{[", "b": "\\"}"} end').value, { a: "{[", b: '"}' });
});

Deno.test("readJson skips a broken candidate and takes the next valid one", () => {
  const text = 'First try {"a": 1,} oops, corrected: {"a": 2}';
  assert.deepEqual(readJson(text).value, { a: 2 });
});

Deno.test("readJson skips a broken fence and finds JSON later in the text", () => {
  const text = '```json\n{not json}\n```\nActually: {"ok": true}';
  assert.deepEqual(readJson(text).value, { ok: true });
});

Deno.test("readJson with no JSON throws an Error quoting the text", () => {
  const text = "I am sorry, I cannot help with that request.";
  assert.throws(() => readJson(text).value, (error: unknown) => {
    assert.ok(error instanceof Error);
    assert.match(error.message, /I am sorry, I cannot help with that request\./);
    return true;
  });
});

Deno.test("readJson quotes only the first 200 characters", () => {
  const text = `${"x".repeat(200)}TAIL-NOT-SHOWN`;
  assert.throws(() => readJson(text).value, (error: unknown) => {
    assert.ok(error instanceof Error);
    assert.ok(error.message.includes("x".repeat(200)));
    assert.ok(!error.message.includes("TAIL-NOT-SHOWN"));
    return true;
  });
});

Deno.test("readJson with broken JSON throws", () => {
  assert.throws(() => readJson('{"a": 1, "b": }').value, Error);
  assert.throws(() => readJson('Here: {"unterminated": "value').value, Error);
  assert.throws(() => readJson("").value, Error);
});

Deno.test("stripThinking removes <think> blocks", () => {
  assert.equal(stripThinking('<think>let me see {"x": 0}</think>\n{"a": 1}'), '{"a": 1}');
  assert.equal(stripThinking("<thinking>hmm</thinking>Hello"), "Hello");
  assert.equal(stripThinking("A <think>x</think>B<think>y</think> C"), "A B C");
});

Deno.test("stripThinking removes text before a lone closing tag", () => {
  assert.equal(stripThinking('reasoning without an opening tag</think>{"a": 1}'), '{"a": 1}');
});

Deno.test("stripThinking leaves plain text alone", () => {
  assert.equal(stripThinking("  What time works for you?  "), "What time works for you?");
});

Deno.test("sniffImageType recognises JPEG, PNG, WebP and GIF", () => {
  assert.equal(sniffImageType(new Uint8Array([0xff, 0xd8, 0xff, 0xe0, 0, 0x10])), "image/jpeg");
  assert.equal(
    sniffImageType(new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0])),
    "image/png",
  );
  const webp = new TextEncoder().encode("RIFF\x24\x00\x00\x00WEBPVP8 ");
  assert.equal(sniffImageType(webp), "image/webp");
  assert.equal(sniffImageType(new TextEncoder().encode("GIF89a\x01\x00")), "image/gif");
  assert.equal(sniffImageType(new TextEncoder().encode("GIF87a\x01\x00")), "image/gif");
});

Deno.test("sniffImageType answers null for anything else", () => {
  assert.equal(sniffImageType(new TextEncoder().encode("hello world")), null);
  assert.equal(sniffImageType(new Uint8Array()), null);
  // A RIFF file that is not WebP (a WAV) is not an image.
  assert.equal(sniffImageType(new TextEncoder().encode("RIFF\x24\x00\x00\x00WAVEfmt ")), null);
  // A truncated PNG signature is not a PNG.
  assert.equal(sniffImageType(new Uint8Array([0x89, 0x50, 0x4e, 0x47])), null);
});

Deno.test("sleep resolves after the time has passed", async () => {
  const started = performance.now();
  await sleep(30);
  assert.ok(performance.now() - started >= 25);
});

Deno.test("sleep rejects with the signal's reason as soon as it aborts", async () => {
  const controller = new AbortController();
  const reason = new Error("stopping");
  const started = performance.now();
  const pending = sleep(10_000, controller.signal);
  setTimeout(() => controller.abort(reason), 10);
  await assert.rejects(pending, (error) => error === reason);
  assert.ok(performance.now() - started < 5_000);
});

Deno.test("sleep rejects at once on an already aborted signal", async () => {
  const reason = new Error("already");
  await assert.rejects(sleep(10_000, AbortSignal.abort(reason)), (error) => error === reason);
});

Deno.test("truncate keeps short text and marks a cut", () => {
  assert.equal(truncate("abc", 3), "abc");
  assert.equal(truncate("abcdef", 4), "abc…");
  assert.equal(truncate("abcdef", 4).length, 4);
  assert.equal(truncate("", 0), "");
});

Deno.test("scopedSignal aborts with the caller's signal and its reason", () => {
  const outer = new AbortController();
  using call = scopedSignal(outer.signal, 60_000);
  assert.equal(call.signal.aborted, false);
  outer.abort(new Error("stopping"));
  assert.equal(call.signal.aborted, true);
  assert.equal((call.signal.reason as Error).message, "stopping");
  assert.equal(call.timedOut, false);
});

Deno.test("scopedSignal times out and says so", async () => {
  using call = scopedSignal(new AbortController().signal, 10);
  await new Promise((resolve) => call.signal.addEventListener("abort", resolve));
  assert.equal(call.timedOut, true);
  assert.equal((call.signal.reason as DOMException).name, "TimeoutError");
});

Deno.test("scopedSignal starts aborted when the caller's signal already is", () => {
  const outer = AbortSignal.abort("gone");
  using call = scopedSignal(outer);
  assert.equal(call.signal.aborted, true);
  assert.equal(call.signal.reason, "gone");
});

Deno.test("a disposed scopedSignal leaves no timer and no listener behind", () => {
  const outer = new AbortController();
  let inner: AbortSignal;
  {
    using call = scopedSignal(outer.signal, 60_000);
    inner = call.signal;
  }
  // The test's op sanitizer fails it if the 60 s timer were still armed.
  outer.abort();
  assert.equal(inner.aborted, false, "the caller's signal no longer reaches a finished call");
});
