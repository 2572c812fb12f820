/**
 * The client of Life Organiser's Core REST API: one method per call of docs/protocol.md section 3,
 * over `fetch` with a per-request timeout.
 *
 * @module
 */
import { scopedSignal, sleep } from "./utils.ts";
import { logger } from "./log.ts";

const log = logger("core");

/** Job statuses in Core. */
export type JobStatus = "queued" | "processing" | "completed" | "failed";

/** A job as Core returns it (other fields are kept as they come). */
export interface CoreJob {
  /** Current status. */
  status: JobStatus;
  /** The handler's result once completed. */
  result?: unknown;
  /** Why the job failed. */
  error_message?: string | null;
  /** When Core queued it. */
  created_at?: string;
  [field: string]: unknown;
}

/** The fields of `PATCH /llm_jobs/{id}`; a field left out (or `null`) is not changed. */
export interface JobUpdate {
  /** New status. */
  status?: JobStatus;
  /** The handler's result. */
  result?: Record<string, unknown> | null;
  /** Why the job failed. */
  error_message?: string;
}

/** One tag of a memory. */
export interface MemoryTag {
  /** The tag's text. */
  tag: string;
  /** `suggested` or `confirmed`. */
  status?: string;
  [field: string]: unknown;
}

/** A memory as Core returns it. */
export interface Memory {
  /** Memory id. */
  id: string;
  /** Text, or `""`/`null` for a captionless photo. */
  content: string | null;
  /** `text`, `image`, ... */
  media_type?: string | null;
  /** Its tags. */
  tags?: MemoryTag[];
  [field: string]: unknown;
}

/** An open task as `GET /tasks` returns it. */
export interface Task {
  /** Task id. */
  id: string;
  /** What the task is. */
  description: string;
  /** Task state, e.g. `NOT_DONE`. */
  state?: string;
  /** When it is due. */
  due_at?: string | null;
  [field: string]: unknown;
}

/** One full-text search hit. */
export interface SearchHit {
  /** The memory found. */
  memory: Memory;
  /** Relevance. */
  score: number;
}

/** The body of `POST /events`. */
export interface NewEvent {
  /** Owner's user id. */
  owner_user_id: number;
  /** Full ISO-8601 date-time with an offset. */
  event_time: string;
  /** What happens. */
  description: string;
  /** Always `email` from this worker. */
  source_type: string;
  /** The email's subject. */
  source_detail: string;
}

/** An event as Core returns it after creating it. */
export interface CoreEvent {
  /** Event id. */
  id: string;
  [field: string]: unknown;
}

/** A user's settings. */
export interface UserSettings {
  /** IANA timezone, `UTC` when the user has none. */
  timezone: string;
  /** ISO 639-1 language code, `en` when the user has none. */
  language?: string;
  [field: string]: unknown;
}

/** How long {@linkcode CoreApiClient.getSettings} reuses a user's settings by default (ms). */
export const SETTINGS_CACHE_MS = 60_000;

/** A failed Core call: which call, what Core said, and whether it is worth trying again. */
export class CoreApiError extends Error {
  /** HTTP status, or 0 when Core could not be reached or timed out. */
  readonly status: number;
  /** HTTP method of the call. */
  readonly method: string;
  /** URL of the call. */
  readonly url: string;
  /** The start of Core's answer, for logs. */
  readonly body: string;
  /** True when Core did not answer within the client's timeout. */
  readonly timedOut: boolean;

  /** Builds the error; the message names the call and Core's answer. */
  constructor(
    method: string,
    url: string,
    status: number,
    body: string,
    options: { cause?: unknown; timedOut?: boolean } = {},
  ) {
    const what = status === 0 ? body : `${status}: ${body}`;
    super(`Core ${method} ${url} failed with ${what}`, { cause: options.cause });
    this.name = "CoreApiError";
    this.method = method;
    this.url = url;
    this.status = status;
    this.body = body;
    this.timedOut = options.timedOut ?? false;
  }

