/**
 * `email_extract`: reads an email, asks the model for the calendar events in it, and creates each
 * confident one in Core as a pending event (`POST /events`) with an `event_confirmation` for the
 * user (docs/protocol.md section 2).
 *
 * The worker's own choices, where the protocol leaves them open:
 * - The body is reduced before the model sees it: HTML becomes text (no images, no link URLs, no
 *   styles), quoted history of a reply is dropped (`>` lines, the `On … wrote:` line, and an
 *   unquoted earlier thread below `On … wrote:`, `-----Original Message-----` or an Outlook
 *   `From:`/`Sent:` header), whitespace is collapsed, and the text is cut to
 *   `LLM_MAX_INPUT_CHARS`. A forwarded email (subject `Fwd:`/`FW:`/… or a "Forwarded message"
 *   marker) keeps its quoted part, which is the content the user meant to send.
 * - Times: the model answers local times; every `event_time` is sent to Core as ISO-8601 with the
 *   user's offset (`2026-12-01T15:00:00+01:00`), a time with an offset is converted to the user's
 *   zone, and a bare date is read as 09:00 in the user's zone. Strings of digits and anything that
 *   is not an ISO-8601 date or date-time are left out and logged, as are blank descriptions; all
 *   events are checked before the first is created. Descriptions are cut to 500 characters.
 * - The checked list of events (the plan) is recorded once per job with the other effects, so a
 *   retried or reclaimed job creates exactly the events of its first answer, once each, without
 *   asking the model again. Identical events (same time and description) are created once.
 * - An event that Core still refuses with 422 is logged and left out; the others are created.
 * - The job's `result` is `{events: [{event_id, description, event_time, confidence}],
 *   left_out: [{description, event_time, confidence, reason}]}`.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { compile as compileHtmlToText } from "html-to-text";
import { z } from "zod";
import { whenMissing } from "../accept.ts";
import { CoreApiError } from "../core_api.ts";
import { JobFailedError } from "../errors.ts";
import { describeInTimeZone, formatInTimeZone, resolveDateTime } from "../time.ts";
import { type PromptTemplate, renderPrompt } from "../prompts.ts";
import { truncate } from "../utils.ts";
import { userOf } from "./user.ts";
import type { HandlerResult, JobContext, JobHandler } from "./types.ts";

/** Events with a confidence above this are created. */
export const EVENT_CONFIDENCE_THRESHOLD = 0.7;

/** Longest description sent to Core. */
const MAX_DESCRIPTION_CHARS = 500;

/** The payload: the email's subject and body (text or HTML). */
export const emailPayloadSchema = z.object({
  subject: z.string().nullish().transform((subject) => subject ?? ""),
  body: z.string({ error: "body is required" }),
});

/** The checked payload. */
export type EmailPayload = z.infer<typeof emailPayloadSchema>;

/**
 * The model's answer. An event without a description or a time is not refused with the whole
 * answer: it is left out of the plan with its reason.
 */
export const emailAnswerSchema = z.object({
  events: z.array(z.object({
    description: whenMissing(z.string(), ""),
    event_time: z.string().nullable(),
    confidence: z.number().min(0).max(1),
  })),
});

/** The model's answer. */
export type EmailAnswer = z.infer<typeof emailAnswerSchema>;

/** The system prompt of email_extract. */
export const EMAIL_SYSTEM_PROMPT =
  `You read emails for Life Organiser, a personal organiser, and list the calendar events in them: appointments, meetings, reservations, flights and trains, classes, parties, deadlines with a date.

For each event give:
- "description": a short line saying what it is, with the place or the people when the email gives them ("Dentist appointment at Smile Clinic").
- "event_time": when it starts, written as YYYY-MM-DDTHH:MM:SS in the user's local time without an offset. When the email names another timezone for the time, write that time with its offset instead (2026-04-02T15:00:00-05:00). When the email gives a day but no time, write the date alone (YYYY-MM-DD). Resolve relative dates ("next Tuesday", "tomorrow") against the current time given below. Never write dates in any other form.
- "confidence": from 0 to 1, how sure you are that this is a real event with this date and time that the user should have in their calendar. Use a low value for vague mentions, suggestions and events without a clear day.

Leave out newsletters' generic offers and anything that is not an event. Answer with one JSON object and nothing else: {"events": [{"description": string, "event_time": string, "confidence": number}]}, or {"events": []} when the email holds no event.`;

const HTML_TAG =
  /<(?:!doctype|html|head|body|div|p|br|span|table|tr|td|th|a|img|blockquote|font|b|i|u|strong|em|ul|ol|li|h[1-6]|center|style|meta|hr)\b[^>]*>/i;

const FORWARD_SUBJECT = /^\s*(?:(?:re|aw|sv|antw)\s*:\s*)*(?:fwd?|fw|tr|wg|enc|rv)\s*:/i;
const FORWARD_MARKER = /-{2,}\s*Forwarded message\s*-{2,}|^\s*Begin forwarded message:/im;
const WROTE_HEADER =
  /^(?:On|Am|Le|El|Il|Op)\b[\s\S]{0,400}\b(?:wrote|schrieb|a écrit|escribió|ha scritto|schreef)\s*:\s*$/i;

