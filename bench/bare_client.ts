/**
 * The benchmark's ceiling: the worker's model client (`LLMClient`, the `openai` SDK with the
 * image streamed into the request) calling the same fake model, with the same concurrency and
 * the same requests as the worker, and nothing else (no Redis, no Core, no scheduling). Run as
 * its own process, like the worker, by `bench/bench.ts`:
 *
 * ```sh
 * deno run --allow-net --allow-read bench/bare_client.ts spec.json
 * ```
 *
 * It prints one JSON line: `{"jobs", "elapsedMs"}` (the bench reads its memory from /proc).
 *
 * @module
 */
import { imageFileChunks } from "../lib/image_body.ts";
import { LLMClient } from "../lib/llm.ts";
import { clockMs } from "../testing/fake_model.ts";

/** One request of the spec. */
export interface BareRequest {
  /** Sent as `response_format.json_schema.name` (with a small schema), when given. */
  schema?: string;
  /** The user prompt. */
  text: string;
  /** An image file to send with it (read while the request is sent, as the worker does). */
  image?: string;
}

/** What the bench asks of the bare client. */
export interface BareSpec {
  /** The fake model's base URL. */
  url: string;
  /** Requests in flight at once. */
  concurrency: number;
  /** Requests sent before the timed run. */
  warmup: BareRequest[];
  /** The timed requests. */
  requests: BareRequest[];
  /**
   * `throughput`: all at once, `concurrency` in flight. `latency`: one by one, each prompt ending
   * in ` sent=<clock ms>` so the server can tell the time from the call to its arrival.
   */
  mode: "throughput" | "latency";
  /** Pause between requests in latency mode (ms). */
  gapMs?: number;
}

const SYSTEM = "You are a helpful assistant for a personal organiser. ".repeat(20);
const SCHEMA = {
  type: "object",
  properties: { answer: { type: "string" } },
  required: ["answer"],
  additionalProperties: false,
};

const sizes = new Map<string, number>();

/** The size of an image file, measured once (the worker measures each job's when checking it). */
function sizeOf(path: string): number {
  let size = sizes.get(path);
  if (size === undefined) sizes.set(path, size = Deno.statSync(path).size);
  return size;
}

async function send(client: LLMClient, request: BareRequest, suffix = ""): Promise<void> {
  const text = request.text + suffix;
  const options = {
    system: SYSTEM,
    jsonSchema: request.schema ? { name: request.schema, schema: SCHEMA } : undefined,
  };
  const image = request.image;
  const answer = image
    ? await client.completeWithImageSource("llava", text, {
      mimeType: "image/png",
      open: () => imageFileChunks(image, sizeOf(image)),
    }, options)
    : await client.complete("mistral", text, options);
  if (typeof answer !== "string") throw new Error("no answer");
}

async function pool(
  client: LLMClient,
  requests: BareRequest[],
  concurrency: number,
): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, requests.length) }, async () => {
      while (next < requests.length) await send(client, requests[next++]);
    }),
  );
}

/** Runs the spec and prints the result line. */
export async function runBareClient(spec: BareSpec): Promise<void> {
  const client = new LLMClient({ baseUrl: spec.url });
  await pool(client, spec.warmup, spec.concurrency);
  const started = performance.now();
  if (spec.mode === "throughput") {
    await pool(client, spec.requests, spec.concurrency);
  } else {
    for (const request of spec.requests) {
      await send(client, request, ` sent=${clockMs().toFixed(3)}`);
      await new Promise((resolve) => setTimeout(resolve, spec.gapMs ?? 20));
    }
  }
  const elapsedMs = performance.now() - started;
  console.log(JSON.stringify({ jobs: spec.requests.length, elapsedMs }));
}

if (import.meta.main) {
  await runBareClient(JSON.parse(await Deno.readTextFile(Deno.args[0])) as BareSpec);
}
