/**
 * A lean OpenAI-compatible model server for the benchmark and the fault-injection suite.
 *
 * Unlike `tests/helpers/model_server.ts` it keeps no copy of the requests (a run of 2,000 jobs
 * with 1 MB images would hold half a gigabyte), answers after a configurable latency, can listen
 * on a given port (so a test can close it and start another one where it was) and can be told to
 * answer 503.
 *
 * @module
 */

import { NO_ENTITIES } from "../lib/handlers/intent_classify.ts";

/** What the server saw of one chat request, given to the answer function. */
export interface FakeChatRequest {
  /** The `model` field. */
  model: string;
  /** The `response_format.json_schema.name`, when the request carried one. */
  schemaName?: string;
  /** The text parts of the messages, joined (images left out). */
  text: string;
  /** True when the request carried an image. */
  hasImage: boolean;
  /** When the request arrived, on the shared clock (`performance.timeOrigin + now()`, ms). */
  receivedAt: number;
}

/** Options of {@linkcode startFakeModel}. */
export interface FakeModelOptions {
  /** Port on 127.0.0.1; 0 (default) picks a free one. */
  port?: number;
  /**
   * Milliseconds from the request's arrival to the answer, fixed or per request (default 0);
   * reading a large body counts towards it, as it would on a real server.
   */
  latencyMs?: number | ((request: FakeChatRequest) => number);
  /** The assistant's text for a request (default {@linkcode benchAnswer}). */
  answer?: (request: FakeChatRequest) => string;
  /** Told about every chat request as soon as its body is read. */
  onRequest?: (request: FakeChatRequest) => void;
  /** Told when a chat request is answered (200 or 503), on the shared clock ({@linkcode clockMs}). */
  onAnswered?: (request: FakeChatRequest, answeredAt: number) => void;
}

/** A running fake model server. */
export interface FakeModel {
  /** Base URL ending in `/v1`. */
  url: string;
  /** The port it listens on. */
  port: number;
  /** Chat requests received so far. */
  requests: number;
  /** Chat requests being answered now. */
  inFlight: number;
  /** The most chat requests answered at once. */
  maxInFlight: number;
  /**
   * Milliseconds from each delayed chat request's arrival to its answer, summed (with
   * {@linkcode FakeModel.delayed}, the mean latency really given; compare with the one set).
   */
  delayedMs: number;
  /** Chat requests answered after a latency (`latencyMs` above 0). */
  delayed: number;
  /** While true, every request (chat and `/models`) is answered 503. */
  failing: boolean;
  /** Requests answered 503 so far. */
  answered503: number;
  /** Holds every chat answer (requests keep arriving and wait) until {@linkcode FakeModel.resume}. */
  pause(): void;
  /** Lets held and later answers go. */
  resume(): void;
  /** Stops the server (connections in flight are cut). */
  close(): Promise<void>;
  /** `[Symbol.asyncDispose]` = close. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** The shared clock of the benchmark: milliseconds, comparable between processes. */
export function clockMs(): number {
  return performance.timeOrigin + performance.now();
}

/** The job token `J<digits>` a bench or fault job carries in its text, or `J?`. */
export function tokenOf(text: string): string {
  return /\bJ\d+\b/.exec(text)?.[0] ?? "J?";
}

/**
 * A valid answer for each of the worker's schemas; it repeats the job token found in the prompt so
 * that a notification can be traced back to its job.
 */
export function benchAnswer(request: FakeChatRequest): string {
  const token = tokenOf(request.text);
  switch (request.schemaName) {
    case "image_tags":
      return JSON.stringify({ description: `A photo ${token}.`, tags: ["photo", token, "bench"] });
    case "intent_result":
      return JSON.stringify({ ...NO_ENTITIES, intent: "general_note", suggested_tags: ["note"] });
    case "task_match": {
      const task = /\[id: ([^\]]+)\]/.exec(request.text)?.[1];
      return JSON.stringify({
        matched_task_id: task ?? null,
        confidence: 0.9,
        reason: `it mentions ${token}`,
      });
    }
    case "email_events":
      return JSON.stringify({
        events: [
          { description: `Meeting ${token}`, event_time: "2099-03-01T10:00:00", confidence: 0.9 },
          { description: `Call ${token}`, event_time: "2099-03-02T16:30:00", confidence: 0.8 },
        ],
      });
    default:
      return `When would you like to do ${token}?`;
  }
}

