/**
 * The model as the handlers see it: ask a question, get an answer that is already parsed and
 * validated against the job's zod schema.
 *
 * {@linkcode ModelGateway} holds the model slots (`WORKER_CONCURRENCY` requests in flight at
 * most, then one of the slots shared by every replica when `LLM_MAX_IN_FLIGHT` is set), passes
 * every request through the {@linkcode RequestGate} (a pause after a 429 with `Retry-After`, the
 * shared rate limit) right before it is sent, sends the answer's JSON schema as `response_format` when the server accepts it, strips
 * reasoning models' `<think>` text, reads JSON out of chatty answers and tells
 * {@linkcode ModelHealth} whether the server answers.
 *
 * @module
 */
import { z } from "zod";
import type { Logger } from "@logtape/logtape";
import { acceptAnswer, type Repair, textFromJson } from "./accept.ts";
import { InvalidAnswerError } from "./errors.ts";
import type { Effects } from "./job.ts";
import { type ImageSource, type JsonSchemaFormat, type LLMClient, LLMError } from "./llm.ts";
import type { RequestGate } from "./request_gate.ts";
import { Semaphore } from "./semaphore.ts";
import { type Slots, stackSlots } from "./slots.ts";
import { readJson, sleep, stripThinking } from "./utils.ts";
import { describeError, logger } from "./log.ts";

/** Which of the two configured models a request goes to. */
export type ModelRole = "text" | "vision";

/**
 * An image attached to a request. It is opened only once the request holds a model slot and is
 * being sent, and read as it is sent, so no job keeps a whole image in memory.
 */
export type ImageInput = ImageSource;

/** What {@linkcode ModelGateway.askText} sends. */
export interface TextRequest {
  /** Text or vision model. */
  role: ModelRole;
  /** The user prompt. */
  prompt: string;
  /** A system message. */
  system?: string;
  /** An image for the vision model. */
  image?: ImageInput;
  /** Cancels the request. */
  signal?: AbortSignal;
  /**
   * For a plain-text question: when the model answers a JSON object instead, the first of these
   * keys that holds a non-empty string is the answer (repair `text_from_json`).
   */
  textKeys?: readonly string[];
}

/** What {@linkcode ModelGateway.ask} sends: a text request plus the schema of the answer. */
export interface JsonRequest<T> extends TextRequest {
  /** The answer's schema; the root must be an object with every property required. */
  schema: z.ZodType<T>;
  /** A short identifier of the schema, e.g. `image_tags`. */
  schemaName: string;
}

/** `LLM_STRUCTURED_OUTPUT`: `auto` tries the schema and falls back per model. */
export type StructuredOutputMode = "auto" | "on" | "off";

/** A model server the gateway sends to: its client, its model names and its health. */
export interface ModelServer {
  /** The model client (its `name` says which server it is in logs and metrics). */
  llm: LLMClient;
  /** Model names per role. */
  models: Record<ModelRole, string>;
  /** Told about every request's availability; default: none. */
  health?: ModelHealth;
}

/** Tokens the model servers reported, added up (see {@linkcode ModelGateway.forJob}). */
export interface TokenUsage {
  /** Tokens read. */
  promptTokens: number;
  /** Tokens written. */
  completionTokens: number;
}

/** What {@linkcode ModelGateway.forJob} takes besides the job type. */
export interface JobViewOptions {
  /** Where the job's valid answers are kept, so a job that runs again asks nothing twice. */
  answers?: Effects;
  /** The job's logger: what had to be mended in an answer is logged there. */
  log?: Logger;
  /** Adds up the tokens of the job's requests. */
  usage?: TokenUsage;
  /**
   * Runs once a slot is held, right before each request, and may throw to stop it (the consumer
   * checks the job's user lease there).
   */
  guard?: () => Promise<void>;
}

