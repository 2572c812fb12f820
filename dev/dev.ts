/**
 * `deno task dev`: everything the worker needs, on loopback, then the worker itself.
 *
 * - Redis: the one `REDIS_URL` points at when it answers, else a private `redis-server` child on
 *   a free port (removed again at the end).
 * - Core: the Core emulator (`testing/core_emulator.ts`), seeded with the sample user, memories and
 *   tasks that `dev/samples/*.json` refer to. `GET <core>/_emulator/state` shows what was written.
 * - The model: whatever `LLM_BASE_URL` points at (Ollama, llama.cpp server, vLLM, OpenAI), or
 *   the scripted model with `LLM_BASE_URL=scripted`. When nothing answers, it says so and how to
 *   use the scripted model, and the worker runs anyway (jobs wait for the model).
 * - Images: `IMAGE_STORAGE_PATH`, by default `dev/samples/`.
 *
 * Stop it with Ctrl-C.
 *
 * @module
 */
import { loadSettings, readEnvironment, SettingsError } from "../lib/config.ts";
import { setupLogging, teardownLogging } from "../lib/log.ts";
import { describeRedis, type LocalStack, SCRIPTED, startLocalStack } from "./local_stack.ts";

/** Runs the local stack until SIGINT or SIGTERM; resolves with the exit code. */
export async function main(): Promise<number> {
  const env = readEnvironment();
  const scriptedWanted = (env.LLM_BASE_URL ?? "").trim().toLowerCase() === SCRIPTED;
  if (env.CORE_API_URL) {
    console.log(
      `Note: CORE_API_URL=${env.CORE_API_URL} is not used; deno task dev runs the Core emulator.`,
    );
  }
  try {
    // Checked before anything starts; "scripted" stands for the URL the scripted model will get.
    const settings = loadSettings({
      ...env,
      LLM_BASE_URL: scriptedWanted ? "http://127.0.0.1/v1" : env.LLM_BASE_URL ?? "",
    });
    await setupLogging(settings);
  } catch (error) {
    if (!(error instanceof SettingsError)) throw error;
    console.error(error.message);
    return 2;
  }
  const port = env.WORKER_HTTP_PORT ?? (portIsFree(9464) ? "9464" : "0");
  let stack: LocalStack;
  try {
    stack = await startLocalStack({
      env: { ...env, WORKER_HTTP_PORT: port },
      redis: "auto",
      scriptedLatencyMs: Number(env.SCRIPTED_MODEL_LATENCY_MS ?? 300) || 0,
    });
  } catch (error) {
    await teardownLogging();
    console.error(
      `The local stack did not start: ${error instanceof Error ? error.message : error}`,
    );
    return 1;
  }
  const s = stack.settings;
  const lines = [
    "",
    "Local stack of the LLM worker (Ctrl-C stops everything):",
    `  Redis         ${describeRedis(stack)}`,
    `  Core          ${stack.core.url}  (the Core emulator; see ${stack.core.url}/_emulator/state)`,
    `  Model         ${
      stack.scripted
        ? `${stack.scripted.url}  (the scripted model: rules, not a language model)`
        : `${s.llmBaseUrl}  text ${s.llmTextModel}, vision ${s.llmVisionModel}`
    }`,
    `  Images        ${s.imageStoragePath}`,
    `  Health        ${stack.worker.http?.url ?? "off"}/healthz, /readyz, /metrics`,
  ];
  if (stack.modelProblem !== undefined) {
    lines.push(
      "",
      `  ! The model server did not answer: ${stack.modelProblem}`,
      "    Start one (e.g. `ollama serve` and LLM_BASE_URL=http://localhost:11434/v1), or watch the",
      "    pipeline offline with the built-in scripted model:",
      "      LLM_BASE_URL=scripted deno task dev",
      "    Jobs enqueued now wait until the model answers.",
    );
  } else if (scriptedWanted) {
    lines.push("", "  (LLM_BASE_URL=scripted: answers come from testing/scripted_model.ts.)");
  }
  lines.push(
    "",
    "In another terminal, publish a sample job and wait for its outcome:",
    `  REDIS_URL=${s.redisUrl} CORE_API_URL=${s.coreApiUrl} deno task enqueue intent_classify --wait`,
    "  (job types: image_tag, intent_classify, followup, task_match, email_extract;",
    "   payloads default to dev/samples/<job_type>.json)",
    "",
  );
  console.log(lines.join("\n"));

  const stopped = Promise.withResolvers<void>();
  let stopping = false;
  const onSignal = () => {
    if (stopping) return;
    stopping = true;
    console.log("\nStopping the local stack…");
    stopped.resolve();
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    await stopped.promise;
  } finally {
    await stack.close();
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await teardownLogging();
  }
  return 0;
}

function portIsFree(port: number): boolean {
  try {
    Deno.listen({ hostname: "0.0.0.0", port }).close();
    return true;
  } catch {
    return false;
  }
}

if (import.meta.main) Deno.exit(await main());
