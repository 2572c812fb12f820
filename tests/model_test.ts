import assert from "node:assert/strict";
import { z } from "zod";
import { InvalidAnswerError } from "../lib/errors.ts";
import { LLMClient, LLMError } from "../lib/llm.ts";
import { configure, getLogger, type LogRecord, reset } from "@logtape/logtape";
import {
  jsonSchemaOf,
  ModelGateway,
  type ModelGatewayOptions,
  ModelHealth,
  type RepairEvent,
} from "../lib/model.ts";
import type { RequestGate } from "../lib/request_gate.ts";
import { Semaphore } from "../lib/semaphore.ts";
import { type ChatRequest, startModelServer } from "./helpers/model_server.ts";

const Tags = z.object({ tags: z.array(z.string()).min(1) });

function gateway(url: string, options: Partial<ModelGatewayOptions> = {}): ModelGateway {
  return new ModelGateway({
    llm: new LLMClient({ baseUrl: url }),
    models: { text: "mistral", vision: "llava" },
    concurrency: 4,
    ...options,
  });
}

/** Rejects unless `promise` fails with an {@linkcode InvalidAnswerError}; returns it. */
async function invalidAnswer(promise: Promise<unknown>): Promise<InvalidAnswerError> {
  let caught: unknown;
  await assert.rejects(promise, (error) => {
    caught = error;
    return true;
  });
  assert.ok(caught instanceof InvalidAnswerError, `expected InvalidAnswerError, got ${caught}`);
  return caught;
}

/** A reply that answers 400 whenever `response_format` is present, like servers without it. */
function noSchemaSupport(answer: string) {
  return (request: ChatRequest) =>
    request.body.response_format
      ? Response.json({ error: { message: "response_format is not supported" } }, { status: 400 })
      : answer;
}

Deno.test("ask returns the parsed and validated answer", async () => {
  await using model = startModelServer(() => '{"tags": ["sea", "sand"]}');
  const result = await gateway(model.url).ask({
    role: "text",
    prompt: "tags",
    schema: Tags,
    schemaName: "tags",
  });
  assert.deepEqual(result, { tags: ["sea", "sand"] });
  assert.equal(model.requests[0].body.model, "mistral");
});

Deno.test("ask reads JSON out of a chatty answer", async () => {
  await using model = startModelServer(() =>
    'Of course! Here are the tags:\n```json\n{"tags": ["dog"]}\n```\nEnjoy.'
  );
  const result = await gateway(model.url).ask({
    role: "text",
    prompt: "tags",
    schema: Tags,
    schemaName: "tags",
  });
  assert.deepEqual(result, { tags: ["dog"] });
});

Deno.test("ask throws InvalidAnswerError on chatty JSON that breaks the schema", async () => {
  await using model = startModelServer(() => 'Sure thing: {"tags": 7} hope it helps');
  const error = await invalidAnswer(
    gateway(model.url).ask({ role: "text", prompt: "tags", schema: Tags, schemaName: "tags" }),
  );
  assert.match(error.message, /tags schema/);
  assert.match(error.message, /tags:/);
  assert.match(error.answer, /"tags": 7/);
});

Deno.test("ask throws InvalidAnswerError when there is no JSON at all", async () => {
  await using model = startModelServer(() => "I cannot see any image, sorry.");
  const error = await invalidAnswer(
    gateway(model.url).ask({ role: "text", prompt: "tags", schema: Tags, schemaName: "tags" }),
  );
  assert.match(error.message, /No JSON/);
  assert.equal(error.answer, "I cannot see any image, sorry.");
});

Deno.test("ask strips <think> text before reading the JSON", async () => {
  await using model = startModelServer(() =>
    '<think>Maybe {"tags": []} would do? No.</think>\n{"tags": ["mountain"]}'
  );
  const result = await gateway(model.url).ask({
    role: "text",
    prompt: "tags",
    schema: Tags,
    schemaName: "tags",
  });
  assert.deepEqual(result, { tags: ["mountain"] });
});

