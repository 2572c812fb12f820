/**
 * Per-user leases in Redis: across every replica, at most one job per user runs at a time, and a
 * user's jobs run in the order of their entry ids across the five streams (docs/protocol.md
 * section 4, "Replicas").
 *
 * The protocol, all of it in Lua scripts so each step is atomic:
 *
 * - **Read.** Entries are delivered by {@linkcode UserLeases.read} only: one script peeks past
 *   the group's last delivered id on every stream, takes the oldest entries across the streams
 *   (so nothing older is left undelivered), `XREADGROUP`s exactly those, and puts each entry that
 *   names a user into that user's queue (`llm-worker:user:<id>:queue`, a sorted set in entry-id
 *   order). An entry read by any replica is therefore in its user's queue before any replica
 *   can see a later entry of the same user.
 * - **Lease.** A user's lease (`llm-worker:user:<id>:lease`: owner, instance, fencing token) has
 *   an expiry in `llm-worker:leases`. It is granted to a replica that finds it free or expired,
 *   with a new token from `INCR llm-worker:fence`. Only the holder runs the user's jobs: always
 *   the head of the queue, claimed (`XCLAIM`) from whichever consumer read it. When the job ends
 *   the holder takes the next head, in the same script as the job's acknowledgement
 *   ({@linkcode handingOnScript}; {@linkcode UserLeases.advance} alone); with the queue empty the
 *   lease is dropped and free users are taken in its place. The holder refreshes its leases every
 *   third of the lease time.
 * - **Fencing.** Every write a job makes in Redis (acknowledgement, notifications, the job's
 *   record) runs in a script that first compares the token ({@linkcode fencedScript}); a replica
 *   that was paused or cut off past its lease finds another token there and writes nothing. Before
 *   each model request and each call that makes an effect in Core, the job checks its lease
 *   ({@linkcode UserLeases.check}): locally while the lease is surely alive, in Redis after.
 * - **Takeover.** Every {@linkcode sweepIntervalMs} each replica grants itself the expired leases
 *   ({@linkcode UserLeases.sweep}): a dead replica holds its users for at most the lease time plus
 *   one sweep interval.
 *
 * Entries with no user (`user_id` null, or no readable envelope) are nobody's: they take no lease.
 *
 * @module
 */
import type { Redis } from "ioredis";
import { runScript } from "./redis.ts";
import { LeaseLostError } from "./errors.ts";
import { GROUP, JOB_STREAMS } from "./streams.ts";

/** Prefix of the leases' keys. */
export const LEASE_PREFIX = "llm-worker:";

/**
 * How often each replica looks for free users (expired leases, users left for a replica with
 * room), for a lease of `leaseMs`: a quarter of it, at most every second.
 */
export function sweepIntervalMs(leaseMs: number): number {
  return Math.max(100, Math.min(1_000, Math.floor(leaseMs / 4)));
}

/** How often a holder refreshes its leases, for a lease of `leaseMs`. */
export function refreshIntervalMs(leaseMs: number): number {
  return Math.max(100, Math.floor(leaseMs / 3));
}

/**
 * The Lua shared by every lease script. BASE[1..5] = key prefix, group, consumer name, instance
 * id, lease ms (BASE is ARGV in the lease scripts, whose own arguments start at ARGV[6]).
 */