  /** True for a network error, a timeout, 429 or 5xx: trying later may succeed. */
  get retryable(): boolean {
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}

/** Options of {@linkcode CoreApiClient}. */
export interface CoreApiClientOptions {
  /** Core's base URL, e.g. `http://core:8000`. */
  baseUrl: string;
  /** Timeout of one request (ms). Default 10 s. */
  timeoutMs?: number;
  /** The `fetch` to use (tests, tracing). */
  fetch?: typeof fetch;
  /**
   * Waits before each quick retry of a call that met a passing failure (refused connection, 429,
   * 502, 503, 504): default 100 ms then 400 ms. `[]` turns quick retries off. A call that still
   * fails throws, and the job waits on the retry schedule of docs/protocol.md section 4.
   */
  retryDelaysMs?: readonly number[];
  /**
   * How long a user's settings are reused before Core is asked again (ms, default
   * {@linkcode SETTINGS_CACHE_MS}); `0` asks every time.
   */
  settingsCacheMs?: number;
  /** The clock of the settings cache, in ms (default `Date.now`). */
  now?: () => number;
}

/** Most users whose settings are kept at once; the oldest are dropped first. */
const SETTINGS_CACHE_SIZE = 10_000;

/**
 * Calls Core's REST API. Every method throws {@linkcode CoreApiError} when Core does not answer
 * with the expected success status.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const sent: Request[] = [];
 * const core = new CoreApiClient({
 *   baseUrl: "http://core:8000",
 *   // Stands in for Core: records each request and answers 200.
 *   fetch: (input, init) => {
 *     sent.push(new Request(input, init));
 *     return Promise.resolve(Response.json({ id: "job-1", status: "completed" }));
 *   },
 * });
 * await core.updateJob("job-1", { status: "completed", result: null });
 * assert.equal(sent[0].method, "PATCH");
 * assert.equal(sent[0].url, "http://core:8000/llm_jobs/job-1");
 * assert.deepEqual(await sent[0].json(), { status: "completed", result: null });
 * ```
 */
export class CoreApiClient {
  readonly #base: string;
  readonly #timeoutMs: number;
  readonly #fetch: typeof fetch;
  readonly #retryDelaysMs: readonly number[];
  readonly #settingsCacheMs: number;
  readonly #now: () => number;
  readonly #settings = new Map<number, { at: number; settings: UserSettings }>();

  /** Creates a client; nothing is sent until the first call. */
  constructor(options: CoreApiClientOptions) {
    this.#base = options.baseUrl.replace(/\/+$/, "");
    this.#timeoutMs = options.timeoutMs ?? 10_000;
    this.#fetch = options.fetch ?? fetch;
    this.#retryDelaysMs = options.retryDelaysMs ?? [100, 400];
    this.#settingsCacheMs = options.settingsCacheMs ?? SETTINGS_CACHE_MS;
    this.#now = options.now ?? Date.now;
  }

  /** `GET /llm_jobs/{id}`. */
  getJob(jobId: string, signal?: AbortSignal): Promise<CoreJob> {
    return this.#call("GET", `/llm_jobs/${enc(jobId)}`, { signal });
  }

  /** `PATCH /llm_jobs/{id}`: status, result and error message. */
  updateJob(jobId: string, update: JobUpdate, signal?: AbortSignal): Promise<CoreJob> {
    return this.#call("PATCH", `/llm_jobs/${enc(jobId)}`, { body: update, signal });
  }

  /** `GET /memories/{id}`. */
  getMemory(memoryId: string, signal?: AbortSignal): Promise<Memory> {
    return this.#call("GET", `/memories/${enc(memoryId)}`, { signal });
  }

