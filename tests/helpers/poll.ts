/**
 * Polling for test conditions.
 *
 * @module
 */

/**
 * Checks `check` every 20 ms until it holds (true) or `timeoutMs` has passed (false).
 *
 * @example
 * ```ts
 * const ok = await pollUntil(() => core.state.jobs.size > 0, 5_000);
 * ```
 */
export async function pollUntil(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return true;
}
