/**
 * The LLM worker of Life Organiser: `deno task start`.
 *
 * Loads the settings, runs the consumer until SIGTERM or SIGINT, drains, exits 0. Exits 2 on a bad
 * setting and 1 when the health port cannot be bound; a Redis, Core or model server that is not up
 * yet is waited for (a stop signal ends the wait).
 *
 * @module
 */
import { loadSettings, type Settings, SettingsError } from "./lib/config.ts";
import { describeError, logger, setupLogging, teardownLogging } from "./lib/log.ts";
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
  let code = 0;
  try {
    // A stop while the worker still waits for Redis ends the wait (close() below).
    await Promise.race([worker.start().then(() => stopped.promise), stopped.promise]);
  } catch (error) {
    const hint = error instanceof Deno.errors.AddrInUse
      ? ` Port ${settings.workerHttpPort} is taken: set WORKER_HTTP_PORT to a free port (0 picks one).`
      : "";
    log.error("The worker could not start: {message}{hint}", {
      message: describeError(error),
      hint,
    });
    code = 1;
  } finally {
    await worker.close();
    for (const [signal, listener] of signals) Deno.removeSignalListener(signal, listener);
    log.info("Bye.");
    await teardownLogging();
  }
  return code;
}

if (import.meta.main) Deno.exit(await main());
