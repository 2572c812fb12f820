/**
 * The in-memory job scheduler: how many jobs run at once, one job per user at a time in entry-id
 * order, and jobs that wait (backoff) without holding a place.
 *
 * It knows nothing of Redis or models: the consumer gives it items and a `run` function.
 *
 * @module
 */
import { compareEntryIds } from "./streams.ts";

/** What `run` returns: nothing when the item is over, or when to run it again. */
export type RunOutcome = void | {
  /** Run the item again after this long (ms)... */
  retryInMs: number;
  /** ...or as soon as this resolves, whichever comes first. */
  wake?: Promise<void>;
};

/** What the scheduler needs of an item. */
export interface Schedulable {
  /** Items of one user run one at a time; `null` is nobody's and never waits for another. */
  userId: number | null;
  /** A user's items run in the order of these (stream entry ids). */
  entryId: string;
}

/** Options of {@linkcode JobScheduler}. */
export interface JobSchedulerOptions<T> {
  /** Most items running at once (waiting items don't count). */
  maxRunning: number;
  /** Runs one item; must not throw (a throw is reported and the item is retried after 5 s). */
  run: (item: T) => Promise<RunOutcome>;
  /** Told about a `run` that threw. */
  onError?: (item: T, error: unknown) => void;
}

/**
 * Runs items with a bound on how many run at once, one at a time per user.
 *
 * A user's next item starts when the one before has ended; an item that waits (a retry later)
 * gives up its running place but keeps its user's turn.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const order: string[] = [];
 * const scheduler = new JobScheduler<{ userId: number | null; entryId: string }>({
 *   maxRunning: 8,
 *   run: async (job) => {
 *     await Promise.resolve(); // the job's work
 *     order.push(job.entryId);
 *   },
 * });
 * scheduler.add({ userId: 1, entryId: "2-0" });
 * scheduler.add({ userId: 1, entryId: "3-0" }); // same user: waits for 2-0 to end
 * assert.equal(await scheduler.drain(30_000), true);
 * assert.deepEqual(order, ["2-0", "3-0"]);
 * ```
 */
export class JobScheduler<T extends Schedulable> {
  readonly #maxRunning: number;
  readonly #run: (item: T) => Promise<RunOutcome>;
  readonly #onError?: (item: T, error: unknown) => void;
  readonly #queues = new Map<number, T[]>();
  readonly #busyUsers = new Set<number>();
  readonly #ready: T[] = [];
  readonly #running = new Set<T>();
  readonly #waiting = new Map<T, () => void>();
  #held = 0;
  #ended = 0;
  #stopped = false;
  #changed = Promise.withResolvers<void>();

  /** Creates an idle scheduler. */
  constructor(options: JobSchedulerOptions<T>) {
    this.#maxRunning = options.maxRunning;
    this.#run = options.run;
    this.#onError = options.onError;
  }

  /** Items added and not over yet (queued, running or waiting to retry). */
  get held(): number {
    return this.#held;
  }

  /** Items running now. */
  get running(): number {
    return this.#running.size;
  }

  /** Items waiting to be retried. */
  get waiting(): number {
    return this.#waiting.size;
  }

  /** Items over since the start (their run ended with no retry). */
  get ended(): number {
    return this.#ended;
  }

  /**
   * Adds an item; it starts as soon as its user's turn and a running place allow. Returns
   * `"queued"` when it waits for its user's earlier item, `"scheduled"` when only a running place
   * stands between it and its start, `"refused"` once the scheduler has stopped.
   */
  add(item: T): "scheduled" | "queued" | "refused" {
    if (this.#stopped) return "refused";
    this.#held++;
    const user = item.userId;
    let placed: "scheduled" | "queued" = "scheduled";
    if (user === null) {
      this.#ready.push(item);
    } else if (this.#busyUsers.has(user)) {
      const queue = this.#queues.get(user) ?? [];
      // Entries mostly come in order: look for the place from the end.
      let at = queue.length;
      while (at > 0 && compareEntryIds(item.entryId, queue[at - 1].entryId) < 0) at--;
      queue.splice(at, 0, item);
      this.#queues.set(user, queue);
      placed = "queued";
    } else {
      this.#busyUsers.add(user);
      this.#ready.push(item);
    }
    this.#pump();
    return placed;
  }

  /** Resolves once fewer than `limit` items are held (or `signal` aborts: then it rejects). */
  async whenHeldBelow(limit: number, signal?: AbortSignal): Promise<void> {
    while (this.#held >= limit) {
      signal?.throwIfAborted();
      await this.#nextChange(signal);
    }
  }

  /** Waits until `count` items in all are over (see {@linkcode JobScheduler.ended}). */
  async whenEnded(count: number, signal?: AbortSignal): Promise<void> {
    while (this.#ended < count) {
      signal?.throwIfAborted();
      await this.#nextChange(signal);
    }
  }

  /**
   * Stops starting items and forgets those not running (queued or waiting); running items go on.
   * Returns how many were forgotten.
   */
  stop(): number {
    this.#stopped = true;
    let forgotten = this.#ready.length + this.#waiting.size;
    for (const queue of this.#queues.values()) forgotten += queue.length;
    for (const cancel of this.#waiting.values()) cancel();
    this.#waiting.clear();
    this.#ready.length = 0;
    this.#queues.clear();
    this.#held = this.#running.size;
    this.#signal();
    return forgotten;
  }

  /** Waits until nothing runs, at most `timeoutMs`; true when nothing runs. */
  async drain(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.#running.size > 0) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        this.#nextChange(),
        new Promise((resolve) => timer = setTimeout(resolve, left)),
      ]);
      clearTimeout(timer);
    }
    return true;
  }

  #pump(): void {
    while (!this.#stopped && this.#running.size < this.#maxRunning && this.#ready.length > 0) {
      this.#start(this.#ready.shift()!);
    }
  }

  #start(item: T): void {
    this.#running.add(item);
    this.#run(item).then(
      (outcome) => outcome ? this.#wait(item, outcome.retryInMs, outcome.wake) : this.#finish(item),
      (error) => {
        this.#onError?.(item, error);
        this.#wait(item, 5_000);
      },
    ).finally(() => this.#signal());
  }

  #wait(item: T, ms: number, wake?: Promise<void>): void {
    this.#running.delete(item);
    if (this.#stopped) return this.#forget(item);
    let done = false;
    const resume = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      this.#waiting.delete(item);
      if (this.#stopped) return;
      this.#ready.unshift(item); // a retry goes before new work: its user is waiting on it
      this.#pump();
    };
    const timer = setTimeout(resume, Math.max(0, ms));
    this.#waiting.set(item, () => {
      done = true;
      clearTimeout(timer);
    });
    wake?.then(resume, () => {});
    this.#pump();
  }

  #finish(item: T): void {
    this.#running.delete(item);
    this.#ended++;
    if (this.#stopped) return this.#forget(item);
    this.#held--;
    const user = item.userId;
    if (user !== null) {
      const queue = this.#queues.get(user);
      const next = queue?.shift();
      if (queue && queue.length === 0) this.#queues.delete(user);
      if (next) this.#ready.push(next);
      else this.#busyUsers.delete(user);
    }
    this.#pump();
  }

  #forget(_item: T): void {
    this.#held = Math.max(0, this.#held - 1);
  }

  #signal(): void {
    const changed = this.#changed;
    this.#changed = Promise.withResolvers<void>();
    changed.resolve();
  }

  #nextChange(signal?: AbortSignal): Promise<void> {
    const changed = this.#changed.promise;
    if (!signal) return changed;
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      changed.then(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      });
    });
  }
}
