/**
 * Operating the worker (issue 19): starting before Redis and the model server are up, readiness
 * and liveness as the compose example uses them, debug logs that follow each job, and a result
 * Core refuses at the end. Real parts throughout: `main.ts` in its own process, a private
 * `redis-server` started late, a model server (`Deno.serve`) that comes up late, the Core
 * emulator, and `/metrics` read over HTTP.
 */
import assert from "node:assert/strict";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { startCoreEmulator } from "../testing/core_emulator.ts";
import { STREAM_OF } from "../lib/streams.ts";
import { defaultReply, startStack } from "./helpers/stack.ts";
import { startModelServer } from "./helpers/model_server.ts";
import { pollUntil } from "./helpers/poll.ts";
import { freePort, startRedis } from "../testing/redis_server.ts";
import { REPO_ROOT, startWorkerProcess } from "../testing/worker_process.ts";

/** GET `url`: status and text; a refused connection is status 0. */
async function get(url: string): Promise<{ status: number; text: string }> {
  try {
    const response = await fetch(url);
    return { status: response.status, text: await response.text() };
  } catch {
    return { status: 0, text: "" };
  }
}

/** The value of one unlabelled or labelled sample of a Prometheus text. */
function sample(text: string, name: string, labels = ""): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${name}${labels} `));
  return line === undefined ? undefined : Number(line.split(" ").at(-1));
}

async function waitFor(check: () => boolean | Promise<boolean>, what: string, ms = 15_000) {
  if (!await pollUntil(check, ms)) throw new Error(`Timed out waiting for ${what}`);
}

/** The compose example's health check of the worker, run as Docker would run it. */
async function composeHealthcheck(port: number): Promise<number> {
  const compose = await Deno.readTextFile(`${REPO_ROOT}docker-compose.example.yml`);
  const service = compose.slice(compose.indexOf("\nx-llm-worker:"));
  const test = service.slice(service.indexOf("healthcheck:")).match(/test:\n((?:\s+- .*\n)+)/);
  assert.ok(test, "the llm-worker service has a healthcheck test");
  const [cmd, deno, ...args] = test[1].trim().split("\n").map((line) => {
    const item = line.trim().slice(2);
    return item.startsWith('"') ? JSON.parse(item) as string : item;
  });
  assert.deepEqual([cmd, deno], ["CMD", "deno"]);
  const { code } = await new Deno.Command(Deno.execPath(), {
    args,
    env: { WORKER_HTTP_PORT: String(port), NO_COLOR: "1" },
    stdout: "null",
    stderr: "null",
  }).output();
  return code;
}

Deno.test("main started before Redis waits for it (one line per change), then reads; the compose healthcheck follows readiness", async () => {
  await using model = startModelServer(defaultReply);
  const core = startCoreEmulator();
  const redisPort = freePort();
  const httpPort = freePort();
  const worker = startWorkerProcess({
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    LLM_BASE_URL: model.url,
    CORE_API_URL: core.url,
    WORKER_HTTP_PORT: String(httpPort),
    LOG_LEVEL: "debug",
  });
  const base = `http://127.0.0.1:${httpPort}`;
  let redis: Awaited<ReturnType<typeof startRedis>> | undefined;
  try {
    await waitFor(async () => (await get(`${base}/healthz`)).status === 200, "/healthz");
    let ready = await get(`${base}/readyz`);
    assert.equal(ready.status, 503);
    assert.match(
      ready.text,
      new RegExp(`^not ready: Redis at redis://127\\.0\\.0\\.1:${redisPort}/? is not reachable`),
    );
    assert.equal(await composeHealthcheck(httpPort), 1, "unhealthy while Redis is missing");
    // Several refused reconnects (0.2 s, 0.4 s, 0.6 s, ...): still one line.
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    assert.equal(worker.child.pid > 0 && (await get(`${base}/healthz`)).status, 200, "alive");

    redis = await startRedis({ port: redisPort });
    await waitFor(async () => (ready = await get(`${base}/readyz`)).status === 200, "ready");
    assert.equal(ready.text, "ready\n");
    assert.equal(await composeHealthcheck(httpPort), 0, "healthy once ready");

    // It reads: a job published now is done.
    const job = core.seedJob({ job_type: "followup", payload: { message: "Hi" }, user_id: 1 });
    const { Redis } = await import("ioredis");
    const client = new Redis(redis.url);
    try {
      await client.xadd(
        STREAM_OF.followup,
        "*",
        "data",
        JSON.stringify({ job_id: job.id, job_type: "followup", payload: job.payload, user_id: 1 }),
      );
    } finally {
      client.disconnect();
    }
    await waitFor(() => core.state.jobs.get(job.id)?.status === "completed", "the job");

    const status = await worker.kill("SIGTERM");
    const log = worker.output();
    assert.equal(status.code, 0, log);
    const waiting = log.split("\n").filter((l) => /Redis at .* is not reachable/.test(l));
    assert.equal(waiting.length, 1, waiting.join("\n"));
    assert.match(waiting[0], /\[WRN\].*ECONNREFUSED.*Waiting for it/);
    assert.match(log, /Redis at \S+ answers again\./);
    assert.match(log, /LLM worker \S+ started/);
    // Text lines inside a job that do not name it get the job and attempt.
    assert.match(
      log,
      new RegExp(
        `Core PATCH /llm_jobs/${job.id} answered 200 in \\d+ ms\\. \\[job ${job.id} attempt 1\\]`,
      ),
    );
  } finally {
    await worker.kill("SIGKILL");
    await redis?.close();
    await core.close();
  }
});

