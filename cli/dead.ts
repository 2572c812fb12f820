/**
 * `deno task dead list | show ID | requeue ID…|--all | drop ID…|--all [--yes]`: the operator's
 * tool for `llm:dead`, the malformed entries the worker kept (docs/protocol.md section 1).
 *
 * - `list [--limit N]`: the dead letters, oldest first: id, age, stream, job id, reason.
 * - `show ID`: one dead letter with its original fields (`data` pretty-printed when JSON).
 * - `requeue ID…` / `requeue --all`: publishes each entry's original fields to its original
 *   stream and deletes it from `llm:dead`, one atomic step per entry.
 * - `drop ID…` / `drop --all`: deletes them.
 *
 * `--all` lists what it will touch and asks for `y` on standard input unless `--yes` is given;
 * it touches only the entries it listed. Exit codes: 0 done, 1 an entry was not there or could
 * not be re-queued, or Redis is unreachable, 2 bad usage. Reads `REDIS_URL` as the worker does.
 *
 * @module
 */
import { Redis } from "ioredis";
import { readEnvironment, redactUrl } from "../lib/config.ts";
import {
  type DeadLetter,
  DeadLetterError,
  deadLetters,
  dropDeadLetters,
  formatAge,
  getDeadLetter,
  requeueDeadLetter,
} from "../lib/dead_letters.ts";
import { describeError } from "../lib/log.ts";
import { closeRedis } from "../lib/redis.ts";
import { DEAD_STREAM } from "../lib/streams.ts";

/** Where {@linkcode dead} reads and writes; the defaults are the process's. */
export interface DeadIO {
  /** Environment (`REDIS_URL`); default `.env` under the real environment. */
  env: Record<string, string>;
  /** Prints one line of output. */
  out: (line: string) => void;
  /** Prints one line of error. */
  err: (line: string) => void;
  /** Asks a question; resolves with the line typed, or `null` at the end of the input. */
  ask: (question: string) => Promise<string | null>;
  /** The clock in ms, for ages (default `Date.now`). */
  now: () => number;
}

const USAGE = `Usage: deno task dead <command>
  list [--limit N]              dead letters, oldest first: id, age, stream, job, reason
  show ID                       one dead letter and its original fields
  requeue ID… | --all [--yes]   publish each one's original fields to its original stream
                                again and delete it (one atomic step each)
  drop ID… | --all [--yes]      delete them
--all asks for confirmation on standard input unless --yes is given.
Environment: REDIS_URL (as the worker reads it).`;

/** Bad usage: printed with the usage hint, exit code 2. */
class UsageError extends Error {}

interface Command {
  name: "list" | "show" | "requeue" | "drop";
  ids: string[];
  all: boolean;
  yes: boolean;
  limit: number;
}

function parseArguments(args: string[]): Command | "help" {
  if (args.length === 0 || args.includes("--help") || args.includes("-h")) return "help";
  const [name, ...rest] = args;
  if (!["list", "show", "requeue", "drop"].includes(name)) {
    throw new UsageError(`Unknown command ${JSON.stringify(name)}.`);
  }
  const command: Command = {
    name: name as Command["name"],
    ids: [],
    all: false,
    yes: false,
    limit: Infinity,
  };
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i];
    if (arg === "--all") command.all = true;
    else if (arg === "--yes" || arg === "-y") command.yes = true;
    else if (arg === "--limit" || arg.startsWith("--limit=")) {
      const value = arg.includes("=") ? arg.slice(8) : rest[++i];
      if (!/^\d+$/.test(value ?? "") || Number(value) < 1) {
        throw new UsageError("--limit expects a whole number from 1.");
      }
      command.limit = Number(value);
    } else if (arg.startsWith("-")) throw new UsageError(`Unknown option ${arg}.`);
    else command.ids.push(arg);
  }
  const many = command.name === "requeue" || command.name === "drop";
  if (command.all && !many) throw new UsageError(`--all goes with requeue and drop.`);
  if (command.limit !== Infinity && command.name !== "list") {
    throw new UsageError("--limit goes with list.");
  }
  if (command.name === "list" && command.ids.length > 0) {
    throw new UsageError("list takes no id (show ID shows one).");
  }
  if (command.name === "show" && command.ids.length !== 1) {
    throw new UsageError("show takes one id.");
  }
  if (many && command.all === (command.ids.length > 0)) {
    throw new UsageError(`${command.name} takes entry ids or --all.`);
  }
  return command;
}

/** One line per dead letter, in columns. */
function listLines(letters: DeadLetter[], now: number): string[] {
  const rows = letters.map((l) => [
    l.id,
    formatAge(now - l.deadAtMs),
    l.stream || "?",
    l.jobId ?? "-",
    l.reason,
  ]);
  const header = ["ID", "AGE", "STREAM", "JOB", "REASON"];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows].map((row) =>
    row.map((cell, i) => i === row.length - 1 ? cell : cell.padEnd(widths[i])).join("  ")
  );
}

/** A dead letter in full. */
function showLines(letter: DeadLetter, now: number): string[] {
  const lines = [
    `id:      ${letter.id} (dead for ${formatAge(now - letter.deadAtMs)})`,
    `stream:  ${letter.stream || "(none)"}`,
    `entry:   ${letter.originalId || "(none)"}`,
    `reason:  ${letter.reason}`,
    `original fields:`,
  ];
  for (let i = 0; i + 1 < letter.fields.length; i += 2) {
    let value = letter.fields[i + 1];
    try {
      value = JSON.stringify(JSON.parse(value), null, 2);
    } catch {
      // shown as it is
    }
    const [first, ...rest] = value.split("\n");
    lines.push(`  ${letter.fields[i]}: ${first}`, ...rest.map((line) => `  ${line}`));
  }
  return lines;
}

