/**
 * Real worker processes, started exactly as `deno task start` starts one (same permissions, same
 * entry point), for the fault-injection suite and the benchmark.
 *
 * The process runs in an empty temporary folder (so no `.env` of the repository or of the
 * operator leaks in) with a cleared environment: only the settings given, plus what Deno itself
 * needs (`PATH`, `HOME`, `DENO_DIR`, ...).
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { readProc } from "./machine.ts";

/** The repository's root folder. */
export const REPO_ROOT: string = fileURLToPath(new URL("../", import.meta.url));

/**
 * The flags of the `start` task of deno.json (`deno run <flags> main.ts`): its permissions and
 * its V8 heap settings. Read from deno.json, so that the workers the tests and the bench start
 * run exactly what an operator's `deno task start` runs.
 */
export const START_FLAGS: readonly string[] = startTaskFlags(
  JSON.parse(Deno.readTextFileSync(`${REPO_ROOT}deno.json`)).tasks.start,
);

/**
 * The flags between `deno run` and `main.ts` in a start task's command.
 *
 * @example
 * ```ts
 * startTaskFlags("deno run --allow-net main.ts"); // ["--allow-net"]
 * ```
 */
function startTaskFlags(task: string): string[] {
  const words = task.trim().split(/\s+/);
  if (words[0] !== "deno" || words[1] !== "run" || words.at(-1) !== "main.ts") {
    throw new Error(`The start task should read "deno run <flags> main.ts", not "${task}".`);
  }
  return words.slice(2, -1);
}

/** The start flags with their `--v8-flags` replaced by `v8Flags` (left out when it is empty). */
function withV8Flags(flags: readonly string[], v8Flags: string): string[] {
  const others = flags.filter((flag) => !flag.startsWith("--v8-flags="));
  return v8Flags ? [`--v8-flags=${v8Flags}`, ...others] : others;
}

/**
 * Variables passed through from this process: so that Deno finds its cache, and the runtime's
 * tuning knobs (V8 flags, glibc malloc), so that a run can be measured with them.
 */
const PASS_THROUGH = ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR", "NO_COLOR"];
const PASS_THROUGH_PREFIXES = ["DENO_V8_FLAGS", "MALLOC_", "GLIBC_TUNABLES"];

/** A running worker process. */
export interface WorkerProcess {
  /** Its consumer name (`WORKER_CONSUMER_NAME`). */
  name: string;
  /** Its process id. */
  pid: number;
  /** The child process. */
  child: Deno.ChildProcess;
  /** What it wrote to stderr and stdout (logs): the latest 2 to 4 million characters. */
  output(): string;
  /** Sends `signal` and waits for the exit; resolves with the exit status. */
  kill(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
  /** Its current and peak resident memory in bytes (`VmRSS`, `VmHWM` of /proc); 0 when gone. */
  memory(): Promise<{ rss: number; peak: number }>;
}

/**
 * Starts `main.ts` with `env` as its settings.
 *
 * @example
 * ```ts
 * const worker = startWorkerProcess({ REDIS_URL: redis.url, WORKER_CONSUMER_NAME: "a" });
 * await worker.kill("SIGKILL");
 * ```
 */
export function startWorkerProcess(
  env: Record<string, string>,
  options: {
    cwd?: string;
    /** More flags for `deno run` (e.g. `--cpu-prof`). */
    extraArgs?: string[];
    /** V8 flags in place of the start task's (`""`: none, V8's own heap sizing). */
    v8Flags?: string;
  } = {},
): WorkerProcess {
  const name = env.WORKER_CONSUMER_NAME ?? `worker-${crypto.randomUUID().slice(0, 8)}`;
  const passed: Record<string, string> = {};
  for (const [key, value] of Object.entries(Deno.env.toObject())) {
    if (PASS_THROUGH.includes(key) || PASS_THROUGH_PREFIXES.some((p) => key.startsWith(p))) {
      passed[key] = value;
    }
  }
  const tempCwd = options.cwd ? undefined : Deno.makeTempDirSync({ prefix: "llm-worker-cwd-" });
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...(options.v8Flags === undefined ? START_FLAGS : withV8Flags(START_FLAGS, options.v8Flags)),
      "--config",
      `${REPO_ROOT}deno.json`,
      ...(options.extraArgs ?? []),
      `${REPO_ROOT}main.ts`,
    ],
    cwd: options.cwd ?? tempCwd,
    clearEnv: true,
    env: {
      ...passed,
      WORKER_HTTP_PORT: "0",
      LOG_LEVEL: "warning",
      ...env,
      WORKER_CONSUMER_NAME: name,
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  const decoder = new TextDecoder();
  const collect = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) {
      output += decoder.decode(chunk, { stream: true });
      if (output.length > 4_000_000) output = output.slice(-2_000_000); // keep the latest
    }
  };
  const collected = Promise.all([collect(child.stdout), collect(child.stderr)]);
  let ended: Promise<Deno.CommandStatus> | undefined;
  const status = async () => {
    const result = await child.status;
    await collected;
    if (tempCwd) await Deno.remove(tempCwd, { recursive: true }).catch(() => {});
    return result;
  };
  return {
    name,
    pid: child.pid,
    child,
    output: () => output,
    kill: (signal: Deno.Signal = "SIGTERM") => {
      try {
        child.kill(signal);
      } catch {
        // already gone
      }
      ended ??= status();
      return ended;
    },
    memory: () => processMemory(child.pid),
  };
}

/**
 * The current and peak resident memory of a process in bytes (`VmRSS`, `VmHWM`); zeros when it
 * is gone.
 */
export async function processMemory(pid: number): Promise<{ rss: number; peak: number }> {
  const text = await readProc(`/proc/${pid}/status`);
  const kb = (field: string) =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? 0) * 1024;
  return { rss: kb("VmRSS"), peak: kb("VmHWM") };
}
