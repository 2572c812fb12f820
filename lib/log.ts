/**
 * Logging through LogTape: one place that turns `LOG_LEVEL` and `LOG_FORMAT` into sinks.
 *
 * Every module logs under the `llm-worker` category, e.g. `getLogger(["llm-worker", "consumer"])`.
 *
 * @module
 */
import {
  configure,
  getConsoleSink,
  getJsonLinesFormatter,
  getLogger,
  getTextFormatter,
  type Logger,
  reset,
} from "@logtape/logtape";
import type { Settings } from "./config.ts";

/** The root category of every logger of the worker. */
export const LOG_CATEGORY = "llm-worker";

/**
 * Sends the worker's logs to the console in the chosen format and level.
 *
 * Text lines look like `2026-11-25 13:00:00.000 +00:00 [INF] llm-worker·consumer: job 1 completed`;
 * JSON lines carry the same message plus every structured property.
 *
 * @example
 * ```ts
 * await setupLogging({ logLevel: "warning", logFormat: "json" });
 * logger("consumer").warn("job {jobId} waits", { jobId: "job-1" }); // one JSON line
 * ```
 */
export async function setupLogging(
  options: Pick<Settings, "logLevel" | "logFormat">,
): Promise<void> {
  const formatter = options.logFormat === "json"
    ? getJsonLinesFormatter({ properties: "flatten", message: "rendered" })
    : getTextFormatter({ timestamp: "date-time-tz", value: "bare" });
  await configure({
    reset: true,
    sinks: { console: getConsoleSink({ formatter }) },
    loggers: [
      { category: LOG_CATEGORY, lowestLevel: options.logLevel, sinks: ["console"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["console"] },
    ],
  });
}

/** Turns logging off again (tests and the end of `main`). */
export async function teardownLogging(): Promise<void> {
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
