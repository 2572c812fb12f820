/**
 * Small helpers with no state: reading JSON out of model text, telling an image's format from
 * its bytes, and sleeping with a cancel signal.
 *
 * @module
 */

/**
 * Reads JSON out of unreliable model output.
 *
 * Tries, in order: the whole text; then every candidate from left to right — the body of each
 * markdown code fence and each balanced `{...}` or `[...]` block (brackets inside JSON strings
 * are not counted) — and returns the first that parses.
 *
 * @throws {Error} quoting the first 200 characters when no JSON is found.
 *
 * @example
 * ```ts
 * extractJson('Sure! ```json\n{"a": 1}\n``` Hope it helps'); // { a: 1 }
 * ```
 */
export function extractJson(text: string): unknown {
  const whole = tryParse(text.trim());
  if (whole.ok) return whole.value;
  for (const candidate of candidates(text)) {
    const parsed = tryParse(candidate);
    if (parsed.ok) return parsed.value;
  }
  const head = text.length > 200 ? `${text.slice(0, 200)}…` : text;
  throw new Error(`No JSON found in the model's answer: ${JSON.stringify(head)}`);
}

function tryParse(text: string): { ok: true; value: unknown } | { ok: false } {
  if (!text) return { ok: false };
  try {
    return { ok: true, value: JSON.parse(text) };
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
  let inString = false;
  for (let i = start; i < text.length; i++) {
    const ch = text[i];
    if (inString) {
      if (ch === "\\") i++;
      else if (ch === '"') inString = false;
      continue;
    }
    if (ch === '"') inString = true;
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
 * stripThinking("<think>hmm</think>{\"a\":1}"); // '{"a":1}'
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
 * sniffImageType(new Uint8Array([0xff, 0xd8, 0xff, 0xe0])); // "image/jpeg"
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
 * await sleep(100);
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
 * truncate("abcdef", 4); // "abc…"
 * ```
 */
export function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, Math.max(0, max - 1))}…`;
}
