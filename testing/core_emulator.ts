/**
 * Core emulator: an in-memory stand-in for Life Organiser's Core REST API (docs/protocol.md
 * section 3) with the same routes, status codes and validation (422 with a `detail` list), for
 * local runs, the demo, tests and benchmarks. It is NOT Core: it keeps everything in memory and
 * forgets it when it stops.
 *
 * Every answer carries the header `x-core-emulator: true`. Emulator-only routes, which Core does
 * not have, live under `/_emulator/` and are not recorded in the request log:
 *
 * - `GET /_emulator/state`: everything stored (jobs, memories, events, tasks, settings).
 * - `POST /_emulator/memories` `{"owner_user_id", "content"?, "media_type"?, "id"?, "tags"?}`:
 *   adds a memory (201).
 * - `POST /_emulator/tasks` `{"owner_user_id", "description", "id"?, "state"?, "due_at"?}`:
 *   adds a task (201).
 *
 * @module
 */

/** A job as the emulator stores it. */
export interface EmulatedJob {
  id: string;
  job_type: string;
  status: "queued" | "processing" | "completed" | "failed";
  payload: Record<string, unknown>;
  user_id: number | null;
  result: unknown;
  error_message: string | null;
  created_at: string;
  updated_at: string;
}

/** A memory as the emulator stores it. */
export interface EmulatedMemory {
  id: string;
  owner_user_id: number;
  content: string | null;
  media_type: string;
  tags: Array<{ tag: string; status: string }>;
  created_at: string;
}

/** An event as the emulator stores it. */
export interface EmulatedEvent {
  id: string;
  owner_user_id: number;
  event_time: string;
  description: string;
  source_type: string;
  source_detail: string | null;
  status: "pending";
}

/** A task as the emulator stores it. */
export interface EmulatedTask {
  id: string;
  owner_user_id: number;
  description: string;
  state: string;
  due_at: string | null;
}

/** One request the emulator received. */
export interface RecordedRequest {
  method: string;
  path: string;
  query: Record<string, string>;
  body: unknown;
  status: number;
}

/** Everything the emulator knows; tests and the demo read it back. */
export interface CoreState {
  jobs: Map<string, EmulatedJob>;
  memories: Map<string, EmulatedMemory>;
  events: Map<string, EmulatedEvent>;
  tasks: Map<string, EmulatedTask>;
  settings: Map<number, { user_id: number; timezone: string; language: string }>;
  /** Known users; while empty, every user id is accepted. */
  users: Set<number>;
  requests: RecordedRequest[];
}

/** Options of {@linkcode startCoreEmulator}. */
export interface CoreEmulatorOptions {
  /** Port on 127.0.0.1; 0 (default) picks a free one. */
  port?: number;
  /** Keep a log of every request (default true; benchmarks turn it off). */
  recordRequests?: boolean;
  /**
   * Called before every request is handled: return a `Response` to answer with it instead
   * (fault injection, e.g. a 503), or `undefined` to go on; a promise of either makes the
   * request wait for it (a slow Core).
   */
  fault?: (
    request: { method: string; path: string },
  ) => Response | undefined | Promise<Response | undefined>;
}

/** A running emulator. */
export interface CoreEmulator {
  /** Base URL, e.g. `http://127.0.0.1:41234`. */
  url: string;
  /** The data, readable and writable. */
  state: CoreState;
  /** Replaces the fault function. */
  setFault(fault: CoreEmulatorOptions["fault"]): void;
  /** Adds a queued job and returns it. */
  seedJob(
    job: {
      id?: string;
      job_type: string;
      payload: Record<string, unknown>;
      user_id: number | null;
    },
  ): EmulatedJob;
  /** Adds a memory and returns it. */
  seedMemory(memory: Partial<EmulatedMemory> & { owner_user_id: number }): EmulatedMemory;
  /** Adds a task and returns it. */
  seedTask(
    task: Partial<EmulatedTask> & { owner_user_id: number; description: string },
  ): EmulatedTask;
  /** Sets a user's timezone (and registers the user). */
  seedSettings(userId: number, timezone: string): void;
  /** Stops the server. */
  close(): Promise<void>;
  /** `[Symbol.asyncDispose]` = close. */
  [Symbol.asyncDispose](): Promise<void>;
}

type Detail = Array<{ loc: Array<string | number>; msg: string; type: string }>;

const invalid = (detail: Detail) => Response.json({ detail }, { status: 422 });
const notFound = (what: string) => Response.json({ detail: `${what} not found` }, { status: 404 });
const missing = (field: string): Detail[number] => ({
  loc: ["body", field],
  msg: "Field required",
  type: "missing",
});
const wrong = (field: string, msg: string, type = "value_error"): Detail[number] => ({
  loc: ["body", field],
  msg,
  type,
});