const LIBRARY = `
local P, GROUP, ME, INSTANCE = BASE[1], BASE[2], BASE[3], BASE[4]
local LEASE_MS = tonumber(BASE[5])
local LEASES, FENCE = P .. 'leases', P .. 'fence'
local function qkey(u) return P .. 'user:' .. u .. ':queue' end
local function lkey(u) return P .. 'user:' .. u .. ':lease' end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function pad(digits) return string.rep('0', 20 - #digits) .. digits end
local function sortkey(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return pad(ms) .. '-' .. pad(seq)
end
local function member(stream, id) return sortkey(id) .. ' ' .. stream .. ' ' .. id end
local function user_of(fields)
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'data' then
      local ok, env = pcall(cjson.decode, fields[i + 1])
      if ok and type(env) == 'table' then
        local u = env['user_id']
        if type(u) == 'number' and u == math.floor(u) and math.abs(u) <= 9007199254740991 then
          return string.format('%.0f', u)
        end
      end
      return false
    end
  end
  return false
end
local function may_take(u, now)
  local e = tonumber(redis.call('ZSCORE', LEASES, u))
  if not e or e <= now then return true end
  local h = redis.call('HMGET', lkey(u), 'owner', 'instance')
  return h[1] == ME and h[2] ~= INSTANCE
end
local function drop(u)
  redis.call('DEL', lkey(u))
  redis.call('ZREM', LEASES, u)
end
local function release(u)
  if redis.call('ZCARD', qkey(u)) == 0 then return drop(u) end
  redis.call('HSET', lkey(u), 'token', '0')
  redis.call('ZADD', LEASES, 0, u)
end
local function next_run(u)
  local q = qkey(u)
  while true do
    local m = redis.call('ZRANGE', q, 0, 0)[1]
    if not m then return nil end
    local stream, id = string.match(m, '^%S+ (%S+) (%S+)$')
    local p = redis.call('XPENDING', stream, GROUP, id, id, 1)[1]
    if p then
      local e = redis.call('XRANGE', stream, id, id)[1]
      if e and p[2] ~= ME then redis.call('XCLAIM', stream, GROUP, ME, 0, id, 'JUSTID') end
      local started = redis.call('HGET', lkey(u), 'started') == m and 1 or 0
      redis.call('HSET', lkey(u), 'started', m)
      return {stream, id, e and e[2] or false, started}
    end
    redis.call('ZREM', q, m)
  end
end
local function take_turn(u, now, runs)
  local token = redis.call('INCR', FENCE)
  redis.call('HSET', lkey(u), 'owner', ME, 'instance', INSTANCE, 'token', token)
  redis.call('ZADD', LEASES, now + LEASE_MS, u)
  local run = next_run(u)
  if not run then return drop(u) end
  runs[#runs + 1] = {u, tostring(token), run[1], run[2], run[3], run[4]}
end
local grants = 0
local function admit(stream, id, fields, now, nobody, runs)
  local u = fields and user_of(fields)
  if not u then
    nobody[#nobody + 1] = {stream, id, fields or false}
    return
  end
  redis.call('ZADD', qkey(u), 0, member(stream, id))
  if not may_take(u, now) then return end
  if grants > 0 then
    grants = grants - 1
    take_turn(u, now, runs)
  else
    -- no room here: the user waits, free (a lease of this consumer's previous run too), for
    -- the next replica with room that sweeps
    redis.call('ZADD', LEASES, 0, u)
  end
end
local function sweep(now, runs)
  if grants <= 0 then return end
  for _, u in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, grants)) do
    take_turn(u, now, runs)
  end
  grants = 0
end
-- The job of user u at entry (stream, id) ended under this replica's lease (token checked by the
-- caller): the entry leaves the queue and the user's next job is run here, keeping the lease
-- (answers 1); with none the lease goes and up to n free users are taken; with give_up the
-- lease goes, and the user waits, free, for any replica.
local function hand_on(u, token, stream, id, give_up, n, runs)
  redis.call('ZREM', qkey(u), member(stream, id))
  if give_up then
    release(u)
    return 0
  end
  local now = now_ms()
  local run = next_run(u)
  if run then
    redis.call('ZADD', LEASES, now + LEASE_MS, u)
    runs[1] = {u, token, run[1], run[2], run[3], run[4]}
    return 1
  end
  drop(u)
  grants = n
  sweep(now, runs)
  return 0
end
`;

/** Each lease script's own Lua runs after the library, its BASE being its ARGV. */
const lease = (script: string) => `local BASE = ARGV\n${LIBRARY}\n${script}`;

/**
 * ARGV[6] = most entries wanted, ARGV[7] = most entries pending under this consumer, ARGV[8] =
 * most users to take, then the streams.
 */
