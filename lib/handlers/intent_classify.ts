/**
 * `intent_classify`: sorts a user's message into reminder, task, search, general_note or
 * ambiguous, keeps it as a memory (all but search) or searches the user's memories (search), and
 * tells the user with `llm_intent_result` (docs/protocol.md section 2).
 *
 * The worker's own choices, where the protocol leaves them open:
 * - The job's `result` is the notification's `content` (same object), so Core keeps what the
 *   user was told.
 * - Times: relative words resolve against `original_timestamp` (or the job's clock when it is
 *   null) in the user's timezone (`GET /settings/{user_id}`; an unknown zone name counts as
 *   UTC). An `original_timestamp` without an offset is read as UTC, as Core stores such times; one
 *   that cannot be read at all is logged and replaced by the job's clock rather than losing the
 *   message; a number is read as Unix seconds (milliseconds when that large). The model answers
 *   local times; `resolved_time` / `resolved_due_time` are sent as
 *   ISO-8601 with the user's offset (`2026-12-01T15:00:00+01:00`), a bare date at 09:00 local.
 * - `stale: true` is present only when a resolved time is before the job's clock.
 * - Search keywords lose `"`, are trimmed and de-duplicated; the notification's `keywords` are
 *   the words actually searched; the model's own `query` is used only when it gave no keywords,
 *   split into words, and never replaces the notification's `query` (the user's message). A
 *   payload `memory_id` plays no part in a search (`memory_id` is null). Entity fields of other
 *   intents are left out of the content.
 * - `possible_intents` keeps only the four concrete intents, lowercased (`General note` becomes
 *   `general_note`), so whoever reads the list only ever sees intent names.
 *
 * @module
 */
import { z } from "zod";
import type { Memory, SearchHit } from "../core_api.ts";
import { JobFailedError } from "../errors.ts";
import { describeInTimeZone, formatInTimeZone, parseDateTime, resolveDateTime } from "../time.ts";
import { type PromptTemplate, renderPrompt } from "../prompts.ts";
import { truncate } from "../utils.ts";
import { userOf } from "./user.ts";
import type { HandlerResult, JobContext, JobHandler } from "./types.ts";

/** The five intents. */
export const INTENTS = ["reminder", "task", "search", "general_note", "ambiguous"] as const;

/** One of {@linkcode INTENTS}. */
export type Intent = (typeof INTENTS)[number];

const nonBlank = (value: unknown): value is string =>
  typeof value === "string" && value.trim().length > 0;

const followupContextSchema = z.object({
  followup_question: z.string(),
  user_answer: z.string(),
});

/** The payload: `message`, or `query` from older producers. */
export const intentPayloadSchema = z.preprocess(
  (raw) => {
    if (!raw || typeof raw !== "object" || Array.isArray(raw)) return raw;
    const record = raw as Record<string, unknown>;
    // Older producers send `query` instead of `message`.
    if (!nonBlank(record.message) && nonBlank(record.query)) {
      return { ...record, message: record.query };
    }
    return record;
  },
  z.object({
    message: z.string({ error: "message (or the legacy query) is required" }).refine(nonBlank, {
      message: "message must not be empty",
    }),
    memory_id: z.union([z.string(), z.number()]).nullish().transform((id) =>
      id === null || id === undefined || String(id).trim() === "" ? null : String(id)
    ),
    original_timestamp: z.union([z.string(), z.number()]).nullish().transform((value) =>
      value ?? null
    ),
    source_chat_id: z.union([z.number(), z.string()]).nullish(),
    source_message_id: z.union([z.number(), z.string()]).nullish(),
    followup_context: followupContextSchema.nullish(),
  }),
);

/** The checked payload. */
export type IntentPayload = z.infer<typeof intentPayloadSchema>;

const DATE_TIME_HINT = "an ISO-8601 date-time such as 2026-12-01T15:00:00";

/**
 * The model's answer. It is asked for with every field present (`null` where it does not apply
 * to the intent); an answer that leaves out the other intents' fields is used as it is, since
 * every entity field takes null. What each intent needs is checked here.
 */
