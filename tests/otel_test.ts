/**
 * OpenTelemetry: a worker process started like `deno task start` with `OTEL_DENO=true` exports
 * a trace of each job over OTLP: a `job <type>` span whose children are the model request
 * (`chat <model>`, itself the parent of its HTTP call) and the calls to Core.
 *
 * The OTLP receiver is a local `Deno.serve` taking OTLP/HTTP with JSON bodies
 * (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`).
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { startStack } from "./helpers/stack.ts";
import { START_FLAGS } from "../testing/worker_process.ts";

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

/** One span as OTLP/JSON carries it (the fields read here). */
interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  kind: number;
  attributes?: Array<{ key: string; value: Record<string, unknown> }>;
}

function attribute(span: OtlpSpan, key: string): unknown {
  const value = span.attributes?.find((a) => a.key === key)?.value;
  return value ? Object.values(value)[0] : undefined;
}

Deno.test("OTEL_DENO=true exports a job span with the model and Core calls as children", async () => {
  const spans: OtlpSpan[] = [];
  const services = new Set<unknown>();
  const receiver = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      const body = await req.json().catch(() => ({}));
      if (new URL(req.url).pathname === "/v1/traces") {
        for (const resource of body.resourceSpans ?? []) {
          for (const a of resource.resource?.attributes ?? []) {
            if (a.key === "service.name") services.add(a.value?.stringValue);
          }
          for (const scope of resource.scopeSpans ?? []) spans.push(...scope.spans ?? []);
        }
      }
      return Response.json({});
    },
  );
  await using stack = await startStack();
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-otel-" });
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...START_FLAGS,
      "--config",
      `${REPO_ROOT}deno.json`,
      `${REPO_ROOT}main.ts`,
    ],
    cwd: dir,
    clearEnv: true,
    env: {
      PATH: Deno.env.get("PATH") ?? "",
      HOME: Deno.env.get("HOME") ?? dir,
      ...(Deno.env.get("DENO_DIR") ? { DENO_DIR: Deno.env.get("DENO_DIR")! } : {}),
      NO_COLOR: "1",
      REDIS_URL: stack.redis.url,
      LLM_BASE_URL: stack.model.url,
      CORE_API_URL: stack.core.url,
      IMAGE_STORAGE_PATH: stack.imageDir,
      WORKER_HTTP_PORT: "0",
      WORKER_CONSUMER_NAME: "otel-test",
      OTEL_DENO: "true",
      OTEL_SERVICE_NAME: "llm-worker",
      OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${receiver.addr.port}`,
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
      OTEL_DENO_CONSOLE: "ignore",
    },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  let logs = "";
  try {
    // The worker creates the groups when it starts; publish once it is reading.
    await stack.waitFor(
      async () => {
        const groups = await stack.client.xinfo("GROUPS", "llm:followup").catch(() => []);
        return (groups as unknown[]).length > 0;
      },
      "the worker process to start",
      30_000,
    );
    const jobId = await stack.enqueue("followup", { message: "Book the dentist" }, 7);
    await stack.waitForJobs([jobId], 30_000);
  } finally {
    child.kill("SIGTERM"); // spans still batched are exported as the process exits
    const { code, stdout, stderr } = await output;
    logs = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
    await receiver.shutdown();
    await Deno.remove(dir, { recursive: true });
    assert.equal(code, 0, logs);
  }

  assert.deepEqual([...services], ["llm-worker"]);
  const job = spans.find((s) => s.name === "job followup");
  assert.ok(job, `no job span among ${spans.map((s) => s.name).join(", ")}\n${logs}`);
  assert.equal(attribute(job, "llm_worker.job_type"), "followup");
  assert.equal(attribute(job, "llm_worker.outcome"), "completed");
  assert.equal(String(attribute(job, "llm_worker.user_id")), "7"); // int64: a string in JSON
  assert.equal(attribute(job, "messaging.destination.name"), "llm:followup");

  const children = spans.filter((s) => s.parentSpanId === job.spanId);
  const chat = children.find((s) => s.name === "chat mistral");
  assert.ok(chat, `children: ${children.map((s) => s.name).join(", ")}`);
  assert.equal(attribute(chat, "gen_ai.request.model"), "mistral");
  assert.equal(attribute(chat, "llm_worker.job_type"), "followup");
  const modelCall = spans.find((s) => s.parentSpanId === chat.spanId);
  assert.ok(modelCall, "the model's HTTP request is a child of the chat span");
  assert.match(String(attribute(modelCall, "url.full")), /\/v1\/chat\/completions$/);

  const coreCalls = children.filter((s) =>
    String(attribute(s, "url.full") ?? "").startsWith(stack.core.url)
  );
  assert.ok(
    coreCalls.some((s) => attribute(s, "http.request.method") === "PATCH"),
    `Core's PATCH is a child of the job span: ${children.map((s) => s.name).join(", ")}`,
  );
  assert.ok(children.every((s) => s.traceId === job.traceId), "one trace per job");
});