const READ_SCRIPT = lease(`
local want, cap = tonumber(ARGV[6]), tonumber(ARGV[7])
grants = tonumber(ARGV[8])
local streams = {}
for i = 9, #ARGV do streams[#streams + 1] = ARGV[i] end
local mine = 0
for _, s in ipairs(streams) do
  local sum = redis.pcall('XPENDING', s, GROUP)
  if sum.err then return redis.error_reply('NOGROUP ' .. s .. ': ' .. sum.err) end
  if sum[4] then
    for _, c in ipairs(sum[4]) do if c[1] == ME then mine = mine + tonumber(c[2]) end end
  end
end
local n = math.min(want, cap - mine)
local last, cands = {}, {}
for i, s in ipairs(streams) do
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    local name, at
    for j = 1, #g - 1, 2 do
      if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then at = g[j + 1] end
    end
    if name == GROUP then last[i] = at end
  end
  if not last[i] then return redis.error_reply('NOGROUP no group ' .. GROUP .. ' on ' .. s) end
  if n > 0 then
    for _, e in ipairs(redis.call('XRANGE', s, '(' .. last[i], '+', 'COUNT', n)) do
      cands[#cands + 1] = {sortkey(e[1]), i, e[1]}
    end
  end
end
table.sort(cands, function(a, b) return a[1] < b[1] end)
local taken = math.max(0, math.min(n, #cands))
local per = {}
for k = 1, taken do per[cands[k][2]] = (per[cands[k][2]] or 0) + 1 end
local fields = {}
for i, count in pairs(per) do
  local reply = redis.call('XREADGROUP', 'GROUP', GROUP, ME, 'COUNT', count, 'STREAMS', streams[i], '>')
  for _, e in ipairs(reply[1][2]) do
    fields[streams[i] .. ' ' .. e[1]] = e[2]
    last[i] = e[1]
  end
end
local now = now_ms()
local nobody, runs = {}, {}
for k = 1, taken do
  local s, id = streams[cands[k][2]], cands[k][3]
  admit(s, id, fields[s .. ' ' .. id], now, nobody, runs)
end
sweep(now, runs)
return {nobody, runs, last, n < want and 1 or 0, taken}`);

/** ARGV[6] = most users to take, then stream, entry id pairs pending under this consumer. */
const ADOPT_SCRIPT = lease(`
local now = now_ms()
local nobody, runs = {}, {}
grants = tonumber(ARGV[6])
for i = 7, #ARGV - 1, 2 do
  local e = redis.call('XRANGE', ARGV[i], ARGV[i + 1], ARGV[i + 1])[1]
  admit(ARGV[i], ARGV[i + 1], e and e[2] or false, now, nobody, runs)
end
return {nobody, runs}`);

/** ARGV[6] = most leases to take. */
const SWEEP_SCRIPT = lease(`
local runs = {}
grants = tonumber(ARGV[6])
sweep(now_ms(), runs)
return runs`);

/** The arguments of {@linkcode HAND_ON}, after the base: user, token, stream, entry id, give up, users. */
const HAND_ON_ARGS = 6;

/** Runs `hand_on` with the 6 arguments from `at` on in `args`: answers {kept, runs}. */
const HAND_ON = `
local function hand_on_from(args, at)
  local runs = {}
  local kept = hand_on(args[at], args[at + 1], args[at + 2], args[at + 3], args[at + 4] == '1',
    tonumber(args[at + 5]), runs)
  return {kept, runs}
end
`;

/** ARGV[6..11] = the hand-on's arguments (user, token, ended entry's stream and id, give up, users). */
const ADVANCE_SCRIPT = lease(`${HAND_ON}
if redis.call('HGET', lkey(ARGV[6]), 'token') ~= ARGV[7] then
  return redis.error_reply('FENCED ' .. ARGV[6])
end
return hand_on_from(ARGV, 6)`);

/** ARGV[6] = user, token: gives the lease up (the next sweep of any replica takes it). */
const RELEASE_SCRIPT = lease(`
if redis.call('HGET', lkey(ARGV[6]), 'token') ~= ARGV[7] then return 0 end
release(ARGV[6])
return 1`);

