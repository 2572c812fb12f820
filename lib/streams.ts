/**
 * The Redis Streams side of the protocol (docs/protocol.md section 1): stream and group names, the
 * job envelope, dead letters and notifications.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { runScript } from "./redis.ts";
import type { Job, JobType, NotificationDraft } from "./job.ts";

/** The consumer group every replica joins. */
export const GROUP = "llm-worker-group";
/** Where notifications for the Telegram gateway go. */
export const NOTIFY_STREAM = "notify:telegram";
/** Where malformed entries are kept for an operator. */
export const DEAD_STREAM = "llm:dead";

/** Job stream of each job type. */
export const STREAM_OF: Readonly<Record<JobType, string>> = {
  image_tag: "llm:image_tag",
  intent_classify: "llm:intent",
  followup: "llm:followup",
  task_match: "llm:task_match",
  email_extract: "llm:email_extract",
};

/** The five job streams, in a fixed order. */
export const JOB_STREAMS: readonly string[] = Object.values(STREAM_OF);

/** Job type of each job stream. */
export const JOB_TYPE_OF: Readonly<Record<string, JobType>> = Object.fromEntries(
  Object.entries(STREAM_OF).map(([type, stream]) => [stream, type as JobType]),
);

/** A notification as the gateway reads it from `notify:telegram`. */
export interface Notification extends NotificationDraft {
  /** Who gets it. */
  user_id: number;
}

/** The result of reading one entry's envelope. */
export type ParsedEntry =
  | { ok: true; job: Job }
  | { ok: false; reason: string; jobId?: string; userId?: number | null };

/**
 * Reads one stream entry's envelope: exactly one field `data` holding
 * `{"job_id", "job_type", "payload", "user_id"}` whose `job_type` belongs to `stream`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const data = '{"job_id":"j","job_type":"followup","payload":{"message":"hi"},"user_id":1}';
 * const parsed = parseEntry("llm:followup", "1-0", ["data", data]);
 * assert.equal(parsed.ok && parsed.job.jobId, "j");
 * const wrong = parseEntry("llm:intent", "1-0", ["data", data]);
 * assert.equal(wrong.ok, false); // a followup job on the intent stream is malformed
 * ```
 */
export function parseEntry(stream: string, entryId: string, fields: string[]): ParsedEntry {
  const data = fieldValue(fields, "data");
  if (data === undefined) return { ok: false, reason: "the entry has no `data` field" };
  let envelope: unknown;
  try {
    envelope = JSON.parse(data);
  } catch {
    return { ok: false, reason: "`data` is not JSON" };
  }
  if (!envelope || typeof envelope !== "object" || Array.isArray(envelope)) {
    return { ok: false, reason: "`data` is not a JSON object" };
  }
  const e = envelope as Record<string, unknown>;
  const jobId = typeof e.job_id === "string" && e.job_id.trim() ? e.job_id : undefined;
  const userId = Number.isInteger(e.user_id) ? e.user_id as number : null;
  if (!jobId) return { ok: false, reason: "the envelope has no `job_id`", userId };
  if (typeof e.job_type !== "string" || !e.job_type) {
    return { ok: false, reason: "the envelope has no `job_type`", jobId, userId };
  }
  const expected = JOB_TYPE_OF[stream];
  if (!(e.job_type in STREAM_OF)) {
    return { ok: false, reason: `unknown job_type ${JSON.stringify(e.job_type)}`, jobId, userId };
  }
  if (e.job_type !== expected) {
    return {
      ok: false,
      reason: `job_type ${JSON.stringify(e.job_type)} belongs to ${
        STREAM_OF[e.job_type as JobType]
      }, not ${stream}`,
      jobId,
      userId,
    };
  }
  if (e.user_id !== null && e.user_id !== undefined && !Number.isInteger(e.user_id)) {
    return { ok: false, reason: "`user_id` is neither an integer nor null", jobId };
  }
  const payload = e.payload && typeof e.payload === "object" && !Array.isArray(e.payload)
    ? e.payload as Record<string, unknown>
    : {};
  return {
    ok: true,
    job: { jobId, jobType: expected, payload, userId, stream, entryId },
  };
}

/** The value of `name` in a flat `[name, value, name, value, ...]` list. */
export function fieldValue(fields: string[], name: string): string | undefined {
  for (let i = 0; i + 1 < fields.length; i += 2) if (fields[i] === name) return fields[i + 1];
  return undefined;
}

/**
 * Compares two stream entry ids (`<ms>-<seq>`) in time order: negative when `a` came first.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.ok(compareEntryIds("9-5", "10-0") < 0); // by number, not as text
 * ```
 */
