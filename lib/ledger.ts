/**
 * The worker's own record of each job, kept in Redis (a hash `llm-worker:job:<job_id>`), so that
 * no effect or notification happens twice and attempt counts survive a restart (docs/protocol.md
 * section 4: Core has no way to list effects per job).
 *
 * Fields: `invalid` and `unavailable` (attempt counts), `told` (the user heard the model is
 * down), `processing` (Core was told), `outbox` (notifications saved before Core's final PATCH),
 * `fx:<key>` (the result of each once-only effect) and `done` (`completed` or `failed`, written
 * in the same script as the notifications and the XACK).
 *
 * @module
 */
import type { Redis } from "ioredis";
import { runScript } from "./redis.ts";
import { LeaseLostError } from "./errors.ts";
import type { Effects, Job } from "./job.ts";
import { GROUP, type Notification, notificationArgs, NOTIFY_STREAM } from "./streams.ts";
import { type Fence, fencedScript, handingOnScript, isFenced } from "./user_lease.ts";

/** Prefix of the ledger's keys. */
export const LEDGER_PREFIX = "llm-worker:job:";
/** How long a record is kept after its last change: past the 14-day expiry of a job. */
export const LEDGER_TTL_MS = 15 * 24 * 60 * 60 * 1000;

/**
 * `finish`: KEYS = job stream, record, notification stream; ARGV = group, entry id, status, TTL,
 * notification payloads. The XACK's answer says whether the entry was still pending: only then
 * is anything published.
 */
const FINISH_SCRIPT = `
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 5, #ARGV do redis.call('XADD', KEYS[3], '*', 'data', ARGV[i]) end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'done', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1`;

/** `notifyOnce`: KEYS = record, notification stream; ARGV = flag, TTL, payload. */
const NOTIFY_ONCE_SCRIPT = `
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
return 1`;

/**
 * `write`: KEYS = record; ARGV = TTL, then field, value pairs. One script rather than a MULTI of
 * HSET and PEXPIRE: the same atomic write at a fifth of the client's CPU.
 */
const WRITE_SCRIPT = `
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1`;

/** `count`: KEYS = record; ARGV = TTL, field. Answers the new count. */
const COUNT_SCRIPT = `
local count = redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return count`;

/** `setOnce`: KEYS = record; ARGV = TTL, flag. Answers 1 when this call set the flag. */
const SET_ONCE_SCRIPT = `
local set = redis.call('HSETNX', KEYS[1], ARGV[2], '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return set`;

/** `ack`: KEYS = job stream; ARGV = group, entry id. */
const ACK_SCRIPT = `return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])`;

/** Each script with the fence check before it (lib/user_lease.ts). */
const FENCED = new Map(
  [FINISH_SCRIPT, NOTIFY_ONCE_SCRIPT, WRITE_SCRIPT, COUNT_SCRIPT, SET_ONCE_SCRIPT, ACK_SCRIPT].map(
    (script) => [script, fencedScript(script)],
  ),
);

/** The scripts that end a job, fenced and followed by the user's hand-on (lib/user_lease.ts). */
const HANDING_ON = new Map(
  [FINISH_SCRIPT, ACK_SCRIPT].map((script) => [script, handingOnScript(script)]),
);

/** What the ledger knows of one job. */
export interface JobRecord {
  /** True when Redis had any record of the job. */
  exists: boolean;
  /** Set once the job's end (notifications + XACK) was written. */
  done?: "completed" | "failed";
  /** Invalid answers so far. */
  invalidAttempts: number;
  /** Waits for unavailability so far. */
  unavailableAttempts: number;
  /** Notifications saved before the final PATCH, not yet published. */
  outbox?: Notification[];
  /** Results of once-only effects, by key. */
  effects: Map<string, unknown>;
}

/**
 * Reads and writes the job records.
 *
 * @example
 * ```ts ignore
 * const ledger = new JobLedger(redis);
 * const record = await ledger.load("job-1");
 * const effects = ledger.effects("job-1", record);
 * const memory = await effects.once("memory", () => core.createMemory(7, "hello"));
 * ```
 */
export class JobLedger {
  readonly #redis: Redis;
  readonly #fence?: Fence;

  /**
   * A ledger over `redis`; with `fence`, every write is fenced by that user's lease, and the
   * write that ends a job (`finish`, `ack`) runs the fence's hand-on in the same step.
   */
  constructor(redis: Redis, fence?: Fence) {
    this.#redis = redis;
    this.#fence = fence;
  }