/** ARGV[6..] = user, token pairs. Answers the users whose token changed (lost). */
const REFRESH_SCRIPT = lease(`
local now = now_ms()
local lost = {}
for i = 6, #ARGV - 1, 2 do
  if redis.call('HGET', lkey(ARGV[i]), 'token') == ARGV[i + 1] then
    redis.call('ZADD', LEASES, now + LEASE_MS, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost`);

/**
 * Lua put before a script to fence it: KEYS[1] is a lease's key and ARGV[1] its token; they are
 * taken off, so the script proper sees its own KEYS and ARGV as if called alone.
 */
const FENCE_PRELUDE = `
local fence_key, fence_token = table.remove(KEYS, 1), table.remove(ARGV, 1)
if redis.call('HGET', fence_key, 'token') ~= fence_token then
  return redis.error_reply('FENCED ' .. fence_key)
end
`;

/**
 * `script` run only while the lease named by its first key and first argument still has that
 * token; otherwise it fails with a `FENCED` error (see {@linkcode isFenced}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const fenced = fencedScript("return redis.call('INCR', KEYS[1])");
 * assert.ok(fenced.includes("FENCED"));
 * // EVAL fenced 2 <lease key> <counter> <token>
 * ```
 */
export function fencedScript(script: string): string {
  return FENCE_PRELUDE + script;
}

/** Lua put before a handing-on script: the base and hand-on arguments taken off ARGV's end. */
const HANDING_ON_PRELUDE = `
local BASE = {}
for i = ${5 + HAND_ON_ARGS}, 1, -1 do BASE[i] = table.remove(ARGV) end
${LIBRARY}
${HAND_ON}`;

/**
 * `script` fenced as by {@linkcode fencedScript}, then, in the same atomic step, the hand-on of
 * the user whose job it ends ({@linkcode UserLeases.handOn}): the ended entry leaves the user's
 * queue, and the user's next job, or free users when there is none, is taken. Called with the
 * fence's key before the script's KEYS, the token before its ARGV and the hand-on's arguments
 * ({@linkcode HandOn.args}) after them; answers `{script's answer, kept, runs}` for
 * {@linkcode HandOn.done}. The script must answer something other than nil.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const ending = handingOnScript("return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])");
 * assert.ok(ending.includes("FENCED") && ending.includes("hand_on"));
 * ```
 */
export function handingOnScript(script: string): string {
  return `${HANDING_ON_PRELUDE}${FENCE_PRELUDE}
local function written()
${script}
end
local answer = written()
if type(answer) == 'table' and answer.err then return answer end
local handed = hand_on_from(BASE, 6)
return {answer, handed[1], handed[2]}`;
}

/** True for the error of a fenced script whose token no longer holds. */
export function isFenced(error: unknown): boolean {
  return error instanceof Error && error.message.startsWith("FENCED");
}

/** What a fenced script needs: the lease's key (first KEY) and token (first ARGV). */
export interface Fence {
  /** The lease's Redis key. */
  key: string;
  /** The fencing token the writer holds. */
  token: string;
  /** The user, for errors. */
  userId: string;
  /** The user's hand-on, run by the script that ends the job ({@linkcode handingOnScript}). */
  handOn?: HandOn;
}

/** A user's hand-on, run in the same script as the write that ends the user's job. */
export interface HandOn {
  /** The hand-on's arguments, put after the script's own (read when the script is sent). */
  args(): string[];
  /** Takes the script's hand-on answer (`[kept, runs]`). */
  done(answer: unknown): void;
}

/** A lease this replica holds on one user. */
export class Lease {
  /** The user (as the entry's envelope names it). */
  readonly userId: string;
  /** The fencing token. */
  readonly token: string;
  /** Local time (ms, the leases' clock) until which the lease is surely alive. */
  deadline: number;
  /** Set once another replica took the user over (or the lease was given up). */
  lost = false;

