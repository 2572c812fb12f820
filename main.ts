/**
 * The LLM worker of Life Organiser: `deno task start`.
 *
 * Loads the settings, runs the consumer until SIGTERM or SIGINT, drains, exits 0.
 *
 * @module
 */
import { loadSettings, type Settings, SettingsError } from "./lib/config.ts";
import { logger, setupLogging, teardownLogging } from "./lib/log.ts";
import { createWorker } from "./lib/worker.ts";

/** Runs the worker until a stop signal; resolves with the exit code. */
export async function main(): Promise<number> {
  let settings: Settings;
  try {
    settings = loadSettings();
  } catch (error) {
    if (!(error instanceof SettingsError)) throw error;
    console.error(error.message);
    return 2;
  }
  await setupLogging(settings);
  const log = logger("main");
  const worker = createWorker(settings);
  const stopped = Promise.withResolvers<void>();
  let stopping = false;
  const onSignal = (signal: Deno.Signal) => () => {
    if (stopping) {
      log.info("{signal} again: still draining, the first stop stands.", { signal });
      return;
    }
    stopping = true;
    log.info("{signal} received.", { signal });
    stopped.resolve();
  };
  const signals: Array<[Deno.Signal, () => void]> = [
    ["SIGTERM", onSignal("SIGTERM")],
    ["SIGINT", onSignal("SIGINT")],
  ];
  for (const [signal, listener] of signals) Deno.addSignalListener(signal, listener);
  try {
    await worker.start();
    await stopped.promise;
  } finally {
    await worker.close();
    for (const [signal, listener] of signals) Deno.removeSignalListener(signal, listener);
    log.info("Bye.");
    await teardownLogging();
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main());
