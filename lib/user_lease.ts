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
 *   the holder takes the next head ({@linkcode UserLeases.advance}); with the queue empty the
 *   lease is dropped. The holder refreshes its leases every third of the lease time.
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
 * The Lua shared by every lease script. ARGV[1..5] = key prefix, group, consumer name, instance
 * id, lease ms; a script's own arguments start at ARGV[6].
 */
const LIBRARY = `
local P, GROUP, ME, INSTANCE = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local LEASE_MS = tonumber(ARGV[5])
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
`;

/**
 * ARGV[6] = most entries wanted, ARGV[7] = most entries pending under this consumer, ARGV[8] =
 * most users to take, then the streams.
 */
const READ_SCRIPT = `${LIBRARY}
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
return {nobody, runs, last, n < want and 1 or 0, taken}`;

/** ARGV[6] = most users to take, then stream, entry id pairs pending under this consumer. */
const ADOPT_SCRIPT = `${LIBRARY}
local now = now_ms()
local nobody, runs = {}, {}
grants = tonumber(ARGV[6])
for i = 7, #ARGV - 1, 2 do
  local e = redis.call('XRANGE', ARGV[i], ARGV[i + 1], ARGV[i + 1])[1]
  admit(ARGV[i], ARGV[i + 1], e and e[2] or false, now, nobody, runs)
end
return {nobody, runs}`;

/** ARGV[6] = most leases to take. */
const SWEEP_SCRIPT = `${LIBRARY}
local runs = {}
grants = tonumber(ARGV[6])
sweep(now_ms(), runs)
return runs`;

/** ARGV[6] = user, token, stream, entry id of the job that ended, '1' to release instead. */
const ADVANCE_SCRIPT = `${LIBRARY}
local u = ARGV[6]
if redis.call('HGET', lkey(u), 'token') ~= ARGV[7] then return redis.error_reply('FENCED ' .. u) end
redis.call('ZREM', qkey(u), member(ARGV[8], ARGV[9]))
if ARGV[10] == '1' then
  release(u)
  return false
end
local run = next_run(u)
if not run then
  drop(u)
  return false
end
redis.call('ZADD', LEASES, now_ms() + LEASE_MS, u)
return run`;

/** ARGV[6] = user, token: gives the lease up (the next sweep of any replica takes it). */
const RELEASE_SCRIPT = `${LIBRARY}
if redis.call('HGET', lkey(ARGV[6]), 'token') ~= ARGV[7] then return 0 end
release(ARGV[6])
return 1`;

/** ARGV[6..] = user, token pairs. Answers the users whose token changed (lost). */
const REFRESH_SCRIPT = `${LIBRARY}
local now = now_ms()
local lost = {}
for i = 6, #ARGV - 1, 2 do
  if redis.call('HGET', lkey(ARGV[i]), 'token') == ARGV[i + 1] then
    redis.call('ZADD', LEASES, now + LEASE_MS, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost`;

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
 *   // ... run the job, every Redis write fenced by leases.fence(run.lease) ...
 *   const next = await leases.advance(run.lease, run);
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
   * Ends `done` (the job just acknowledged) in its user's queue and returns the user's next job,
   * keeping the lease; with none left, or with `release`, the lease is given up and `null`
   * returned.
   *
   * @throws {LeaseLostError} when another replica holds the user now.
   */
  async advance(
    lease: Lease,
    done: { stream: string; entryId: string },
    release = false,
  ): Promise<LeasedRun | null> {
    const sent = this.#clock();
    let raw: [string, string, string[] | false, number] | null;
    try {
      raw = await this.#eval(
        ADVANCE_SCRIPT,
        lease.userId,
        lease.token,
        done.stream,
        done.entryId,
        release ? "1" : "0",
      ) as typeof raw;
    } catch (error) {
      if (!isFenced(error)) throw error;
      this.#lose(lease);
      throw new LeaseLostError(lease.userId);
    }
    if (!raw) {
      this.#forget(lease);
      return null;
    }
    lease.deadline = Math.max(lease.deadline, sent + this.#leaseMs);
    const [stream, entryId, fields, started] = raw;
    return { lease, stream, entryId, fields: fields || null, redelivered: started === 1 };
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
