/**
 * The job's user as the handlers need them: their timezone and language, read from Core's
 * settings once per job (see `lib/language.ts` for the defaults and the cache).
 *
 * @module
 */
import { readUserContext, type UserContext } from "../language.ts";
import type { JobContext } from "./types.ts";

/**
 * The timezone and language of the job's user (`UTC` and `LLM_DEFAULT_LANGUAGE` for a job with
 * no user), read with the job's Core client, logger and signal.
 *
 * @example
 * ```ts ignore
 * const { timeZone, language } = await userOf(ctx);
 * ```
 */
export function userOf(
  ctx: Pick<JobContext, "core" | "job" | "settings" | "log" | "signal">,
): Promise<UserContext> {
  return readUserContext(
    ctx.core,
    ctx.job.userId,
    ctx.settings.llmDefaultLanguage,
    ctx.log,
    ctx.signal,
  );
}
