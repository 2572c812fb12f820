/**
 * The user's language (docs/protocol.md section 3: `GET /settings/{user_id}` answers `language`, an
 * ISO 639-1 code, `en` by default): read once per job with the timezone, and named in English in
 * the prompts ("write the question in French").
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { CoreApiClient } from "./core_api.ts";
import { timeZoneOrUtc } from "./time.ts";

/** A language the model is asked to write in. */
export interface Language {
  /** The code as Core sends it, lower case (`fr`, `pt-br`). */
  code: string;
  /** Its English name (`French`, `Brazilian Portuguese`), as the prompts say it. */
  name: string;
}

const NAMES = new Intl.DisplayNames(["en"], { type: "language", fallback: "none" });

/**
 * The language of an ISO 639-1 code (a BCP 47 tag such as `pt-BR` is read too), or `undefined`
 * for anything that names no language.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(readLanguage(" FR "), { code: "fr", name: "French" });
 * assert.equal(readLanguage("xx"), undefined);
 * ```
 */
export function readLanguage(value: unknown): Language | undefined {
  if (typeof value !== "string") return undefined;
  // Intl.DisplayNames is slow enough to show in a profile at hundreds of jobs a second.
  if (known.has(value)) return known.get(value);
  const language = lookUp(value);
  if (known.size < 1_000) known.set(value, language);
  return language;
}

/** Answers of {@linkcode readLanguage} so far, by the value given (a few codes in practice). */
const known = new Map<string, Language | undefined>();

function lookUp(value: string): Language | undefined {
  const code = value.trim().toLowerCase().replaceAll("_", "-");
  if (!/^[a-z]{2,3}(?:-[a-z0-9]{2,8})*$/.test(code)) return undefined;
  let name: string | undefined;
  try {
    name = NAMES.of(code);
  } catch {
    return undefined; // not a well-formed tag after all
  }
  return name && name.toLowerCase() !== code ? { code, name } : undefined;
}

/** What the prompts need to know of the job's user. */
export interface UserContext {
  /** The user's IANA timezone (`UTC` when unknown). */
  timeZone: string;
  /** The language the user reads. */
  language: Language;
}

/**
 * The user's timezone and language from one `GET /settings/{user_id}` (the client may answer it
 * from its short cache); `defaultLanguage` for a job with no user (no call then) and for a
 * settings answer without a language. An unknown timezone or language is logged and replaced.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { getLogger } from "@logtape/logtape";
 *
 * const core = { getSettings: () => Promise.resolve({ timezone: "Europe/Paris", language: "fr" }) };
 * const user = await readUserContext(core, 1, "en", getLogger("example"));
 * assert.deepEqual(user, { timeZone: "Europe/Paris", language: { code: "fr", name: "French" } });
 * ```
 */
export async function readUserContext(
  core: Pick<CoreApiClient, "getSettings">,
  userId: number | null,
  defaultLanguage: string,
  log: Logger,
  signal?: AbortSignal,
): Promise<UserContext> {
  const fallback = readLanguage(defaultLanguage) ?? { code: "en", name: "English" };
  if (userId === null) return { timeZone: "UTC", language: fallback };
  const settings = await core.getSettings(userId, signal);
  const timeZone = timeZoneOrUtc(settings?.timezone);
  if (timeZone !== settings?.timezone) {
    log.warn("User {userId} has an unknown timezone {timezone}; using UTC.", {
      userId,
      timezone: settings?.timezone ?? null,
    });
  }
  const given = settings?.language;
  const language = given === undefined || given === null ? fallback : readLanguage(given);
  if (!language) {
    log.warn("User {userId} has an unknown language {language}; using {fallback}.", {
      userId,
      language: given,
      fallback: fallback.code,
    });
  }
  return { timeZone, language: language ?? fallback };
}
