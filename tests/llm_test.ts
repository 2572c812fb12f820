import assert from "node:assert/strict";
import { type CompletionEvent, LLMClient, LLMError, retryAfterMs } from "../lib/llm.ts";
import { imageFileChunks } from "../lib/image_body.ts";
import { type ChatRequest, startModelServer } from "./helpers/model_server.ts";
import { freePort } from "../testing/redis_server.ts";

/** The smallest valid PNG header: signature plus the start of an IHDR chunk. */
const PNG_BYTES = new Uint8Array([
  0x89,
  0x50,
  0x4e,
  0x47,
  0x0d,
  0x0a,
  0x1a,
  0x0a,
  0x00,
  0x00,
  0x00,
  0x0d,
  0x49,
  0x48,
  0x44,
  0x52,
  0x00,
  0x00,
  0x00,
  0x01,
  0x00,
  0x00,
  0x00,
  0x01,
  0x08,
  0x06,
]);
const PNG_B64 = btoa(String.fromCharCode(...PNG_BYTES));

/** Rejects unless `error` is an {@linkcode LLMError} of `kind`; returns it for more checks. */
async function llmFailure(promise: Promise<unknown>, kind: LLMError["kind"]): Promise<LLMError> {
  let caught: unknown;
  await assert.rejects(promise, (error) => {
    caught = error;
    return true;
  });
  assert.ok(caught instanceof LLMError, `expected LLMError, got ${caught}`);
  assert.equal(caught.kind, kind, caught.message);
  return caught;
}

/** A reply that holds the request until the client goes away or `release` resolves. */
function hanging(release: Promise<void>) {
  return async (_request: ChatRequest) => {
    await release;
    return "too late";
  };
}

Deno.test("LLMClient.complete returns the text and sends temperature 0.3", async () => {
  await using model = startModelServer(() => "Hello there");
  const llm = new LLMClient({ baseUrl: model.url });
  try {
    const text = await llm.complete("mistral", "Say hello");
    assert.equal(text, "Hello there");
    assert.equal(model.requests.length, 1);
    const body = model.requests[0].body;
    assert.equal(body.model, "mistral");
    assert.equal(body.temperature, 0.3);
    assert.deepEqual(body.messages, [{ role: "user", content: "Say hello" }]);
    assert.equal(body.response_format, undefined);
  } finally {
    llm.close();
  }
});

Deno.test("LLMClient sends the API key as a bearer token", async () => {
  await using model = startModelServer(() => "ok");
  const llm = new LLMClient({ baseUrl: model.url, apiKey: "sk-test-123" });
  await llm.complete("mistral", "hi");
  assert.equal(model.requests[0].headers.get("authorization"), "Bearer sk-test-123");
});

Deno.test("LLMClient leaves out the SDK's telemetry headers and keeps the rest", async () => {
  await using model = startModelServer(() => "ok");
  const llm = new LLMClient({ baseUrl: model.url });
  await llm.complete("mistral", "hi");
  const headers = model.requests[0].headers;
  assert.deepEqual([...headers.keys()].filter((name) => name.startsWith("x-stainless")), []);
  assert.equal(headers.get("content-type"), "application/json");
  assert.equal(headers.get("accept"), "application/json");
  assert.match(headers.get("user-agent") ?? "", /OpenAI/);
});

Deno.test("LLMClient sends a system message first when given", async () => {
  await using model = startModelServer(() => "ok");
  const llm = new LLMClient({ baseUrl: model.url });
  await llm.complete("mistral", "the prompt", { system: "You are terse." });
  assert.deepEqual(model.requests[0].body.messages, [
    { role: "system", content: "You are terse." },
    { role: "user", content: "the prompt" },
  ]);
});

Deno.test("LLMClient.complete returns an empty string when the server sends no content", async () => {
  await using model = startModelServer(() =>
    Response.json({
      id: "x",
      object: "chat.completion",
      created: 0,
      model: "m",
      choices: [{ index: 0, message: { role: "assistant", content: null }, finish_reason: "stop" }],
    })
  );
  const llm = new LLMClient({ baseUrl: model.url });
  assert.equal(await llm.complete("mistral", "hi"), "");
});

Deno.test("completeWithImage sends a text part and a PNG data URL sniffed from the bytes", async () => {
  await using model = startModelServer(() => "A tiny picture");
  const llm = new LLMClient({ baseUrl: model.url });
  const text = await llm.completeWithImage("llava", "Describe this", PNG_B64);
  assert.equal(text, "A tiny picture");
  const body = model.requests[0].body;
  assert.equal(body.model, "llava");
  assert.equal(body.temperature, 0.3);
  const content = body.messages.at(-1)?.content as Array<Record<string, unknown>>;
  assert.ok(Array.isArray(content));
  assert.deepEqual(content[0], { type: "text", text: "Describe this" });
  assert.equal(content[1].type, "image_url");
  const imageUrl = (content[1].image_url as { url: string }).url;
  assert.equal(imageUrl, `data:image/png;base64,${PNG_B64}`);
});

