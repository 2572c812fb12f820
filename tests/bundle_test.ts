/**
 * Packaging: `deno bundle` (as `deno task bundle` runs it) makes a single file that starts on its
 * own (no node_modules, no config) as the Dockerfile's `CMD` runs it, with the start task's
 * flags, answers `/healthz`, `/readyz` and `/metrics`, and stops cleanly on SIGTERM.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort, startRedis } from "../testing/redis_server.ts";
import { START_FLAGS } from "../testing/worker_process.ts";

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

/** The `bundle` task's command line for `entry`, with the output in `out`. */
function bundleArgs(out: string, entry = "main.ts"): string[] {
  const tasks = JSON.parse(Deno.readTextFileSync(join(REPO_ROOT, "deno.json"))).tasks;
  const commands = (tasks.bundle as string).split("&&").map((c) => c.trim().split(/\s+/));
  const args = commands.find((words) => words.at(-1) === entry)?.slice(1); // without "deno"
  assert.ok(args, `the bundle task bundles ${entry}`);
  args[args.indexOf("-o") + 1] = out;
  return args;
}

/** Bundles `entry` into `out` with the `bundle` task's command line. */
async function bundle(out: string, entry = "main.ts"): Promise<void> {
  const built = await new Deno.Command(Deno.execPath(), {
    args: bundleArgs(out, entry),
    cwd: REPO_ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(built.code, 0, new TextDecoder().decode(built.stderr));
}

/**
 * Runs `deno <args>` in `dir` (no node_modules, no deno.json, no .env there) with a clean
 * environment plus `env`; answers its standard output, after checking it exited 0.
 */
async function runAlone(args: string[], dir: string, env: Record<string, string> = {}) {
  const done = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: dir,
    clearEnv: true,
    env: { PATH: Deno.env.get("PATH") ?? "", HOME: dir, NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(done.code, 0, new TextDecoder().decode(done.stderr));
  return new TextDecoder().decode(done.stdout);
}

/** The runtime image's `CMD` (the arguments of `deno`), from the Dockerfile. */
function dockerCmd(): string[] {
  const dockerfile = Deno.readTextFileSync(join(REPO_ROOT, "Dockerfile"));
  const line = dockerfile.split("\n").filter((l) => l.startsWith("CMD ")).at(-1);
  assert.ok(line, "the Dockerfile has a CMD");
  return JSON.parse(line.slice(4));
}

Deno.test("the Dockerfile runs the bundle with exactly the start task's flags", () => {
  assert.deepEqual(dockerCmd(), ["run", "--no-config", ...START_FLAGS, "llm-worker.js"]);
});

async function waitForHttp(url: string, deadline: number): Promise<Response> {
  while (true) {
    try {
      return await fetch(url);
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

Deno.test("the offline bundle starts, serves /healthz and /readyz, and stops on SIGTERM", async () => {
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-bundle-" });
  await using redis = await startRedis();
  try {
    const out = join(dir, "llm-worker.bundle.js");
    await bundle(out);

    const port = freePort();
    const child = new Deno.Command(Deno.execPath(), {
      args: dockerCmd().map((arg) => arg === "llm-worker.js" ? out : arg),
      cwd: dir, // no node_modules, no deno.json, no .env here
      clearEnv: true,
      env: {
        PATH: Deno.env.get("PATH") ?? "",
        HOME: Deno.env.get("HOME") ?? dir,
        NO_COLOR: "1",
        REDIS_URL: redis.url,
        LLM_BASE_URL: `http://127.0.0.1:${freePort()}/v1`,
        CORE_API_URL: `http://127.0.0.1:${freePort()}`,
        WORKER_HTTP_PORT: String(port),
        WORKER_CONSUMER_NAME: "bundle-test",
      },
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const output = child.output();
    let status: Deno.CommandStatus | undefined;
    try {
      const deadline = Date.now() + 20_000;
      const health = await waitForHttp(`http://127.0.0.1:${port}/healthz`, deadline);
      assert.equal(health.status, 200);
      assert.equal(await health.text(), "ok\n");
      let ready: Response;
      while ((ready = await fetch(`http://127.0.0.1:${port}/readyz`)).status !== 200) {
        await ready.body?.cancel();
        assert.ok(Date.now() < deadline, "ready within 20 s");
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      await ready.body?.cancel();
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      assert.match(metrics, /^llm_worker_jobs_in_flight 0$/m);
    } finally {
      child.kill("SIGTERM");
      status = await child.status;
    }
    const { stdout, stderr } = await output;
    const logs = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
    assert.equal(status.code, 0, logs);
    assert.match(
      logs,
      /LLM worker bundle-test started: reading llm:image_tag, .* in group llm-worker-group, concurrency 4, .*the model server did not answer: .* Jobs wait until it does\); health and metrics on port \d+\./,
    );
    assert.match(logs, /Bye\./);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the dead-letter tool's bundle runs on its own as the image ships it", async () => {
  const dockerfile = Deno.readTextFileSync(join(REPO_ROOT, "Dockerfile"));
  assert.match(dockerfile, /^COPY --from=build .*\/app\/dist\/dead\.bundle\.js \.\/dead\.js$/m);
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-dead-bundle-" });
  await using redis = await startRedis();
  try {
    const out = join(dir, "dead.js");
    await bundle(out, "cli/dead.ts");
    const command = dockerfile.match(/deno run (--no-config .*) dead\.js list/)?.[1];
    assert.ok(command, "the Dockerfile shows how to run the tool");
    const listed = await runAlone(["run", ...command.split(" "), out, "list"], dir, {
      REDIS_URL: redis.url,
    });
    assert.equal(listed, "llm:dead is empty.\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the prompts tool's bundle writes the built-in prompts as the image ships it", async () => {
  const dockerfile = Deno.readTextFileSync(join(REPO_ROOT, "Dockerfile"));
  assert.match(
    dockerfile,
    /^COPY --from=build .*\/app\/dist\/prompts\.bundle\.js \.\/prompts\.js$/m,
  );
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-prompts-bundle-" });
  try {
    const out = join(dir, "prompts.js");
    await bundle(out, "cli/prompts.ts");
    const command = dockerfile.match(/<image> (run --no-config .*) prompts\.js \/prompts$/m)?.[1];
    assert.ok(command, "the Dockerfile shows how to run the tool");
    const prompts = join(dir, "prompts");
    await Deno.mkdir(prompts);
    await runAlone([...command.replace("/prompts", prompts).split(" "), out, prompts], dir);
    const files = [...Deno.readDirSync(prompts)].map((entry) => entry.name).sort();
    assert.deepEqual(files, [
      "email_extract.txt",
      "followup.txt",
      "image_tag.txt",
      "intent_classify.txt",
      "task_match.txt",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
