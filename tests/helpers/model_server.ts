/**
 * A local OpenAI-compatible model server for tests: `Deno.serve` on port 0 answering
 * `POST /v1/chat/completions` and `GET /v1/models` from a function the test gives.
 *
 * @module
 */

/** One chat completion request as the server received it. */
export interface ChatRequest {
  /** The parsed JSON body (`model`, `messages`, `response_format`, ...). */
  body: {
    model: string;
    messages: Array<{ role: string; content: unknown }>;
    response_format?: { type: string; json_schema?: { name: string; schema: unknown } };
    temperature?: number;
    [key: string]: unknown;
  };
  /** The request's headers. */
  headers: Headers;
}

/** What the test's function answers: the assistant's text, or a whole `Response`. */
export type ModelReply = string | Response;

/** A running fake model server. */
export interface ModelServer {
  /** Base URL to give `LLMClient` / `LLM_BASE_URL`, ending in `/v1`. */
  url: string;
  /** Every chat request received, in order. */
  requests: ChatRequest[];
  /** Chat requests being answered right now. */
  inFlight: number;
  /** The most chat requests ever answered at once. */
  maxInFlight: number;
  /** Replaces the function that answers chat requests. */
  setReply(reply: (request: ChatRequest) => ModelReply | Promise<ModelReply>): void;
  /** Stops the server. */
  close(): Promise<void>;
  /** `[Symbol.asyncDispose]` = close, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** The text of the last user message of a request (text parts joined). */
export function promptOf(request: ChatRequest): string {
  const last = request.body.messages.at(-1)?.content;
  if (typeof last === "string") return last;
  if (Array.isArray(last)) {
    return last.filter((p) => p?.type === "text").map((p) => p.text).join("\n");
  }
  return "";
}

/** A chat completion response body with `content` as the answer. */
export function chatResponse(content: string, model = "test-model"): Response {
  return Response.json({
    id: `chatcmpl-${crypto.randomUUID()}`,
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model,
    choices: [{ index: 0, message: { role: "assistant", content }, finish_reason: "stop" }],
    usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
  });
}

/**
 * Starts the server on a free port (or on `options.port`, for a server that comes up late).
 *
 * @example
 * ```ts
 * await using model = startModelServer(() => '{"tags": ["a", "b", "c"]}');
 * const llm = new LLMClient({ baseUrl: model.url });
 * ```
 */
export function startModelServer(
  reply: (request: ChatRequest) => ModelReply | Promise<ModelReply>,
  options: { port?: number } = {},
): ModelServer {
  let answer = reply;
  const listen = { hostname: "127.0.0.1", port: options.port ?? 0, onListen: () => {} };
  const server = Deno.serve(listen, async (req) => {
    const url = new URL(req.url);
    if (req.method === "GET" && url.pathname === "/v1/models") {
      return Response.json({ object: "list", data: [{ id: "test-model", object: "model" }] });
    }
    if (req.method !== "POST" || url.pathname !== "/v1/chat/completions") {
      return new Response("not found", { status: 404 });
    }
    const request: ChatRequest = { body: await req.json(), headers: req.headers };
    state.requests.push(request);
    state.inFlight++;
    state.maxInFlight = Math.max(state.maxInFlight, state.inFlight);
    try {
      const out = await answer(request);
      return typeof out === "string" ? chatResponse(out, request.body.model) : out;
    } finally {
      state.inFlight--;
    }
  });
  const state: ModelServer = {
    url: `http://127.0.0.1:${server.addr.port}/v1`,
    requests: [],
    inFlight: 0,
    maxInFlight: 0,
    setReply: (next) => answer = next,
    close: async () => {
      await server.shutdown();
    },
    [Symbol.asyncDispose]: () => state.close(),
  };
  return state;
}
