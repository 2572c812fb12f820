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
import { sniffImageType } from "./utils.ts";
import { type Span, SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { tracer } from "./tracing.ts";

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
}

/**
 * Chat completions against an OpenAI-compatible server.
 *
 * The SDK's own retries are off: the worker decides when to try again, from {@linkcode LLMError}.
 *
 * @example
 * ```ts
 * const llm = new LLMClient({ baseUrl: "http://localhost:11434/v1" });
 * const answer = await llm.complete("mistral", "Say hello");
 * ```
 */
export class LLMClient {
  readonly #client: OpenAI;
  readonly #textTimeoutMs: number;
  readonly #imageTimeoutMs: number;
  readonly #temperature: number;
  readonly #onCompletion?: (event: CompletionEvent) => void;
  readonly #fetch: typeof fetch;

  /** Creates a client; nothing is sent until the first request. */
  constructor(options: LLMClientOptions) {
    this.#client = new OpenAI({
      baseURL: options.baseUrl,
      apiKey: options.apiKey ?? "not-needed",
      maxRetries: 0,
      fetch: options.fetch,
    });
    this.#fetch = options.fetch ?? ((input, init) => fetch(input, init));
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
   * show (JPEG, PNG, WebP, GIF). Prefer {@linkcode LLMClient.completeWithImageBytes} when the
   * bytes are at hand: the base64 is then never made as one string.
   */
  async completeWithImage(
    model: string,
    prompt: string,
    imageB64: string,
    mimeType?: string,
    options: CompletionOptions = {},
  ): Promise<string> {
    const type = mimeType ?? sniffImageType(decodeHead(imageB64)) ?? "image/jpeg";
    return await this.#sendImage(model, prompt, imageB64, type, options);
  }

  /**
   * Sends a prompt with one image, given as its bytes, and returns the answer's text.
   *
   * The request is the same as {@linkcode LLMClient.completeWithImage}'s, but its body is built
   * as bytes: the base64 is written straight into it, piece by piece, so a large photo never
   * becomes megabytes of short-lived strings (which V8 collects late, and which made the worker's
   * memory grow by several MB per photo).
   *
   * @example
   * ```ts
   * const bytes = await Deno.readFile("/data/images/cat.jpg");
   * const answer = await llm.completeWithImageBytes("llava", "Describe this photo", bytes);
   * ```
   */
  async completeWithImageBytes(
    model: string,
    prompt: string,
    image: Uint8Array,
    mimeType?: string,
    options: CompletionOptions = {},
  ): Promise<string> {
    const type = mimeType ?? sniffImageType(image) ?? "image/jpeg";
    return await this.#sendImage(model, prompt, image, type, options);
  }

  /**
   * Sends the image request through a copy of the client whose `fetch` puts the image into the
   * body the SDK made: the SDK only ever sees a short placeholder in the `data:` URL.
   */
  async #sendImage(
    model: string,
    prompt: string,
    image: Uint8Array | string,
    mimeType: string,
    options: CompletionOptions,
  ): Promise<string> {
    const placeholder = `image${crypto.randomUUID().replaceAll("-", "")}`;
    const content: ChatCompletionContentPart[] = [
      { type: "text", text: prompt },
      { type: "image_url", image_url: { url: `data:${mimeType};base64,${placeholder}` } },
    ];
    const client = this.#client.withOptions({
      fetch: (input, init) => this.#fetch(input, withImageBody(init, placeholder, image)),
    });
    return (await this.chat(model, [{ role: "user", content }], {
      timeoutMs: this.#imageTimeoutMs,
      ...options,
    }, client)).text;
  }

  /** Sends any list of messages; the building block of the methods above. */
  async chat(
    model: string,
    messages: ChatCompletionMessageParam[],
    options: CompletionOptions = {},
    client: OpenAI = this.#client,
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
    // `fetch` span nests under it. Without OTEL_DENO the tracer is a no-op.
    return await tracer.startActiveSpan(`chat ${model}`, {
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
        const response = await client.chat.completions.create(body, {
          timeout: options.timeoutMs ?? this.#textTimeoutMs,
          signal: options.signal,
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
    this.#onCompletion?.({
      model,
      durationMs: performance.now() - started,
      outcome,
      completion,
      jobType,
    });
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
 * retryAfterMs(new Headers({ "retry-after": "7" })); // 7000
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

/** Bytes of the image turned into base64 at a time: a multiple of 3, so the pieces join. */
const IMAGE_PIECE = 3 * 16_384;

/**
 * The request `init` with its JSON body sent as a stream in which `placeholder` is replaced by
 * the image's base64.
 *
 * The stream yields the JSON before the placeholder, the base64 in 64 KiB pieces (each made only
 * when the connection asks for more), then the JSON after it. No copy of the whole request is ever
 * made: a string or `Uint8Array` body of a few MB is copied several times by the runtime's `fetch`
 * and freed only by V8's late major collections, which made the worker's memory grow by hundreds
 * of MB under a stream of photos. The request goes out with `Transfer-Encoding: chunked`, which
 * OpenAI, Ollama, llama.cpp's server and vLLM all accept.
 *
 * @throws {Error} when the body is not the string with the placeholder the client made.
 */
export function withImageBody(
  init: RequestInit | undefined,
  placeholder: string,
  image: Uint8Array | string,
): RequestInit {
  const body = init?.body;
  const at = typeof body === "string" ? body.indexOf(placeholder) : -1;
  if (typeof body !== "string" || at < 0) {
    throw new Error("The image request's body lost its image placeholder; this is a bug.");
  }
  const encoder = new TextEncoder();
  const head = body.slice(0, at);
  const tail = body.slice(at + placeholder.length);
  const base64Piece = (start: number): Uint8Array =>
    typeof image === "string"
      ? encoder.encode(image.slice(start, start + (IMAGE_PIECE / 3) * 4))
      : encoder.encode(image.subarray(start, start + IMAGE_PIECE).toBase64());
  const step = typeof image === "string" ? (IMAGE_PIECE / 3) * 4 : IMAGE_PIECE;
  let next = -1; // -1: the head is still to send
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (next < 0) {
        controller.enqueue(encoder.encode(head));
        next = 0;
      } else if (next < image.length) {
        controller.enqueue(base64Piece(next));
        next += step;
      } else {
        controller.enqueue(encoder.encode(tail));
        controller.close();
      }
    },
  });
  return { ...init, body: stream, duplex: "half" } as RequestInit;
}
