/**
 * The scripted model: a deterministic, offline stand-in for an OpenAI-compatible model server,
 * for the local stack and the demo only (`LLM_BASE_URL=scripted deno task dev`). It is NOT a
 * language model: it recognises each job by the answer's schema name (`response_format`) or, when
 * the worker sends none, by the handler's prompt, and answers with simple rules:
 *
 * - `image_tags`: reads the picture's size and any description or keywords embedded in it (PNG
 *   `tEXt` chunks), plus the owner's caption, and describes it from those.
 * - `intent_result`: keyword rules (remind, need to, questions, ...) and a small reader of
 *   relative times ("tomorrow at 9am", "in 2 hours", "next Friday", "14 May at 15:30") resolved
 *   against the reference time in the prompt.
 * - `task_match`: word overlap between the memory and each offered task.
 * - `email_events`: one event per sentence of the email that names a date, confident when it
 *   also names a time.
 * - followup (plain text): one clarifying question about the message.
 *
 * Run it alone with `deno run --allow-net testing/scripted_model.ts [--port 8080] [--latency 200]`.
 *
 * @module
 */

import { NO_ENTITIES } from "../lib/handlers/intent_classify.ts";

/** Options of {@linkcode startScriptedModel}. */
export interface ScriptedModelOptions {
  /** Port on `hostname`; 0 (default) picks a free one. */
  port?: number;
  /** Interface to listen on (default `127.0.0.1`). */
  hostname?: string;
  /** Delay before each chat answer (ms, default 0), to watch jobs in flight. */
  latencyMs?: number;
}

/** A running scripted model server. */
export interface ScriptedModel {
  /** Base URL for `LLM_BASE_URL`, ending in `/v1`. */
  url: string;
  /** Chat requests answered so far. */
  readonly requests: number;
  /** Stops the server. */
  close(): Promise<void>;
  /** `[Symbol.asyncDispose]` = close. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** The parts of a chat completion request the scripted model reads. */
export interface ChatBody {
  /** The model asked for (echoed back). */
  model?: string;
  /** The conversation. */
  messages?: Array<{ role: string; content: unknown }>;
  /** The answer's schema, when the worker sends one. */
  response_format?: { type?: string; json_schema?: { name?: string } };
}

/** The job kinds the scripted model tells apart. */
export type ScriptedTask =
  | "image_tags"
  | "intent_result"
  | "task_match"
  | "email_events"
  | "followup"
  | "unknown";

/**
 * Starts the scripted model server.
 *
 * @example
 * ```ts
 * await using model = startScriptedModel({ latencyMs: 100 });
 * // LLM_BASE_URL = model.url
 * ```
 */
export function startScriptedModel(options: ScriptedModelOptions = {}): ScriptedModel {
  let requests = 0;
  const latency = Math.max(0, options.latencyMs ?? 0);
  const server = Deno.serve({
    hostname: options.hostname ?? "127.0.0.1",
    port: options.port ?? 0,
    onListen: () => {},
  }, async (req) => {
    const path = new URL(req.url).pathname.replace(/\/+$/, "");
    if (req.method === "GET" && path === "/v1/models") {
      return Response.json({
        object: "list",
        data: [{ id: "scripted", object: "model", owned_by: "life-organiser-dev" }],
      });
    }
    if (req.method !== "POST" || path !== "/v1/chat/completions") {
      return Response.json({ error: { message: `no route ${req.method} ${path}` } }, {
        status: 404,
      });
    }
    let body: ChatBody;
    try {
      body = await req.json();
    } catch {
      return Response.json({ error: { message: "the body is not JSON" } }, { status: 400 });
    }
    requests++;
    if (latency > 0) await new Promise((resolve) => setTimeout(resolve, latency));
    const content = scriptedAnswer(body);
    const prompt = JSON.stringify(body.messages ?? []).length;
    return Response.json({
      id: `chatcmpl-scripted-${requests}`,
      object: "chat.completion",
      created: Math.floor(Date.now() / 1000),
      model: body.model ?? "scripted",
      choices: [{ index: 0, message: { role: "assistant", content }, finish_reason: "stop" }],
      usage: {
        prompt_tokens: Math.ceil(prompt / 4),
        completion_tokens: Math.ceil(content.length / 4),
        total_tokens: Math.ceil(prompt / 4) + Math.ceil(content.length / 4),
      },
    });
  });
  const model: ScriptedModel = {
    url: `http://${options.hostname ?? "127.0.0.1"}:${server.addr.port}/v1`,
    get requests() {
      return requests;
    },
    close: () => server.shutdown(),
    [Symbol.asyncDispose]: () => model.close(),
  };
  return model;
}

// ------------------------------------------------------------------ recognising the job

/** The system text, the last user text and the image (a `data:` URL) of a request. */
function partsOf(body: ChatBody): { system: string; user: string; image?: string } {
  const messages = body.messages ?? [];
  const text = (content: unknown): string => {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.filter((p) => p?.type === "text").map((p) => String(p.text)).join("\n");
    }
    return "";
  };
  const system = messages.filter((m) => m.role === "system").map((m) => text(m.content)).join(
    "\n",
  );
  const last = [...messages].reverse().find((m) => m.role === "user");
  const image = Array.isArray(last?.content)
    ? last.content.find((p) => p?.type === "image_url")?.image_url?.url
    : undefined;
  return { system, user: text(last?.content), image };
}