Deno.test("askText strips <think> text and refuses an empty answer", async () => {
  let answer = "<think>what to ask...</think>\nWhich day do you mean?";
  await using model = startModelServer(() => answer);
  const models = gateway(model.url);
  assert.equal(await models.askText({ role: "text", prompt: "q" }), "Which day do you mean?");
  assert.equal(model.requests[0].body.response_format, undefined);
  answer = "<think>nothing to say</think>   ";
  await invalidAnswer(models.askText({ role: "text", prompt: "q" }));
});

Deno.test("ask with an image goes to the vision model with the image's MIME type", async () => {
  await using model = startModelServer(() => '{"tags": ["cat"]}');
  await gateway(model.url).ask({
    role: "vision",
    prompt: "tags",
    schema: Tags,
    schemaName: "tags",
    image: { open: () => Promise.resolve([new Uint8Array([0, 0, 0])]), mimeType: "image/gif" },
  });
  const body = model.requests[0].body;
  assert.equal(body.model, "llava");
  const content = body.messages.at(-1)?.content as Array<{ image_url?: { url: string } }>;
  assert.equal(content[1].image_url?.url, "data:image/gif;base64,AAAA");
});

Deno.test("an image is opened only once its request holds a model slot", async () => {
  const release = Promise.withResolvers<void>();
  await using model = startModelServer(async () => {
    await release.promise;
    return '{"tags": ["cat"]}';
  });
  const models = gateway(model.url, { concurrency: 1 });
  const first = models.askText({ role: "text", prompt: "busy" });
  let reads = 0;
  const second = models.ask({
    role: "vision",
    prompt: "tags",
    schema: Tags,
    schemaName: "tags",
    image: {
      open: () => {
        reads++;
        return Promise.resolve([new Uint8Array([0, 0, 0])]);
      },
      mimeType: "image/gif",
    },
  });
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(reads, 0, "waiting for the slot, the image is not in memory");
  release.resolve();
  await Promise.all([first, second]);
  assert.equal(reads, 1);
});

Deno.test("auto mode sends the JSON schema as response_format", async () => {
  await using model = startModelServer(() => '{"tags": ["a"]}');
  await gateway(model.url).ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
  const format = model.requests[0].body.response_format;
  assert.equal(format?.type, "json_schema");
  assert.equal(format?.json_schema?.name, "tags");
  assert.deepEqual(format?.json_schema?.schema, jsonSchemaOf(Tags));
});

Deno.test("auto mode falls back to prompt-only JSON once per model and remembers it", async () => {
  await using model = startModelServer(noSchemaSupport('{"tags": ["a"]}'));
  const models = gateway(model.url);
  const ask = (role: "text" | "vision") =>
    models.ask({ role, prompt: "t", schema: Tags, schemaName: "tags" });
  assert.deepEqual(await ask("text"), { tags: ["a"] });
  assert.deepEqual(await ask("text"), { tags: ["a"] });
  const sent = model.requests.map((r) => [r.body.model, r.body.response_format !== undefined]);
  assert.deepEqual(sent, [["mistral", true], ["mistral", false], ["mistral", false]]);
  // Another model is tried with the schema first, on its own.
  await ask("vision");
  await ask("vision");
  assert.deepEqual(
    model.requests.slice(3).map((r) => [r.body.model, r.body.response_format !== undefined]),
    [["llava", true], ["llava", false], ["llava", false]],
  );
});

Deno.test("auto mode does not remember a model whose fallback also failed", async () => {
  let up = false;
  await using model = startModelServer((request) =>
    request.body.response_format
      ? Response.json({ error: { message: "bad" } }, { status: 400 })
      : up
      ? '{"tags": ["a"]}'
      : new Response("overloaded", { status: 503 })
  );
  const models = gateway(model.url);
  const ask = () => models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
  await assert.rejects(ask(), (error) => error instanceof LLMError && error.kind === "unavailable");
  up = true;
  await ask();
  assert.deepEqual(
    model.requests.map((r) => r.body.response_format !== undefined),
    [true, false, true, false],
  );
});

Deno.test("mode off never sends response_format", async () => {
  await using model = startModelServer(() => '{"tags": ["a"]}');
  const models = gateway(model.url, { structuredOutput: "off" });
  await models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
  await models.ask({ role: "vision", prompt: "t", schema: Tags, schemaName: "tags" });
  assert.equal(model.requests.length, 2);
  assert.ok(model.requests.every((r) => r.body.response_format === undefined));
});

