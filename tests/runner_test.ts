/**
 * The job runner on its own: no Redis and no streams, only its narrow interface (work items in, a
 * job store, `release` and `moveToDead` out), with the real model client against a local model
 * server and the real Core client against the Core emulator.
 */
import assert from "node:assert/strict";
import { startCoreEmulator } from "../testing/core_emulator.ts";
import { loadSettings } from "../lib/config.ts";
import { CoreApiClient } from "../lib/core_api.ts";
import type { Job } from "../lib/job.ts";
import { type JobRecord, MemoryEffects } from "../lib/ledger.ts";
import { LLMClient } from "../lib/llm.ts";
import { ModelGateway, ModelHealth } from "../lib/model.ts";
import { type JobOutcome, JobRunner, type JobStore } from "../lib/runner.ts";
import type { Notification } from "../lib/streams.ts";
import { type WorkItem, workItem } from "../lib/work_item.ts";
import { type ChatRequest, type ModelReply, startModelServer } from "./helpers/model_server.ts";
import { defaultReply } from "./helpers/stack.ts";

/** A job store in memory: what the ledger keeps in Redis, in maps. */
class MemoryStore implements JobStore {
  readonly counts = new Map<string, number>();
  readonly flags = new Set<string>();
  readonly finished: Array<{ jobId: string; status: string; notifications: Notification[] }> = [];
  readonly notified: Notification[] = [];
  readonly acked: string[] = [];

  load(_jobId: string): Promise<JobRecord> {
    return Promise.resolve({
      exists: false,
      invalidAttempts: 0,
      unavailableAttempts: 0,
      effects: new Map(),
    });
  }
  effects(): MemoryEffects {
    return new MemoryEffects();
  }
  #count(key: string): Promise<number> {
    const count = (this.counts.get(key) ?? 0) + 1;
    this.counts.set(key, count);
    return Promise.resolve(count);
  }
  countInvalid(jobId: string): Promise<number> {
    return this.#count(`${jobId} invalid`);
  }
  countUnavailable(jobId: string): Promise<number> {
    return this.#count(`${jobId} unavailable`);
  }
  setOnce(jobId: string, flag: string): Promise<boolean> {
    const key = `${jobId} ${flag}`;
    const first = !this.flags.has(key);
    this.flags.add(key);
    return Promise.resolve(first);
  }
  saveOutbox(): Promise<void> {
    return Promise.resolve();
  }
  finish(job: Job, status: "completed" | "failed", notifications: Notification[]) {
    this.finished.push({ jobId: job.jobId, status, notifications });
    this.acked.push(job.entryId);
    return Promise.resolve(true);
  }
  async notifyOnce(jobId: string, flag: "told", notification: Notification) {
    if (!await this.setOnce(jobId, flag)) return false;
    this.notified.push(notification);
    return true;
  }
  ack(job: Pick<Job, "entryId">): Promise<void> {
    this.acked.push(job.entryId);
    return Promise.resolve();
  }
}

/** A runner wired to a local model server and the Core emulator. */
function setup(reply: (request: ChatRequest) => ModelReply) {
  const model = startModelServer(reply);
  const core = startCoreEmulator();
  const settings = loadSettings({
    LLM_BASE_URL: model.url,
    CORE_API_URL: core.url,
    LLM_MAX_RETRIES: "2",
  });
  const llm = new LLMClient({ baseUrl: model.url });
  const health = new ModelHealth({ probe: (signal) => llm.probe(signal) });
  const store = new MemoryStore();
  const released: WorkItem[] = [];
  const dead: string[] = [];
  const outcomes: JobOutcome[] = [];
  const runner = new JobRunner({
    settings,
    ledger: store,
    core: new CoreApiClient({ baseUrl: core.url }),
    model: new ModelGateway({
      llm,
      models: { text: settings.llmTextModel, vision: settings.llmVisionModel },
      concurrency: 2,
      health,
    }),
    health,
    events: { jobEnded: (_job, outcome) => outcomes.push(outcome) },
    moveToDead: (item, reason) => Promise.resolve(dead.push(`${item.entryId}: ${reason}`)),
    release: (item) => released.push(item),
  });
  const item = (jobType: string, payload: Record<string, unknown>) => {
    const job = core.seedJob({ job_type: jobType, payload, user_id: 3 });
    const envelope = { job_id: job.id, job_type: jobType, payload, user_id: 3 };
    return workItem(`llm:${jobType}`, `${Date.now()}-0`, ["data", JSON.stringify(envelope)], false);
  };
  return {
    runner,
    core,
    store,
    released,
    dead,
    outcomes,
    item,
    async [Symbol.asyncDispose]() {
      await health.close();
      await model.close();
      await core.close();
    },
  };
}

Deno.test("runner: a job runs to its end, Core has the result, the store ends it, the item is released", async () => {
  await using t = setup(defaultReply);
  const item = t.item("followup", { message: "Book the dentist" });
  const retry = await t.runner.run(item);
  assert.equal(retry, undefined, "over: no retry");
  const jobId = item.parsed.ok ? item.parsed.job.jobId : "";
  assert.equal(t.core.state.jobs.get(jobId)?.status, "completed");
  assert.deepEqual(t.store.finished.map((f) => [f.jobId, f.status]), [[jobId, "completed"]]);
  assert.equal(t.store.finished[0].notifications[0].user_id, 3);
  assert.deepEqual(t.released, [item]);
  assert.deepEqual(t.outcomes, ["completed"]);
});

Deno.test("runner: invalid answers are tried again up to LLM_MAX_RETRIES, then the job fails", async () => {
  await using t = setup(() => "no json at all");
  t.core.seedTask({ owner_user_id: 3, description: "Buy milk" });
  const item = t.item("task_match", { memory_id: "m", memory_content: "milk" });
  const first = await t.runner.run(item);
  assert.deepEqual(first, { retryInMs: 1000 }, "attempt 2 in 1 s");
  assert.deepEqual(t.released, [], "still held while it waits");
  const second = await t.runner.run(item);
  assert.equal(second, undefined);
  assert.deepEqual(t.outcomes, ["retry_invalid", "failed"]);
  assert.equal(t.store.finished[0].status, "failed");
  assert.equal(t.store.finished[0].notifications[0].message_type, "llm_failure");
  assert.deepEqual(t.released, [item]);
});

Deno.test("runner: a malformed entry goes to moveToDead and is released", async () => {
  await using t = setup(defaultReply);
  const item = workItem("llm:followup", "1-0", ["data", "not json"], false);
  assert.equal(await t.runner.run(item), undefined);
  assert.equal(t.dead.length, 1);
  assert.match(t.dead[0], /^1-0: malformed job entry: /);
  assert.deepEqual(t.released, [item]);
});
