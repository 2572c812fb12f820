import assert from "node:assert/strict";
import { CoreApiClient, CoreApiError } from "../lib/core_api.ts";
import { startCoreEmulator } from "../testing/core_emulator.ts";
import { freePort } from "../testing/redis_server.ts";

/** One request as a custom test server saw it. */
interface Seen {
  method: string;
  path: string;
  query: Record<string, string>;
  contentType: string | null;
  body: string;
}

/** A tiny Core stand-in that records every request and answers with `reply`. */
function startServer(reply: (seen: Seen) => Response | Promise<Response>) {
  const seen: Seen[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const url = new URL(req.url);
    const request: Seen = {
      method: req.method,
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
      contentType: req.headers.get("content-type"),
      body: await req.text(),
    };
    seen.push(request);
    return await reply(request);
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    seen,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

/** Rejects unless `promise` fails with a {@linkcode CoreApiError}; returns it. */
async function coreFailure(promise: Promise<unknown>): Promise<CoreApiError> {
  let caught: unknown;
  await assert.rejects(promise, (error) => {
    caught = error;
    return true;
  });
  assert.ok(caught instanceof CoreApiError, `expected CoreApiError, got ${caught}`);
  return caught;
}

Deno.test("updateJob PATCHes a JSON body and returns the job", async () => {
  await using core = startCoreEmulator();
  core.seedJob({ id: "job-1", job_type: "followup", payload: { message: "hi" }, user_id: 1 });
  const client = new CoreApiClient({ baseUrl: core.url });
  const job = await client.updateJob("job-1", {
    status: "completed",
    result: { question: "When?" },
  });
  assert.equal(job.status, "completed");
  assert.deepEqual(job.result, { question: "When?" });
  assert.deepEqual(core.state.requests.map((r) => [r.method, r.path, r.status]), [
    ["PATCH", "/llm_jobs/job-1", 200],
  ]);
  assert.deepEqual(core.state.requests[0].body, {
    status: "completed",
    result: { question: "When?" },
  });
  assert.equal(core.state.jobs.get("job-1")?.status, "completed");
});

Deno.test("updateJob sends content-type application/json and exactly the update", async () => {
  await using server = startServer(() => Response.json({ id: "j", status: "failed" }));
  const client = new CoreApiClient({ baseUrl: `${server.url}/` });
  const job = await client.updateJob("j/1", { status: "failed", error_message: "bad payload" });
  assert.equal(job.status, "failed");
  assert.equal(server.seen.length, 1);
  const [seen] = server.seen;
  assert.equal(seen.method, "PATCH");
  assert.equal(seen.path, "/llm_jobs/j%2F1", "the job id is one path segment");
  assert.equal(seen.contentType, "application/json");
  assert.deepEqual(JSON.parse(seen.body), { status: "failed", error_message: "bad payload" });
});

Deno.test("updateJob: a 500 is a retryable CoreApiError naming the method and URL", async () => {
  await using server = startServer(() => new Response("Internal Server Error", { status: 500 }));
  const client = new CoreApiClient({ baseUrl: server.url });
  const error = await coreFailure(client.updateJob("job-9", { status: "processing" }));
  assert.equal(error.status, 500);
  assert.equal(error.retryable, true);
  assert.equal(error.method, "PATCH");
  assert.equal(error.url, `${server.url}/llm_jobs/job-9`);
  assert.ok(error.message.includes(`PATCH ${server.url}/llm_jobs/job-9`), error.message);
  assert.match(error.message, /500/);
  assert.match(error.body, /Internal Server Error/);
});

Deno.test("updateJob: a 404 is a CoreApiError that is not retryable", async () => {
  await using core = startCoreEmulator();
  const client = new CoreApiClient({ baseUrl: core.url });
  const error = await coreFailure(client.updateJob("missing", { status: "completed" }));
  assert.equal(error.status, 404);
  assert.equal(error.retryable, false);
  assert.match(error.message, /Job not found/);
});

Deno.test("a 429 and a 503 from Core are retryable, a 400 is not", async () => {
  let status = 429;
  await using server = startServer(() => new Response("nope", { status }));
  const client = new CoreApiClient({ baseUrl: server.url });
  assert.equal((await coreFailure(client.getJob("x"))).retryable, true);
  status = 503;
  assert.equal((await coreFailure(client.getJob("x"))).retryable, true);
  status = 400;
  assert.equal((await coreFailure(client.getJob("x"))).retryable, false);
});

Deno.test("getJob reads a job", async () => {
  await using core = startCoreEmulator();
  core.seedJob({ id: "job-2", job_type: "intent_classify", payload: {}, user_id: 3 });
  const client = new CoreApiClient({ baseUrl: core.url });
  const job = await client.getJob("job-2");
  assert.equal(job.status, "queued");
  assert.equal(job.user_id, 3);
  assert.equal(core.state.requests[0].method, "GET");
});

Deno.test("addTags sends the tags with status suggested", async () => {
  await using core = startCoreEmulator();
  const memory = core.seedMemory({
    owner_user_id: 1,
    content: "",
    media_type: "image",
    tags: [{ tag: "beach", status: "confirmed" }],
  });
  const client = new CoreApiClient({ baseUrl: core.url });
  await client.addTags(memory.id, ["sea", "sunset"]);
  const request = core.state.requests[0];
  assert.equal(request.method, "POST");
  assert.equal(request.path, `/memories/${memory.id}/tags`);
  assert.equal(request.status, 200);
  assert.deepEqual(request.body, { tags: ["sea", "sunset"], status: "suggested" });
  assert.deepEqual(core.state.memories.get(memory.id)?.tags, [
    { tag: "beach", status: "confirmed" },
    { tag: "sea", status: "suggested" },
    { tag: "sunset", status: "suggested" },
  ]);
});

Deno.test("getMemory reads a memory and a 404 is not retryable", async () => {
  await using core = startCoreEmulator();
  const memory = core.seedMemory({ owner_user_id: 1, content: "Buy milk" });
  const client = new CoreApiClient({ baseUrl: core.url });
  assert.equal((await client.getMemory(memory.id)).content, "Buy milk");
  const error = await coreFailure(client.getMemory("gone"));
  assert.equal(error.status, 404);
  assert.equal(error.retryable, false);
});

Deno.test("createEvent posts the event and returns the parsed body", async () => {
  await using core = startCoreEmulator();
  const client = new CoreApiClient({ baseUrl: core.url });
  const event = {
    owner_user_id: 7,
    event_time: "2026-04-02T15:00:00+01:00",
    description: "Dentist",
    source_type: "email",
    source_detail: "Your appointment",
  };
  const created = await client.createEvent(event);
  assert.equal(typeof created.id, "string");
  assert.equal(created.status, "pending");
  assert.equal(created.description, "Dentist");
  assert.equal(core.state.events.get(created.id)?.event_time, event.event_time);
  assert.deepEqual(core.state.requests[0].body, event);
  assert.equal(core.state.requests[0].status, 201);
});

Deno.test("createMemory posts owner and content and returns the new memory (201)", async () => {
  await using core = startCoreEmulator();
  const client = new CoreApiClient({ baseUrl: core.url });
  const memory = await client.createMemory(5, "Call mum tomorrow");
  assert.equal(typeof memory.id, "string");
  assert.equal(memory.content, "Call mum tomorrow");
  assert.deepEqual(core.state.requests[0].body, { owner_user_id: 5, content: "Call mum tomorrow" });
  assert.equal(core.state.requests[0].status, 201);
  assert.equal(core.state.memories.get(memory.id)?.owner_user_id, 5);
});

Deno.test("getOpenTasks sends owner_user_id and state=NOT_DONE", async () => {
  await using core = startCoreEmulator();
  const open = core.seedTask({ owner_user_id: 4, description: "Renew passport" });
  core.seedTask({ owner_user_id: 4, description: "Done already", state: "DONE" });
  core.seedTask({ owner_user_id: 5, description: "Someone else's" });
  const client = new CoreApiClient({ baseUrl: core.url });
  const tasks = await client.getOpenTasks(4);
  assert.deepEqual(tasks.map((t) => t.id), [open.id]);
  assert.equal(tasks[0].description, "Renew passport");
  const request = core.state.requests[0];
  assert.equal(request.method, "GET");
  assert.equal(request.path, "/tasks");
  assert.deepEqual(request.query, { owner_user_id: "4", state: "NOT_DONE" });
});

Deno.test("getOpenTasks answers an empty list when the user has no open task", async () => {
  await using core = startCoreEmulator();
  const client = new CoreApiClient({ baseUrl: core.url });
  assert.deepEqual(await client.getOpenTasks(9), []);
});

Deno.test("search sends q and owner and returns the hits", async () => {
  await using core = startCoreEmulator();
  core.seedMemory({ owner_user_id: 2, content: "Holiday in Crete" });
  core.seedMemory({ owner_user_id: 3, content: "Holiday in Rome" });
  const client = new CoreApiClient({ baseUrl: core.url });
  const hits = await client.search("holiday crete", 2);
  assert.equal(hits.length, 1);
  assert.equal(hits[0].memory.content, "Holiday in Crete");
  assert.equal(typeof hits[0].score, "number");
  const request = core.state.requests[0];
  assert.equal(request.path, "/search");
  assert.deepEqual(request.query, { q: "holiday crete", owner: "2" });
});

Deno.test("search encodes the query string", async () => {
  await using server = startServer(() => Response.json([]));
  const client = new CoreApiClient({ baseUrl: server.url });
  assert.deepEqual(await client.search("fish & chips #1", 2), []);
  assert.deepEqual(server.seen[0].query, { q: "fish & chips #1", owner: "2" });
  assert.equal(server.seen[0].method, "GET");
  assert.equal(server.seen[0].contentType, null, "a GET carries no body");
});

Deno.test("getSettings reads the user's timezone, UTC when unset", async () => {
  await using core = startCoreEmulator();
  core.seedSettings(11, "Europe/London");
  const client = new CoreApiClient({ baseUrl: core.url });
  assert.equal((await client.getSettings(11)).timezone, "Europe/London");
  assert.equal((await client.getSettings(12)).timezone, "UTC");
  assert.deepEqual(core.state.requests.map((r) => r.path), ["/settings/11", "/settings/12"]);
});

Deno.test("a hung Core times out as a retryable CoreApiError with status 0", async () => {
  const release = Promise.withResolvers<void>();
  await using server = startServer(async () => {
    await release.promise;
    return Response.json({});
  });
  const client = new CoreApiClient({ baseUrl: server.url, timeoutMs: 100 });
  try {
    const started = performance.now();
    const error = await coreFailure(client.getSettings(1));
    assert.equal(error.status, 0);
    assert.equal(error.retryable, true);
    assert.equal(error.timedOut, true);
    assert.match(error.message, /100 ms/);
    assert.ok(performance.now() - started < 5_000);
  } finally {
    release.resolve();
  }
});

Deno.test("a refused connection is a retryable CoreApiError with status 0", async () => {
  const port = freePort();
  const client = new CoreApiClient({ baseUrl: `http://127.0.0.1:${port}` });
  const error = await coreFailure(client.updateJob("j", { status: "processing" }));
  assert.equal(error.status, 0);
  assert.equal(error.timedOut, false);
  assert.equal(error.retryable, true);
  assert.match(error.message, /could not be reached/);
  assert.match(error.message, /CORE_API_URL/);
});

Deno.test("the caller's abort signal cancels the call with its own reason", async () => {
  const release = Promise.withResolvers<void>();
  await using server = startServer(async () => {
    await release.promise;
    return Response.json({});
  });
  const client = new CoreApiClient({ baseUrl: server.url, timeoutMs: 10_000 });
  const controller = new AbortController();
  const reason = new Error("shutting down");
  try {
    const pending = client.getJob("j", controller.signal);
    setTimeout(() => controller.abort(reason), 30);
    await assert.rejects(pending, (error) => error === reason);
  } finally {
    release.resolve();
  }
});

Deno.test("a 422 detail list becomes a readable message", async () => {
  await using core = startCoreEmulator();
  const client = new CoreApiClient({ baseUrl: core.url });
  const error = await coreFailure(
    client.createEvent({
      owner_user_id: 1,
      event_time: "April 2, 3 PM",
      description: "Dentist",
      source_type: "email",
      source_detail: "s",
    }),
  );
  assert.equal(error.status, 422);
  assert.equal(error.retryable, false);
  assert.match(error.message, /body\.event_time: Input should be a valid datetime or date/);
  assert.ok(!error.message.includes("{"), `no raw JSON in: ${error.message}`);
});

Deno.test("a fault injected in the emulator surfaces as a CoreApiError", async () => {
  await using core = startCoreEmulator();
  core.setFault(({ method }) =>
    method === "POST" ? new Response("database is down", { status: 503 }) : undefined
  );
  const client = new CoreApiClient({ baseUrl: core.url });
  const error = await coreFailure(client.createMemory(1, "x"));
  assert.equal(error.status, 503);
  assert.equal(error.retryable, true);
  assert.match(error.message, /database is down/);
  core.setFault(undefined);
  assert.equal((await client.createMemory(1, "x")).content, "x");
});

Deno.test("a success that is not JSON is a CoreApiError", async () => {
  await using server = startServer(() => new Response("<html>proxy</html>", { status: 200 }));
  const client = new CoreApiClient({ baseUrl: server.url });
  const error = await coreFailure(client.getJob("j"));
  assert.equal(error.status, 200);
  assert.match(error.message, /not JSON/);
});

Deno.test("a long error body is shortened", async () => {
  await using server = startServer(() => new Response("x".repeat(5_000), { status: 500 }));
  const client = new CoreApiClient({ baseUrl: server.url });
  const error = await coreFailure(client.getJob("j"));
  assert.ok(error.body.length <= 301, `body length ${error.body.length}`);
});

Deno.test("a passing 503 is tried again at once: one call in three failing stays invisible", async () => {
  let calls = 0;
  await using server = startServer(() =>
    ++calls % 3 === 1 ? new Response("busy", { status: 503 }) : Response.json({ timezone: "UTC" })
  );
  const client = new CoreApiClient({ baseUrl: server.url, retryDelaysMs: [1, 1] });
  assert.equal((await client.getSettings(1)).timezone, "UTC");
  assert.deepEqual(server.seen.map((r) => r.path), ["/settings/1", "/settings/1"]);
});

Deno.test("quick retries give up after the last delay and throw the last failure", async () => {
  await using server = startServer(() => new Response("overloaded", { status: 502 }));
  const client = new CoreApiClient({ baseUrl: server.url, retryDelaysMs: [1, 1] });
  const error = await coreFailure(client.createMemory(1, "x"));
  assert.equal(error.status, 502);
  assert.equal(server.seen.length, 3);
});

Deno.test("a 500, a 4xx and a timeout are not tried again quickly", async () => {
  let status = 500;
  await using server = startServer(async () => {
    if (status === 0) await new Promise((resolve) => setTimeout(resolve, 300));
    return new Response("no", { status: status || 200 });
  });
  const client = new CoreApiClient({ baseUrl: server.url, retryDelaysMs: [1, 1], timeoutMs: 50 });
  await coreFailure(client.getJob("j"));
  status = 404;
  await coreFailure(client.getJob("j"));
  status = 0;
  assert.equal((await coreFailure(client.getJob("j"))).status, 0);
  assert.equal(server.seen.length, 3);
});

Deno.test("the caller's abort signal ends the wait between quick retries", async () => {
  await using server = startServer(() => new Response("busy", { status: 503 }));
  const client = new CoreApiClient({ baseUrl: server.url, retryDelaysMs: [60_000] });
  const controller = new AbortController();
  const reason = new Error("stopping");
  const pending = client.getJob("j", controller.signal);
  setTimeout(() => controller.abort(reason), 50);
  await assert.rejects(pending, (error) => error === reason);
  assert.equal(server.seen.length, 1);
});