const ISO_DATE = /^\d{4}-\d{2}-\d{2}$/;
const ISO_DATE_TIME = /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$/;

/**
 * Reads `event_time` the way Core does: an ISO-8601 date or date-time (no offset = UTC), or a
 * string of digits as Unix seconds. Anything else is `null` (a 422).
 */
export function coreEventTime(value: string): string | null {
  if (/^\d+$/.test(value)) return new Date(Number(value) * 1000).toISOString();
  if (ISO_DATE.test(value)) return `${value}T00:00:00Z`;
  if (!ISO_DATE_TIME.test(value)) return null;
  const hasOffset = /(Z|[+-]\d{2}:?\d{2})$/.test(value);
  const date = new Date(hasOffset ? value : `${value}Z`);
  return Number.isNaN(date.getTime()) ? null : value;
}

/**
 * Starts the emulator.
 *
 * @example
 * ```ts
 * await using core = startCoreEmulator();
 * core.seedTask({ owner_user_id: 1, description: "Buy milk" });
 * ```
 */
export function startCoreEmulator(options: CoreEmulatorOptions = {}): CoreEmulator {
  const state: CoreState = {
    jobs: new Map(),
    memories: new Map(),
    events: new Map(),
    tasks: new Map(),
    settings: new Map(),
    users: new Set(),
    requests: [],
  };
  let fault = options.fault;
  const record = options.recordRequests ?? true;
  const now = () => new Date().toISOString();
  const knownUser = (id: number) => state.users.size === 0 || state.users.has(id);

  const handle = (req: Request, text: string): Response => {
    const url = new URL(req.url);
    const path = url.pathname;
    const method = req.method;

    let body: unknown = undefined;
    if (method === "POST" || method === "PATCH") {
      if (!(req.headers.get("content-type") ?? "").includes("application/json")) {
        return invalid([{
          loc: ["body"],
          msg: "Input should be a valid JSON object (send content-type: application/json)",
          type: "model_attributes_type",
        }]);
      }
      try {
        body = text ? JSON.parse(text) : undefined;
      } catch {
        return invalid([{ loc: ["body"], msg: "JSON decode error", type: "json_invalid" }]);
      }
      if (body === undefined || body === null || typeof body !== "object" || Array.isArray(body)) {
        return invalid([{ loc: ["body"], msg: "Field required", type: "missing" }]);
      }
    }
    const b = (body ?? {}) as Record<string, unknown>;
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);

    // /llm_jobs
    if (parts[0] === "llm_jobs" && parts.length === 1 && method === "POST") {
      const errors: Detail = [];
      if (typeof b.job_type !== "string") errors.push(missing("job_type"));
      if (typeof b.payload !== "object" || b.payload === null) errors.push(missing("payload"));
      if (errors.length) return invalid(errors);
      const job = api.seedJob({
        job_type: b.job_type as string,
        payload: b.payload as Record<string, unknown>,
        user_id: typeof b.user_id === "number" ? b.user_id : null,
      });
      return Response.json(job, { status: 201 });
    }
    if (parts[0] === "llm_jobs" && parts.length === 2) {
      const job = state.jobs.get(parts[1]);
      if (!job) return notFound("Job");
      if (method === "GET") return Response.json(job);
      if (method === "PATCH") {
        const errors: Detail = [];
        if (
          b.status != null &&
          !["queued", "processing", "completed", "failed"].includes(String(b.status))
        ) {
          errors.push(
            wrong(
              "status",
              "Input should be 'queued', 'processing', 'completed' or 'failed'",
              "enum",
            ),
          );
        }
        if (b.result != null && (typeof b.result !== "object" || Array.isArray(b.result))) {
          errors.push(wrong("result", "Input should be a valid dictionary", "dict_type"));
        }
        if (b.error_message != null && typeof b.error_message !== "string") {
          errors.push(wrong("error_message", "Input should be a valid string", "string_type"));
        }
        if (errors.length) return invalid(errors);
        if (b.status != null) job.status = b.status as EmulatedJob["status"];
        if (b.result != null) job.result = b.result;
        if (b.error_message != null) job.error_message = b.error_message as string;
        job.updated_at = now();
        return Response.json(job);
      }
    }

    // /memories
    if (parts[0] === "memories" && parts.length === 1 && method === "POST") {
      const errors: Detail = [];
      if (typeof b.owner_user_id !== "number" || !Number.isInteger(b.owner_user_id)) {
        errors.push(
          b.owner_user_id === undefined
            ? missing("owner_user_id")
            : wrong("owner_user_id", "Input should be a valid integer", "int_type"),
        );
      }
      if (typeof b.content !== "string") {
        errors.push(
          b.content === undefined
            ? missing("content")
            : wrong("content", "Input should be a valid string", "string_type"),
        );
      }
      if (errors.length) return invalid(errors);
      if (!knownUser(b.owner_user_id as number)) {
        return new Response("Internal Server Error", { status: 500 });
      }
      const memory = api.seedMemory({
        owner_user_id: b.owner_user_id as number,
        content: b.content as string,
        media_type: "text",
      });
      return Response.json(memory, { status: 201 });
    }
    if (parts[0] === "memories" && parts.length >= 2) {
      const memory = state.memories.get(parts[1]);
      if (parts.length === 2 && method === "GET") {
        return memory ? Response.json(memory) : notFound("Memory");
      }
      if (parts.length === 3 && parts[2] === "tags" && method === "POST") {
        if (!memory) return notFound("Memory");
        const errors: Detail = [];
        if (!Array.isArray(b.tags) || b.tags.some((t) => typeof t !== "string")) {
          errors.push(
            b.tags === undefined
              ? missing("tags")
              : wrong("tags", "Input should be a valid list of strings", "list_type"),
          );
        }
        const status = b.status ?? "confirmed";
        if (!["suggested", "confirmed"].includes(String(status))) {
          errors.push(wrong("status", "Input should be 'suggested' or 'confirmed'", "enum"));
        }
        if (errors.length) return invalid(errors);
        for (const tag of b.tags as string[]) {
          const existing = memory.tags.find((t) => t.tag === tag);
          if (existing) existing.status = String(status);
          else memory.tags.push({ tag, status: String(status) });
        }
        return Response.json(memory);
      }
    }

    // /events
    if (parts[0] === "events" && parts.length === 1 && method === "POST") {
      const errors: Detail = [];
      if (typeof b.owner_user_id !== "number") errors.push(missing("owner_user_id"));
      if (typeof b.description !== "string") errors.push(missing("description"));
      if (typeof b.source_type !== "string") errors.push(missing("source_type"));
      let eventTime: string | null = null;
      if (typeof b.event_time !== "string") errors.push(missing("event_time"));
      else {
        eventTime = coreEventTime(b.event_time);
        if (!eventTime) {
          errors.push(
            wrong(
              "event_time",
              "Input should be a valid datetime or date",
              "datetime_from_date_parsing",
            ),
          );
        }
      }
      if (errors.length) return invalid(errors);
      if (!knownUser(b.owner_user_id as number)) {
        return new Response("Internal Server Error", { status: 500 });
      }
      const event: EmulatedEvent = {
        id: crypto.randomUUID(),
        owner_user_id: b.owner_user_id as number,
        event_time: eventTime!,
        description: b.description as string,
        source_type: b.source_type as string,
        source_detail: typeof b.source_detail === "string" ? b.source_detail : null,
        status: "pending",
      };
      state.events.set(event.id, event);
      return Response.json(event, { status: 201 });
    }

    // /tasks
    if (parts[0] === "tasks" && parts.length === 1 && method === "GET") {
      const owner = url.searchParams.get("owner_user_id");
      if (!owner || !/^\d+$/.test(owner)) {
        return invalid([{
          loc: ["query", "owner_user_id"],
          msg: "Field required",
          type: "missing",
        }]);
      }
      const wanted = url.searchParams.get("state");
      return Response.json(
        [...state.tasks.values()].filter((t) =>
          t.owner_user_id === Number(owner) && (!wanted || t.state === wanted)
        ),
      );
    }

    // /search
    if (parts[0] === "search" && parts.length === 1 && method === "GET") {
      const q = url.searchParams.get("q") ?? "";
      const owner = url.searchParams.get("owner");
      if (!owner || !/^\d+$/.test(owner)) {
        return invalid([{ loc: ["query", "owner"], msg: "Field required", type: "missing" }]);
      }
      if (!q.trim()) return Response.json({ detail: "Query must not be empty" }, { status: 400 });
      if (q.includes('"')) return new Response("Internal Server Error", { status: 500 });
      const words = q.toLowerCase().split(/\s+/).filter(Boolean);
      const hits = [...state.memories.values()]
        .filter((m) => m.owner_user_id === Number(owner))
        .map((memory) => {
          const text = `${memory.content ?? ""} ${memory.tags.map((t) => t.tag).join(" ")}`
            .toLowerCase();
          return { memory, score: words.filter((w) => text.includes(w)).length / words.length };
        })
        .filter((hit) => hit.score > 0)
        .sort((a, b) => b.score - a.score)
        .slice(0, 20);
      return Response.json(hits);
    }

    // /settings
    if (parts[0] === "settings" && parts.length === 2 && method === "GET") {
      const id = Number(parts[1]);
      return Response.json(
        state.settings.get(id) ?? { user_id: id, timezone: "UTC", language: "en" },
      );
    }

    return notFound(`Route ${method} ${path}`);
  };

  /** Adds `x-core-emulator: true`, so tools can tell the emulator from Core. */
  const marked = (response: Response): Response => {
    try {
      response.headers.set("x-core-emulator", "true");
    } catch {
      // immutable headers (a fault hook's own Response): left as they are
    }
    return response;
  };

  /** The routes Core does not have, for people and tools driving the emulator. */
  const emulatorRoute = (method: string, path: string, text: string): Response => {
    let b: Record<string, unknown> = {};
    try {
      b = text ? JSON.parse(text) : {};
    } catch {
      return invalid([{ loc: ["body"], msg: "JSON decode error", type: "json_invalid" }]);
    }
    if (method === "GET" && path === "/_emulator/state") {
      return Response.json({
        jobs: [...state.jobs.values()],
        memories: [...state.memories.values()],
        events: [...state.events.values()],
        tasks: [...state.tasks.values()],
        settings: [...state.settings.values()],
      });
    }
    if (method === "POST" && (path === "/_emulator/memories" || path === "/_emulator/tasks")) {
      if (typeof b.owner_user_id !== "number") return invalid([missing("owner_user_id")]);
      if (path === "/_emulator/tasks") {
        if (typeof b.description !== "string") return invalid([missing("description")]);
        return Response.json(
          api.seedTask(b as Parameters<CoreEmulator["seedTask"]>[0]),
          { status: 201 },
        );
      }
      return Response.json(
        api.seedMemory(b as Parameters<CoreEmulator["seedMemory"]>[0]),
        { status: 201 },
      );
    }
    return notFound(`Emulator route ${method} ${path}`);
  };

  const server = Deno.serve(
    { hostname: "127.0.0.1", port: options.port ?? 0, onListen: () => {} },
    async (req) => {
      const url = new URL(req.url);
      const text = req.method === "POST" || req.method === "PATCH" ? await req.text() : "";
      if (url.pathname.startsWith("/_emulator/")) {
        return marked(emulatorRoute(req.method, url.pathname, text));
      }
      // No await without a fault hook: this is the bench's Core, on its hot path.
      const injected = fault ? await fault({ method: req.method, path: url.pathname }) : undefined;
      const response = marked(injected ?? handle(req, text));
      if (record) {
        let body: unknown = undefined;
        try {
          body = text ? JSON.parse(text) : undefined;
        } catch {
          body = text;
        }
        state.requests.push({
          method: req.method,
          path: url.pathname,
          query: Object.fromEntries(url.searchParams),
          body,
          status: response.status,
        });
      }
      return response;
    },
  );

  const api: CoreEmulator = {
    url: `http://127.0.0.1:${server.addr.port}`,
    state,
    setFault: (next) => fault = next,
    seedJob: (job) => {
      const stored: EmulatedJob = {
        id: job.id ?? crypto.randomUUID(),
        job_type: job.job_type,
        status: "queued",
        payload: job.payload,
        user_id: job.user_id,
        result: null,
        error_message: null,
        created_at: now(),
        updated_at: now(),
      };
      state.jobs.set(stored.id, stored);
      return stored;
    },
    seedMemory: (memory) => {
      const stored: EmulatedMemory = {
        id: memory.id ?? crypto.randomUUID(),
        owner_user_id: memory.owner_user_id,
        content: memory.content ?? "",
        media_type: memory.media_type ?? "text",
        tags: memory.tags ?? [],
        created_at: memory.created_at ?? now(),
      };
      state.memories.set(stored.id, stored);
      return stored;
    },
    seedTask: (task) => {
      const stored: EmulatedTask = {
        id: task.id ?? crypto.randomUUID(),
        owner_user_id: task.owner_user_id,
        description: task.description,
        state: task.state ?? "NOT_DONE",
        due_at: task.due_at ?? null,
      };
      state.tasks.set(stored.id, stored);
      return stored;
    },
    seedSettings: (userId, timezone) => {
      state.users.add(userId);
      state.settings.set(userId, { user_id: userId, timezone, language: "en" });
    },
    close: async () => {
      await server.shutdown();
    },
    [Symbol.asyncDispose]: () => api.close(),
  };
  return api;
}