/** Options of {@linkcode ModelGateway}. */
export interface ModelGatewayOptions {
  /** The model client of the primary server. */
  llm: LLMClient;
  /** Model names per role on the primary server. */
  models: Record<ModelRole, string>;
  /**
   * A second server, asked while the primary is unavailable (refused, timed out, 429, 5xx) and
   * available itself. An answer that is unusable is never a reason to ask it.
   */
  fallback?: ModelServer;
  /** Most requests in flight at once. */
  concurrency: number;
  /**
   * Slots shared with other replicas (`LLM_MAX_IN_FLIGHT`), each taken after one of the
   * `concurrency` slots; default: none.
   */
  sharedSlots?: Slots;
  /** Passed right before every request is sent; told of every 429 with `Retry-After`. */
  gate?: RequestGate;
  /** `LLM_STRUCTURED_OUTPUT`. */
  structuredOutput?: StructuredOutputMode;
  /** Told about every request's availability on the primary; default: none. */
  health?: ModelHealth;
  /** Told what had to be mended in an answer before it could be used (see `lib/accept.ts`). */
  onRepair?: (event: RepairEvent) => void;
}

/** An answer that was used after mending, as told to {@linkcode ModelGatewayOptions.onRepair}. */
export interface RepairEvent {
  /** The job type of the view that asked (see {@linkcode ModelGateway.forJob}), if any. */
  jobType?: string;
  /** The answer schema's name (`intent_result`), or `text` for a plain-text question. */
  schemaName: string;
  /** What was mended, each kind once. */
  repairs: Repair[];
}

/**
 * Asks the model and returns validated answers.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { z } from "zod";
 * import { LLMClient } from "./llm.ts";
 *
 * const llm = new LLMClient({
 *   baseUrl: "http://localhost:11434/v1",
 *   // Stands in for the model server: a chatty answer with the JSON inside.
 *   fetch: () => {
 *     const content = 'Here you go: {"tags": ["beach", "sea", "sun"]}';
 *     const message = { role: "assistant", content };
 *     return Promise.resolve(Response.json({ choices: [{ index: 0, message }] }));
 *   },
 * });
 * const gateway = new ModelGateway({
 *   llm,
 *   models: { text: "mistral", vision: "llava" },
 *   concurrency: 4,
 * });
 * const { tags } = await gateway.ask({
 *   role: "text",
 *   prompt: "Three tags for a beach photo",
 *   schemaName: "tags",
 *   schema: z.object({ tags: z.array(z.string()) }),
 * });
 * assert.deepEqual(tags, ["beach", "sea", "sun"]);
 * ```
 */
export class ModelGateway {
  readonly #options: ModelGatewayOptions;
  /** The primary server, then the fallback when there is one. */
  readonly #servers: ModelServer[];
  // Shared with every view made by forJob (assigned there), hence not readonly.
  #slots: Slots;
  readonly #gate?: RequestGate;
  readonly #mode: StructuredOutputMode;
  /** `server:model` pairs that refused `response_format: json_schema` (auto mode remembers). */
  #noSchema = new Set<string>();
  /** Where this view adds up its requests' tokens. */
  #usage?: TokenUsage;
  /** The job type this view's requests are for (metrics and traces). */
  #jobType?: string;
  /** Where this view keeps the answers of its job, so a job that runs again asks nothing twice. */
  #answers?: Effects;
  /** See {@linkcode JobViewOptions.guard}. */
  #guard?: () => Promise<void>;
  /** Questions asked by this view so far (the key of each kept answer). */
  #asked = 0;
  #log: Logger = logger("model");

  /** Creates the gateway; `concurrency` slots are shared by every job. */
  constructor(options: ModelGatewayOptions) {
    this.#options = options;
    const primary = { llm: options.llm, models: options.models, health: options.health };
    this.#servers = options.fallback ? [primary, options.fallback] : [primary];
    const local = new Semaphore(options.concurrency);
    this.#slots = options.sharedSlots ? stackSlots(local, options.sharedSlots) : local;
    this.#gate = options.gate;
    this.#mode = options.structuredOutput ?? "auto";
  }

