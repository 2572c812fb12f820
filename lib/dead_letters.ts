/**
 * Dead letters: reading, re-queueing and deleting the entries the consumer copied to `llm:dead`
 * (docs/protocol.md section 1), for the operator tool `deno task dead`.
 *
 * Invariants: a re-queue publishes the entry's original fields to its original stream and
 * deletes the dead letter in one Lua script, so a crash or a second operator never loses the
 * entry nor publishes it twice (the script publishes only while the dead letter still exists).
 * Only the five job streams are published to. A delete is one `XDEL`.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { DEAD_STREAM, JOB_STREAMS, originalFields } from "./streams.ts";
import { entryTimeMs } from "./retry.ts";

/** One entry of `llm:dead`, read. */
export interface DeadLetter {
  /** Its id in `llm:dead`. */
  id: string;
  /** The stream it came from (its `stream` field); empty when the copy has none. */
  stream: string;
  /** Its id in that stream (its `id` field); empty when the copy has none. */
  originalId: string;
  /** Why the worker refused it. */
  reason: string;
  /** The original entry's fields, as a flat `[name, value, …]` list. */
  fields: string[];
  /** When it was copied to `llm:dead` (ms since the epoch, from its id). */
  deadAtMs: number;
  /** The envelope's `job_id` when its `data` is JSON naming one. */
  jobId?: string;
}

/** Thrown when a dead letter cannot be re-queued; the message says why and what to do. */
export class DeadLetterError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "DeadLetterError";
  }
}

/**
 * Reads one `llm:dead` entry from its id and fields.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const letter = readDeadLetter("1700000000000-0", [
 *   "stream", "llm:intent", "id", "1699999999999-0", "reason", "`data` is not JSON", "data", "{",
 * ]);
 * assert.deepEqual(letter.fields, ["data", "{"]);
 * assert.equal(letter.stream, "llm:intent");
 * ```
 */
export function readDeadLetter(id: string, deadFields: string[]): DeadLetter {
  const value = (name: string) => {
    for (let i = 0; i + 1 < deadFields.length; i += 2) {
      if (deadFields[i] === name) return deadFields[i + 1];
    }
    return "";
  };
  const fields = originalFields(deadFields);
  let jobId: string | undefined;
  const dataAt = fields.findIndex((name, i) => i % 2 === 0 && name === "data");
  if (dataAt !== -1) {
    try {
      const envelope = JSON.parse(fields[dataAt + 1]);
      if (typeof envelope?.job_id === "string" && envelope.job_id) jobId = envelope.job_id;
    } catch {
      // not JSON: no job id to show
    }
  }
  return {
    id,
    stream: value("stream"),
    originalId: value("id"),
    reason: value("reason"),
    fields,
    deadAtMs: entryTimeMs(id),
    jobId,
  };
}

/**
 * Every dead letter, oldest first, read in pages of `pageSize` (so a long `llm:dead` is never
 * read in one reply).
 *
 * @example
 * ```ts ignore
 * for await (const letter of deadLetters(redis)) console.log(letter.id, letter.reason);
 * ```
 */
export async function* deadLetters(
  redis: Redis,
  pageSize = 200,
): AsyncGenerator<DeadLetter> {
  let start = "-";
  while (true) {
    const page = await redis.xrange(DEAD_STREAM, start, "+", "COUNT", pageSize);
    for (const [id, fields] of page) yield readDeadLetter(id, fields);
    if (page.length < pageSize) return;
    start = `(${page[page.length - 1][0]}`;
  }
}

/**
 * One dead letter by its id in `llm:dead`, or `undefined` when there is none.
 *
 * @example
 * ```ts ignore
 * const letter = await getDeadLetter(redis, "1700000000000-0");
 * ```
 */
export async function getDeadLetter(redis: Redis, id: string): Promise<DeadLetter | undefined> {
  checkId(id);
  const [entry] = await redis.xrange(DEAD_STREAM, id, id);
  return entry ? readDeadLetter(entry[0], entry[1]) : undefined;
}

/** What {@linkcode requeueDeadLetter} did. */
export type RequeueResult =
  | { requeued: true; stream: string; newId: string }
  | { requeued: false };

/**
 * KEYS = `llm:dead`, the job stream; ARGV = the dead letter's id, then the fields to publish.
 * Publishes only while the dead letter exists, and deletes it in the same step. `XADD` comes
 * first: should it fail (a key of the wrong type), nothing is deleted.
 */
const REQUEUE_SCRIPT = `
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return id`;

/**
 * Publishes a dead letter's original fields to its original stream (a new entry, which the
 * worker reads as a new delivery) and deletes it from `llm:dead`, in one atomic step.
 * `{requeued: false}` when it is not (or no longer) there.
 *
 * @throws {DeadLetterError} when the copy names no job stream or holds no original field.
 *
 * @example
 * ```ts ignore
 * const result = await requeueDeadLetter(redis, "1700000000000-0");
 * if (result.requeued) console.log(`back on ${result.stream} as ${result.newId}`);
 * ```
 */
export async function requeueDeadLetter(redis: Redis, id: string): Promise<RequeueResult> {
  const letter = await getDeadLetter(redis, id);
  if (!letter) return { requeued: false };
  if (!JOB_STREAMS.includes(letter.stream)) {
    throw new DeadLetterError(
      `Dead letter ${id} came from ${JSON.stringify(letter.stream)}, which is not a job stream (${
        JOB_STREAMS.join(", ")
      }): publish it by hand or drop it.`,
    );
  }
  if (letter.fields.length === 0) {
    throw new DeadLetterError(`Dead letter ${id} has no original fields to publish: drop it.`);
  }
  const newId = await redis.eval(
    REQUEUE_SCRIPT,
    2,
    DEAD_STREAM,
    letter.stream,
    id,
    ...letter.fields,
  ) as string | null;
  return newId ? { requeued: true, stream: letter.stream, newId } : { requeued: false };
}

/**
 * Deletes dead letters; answers how many were there.
 *
 * @example
 * ```ts ignore
 * await dropDeadLetters(redis, ["1700000000000-0"]); // 1
 * ```
 */
export async function dropDeadLetters(redis: Redis, ids: readonly string[]): Promise<number> {
  if (ids.length === 0) return 0;
  ids.forEach(checkId);
  return await redis.xdel(DEAD_STREAM, ...ids);
}

/** Throws a {@linkcode DeadLetterError} for a string that is not a stream entry id. */
function checkId(id: string): void {
  if (!/^\d+-\d+$/.test(id)) {
    throw new DeadLetterError(
      `${JSON.stringify(id)} is not an entry id of llm:dead (they look like 1712345678901-0).`,
    );
  }
}

/**
 * An age in ms as a short text: `42s`, `5m 3s`, `3h 12m`, `2d 4h`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(formatAge(3 * 3_600_000 + 12 * 60_000), "3h 12m");
 * ```
 */
export function formatAge(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86_400)}d ${Math.floor((s % 86_400) / 3600)}h`;
}