  /** A lease of `userId` with `token`, alive until `deadline`. */
  constructor(userId: string, token: string, deadline: number) {
    this.userId = userId;
    this.token = token;
    this.deadline = deadline;
  }
}

/** An entry with its fields (`null`: it was deleted from its stream). */
export interface LeasedEntry {
  /** Its stream. */
  stream: string;
  /** Its entry id. */
  entryId: string;
  /** Its fields, or `null` when the entry is gone. */
  fields: string[] | null;
}

/** The next job of a user whose lease this replica holds: run it, then {@linkcode UserLeases.advance}. */
export interface LeasedRun extends LeasedEntry {
  /** The user's lease. */
  lease: Lease;
  /** The entry may have run before (handed out earlier, or taken back after a crash). */
  redelivered: boolean;
}

/** What {@linkcode UserLeases.read} delivered. */
export interface ReadResult {
  /** Entries of nobody (no user): they run with no lease. */
  nobody: LeasedEntry[];
  /** Users granted to this replica, each with its next job. */
  runs: LeasedRun[];
  /** Per stream (in the order given), the group's last delivered id after the read. */
  lastIds: string[];
  /** Fewer entries were read than asked because this consumer has too many pending. */
  capped: boolean;
  /** Entries delivered by this read. */
  read: number;
}

/** Options of {@linkcode UserLeases}. */
export interface UserLeasesOptions {
  /** Connection for the scripts. */
  redis: Redis;
  /** This replica's consumer name. */
  consumer: string;
  /** How long a lease lives unless refreshed (ms). */
  leaseMs: number;
  /** The job streams (default: the five). */
  streams?: readonly string[];
  /** The consumer group (default `llm-worker-group`). */
  group?: string;
  /** Prefix of the keys (default `llm-worker:`). */
  prefix?: string;
  /** This process's id among runs of the same consumer name (default: a random UUID). */
  instance?: string;
  /** A monotonic clock in ms (default `performance.now`); a pause of the process counts. */
  clock?: () => number;
}

type RawRun = [string, string, string, string, string[] | false, number];
type RawEntry = [string, string, string[] | false];

/**
 * The lease protocol of one replica (see the module doc): it reads entries, holds users, runs
 * their jobs in order and hands each user on.
 *
 * @example
 * ```ts ignore
 * const leases = new UserLeases({ redis, consumer: "worker-1", leaseMs: 30_000 });
 * const { runs } = await leases.read(32, 128);
 * for (const run of runs) {
 *   // ... run the job, every Redis write fenced by leases.fence(run.lease); the write that
 *   // acknowledges it hands the user on (fence.handOn = leases.handOn(run.lease, run, ...)),
 *   // or, alone: the user's next job first, else free users taken instead
 *   const next = await leases.advance(run.lease, run, { users: 1 });
 * }
 * ```
 */
export class UserLeases {
  readonly #redis: Redis;
  readonly #consumer: string;
  readonly #leaseMs: number;
  readonly #streams: readonly string[];
  readonly #prefix: string;
  readonly #clock: () => number;
  readonly #base: string[];
  readonly #held = new Map<string, Lease>();

