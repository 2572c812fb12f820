/**
 * Settings: every environment variable of docs/protocol.md section 5, validated with zod.
 *
 * Names are case-insensitive. A `.env` file in the working directory is read when present, and a
 * real environment variable beats the file.
 *
 * @module
 */
import { parse as parseDotenv } from "dotenv";
import { z } from "zod";
import type { JobType } from "./job.ts";
import { readLanguage } from "./language.ts";
import { PromptError, type PromptTemplate, readPromptsDir } from "./prompts.ts";

/** The validated settings of one worker process. */
export interface Settings {
  /** OpenAI-compatible server, e.g. `http://localhost:8080/v1`. */
  llmBaseUrl: string;
  /** Model used for images. */
  llmVisionModel: string;
  /** Model used for text. */
  llmTextModel: string;
  /** API key sent to the model server; never logged. */
  llmApiKey: string;
  /** Attempts in all for a job whose model keeps answering nonsense. */
  llmMaxRetries: number;
  /** `auto` tries a JSON schema first and falls back per model; `on` always; `off` never. */
  llmStructuredOutput: "auto" | "on" | "off";
  /** Cap on the characters of text sent to the model. */
  llmMaxInputChars: number;
  /** The folder of prompt files, when one is set. */
  llmPromptsDir?: string;
  /** The prompts read from `llmPromptsDir` (checked), by job type; the others are built in. */
  llmPrompts: Partial<Record<JobType, PromptTemplate>>;
  /** Language code for jobs with no user (and users whose settings name none). */
  llmDefaultLanguage: string;
  /** Most model requests in flight across every replica sharing the Redis; null: no shared cap. */
  llmMaxInFlight: number | null;
  /** Most model requests a minute across every replica; null: no limit. */
  llmMaxRequestsPerMinute: number | null;
  /** A second OpenAI-compatible server used while the first is unavailable; null: none. */
  llmFallback: FallbackSettings | null;
  /** Redis URL (`redis://` or `rediss://`). */
  redisUrl: string;
  /** Core REST API base URL. */
  coreApiUrl: string;
  /** Shared image volume. */
  imageStoragePath: string;
  /** Most model requests in flight at once. */
  workerConcurrency: number;
  /** This replica's consumer name. */
  workerConsumerName: string;
  /** Claim another consumer's entry idle this long (ms). */
  workerClaimIdleMs: number;
  /** How long a replica holds a user without refreshing its lease (ms). */
  workerLeaseMs: number;
  /** How long a stop waits for jobs in flight (ms). */
  workerShutdownTimeoutMs: number;
  /** Port of the health and metrics listener; `0` picks a free port. */
  workerHttpPort: number;
  /** Lowest log level written. */
  logLevel: "debug" | "info" | "warning" | "error";
  /** Log line format (`LOG_FORMAT=pretty` is read as `text`). */
  logFormat: "text" | "json";
}

/** The fallback model server (`LLM_FALLBACK_*`); its models default to the primary's names. */
export interface FallbackSettings {
  /** `LLM_FALLBACK_BASE_URL`. */
  baseUrl: string;
  /** `LLM_FALLBACK_API_KEY`; never logged. */
  apiKey: string;
  /** `LLM_FALLBACK_TEXT_MODEL`. */
  textModel: string;
  /** `LLM_FALLBACK_VISION_MODEL`. */
  visionModel: string;
}

/** Thrown by {@linkcode loadSettings}; its message names every bad variable. */
export class SettingsError extends Error {
  /** The variables that were refused, with what each expects. */
  readonly problems: readonly string[];

  /** Builds the error from one line per bad variable. */
  constructor(problems: string[]) {
    super(
      `Invalid settings (fix these environment variables or .env entries):\n` +
        problems.map((p) => `  - ${p}`).join("\n"),
    );
    this.name = "SettingsError";
    this.problems = problems;
  }
}