Deno.test("mode on always sends response_format and does not fall back", async () => {
  await using model = startModelServer(noSchemaSupport('{"tags": ["a"]}'));
  const models = gateway(model.url, { structuredOutput: "on" });
  const ask = () => models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
  for (let i = 0; i < 2; i++) {
    await assert.rejects(ask(), (error) => error instanceof LLMError && error.kind === "rejected");
  }
  assert.equal(model.requests.length, 2);
  assert.ok(model.requests.every((r) => r.body.response_format?.type === "json_schema"));
});

Deno.test("no more requests than `concurrency` are in flight at once", async () => {
  await using model = startModelServer(async () => {
    await new Promise((resolve) => setTimeout(resolve, 60));
    return '{"tags": ["a"]}';
  });
  const models = gateway(model.url, { concurrency: 2 });
  const asks = Array.from(
    { length: 6 },
    () => models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" }),
  );
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(models.inFlight, 2);
  const results = await Promise.all(asks);
  assert.equal(results.length, 6);
  assert.equal(model.requests.length, 6);
  assert.equal(model.maxInFlight, 2);
  assert.equal(models.inFlight, 0);
});

Deno.test("a failed request gives its slot back", async () => {
  await using model = startModelServer(() => new Response("down", { status: 500 }));
  const models = gateway(model.url, { concurrency: 1 });
  for (let i = 0; i < 3; i++) {
    await assert.rejects(
      models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" }),
      LLMError,
    );
  }
  assert.equal(models.inFlight, 0);
});

Deno.test("shared slots bound requests behind the gateway's own slots", async () => {
  await using model = startModelServer(async () => {
    await new Promise((resolve) => setTimeout(resolve, 60));
    return '{"tags": ["a"]}';
  });
  const shared = new Semaphore(2); // stands in for LLM_MAX_IN_FLIGHT's slots
  const models = gateway(model.url, { concurrency: 3, sharedSlots: shared });
  const asks = Array.from(
    { length: 6 },
    () => models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" }),
  );
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(models.inFlight, 2);
  assert.equal(shared.waiting, 1); // the third local slot's holder; the other three wait locally
  assert.equal(models.waiting, 4);
  await Promise.all(asks);
  assert.equal(model.maxInFlight, 2);
  assert.equal(models.inFlight + shared.held, 0);
});

/** A gate that counts what passes and records the pauses asked for. */
function recordingGate(admit: (signal?: AbortSignal) => Promise<void> = () => Promise.resolve()) {
  const gate = {
    admitted: 0,
    pauses: [] as number[],
    admit: (signal?: AbortSignal) => admit(signal).then(() => void gate.admitted++),
    pause: (ms: number) => void gate.pauses.push(ms),
    untilUnpaused: () => Promise.resolve(),
  } satisfies RequestGate & Record<string, unknown>;
  return gate;
}

Deno.test("every request passes the gate; a 429 with Retry-After pauses it", async () => {
  let calls = 0;
  await using model = startModelServer((request) => {
    calls++;
    if (calls === 1) {
      return Response.json({ error: { message: "slow down" } }, {
        status: 429,
        headers: { "retry-after": "2" },
      });
    }
    if (calls === 2) return Response.json({ error: { message: "busy" } }, { status: 429 });
    return noSchemaSupport('{"tags": ["a"]}')(request);
  });
  const gate = recordingGate();
  const models = gateway(model.url, { gate });
  const ask = () => models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
  await assert.rejects(ask(), (e) => e instanceof LLMError && e.status === 429);
  assert.deepEqual(gate.pauses, [2000]);
  await assert.rejects(ask(), (e) => e instanceof LLMError && e.status === 429);
  assert.deepEqual(gate.pauses, [2000]); // no Retry-After: no pause
  assert.deepEqual(await ask(), { tags: ["a"] }); // refused schema, then the fallback
  assert.equal(gate.admitted, model.requests.length); // the fallback passed the gate too
  assert.equal(model.requests.length, 4);
});