Deno.test("main: a stop while waiting for Redis ends the wait, exit 0", async () => {
  const worker = startWorkerProcess({
    REDIS_URL: `redis://127.0.0.1:${freePort()}`,
    LOG_LEVEL: "info",
  });
  try {
    await waitFor(() => worker.output().includes("is not reachable"), "the waiting line");
    const status = await worker.kill("SIGTERM");
    assert.equal(status.code, 0, worker.output());
    assert.doesNotMatch(worker.output(), /could not start/);
  } finally {
    await worker.kill("SIGKILL");
  }
});

Deno.test("the model-down gauge and /readyz follow the start probe, with no job, until a late server answers", async () => {
  await using stack = await startStack();
  const modelPort = freePort();
  const worker = await stack.startWorker({ LLM_BASE_URL: `http://127.0.0.1:${modelPort}/v1` });
  const metrics = async () => (await get(`${worker.http!.url}/metrics`)).text;
  await waitFor(async () => sample(await metrics(), "llm_worker_model_unavailable") === 1, "1");
  const ready = await get(`${worker.http!.url}/readyz`);
  assert.equal(ready.status, 200, "readiness does not depend on the model server");
  assert.match(
    ready.text,
    /^ready; the model server does not answer, jobs wait for it: The model server at http:\/\/127\.0\.0\.1:\d+\/v1 could not be reached/,
  );

  await using late = startModelServer(defaultReply, { port: modelPort });
  await waitFor(async () => sample(await metrics(), "llm_worker_model_unavailable") === 0, "0");
  assert.equal((await get(`${worker.http!.url}/readyz`)).text, "ready\n");
  const jobId = await stack.enqueue("followup", { message: "Now?" });
  await stack.waitForJobs([jobId]);
  assert.equal(late.requests.length, 1);
});