/** Whether the email forwards another one (its quoted part is then the content). */
export function isForwarded(subject: string, body: string): boolean {
  return FORWARD_SUBJECT.test(subject) || FORWARD_MARKER.test(body);
}

/** The HTML converter, built on first use: compiling the options costs more than converting. */
let htmlConverter: ((html: string) => string) | undefined;

/** HTML to plain text: no images, no link URLs, no styles or scripts, no wrapping. */
export function htmlToText(html: string): string {
  htmlConverter ??= compileHtmlToText(HTML_TO_TEXT_OPTIONS);
  return htmlConverter(html);
}

const BLOCK = { format: "block", options: { leadingLineBreaks: 1, trailingLineBreaks: 1 } };

const HTML_TO_TEXT_OPTIONS = {
  wordwrap: false as const,
  selectors: [
    { selector: "a", options: { ignoreHref: true } },
    { selector: "img", format: "skip" },
    { selector: "style", format: "skip" },
    { selector: "script", format: "skip" },
    { selector: "head", format: "skip" },
    { selector: "title", format: "skip" },
    // Email layouts are tables: one cell per line reads better than aligned columns.
    { selector: "table", ...BLOCK },
    { selector: "tr", ...BLOCK },
    { selector: "td", ...BLOCK },
    { selector: "th", ...BLOCK },
    ...["h1", "h2", "h3", "h4", "h5", "h6"].map((selector) => ({
      selector,
      options: { uppercase: false },
    })),
  ],
};

/**
 * Drops a reply's quoted history: `>` lines, an `On … wrote:` line (and everything below it when
 * the history that follows is not `>`-quoted), and an Outlook or Thunderbird earlier thread.
 */
export function dropQuotedHistory(text: string): string {
  const lines = text.split("\n");
  const nextNonBlank = (from: number) => lines.slice(from).find((line) => line.trim() !== "");
  const out: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line.startsWith(">")) continue;
    if (/^-{2,}\s*Original Message\s*-{2,}$/i.test(line)) break;
    if (/^_{10,}$/.test(line) && /^From:/i.test(nextNonBlank(i + 1)?.trim() ?? "")) break;
    if (
      /^From:\s.*(?:@|<)/i.test(line) &&
      lines.slice(i + 1, i + 4).some((next) => /^Sent:\s/i.test(next.trim()))
    ) {
      break;
    }
    // "On Mon, 1 Dec 2026 at 10:00, Ann <ann@example.com> wrote:", possibly over three lines.
    if (/^(?:On|Am|Le|El|Il|Op)\b/i.test(line)) {
      const span = [1, 2, 3].find((n) =>
        WROTE_HEADER.test(lines.slice(i, i + n).map((l) => l.trim()).join(" "))
      );
      if (span !== undefined) {
        const after = nextNonBlank(i + span);
        if (after === undefined || after.trim().startsWith(">")) {
          i += span - 1; // inline or bottom quoting: the `>` lines go, the answers stay
          continue;
        }
        break; // an unquoted earlier thread follows
      }
    }
    out.push(lines[i]);
  }
  return out.join("\n");
}

/**
 * The email body as the model gets it: text (HTML converted), quoted history dropped unless the
 * email is a forward, whitespace collapsed, at most `maxChars` characters.
 */
export function emailToText(
  body: string,
  options: { maxChars: number; forwarded?: boolean },
): string {
  // Bound the work on enormous bodies; markup takes far more room than the text it holds.
  let text = body.slice(0, Math.max(200_000, options.maxChars * 20));
  text = text.replace(/\r\n?/g, "\n");
  if (HTML_TAG.test(text)) text = htmlToText(text);
  text = text.replace(/[\u200b-\u200d\u2060\ufeff\u00ad\u034f]/g, "");
  text = options.forwarded ? text.replace(/^[ \t]*(?:>[ \t]?)+/gm, "") : dropQuotedHistory(text);
  text = text
    .split("\n")
    .map((line) => line.replace(/[^\S\n]+/g, " ").trim())
    .join("\n")
    .replace(/\n{3,}/g, "\n\n")
    .trim();
  return truncate(text, options.maxChars);
}

/** The built-in prompt (`LLM_PROMPTS_DIR/email_extract.txt` replaces it). */
export const EMAIL_PROMPT: PromptTemplate = {
  system: EMAIL_SYSTEM_PROMPT,
  user: `Current time: {{current_time}}
User's timezone: {{timezone}}
Write each description in {{language}}.

Subject: """{{subject}}"""

Email text:
"""{{email}}"""`,
};

/** The placeholders' values: current time, timezone, subject and text. */
export function emailValues(options: {
  subject: string;
  text: string;
  now: Date;
  timeZone: string;
  language?: string;
}): Record<string, string> {
  return {
    language: options.language ?? "English",
    current_time: describeInTimeZone(options.now, options.timeZone),
    timezone: options.timeZone,
    subject: options.subject,
    email: options.text,
  };
}

/** One event to create, checked and normalised. */
interface PlannedEvent {
  key: string;
  description: string;
  event_time: string;
  confidence: number;
}