Deno.test("a request held at the gate gives up as an aborted LLMError", async () => {
  await using model = startModelServer(() => '{"tags": ["a"]}');
  const gate = recordingGate((signal) =>
    new Promise((_, reject) => signal?.addEventListener("abort", () => reject(signal.reason)))
  );
  const models = gateway(model.url, { gate, concurrency: 1 });
  const stop = new AbortController();
  const asked = models.ask({
    role: "text",
    prompt: "t",
    schema: Tags,
    schemaName: "tags",
    signal: stop.signal,
  });
  await new Promise((resolve) => setTimeout(resolve, 20));
  stop.abort(new Error("stopping"));
  await assert.rejects(asked, (e) => e instanceof LLMError && e.kind === "aborted");
  assert.equal(model.requests.length, 0);
  assert.equal(models.inFlight, 0);
});

Deno.test("jsonSchemaOf closes every object and drops $schema", () => {
  const schema = jsonSchemaOf(
    z.object({ a: z.string(), inner: z.object({ b: z.array(z.object({ c: z.number() })) }) }),
  );
  assert.equal(schema.$schema, undefined);
  assert.equal(schema.additionalProperties, false);
  const inner = (schema.properties as Record<string, Record<string, unknown>>).inner;
  assert.equal(inner.additionalProperties, false);
  const items = (inner.properties as Record<string, { items: Record<string, unknown> }>).b.items;
  assert.equal(items.additionalProperties, false);
  assert.deepEqual(schema.required, ["a", "inner"]);
});

Deno.test("ModelHealth starts available and untilAvailable resolves at once", async () => {
  let probes = 0;
  const health = new ModelHealth({
    probe: () => {
      probes++;
      return Promise.resolve();
    },
  });
  try {
    assert.equal(health.available, true);
    assert.equal(health.reason, "");
    await health.untilAvailable();
    assert.equal(probes, 0, "nothing is probed while the server is up");
  } finally {
    await health.close();
  }
});

Deno.test("ModelHealth: a failure marks it down and probes until the server answers", async () => {
  // /v1/models answers 503 three times, then 200: the real LLMClient.probe decides.
  let modelsCalls = 0;
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, () => {
    modelsCalls++;
    return modelsCalls <= 3
      ? new Response("loading", { status: 503 })
      : Response.json({ object: "list", data: [] });
  });
  const llm = new LLMClient({ baseUrl: `http://127.0.0.1:${server.addr.port}/v1` });
  const changes: boolean[] = [];
  const health = new ModelHealth({
    probe: (signal) => llm.probe(signal),
    probeIntervalsMs: [5, 10],
    onChange: (available) => changes.push(available),
  });
  try {
    health.reportFailure(new LLMError("unavailable", "connection refused"));
    assert.equal(health.available, false);
    assert.equal(health.reason, "connection refused");
    // A second failure while down changes nothing.
    health.reportFailure(new LLMError("unavailable", "again"));
    assert.equal(health.reason, "connection refused");
    await health.untilAvailable(AbortSignal.timeout(5_000));
    assert.equal(health.available, true);
    assert.equal(health.reason, "");
    assert.equal(modelsCalls, 4);
    assert.deepEqual(changes, [false, true]);
  } finally {
    await health.close();
  }
});

Deno.test("ModelHealth.untilAvailable rejects when its signal aborts", async () => {
  const health = new ModelHealth({
    probe: () => Promise.reject(new Error("still down")),
    probeIntervalsMs: [5],
  });
  try {
    health.reportFailure(new LLMError("unavailable", "down"));
    const controller = new AbortController();
    const waiting = health.untilAvailable(controller.signal);
    controller.abort(new Error("stop"));
    await assert.rejects(waiting, /stop/);
    assert.equal(health.available, false);
  } finally {
    await health.close();
  }
});

Deno.test("ModelHealth.close stops probing", async () => {
  let probes = 0;
  const health = new ModelHealth({
    probe: () => {
      probes++;
      return Promise.reject(new Error("still down"));
    },
    probeIntervalsMs: [5],
  });
  health.reportFailure(new LLMError("unavailable", "down"));
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.ok(probes >= 2, `probed ${probes} times`);
  await health.close();
  const after = probes;
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(probes, after);
  // After close a new failure does not start probing again.
  health.reportSuccess();
  health.reportFailure(new LLMError("unavailable", "down again"));
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(probes, after);
});