export const intentAnswerSchema = z.object({
  intent: z.enum(INTENTS),
  action: z.string().nullable(),
  time: z.string().nullable(),
  resolved_time: z.string().nullable(),
  description: z.string().nullable(),
  due_time: z.string().nullable(),
  resolved_due_time: z.string().nullable(),
  query: z.string().nullable(),
  keywords: z.array(z.string()).nullable(),
  suggested_tags: z.array(z.string()).nullable(),
  followup_question: z.string().nullable(),
  possible_intents: z.array(z.string()).nullable(),
}).superRefine((answer, ctx) => {
  const need = (field: keyof typeof answer, why: string) =>
    ctx.addIssue({ code: "custom", path: [field], message: why });
  const checkTime = (field: "resolved_time" | "resolved_due_time", required: boolean) => {
    const value = answer[field];
    if (value === null || value.trim() === "") {
      if (required) need(field, `${answer.intent} needs ${field} as ${DATE_TIME_HINT}`);
    } else if (!parseDateTime(value)) {
      need(field, `${field} must be ${DATE_TIME_HINT}, not ${JSON.stringify(value)}`);
    }
  };
  switch (answer.intent) {
    case "reminder":
      if (!nonBlank(answer.action)) need("action", "reminder needs an action");
      checkTime("resolved_time", true);
      break;
    case "task":
      if (!nonBlank(answer.description)) need("description", "task needs a description");
      checkTime("resolved_due_time", false);
      break;
    case "search":
      if (!(answer.keywords ?? []).some(nonBlank) && !nonBlank(answer.query)) {
        need("keywords", "search needs keywords");
      }
      break;
    case "ambiguous":
      if (!nonBlank(answer.followup_question)) {
        need("followup_question", "ambiguous needs a followup_question");
      }
      break;
    case "general_note":
      break;
  }
});

/** The model's answer. */
export type IntentAnswer = z.infer<typeof intentAnswerSchema>;

/**
 * Every entity field of an answer set to null: what an answer holds besides its intent's own
 * fields (a base for stand-in models and tests).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const answer = { ...NO_ENTITIES, intent: "general_note", suggested_tags: ["cabin"] };
 * assert.equal(answer.resolved_time, null);
 * assert.deepEqual(answer.suggested_tags, ["cabin"]);
 * ```
 */
export const NO_ENTITIES: Readonly<Omit<IntentAnswer, "intent">> = {
  action: null,
  time: null,
  resolved_time: null,
  description: null,
  due_time: null,
  resolved_due_time: null,
  query: null,
  keywords: null,
  suggested_tags: null,
  followup_question: null,
  possible_intents: null,
};

/** The system prompt of intent_classify. */
export const INTENT_SYSTEM_PROMPT =
  `You are the intent classifier of Life Organiser, a personal organiser that a user talks to through a Telegram bot. It keeps their notes and photos as memories, their tasks, their reminders and their calendar.

Sort the user's message into exactly one intent and fill in the details that intent needs:
- "reminder": the user wants to be reminded of something at a time ("remind me to call mum tomorrow at 9"). Fill "action" (what to do, short), "time" (the time words the user wrote) and "resolved_time" (the absolute date-time).
- "task": something the user has to do, without asking to be reminded at a time ("renew my passport before June"). Fill "description" (short), "due_time" (the deadline words the user wrote, or null when there is none) and "resolved_due_time" (the absolute deadline, or null).
- "search": the user wants to find something saved earlier ("what was the wifi password at the cabin?", "show me my photos from Lisbon"). Fill "query" (what they look for, in a few words) and "keywords" (1 to 6 single words likely to appear in the saved note or its tags; no stop words, no quotes).
- "general_note": information to keep, with nothing to do and nothing to find ("the cabin wifi password is sunshine42"). Fill "suggested_tags" (2 to 5 short lowercase tags).
- "ambiguous": you cannot tell which of the intents above the user means. Fill "followup_question" (one short, friendly question whose answer settles it) and "possible_intents" (the candidates among "reminder", "task", "search", "general_note").

Times: resolve relative words ("tomorrow", "in 2 hours", "next Friday", "tonight") against the reference time given with the message, in the user's timezone. Write "resolved_time" and "resolved_due_time" as YYYY-MM-DDTHH:MM:SS in the user's local time, without an offset. When only a day is known, use 09:00 unless the message suggests another hour.

Answer with one JSON object and nothing else. Every key below must be present; use null for each field that does not belong to the chosen intent:
{"intent": "reminder" | "task" | "search" | "general_note" | "ambiguous", "action": string | null, "time": string | null, "resolved_time": string | null, "description": string | null, "due_time": string | null, "resolved_due_time": string | null, "query": string | null, "keywords": [string] | null, "suggested_tags": [string] | null, "followup_question": string | null, "possible_intents": [string] | null}`;

