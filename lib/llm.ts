/**
 * The model client: chat completions on any OpenAI-compatible server (OpenAI, Ollama, llama.cpp
 * server, vLLM) through the `openai` SDK, with failures sorted into kinds the worker can act on.
 *
 * @module
 */
import OpenAI, {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIError,
  APIUserAbortError,
} from "openai";
import type {
  ChatCompletionContentPart,
  ChatCompletionCreateParamsNonStreaming,
  ChatCompletionMessageParam,
} from "openai/resources/chat/completions";
import { scopedSignal, sniffImageType } from "./utils.ts";
import { type ImageRequestBody, imageRequestBody, type ImageSource } from "./image_body.ts";
import { type Span, SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { withSpan } from "./tracing.ts";
import { logger } from "./log.ts";

export type { ImageSource } from "./image_body.ts";

const log = logger("model");

/**
 * The SDK's telemetry headers (`X-Stainless-*`: its version, the OS, the runtime, the retry count),
 * left out of every request: no OpenAI-compatible server needs them, and eight headers more per
 * request cost the runtime's `fetch` about 40 µs of CPU each time.
 */
const WITHOUT_SDK_TELEMETRY: Record<string, null> = Object.fromEntries(
  [
    "Lang",
    "Package-Version",
    "OS",
    "Arch",
    "Runtime",
    "Runtime-Version",
    "Retry-Count",
    "Timeout",
  ].map((name) => [`X-Stainless-${name}`, null]),
);

/**
 * The key under which an image request's {@linkcode ImageRequest} travels through the SDK, in the
 * request's `fetchOptions` (the SDK copies them into the `init` its `fetch` gets).
 */
const IMAGE_REQUEST = Symbol("llm-worker image request");

/** What {@linkcode LLMClient} needs to stream one image in place of its placeholder. */
interface ImageRequest {
  /** The text standing for the image's base64 in the body the SDK builds. */
  placeholder: string;
  /** The image, as base64 or as a source to stream. */
  image: ImageSource | string;
  /** The body sent, once the request is on its way. */
  body?: ImageRequestBody;
  /** Why the body could not be built (the image could not be opened). */
  imageError?: unknown;
}

type ImageRequestInit = RequestInit & { [IMAGE_REQUEST]?: ImageRequest };

/** The `fetchOptions` that carry `image` to the SDK's `fetch` (typed as nothing the SDK reads). */
function imageFetchOptions(image: ImageRequest): Record<never, never> {
  return { [IMAGE_REQUEST]: image };
}

/**
 * What kind of failure an {@linkcode LLMError} is.
 *
 * - `unavailable`: the server could not be reached, timed out, was overloaded or rate limited
 *   (429, 5xx). Worth waiting for.
 * - `rejected`: the server refused the request itself (any other 4xx). Sending it again will not
 *   help.
 * - `aborted`: the caller's signal cancelled the request (the worker is stopping).
 */
export type LLMErrorKind = "unavailable" | "rejected" | "aborted";

/** A failed model request, with what kind of failure it was. */
export class LLMError extends Error {
  /** What kind of failure this is. */
  readonly kind: LLMErrorKind;
  /** The HTTP status, when the server answered. */
  readonly status?: number;
  /** How long the server asked us to wait (`Retry-After`), in milliseconds. */
  readonly retryAfterMs?: number;

  /** Builds the error; `options.cause` keeps the SDK's original error. */
  constructor(
    kind: LLMErrorKind,
    message: string,
    options: { status?: number; retryAfterMs?: number; cause?: unknown } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = "LLMError";
    this.kind = kind;
    this.status = options.status;
    this.retryAfterMs = options.retryAfterMs;
  }

  /** True when waiting and trying again may succeed. */
  get retryable(): boolean {
    return this.kind === "unavailable";
  }
}

/** A JSON schema the answer must follow, sent as `response_format: json_schema`. */
export interface JsonSchemaFormat {
  /** A short identifier of the schema, e.g. `intent_result`. */
  name: string;
  /** The JSON schema object itself. */
  schema: Record<string, unknown>;
}

/** Per-request options of {@linkcode LLMClient}. */
export interface CompletionOptions {
  /** A system message sent before the prompt. */
  system?: string;
  /** Ask the server to answer with JSON that follows this schema. */
  jsonSchema?: JsonSchemaFormat;
  /** Cancels the request. */
  signal?: AbortSignal;
  /** Overrides the client's timeout for this request (ms). */
  timeoutMs?: number;
  /** The job type the request is for; reported in {@linkcode CompletionEvent} and the span. */
  jobType?: string;
}

/** One model answer with what it cost. */
export interface Completion {
  /** The answer's text (`""` when the server sent no content). */
  text: string;
  /** Tokens read, as reported by the server (0 when it does not say). */
  promptTokens: number;
  /** Tokens written, as reported by the server (0 when it does not say). */
  completionTokens: number;
}

/** What {@linkcode LLMClient} reports after every request, for metrics and traces. */
export interface CompletionEvent {
  /** The model asked. */
  model: string;
  /** Wall time of the request (ms). */
  durationMs: number;
  /** `ok`, or the kind of failure. */
  outcome: "ok" | LLMErrorKind;
  /** Token counts, when the request succeeded. */
  completion?: Completion;
  /** The job type the request was for, when the caller said. */
  jobType?: string;
  /** Which server answered: the client's `name` (`primary` unless set). */
  server: string;
}

/** Options of {@linkcode LLMClient}. */
export interface LLMClientOptions {
  /** The server's base URL, e.g. `http://localhost:8080/v1`. */
  baseUrl: string;
  /** API key; local servers accept anything. */
  apiKey?: string;
  /** Timeout of a text request (ms). Default 60 s. */
  textTimeoutMs?: number;
  /** Timeout of a request with an image (ms). Default 120 s. */
  imageTimeoutMs?: number;
  /** Sampling temperature. Default 0.3. */
  temperature?: number;
  /** Called after every request, successful or not. */
  onCompletion?: (event: CompletionEvent) => void;
  /** The `fetch` the SDK uses (tests, tracing). */
  fetch?: typeof fetch;
  /** Which server this is in logs and events: `primary` (default) or `fallback`. */
  name?: string;
}

/**
 * Chat completions against an OpenAI-compatible server.
 *
 * The SDK's own retries are off: the worker decides when to try again, from {@linkcode LLMError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const llm = new LLMClient({
 *   baseUrl: "http://localhost:11434/v1",
 *   // Stands in for the model server: every request gets the same answer.
 *   fetch: () =>
 *     Promise.resolve(Response.json({
 *       id: "c1",
 *       object: "chat.completion",
 *       created: 0,
 *       model: "mistral",
 *       choices: [{ index: 0, message: { role: "assistant", content: "Hello!" } }],
 *     })),
 * });
 * assert.equal(await llm.complete("mistral", "Say hello"), "Hello!");
 * ```
 */
export class LLMClient {
  readonly #client: OpenAI;
  readonly #textTimeoutMs: number;
  readonly #imageTimeoutMs: number;
  readonly #temperature: number;
  readonly #onCompletion?: (event: CompletionEvent) => void;
  readonly #fetch: typeof fetch;
  /** Which server this is (see {@linkcode LLMClientOptions.name}). */
  readonly name: string;

  /** Creates a client; nothing is sent until the first request. */
  constructor(options: LLMClientOptions) {
    this.name = options.name ?? "primary";
    this.#fetch = options.fetch ?? ((input, init) => fetch(input, init));
    this.#client = new OpenAI({
      baseURL: options.baseUrl,
      apiKey: options.apiKey ?? "not-needed",
      maxRetries: 0,
      fetch: (input, init) => this.#send(input, init),
      defaultHeaders: WITHOUT_SDK_TELEMETRY,
    });
    this.#textTimeoutMs = options.textTimeoutMs ?? 60_000;
    this.#imageTimeoutMs = options.imageTimeoutMs ?? 120_000;
    this.#temperature = options.temperature ?? 0.3;
    this.#onCompletion = options.onCompletion;
  }

  /** Sends a text prompt and returns the answer's text. */
  async complete(model: string, prompt: string, options: CompletionOptions = {}): Promise<string> {
    return (await this.chat(model, [{ role: "user", content: prompt }], options)).text;
  }

  /**
   * Sends a prompt with one image, given as base64, and returns the answer's text.
   *
   * The image travels as a `data:` URL whose MIME type is `mimeType`, or else the one its bytes
   * show (JPEG, PNG, WebP, GIF). {@linkcode LLMClient.completeWithImageSource} sends the same
   * request without ever holding the image in memory.
   */
  async completeWithImage(
    model: string,
    prompt: string,
    imageB64: string,
    mimeType?: string,
    options: CompletionOptions = {},
  ): Promise<string> {
    const type = mimeType ?? sniffImageType(decodeHead(imageB64)) ?? "image/jpeg";
    return (await this.#sendImage(model, prompt, imageB64, type, options)).text;
  }

  /**
   * Sends a prompt with one image read from `image` while the request is sent, and returns the
   * answer's text.
   *
   * The request is the same as {@linkcode LLMClient.completeWithImage}'s, but its body is
   * streamed: the image is opened once the request is on its way and turned into base64 piece by
   * piece (see {@linkcode imageRequestBody}), so a large photo costs a few 64 KiB buffers instead
   * of several MB of strings and copies per request.
   *
   * An error of the image itself (`open()` throws, or its stream fails) is thrown as it is, not as
   * an {@linkcode LLMError}: the model server is not to blame.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   *
   * let sentBody = "";
   * const llm = new LLMClient({
   *   baseUrl: "http://localhost:11434/v1",
   *   // Stands in for the model server: reads the request, answers with a description.
   *   fetch: async (input, init) => {
   *     sentBody = await new Request(input, init).text();
   *     const message = { role: "assistant", content: "A cat on a sofa." };
   *     return Response.json({ choices: [{ index: 0, finish_reason: "stop", message }] });
   *   },
   * });
   * const answer = await llm.completeWithImageSource("llava", "Describe this photo", {
   *   mimeType: "image/png",
   *   open: () => Promise.resolve([new Uint8Array([0x89, 0x50, 0x4e, 0x47])]),
   * });
   * assert.equal(answer, "A cat on a sofa.");
   * assert.match(sentBody, /"data:image\/png;base64,iVBORw=="/);
   * ```
   */
  async completeWithImageSource(
    model: string,
    prompt: string,
    image: ImageSource,
    options: CompletionOptions = {},
  ): Promise<string> {
    return (await this.chatWithImageSource(model, prompt, image, options)).text;
  }

  /**
   * {@linkcode LLMClient.completeWithImageSource}, returning the whole {@linkcode Completion}
   * (the text and the tokens the server reported).
   */
  async chatWithImageSource(
    model: string,
    prompt: string,
    image: ImageSource,
    options: CompletionOptions = {},
  ): Promise<Completion> {
    return await this.#sendImage(model, prompt, image, image.mimeType, options);
  }

  /**
   * Sends the image request: the SDK only ever sees a short placeholder in the `data:` URL, and
   * the request's {@linkcode ImageRequest} rides along in its `fetchOptions` to
   * {@linkcode LLMClient.#send}, which streams the image in its place. One SDK client serves
   * every request (a copy per request, `withOptions`, cost a whole client's worth of objects).
   */
  async #sendImage(
    model: string,
    prompt: string,
    image: ImageSource | string,
    mimeType: string,
    options: CompletionOptions,
  ): Promise<Completion> {
    const request: ImageRequest = {
      placeholder: `image${crypto.randomUUID().replaceAll("-", "")}`,
      image,
    };
    const content: ChatCompletionContentPart[] = [
      { type: "text", text: prompt },
      {
        type: "image_url",
        image_url: { url: `data:${mimeType};base64,${request.placeholder}` },
      },
    ];
    try {
      return await this.#chat(
        model,
        [{ role: "user", content }],
        { timeoutMs: this.#imageTimeoutMs, ...options },
        request,
      );
    } finally {
      await request.body?.close();
    }
  }

  /**
   * The SDK's `fetch`: a request carrying an {@linkcode ImageRequest} gets its body rebuilt with
   * the image streamed in place of the placeholder; any other goes out as the SDK built it.
   */
  async #send(input: string | URL | Request, init?: RequestInit): Promise<Response> {
    const request = (init as ImageRequestInit | undefined)?.[IMAGE_REQUEST];
    if (!request) return await this.#fetch(input, init);
    const { [IMAGE_REQUEST]: _, ...rest } = init as ImageRequestInit;
    // The SDK does not retry (maxRetries 0), but a body from an earlier try must not stay open.
    await request.body?.close();
    request.body = undefined;
    try {
      request.body = await imageRequestBody(rest, request.placeholder, request.image);
    } catch (error) {
      request.imageError = error;
      throw error;
    }
    const streamed = request.body.body instanceof ReadableStream;
    return await this.#fetch(input, {
      ...rest,
      body: request.body.body,
      ...(streamed ? { duplex: "half" } : {}),
    } as RequestInit);
  }

  /** Sends any list of messages; the building block of the methods above. */
  async chat(
    model: string,
    messages: ChatCompletionMessageParam[],
    options: CompletionOptions = {},
  ): Promise<Completion> {
    return await this.#chat(model, messages, options);
  }

  /**
   * Sends the messages, with `image` streamed into the request when given. When the image failed
   * on this side (it could not be read), that error is thrown instead of the request's, and no
   * model outcome is reported.
   */
  async #chat(
    model: string,
    messages: ChatCompletionMessageParam[],
    options: CompletionOptions,
    image?: ImageRequest,
  ): Promise<Completion> {
    const all: ChatCompletionMessageParam[] = options.system
      ? [{ role: "system", content: options.system }, ...messages]
      : messages;
    const body: ChatCompletionCreateParamsNonStreaming = {
      model,
      messages: all,
      temperature: this.#temperature,
    };
    if (options.jsonSchema) {
      body.response_format = {
        type: "json_schema",
        json_schema: {
          name: options.jsonSchema.name,
          schema: options.jsonSchema.schema,
          strict: true,
        },
      };
    }
    // A span per request (OpenTelemetry semantic conventions for generative AI); the SDK's
    // `fetch` span nests under it. Without OTEL_DENO no span is made.
    return await withSpan(`chat ${model}`, {
      kind: SpanKind.CLIENT,
      attributes: {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model,
        ...(options.jsonSchema ? { "gen_ai.output.type": "json" } : {}),
        ...(options.jobType ? { "llm_worker.job_type": options.jobType } : {}),
      },
    }, async (span: Span) => {
      const started = performance.now();
      try {
        // The SDK subscribes to the signal it is given until V8 collects the request: give it
        // one that lives only as long as this call.
        using call = scopedSignal(options.signal);
        const response = await this.#client.chat.completions.create(body, {
          timeout: options.timeoutMs ?? this.#textTimeoutMs,
          signal: call.signal,
          ...(image ? { fetchOptions: imageFetchOptions(image) } : {}),
        });
        const completion: Completion = {
          text: response.choices?.[0]?.message?.content ?? "",
          promptTokens: response.usage?.prompt_tokens ?? 0,
          completionTokens: response.usage?.completion_tokens ?? 0,
        };
        span.setAttributes({
          "gen_ai.usage.input_tokens": completion.promptTokens,
          "gen_ai.usage.output_tokens": completion.completionTokens,
        });
        this.#report(model, started, "ok", options.jobType, completion);
        return completion;
      } catch (error) {
        const local = image && (image.imageError ?? image.body?.imageError);
        if (local !== undefined) {
          span.setStatus({ code: SpanStatusCode.ERROR, message: String(local) });
          span.setAttribute("error.type", "image");
          throw local;
        }
        const failure = toLLMError(error, this.#client.baseURL);
        span.setStatus({ code: SpanStatusCode.ERROR, message: failure.message });
        span.setAttribute("error.type", failure.kind);
        this.#report(model, started, failure.kind, options.jobType);
        throw failure;
      } finally {
        span.end();
      }
    });
  }

  /**
   * Asks the server whether it answers at all (`GET /models`).
   *
   * Resolves when the server gave any answer other than 429 or 5xx (some servers have no
   * `/models` and answer 404: they are up all the same); throws an `unavailable`
   * {@linkcode LLMError} otherwise.
   */
  async probe(signal?: AbortSignal): Promise<void> {
    try {
      await this.#client.models.list({ timeout: 5_000, signal });
    } catch (error) {
      const failure = toLLMError(error, this.#client.baseURL);
      if (failure.kind !== "rejected") throw failure;
    }
  }

  /** Releases the client. The SDK keeps no open connections of its own, so this is cheap. */
  close(): void {
    // The SDK uses the runtime's fetch, whose connection pool is shared and closes by itself.
  }

  #report(
    model: string,
    started: number,
    outcome: CompletionEvent["outcome"],
    jobType?: string,
    completion?: Completion,
  ) {
    const durationMs = performance.now() - started;
    const server = this.name;
    this.#onCompletion?.({ model, durationMs, outcome, completion, jobType, server });
    if (!log.isEnabledFor("debug")) return;
    const ms = Math.round(durationMs);
    if (!completion) {
      log.debug(
        "Model {model} on the {server} server: request ended {outcome} after {durationMs} ms.",
        {
          model,
          server,
          outcome,
          durationMs: ms,
        },
      );
    } else if (completion.promptTokens === 0 && completion.completionTokens === 0) {
      log.debug(
        "Model {model} on the {server} server answered in {durationMs} ms (no token counts reported).",
        { model, server, durationMs: ms },
      );
    } else {
      log.debug(
        "Model {model} on the {server} server answered in {durationMs} ms: {promptTokens} prompt and {completionTokens} completion tokens.",
        {
          model,
          server,
          durationMs: ms,
          promptTokens: completion.promptTokens,
          completionTokens: completion.completionTokens,
        },
      );
    }
  }
}