const url = (schemes: string[]) =>
  z.string().trim().refine((value) => {
    try {
      return schemes.includes(new URL(value).protocol);
    } catch {
      return false;
    }
  }, { message: `expects a URL starting with ${schemes.map((s) => `${s}//`).join(" or ")}` });

const integer = (min: number, max = Number.MAX_SAFE_INTEGER) =>
  z.string().trim().regex(/^\d+$/, { message: `expects a whole number from ${min}` }).transform(
    Number,
  ).pipe(
    z.number().int().min(min, { message: `expects a whole number from ${min}` }).max(max, {
      message: `expects a whole number up to ${max}`,
    }),
  );

const oneOf = <T extends string>(values: readonly [T, ...T[]]) =>
  z.string().trim().toLowerCase().pipe(
    z.enum(values, { message: `expects one of ${values.join(", ")}` }),
  );

const nonEmpty = z.string().trim().min(1, { message: "expects a non-empty value" });

/** The schema of the raw variables, keyed by their upper-case names. */
const schema = z.object({
  LLM_BASE_URL: url(["http:", "https:"]).default("http://localhost:8080/v1"),
  LLM_VISION_MODEL: nonEmpty.default("llava"),
  LLM_TEXT_MODEL: nonEmpty.default("mistral"),
  LLM_API_KEY: nonEmpty.default("not-needed"),
  LLM_MAX_RETRIES: integer(1, 100).default(5),
  LLM_STRUCTURED_OUTPUT: oneOf(["auto", "on", "off"]).default("auto"),
  LLM_MAX_INPUT_CHARS: integer(500).default(12000),
  LLM_PROMPTS_DIR: nonEmpty.optional(),
  LLM_DEFAULT_LANGUAGE: z.string().trim().refine((code) => readLanguage(code) !== undefined, {
    message: "expects an ISO 639-1 language code such as en, fr or de",
  }).transform((code) => readLanguage(code)!.code).default("en"),
  LLM_MAX_IN_FLIGHT: integer(1, 100_000).optional(),
  LLM_MAX_REQUESTS_PER_MINUTE: integer(1, 1_000_000).optional(),
  LLM_FALLBACK_BASE_URL: url(["http:", "https:"]).optional(),
  LLM_FALLBACK_API_KEY: nonEmpty.default("not-needed"),
  LLM_FALLBACK_TEXT_MODEL: nonEmpty.optional(),
  LLM_FALLBACK_VISION_MODEL: nonEmpty.optional(),
  REDIS_URL: url(["redis:", "rediss:"]).default("redis://redis:6379"),
  CORE_API_URL: url(["http:", "https:"]).default("http://core:8000"),
  IMAGE_STORAGE_PATH: nonEmpty.default("/data/images"),
  WORKER_CONCURRENCY: integer(1, 1024).default(4),
  WORKER_CONSUMER_NAME: nonEmpty.optional(),
  WORKER_CLAIM_IDLE_MS: integer(1000).default(600000),
  WORKER_LEASE_MS: integer(1000, 3_600_000).default(30000),
  WORKER_SHUTDOWN_TIMEOUT_MS: integer(0).default(30000),
  WORKER_HTTP_PORT: integer(0, 65535).default(9464),
  LOG_LEVEL: oneOf(["debug", "info", "warning", "warn", "error"]).default("info"),
  LOG_FORMAT: oneOf(["text", "json", "pretty"]).default("text"),
});

/** The variables {@linkcode loadSettings} reads, in their canonical upper-case spelling. */
export const SETTING_NAMES: readonly string[] = Object.keys(schema.shape);

/** The default consumer name: unique per process, so replicas never share one. */
export function defaultConsumerName(): string {
  let host = "worker";
  try {
    host = Deno.hostname();
  } catch {
    // hostname needs --allow-sys; the pid keeps the name unique on one host anyway.
  }
  return `${host}-${Deno.pid}`;
}

/** Reads `.env` in the working directory, or `{}` when there is none. */
export function readDotenv(path = ".env"): Record<string, string> {
  try {
    return parseDotenv(Deno.readTextFileSync(path));
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return {};
    throw error;
  }
}

/**
 * The process environment and `.env`, merged: the real environment wins, whatever the spelling
 * of the name in either (`llm_text_model` in the environment beats `LLM_TEXT_MODEL` in `.env`).
 */
export function readEnvironment(): Record<string, string> {
  return { ...canonicalNames(readDotenv()), ...canonicalNames(Deno.env.toObject()) };
}

/**
 * `env` with the settings' variables under their upper-case names (other names are kept as they
 * are); when one source spells a name twice, the exact upper-case spelling wins. Empty values
 * are left out, so they take the default.
 */
function canonicalNames(env: Record<string, string>): Record<string, string> {
  const known = new Set(SETTING_NAMES);
  const raw: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    const upper = name.toUpperCase();
    if (!known.has(upper)) raw[name] = value;
    // An empty value means "not set" (compose files write `LLM_API_KEY: ${LLM_API_KEY:-}`).
    else if (value.trim() === "") continue;
    else if (name === upper || !(upper in raw)) raw[upper] = value;
  }
  return raw;
}

/**
 * Validates the variables in `env` (default: `.env` merged under the real environment).
 *
 * Names are matched case-insensitively. Throws one {@linkcode SettingsError} that names every bad
 * variable.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const settings = loadSettings({ worker_concurrency: "8", WORKER_CONSUMER_NAME: "w1" });
 * assert.equal(settings.workerConcurrency, 8);
 * assert.equal(settings.llmTextModel, "mistral"); // the default
 * assert.throws(() => loadSettings({ WORKER_CONCURRENCY: "0" }), SettingsError);
 * ```
 */
export function loadSettings(env: Record<string, string> = readEnvironment()): Settings {
  const raw = canonicalNames(env);
  const parsed = schema.safeParse(raw);
  const problems = parsed.success ? [] : parsed.error.issues.map((issue) => {
    const name = String(issue.path[0]);
    const shown = name.endsWith("_API_KEY") ? "(hidden)" : JSON.stringify(raw[name] ?? "");
    return `${name}=${shown} ${issue.message}`;
  });
  let prompts: Partial<Record<JobType, PromptTemplate>> = {};
  const promptsDir = raw.LLM_PROMPTS_DIR?.trim();
  if (promptsDir) {
    try {
      prompts = readPromptsDir(promptsDir);
    } catch (error) {
      if (!(error instanceof PromptError)) throw error;
      problems.push(...error.problems.map((problem) => `LLM_PROMPTS_DIR: ${problem}`));
    }
  }
  if (!parsed.success || problems.length > 0) throw new SettingsError([...new Set(problems)]);
  const v = parsed.data;
  return {
    llmBaseUrl: v.LLM_BASE_URL,
    llmVisionModel: v.LLM_VISION_MODEL,
    llmTextModel: v.LLM_TEXT_MODEL,
    llmApiKey: v.LLM_API_KEY,
    llmMaxRetries: v.LLM_MAX_RETRIES,
    llmStructuredOutput: v.LLM_STRUCTURED_OUTPUT,
    llmMaxInputChars: v.LLM_MAX_INPUT_CHARS,
    llmPromptsDir: v.LLM_PROMPTS_DIR,
    llmPrompts: prompts,
    llmDefaultLanguage: v.LLM_DEFAULT_LANGUAGE,
    llmMaxInFlight: v.LLM_MAX_IN_FLIGHT ?? null,
    llmMaxRequestsPerMinute: v.LLM_MAX_REQUESTS_PER_MINUTE ?? null,
    llmFallback: v.LLM_FALLBACK_BASE_URL === undefined ? null : {
      baseUrl: v.LLM_FALLBACK_BASE_URL,
      apiKey: v.LLM_FALLBACK_API_KEY,
      textModel: v.LLM_FALLBACK_TEXT_MODEL ?? v.LLM_TEXT_MODEL,
      visionModel: v.LLM_FALLBACK_VISION_MODEL ?? v.LLM_VISION_MODEL,
    },
    redisUrl: v.REDIS_URL,
    coreApiUrl: v.CORE_API_URL.replace(/\/+$/, ""),
    imageStoragePath: v.IMAGE_STORAGE_PATH,
    workerConcurrency: v.WORKER_CONCURRENCY,
    workerConsumerName: v.WORKER_CONSUMER_NAME ?? defaultConsumerName(),
    workerClaimIdleMs: v.WORKER_CLAIM_IDLE_MS,
    workerLeaseMs: v.WORKER_LEASE_MS,
    workerShutdownTimeoutMs: v.WORKER_SHUTDOWN_TIMEOUT_MS,
    workerHttpPort: v.WORKER_HTTP_PORT,
    logLevel: v.LOG_LEVEL === "warn" ? "warning" : v.LOG_LEVEL,
    logFormat: v.LOG_FORMAT === "pretty" ? "text" : v.LOG_FORMAT, // `pretty` is an alias
  };
}

/** A copy of the settings that is safe to print or log: the API key is hidden. */
export function redactSettings(settings: Settings): Settings {
  return {
    ...settings,
    llmApiKey: settings.llmApiKey ? "***" : "",
    llmFallback: settings.llmFallback && { ...settings.llmFallback, apiKey: "***" },
    redisUrl: redactUrl(settings.redisUrl),
  };
}

/** A URL with its password replaced by `***`, safe to log. */
export function redactUrl(value: string): string {
  try {
    const parsed = new URL(value);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return value;
  }
}