export function compareEntryIds(a: string, b: string): number {
  if (a === b) return 0;
  // Called in sorts and queue inserts for every entry: no split, no allocation.
  const ad = a.indexOf("-");
  const bd = b.indexOf("-");
  return compareDigits(a, 0, ad === -1 ? a.length : ad, b, 0, bd === -1 ? b.length : bd) ||
    compareDigits(
      ad === -1 ? "0" : a,
      ad === -1 ? 0 : ad + 1,
      ad === -1 ? 1 : a.length,
      bd === -1 ? "0" : b,
      bd === -1 ? 0 : bd + 1,
      bd === -1 ? 1 : b.length,
    );
}

/** Compares two runs of decimal digits as numbers (leading zeros allowed). */
function compareDigits(
  a: string,
  aStart: number,
  aEnd: number,
  b: string,
  bStart: number,
  bEnd: number,
): number {
  while (aStart < aEnd - 1 && a.charCodeAt(aStart) === 48) aStart++;
  while (bStart < bEnd - 1 && b.charCodeAt(bStart) === 48) bStart++;
  if (aEnd - aStart !== bEnd - bStart) return (aEnd - aStart) - (bEnd - bStart);
  for (; aStart < aEnd; aStart++, bStart++) {
    const d = a.charCodeAt(aStart) - b.charCodeAt(bStart);
    if (d !== 0) return d;
  }
  return 0;
}

/**
 * Creates the consumer group on every stream at id 0 with MKSTREAM; an existing group is fine.
 */
export async function ensureGroups(
  redis: Redis,
  streams: readonly string[] = JOB_STREAMS,
  group = GROUP,
): Promise<void> {
  await Promise.all(streams.map(async (stream) => {
    try {
      await redis.xgroup("CREATE", stream, group, "0", "MKSTREAM");
    } catch (error) {
      if (!String((error as Error)?.message).includes("BUSYGROUP")) throw error;
    }
  }));
}

/** The `XADD` arguments of a notification. */
export function notificationArgs(notification: Notification): [string, string, string, string] {
  return [NOTIFY_STREAM, "*", "data", JSON.stringify(notification)];
}

/** KEYS = the entry's stream, `llm:dead`; ARGV = group, entry id, the copy's fields. */
const MOVE_TO_DEAD_SCRIPT = `
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return 1`;

/**
 * Copies a malformed entry to `llm:dead` (see {@linkcode deadLetterArgs}) and acknowledges it,
 * in one step that copies only an entry still pending: sent twice, it copies once. True when
 * this call moved it.
 */
export async function moveToDead(
  redis: Redis,
  stream: string,
  entryId: string,
  reason: string,
  fields: string[],
  group = GROUP,
): Promise<boolean> {
  const [dead, , ...copy] = deadLetterArgs(stream, entryId, reason, fields);
  return await runScript(redis, MOVE_TO_DEAD_SCRIPT, 2, stream, dead, group, entryId, ...copy) ===
    1;
}

/** The `XADD` arguments that copy a malformed entry to `llm:dead`, keeping its fields. */
export function deadLetterArgs(
  stream: string,
  entryId: string,
  reason: string,
  fields: string[],
): string[] {
  const kept: string[] = [];
  for (let i = 0; i + 1 < fields.length; i += 2) {
    // The original fields follow ours; one that clashes with ours, or starts with `orig_`, is
    // kept under `orig_<name>`, so `originalFields` gives back exactly the original list.
    const name = ["stream", "id", "reason"].includes(fields[i]) || fields[i].startsWith("orig_")
      ? `orig_${fields[i]}`
      : fields[i];
    kept.push(name, fields[i + 1]);
  }
  return [DEAD_STREAM, "*", "stream", stream, "id", entryId, "reason", reason, ...kept];
}

/**
 * The fields an entry had before {@linkcode deadLetterArgs} copied it to `llm:dead`: the copy's
 * fields without `stream`, `id` and `reason`, and with one `orig_` prefix taken off.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(
 *   originalFields(["stream", "llm:intent", "id", "5-0", "reason", "r", "data", "x", "orig_id", "7"]),
 *   ["data", "x", "id", "7"],
 * );
 * ```
 */
export function originalFields(deadFields: string[]): string[] {
  const original: string[] = [];
  for (let i = 0; i + 1 < deadFields.length; i += 2) {
    const name = deadFields[i];
    if (name === "stream" || name === "id" || name === "reason") continue;
    original.push(name.startsWith("orig_") ? name.slice(5) : name, deadFields[i + 1]);
  }
  return original;
}