/** The built-in prompt (`LLM_PROMPTS_DIR/intent_classify.txt` replaces it). */
export const INTENT_PROMPT: PromptTemplate = {
  system: INTENT_SYSTEM_PROMPT,
  user: `Reference time (when the user wrote the message): {{reference_time}}
User's timezone: {{timezone}}
Language: write followup_question and suggested_tags in {{language}}, keywords in the language of the user's own notes (that of their messages); JSON keys and intent names stay as given.

{{message}}`,
};

/**
 * The placeholders' values: reference time, timezone, and the message (or the follow-up
 * exchange) between quotes.
 */
export function intentValues(options: {
  message: string;
  reference: Date;
  timeZone: string;
  maxChars: number;
  followup?: { followup_question: string; user_answer: string } | null;
  language?: string;
}): Record<string, string> {
  const { reference, timeZone, maxChars, followup } = options;
  const lines: string[] = [];
  if (followup) {
    // The question and answer are short; the original message gets what is left of the cap.
    const question = truncate(followup.followup_question.trim(), Math.floor(maxChars / 4));
    const answer = truncate(followup.user_answer.trim(), Math.floor(maxChars / 4));
    const message = truncate(
      options.message.trim(),
      Math.max(1, maxChars - question.length - answer.length),
    );
    lines.push(
      "The user's first message was unclear, so they were asked a question and answered it. Classify the whole exchange: the intent is what the user means, taking the answer into account.",
      "",
      "Original message:",
      `"""${message}"""`,
      "",
      `Question asked: """${question}"""`,
      `User's answer: """${answer}"""`,
    );
  } else {
    lines.push("Message:", `"""${truncate(options.message.trim(), maxChars)}"""`);
  }
  return {
    reference_time: describeInTimeZone(reference, timeZone),
    timezone: timeZone,
    language: options.language ?? "English",
    message: lines.join("\n"),
  };
}

/** A search hit as the notification lists it. */
export interface SearchResultItem {
  memory_id: string;
  title: string;
}

/**
 * A memory's title: its content, or for a memory without content its first three tags
 * (`a, b, c (+2 more)`), or `Untitled`; image memories start with `[Image] `.
 */
export function memoryTitle(memory: Memory): string {
  let title: string;
  if (typeof memory.content === "string" && memory.content.trim() !== "") {
    title = memory.content;
  } else {
    const tags = (Array.isArray(memory.tags) ? memory.tags : [])
      .map((tag) => typeof tag === "string" ? tag : tag?.tag)
      .filter(nonBlank)
      .map((tag) => tag.trim());
    title = tags.length === 0
      ? "Untitled"
      : tags.slice(0, 3).join(", ") + (tags.length > 3 ? ` (+${tags.length - 3} more)` : "");
  }
  return memory.media_type === "image" ? `[Image] ${title}` : title;
}

/** Search keywords as Core can take them: no `"`, trimmed, no empties, no repeats. */
export function cleanKeywords(keywords: readonly string[]): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const raw of keywords) {
    const keyword = raw.replaceAll('"', "").replace(/\s+/g, " ").trim();
    if (!keyword || seen.has(keyword.toLowerCase())) continue;
    seen.add(keyword.toLowerCase());
    out.push(keyword);
  }
  return out;
}

function cleanList(values: readonly string[] | null, transform = (s: string) => s): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const raw of values ?? []) {
    const value = transform(raw.trim());
    if (!value || seen.has(value.toLowerCase())) continue;
    seen.add(value.toLowerCase());
    out.push(value);
  }
  return out;
}

function possibleIntents(values: readonly string[] | null): string[] {
  return cleanList(values, (s) => s.toLowerCase().replace(/[\s-]+/g, "_"))
    .map((s) => s === "note" ? "general_note" : s)
    .filter((s, i, all) =>
      INTENTS.includes(s as Intent) && s !== "ambiguous" && all.indexOf(s) === i
    );
}

