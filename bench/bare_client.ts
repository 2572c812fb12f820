/**
 * The benchmark's ceiling: plain `openai` SDK calls against the same fake model, with the same
 * concurrency and the same requests as the worker, and nothing else (no Redis, no Core). Run as
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
import { Buffer } from "node:buffer";
import OpenAI from "openai";
import { clockMs } from "./fake_model.ts";

/** One request of the spec. */
export interface BareRequest {
  /** Sent as `response_format.json_schema.name` (with a small schema), when given. */
  schema?: string;
  /** The user prompt. */
  text: string;
  /** An image file to send with it (read and base64-encoded per request, as the worker does). */
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

async function send(client: OpenAI, request: BareRequest, suffix = ""): Promise<void> {
  const text = request.text + suffix;
  const content: OpenAI.ChatCompletionContentPart[] | string = request.image
    ? [
      { type: "text", text },
      {
        type: "image_url",
        image_url: {
          url: `data:image/png;base64,${
            Buffer.from(await Deno.readFile(request.image)).toString("base64")
          }`,
        },
      },
    ]
    : text;
  const response = await client.chat.completions.create({
    model: request.image ? "llava" : "mistral",
    temperature: 0.3,
    messages: [{ role: "system", content: SYSTEM }, { role: "user", content }],
    ...(request.schema
      ? {
        response_format: {
          type: "json_schema" as const,
          json_schema: { name: request.schema, schema: SCHEMA, strict: true },
        },
      }
      : {}),
  });
  if (response.choices[0]?.message?.content === undefined) throw new Error("no answer");
}

async function pool(client: OpenAI, requests: BareRequest[], concurrency: number): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, requests.length) }, async () => {
      while (next < requests.length) await send(client, requests[next++]);
    }),
  );
}

/** Runs the spec and prints the result line. */
export async function runBareClient(spec: BareSpec): Promise<void> {
  const client = new OpenAI({ baseURL: spec.url, apiKey: "not-needed", maxRetries: 0 });
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