Deno.test("completeWithImageSource streams the file into the same request", async () => {
  await using model = startModelServer(() => "A large picture");
  const path = await Deno.makeTempFile({ suffix: ".png" });
  try {
    const bytes = new Uint8Array(300_000);
    for (let at = 0; at < bytes.length; at += 65_536) {
      crypto.getRandomValues(bytes.subarray(at, at + 65_536));
    }
    bytes.set(PNG_BYTES);
    await Deno.writeFile(path, bytes);
    const llm = new LLMClient({ baseUrl: model.url });
    const text = await llm.completeWithImageSource("llava", "Describe this", {
      mimeType: "image/png",
      open: async () => (await Deno.open(path)).readable,
    }, { system: "Be brief." });
    assert.equal(text, "A large picture");
    const request = model.requests[0];
    assert.equal(request.headers.get("transfer-encoding"), "chunked");
    assert.equal(request.headers.get("content-type"), "application/json");
    assert.equal(request.body.model, "llava");
    assert.deepEqual(request.body.messages[0], { role: "system", content: "Be brief." });
    const content = request.body.messages.at(-1)?.content as Array<Record<string, unknown>>;
    assert.deepEqual(content[0], { type: "text", text: "Describe this" });
    assert.equal(
      (content[1].image_url as { url: string }).url,
      `data:image/png;base64,${bytes.toBase64()}`,
    );
  } finally {
    await Deno.remove(path);
  }
});