/** An event of the answer that is not created, and why. */
interface LeftOutEvent {
  description: string;
  event_time: string | null;
  confidence: number;
  reason: string;
}

/** What the job will create, recorded once per job. */
interface EventPlan {
  events: PlannedEvent[];
  left_out: LeftOutEvent[];
}

/** The first 12 bytes of the text's SHA-256, in hex (synchronous: WebCrypto's is an async op). */
function stableKey(text: string): string {
  return createHash("sha256").update(text).digest("hex").slice(0, 24);
}

async function planEvents(ctx: JobContext, payload: EmailPayload): Promise<EventPlan> {
  const { timeZone, language } = await userOf(ctx);
  const maxChars = ctx.settings.llmMaxInputChars;
  const subject = truncate(payload.subject.replace(/\s+/g, " ").trim(), Math.min(1000, maxChars));
  const text = emailToText(payload.body, {
    maxChars: Math.max(1, maxChars - subject.length),
    forwarded: isForwarded(payload.subject, payload.body),
  });
  if (!subject && !text) {
    ctx.log.info("The email is empty; nothing to extract.");
    return { events: [], left_out: [] };
  }
  const { system, prompt } = renderPrompt(
    ctx.settings.llmPrompts.email_extract ?? EMAIL_PROMPT,
    emailValues({ subject, text, now: ctx.now(), timeZone, language: language.name }),
  );
  const answer = await ctx.model.ask({
    role: "text",
    system,
    prompt,
    schema: emailAnswerSchema,
    schemaName: "email_events",
    signal: ctx.signal,
  });

  const plan: EventPlan = { events: [], left_out: [] };
  const keys = new Set<string>();
  for (const event of answer.events) {
    const description = truncate(
      event.description.replace(/\s+/g, " ").trim(),
      MAX_DESCRIPTION_CHARS,
    );
    const leaveOut = (reason: string) =>
      plan.left_out.push({
        description,
        event_time: event.event_time,
        confidence: event.confidence,
        reason,
      });
    if (!(event.confidence > EVENT_CONFIDENCE_THRESHOLD)) {
      leaveOut(`confidence ${event.confidence} is not above ${EVENT_CONFIDENCE_THRESHOLD}`);
      continue;
    }
    if (!description) {
      ctx.log.warn("Left out an email event with no description (time {eventTime}).", {
        eventTime: event.event_time,
      });
      leaveOut("no description");
      continue;
    }
    const instant = event.event_time === null ? null : resolveDateTime(event.event_time, timeZone);
    if (!instant) {
      ctx.log.warn(
        "Left out email event {description}: its time {eventTime} is not an ISO-8601 date or date-time.",
        { description, eventTime: event.event_time },
      );
      leaveOut("event_time is not an ISO-8601 date or date-time");
      continue;
    }
    const eventTime = formatInTimeZone(instant, timeZone);
    const key = stableKey(`${instant.toISOString()}\n${description.toLowerCase()}`);
    if (keys.has(key)) continue; // the same event twice in one answer
    keys.add(key);
    plan.events.push({ key, description, event_time: eventTime, confidence: event.confidence });
  }
  return plan;
}

/** The `email_extract` handler. */
export const emailExtractHandler: JobHandler<EmailPayload> = {
  jobType: "email_extract",
  payloadSchema: emailPayloadSchema,
  requiresUser: true,
  async run(ctx, payload): Promise<HandlerResult> {
    const userId = ctx.job.userId;
    if (userId === null) {
      throw new JobFailedError("email_extract needs a user_id and the job has none.");
    }
    const plan = await ctx.effects.once("events:plan", () => planEvents(ctx, payload));
    const created: Array<Record<string, unknown>> = [];
    const leftOut: LeftOutEvent[] = [...plan.left_out];
    for (const event of plan.events) {
      let stored: { id: string };
      try {
        stored = await ctx.effects.once(`event:${event.key}`, async () => {
          const coreEvent = await ctx.core.createEvent({
            owner_user_id: userId,
            event_time: event.event_time,
            description: event.description,
            source_type: "email",
            source_detail: payload.subject,
          }, ctx.signal);
          return { id: String(coreEvent.id) };
        });
      } catch (error) {
        if (!(error instanceof CoreApiError && error.status === 422)) throw error;
        ctx.log.error("Core refused email event {description} at {eventTime}: {error}", {
          description: event.description,
          eventTime: event.event_time,
          error: error.message,
        });
        leftOut.push({ ...event, reason: `Core refused it: ${error.body}` });
        continue;
      }
      created.push({
        event_id: stored.id,
        description: event.description,
        event_time: event.event_time,
        confidence: event.confidence,
      });
    }
    return {
      result: {
        events: created,
        left_out: leftOut.map(({ description, event_time, confidence, reason }) => ({
          description,
          event_time,
          confidence,
          reason,
        })),
      },
      notifications: created.map((event) => ({
        message_type: "event_confirmation",
        content: {
          description: event.description,
          event_date: event.event_time,
          event_id: event.event_id,
        },
      })),
    };
  },
};