Deno.test("the gateway tells ModelHealth about unavailability and recovery", async () => {
  let down = true;
  await using model = startModelServer(() =>
    down ? new Response("overloaded", { status: 503 }) : '{"tags": ["a"]}'
  );
  const health = new ModelHealth({
    probe: () => Promise.reject(new Error("not yet")),
    probeIntervalsMs: [10_000],
  });
  try {
    const models = gateway(model.url, { health });
    const ask = () => models.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
    await assert.rejects(
      ask(),
      (error) => error instanceof LLMError && error.kind === "unavailable",
    );
    assert.equal(health.available, false);
    const recovered = health.untilAvailable();
    down = false;
    await ask();
    await recovered;
    assert.equal(health.available, true);
  } finally {
    await health.close();
  }
});

Deno.test("a rejected request does not mark the model server down", async () => {
  await using model = startModelServer(() =>
    Response.json({ error: { message: "bad request" } }, { status: 400 })
  );
  const health = new ModelHealth({ probe: () => Promise.resolve() });
  try {
    const models = gateway(model.url, { health, structuredOutput: "off" });
    await assert.rejects(
      models.askText({ role: "text", prompt: "t" }),
      (error) => error instanceof LLMError && error.kind === "rejected",
    );
    assert.equal(health.available, true);
  } finally {
    await health.close();
  }
});

Deno.test("ModelHealth keeps probing when a failure comes just as a probe loop ends", async () => {
  // A job's success ends the probe loop; a new failure reported in the ticks around that end
  // must still lead to probing, or waiting jobs would wait for ever.
  for (let ticks = 0; ticks < 6; ticks++) {
    let wakeFirst: (() => void) | undefined;
    let probes = 0;
    const health = new ModelHealth({
      probe: () => {
        probes++;
        return Promise.resolve();
      },
      sleep: (_ms, signal) =>
        new Promise<void>((resolve, reject) => {
          signal?.addEventListener("abort", () => reject(signal.reason), { once: true });
          if (!wakeFirst) wakeFirst = resolve;
          else setTimeout(resolve, 1);
        }),
    });
    try {
      health.reportFailure(new LLMError("unavailable", "first"));
      health.reportSuccess(); // a job got through: the loop will end at its next look
      wakeFirst!();
      for (let i = 0; i < ticks; i++) await Promise.resolve();
      health.reportFailure(new LLMError("unavailable", "second"));
      await health.untilAvailable(AbortSignal.timeout(2_000));
      assert.equal(health.available, true, `ticks=${ticks}`);
      assert.equal(probes, 1, `ticks=${ticks}`);
    } finally {
      await health.close();
    }
  }
});

Deno.test("a mended answer is told to onRepair and logged at debug on the job's logger", async () => {
  const records: LogRecord[] = [];
  await configure({
    reset: true,
    sinks: { buffer: (record) => records.push(record) },
    loggers: [
      { category: "job-test", lowestLevel: "debug", sinks: ["buffer"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["buffer"] },
    ],
  });
  try {
    await using model = startModelServer(() => "Here: {tags: 'sea, sand',}");
    const events: RepairEvent[] = [];
    const view = gateway(model.url, { onRepair: (event) => events.push(event) })
      .forJob("image_tag", { log: getLogger(["job-test"]) });
    const result = await view.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
    assert.deepEqual(result, { tags: ["sea", "sand"] });
    assert.deepEqual(events, [{
      jobType: "image_tag",
      schemaName: "tags",
      repairs: ["json_in_text", "json_syntax", "list_from_text"],
    }]);
    assert.equal(records.length, 1);
    assert.equal(records[0].level, "debug");
    assert.equal(records[0].properties.repairs, "json_in_text, json_syntax, list_from_text");

    // A clean answer is neither told nor logged.
    model.setReply(() => '{"tags": ["sea"]}');
    await view.ask({ role: "text", prompt: "t", schema: Tags, schemaName: "tags" });
    assert.equal(events.length, 1);
    assert.equal(records.length, 1);
  } finally {
    await reset();
  }
});
