/**
 * What the benchmark ran on, and how fast that machine was while it ran: the figures of two runs
 * compare only when the machine was as fast in both, and these shared 2-core machines drift by 2x
 * within hours.
 *
 * @module
 */

/**
 * `value` rounded to `digits` decimals (one by default), as a number for the results.
 *
 * @example
 * ```ts
 * round(2.345, 2); // 2.35
 * ```
 */
export function round(value: number, digits = 1): number {
  return Number(value.toFixed(digits));
}

/** The machine a run was made on. */
export interface MachineInfo {
  /** CPU model name from `/proc/cpuinfo`. */
  cpu: string;
  /** Logical cores. */
  cores: number;
  /** Total memory, GB. */
  memoryGb: number;
  /** OS and kernel release. */
  os: string;
  /** Deno version. */
  deno: string;
  /** `redis-server` version. */
  redis: string;
}

/**
 * The text of a `/proc` file, or `""` when it cannot be read (a process that is gone). Read with
 * `cat`: Deno lets a script read `/proc` only with `--allow-all`.
 *
 * @example
 * ```ts
 * const status = await readProc(`/proc/${Deno.pid}/status`);
 * ```
 */
export async function readProc(path: string): Promise<string> {
  return await new Deno.Command("cat", { args: [path], stdout: "piped", stderr: "null" })
    .output().then((o) => new TextDecoder().decode(o.stdout)).catch(() => "");
}

/**
 * CPU time (user and system, all its threads) a process has used, in ms, from `/proc/<pid>/stat`;
 * `NaN` when the process is gone.
 *
 * @example
 * ```ts
 * const before = await processCpuMs(Deno.pid);
 * // ... some work ...
 * console.log(`used ${(await processCpuMs(Deno.pid)) - before} ms of CPU`);
 * ```
 */
export async function processCpuMs(pid: number): Promise<number> {
  const fields = (await readProc(`/proc/${pid}/stat`)).split(") ")[1]?.split(" ") ?? [];
  return (Number(fields[11]) + Number(fields[12])) * 10; // clock ticks of 10 ms
}

/**
 * Describes this machine.
 *
 * @example
 * ```ts
 * const info = await machineInfo();
 * console.log(`${info.cpu}, ${info.cores} cores`);
 * ```
 */
export async function machineInfo(): Promise<MachineInfo> {
  const cpuinfo = await readProc("/proc/cpuinfo");
  const redisVersion = await new Deno.Command("redis-server", { args: ["--version"] }).output()
    .then((o) => /v=(\S+)/.exec(new TextDecoder().decode(o.stdout))?.[1] ?? "?")
    .catch(() => "?");
  return {
    cpu: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? "unknown",
    cores: navigator.hardwareConcurrency,
    memoryGb: round(Deno.systemMemoryInfo().total / 1024 ** 3, 1),
    os: `${Deno.build.os} ${Deno.osRelease()}`,
    deno: Deno.version.deno,
    redis: redisVersion,
  };
}

/** A chat request of the size the worker sends, built and read back by the probe. */
const PROBE_REQUEST = {
  model: "mistral",
  temperature: 0,
  messages: [
    { role: "system", content: "Classify the message. ".repeat(40) },
    { role: "user", content: "remind me to call the plumber tomorrow at 9am ".repeat(8) },
  ],
  response_format: { type: "json_schema", json_schema: { name: "intent", strict: true } },
};

/**
 * The machine's speed for one thread of JavaScript: the milliseconds a fixed piece of the kind of
 * work the worker does (JSON in and out, strings, small objects, bytes) takes, best of `rounds`.
 * Lower is faster; the figure means something only beside another made on the same kind of
 * machine, as a measure of how fast it was at the time.
 *
 * @example
 * ```ts
 * const ms = speedProbe();
 * console.log(`speed probe: ${ms.toFixed(0)} ms`);
 * ```
 */
export function speedProbe(rounds = 5): number {
  const encoder = new TextEncoder();
  let best = Infinity;
  let sink = 0;
  for (let pass = 0; pass < rounds; pass++) {
    const began = performance.now();
    for (let i = 0; i < 8000; i++) {
      const body = JSON.stringify({ ...PROBE_REQUEST, user: `J${i}` });
      const back = JSON.parse(body) as typeof PROBE_REQUEST;
      const counts = new Map<string, number>();
      for (const word of back.messages[1].content.split(" ")) {
        counts.set(word, (counts.get(word) ?? 0) + 1);
      }
      sink += encoder.encode(body).length + counts.size;
    }
    best = Math.min(best, performance.now() - began);
  }
  if (sink === 0) throw new Error("speed probe: nothing was computed");
  return best;
}