/** Sorts anything the SDK throws into an {@linkcode LLMError}. */
export function toLLMError(error: unknown, baseUrl = "the model server"): LLMError {
  if (error instanceof LLMError) return error;
  if (
    error instanceof APIUserAbortError || (error instanceof Error && error.name === "AbortError")
  ) {
    return new LLMError("aborted", "The model request was cancelled.", { cause: error });
  }
  if (error instanceof APIConnectionTimeoutError) {
    return new LLMError(
      "unavailable",
      `The model server at ${baseUrl} timed out; it may be overloaded or the model still loading.`,
      { cause: error },
    );
  }
  if (error instanceof APIConnectionError) {
    return new LLMError(
      "unavailable",
      `The model server at ${baseUrl} could not be reached; check LLM_BASE_URL and that the server is running.`,
      { cause: error },
    );
  }
  if (error instanceof APIError && typeof error.status === "number") {
    const status = error.status;
    const detail = shortDetail(error);
    if (status === 429 || status === 408 || status >= 500) {
      return new LLMError(
        "unavailable",
        `The model server answered ${status} (${
          status === 429 ? "rate limited" : "overloaded or failing"
        }): ${detail}`,
        { status, retryAfterMs: retryAfterMs(error.headers), cause: error },
      );
    }
    return new LLMError(
      "rejected",
      `The model server rejected the request with ${status}: ${detail}`,
      {
        status,
        cause: error,
      },
    );
  }
  return new LLMError(
    "unavailable",
    `The model request failed: ${error instanceof Error ? error.message : String(error)}`,
    { cause: error },
  );
}

/**
 * Reads `retry-after-ms` or `Retry-After` (seconds or an HTTP date) as milliseconds.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(retryAfterMs(new Headers({ "retry-after": "7" })), 7000);
 * assert.equal(retryAfterMs(new Headers()), undefined);
 * ```
 */
export function retryAfterMs(headers: Headers | undefined, now = Date.now()): number | undefined {
  if (!headers) return undefined;
  const ms = Number(headers.get("retry-after-ms"));
  if (headers.get("retry-after-ms") && Number.isFinite(ms) && ms >= 0) return ms;
  const value = headers.get("retry-after")?.trim();
  if (!value) return undefined;
  if (/^\d+(\.\d+)?$/.test(value)) return Math.round(Number(value) * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

function shortDetail(error: APIError): string {
  const text = error.message || "no detail";
  return text.length > 300 ? `${text.slice(0, 300)}…` : text;
}

function decodeHead(b64: string): Uint8Array {
  try {
    const head = atob(b64.slice(0, 32).replace(/=+$/, "").slice(0, 32 - (32 % 4)));
    return Uint8Array.from(head, (c) => c.charCodeAt(0));
  } catch {
    return new Uint8Array();
  }
}
