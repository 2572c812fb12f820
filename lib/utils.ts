/**
 * Small helpers with no state: reading JSON out of model text, telling an image's format from
 * its bytes, and sleeping with a cancel signal.
 *
 * @module
 */
import JSON5 from "json5";

/** JSON read out of model text by {@linkcode readJson}, and how it had to be read. */
export interface ReadJson {
  /** The parsed value. */
  value: unknown;
  /** True when the JSON stood inside other text (prose, a code fence), not alone. */
  embedded: boolean;
  /** True when it parsed only as JSON5 (trailing commas, comments, single quotes, bare keys). */
  tolerant: boolean;
}

/**
 * Reads JSON out of unreliable model output.
 *
 * Tries, in order: the whole text; then every candidate from left to right — the body of each
 * markdown code fence and each balanced `{...}` or `[...]` block (brackets inside strings are not
 * counted) — and returns the first that parses. Strict JSON is tried first everywhere; only when
 * nothing parses strictly is each tried again as JSON5, which takes trailing commas, comments,
 * single quotes and unquoted keys.
 *
 * @throws {Error} quoting the first 200 characters when no JSON is found.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const read = readJson("Sure! Here it is: {intent: 'search', keywords: ['cake',],} Enjoy");
 * assert.deepEqual(read, {
 *   value: { intent: "search", keywords: ["cake"] },
 *   embedded: true,
 *   tolerant: true,
 * });
 * ```
 */
export function readJson(text: string): ReadJson {
  const whole = text.trim();
  let inner: string[] | undefined;
  for (const parse of [JSON.parse, JSON5.parse]) {
    const tolerant = parse !== JSON.parse;
    const parsed = tryParse(whole, parse);
    if (parsed.ok) return { value: parsed.value, embedded: false, tolerant };
    inner ??= [...candidates(text)];
    for (const candidate of inner) {
      const found = tryParse(candidate, parse);
      if (found.ok) return { value: found.value, embedded: true, tolerant };
    }
  }
  const head = text.length > 200 ? `${text.slice(0, 200)}…` : text;
  throw new Error(`No JSON found in the model's answer: ${JSON.stringify(head)}`);
}

function tryParse(
  text: string,
  parse: (text: string) => unknown,
): { ok: true; value: unknown } | { ok: false } {
  if (!text) return { ok: false };
  try {
    return { ok: true, value: parse(text) };
  } catch {
    return { ok: false };
  }
}

function* candidates(text: string): Generator<string> {
  // Fenced blocks first: a model that fences its answer means that block.
  for (const match of text.matchAll(/```[a-zA-Z0-9_-]*[ \t]*\r?\n?([\s\S]*?)```/g)) {
    yield match[1].trim();
  }
  for (let start = 0; start < text.length; start++) {
    const ch = text[start];
    if (ch !== "{" && ch !== "[") continue;
    const end = balancedEnd(text, start);
    if (end !== -1) yield text.slice(start, end + 1);
  }
}

/** The index of the bracket closing the one at `start`, or -1; brackets in strings don't count. */
function balancedEnd(text: string, start: number): number {
  const stack: string[] = [];
  let quote = ""; // the quote of the string being read (JSON5 strings may use either)
  for (let i = start; i < text.length; i++) {
    const ch = text[i];
    if (quote) {
      if (ch === "\\") i++;
      else if (ch === quote) quote = "";
      continue;
    }
    if (ch === '"' || ch === "'") quote = ch;
    else if (ch === "{") stack.push("}");
    else if (ch === "[") stack.push("]");
    else if (ch === "}" || ch === "]") {
      if (stack.pop() !== ch) return -1;
      if (stack.length === 0) return i;
    }
  }
  return -1;
}

/**
 * Removes a reasoning model's `<think>…</think>` text (also an unclosed one at the start).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(stripThinking('<think>hmm</think>{"a":1}'), '{"a":1}');
 * ```
 */
export function stripThinking(text: string): string {
  let out = text.replace(/<think(?:ing)?>[\s\S]*?<\/think(?:ing)?>/gi, "");
  // Some servers drop the opening tag and send only "...</think>".
  const close = out.search(/<\/think(?:ing)?>/i);
  if (close !== -1) out = out.slice(close).replace(/^<\/think(?:ing)?>/i, "");
  return out.trim();
}

/** Image formats the model servers accept, by MIME type. */
export type ImageMimeType = "image/jpeg" | "image/png" | "image/webp" | "image/gif";