  /**
   * A view of this gateway for one job type: the same slots, health and structured-output
   * memory, with every request labelled `jobType` in the model client's events and spans (see
   * {@linkcode JobViewOptions} for the rest).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { LLMClient } from "./llm.ts";
   *
   * const jobTypes: Array<string | undefined> = [];
   * const llm = new LLMClient({
   *   baseUrl: "http://localhost:11434/v1",
   *   onCompletion: (event) => jobTypes.push(event.jobType),
   *   fetch: () => {
   *     const message = { role: "assistant", content: "When is it?" };
   *     return Promise.resolve(Response.json({ choices: [{ index: 0, message }] }));
   *   },
   * });
   * const models = { text: "mistral", vision: "llava" };
   * const gateway = new ModelGateway({ llm, models, concurrency: 4 });
   * const usage = { promptTokens: 0, completionTokens: 0 };
   * const model = gateway.forJob("followup", { usage });
   * assert.equal(await model.askText({ role: "text", prompt: "dentist" }), "When is it?");
   * assert.deepEqual(jobTypes, ["followup"]);
   * assert.deepEqual(usage, { promptTokens: 0, completionTokens: 0 }); // none reported
   * ```
   */
  forJob(jobType: string, options: JobViewOptions = {}): ModelGateway {
    const view = new ModelGateway(this.#options);
    view.#slots = this.#slots;
    view.#noSchema = this.#noSchema;
    view.#jobType = jobType;
    view.#answers = options.answers;
    view.#usage = options.usage;
    view.#guard = options.guard;
    if (options.log) view.#log = options.log;
    return view;
  }

  /** The job type of this view (see {@linkcode ModelGateway.forJob}), if any. */
  get jobType(): string | undefined {
    return this.#jobType;
  }

  /** Requests in flight now (holding every slot they need). */
  get inFlight(): number {
    return this.#slots.held;
  }

  /** Requests waiting for a slot now. */
  get waiting(): number {
    return this.#slots.waiting;
  }

  /** The model name used for `role` on the primary server. */
  modelFor(role: ModelRole): string {
    return this.#servers[0].models[role];
  }

  /**
   * Asks for a plain-text answer (reasoning text removed).
   *
   * @throws {InvalidAnswerError} when the answer is empty.
   * @throws {LLMError} when the server is unavailable or rejects the request.
   */
  askText(request: TextRequest): Promise<string> {
    return this.#remember(() => this.#askText(request));
  }

  async #askText(request: TextRequest): Promise<string> {
    const text = stripThinking(await this.#send(request));
    if (!text) throw new InvalidAnswerError("The model's answer was empty.", text);
    if (!request.textKeys) return text;
    const fromJson = textFromJson(text, request.textKeys);
    if (fromJson === undefined) return text;
    if (fromJson === null) {
      throw new InvalidAnswerError(
        `The model answered a JSON object with none of ${request.textKeys.join(", ")}.`,
        text,
      );
    }
    this.#reportRepairs("text", ["text_from_json"]);
    return fromJson;
  }

  /**
   * Asks for JSON that follows `request.schema`, and returns it parsed and validated.
   *
   * @throws {InvalidAnswerError} when the answer holds no JSON or breaks the schema.
   * @throws {LLMError} when the server is unavailable or rejects the request.
   */
  ask<T>(request: JsonRequest<T>): Promise<T> {
    return this.#remember(() => this.#ask(request));
  }

  /**
   * Runs `question`, or, with the answers given to {@linkcode ModelGateway.forJob}, returns the
   * valid answer kept from an earlier run of the same job (the n-th question of a run gets the
   * n-th answer), so a job retried after Core failed asks the model nothing twice.
   */
  #remember<T>(question: () => Promise<T>): Promise<T> {
    if (!this.#answers) return question();
    return this.#answers.once(`answer:${this.#asked++}`, question);
  }

  async #ask<T>(request: JsonRequest<T>): Promise<T> {
    const text = stripThinking(
      await this.#send(request, { name: request.schemaName, schema: jsonSchemaOf(request.schema) }),
    );
    let read;
    try {
      read = readJson(text);
    } catch (error) {
      throw new InvalidAnswerError(describeError(error), text);
    }
    const accepted = acceptAnswer(request.schema, read.value);
    const parsed = request.schema.safeParse(accepted.value);
    if (!parsed.success) {
      const issues = parsed.error.issues.slice(0, 5).map((issue) =>
        `${issue.path.join(".") || "(root)"}: ${issue.message}`
      );
      throw new InvalidAnswerError(
        `The model's answer does not fit the ${request.schemaName} schema: ${issues.join("; ")}`,
        text,
      );
    }
    const repairs: Repair[] = [
      ...(read.embedded ? ["json_in_text" as const] : []),
      ...(read.tolerant ? ["json_syntax" as const] : []),
      ...accepted.repairs,
    ];
    if (repairs.length > 0) this.#reportRepairs(request.schemaName, repairs);
    return parsed.data;
  }