/** Reads one line of standard input (after printing the question), or `null` at its end. */
async function askOnStdin(question: string): Promise<string | null> {
  await Deno.stdout.write(new TextEncoder().encode(question));
  const reader = Deno.stdin.readable.getReader();
  const decoder = new TextDecoder();
  let line = "";
  try {
    while (!line.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) return line || null;
      line += decoder.decode(value, { stream: true });
    }
    return line.slice(0, line.indexOf("\n"));
  } finally {
    reader.releaseLock();
  }
}

/**
 * Runs the tool; resolves with the exit code (0 done, 1 not found or unreachable, 2 bad usage).
 *
 * @example
 * ```ts ignore
 * const code = await dead(["list"], { env: { REDIS_URL: "redis://localhost:6379" } });
 * ```
 */
export async function dead(args: string[], io: Partial<DeadIO> = {}): Promise<number> {
  const env = io.env ?? readEnvironment();
  const out = io.out ?? ((line: string) => console.log(line));
  const err = io.err ?? ((line: string) => console.error(line));
  const ask = io.ask ?? askOnStdin;
  const now = io.now ?? Date.now;
  let command: Command;
  try {
    const parsed = parseArguments(args);
    if (parsed === "help") {
      out(USAGE);
      return args.length === 0 ? 2 : 0;
    }
    command = parsed;
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    err(error.message);
    err("`deno task dead --help` shows the usage.");
    return 2;
  }

  const redisUrl = env.REDIS_URL || "redis://redis:6379";
  const redis = new Redis(redisUrl, {
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    disconnectTimeout: 500,
    protocol: 2,
  });
  let lastError: unknown;
  redis.on("error", (error) => lastError = error);
  try {
    try {
      await connectWithin(redis, 3_000);
    } catch (error) {
      err(
        `Redis at ${redactUrl(redisUrl)} is not reachable (${
          describeError(lastError ?? error)
        }); set REDIS_URL.`,
      );
      return 1;
    }
    return await run(redis, command, { out, err, ask, now });
  } catch (error) {
    if (!(error instanceof DeadLetterError)) throw error;
    err(error.message);
    return 1;
  } finally {
    await closeRedis(redis);
  }
}

/** Connects, or throws after `timeoutMs` (a timer of its own, cleared either way). */
async function connectWithin(redis: Redis, timeoutMs: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([
      redis.connect(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function run(
  redis: Redis,
  command: Command,
  io: Omit<DeadIO, "env">,
): Promise<number> {
  const { out, err } = io;
  if (command.name === "list") {
    const letters: DeadLetter[] = [];
    for await (const letter of deadLetters(redis)) {
      if (letters.length === command.limit) break;
      letters.push(letter);
    }
    if (letters.length === 0) {
      out(`${DEAD_STREAM} is empty.`);
      return 0;
    }
    listLines(letters, io.now()).forEach((line) => out(line));
    const total = await redis.xlen(DEAD_STREAM);
    out(`${total} dead letter${total === 1 ? "" : "s"} in ${DEAD_STREAM}.`);
    return 0;
  }
  if (command.name === "show") {
    const letter = await getDeadLetter(redis, command.ids[0]);
    if (!letter) {
      err(`No dead letter ${command.ids[0]} in ${DEAD_STREAM}.`);
      return 1;
    }
    showLines(letter, io.now()).forEach((line) => out(line));
    return 0;
  }

  let ids = command.ids;
  if (command.all) {
    const letters: DeadLetter[] = [];
    for await (const letter of deadLetters(redis)) letters.push(letter);
    if (letters.length === 0) {
      out(`${DEAD_STREAM} is empty: nothing to ${command.name}.`);
      return 0;
    }
    ids = letters.map((l) => l.id);
    if (!command.yes) {
      listLines(letters, io.now()).forEach((line) => out(line));
      const what = command.name === "requeue"
        ? `Publish these ${ids.length} entries to their streams again and delete them`
        : `Delete these ${ids.length} entries`;
      const answer = await io.ask(`${what} from ${DEAD_STREAM}? [y/N] `);
      if (!/^\s*y(es)?\s*$/i.test(answer ?? "")) {
        out("Nothing changed.");
        return 1;
      }
    }
  }

  if (command.name === "drop") {
    const dropped = await dropDeadLetters(redis, ids);
    out(`Dropped ${dropped} of ${ids.length} dead letter${ids.length === 1 ? "" : "s"}.`);
    if (dropped < ids.length) err(`${ids.length - dropped} were not (or no longer) there.`);
    return dropped === ids.length ? 0 : 1;
  }

  let failed = 0;
  for (const id of ids) {
    try {
      const result = await requeueDeadLetter(redis, id);
      if (result.requeued) out(`Requeued ${id} to ${result.stream} as ${result.newId}.`);
      else {
        err(`No dead letter ${id} in ${DEAD_STREAM} (already requeued or dropped?).`);
        failed++;
      }
    } catch (error) {
      if (!(error instanceof DeadLetterError)) throw error;
      err(error.message);
      failed++;
    }
  }
  return failed === 0 ? 0 : 1;
}

if (import.meta.main) Deno.exit(await dead(Deno.args));
