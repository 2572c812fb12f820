/**
 * `main.ts` as the start task runs it: a real process, real signals.
 */
import assert from "node:assert/strict";
import { defaultReply, startStack } from "./helpers/stack.ts";
import { START_FLAGS } from "../testing/worker_process.ts";

/** Spawns `deno run main.ts` with `env` only (plus PATH and HOME), in a folder with no `.env`. */
function spawnMain(env: Record<string, string>, cwd: string) {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", ...START_FLAGS, new URL("../main.ts", import.meta.url).pathname],
    cwd,
    clearEnv: true,
    env: {
      PATH: Deno.env.get("PATH") ?? "",
      HOME: Deno.env.get("HOME") ?? "",
      NO_COLOR: "1",
      ...env,
    },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

Deno.test("main: bad settings print one message naming each variable and exit 2", async () => {
  const cwd = await Deno.makeTempDir();
  try {
    const child = spawnMain(
      { LLM_MAX_RETRIES: "-1", REDIS_URL: "http://nope", CORE_API_URL: "x" },
      cwd,
    );
    const { code, stderr } = await child.output();
    const text = new TextDecoder().decode(stderr);
    assert.equal(code, 2);
    assert.match(text, /LLM_MAX_RETRIES/);
    assert.match(text, /REDIS_URL/);
    assert.match(text, /CORE_API_URL/);
    assert.doesNotMatch(text, /\bat .*\.ts:\d+/, "no stack trace");
  } finally {
    await Deno.remove(cwd, { recursive: true });
  }
});

Deno.test("main: SIGTERM lets the job in flight finish, a second SIGTERM does not cut it short, exit 0", async () => {
  const gotRequest = Promise.withResolvers<void>();
  await using stack = await startStack({
    reply: async (request) => {
      gotRequest.resolve();
      await new Promise((resolve) => setTimeout(resolve, 1_500));
      return defaultReply(request);
    },
  });
  const settings = stack.settings();
  const child = spawnMain({
    REDIS_URL: settings.redisUrl,
    LLM_BASE_URL: settings.llmBaseUrl,
    CORE_API_URL: settings.coreApiUrl,
    IMAGE_STORAGE_PATH: stack.imageDir,
    WORKER_HTTP_PORT: "0",
    WORKER_CONSUMER_NAME: "sigterm-test",
    WORKER_SHUTDOWN_TIMEOUT_MS: "10000",
  }, stack.imageDir);
  const output = child.output();
  try {
    const jobId = await stack.enqueue("followup", { message: "drain me" }, 1);
    await gotRequest.promise;
    child.kill("SIGTERM");
    await new Promise((resolve) => setTimeout(resolve, 200));
    child.kill("SIGTERM"); // the same stop, delivered twice
    const { code, stdout } = await output;
    const log = new TextDecoder().decode(stdout);
    assert.equal(code, 0, log);
    assert.equal(stack.core.state.jobs.get(jobId)!.status, "completed");
    assert.match(log, /SIGTERM again: still draining/);
    assert.equal((await stack.notifications()).length, 1);
    assert.deepEqual(await stack.pending(), {});
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // already exited
    }
    await output.catch(() => {});
  }
});

Deno.test("main: a taken health port is said plainly and exits 1", async () => {
  const cwd = await Deno.makeTempDir();
  const taken = Deno.listen({ hostname: "0.0.0.0", port: 0 });
  try {
    const child = spawnMain({
      WORKER_HTTP_PORT: String((taken.addr as Deno.NetAddr).port),
      REDIS_URL: "redis://127.0.0.1:1",
    }, cwd);
    const { code, stdout, stderr } = await child.output();
    assert.equal(code, 1);
    const log = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
    assert.match(log, /could not start.*set WORKER_HTTP_PORT to a free port/);
  } finally {
    taken.close();
    await Deno.remove(cwd, { recursive: true });
  }
});