  /** Counts and logs (at debug) an answer that was used after mending. */
  #reportRepairs(schemaName: string, repairs: Repair[]): void {
    this.#log.debug("Used the model's {schemaName} answer after mending it: {repairs}.", {
      schemaName,
      repairs: repairs.join(", "),
    });
    this.#options.onRepair?.({ jobType: this.#jobType, schemaName, repairs });
  }

  async #send(request: TextRequest, format?: JsonSchemaFormat): Promise<string> {
    const release = await cancellable(this.#slots.acquire(request.signal), request.signal);
    try {
      await this.#guard?.();
      // The servers considered up, primary first; when none is, the primary as before.
      const up = this.#servers.filter((server) => server.health?.available ?? true);
      const servers = up.length > 0 ? up : this.#servers.slice(0, 1);
      for (let i = 0;; i++) {
        try {
          return await this.#sendTo(servers[i], request, format);
        } catch (error) {
          const next = servers[i + 1];
          if (!next || !(error instanceof LLMError && error.kind === "unavailable")) throw error;
          this.#log.info("The {from} model server is unavailable; asking the {to} server.", {
            from: servers[i].llm.name,
            to: next.llm.name,
          });
        }
      }
    } finally {
      release();
    }
  }

  async #sendTo(
    server: ModelServer,
    request: TextRequest,
    format?: JsonSchemaFormat,
  ): Promise<string> {
    const model = server.models[request.role];
    const key = `${server.llm.name}:${model}`;
    const useSchema = format !== undefined &&
      (this.#mode === "on" || (this.#mode === "auto" && !this.#noSchema.has(key)));
    try {
      let text: string;
      try {
        text = await this.#call(server, model, request, useSchema ? format : undefined);
      } catch (error) {
        if (
          !(useSchema && this.#mode === "auto" && error instanceof LLMError &&
            error.kind === "rejected")
        ) {
          throw error;
        }
        // The server refused the schema: ask again without it, and remember when that works.
        text = await this.#call(server, model, request, undefined);
        this.#noSchema.add(key);
        this.#log.warn(
          "Model {model} on the {server} server rejected response_format json_schema ({reason}); using prompt-only JSON for it from now on.",
          { model, server: server.llm.name, reason: describeError(error) },
        );
      }
      server.health?.reportSuccess();
      return text;
    } catch (error) {
      if (error instanceof LLMError && error.kind === "unavailable") {
        server.health?.reportFailure(error);
      }
      throw error;
    }
  }

  async #call(
    server: ModelServer,
    model: string,
    request: TextRequest,
    jsonSchema?: JsonSchemaFormat,
  ): Promise<string> {
    const options = {
      system: request.system,
      jsonSchema,
      signal: request.signal,
      jobType: this.#jobType,
    };
    // The shared pause and rate limit are the primary server's; the fallback has its own.
    const gate = server === this.#servers[0] ? this.#gate : undefined;
    if (gate) await cancellable(gate.admit(request.signal), request.signal);
    let completion;
    try {
      completion = request.image
        ? await server.llm.chatWithImageSource(model, request.prompt, request.image, options)
        : await server.llm.chat(model, [{ role: "user", content: request.prompt }], options);
    } catch (error) {
      if (error instanceof LLMError && error.status === 429 && error.retryAfterMs) {
        gate?.pause(error.retryAfterMs);
      }
      throw error;
    }
    if (this.#usage) {
      this.#usage.promptTokens += completion.promptTokens;
      this.#usage.completionTokens += completion.completionTokens;
    }
    return completion.text;
  }
}