/** The reference time: `original_timestamp` (UTC when it has no offset), else the job's clock. */
function referenceTime(ctx: JobContext, original: string | number | null): Date {
  if (original === null) return ctx.now();
  if (typeof original === "number") {
    // Unix seconds, or milliseconds when that large.
    const date = new Date(original > 1e11 ? original : original * 1000);
    if (!Number.isNaN(date.getTime())) return date;
  } else {
    const date = resolveDateTime(original, "UTC");
    if (date) return date;
  }
  ctx.log.warn(
    "original_timestamp {value} is not an ISO-8601 date-time; resolving relative times against the current time instead.",
    { value: original },
  );
  return ctx.now();
}

/** Normalises Core's search hits to `{memory_id, title}`, skipping any without a memory id. */
export function searchResults(hits: readonly SearchHit[] | null): SearchResultItem[] {
  const out: SearchResultItem[] = [];
  for (const hit of Array.isArray(hits) ? hits : []) {
    const memory = hit?.memory;
    if (!memory || memory.id === undefined || memory.id === null) continue;
    out.push({ memory_id: String(memory.id), title: memoryTitle(memory) });
  }
  return out;
}

/** The `intent_classify` handler. */
export const intentClassifyHandler: JobHandler<IntentPayload> = {
  jobType: "intent_classify",
  payloadSchema: intentPayloadSchema,
  requiresUser: true,
  async run(ctx, payload): Promise<HandlerResult> {
    const userId = ctx.job.userId;
    if (userId === null) {
      throw new JobFailedError("intent_classify needs a user_id and the job has none.");
    }
    const message = payload.message;
    const { timeZone, language } = await userOf(ctx);
    const reference = referenceTime(ctx, payload.original_timestamp);
    const { system, prompt } = renderPrompt(
      ctx.settings.llmPrompts.intent_classify ?? INTENT_PROMPT,
      intentValues({
        message,
        reference,
        timeZone,
        maxChars: ctx.settings.llmMaxInputChars,
        followup: payload.followup_context,
        language: language.name,
      }),
    );
    const answer = await ctx.model.ask({
      role: "text",
      system,
      prompt,
      schema: intentAnswerSchema,
      schemaName: "intent_result",
      signal: ctx.signal,
    });

    const now = ctx.now().getTime();
    let stale = false;
    /** A model time as ISO-8601 with the user's offset (the schema already checked it reads). */
    const resolve = (value: string | null): string | null => {
      if (value === null || value.trim() === "") return null;
      const instant = resolveDateTime(value, timeZone);
      if (!instant) return null;
      if (instant.getTime() < now) stale = true;
      return formatInTimeZone(instant, timeZone);
    };
    const text = (value: string | null) => nonBlank(value) ? value.trim() : null;

    let entities: Record<string, unknown>;
    switch (answer.intent) {
      case "reminder":
        entities = {
          action: text(answer.action),
          time: text(answer.time),
          resolved_time: resolve(answer.resolved_time),
        };
        break;
      case "task":
        entities = {
          description: text(answer.description),
          due_time: text(answer.due_time),
          resolved_due_time: resolve(answer.resolved_due_time),
        };
        break;
      case "search": {
        // The model's `query` only stands in for keywords it did not give.
        const given = cleanKeywords(answer.keywords ?? []);
        entities = {
          keywords: given.length > 0 ? given : cleanKeywords((answer.query ?? "").split(/\s+/)),
        };
        break;
      }
      case "general_note":
        entities = { suggested_tags: cleanList(answer.suggested_tags) };
        break;
      case "ambiguous":
        entities = {
          followup_question: text(answer.followup_question),
          possible_intents: possibleIntents(answer.possible_intents),
        };
        break;
    }

    let memoryId: string | null = null;
    let results: SearchResultItem[] = [];
    if (answer.intent === "search") {
      const keywords = entities.keywords as string[];
      if (keywords.length > 0) {
        results = searchResults(await ctx.core.search(keywords.join(" "), userId, ctx.signal));
      } else {
        ctx.log.info("No search keywords left after cleaning; no search made.");
      }
    } else {
      memoryId = payload.memory_id ?? (await ctx.effects.once("memory", async () => {
        const memory = await ctx.core.createMemory(userId, message, ctx.signal);
        return { id: String(memory.id) };
      })).id;
    }

    const content: Record<string, unknown> = {
      query: message,
      intent: answer.intent,
      memory_id: memoryId,
      results,
      ...entities,
    };
    if (stale) content.stale = true;
    return {
      result: content,
      notifications: [{ message_type: "llm_intent_result", content }],
    };
  },
};