Deno.test("debug logs follow each job: read, queued behind the user, model, Core, ack; waits are not attempts; JSON keeps values as fields", async () => {
  let calls = 0;
  await using stack = await startStack({
    reply: (request) =>
      ++calls === 1 ? new Response("loading", { status: 503 }) : defaultReply(request),
  });
  const first = await stack.enqueue("followup", { message: "one" }, 7);
  const second = await stack.enqueue("followup", { message: "two" }, 7);
  const settings = stack.settings();
  const worker = startWorkerProcess({
    REDIS_URL: settings.redisUrl,
    LLM_BASE_URL: settings.llmBaseUrl,
    CORE_API_URL: settings.coreApiUrl,
    LOG_LEVEL: "debug",
    LOG_FORMAT: "json",
    LLM_MAX_RETRIES: "3",
  });
  try {
    await stack.waitForJobs([first, second]);
    await stack.waitFor(async () => Object.keys(await stack.pending()).length === 0, "acks");
    assert.equal((await worker.kill("SIGTERM")).code, 0);
  } finally {
    await worker.kill("SIGKILL");
  }
  const lines = worker.output().split("\n").filter((l) => l.startsWith("{")).map((l) =>
    JSON.parse(l) as Record<string, unknown> & { message: string }
  );
  const of = (jobId: string) => lines.filter((l) => l.jobId === jobId);
  const find = (jobId: string, pattern: RegExp) => {
    const found = of(jobId).filter((l) => pattern.test(l.message));
    assert.ok(
      found.length > 0,
      `no line ${pattern} for ${jobId}:\n${of(jobId).map((l) => l.message).join("\n")}`,
    );
    return found;
  };

  const [read] = find(first, /^Read job/);
  assert.equal(read.stream, "llm:followup");
  assert.equal(read.userId, 7);
  assert.equal(
    read.message,
    `Read job ${first} (followup) for user 7: entry ${read.entryId} of llm:followup; scheduled.`,
    "values are named bare, not quoted as JSON",
  );
  find(second, /^Read job .*; it waits for the user's earlier job\.$/);

  const models = find(first, /^Model mistral /);
  assert.equal(models[0].outcome, "unavailable");
  assert.deepEqual([models[0].attempt, models[0].waits], [1, 0]);
  const answered = models.at(-1)!;
  assert.match(
    answered.message,
    /^Model mistral on the primary server answered in \d+ ms: 10 prompt and 5 completion tokens\.$/,
  );
  assert.deepEqual([answered.attempt, answered.waits], [1, 1], "a wait is not an attempt");
  assert.equal(typeof answered.durationMs, "number");

  const [wait] = find(first, /waits \d+ ms \(wait 1, not counted against LLM_MAX_RETRIES\)/);
  assert.equal(wait.level, "WARN");
  const started = find(first, /started/);
  assert.deepEqual(started.map((l) => [l.attempt, l.waits]), [[1, 0], [1, 1]]);
  assert.match(
    started[1].message,
    /attempt 1 of 3, after 1 wait\(s\) for the model server or Core/,
  );

  const [patch] = find(first, /^Core PATCH /);
  assert.deepEqual(
    [patch.method, patch.path, patch.status, typeof patch.durationMs],
    ["PATCH", `/llm_jobs/${first}`, 200, "number"],
  );
  const ack = find(first, /acknowledged/).at(-1)!;
  assert.equal(ack.entryId, read.entryId);
  const ended = find(first, /ended: completed/).at(-1)!;
  assert.equal(
    ended.message,
    `Job ${first} (followup) for user 7 ended: completed in ${ended.durationMs} ms (attempt 1 of 3, after 1 wait(s)); 10 prompt and 5 completion tokens.`,
  );
  assert.equal(ended.promptTokens, 10, "the job's tokens are fields of its end line");
  // The second job ran after the first, as its user's next job.
  const firstEnd = lines.indexOf(ended);
  assert.ok(lines.indexOf(find(second, /started/)[0]) > firstEnd);
});

Deno.test("a final PATCH Core answers 404: one warning, counted unrecorded on /metrics, not completed", async () => {
  await using stack = await startStack();
  const records: LogRecord[] = [];
  await configure({
    reset: true,
    sinks: { capture: (record) => records.push(record) },
    loggers: [
      { category: "llm-worker", lowestLevel: "info", sinks: ["capture"] },
      { category: ["logtape", "meta"], lowestLevel: "error", sinks: [] },
    ],
  });
  try {
    const worker = await stack.startWorker();
    // A job Core never heard of: the worker does the work, Core refuses to record it.
    await stack.publishRaw("llm:followup", [
      "data",
      JSON.stringify({
        job_id: "ghost-1",
        job_type: "followup",
        payload: { message: "Hi" },
        user_id: 1,
      }),
    ]);
    let text = "";
    await stack.waitFor(async () => {
      text = (await get(`${worker.http!.url}/metrics`)).text;
      return sample(text, "llm_worker_jobs_total", '{job_type="followup",outcome="unrecorded"}') ===
        1;
    }, "the unrecorded job on /metrics");
    assert.equal(
      sample(text, "llm_worker_jobs_total", '{job_type="followup",outcome="completed"}'),
      0,
    );
    assert.deepEqual(await stack.pending(), {}, "acknowledged");
    const warnings = records.filter((r) => r.level === "warning" || r.level === "error");
    assert.equal(warnings.length, 1, warnings.map((r) => r.message.join("")).join("\n"));
    assert.equal(warnings[0].level, "warning");
    assert.match(
      warnings[0].message.join(""),
      /^Job ghost-1 \(followup\) completed, but its result could not be recorded in Core: Core does not know the job \(404 to the final PATCH\)\./,
    );
    const ended = records.find((r) => r.properties.outcome !== undefined);
    assert.equal(ended?.properties.outcome, "unrecorded");
  } finally {
    await reset();
  }
});