Deno.test("completeWithImageSource: four 2 MB photos at once, read with imageFileChunks, arrive byte for byte", async () => {
  await using model = startModelServer(() => "A photo");
  const dir = await Deno.makeTempDir();
  try {
    const photos = await Promise.all([0, 1, 2, 3].map(async (i) => {
      const bytes = new Uint8Array(2_000_000 + i * 7);
      for (let at = 0; at < bytes.length; at += 65_536) {
        crypto.getRandomValues(bytes.subarray(at, at + 65_536));
      }
      bytes.set(PNG_BYTES);
      const path = `${dir}/photo-${i}`;
      await Deno.writeFile(path, bytes);
      return { path, bytes };
    }));
    const llm = new LLMClient({ baseUrl: model.url });
    const answers = await Promise.all(
      photos.map(({ path, bytes }, i) =>
        llm.completeWithImageSource("llava", `photo ${i}`, {
          mimeType: "image/png",
          open: () => imageFileChunks(path, bytes.length),
        })
      ),
    );
    assert.deepEqual(answers, ["A photo", "A photo", "A photo", "A photo"]);
    assert.equal(model.requests.length, 4);
    for (const request of model.requests) {
      const content = request.body.messages.at(-1)?.content as Array<Record<string, unknown>>;
      const i = Number(String((content[0] as { text: string }).text).split(" ")[1]);
      assert.equal(
        (content[1].image_url as { url: string }).url,
        `data:image/png;base64,${photos[i].bytes.toBase64()}`,
        `photo ${i}`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("completeWithImageSource: the image's own failure is thrown as it is, not blamed on the model", async () => {
  await using model = startModelServer(() => "never");
  const events: CompletionEvent[] = [];
  const llm = new LLMClient({ baseUrl: model.url, onCompletion: (event) => events.push(event) });
  const gone = new Error("the photo was deleted");
  await assert.rejects(
    llm.completeWithImageSource("llava", "Describe", {
      mimeType: "image/png",
      open: () => Promise.reject(gone),
    }),
    (error) => error === gone,
  );
  const broken = new Error("read failed half way");
  await assert.rejects(
    llm.completeWithImageSource("llava", "Describe", {
      mimeType: "image/png",
      open: () =>
        Promise.resolve((async function* () {
          for (let i = 0; i < 4; i++) yield new Uint8Array(49_152);
          throw broken;
        })()),
    }),
    (error) => error === broken,
  );
  assert.deepEqual(events, [], "no model outcome is reported for a request that never was");
});

Deno.test("completeWithImageSource: a refused connection is unavailable and the file is closed", async () => {
  const path = await Deno.makeTempFile({ suffix: ".png" });
  try {
    await Deno.writeFile(path, new Uint8Array(200_000));
    const llm = new LLMClient({ baseUrl: `http://127.0.0.1:${freePort()}/v1` });
    await llmFailure(
      llm.completeWithImageSource("llava", "Describe", {
        mimeType: "image/png",
        open: async () => (await Deno.open(path)).readable,
      }),
      "unavailable",
    );
    // The test's resource sanitizer fails it if the file were left open.
  } finally {
    await Deno.remove(path);
  }
});

Deno.test("completeWithImage sniffs JPEG, GIF and WebP too", async () => {
  await using model = startModelServer(() => "ok");
  const llm = new LLMClient({ baseUrl: model.url });
  const samples: Array<[Uint8Array, string]> = [
    [new Uint8Array([0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46, 0x49, 0x46]), "image/jpeg"],
    [new TextEncoder().encode("GIF89a\x01\x00\x01\x00"), "image/gif"],
    [new TextEncoder().encode("RIFF\x24\x00\x00\x00WEBPVP8 "), "image/webp"],
  ];
  for (const [bytes, mime] of samples) {
    await llm.completeWithImage("llava", "Describe", btoa(String.fromCharCode(...bytes)));
    const content = model.requests.at(-1)!.body.messages.at(-1)?.content as Array<
      { image_url?: { url: string } }
    >;
    assert.ok(content[1].image_url!.url.startsWith(`data:${mime};base64,`), mime);
  }
});

Deno.test("completeWithImage: an explicit MIME type wins over the bytes", async () => {
  await using model = startModelServer(() => "ok");
  const llm = new LLMClient({ baseUrl: model.url });
  await llm.completeWithImage("llava", "Describe", PNG_B64, "image/webp");
  const content = model.requests[0].body.messages.at(-1)?.content as Array<
    { image_url?: { url: string } }
  >;
  assert.equal(content[1].image_url!.url, `data:image/webp;base64,${PNG_B64}`);
});

Deno.test("the jsonSchema option sends response_format json_schema", async () => {
  await using model = startModelServer(() => '{"tags": ["a"]}');
  const llm = new LLMClient({ baseUrl: model.url });
  const schema = {
    type: "object",
    properties: { tags: { type: "array", items: { type: "string" } } },
    required: ["tags"],
    additionalProperties: false,
  };
  const text = await llm.complete("mistral", "tags please", {
    jsonSchema: { name: "image_tags", schema },
  });
  assert.equal(text, '{"tags": ["a"]}');
  const format = model.requests[0].body.response_format as {
    type: string;
    json_schema: { name: string; schema: unknown; strict?: boolean };
  };
  assert.equal(format.type, "json_schema");
  assert.equal(format.json_schema.name, "image_tags");
  assert.deepEqual(format.json_schema.schema, schema);
});

Deno.test("a 500 is an unavailable LLMError and the SDK does not retry it", async () => {
  await using model = startModelServer(() => new Response("model crashed", { status: 500 }));
  const llm = new LLMClient({ baseUrl: model.url });
  const error = await llmFailure(llm.complete("mistral", "hi"), "unavailable");
  assert.equal(error.status, 500);
  assert.equal(error.retryable, true);
  assert.equal(model.requests.length, 1, "the SDK must not retry on its own");
});

Deno.test("a 503 with Retry-After is not retried by the SDK either", async () => {
  await using model = startModelServer(() =>
    new Response("loading", { status: 503, headers: { "retry-after": "0" } })
  );
  const llm = new LLMClient({ baseUrl: model.url });
  await llmFailure(llm.complete("mistral", "hi"), "unavailable");
  assert.equal(model.requests.length, 1);
});

Deno.test("a refused connection is an unavailable LLMError", async () => {
  const llm = new LLMClient({ baseUrl: `http://127.0.0.1:${freePort()}/v1` });
  const error = await llmFailure(llm.complete("mistral", "hi"), "unavailable");
  assert.equal(error.status, undefined);
  assert.match(error.message, /could not be reached/);
});

Deno.test("a 400 is a rejected LLMError", async () => {
  await using model = startModelServer(() =>
    Response.json({ error: { message: "context length exceeded", type: "invalid_request" } }, {
      status: 400,
    })
  );
  const llm = new LLMClient({ baseUrl: model.url });
  const error = await llmFailure(llm.complete("mistral", "hi"), "rejected");
  assert.equal(error.status, 400);
  assert.equal(error.retryable, false);
  assert.match(error.message, /400/);
  assert.equal(model.requests.length, 1);
});

Deno.test("a 429 keeps its Retry-After in milliseconds", async () => {
  await using model = startModelServer(() =>
    Response.json({ error: { message: "slow down" } }, {
      status: 429,
      headers: { "retry-after": "7" },
    })
  );
  const llm = new LLMClient({ baseUrl: model.url });
  const error = await llmFailure(llm.complete("mistral", "hi"), "unavailable");
  assert.equal(error.status, 429);
  assert.equal(error.retryAfterMs, 7000);
  assert.equal(model.requests.length, 1);
});

Deno.test("a server slower than the timeout is an unavailable LLMError", async () => {
  const release = Promise.withResolvers<void>();
  await using model = startModelServer(hanging(release.promise));
  const llm = new LLMClient({ baseUrl: model.url });
  try {
    const started = performance.now();
    const error = await llmFailure(
      llm.complete("mistral", "hi", { timeoutMs: 150 }),
      "unavailable",
    );
    assert.match(error.message, /timed out/);
    assert.ok(performance.now() - started < 5_000);
  } finally {
    release.resolve();
  }
});

Deno.test("textTimeoutMs bounds text requests and imageTimeoutMs image requests", async () => {
  await using model = startModelServer(async () => {
    await new Promise((resolve) => setTimeout(resolve, 300));
    return "slow answer";
  });
  const fastText = new LLMClient({ baseUrl: model.url, textTimeoutMs: 100 });
  await llmFailure(fastText.complete("mistral", "hi"), "unavailable");
  // Image requests use their own, longer timeout.
  assert.equal(await fastText.completeWithImage("llava", "hi", PNG_B64), "slow answer");
  const fastImage = new LLMClient({ baseUrl: model.url, imageTimeoutMs: 100 });
  await llmFailure(fastImage.completeWithImage("llava", "hi", PNG_B64), "unavailable");
  // Let the abandoned handlers finish before the server closes.
  await new Promise((resolve) => setTimeout(resolve, 300));
});

Deno.test("a cancelled request is an aborted LLMError", async () => {
  const release = Promise.withResolvers<void>();
  await using model = startModelServer(hanging(release.promise));
  const llm = new LLMClient({ baseUrl: model.url });
  const controller = new AbortController();
  try {
    const pending = llm.complete("mistral", "hi", { signal: controller.signal });
    setTimeout(() => controller.abort(), 50);
    const error = await llmFailure(pending, "aborted");
    assert.equal(error.retryable, false);
  } finally {
    release.resolve();
  }
});

Deno.test("probe resolves on a live server", async () => {
  await using model = startModelServer(() => "ok");
  const llm = new LLMClient({ baseUrl: model.url });
  await llm.probe();
});

Deno.test("probe resolves when the server has no /models (404)", async () => {
  await using model = startModelServer(() => "ok");
  // The helper answers 404 for anything but /v1/...: point the client at /v2.
  const llm = new LLMClient({ baseUrl: model.url.replace(/\/v1$/, "/v2") });
  await llm.probe();
  await llmFailure(llm.complete("mistral", "hi"), "rejected");
});

Deno.test("probe throws unavailable when the connection is refused", async () => {
  const llm = new LLMClient({ baseUrl: `http://127.0.0.1:${freePort()}/v1` });
  await llmFailure(llm.probe(), "unavailable");
});

Deno.test("probe throws unavailable on a 503", async () => {
  await using server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () => new Response("loading model", { status: 503 }),
  );
  const llm = new LLMClient({ baseUrl: `http://127.0.0.1:${server.addr.port}/v1` });
  await llmFailure(llm.probe(), "unavailable");
});

Deno.test("onCompletion reports every request with its outcome and tokens", async () => {
  let fail = false;
  await using model = startModelServer(() => fail ? new Response("boom", { status: 500 }) : "fine");
  const events: CompletionEvent[] = [];
  const llm = new LLMClient({ baseUrl: model.url, onCompletion: (event) => events.push(event) });
  await llm.complete("mistral", "hi");
  fail = true;
  await llmFailure(llm.complete("mistral", "hi"), "unavailable");
  assert.equal(events.length, 2);
  assert.equal(events[0].model, "mistral");
  assert.equal(events[0].outcome, "ok");
  assert.deepEqual(events[0].completion, {
    text: "fine",
    promptTokens: 10,
    completionTokens: 5,
  });
  assert.ok(events[0].durationMs >= 0);
  assert.equal(events[1].outcome, "unavailable");
  assert.equal(events[1].completion, undefined);
});

Deno.test("retryAfterMs reads seconds, retry-after-ms and HTTP dates", () => {
  assert.equal(retryAfterMs(new Headers({ "retry-after": "7" })), 7000);
  assert.equal(retryAfterMs(new Headers({ "retry-after": "1.5" })), 1500);
  assert.equal(retryAfterMs(new Headers({ "retry-after-ms": "250", "retry-after": "9" })), 250);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(
    retryAfterMs(new Headers({ "retry-after": "Thu, 01 Jan 2026 00:00:30 GMT" }), now),
    30_000,
  );
  assert.equal(retryAfterMs(new Headers({ "retry-after": "soon" })), undefined);
  assert.equal(retryAfterMs(new Headers()), undefined);
  assert.equal(retryAfterMs(undefined), undefined);
});