  /** `POST /memories/{id}/tags` with status `suggested` (Core's default would be `confirmed`). */
  addTags(memoryId: string, tags: string[], signal?: AbortSignal): Promise<unknown> {
    return this.#call("POST", `/memories/${enc(memoryId)}/tags`, {
      body: { tags, status: "suggested" },
      signal,
    });
  }

  /** `POST /memories`: keeps a message as a memory; answers the new memory. */
  createMemory(ownerUserId: number, content: string, signal?: AbortSignal): Promise<Memory> {
    return this.#call("POST", `/memories`, {
      body: { owner_user_id: ownerUserId, content },
      signal,
    });
  }

  /** `POST /events`: Core stores it as `pending` and asks the user to confirm. */
  createEvent(event: NewEvent, signal?: AbortSignal): Promise<CoreEvent> {
    return this.#call("POST", `/events`, { body: event, signal });
  }

  /** `GET /tasks?owner_user_id=&state=NOT_DONE`: the user's open tasks. */
  getOpenTasks(ownerUserId: number, signal?: AbortSignal): Promise<Task[]> {
    const query = new URLSearchParams({ owner_user_id: String(ownerUserId), state: "NOT_DONE" });
    return this.#call("GET", `/tasks?${query}`, { signal });
  }

  /** `GET /search?q=&owner=`: full-text search over the user's memories. */
  search(q: string, ownerUserId: number, signal?: AbortSignal): Promise<SearchHit[]> {
    const query = new URLSearchParams({ q, owner: String(ownerUserId) });
    return this.#call("GET", `/search?${query}`, { signal });
  }

  /**
   * `GET /settings/{user_id}`: the user's timezone and language. An answer is reused for
   * `settingsCacheMs` (a minute by default), so a user's change reaches the worker within that
   * time and a job that runs again does not ask again.
   */
  async getSettings(userId: number, signal?: AbortSignal): Promise<UserSettings> {
    const now = this.#now();
    const kept = this.#settings.get(userId);
    if (kept && now - kept.at < this.#settingsCacheMs) return kept.settings;
    const settings: UserSettings = await this.#call("GET", `/settings/${enc(String(userId))}`, {
      signal,
    });
    if (this.#settingsCacheMs > 0) {
      this.#settings.delete(userId);
      if (this.#settings.size >= SETTINGS_CACHE_SIZE) {
        this.#settings.delete(this.#settings.keys().next().value!);
      }
      this.#settings.set(userId, { at: now, settings });
    }
    return settings;
  }

  /**
   * One call, tried again after a short wait when it met a passing failure: a Core that refuses
   * one call in three must not push jobs onto the slow retry schedule (whose waits grow to 30
   * minutes). Timeouts are not tried again here: the call already took `timeoutMs`.
   */
  async #call<T>(
    method: string,
    path: string,
    options: { body?: unknown; signal?: AbortSignal },
  ): Promise<T> {
    for (let attempt = 0;; attempt++) {
      try {
        return await this.#callOnce<T>(method, path, options);
      } catch (error) {
        const delay = this.#retryDelaysMs[attempt];
        if (delay === undefined || !isPassing(error)) throw error;
        await sleep(delay, options.signal);
      }
    }
  }

  async #callOnce<T>(
    method: string,
    path: string,
    options: { body?: unknown; signal?: AbortSignal },
  ): Promise<T> {
    const url = `${this.#base}${path}`;
    using limit = scopedSignal(options.signal, this.#timeoutMs);
    const started = performance.now();
    let response: Response;
    try {
      response = await this.#fetch(url, {
        method,
        headers: options.body === undefined
          ? { accept: "application/json" }
          : { accept: "application/json", "content-type": "application/json" },
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: limit.signal,
      });
    } catch (error) {
      if (options.signal?.aborted) throw options.signal.reason;
      const why = limit.timedOut
        ? `no answer within ${this.#timeoutMs} ms`
        : `Core could not be reached (${
          error instanceof Error ? error.message : error
        }); check CORE_API_URL`;
      logCall(method, path, "no answer", started);
      throw new CoreApiError(method, url, 0, why, { cause: error, timedOut: limit.timedOut });
    }
    logCall(method, path, response.status, started);
    const text = await response.text().catch(() => "");
    // Core answers 200 or 201 as the table says; any other 2xx is a success all the same.
    if (!response.ok) {
      throw new CoreApiError(method, url, response.status, errorDetail(text));
    }
    try {
      return (text ? JSON.parse(text) : null) as T;
    } catch (error) {
      throw new CoreApiError(
        method,
        url,
        response.status,
        `answer is not JSON: ${errorDetail(text)}`,
        { cause: error },
      );
    }
  }
}

/** One debug line per call; the query (search text, user ids) is left out. */
function logCall(method: string, path: string, status: number | string, started: number): void {
  if (!log.isEnabledFor("debug")) return;
  log.debug("Core {method} {path} answered {status} in {durationMs} ms.", {
    method,
    path: path.split("?")[0],
    status,
    durationMs: Math.round(performance.now() - started),
  });
}

/** A failure worth a quick second try: refused or reset connection, 429, 502, 503, 504. */
function isPassing(error: unknown): boolean {
  if (!(error instanceof CoreApiError)) return false;
  if (error.status === 0) return !error.timedOut;
  return [429, 502, 503, 504].includes(error.status);
}

function enc(segment: string): string {
  return encodeURIComponent(segment);
}

/** Core's error detail in one short line: a string `detail`, a 422 list, or plain text. */
function errorDetail(text: string): string {
  let detail = text;
  try {
    const parsed = JSON.parse(text);
    if (typeof parsed?.detail === "string") detail = parsed.detail;
    else if (Array.isArray(parsed?.detail)) {
      detail = parsed.detail.map((d: { loc?: unknown[]; msg?: string }) =>
        `${(d.loc ?? []).join(".")}: ${d.msg ?? "invalid"}`
      ).join("; ");
    }
  } catch {
    // plain text (a 500), kept as it is
  }
  detail = detail.replace(/\s+/g, " ").trim() || "(empty body)";
  return detail.length > 300 ? `${detail.slice(0, 300)}…` : detail;
}
