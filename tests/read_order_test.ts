/**
 * The read loop under a backlog larger than its window: entries are read in batches from five
 * streams of different densities, yet every user's jobs still reach the model in entry-id order.
 */
import assert from "node:assert/strict";
import { random } from "../testing/workload.ts";
import { compareEntryIds, STREAM_OF } from "../lib/streams.ts";
import { promptOf } from "./helpers/model_server.ts";
import { defaultReply, startStack } from "./helpers/stack.ts";

Deno.test("a backlog over several streams: each user's jobs in entry order, none left behind", async () => {
  const seen: string[] = [];
  await using stack = await startStack({
    reply: (request) => {
      const mark = /user-\d+-job-\d+/.exec(promptOf(request))?.[0];
      if (mark && !seen.includes(mark)) seen.push(mark);
      return defaultReply(request);
    },
  });
  // Streams of different densities: the followup stream runs far ahead of the others in time
  // per entry read, which is what makes a window-limited reader stage entries.
  const rand = random(11);
  const jobs: Array<{ id: string; mark: string; user: number }> = [];
  const counts = new Map<number, number>();
  for (let i = 0; i < 150; i++) {
    const user = 1 + Math.floor(rand() * 5);
    const n = (counts.get(user) ?? 0) + 1;
    counts.set(user, n);
    const mark = `user-${user}-job-${n}`;
    const pick = rand();
    const id = pick < 0.6
      ? await stack.enqueue("followup", { message: mark }, user)
      : pick < 0.9
      ? await stack.enqueue("email_extract", { subject: "Plans", body: mark }, user)
      : await stack.enqueue("intent_classify", { message: mark, memory_id: null }, user);
    jobs.push({ id, mark, user });
  }
  // Concurrency 1: a window of 32 entries, far smaller than the backlog.
  await stack.startWorker({ WORKER_CONCURRENCY: "1" });
  await stack.waitForJobs(jobs.map((j) => j.id), 60_000);

  for (const job of jobs) {
    assert.equal(stack.core.state.jobs.get(job.id)!.status, "completed", job.mark);
  }
  // Entry-id order: two entries added in the same millisecond to different streams are ordered
  // by their sequence numbers, which each stream counts on its own, not by when they came.
  const entryOf = new Map<string, string>();
  for (const stream of Object.values(STREAM_OF)) {
    for (const [id, fields] of await stack.client.xrange(stream, "-", "+")) {
      entryOf.set(/user-\d+-job-\d+/.exec(fields[1])![0], id);
    }
  }
  // Equal ids (same millisecond, same sequence number, two streams) may go either way.
  for (const user of counts.keys()) {
    const asked = seen.filter((mark) => mark.startsWith(`user-${user}-`));
    assert.equal(asked.length, counts.get(user), `user ${user}: every job asked once`);
    for (let i = 1; i < asked.length; i++) {
      const [before, after] = [entryOf.get(asked[i - 1])!, entryOf.get(asked[i])!];
      assert.ok(
        compareEntryIds(before, after) <= 0,
        `user ${user}: ${asked[i - 1]} (${before}) ran before ${asked[i]} (${after})`,
      );
    }
  }
  await stack.waitFor(async () => Object.keys(await stack.pending()).length === 0, "the XACKs");
});
