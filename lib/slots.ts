/**
 * Slots: what bounds how many model requests are in flight at once, as one interface above its
 * implementations: the in-process {@linkcode Semaphore} (`WORKER_CONCURRENCY`, per replica) and
 * `SharedSlots` (`LLM_MAX_IN_FLIGHT`, one budget across every replica, kept in Redis).
 * {@linkcode stackSlots} puts one in front of another, so a replica never asks the shared budget
 * for more than its own concurrency.
 *
 * Invariant of every implementation: a slot is held from the moment `acquire` resolves until its
 * release is called; calling a release again does nothing.
 *
 * @module
 */

/** Gives a slot back; calling it more than once does nothing. */
export type Release = () => void;

/** A bound on how many things run at once. */
export interface Slots {
  /** Slots this process holds now. */
  readonly held: number;
  /** Callers of this process waiting for a slot. */
  readonly waiting: number;
  /**
   * Waits for a slot and resolves with its release. When `signal` aborts first, rejects with
   * the signal's reason and takes no slot.
   */
  acquire(signal?: AbortSignal): Promise<Release>;
}

/**
 * Slots that take one of `front`'s, then one of `back`'s, and give them back in the opposite
 * order. `held` counts the callers that hold both; `waiting` those waiting for either.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Semaphore } from "./semaphore.ts";
 *
 * const local = new Semaphore(4); // this replica's share
 * const budget = new Semaphore(2); // stands in for a budget shared by every replica
 * const slots = stackSlots(local, budget);
 * const releases = await Promise.all([slots.acquire(), slots.acquire()]);
 * let third = false;
 * const next = slots.acquire().then((release) => (third = true, release));
 * await new Promise((resolve) => setTimeout(resolve, 10));
 * assert.equal(third, false); // the budget is spent
 * assert.equal(slots.held, 2);
 * releases[0]();
 * (await next)();
 * releases[1]();
 * assert.equal(local.held + budget.held, 0);
 * ```
 */
export function stackSlots(front: Slots, back: Slots): Slots {
  return {
    get held() {
      return back.held;
    },
    get waiting() {
      return front.waiting + back.waiting;
    },
    async acquire(signal?: AbortSignal): Promise<Release> {
      const releaseFront = await front.acquire(signal);
      let releaseBack: Release;
      try {
        releaseBack = await back.acquire(signal);
      } catch (error) {
        releaseFront();
        throw error;
      }
      let released = false;
      return () => {
        if (released) return;
        released = true;
        releaseBack();
        releaseFront();
      };
    },
  };
}
