/**
 * Logging through LogTape: one place that turns `LOG_LEVEL` and `LOG_FORMAT` into sinks.
 *
 * Every module logs under the `llm-worker` category, e.g. `getLogger(["llm-worker", "consumer"])`.
 * Lines logged while a job runs carry its context ({@linkcode withJobContext}): JSON lines as
 * fields, text lines as a `[job 42 attempt 1]` suffix when the message does not name the job.
 *
 * @module
 */
import { AsyncLocalStorage } from "node:async_hooks";
import {
  configure,
  getConsoleSink,
  getJsonLinesFormatter,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogRecord,
  reset,
  type TextFormatter,
  withContext,
} from "@logtape/logtape";

/** `LOG_LEVEL` and `LOG_FORMAT` as the settings hold them (config.ts logs: not imported here). */
export interface LoggingOptions {
  /** The lowest level logged. */
  logLevel: "debug" | "info" | "warning" | "error";
  /** Text lines or JSON lines. */
  logFormat: "text" | "json";
}

/** The root category of every logger of the worker. */
export const LOG_CATEGORY = "llm-worker";

/** Set while {@linkcode setupLogging}'s configuration holds a context store. */
let contextConfigured = false;

/**
 * Sends the worker's logs to the console in the chosen format and level.
 *
 * Text lines look like `2026-11-25 13:00:00.000 +00:00 [INF] llm-worker·consumer: job 1 completed`;
 * JSON lines carry the same message plus every structured property. In both, a message names
 * its values bare (`could not start: Connection is closed.`, not quoted as JSON strings).
 *
 * @example
 * ```ts
 * await setupLogging({ logLevel: "warning", logFormat: "json" });
 * logger("consumer").warn("job {jobId} waits", { jobId: "job-1" }); // one JSON line
 * ```
 */
export async function setupLogging(options: LoggingOptions): Promise<void> {
  const formatter = options.logFormat === "json" ? jsonFormatter() : textFormatter();
  await configure({
    reset: true,
    contextLocalStorage: new AsyncLocalStorage(),
    sinks: { console: getConsoleSink({ formatter }) },
    loggers: [
      { category: LOG_CATEGORY, lowestLevel: options.logLevel, sinks: ["console"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["console"] },
    ],
  });
  contextConfigured = true;
}

/** Turns logging off again (tests and the end of `main`). */
export async function teardownLogging(): Promise<void> {
  contextConfigured = false;
  await reset();
}

/** The logger for one part of the worker, e.g. `logger("consumer")`. */
export function logger(...subcategory: string[]): Logger {
  return getLogger([LOG_CATEGORY, ...subcategory]);
}

/** A short, single-line description of any thrown value, for logs and error messages. */
export function describeError(error: unknown): string {
  if (error instanceof Error) return error.message.split("\n")[0];
  return String(error);
}

/** What every line logged during one run of a job carries (nested contexts add to it). */
export interface JobLogContext {
  /** The job's id. */
  jobId?: string;
  /** The job's type. */
  jobType?: string;
  /** The user the job is for (`null`: nobody's). */
  userId?: number | null;
  /** The attempt counted against `LLM_MAX_RETRIES` (1-based). */
  attempt?: number;
  /** Waits so far for an unavailable model server or Core (not counted as attempts). */
  waits?: number;
}

/**
 * Runs `fn` with `context` attached to every line logged inside it, however deep (the model
 * client, the Core client, the handlers). Without {@linkcode setupLogging} it just runs `fn`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const context = { jobId: "42", jobType: "followup", userId: 1, attempt: 1, waits: 0 };
 * const answer = await withJobContext(context, async () => {
 *   logger("core").debug("Core GET /memories/m1"); // carries jobId 42 and attempt 1
 *   return 42;
 * });
 * assert.equal(answer, 42);
 * ```
 */
export function withJobContext<T>(context: JobLogContext, fn: () => T): T {
  if (!contextConfigured) return fn();
  return withContext({ ...context }, fn);
}

/** Text lines; a line inside a job that does not name the job gets `[job 42 attempt 1]`. */
function textFormatter(): TextFormatter {
  return getTextFormatter({
    timestamp: "date-time-tz",
    value: "bare",
    format: ({ timestamp, level, category, message, record }) =>
      `${timestamp} [${level}] ${category}: ${message}${jobSuffix(record)}`,
  });
}

function jobSuffix(record: LogRecord): string {
  const { jobId, attempt } = record.properties;
  if (jobId === undefined || String(record.rawMessage).includes("{jobId}")) return "";
  return attempt === undefined ? ` [job ${jobId}]` : ` [job ${jobId} attempt ${attempt}]`;
}

/** JSON lines with every property as a field, and the message rendered with bare values. */
function jsonFormatter(): TextFormatter {
  const json = getJsonLinesFormatter({ properties: "flatten", message: "rendered" });
  return (record) =>
    json({
      category: record.category,
      level: record.level,
      timestamp: record.timestamp,
      rawMessage: record.rawMessage,
      properties: record.properties,
      message: [bareMessage(record.message)],
    });
}

/** A message's parts joined, strings as they are (other values as JSON). */
function bareMessage(parts: readonly unknown[]): string {
  let text = "";
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i];
    if (i % 2 === 0 || typeof part === "string") text += part;
    else if (part instanceof Error) text += describeError(part);
    else text += JSON.stringify(part) ?? String(part);
  }
  return text;
}