  /**
   * The same ledger with every write fenced by `fence`: once another replica holds the user,
   * nothing is written and the write throws {@linkcode LeaseLostError}.
   */
  fenced(fence: Fence): JobLedger {
    return new JobLedger(this.#redis, fence);
  }

  /** The Redis key of a job's record. */
  key(jobId: string): string {
    return `${LEDGER_PREFIX}${jobId}`;
  }

  /** Loads a job's record (an empty one when there is none). */
  async load(jobId: string): Promise<JobRecord> {
    const hash = await this.#redis.hgetall(this.key(jobId));
    const effects = new Map<string, unknown>();
    for (const [field, value] of Object.entries(hash)) {
      if (field.startsWith("fx:")) effects.set(field.slice(3), JSON.parse(value));
    }
    return {
      exists: Object.keys(hash).length > 0,
      done: hash.done === "completed" || hash.done === "failed" ? hash.done : undefined,
      invalidAttempts: Number(hash.invalid ?? 0),
      unavailableAttempts: Number(hash.unavailable ?? 0),
      outbox: hash.outbox ? JSON.parse(hash.outbox) : undefined,
      effects,
    };
  }

  /**
   * Once-only effects of a job, backed by its record (and cached in `record.effects`). `guard`
   * runs before each action (the consumer checks the user's lease there).
   */
  effects(jobId: string, record: JobRecord, guard?: () => Promise<void>): Effects {
    return {
      once: async <T>(key: string, action: () => Promise<T>): Promise<T> => {
        if (record.effects.has(key)) return record.effects.get(key) as T;
        await guard?.();
        const value = await action();
        await this.#write(jobId, `fx:${key}`, JSON.stringify(value ?? null));
        record.effects.set(key, value);
        return value;
      },
    };
  }

  /** Counts one more invalid answer and returns the new count. */
  async countInvalid(jobId: string): Promise<number> {
    return await this.#count(jobId, "invalid");
  }

  /** Counts one more wait for unavailability and returns the new count. */
  async countUnavailable(jobId: string): Promise<number> {
    return await this.#count(jobId, "unavailable");
  }

  /** Sets `flag` once; true only for the caller that set it first. */
  async setOnce(jobId: string, flag: "processing"): Promise<boolean> {
    return await this.#eval(SET_ONCE_SCRIPT, [this.key(jobId)], [LEDGER_TTL_MS, flag]) === 1;
  }

  /** Saves the notifications that must follow Core's final PATCH, in case we crash between. */
  async saveOutbox(jobId: string, notifications: Notification[]): Promise<void> {
    await this.#write(jobId, "outbox", JSON.stringify(notifications));
  }

  /**
   * Ends a job atomically: acknowledges the entry and, only when the entry was still pending,
   * publishes its notifications and marks the record done (dropping effects and outbox).
   *
   * Sending it twice does nothing the second time: after a lost connection the Redis client
   * sends again what got no answer, and a retry of a job whose end was written but not
   * confirmed must not notify the user twice. Resolves with whether this call ended the entry.
   */
  async finish(
    job: Job,
    status: "completed" | "failed",
    notifications: Notification[],
  ): Promise<boolean> {
    const payloads = notifications.map((notification) => notificationArgs(notification)[3]);
    const ended = await this.#eval(
      FINISH_SCRIPT,
      [job.stream, this.key(job.jobId), NOTIFY_STREAM],
      [GROUP, job.entryId, status, LEDGER_TTL_MS, ...payloads],
      true,
    );
    return ended === 1;
  }

  /**
   * Publishes `notification` and sets `flag` in one step, unless `flag` was set before; true when
   * this call published it. Sending it twice publishes once.
   */
  async notifyOnce(jobId: string, flag: "told", notification: Notification): Promise<boolean> {
    const sent = await this.#eval(
      NOTIFY_ONCE_SCRIPT,
      [this.key(jobId), NOTIFY_STREAM],
      [flag, LEDGER_TTL_MS, notificationArgs(notification)[3]],
    );
    return sent === 1;
  }

  /** Acknowledges an entry whose job needs nothing more. */
  async ack(job: Pick<Job, "stream" | "entryId">): Promise<void> {
    if (this.#fence) await this.#eval(ACK_SCRIPT, [job.stream], [GROUP, job.entryId], true);
    else await this.#redis.xack(job.stream, GROUP, job.entryId);
  }

  async #count(jobId: string, field: string): Promise<number> {
    return Number(await this.#eval(COUNT_SCRIPT, [this.key(jobId)], [LEDGER_TTL_MS, field]));
  }

  /** Sets `field` of the job's record and renews the record's TTL, in one step. */
  async #write(jobId: string, field: string, value: string): Promise<void> {
    await this.#eval(WRITE_SCRIPT, [this.key(jobId)], [LEDGER_TTL_MS, field, value]);
  }

  /**
   * Runs one of the scripts above, behind the fence when there is one; a script that `ends` the
   * job runs the fence's hand-on too.
   */
  async #eval(
    script: string,
    keys: string[],
    args: Array<string | number>,
    ends = false,
  ): Promise<unknown> {
    const fence = this.#fence;
    if (!fence) return await runScript(this.#redis, script, keys.length, ...keys, ...args);
    const handOn = ends ? fence.handOn : undefined;
    try {
      const answer = await runScript(
        this.#redis,
        (handOn ? HANDING_ON : FENCED).get(script)!,
        keys.length + 1,
        fence.key,
        ...keys,
        fence.token,
        ...args,
        ...handOn?.args() ?? [],
      );
      if (!handOn) return answer;
      const [written, ...handed] = answer as unknown[];
      handOn.done(handed);
      return written;
    } catch (error) {
      if (isFenced(error)) throw new LeaseLostError(fence.userId);
      throw error;
    }
  }
}

/**
 * Once-only results kept in memory only: what a job keeps while it stays in this process (the
 * model's answers between retries) and what handler tests use instead of Redis.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const answers = new MemoryEffects();
 * assert.equal(await answers.once("answer:0", () => Promise.resolve("hi")), "hi"); // runs
 * assert.equal(await answers.once("answer:0", () => Promise.resolve("ho")), "hi"); // kept
 * ```
 */
export class MemoryEffects implements Effects {
  /** Results recorded so far, by key. */
  readonly done = new Map<string, unknown>();

  /** Runs `action` unless `key` already succeeded, and returns its result either way. */
  async once<T>(key: string, action: () => Promise<T>): Promise<T> {
    if (this.done.has(key)) return this.done.get(key) as T;
    const value = await action();
    this.done.set(key, value);
    return value;
  }
}