/** `waiting`, with a wait cut short by `signal` thrown as an `aborted` {@linkcode LLMError}. */
async function cancellable<T>(waiting: Promise<T>, signal?: AbortSignal): Promise<T> {
  try {
    return await waiting;
  } catch (error) {
    if (signal?.aborted && error === signal.reason) {
      throw new LLMError("aborted", "The model request was cancelled.", { cause: error });
    }
    throw error;
  }
}

const schemaCache = new WeakMap<z.ZodType, Record<string, unknown>>();

/**
 * The JSON schema of a zod schema, in the form strict structured output wants: no `$schema`,
 * every object closed (`additionalProperties: false`).
 */
export function jsonSchemaOf(schema: z.ZodType): Record<string, unknown> {
  let json = schemaCache.get(schema);
  if (!json) {
    json = z.toJSONSchema(schema, { io: "input", unrepresentable: "any" }) as Record<
      string,
      unknown
    >;
    delete json.$schema;
    closeObjects(json);
    schemaCache.set(schema, json);
  }
  return json;
}

function closeObjects(node: unknown): void {
  if (Array.isArray(node)) return node.forEach(closeObjects);
  if (!node || typeof node !== "object") return;
  const record = node as Record<string, unknown>;
  if (record.type === "object" && record.properties && !("additionalProperties" in record)) {
    record.additionalProperties = false;
  }
  Object.values(record).forEach(closeObjects);
}

/** Options of {@linkcode ModelHealth}. */
export interface ModelHealthOptions {
  /** Asks the server whether it answers; throws when it does not. */
  probe: (signal: AbortSignal) => Promise<void>;
  /** Waits between probes while the server is down (ms); the last repeats. */
  probeIntervalsMs?: number[];
  /** Sleep, injectable for tests. */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  /** Called on every change between available and unavailable. */
  onChange?: (available: boolean) => void;
  /** What the log lines call the server (default `Model server`). */
  label?: string;
  /** What happens while it is down, for the log (default: new jobs wait). */
  whileDown?: string;
  /** What happens when it is back, for the log (default: waiting jobs resume). */
  whenBack?: string;
}

/**
 * Whether the model server is answering. The first unavailable failure marks it down and starts
 * probing it; the first success (of a probe or of a job) marks it up again and wakes every
 * waiter.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const health = new ModelHealth({ probe: () => Promise.resolve() });
 * await health.untilAvailable(); // resolves at once while the server is up
 * assert.equal(health.available, true);
 * await health.close();
 * ```
 */
export class ModelHealth {
  #available = true;
  #reason = "";
  #recovered = Promise.withResolvers<void>();
  #probing?: Promise<void>;
  readonly #stop = new AbortController();
  readonly #probe: (signal: AbortSignal) => Promise<void>;
  readonly #intervals: number[];
  readonly #sleep: (ms: number, signal?: AbortSignal) => Promise<void>;
  readonly #onChange?: (available: boolean) => void;
  readonly #label: string;
  readonly #whileDown: string;
  readonly #whenBack: string;
  readonly #log: Logger = logger("model");

  /** Starts as available; nothing is probed until a failure is reported. */
  constructor(options: ModelHealthOptions) {
    this.#probe = options.probe;
    this.#intervals = options.probeIntervalsMs ?? [1000, 2000, 3000, 5000];
    this.#sleep = options.sleep ?? sleep;
    this.#onChange = options.onChange;
    this.#label = options.label ?? "Model server";
    this.#whileDown = options.whileDown ?? "New jobs wait until it answers again.";
    this.#whenBack = options.whenBack ?? "waiting jobs resume.";
  }

  /** True while the server is considered up. */
  get available(): boolean {
    return this.#available;
  }

  /** Why the server is considered down (empty while it is up). */
  get reason(): string {
    return this.#reason;
  }