/** The CPU time counters of `/proc/stat`'s `cpu` line, in clock ticks. */
export interface CpuTimes {
  /** All ticks (user, nice, system, idle, iowait, irq, softirq, steal). */
  total: number;
  /** Ticks the hypervisor gave to other guests while this one wanted to run. */
  steal: number;
  /** Ticks spent idle (idle and iowait). */
  idle: number;
}

/**
 * Reads the machine's CPU time counters; `undefined` where `/proc/stat` cannot be read.
 *
 * @example
 * ```ts
 * const before = await cpuTimes();
 * // ... the run ...
 * const after = await cpuTimes();
 * if (before && after) console.log(cpuShares(before, after));
 * ```
 */
export async function cpuTimes(): Promise<CpuTimes | undefined> {
  const line = /^cpu\s+(.+)$/m.exec(await readProc("/proc/stat"))?.[1];
  if (!line) return undefined;
  const [user, nice, system, idle, iowait, irq, softirq, steal] = line.trim().split(/\s+/)
    .map(Number);
  if ([user, nice, system, idle, iowait, irq, softirq, steal].some((n) => !Number.isFinite(n))) {
    return undefined;
  }
  return {
    total: user + nice + system + idle + iowait + irq + softirq + steal,
    steal,
    idle: idle + iowait,
  };
}

/**
 * The share of the machine's CPU time between two readings that went to other guests (steal)
 * and that was left idle, each from 0 to 1.
 *
 * @example
 * ```ts
 * cpuShares({ total: 1000, steal: 10, idle: 400 }, { total: 1200, steal: 30, idle: 450 });
 * // { steal: 0.1, idle: 0.25 }
 * ```
 */
export function cpuShares(before: CpuTimes, after: CpuTimes): { steal: number; idle: number } {
  const total = after.total - before.total;
  if (total <= 0) return { steal: 0, idle: 0 };
  return {
    steal: (after.steal - before.steal) / total,
    idle: (after.idle - before.idle) / total,
  };
}

/** How fast the machine was over a run: the probe at either end, and where the CPU time went. */
export interface RunSpeed {
  /** {@linkcode speedProbe} before the run, ms. */
  probeMsAtStart: number;
  /** {@linkcode speedProbe} after the run, ms. */
  probeMsAtEnd: number;
  /** Share of the machine's CPU time stolen by other guests over the run (0 to 1). */
  stealShare?: number;
  /** Share of the machine's CPU time left idle over the run (0 to 1). */
  idleShare?: number;
}

/**
 * Starts gauging the machine's speed over a run: probes it now, and again on `finish`.
 *
 * @example
 * ```ts
 * const gauge = await startSpeedGauge();
 * // ... the run ...
 * console.log(describeSpeed(await gauge.finish()));
 * ```
 */
export async function startSpeedGauge(): Promise<{ finish(): Promise<RunSpeed> }> {
  const probeMsAtStart = speedProbe();
  const before = await cpuTimes();
  return {
    async finish() {
      const probeMsAtEnd = speedProbe();
      const after = await cpuTimes();
      const shares = before && after ? cpuShares(before, after) : undefined;
      return {
        probeMsAtStart: round(probeMsAtStart, 1),
        probeMsAtEnd: round(probeMsAtEnd, 1),
        stealShare: shares && round(shares.steal, 3),
        idleShare: shares && round(shares.idle, 3),
      };
    },
  };
}

/**
 * A run's speed in one line, for the bench's header.
 *
 * @example
 * ```ts
 * describeSpeed({ probeMsAtStart: 90, probeMsAtEnd: 91 });
 * // "Speed probe 90 ms at the start, 91 ms at the end (one thread's fixed JSON and string work; …)"
 * ```
 */
export function describeSpeed(speed: RunSpeed): string {
  const probe = `Speed probe ${speed.probeMsAtStart} ms at the start, ${speed.probeMsAtEnd} ms ` +
    "at the end (one thread's fixed JSON and string work; lower is faster)";
  if (speed.stealShare === undefined || speed.idleShare === undefined) return probe;
  return `${probe}; over the run, CPU stolen by other guests ${
    (speed.stealShare * 100).toFixed(1)
  }%, idle ${(speed.idleShare * 100).toFixed(0)}%`;
}
