/**
 * Job mixes for the benchmark and the fault-injection suite: jobs of the five types, each carrying
 * a token (`J<n>`, also its job id) that the fake model repeats, so every effect and notification
 * can be traced back to its job.
 *
 * @module
 */
import type { Redis } from "ioredis";
import type { CoreEmulator } from "./core_emulator.ts";
import type { JobType } from "../lib/job.ts";
import { STREAM_OF } from "../lib/streams.ts";

/** Shares of each job type in a mix (any positive numbers; they are normalised). */
export type JobMix = Readonly<Partial<Record<JobType, number>>>;

/**
 * The default mix: chat messages dominate (intent, follow-ups), then photos, task matches and
 * emails.
 */
export const DEFAULT_MIX: JobMix = {
  intent_classify: 40,
  image_tag: 20,
  followup: 15,
  task_match: 15,
  email_extract: 10,
};

/** One job of a workload. */
export interface WorkloadJob {
  /** `J<n>`: the job id in Core and the mark in every prompt, effect and notification. */
  token: string;
  /** Its type. */
  jobType: JobType;
  /** Its owner. */
  userId: number;
  /** Its payload. */
  payload: Record<string, unknown>;
  /** The memory seeded for it (image_tag, task_match). */
  memoryId?: string;
}

/** Options of {@linkcode makeWorkload}. */
export interface WorkloadOptions {
  /** Jobs in all. */
  count: number;
  /** Users the jobs are spread over (1..users), at random. */
  users: number;
  /** Give job `i` the user `i + 1` instead (every job its own user when `users >= count`). */
  distinctUsers?: boolean;
  /** Seed of the random choices (same seed, same workload). */
  seed?: number;
  /** The mix (default {@linkcode DEFAULT_MIX}). */
  mix?: JobMix;
  /** Image files for `image_tag` jobs, used in turn. */
  images?: readonly string[];
  /** Number of the first token (default 1). */
  firstToken?: number;
}

/** A small, fast pseudo-random generator (mulberry32): numbers in [0, 1). */
export function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Builds a workload (nothing is sent).
 *
 * @example
 * ```ts
 * const jobs = makeWorkload({ count: 100, users: 10, images: ["/data/images/a"] });
 * ```
 */
export function makeWorkload(options: WorkloadOptions): WorkloadJob[] {
  const rand = random(options.seed ?? 42);
  const mix = Object.entries(options.mix ?? DEFAULT_MIX).filter(([, w]) => (w ?? 0) > 0) as Array<
    [JobType, number]
  >;
  const total = mix.reduce((sum, [, w]) => sum + w, 0);
  const images = options.images ?? [];
  const jobs: WorkloadJob[] = [];
  const first = options.firstToken ?? 1;
  let image = 0;
  for (let i = 0; i < options.count; i++) {
    const token = `J${first + i}`;
    const userId = options.distinctUsers
      ? 1 + (i % options.users)
      : 1 + Math.floor(rand() * options.users);
    let pick = rand() * total;
    let jobType = mix[mix.length - 1][0];
    for (const [type, weight] of mix) {
      if ((pick -= weight) < 0) {
        jobType = type;
        break;
      }
    }
    if (jobType === "image_tag" && images.length === 0) jobType = "followup";
    let payload: Record<string, unknown>;
    let memoryId: string | undefined;
    switch (jobType) {
      case "image_tag":
        memoryId = `M${token}`;
        payload = { memory_id: memoryId, image_path: images[image++ % images.length] };
        break;
      case "intent_classify":
        payload = {
          message: `Note ${token}: the boiler service is due next month`,
          memory_id: null,
          original_timestamp: new Date().toISOString(),
        };
        break;
      case "followup":
        payload = { message: `Book something ${token}`, context: "household" };
        break;
      case "task_match":
        memoryId = `M${token}`;
        payload = { memory_id: memoryId, memory_content: `Paid the gas bill ${token}` };
        break;
      case "email_extract":
        payload = {
          subject: `Meeting ${token}`,
          body: `<p>Hello,</p><p>let's meet on 1 March 2099 at 10:00 about ${token}.</p>`,
        };
        break;
    }
    jobs.push({ token, jobType, userId, payload, memoryId });
  }
  return jobs;
}

/**
 * Seeds Core with what the jobs need: the jobs themselves (`queued`, id = token), the memories of
 * image_tag and task_match jobs, and one open task per user who has a task_match job.
 */
export function seedCore(core: CoreEmulator, jobs: readonly WorkloadJob[]): void {
  const withTask = new Set<number>();
  for (const job of jobs) {
    core.seedJob({
      id: job.token,
      job_type: job.jobType,
      payload: job.payload,
      user_id: job.userId,
    });
    if (job.memoryId) {
      core.seedMemory({
        id: job.memoryId,
        owner_user_id: job.userId,
        content: job.jobType === "image_tag"
          ? `Photo ${job.token}`
          : String(job.payload.memory_content),
        media_type: job.jobType === "image_tag" ? "image" : "text",
      });
    }
    if (job.jobType === "task_match" && !withTask.has(job.userId)) {
      withTask.add(job.userId);
      core.seedTask({
        id: `T${job.userId}`,
        owner_user_id: job.userId,
        description: "Pay the gas bill",
      });
    }
  }
}

/** The `XADD` arguments that publish a job as Core does. */
export function xaddArgs(job: WorkloadJob): [string, string, string, string] {
  return [
    STREAM_OF[job.jobType],
    "*",
    "data",
    JSON.stringify({
      job_id: job.token,
      job_type: job.jobType,
      payload: job.payload,
      user_id: job.userId,
    }),
  ];
}

/** Publishes jobs in pipelined batches, in order. */
export async function publish(
  redis: Redis,
  jobs: readonly WorkloadJob[],
  batch = 500,
): Promise<void> {
  for (let i = 0; i < jobs.length; i += batch) {
    const pipeline = redis.pipeline();
    for (const job of jobs.slice(i, i + batch)) pipeline.xadd(...xaddArgs(job));
    const results = await pipeline.exec();
    const failed = results?.find(([error]) => error);
    if (failed) throw failed[0];
  }
}

/**
 * Counts jobs as Core sees them end: calls `onEnd` the first time each job given turns
 * `completed` or `failed` (by a setter on the emulator's job object, so nothing is polled).
 */
export function watchJobs(
  core: CoreEmulator,
  tokens: Iterable<string>,
  onEnd: (token: string, status: "completed" | "failed") => void,
): void {
  for (const token of tokens) {
    const job = core.state.jobs.get(token);
    if (!job) throw new Error(`job ${token} was not seeded`);
    let status = job.status;
    Object.defineProperty(job, "status", {
      enumerable: true,
      configurable: true,
      get: () => status,
      set: (next) => {
        const ended = status === "completed" || status === "failed";
        status = next;
        if (!ended && (next === "completed" || next === "failed")) onEnd(token, next);
      },
    });
  }
}

/** Writes `count` image files of `bytes` bytes each (a PNG signature, then noise) into `dir`. */
export async function writeImages(dir: string, count: number, bytes: number): Promise<string[]> {
  const paths: string[] = [];
  for (let i = 0; i < count; i++) {
    const data = new Uint8Array(bytes);
    for (let at = 0; at < bytes; at += 65_536) {
      crypto.getRandomValues(data.subarray(at, Math.min(bytes, at + 65_536)));
    }
    data.set([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    const path = `${dir}/${crypto.randomUUID()}`;
    await Deno.writeFile(path, data);
    paths.push(path);
  }
  return paths;
}