/**
 * Tells an image's format from its first bytes, or `null` when it is none of JPEG, PNG, WebP, GIF.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(sniffImageType(new Uint8Array([0xff, 0xd8, 0xff, 0xe0])), "image/jpeg");
 * assert.equal(sniffImageType(new TextEncoder().encode("hello")), null);
 * ```
 */
export function sniffImageType(bytes: Uint8Array): ImageMimeType | null {
  const at = (offset: number, ...values: number[]) =>
    values.every((value, i) => bytes[offset + i] === value);
  if (at(0, 0xff, 0xd8, 0xff)) return "image/jpeg";
  if (at(0, 0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a)) return "image/png";
  if (at(0, 0x47, 0x49, 0x46, 0x38)) return "image/gif";
  if (at(0, 0x52, 0x49, 0x46, 0x46) && at(8, 0x57, 0x45, 0x42, 0x50)) return "image/webp";
  return null;
}

/**
 * Resolves after `ms`, or rejects with the signal's reason as soon as `signal` aborts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * await sleep(10);
 * const stop = new AbortController();
 * stop.abort(new Error("stopping"));
 * await assert.rejects(sleep(60_000, stop.signal), /stopping/);
 * ```
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Cuts `text` to at most `max` characters, saying so at the end when it did.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(truncate("abcdef", 4), "abc…");
 * assert.equal(truncate("abc", 4), "abc");
 * ```
 */
export function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, Math.max(0, max - 1))}…`;
}

/** An abort signal scoped to one call, from {@linkcode scopedSignal}. */
export interface ScopedSignal extends Disposable {
  /** Aborts when the caller's signal aborts or the time is up, whichever comes first. */
  readonly signal: AbortSignal;
  /** True when the time ran out (rather than the caller's signal aborting). */
  readonly timedOut: boolean;
}

/**
 * A signal for one call: it aborts as soon as `outer` aborts, or after `timeoutMs` when given,
 * and it lets go of its timer and of `outer` when disposed.
 *
 * The worker's calls hang off long-lived signals (the worker's own stop signal). Handing those
 * to `fetch` or the `openai` SDK directly, or combining them with `AbortSignal.any` and
 * `AbortSignal.timeout`, leaves something behind after every call until V8 collects it: the
 * timeout's armed timer for its whole duration, the SDK's weak subscription on the caller's
 * signal. At hundreds of calls a second these filled the old generation with tens of MB. A
 * scoped signal leaves nothing behind.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const job = new AbortController(); // e.g. the worker's stop signal
 * {
 *   using call = scopedSignal(job.signal, 10_000); // the timer is cleared when `call` goes
 *   assert.equal(call.signal.aborted, false);
 *   job.abort();
 *   assert.equal(call.signal.aborted, true);
 *   assert.equal(call.timedOut, false);
 * }
 * ```
 */
export function scopedSignal(outer?: AbortSignal, timeoutMs?: number): ScopedSignal {
  const controller = new AbortController();
  let timedOut = false;
  const timer = timeoutMs === undefined ? undefined : setTimeout(() => {
    timedOut = true;
    controller.abort(new DOMException(`No answer within ${timeoutMs} ms.`, "TimeoutError"));
  }, timeoutMs);
  const onAbort = () => controller.abort(outer!.reason);
  if (outer?.aborted) onAbort();
  else outer?.addEventListener("abort", onAbort, { once: true });
  return {
    signal: controller.signal,
    get timedOut() {
      return timedOut;
    },
    [Symbol.dispose]() {
      clearTimeout(timer);
      outer?.removeEventListener("abort", onAbort);
    },
  };
}

/**
 * Runs `task` every `intervalMs` (after each wait) until `signal` aborts; a failed run is handed
 * to `onError` and the next one still comes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const stop = new AbortController();
 * let runs = 0;
 * await repeatEvery(1, async () => {
 *   if (++runs === 3) stop.abort();
 * }, stop.signal, () => {});
 * assert.equal(runs, 3);
 * ```
 */
export async function repeatEvery(
  intervalMs: number,
  task: () => Promise<void>,
  signal: AbortSignal,
  onError: (error: unknown) => void,
): Promise<void> {
  while (!signal.aborted) {
    try {
      await sleep(intervalMs, signal);
      await task();
    } catch (error) {
      if (signal.aborted) return;
      onError(error);
    }
  }
}