  /** Marks the server down (once) and starts probing it. */
  reportFailure(error: LLMError): void {
    if (!this.#available || this.#stop.signal.aborted) return;
    this.#available = false;
    this.#reason = error.message;
    this.#log.warn("{server} unavailable: {reason} {whileDown}", {
      server: this.#label,
      reason: error.message,
      whileDown: this.#whileDown,
    });
    this.#onChange?.(false);
    this.#probing ??= this.#probeUntilUp();
  }

  /** Marks the server up and wakes everything waiting for it. */
  reportSuccess(): void {
    if (this.#available) return;
    this.#available = true;
    this.#reason = "";
    this.#log.info("{server} answers again; {whenBack}", {
      server: this.#label,
      whenBack: this.#whenBack,
    });
    const recovered = this.#recovered;
    this.#recovered = Promise.withResolvers<void>();
    recovered.resolve();
    this.#onChange?.(true);
  }

  /** Resolves at once while available, else when the server comes back or `signal` aborts. */
  untilAvailable(signal?: AbortSignal): Promise<void> {
    if (this.#available) return Promise.resolve();
    return this.nextRecovery(signal);
  }

  /** Resolves at the next change from unavailable to available (rejects when `signal` aborts). */
  nextRecovery(signal?: AbortSignal): Promise<void> {
    const recovered = this.#recovered.promise;
    if (!signal) return recovered;
    return new Promise((resolve, reject) => {
      if (signal.aborted) return reject(signal.reason);
      const onAbort = () => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      recovered.then(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      });
    });
  }

  /** Stops probing. */
  async close(): Promise<void> {
    this.#stop.abort();
    await this.#probing;
  }

  async #probeUntilUp(): Promise<void> {
    const signal = this.#stop.signal;
    try {
      for (let i = 0; !this.#available && !signal.aborted; i++) {
        try {
          await this.#sleep(this.#intervals[Math.min(i, this.#intervals.length - 1)], signal);
          if (this.#available) return;
          await this.#probe(signal);
          this.reportSuccess();
        } catch (error) {
          if (signal.aborted) return;
          this.#log.debug("Model server probe failed: {reason}", {
            reason: describeError(error),
          });
        }
      }
    } finally {
      // Cleared in the same tick as the last look at #available: a failure reported right after
      // this loop ends always starts a new one (a `.finally()` callback would leave a gap).
      this.#probing = undefined;
    }
  }
}

/** Whether the worker can reach a model at all: what the reader and the runner wait on. */
export interface ModelAvailability {
  /** True while at least one server is considered up. */
  readonly available: boolean;
  /** Why no server is up (empty while one is). */
  readonly reason: string;
  /** Resolves at once while available, else when a server comes back or `signal` aborts. */
  untilAvailable(signal?: AbortSignal): Promise<void>;
  /** Resolves at the next recovery of any server (rejects when `signal` aborts). */
  nextRecovery(signal?: AbortSignal): Promise<void>;
}

/**
 * The availability of a primary server and its fallback taken together: available while either
 * is, recovered when either comes back. With no fallback it is the primary's own health.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { LLMError } from "./llm.ts";
 *
 * const never = () => Promise.reject(new Error("down"));
 * const primary = new ModelHealth({ probe: never });
 * const fallback = new ModelHealth({ probe: never });
 * const either = eitherAvailable(primary, fallback);
 * primary.reportFailure(new LLMError("unavailable", "primary refused"));
 * assert.equal(either.available, true); // the fallback serves
 * fallback.reportFailure(new LLMError("unavailable", "fallback refused"));
 * assert.equal(either.available, false);
 * assert.equal(either.reason, "primary refused; fallback refused");
 * const back = either.nextRecovery();
 * fallback.reportSuccess();
 * await back; // the fallback came back
 * await Promise.all([primary.close(), fallback.close()]);
 * ```
 */
export function eitherAvailable(primary: ModelHealth, fallback?: ModelHealth): ModelAvailability {
  if (!fallback) return primary;
  const both = [primary, fallback];
  const nextRecovery = (signal?: AbortSignal): Promise<void> => {
    const waits = both.map((health) => health.nextRecovery(signal));
    // The one that loses the race rejects too when `signal` aborts: nobody waits for it.
    for (const wait of waits) wait.catch(() => {});
    return Promise.race(waits);
  };
  return {
    get available() {
      return primary.available || fallback.available;
    },
    get reason() {
      return primary.available || fallback.available ? "" : `${primary.reason}; ${fallback.reason}`;
    },
    untilAvailable(signal) {
      if (primary.available || fallback.available) return Promise.resolve();
      return nextRecovery(signal);
    },
    nextRecovery,
  };
}