  /** Creates the protocol's client; nothing is sent until a method is called. */
  constructor(options: UserLeasesOptions) {
    this.#redis = options.redis;
    this.#consumer = options.consumer;
    this.#leaseMs = options.leaseMs;
    this.#streams = options.streams ?? JOB_STREAMS;
    this.#prefix = options.prefix ?? LEASE_PREFIX;
    this.#clock = options.clock ?? (() => performance.now());
    this.#base = [
      this.#prefix,
      options.group ?? GROUP,
      options.consumer,
      options.instance ?? crypto.randomUUID(),
      String(options.leaseMs),
    ];
  }

  /** The lease time (ms). */
  get leaseMs(): number {
    return this.#leaseMs;
  }

  /** Leases held now. */
  get held(): number {
    return this.#held.size;
  }

  /** The Redis key of a user's lease. */
  leaseKey(userId: string): string {
    return `${this.#prefix}user:${userId}:lease`;
  }

  /** The Redis key of a user's queue. */
  queueKey(userId: string): string {
    return `${this.#prefix}user:${userId}:queue`;
  }

  /** The fence of a lease, for {@linkcode fencedScript}s. */
  fence(lease: Lease): Fence {
    return { key: this.leaseKey(lease.userId), token: lease.token, userId: lease.userId };
  }

  /**
   * Delivers up to `count` new entries to this consumer, the oldest across the streams, unless
   * that would leave more than `cap` entries pending under it (entries it read for users other
   * replicas hold stay pending under it until those replicas take them). Takes at most `users`
   * free users (those of the entries read, then any left free); the others wait, free, for a
   * replica with room.
   */
  async read(count: number, cap: number, users = count): Promise<ReadResult> {
    const sent = this.#clock();
    const [nobody, runs, lastIds, capped, read] = await this.#eval(
      READ_SCRIPT,
      String(count),
      String(cap),
      String(Math.max(0, users)),
      ...this.#streams,
    ) as [RawEntry[], RawRun[], string[], number, number];
    return {
      nobody: nobody.map(toEntry),
      runs: runs.map((raw) => this.#run(raw, sent)),
      lastIds,
      capped: capped === 1,
      read,
    };
  }

  /**
   * Puts entries already pending under this consumer (its own after a restart, or claimed from a
   * stalled consumer) in their users' queues and takes the users that are free.
   */
  async adopt(
    entries: readonly { stream: string; entryId: string }[],
    users = entries.length,
  ): Promise<{ nobody: LeasedEntry[]; runs: LeasedRun[] }> {
    if (entries.length === 0) return { nobody: [], runs: [] };
    const sent = this.#clock();
    const [nobody, runs] = await this.#eval(
      ADOPT_SCRIPT,
      String(Math.max(0, users)),
      ...entries.flatMap((e) => [e.stream, e.entryId]),
    ) as [RawEntry[], RawRun[]];
    return {
      nobody: nobody.map(toEntry),
      runs: runs.map((raw) => ({ ...this.#run(raw, sent), redelivered: true })),
    };
  }

  /** Takes up to `max` free users (expired leases, users left for a replica with room). */
  async sweep(max = 100): Promise<LeasedRun[]> {
    if (max <= 0) return [];
    const sent = this.#clock();
    const runs = await this.#eval(SWEEP_SCRIPT, String(max)) as RawRun[];
    return runs.map((raw) => this.#run(raw, sent));
  }

  /**
   * Ends `done` (the job just acknowledged) in its user's queue and hands the user on: the
   * user's next job keeps the lease (it comes first in the answer); with none left, or with
   * `giveUp`, the lease goes and up to `users` free users are taken instead.
   *
   * @throws {LeaseLostError} when another replica holds the user now.
   */
  async advance(
    lease: Lease,
    done: { stream: string; entryId: string },
    { giveUp = false, users = 0 }: { giveUp?: boolean; users?: number } = {},
  ): Promise<LeasedRun[]> {
    const sent = this.#clock();
    let answer: unknown;
    try {
      answer = await this.#eval(
        ADVANCE_SCRIPT,
        ...this.#handOnArgs(lease, done, giveUp, users),
      );
    } catch (error) {
      if (!isFenced(error)) throw error;
      this.#lose(lease);
      throw new LeaseLostError(lease.userId);
    }
    return this.#handedOn(lease, answer, sent);
  }

  /**
   * The hand-on of `lease`'s user after `done`, for the script that ends that job
   * ({@linkcode handingOnScript}, through {@linkcode Fence.handOn}): what
   * {@linkcode UserLeases.advance} does, in the same step as the job's last write. `took` gets
   * the runs handed to this replica.
   */
  handOn(
    lease: Lease,
    done: { stream: string; entryId: string },
    options: { giveUp(): boolean; users(): number; took(runs: LeasedRun[]): void },
  ): HandOn {
    let sent = 0;
    return {
      args: () => {
        sent = this.#clock();
        return [
          ...this.#base,
          ...this.#handOnArgs(lease, done, options.giveUp(), options.users()),
        ];
      },
      done: (answer) => options.took(this.#handedOn(lease, answer, sent)),
    };
  }

  /** Gives a lease up at once (other replicas take the user at their next sweep). */
  async release(lease: Lease): Promise<void> {
    this.#forget(lease);
    lease.lost = true;
    await this.#eval(RELEASE_SCRIPT, lease.userId, lease.token);
  }

  /** Gives up every lease held (a replica that stops). */
  async releaseAll(): Promise<void> {
    await Promise.all([...this.#held.values()].map((lease) => this.release(lease)));
  }

  /** Refreshes every lease held; returns those found lost (another replica holds the user). */
  async refresh(): Promise<Lease[]> {
    const leases = [...this.#held.values()].filter((lease) => !lease.lost);
    if (leases.length === 0) return [];
    const sent = this.#clock();
    const lost = new Set(
      await this.#eval(REFRESH_SCRIPT, ...leases.flatMap((l) => [l.userId, l.token])) as string[],
    );
    const gone: Lease[] = [];
    for (const lease of leases) {
      if (lost.has(lease.userId)) {
        this.#lose(lease);
        gone.push(lease);
      } else {
        lease.deadline = Math.max(lease.deadline, sent + this.#leaseMs);
      }
    }
    return gone;
  }

  /**
   * Resolves while `lease` is held: at once while it is surely alive, after asking Redis once
   * its local deadline passed (a pause or a slow refresh).
   *
   * @throws {LeaseLostError} when another replica holds the user now.
   */
  async check(lease: Lease): Promise<void> {
    if (lease.lost) throw new LeaseLostError(lease.userId);
    if (this.#clock() < lease.deadline) return;
    const sent = this.#clock();
    const lost = await this.#eval(REFRESH_SCRIPT, lease.userId, lease.token) as string[];
    if (lost.length > 0) {
      this.#lose(lease);
      throw new LeaseLostError(lease.userId);
    }
    lease.deadline = Math.max(lease.deadline, sent + this.#leaseMs);
  }

  #handOnArgs(
    lease: Lease,
    done: { stream: string; entryId: string },
    giveUp: boolean,
    users: number,
  ): string[] {
    return [
      lease.userId,
      lease.token,
      done.stream,
      done.entryId,
      giveUp ? "1" : "0",
      String(Math.max(0, users)),
    ];
  }

  /** The runs of a hand-on's answer: the user's next (same lease) first, or the users taken. */
  #handedOn(lease: Lease, answer: unknown, sent: number): LeasedRun[] {
    const [kept, raws] = answer as [number, RawRun[]];
    if (kept !== 1) {
      this.#forget(lease);
      return raws.map((raw) => this.#run(raw, sent));
    }
    lease.deadline = Math.max(lease.deadline, sent + this.#leaseMs);
    const [[, , stream, entryId, fields, started], ...taken] = raws;
    return [
      { lease, stream, entryId, fields: fields || null, redelivered: started === 1 },
      ...taken.map((raw) => this.#run(raw, sent)),
    ];
  }

  #run(raw: RawRun, sent: number): LeasedRun {
    const [userId, token, stream, entryId, fields, started] = raw;
    const previous = this.#held.get(userId);
    if (previous && previous.token !== token) previous.lost = true;
    const lease = new Lease(userId, token, sent + this.#leaseMs);
    this.#held.set(userId, lease);
    return { lease, stream, entryId, fields: fields || null, redelivered: started === 1 };
  }

  #lose(lease: Lease): void {
    lease.lost = true;
    this.#forget(lease);
  }

  #forget(lease: Lease): void {
    if (this.#held.get(lease.userId) === lease) this.#held.delete(lease.userId);
  }

  async #eval(script: string, ...args: string[]): Promise<unknown> {
    return await runScript(this.#redis, script, 0, ...this.#base, ...args);
  }
}

function toEntry([stream, entryId, fields]: RawEntry): LeasedEntry {
  return { stream, entryId, fields: fields || null };
}