/** A chat completion response body holding `content`. */
function completion(content: string, model: string): Response {
  return Response.json({
    id: "chatcmpl-bench",
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model,
    choices: [{ index: 0, message: { role: "assistant", content }, finish_reason: "stop" }],
    usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
  });
}

interface ChatBody {
  model?: string;
  messages?: Array<{ content?: unknown }>;
  response_format?: { json_schema?: { name?: string } };
}

/**
 * Starts the server.
 *
 * @example
 * ```ts
 * await using model = startFakeModel({ latencyMs: 100 });
 * // LLM_BASE_URL = model.url
 * ```
 */
export function startFakeModel(options: FakeModelOptions = {}): FakeModel {
  const latency = options.latencyMs ?? 0;
  const answer = options.answer ?? benchAnswer;
  const unavailable = () => {
    state.answered503++;
    return Response.json({ error: { message: "overloaded" } }, { status: 503 });
  };
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: options.port ?? 0, onListen: () => {} },
    async (req) => {
      const path = new URL(req.url).pathname;
      if (state.failing) {
        await req.body?.cancel();
        return unavailable();
      }
      if (req.method === "GET" && path === "/v1/models") {
        return Response.json({ object: "list", data: [{ id: "bench-model", object: "model" }] });
      }
      if (req.method !== "POST" || path !== "/v1/chat/completions") {
        return new Response("not found", { status: 404 });
      }
      const arrived = performance.now(); // the latency counts from here, body reading included
      const body = await req.json() as ChatBody;
      const receivedAt = clockMs();
      let text = "";
      let hasImage = false;
      for (const message of body.messages ?? []) {
        if (typeof message.content === "string") text += `${message.content}\n`;
        else if (Array.isArray(message.content)) {
          for (const part of message.content) {
            if (part?.type === "text") text += `${part.text}\n`;
            else if (part?.type === "image_url") hasImage = true;
          }
        }
      }
      const request: FakeChatRequest = {
        model: body.model ?? "",
        schemaName: body.response_format?.json_schema?.name,
        text,
        hasImage,
        receivedAt,
      };
      state.requests++;
      state.inFlight++;
      state.maxInFlight = Math.max(state.maxInFlight, state.inFlight);
      try {
        options.onRequest?.(request);
        const target = typeof latency === "number" ? latency : latency(request);
        const ms = target - (performance.now() - arrived);
        if (ms > 0) {
          // A timer fires a millisecond or so late on a busy loop: ask for that much less, so
          // the latency given is the one set, on average (measured in delayedMs).
          const asked = Math.max(0, ms - timerLateMs);
          const waited = performance.now();
          await new Promise((resolve) => setTimeout(resolve, asked));
          timerLateMs += (performance.now() - waited - asked - timerLateMs) / 16;
        }
        await gate?.promise;
        if (state.failing) {
          options.onAnswered?.(request, clockMs());
          return unavailable();
        }
        const response = completion(answer(request), request.model);
        options.onAnswered?.(request, clockMs());
        if (target > 0) {
          state.delayed++;
          state.delayedMs += performance.now() - arrived;
        }
        return response;
      } finally {
        state.inFlight--;
      }
    },
  );
  let gate: PromiseWithResolvers<void> | undefined;
  let timerLateMs = 0; // how late timers have fired, a moving average
  const state: FakeModel = {
    url: `http://127.0.0.1:${server.addr.port}/v1`,
    port: server.addr.port,
    requests: 0,
    inFlight: 0,
    maxInFlight: 0,
    delayedMs: 0,
    delayed: 0,
    failing: false,
    answered503: 0,
    pause: () => {
      gate ??= Promise.withResolvers<void>();
    },
    resume: () => {
      gate?.resolve();
      gate = undefined;
    },
    close: async () => {
      state.resume();
      await server.shutdown();
    },
    [Symbol.asyncDispose]: () => state.close(),
  };
  return state;
}
