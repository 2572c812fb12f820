/**
 * A counting semaphore: at most `limit` holders at once, the rest wait in FIFO order. It is the
 * in-process implementation of {@linkcode Slots}.
 *
 * @module
 */
import type { Release, Slots } from "./slots.ts";

/**
 * Bounds how many things run at once.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const slots = new Semaphore(2);
 * let most = 0;
 * const task = () =>
 *   slots.run(async () => {
 *     most = Math.max(most, slots.held);
 *     await new Promise((resolve) => setTimeout(resolve, 5));
 *   });
 * await Promise.all([task(), task(), task(), task()]);
 * assert.equal(most, 2);
 * ```
 */
export class Semaphore implements Slots {
  #limit: number;
  #held = 0;
  readonly #waiters: Array<() => void> = [];

  /** A semaphore with `limit` slots. */
  constructor(limit: number) {
    if (!(limit >= 1)) throw new RangeError(`Semaphore limit must be at least 1, got ${limit}`);
    this.#limit = limit;
  }

  /** Slots in use. */
  get held(): number {
    return this.#held;
  }

  /** Callers waiting for a slot. */
  get waiting(): number {
    return this.#waiters.length;
  }

  /**
   * Waits for a slot and returns the function that gives it back (later calls do nothing). When
   * `signal` aborts first, rejects with its reason and takes no slot.
   */
  async acquire(signal?: AbortSignal): Promise<Release> {
    signal?.throwIfAborted();
    if (this.#held < this.#limit) {
      this.#held++;
    } else {
      await new Promise<void>((resolve, reject) => {
        const onAbort = () => {
          this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
          reject(signal!.reason);
        };
        const waiter = () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        };
        this.#waiters.push(waiter);
        signal?.addEventListener("abort", onAbort, { once: true });
      });
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.#waiters.shift();
      if (next) next(); // the slot passes straight to the next waiter
      else this.#held--;
    };
  }

  /** Runs `fn` while holding a slot. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