/** Which job a request is for: the schema name first, else the prompts. */
export function recogniseTask(body: ChatBody): ScriptedTask {
  const name = body.response_format?.json_schema?.name;
  if (
    name === "image_tags" || name === "intent_result" || name === "task_match" ||
    name === "email_events"
  ) {
    return name;
  }
  const { system, user, image } = partsOf(body);
  const all = `${system}\n${user}`;
  if (image || /label photos|Describe and tag this photo/i.test(all)) return "image_tags";
  if (/clarifying question/i.test(all)) return "followup";
  if (/intent classifier|"intent":/i.test(all)) return "intent_result";
  if (/Open tasks:|matched_task_id/i.test(all)) return "task_match";
  if (/Email text:|list the calendar events/i.test(all)) return "email_events";
  return "unknown";
}

/**
 * The scripted answer's text for a chat request: JSON for the four structured jobs, one
 * question for a followup.
 */
export function scriptedAnswer(body: ChatBody): string {
  const { system, user, image } = partsOf(body);
  switch (recogniseTask(body)) {
    case "image_tags":
      return JSON.stringify(answerImage(user, image));
    case "intent_result":
      return JSON.stringify(answerIntent(user));
    case "task_match":
      return JSON.stringify(answerTaskMatch(user));
    case "email_events":
      return JSON.stringify(answerEmail(user));
    case "followup":
      return answerFollowup(user, system);
    default:
      return "The scripted model only answers Life Organiser's five job types.";
  }
}

// ------------------------------------------------------------------ words

const STOP_WORDS = new Set(
  ("a an and are at be been but by can could did do does for from had has have i i'm in is it " +
    "its me my of on or our so that the their them then there this to was we were what when " +
    "where which who why will with you your how about any some please just also into up out " +
    "all get got it's i've i'd want need should would let know").split(" "),
);

/** Lower-case words of `text` (letters, digits, inner apostrophes and dashes). */
function words(text: string): string[] {
  return text.toLowerCase().match(/[\p{L}\p{N}]+(?:['’-][\p{L}\p{N}]+)*/gu) ?? [];
}

/** Words worth keeping: not stop words, not time words, at least 3 characters. */
function contentWords(text: string): string[] {
  const seen = new Set<string>();
  return words(text).filter((w) => {
    if (w.length < 3 || STOP_WORDS.has(w) || TIME_WORDS.test(w) || seen.has(w)) return false;
    seen.add(w);
    return true;
  });
}

const IRREGULAR: Record<string, string> = {
  bought: "buy",
  paid: "pay",
  sent: "send",
  went: "go",
  made: "make",
  took: "take",
  got: "get",
  done: "do",
  did: "do",
  wrote: "write",
  met: "meet",
  left: "leave",
  brought: "bring",
  fixed: "fix",
};

/** A crude stem, enough to see that "bought milk" and "buy milk" are about the same thing. */
function stem(word: string): string {
  if (IRREGULAR[word]) return IRREGULAR[word];
  return word.replace(/(?:ing|ed|es|s)$/, "").replace(/(.)\1$/, "$1");
}

function capitalise(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function tidy(text: string): string {
  return text.replace(/\s+/g, " ").replace(/\s+([,.!?;:])/g, "$1").trim()
    .replace(/^[\s,;:.!?-]+|[\s,;:-]+$/g, "");
}

// ------------------------------------------------------------------ times

/** A wall clock with no zone: calendar arithmetic through `Date.UTC`. */
export interface Wall {
  /** Year. */
  y: number;
  /** Month, 1-12. */
  mo: number;
  /** Day of the month. */
  d: number;
  /** Hour, 0-23. */
  h: number;
  /** Minute. */
  mi: number;
}

const WEEKDAYS = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"];
const MONTHS = [
  "january",
  "february",
  "march",
  "april",
  "may",
  "june",
  "july",
  "august",
  "september",
  "october",
  "november",
  "december",
];
const MONTH = `(?:${
  MONTHS.map((m) => `${m.slice(0, 3)}${m.length > 3 ? `(?:${m.slice(3)})?` : ""}`).join("|")
})\\.?`;
const WEEKDAY = `(?:${WEEKDAYS.map((d) => `${d.slice(0, 3)}(?:${d.slice(3)})?`).join("|")})`;
const TIME_WORDS =
  /^(?:today|tonight|tomorrow|yesterday|morning|afternoon|evening|noon|midnight|am|pm|next|week|hour|hours|minutes?|days?|monday|tuesday|wednesday|thursday|friday|saturday|sunday|january|february|march|april|june|july|august|september|october|november|december)$/;

function toMs(w: Wall): number {
  return Date.UTC(w.y, w.mo - 1, w.d, w.h, w.mi);
}

function fromMs(ms: number): Wall {
  const d = new Date(ms);
  return {
    y: d.getUTCFullYear(),
    mo: d.getUTCMonth() + 1,
    d: d.getUTCDate(),
    h: d.getUTCHours(),
    mi: d.getUTCMinutes(),
  };
}

function formatWall(w: Wall, withTime = true): string {
  const p = (n: number) => String(n).padStart(2, "0");
  const date = `${w.y}-${p(w.mo)}-${p(w.d)}`;
  return withTime ? `${date}T${p(w.h)}:${p(w.mi)}:00` : date;
}

/** The reference wall clock of a prompt line such as `Current time: Tuesday 2026-11-24T13:00:00+00:00 (...)`. */
function referenceOf(prompt: string, label: RegExp): Wall {
  const line = prompt.split("\n").find((l) => label.test(l)) ?? "";
  const m = line.match(/(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/);
  if (m) return { y: +m[1], mo: +m[2], d: +m[3], h: +m[4], mi: +m[5] };
  return fromMs(Date.now());
}

/** Words that name a time in a text, and the wall clock they mean. */
export interface FoundTime {
  /** The time words as written, joined ("Friday at 5pm"). */
  words: string;
  /** The wall clock meant (09:00 when only a day was given). */
  wall: Wall;
  /** A day was named. */
  hasDate: boolean;
  /** An hour was named. */
  hasTime: boolean;
  /** Where the time words are in the text: `[start, end)` pairs in text order. */
  spans: Array<[number, number]>;
}

/**
 * Finds a time expression in `text` and resolves it against the wall clock `ref`: relative
 * (`in 2 hours`, `tomorrow`, `next Friday`, `tonight`) or absolute (`14 May`, `May 14th`,
 * `2026-05-14`), with an optional hour (`at 9`, `9am`, `3:30 PM`, `15:30`, `noon`).
 */
export function findTime(text: string, ref: Wall): FoundTime | null {
  const spans: Array<[number, number]> = [];
  const lower = text.toLowerCase();
  const take = (re: RegExp): RegExpExecArray | null => {
    const m = re.exec(lower);
    if (m) spans.push([m.index, m.index + m[0].length]);
    return m;
  };
  const refDay = { ...ref, h: 0, mi: 0 };
  let day: Wall | undefined;
  let time: { h: number; mi: number } | undefined;
  let exact: Wall | undefined;

  const rel = take(
    /\bin\s+(an?|half an|\d+(?:\.\d+)?)\s*(minutes?|mins?|hours?|hrs?|days?|weeks?)\b/,
  );
  if (rel) {
    const n = rel[1] === "half an" ? 0.5 : /^an?$/.test(rel[1]) ? 1 : Number(rel[1]);
    const unit = rel[2].startsWith("m")
      ? 60_000
      : rel[2].startsWith("h")
      ? 3_600_000
      : rel[2].startsWith("d")
      ? 86_400_000
      : 7 * 86_400_000;
    exact = fromMs(toMs(ref) + n * unit);
  }
  let m: RegExpExecArray | null;
  if ((m = take(/\b(?:the\s+)?day after tomorrow\b/))) {
    day = fromMs(toMs(refDay) + 2 * 86_400_000);
  } else if ((m = take(/\btomorrow\b/))) day = fromMs(toMs(refDay) + 86_400_000);
  else if ((m = take(/\btonight\b/))) {
    day = refDay;
    time = { h: 20, mi: 0 };
  } else if ((m = take(/\btoday\b/))) day = refDay;
  else if ((m = take(/\bnext week\b/))) day = fromMs(toMs(refDay) + 7 * 86_400_000);
  else if ((m = take(/\b(\d{4})-(\d{2})-(\d{2})\b/))) {
    day = { y: +m[1], mo: +m[2], d: +m[3], h: 0, mi: 0 };
  } else if (
    (m = take(
      new RegExp(`\\b(\\d{1,2})(?:st|nd|rd|th)?(?:\\s+of)?\\s+(${MONTH})(?:,?\\s+(\\d{4}))?`),
    )) ||
    (m = take(new RegExp(`\\b(${MONTH})\\s+(\\d{1,2})(?:st|nd|rd|th)?\\b(?:,?\\s+(\\d{4}))?`)))
  ) {
    const [dayText, monthText] = /^\d/.test(m[1]) ? [m[1], m[2]] : [m[2], m[1]];
    const month = MONTHS.findIndex((name) => name.startsWith(monthText.slice(0, 3))) + 1;
    let year = m[3] ? Number(m[3]) : ref.y;
    if (!m[3] && toMs({ y: year, mo: month, d: +dayText, h: 0, mi: 0 }) < toMs(refDay)) year++;
    day = { y: year, mo: month, d: +dayText, h: 0, mi: 0 };
    // "Thursday 14 May": the weekday belongs to the date words too.
    const before = lower.slice(0, m.index).match(new RegExp(`${WEEKDAY},?\\s*$`));
    if (before) spans.push([m.index - before[0].length, m.index]);
  } else if (
    (m = take(new RegExp(`\\b(?:before|by|until|in|early|mid|end of)\\s+(${MONTH})\\b`)))
  ) {
    const month = MONTHS.findIndex((name) => name.startsWith(m![1].slice(0, 3))) + 1;
    day = { y: month < ref.mo ? ref.y + 1 : ref.y, mo: month, d: 1, h: 0, mi: 0 };
  } else if ((m = take(new RegExp(`\\b(?:(next|this|on)\\s+)?(${WEEKDAYS.join("|")})\\b`)))) {
    const target = WEEKDAYS.findIndex((d) => d.startsWith(m![2].slice(0, 3)));
    const today = new Date(toMs(refDay)).getUTCDay();
    let ahead = (target - today + 7) % 7;
    if (ahead === 0) ahead = 7;
    day = fromMs(toMs(refDay) + ahead * 86_400_000);
  }

  if (!time) {
    if ((m = take(/\b(?:at\s+)?(noon|midday|midnight)\b/))) {
      time = { h: m[1] === "midnight" ? 0 : 12, mi: 0 };
    } else if (
      (m = take(/\b(?:at\s+)?(\d{1,2})(?:[:.](\d{2}))?\s*(a\.?m\.?|p\.?m\.?)(?![a-z])/)) ||
      (m = take(/\b(?:at\s+)?([01]?\d|2[0-3])[:.h]([0-5]\d)\b/)) ||
      (m = take(/\bat\s+(\d{1,2})\b(?![:.\d]|\s*(?:%|percent))/))
    ) {
      let h = Number(m[1]);
      const mi = m[2] ? Number(m[2]) : 0;
      const half = m[3]?.replace(/\./g, "");
      if (half === "pm" && h < 12) h += 12;
      if (half === "am" && h === 12) h = 0;
      if (!half && !m[2] && h >= 1 && h <= 7) h += 12; // "at 3" is in the afternoon
      time = { h, mi };
    } else if ((m = take(/\b(?:in the\s+|this\s+)?(morning|afternoon|evening)\b/))) {
      time = { h: m[1] === "morning" ? 9 : m[1] === "afternoon" ? 15 : 19, mi: 0 };
    }
  }
  if (spans.length === 0) return null;
  let wall: Wall;
  if (exact) wall = exact;
  else if (day) wall = { ...day, h: time?.h ?? 9, mi: time?.mi ?? 0 };
  else {
    // An hour alone: today when still ahead, else tomorrow.
    wall = { ...refDay, h: time!.h, mi: time!.mi };
    if (toMs(wall) <= toMs(ref)) wall = fromMs(toMs(wall) + 86_400_000);
  }
  spans.sort((a, b) => a[0] - b[0]);
  // Adjacent words ("tomorrow at 9am") are one run; others ("Friday ... at 5pm") are joined.
  const runs: Array<[number, number]> = [];
  for (const [s, e] of spans) {
    const last = runs.at(-1);
    if (last && /^[\s,]*$/.test(text.slice(last[1], s))) last[1] = Math.max(last[1], e);
    else runs.push([s, e]);
  }
  return {
    words: runs.map(([s, e]) => text.slice(s, e).trim()).join(" "),
    wall,
    hasDate: day !== undefined || exact !== undefined,
    hasTime: time !== undefined || exact !== undefined,
    spans: runs,
  };
}

/** `text` without the time words found in it. */
function withoutTime(text: string, found: FoundTime | null): string {
  if (!found) return text;
  let out = "";
  let at = 0;
  for (const [start, end] of found.spans) {
    out += `${text.slice(at, start).replace(/\b(?:by|before|until|on|at|for)\s*$/i, "")} `;
    at = end;
  }
  return out + text.slice(at);
}

// ------------------------------------------------------------------ image_tags

/** Size, kind and embedded text (`tEXt` chunks) of a PNG, or the size of a JPEG. */
function readImage(
  dataUrl?: string,
): { kind: string; width?: number; height?: number; text: Record<string, string> } {
  const info = { kind: "picture", text: {} as Record<string, string> } as {
    kind: string;
    width?: number;
    height?: number;
    text: Record<string, string>;
  };
  const match = dataUrl?.match(/^data:([^;,]+)?(?:;base64)?,(.*)$/s);
  if (!match) return info;
  let bytes: Uint8Array;
  try {
    bytes = Uint8Array.from(atob(match[2]), (c) => c.charCodeAt(0));
  } catch {
    return info;
  }
  const view = new DataView(bytes.buffer);
  if (bytes.length > 24 && bytes[0] === 0x89 && bytes[1] === 0x50) {
    info.kind = "PNG";
    info.width = view.getUint32(16);
    info.height = view.getUint32(20);
    for (let at = 8; at + 8 <= bytes.length;) {
      const length = view.getUint32(at);
      const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
      if (type === "tEXt") {
        const data = bytes.subarray(at + 8, at + 8 + length);
        const zero = data.indexOf(0);
        if (zero > 0) {
          const decode = (b: Uint8Array) => new TextDecoder("latin1").decode(b);
          info.text[decode(data.subarray(0, zero)).toLowerCase()] = decode(data.subarray(zero + 1));
        }
      }
      if (type === "IEND") break;
      at += 12 + length;
    }
  } else if (bytes.length > 4 && bytes[0] === 0xff && bytes[1] === 0xd8) {
    info.kind = "JPEG";
    for (let at = 2; at + 9 < bytes.length;) {
      if (bytes[at] !== 0xff) break;
      const marker = bytes[at + 1];
      const length = view.getUint16(at + 2);
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        info.height = view.getUint16(at + 5);
        info.width = view.getUint16(at + 7);
        break;
      }
      at += 2 + length;
    }
  } else if (match[1]) {
    info.kind = match[1].replace(/^image\//, "").toUpperCase();
  }
  return info;
}

function answerImage(prompt: string, image?: string): { description: string; tags: string[] } {
  const caption = prompt.match(/<<<\n([\s\S]*?)\n>>>/)?.[1]?.trim() ?? "";
  const picture = readImage(image);
  const embedded = picture.text["description"] ?? picture.text["title"] ?? "";
  const keywords = (picture.text["keywords"] ?? "").split(/[,;]/).map((k) => k.trim().toLowerCase())
    .filter(Boolean);
  const size = picture.width && picture.height ? `${picture.width}×${picture.height} ` : "";
  const about = embedded || caption;
  const description = about
    ? `${capitalise(tidy(about).replace(/[.!?]+$/, ""))}.`
    : `A ${size}${picture.kind} image with no description embedded in it.`;
  const tags = [...new Set([...keywords, ...contentWords(`${embedded} ${caption}`)])];
  for (const filler of ["photo", picture.kind.toLowerCase(), "untitled"]) {
    if (tags.length >= 3) break;
    if (!tags.includes(filler)) tags.push(filler);
  }
  return { description, tags: tags.slice(0, 6) };
}

// ------------------------------------------------------------------ intent_result

interface IntentAnswer {
  intent: "reminder" | "task" | "search" | "general_note" | "ambiguous";
  action: string | null;
  time: string | null;
  resolved_time: string | null;
  description: string | null;
  due_time: string | null;
  resolved_due_time: string | null;
  query: string | null;
  keywords: string[] | null;
  suggested_tags: string[] | null;
  followup_question: string | null;
  possible_intents: string[] | null;
}

const EMPTY_INTENT = NO_ENTITIES;

const REMINDER = /\b(?:remind(?:er)?|don'?t let me forget|alarm|ping me|nudge me)\b/i;
const TASK =
  /\b(?:need to|needs to|have to|has to|must|got to|gotta|to-?do|should|don'?t forget to|i want to)\b|^(?:buy|call|book|renew|pay|fix|email|send|finish|clean|pick up|return|schedule|write|submit|cancel|order)\b/i;
const SEARCH =
  /^(?:what|where|when|which|who|how|find|search|show|look up|did i|do i|have i|any)\b|\?\s*$/i;

function answerIntent(prompt: string): IntentAnswer {
  const ref = referenceOf(prompt, /^Reference time/);
  const quoted = [...prompt.matchAll(/"""([\s\S]*?)"""/g)].map((m) => m[1].trim());
  const followup = /Question asked:/.test(prompt);
  const message = quoted[0] ?? prompt;
  const answer = followup ? quoted[2] ?? "" : "";
  // After a follow-up, the answer says what the user meant; the original says what about.
  let hint = message;
  if (followup) {
    if (REMINDER.test(answer)) hint = `remind me ${message} ${answer}`;
    else if (/\b(?:task|to-?do|to do)\b/i.test(answer)) hint = `need to ${message} ${answer}`;
    else if (/\b(?:find|search|look)\b/i.test(answer)) hint = `find ${message}?`;
    else if (/\b(?:note|keep|save|remember)\b/i.test(answer)) hint = message;
    else hint = `${message} ${answer}`;
  }
  const found = findTime(hint, ref);
  const rest = tidy(withoutTime(hint, found));

  if (REMINDER.test(hint)) {
    if (!found) return ambiguous(message, "When should I remind you?", ["reminder"]);
    const action = tidy(
      rest.replace(
        /^.*\b(?:remind(?:er)?(?:\s+me)?|don'?t let me forget|ping me|nudge me)\b\s*(?:to|about|that|of)?\s*/i,
        "",
      ),
    ).replace(/\s*\bplease$/i, "") || tidy(rest);
    return {
      intent: "reminder",
      ...EMPTY_INTENT,
      action,
      time: found.words,
      resolved_time: formatWall(found.wall),
    };
  }
  if (SEARCH.test(hint.trim())) {
    const keywords = contentWords(hint.replace(SEARCH, " ")).slice(0, 6);
    if (keywords.length > 0) {
      return { intent: "search", ...EMPTY_INTENT, query: keywords.join(" "), keywords };
    }
  }
  if (TASK.test(hint.trim())) {
    const description = tidy(
      rest.replace(
        /^.*?\b(?:i\s+)?(?:need to|needs to|have to|has to|must|got to|gotta|should|don'?t forget to|i want to|to-?do:?)\s*/i,
        "",
      ),
    );
    return {
      intent: "task",
      ...EMPTY_INTENT,
      description: capitalise(description || tidy(rest)),
      due_time: found?.words ?? null,
      resolved_due_time: found ? formatWall(found.wall) : null,
    };
  }
  if (contentWords(message).length < 2 || (found && contentWords(rest).length === 0)) {
    return ambiguous(
      message,
      `Should I set a reminder, add a task or keep "${tidy(message)}" as a note?`,
      ["reminder", "task", "general_note"],
    );
  }
  return {
    intent: "general_note",
    ...EMPTY_INTENT,
    suggested_tags: contentWords(message).filter((w) => !/^\d+$/.test(w)).slice(0, 3),
  };
}

function ambiguous(_message: string, question: string, possible: string[]): IntentAnswer {
  return {
    intent: "ambiguous",
    ...EMPTY_INTENT,
    followup_question: question,
    possible_intents: possible,
  };
}

// ------------------------------------------------------------------ task_match

function answerTaskMatch(prompt: string): {
  matched_task_id: string | null;
  confidence: number;
  reason: string;
} {
  const memory = prompt.match(/<<<\n([\s\S]*?)\n>>>/)?.[1] ?? "";
  const memoryStems = new Set(contentWords(memory).map(stem));
  let best: { id: string; description: string; score: number; shared: string[] } | undefined;
  for (const line of prompt.split("\n")) {
    const m = line.match(/^\d+\.\s+\[id:\s*(.+?)\]\s+(.*?)\s+\((?:due .*|no due date)\)$/);
    if (!m) continue;
    const taskWords = contentWords(m[2]);
    const shared = taskWords.filter((w) => memoryStems.has(stem(w)));
    const score = taskWords.length === 0 ? 0 : shared.length / taskWords.length;
    if (score > (best?.score ?? 0)) best = { id: m[1], description: m[2], score, shared };
  }
  if (!best || best.score < 0.5) {
    return {
      matched_task_id: null,
      confidence: 0.1,
      reason: "The memory does not mention any open task.",
    };
  }
  return {
    matched_task_id: best.id,
    confidence: Math.min(0.95, 0.75 + 0.2 * best.score),
    reason: `The memory mentions ${
      best.shared.map((w) => `"${w}"`).join(", ")
    }, as the task "${best.description}" does.`,
  };
}

// ------------------------------------------------------------------ email_events

function answerEmail(prompt: string): {
  events: Array<{ description: string; event_time: string; confidence: number }>;
} {
  const ref = referenceOf(prompt, /^Current time/);
  const text = prompt.match(/Email text:\n"""([\s\S]*)"""/)?.[1] ?? "";
  const events: Array<{ description: string; event_time: string; confidence: number }> = [];
  const seen = new Set<string>();
  const sentences = text.split(/\n+|(?<=[.!?])\s+(?=[A-Z])/).map((s) => s.trim()).filter(Boolean);
  for (const sentence of sentences) {
    const found = findTime(sentence, ref);
    if (!found || !found.hasDate) continue;
    const description = describeEvent(withoutTime(sentence, found));
    if (!description) continue;
    const vague =
      /\b(?:maybe|perhaps|might|possibly|tentative(?:ly)?|pencil(?:led)? in|tbc|to be confirmed)\b/i
        .test(sentence);
    const confidence = vague ? 0.4 : found.hasTime ? 0.9 : 0.6;
    const eventTime = found.hasTime ? formatWall(found.wall) : formatWall(found.wall, false);
    const key = `${eventTime} ${description.toLowerCase()}`;
    if (seen.has(key)) continue;
    seen.add(key);
    events.push({ description, event_time: eventTime, confidence });
  }
  return { events };
}

/** A sentence cut down to what happens: "Your dentist appointment at Smile Clinic". */
function describeEvent(sentence: string): string {
  let text = tidy(sentence.replace(/[.!?]+$/, ""));
  const FILLER =
    /\s+(?:is|are|has been|have been|was|will be)?\s*(?:confirmed|scheduled|booked|planned|set|moved|arranged|due)?\s*(?:for|on|at|from|to)?$/i;
  for (let i = 0; i < 3; i++) text = text.replace(FILLER, "").replace(/[\s,;:-]+$/, "");
  text = text.replace(/^(?:hi|hello|dear)\b[^,]*,\s*/i, "")
    .replace(/^(?:just a reminder that|reminder:|please note that|note that)\s+/i, "")
    .replace(/^(?:your|our|the|a)\s+/i, "");
  text = tidy(text);
  if (contentWords(text).length === 0) return "";
  return capitalise(text.length > 120 ? `${text.slice(0, 119)}…` : text);
}

// ------------------------------------------------------------------ followup

function answerFollowup(prompt: string, system = ""): string {
  const message = tidy(prompt.match(/<<<\n([\s\S]*?)\n>>>/)?.[1] ?? "").replace(/[.!?]+$/, "");
  const short = message.length > 60 ? `${message.slice(0, 57)}…` : message;
  // The one language besides English it has a phrase in, for the demo's French-speaking user.
  if (/\bWrite in French\b/.test(system)) {
    return `Voulez-vous un rappel, une tâche ou une note pour « ${short} » ?`;
  }
  const found = findTime(message, fromMs(Date.now()));
  if (found && !found.hasTime) return `At what time ${found.words} do you mean "${short}"?`;
  if (found) return `Should I remind you about "${short}" ${found.words}, or keep it as a note?`;
  if (contentWords(message).length <= 2) return `What would you like me to do with "${short}"?`;
  return `Do you want a reminder, a task or a note for "${short}"?`;
}

// ------------------------------------------------------------------ command line

if (import.meta.main) {
  const arg = (name: string) => {
    const at = Deno.args.indexOf(name);
    return at === -1 ? undefined : Deno.args[at + 1];
  };
  const model = startScriptedModel({
    port: Number(arg("--port") ?? 8080),
    latencyMs: Number(arg("--latency") ?? 0),
  });
  console.log(`Scripted model (not a language model) listening: LLM_BASE_URL=${model.url}`);
  Deno.addSignalListener("SIGINT", () => model.close().then(() => Deno.exit(0)));
}
