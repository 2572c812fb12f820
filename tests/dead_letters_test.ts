/**
 * Dead letters (`lib/dead_letters.ts`, `deno task dead`): listing, showing, re-queueing and
 * dropping entries of `llm:dead` against a real Redis, and a re-queued job run by a real worker.
 */
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import {
  DeadLetterError,
  deadLetters,
  dropDeadLetters,
  formatAge,
  getDeadLetter,
  requeueDeadLetter,
} from "../lib/dead_letters.ts";
import { closeRedis, createRedis } from "../lib/redis.ts";
import { DEAD_STREAM, ensureGroups, GROUP, moveToDead } from "../lib/streams.ts";
import { dead, type DeadIO } from "../cli/dead.ts";
import { startRedis } from "../testing/redis_server.ts";
import { startStack } from "./helpers/stack.ts";

const REPO_ROOT = new URL("../", import.meta.url).pathname;

async function withRedis(test: (redis: Redis, url: string) => Promise<void>) {
  await using server = await startRedis();
  const redis = createRedis(server.url, { eager: true });
  try {
    await test(redis, server.url);
  } finally {
    await closeRedis(redis);
  }
}

/** Publishes `fields` to `stream`, reads it as a consumer and dead-letters it as the worker does. */
async function deadLetter(
  redis: Redis,
  stream: string,
  fields: string[],
  reason = "malformed job entry: `data` is not JSON",
): Promise<{ entryId: string; deadId: string }> {
  await ensureGroups(redis, [stream]);
  const entryId = (await redis.xadd(stream, "*", ...fields))!;
  await redis.xreadgroup("GROUP", GROUP, "c", "STREAMS", stream, ">");
  assert.equal(await moveToDead(redis, stream, entryId, reason, fields), true);
  const [last] = await redis.xrevrange(DEAD_STREAM, "+", "-", "COUNT", 1);
  return { entryId, deadId: last[0] };
}

/** The CLI with captured output and a scripted answer to its question. */
async function cli(
  url: string,
  args: string[],
  answer: string | null = null,
): Promise<{ code: number; out: string; err: string; asked: string[] }> {
  const out: string[] = [];
  const err: string[] = [];
  const asked: string[] = [];
  const io: Partial<DeadIO> = {
    env: { REDIS_URL: url },
    out: (line) => out.push(line),
    err: (line) => err.push(line),
    ask: (question) => {
      asked.push(question);
      return Promise.resolve(answer);
    },
  };
  const code = await dead(args, io);
  return { code, out: out.join("\n"), err: err.join("\n"), asked };
}

Deno.test("a dead letter reads back with its stream, reason, age and exact original fields", async () => {
  await withRedis(async (redis) => {
    // Field names that clash with the copy's own are given back as they were.
    const fields = ["data", '{"job_id":"j-1"', "id", "own id", "orig_note", "x", "reason", "r"];
    const { entryId, deadId } = await deadLetter(redis, "llm:intent", fields);
    const letter = await getDeadLetter(redis, deadId);
    assert.ok(letter);
    assert.equal(letter.stream, "llm:intent");
    assert.equal(letter.originalId, entryId);
    assert.equal(letter.reason, "malformed job entry: `data` is not JSON");
    assert.deepEqual(letter.fields, fields);
    assert.equal(letter.jobId, undefined, "`data` is not JSON: no job id");
    assert.ok(Math.abs(letter.deadAtMs - Date.now()) < 60_000);
    assert.equal(await getDeadLetter(redis, "1-0"), undefined);
    await assert.rejects(getDeadLetter(redis, "nonsense"), DeadLetterError);
  });
});

Deno.test("requeue publishes the original fields to the original stream and deletes, once", async () => {
  await withRedis(async (redis) => {
    const envelope = '{"job_id":"j-2","job_type":"followup","payload":{},"user_id":1}';
    const fields = ["data", envelope, "stream", "kept"];
    const { deadId } = await deadLetter(redis, "llm:followup", fields);
    const before = await redis.xlen("llm:followup");
    const result = await requeueDeadLetter(redis, deadId);
    assert.equal(result.requeued, true);
    assert.ok(result.requeued);
    assert.equal(result.stream, "llm:followup");
    const [entry] = await redis.xrange("llm:followup", result.newId, result.newId);
    assert.deepEqual(entry[1], fields);
    assert.equal(await redis.xlen("llm:followup"), before + 1);
    assert.equal(await redis.xlen(DEAD_STREAM), 0);
    // A second requeue (another operator, a retried command) finds nothing and publishes nothing.
    assert.deepEqual(await requeueDeadLetter(redis, deadId), { requeued: false });
    assert.equal(await redis.xlen("llm:followup"), before + 1);
  });
});

Deno.test("two operators requeueing the same entry at once publish it once", async () => {
  await withRedis(async (redis, url) => {
    const { deadId } = await deadLetter(redis, "llm:intent", ["data", "{"]);
    const other = createRedis(url, { eager: true });
    try {
      const before = await redis.xlen("llm:intent");
      const results = await Promise.all([
        requeueDeadLetter(redis, deadId),
        requeueDeadLetter(other, deadId),
        requeueDeadLetter(redis, deadId),
      ]);
      assert.equal(results.filter((r) => r.requeued).length, 1);
      assert.equal(await redis.xlen("llm:intent"), before + 1);
      assert.equal(await redis.xlen(DEAD_STREAM), 0);
    } finally {
      await closeRedis(other);
    }
  });
});

Deno.test("a requeue that cannot publish keeps the dead letter", async () => {
  await withRedis(async (redis) => {
    const { deadId } = await deadLetter(redis, "llm:task_match", ["data", "{"]);
    // The stream's key replaced by a string: XADD fails inside the script, nothing is deleted.
    await redis.del("llm:task_match");
    await redis.set("llm:task_match", "not a stream");
    await assert.rejects(requeueDeadLetter(redis, deadId), /WRONGTYPE/);
    assert.ok(await getDeadLetter(redis, deadId));
    // A copy naming a stream the worker does not read is refused with what to do.
    const odd =
      (await redis.xadd(DEAD_STREAM, "*", "stream", "elsewhere", "reason", "r", "a", "b"))!;
    await assert.rejects(requeueDeadLetter(redis, odd), /not a job stream.*drop it/);
    assert.equal(await redis.exists("elsewhere"), 0);
    assert.equal(await redis.xlen(DEAD_STREAM), 2);
  });
});

Deno.test("deadLetters pages through a long llm:dead in order; drop deletes", async () => {
  await withRedis(async (redis) => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      ids.push((await deadLetter(redis, "llm:intent", ["n", `${i}`])).deadId);
    }
    const read: string[] = [];
    for await (const letter of deadLetters(redis, 2)) read.push(letter.id);
    assert.deepEqual(read, ids);
    assert.equal(await dropDeadLetters(redis, [ids[0], ids[1], "1-0"]), 2);
    assert.equal(await redis.xlen(DEAD_STREAM), 3);
  });
});

Deno.test("formatAge is short and readable", () => {
  assert.equal(formatAge(42_000), "42s");
  assert.equal(formatAge(5 * 60_000 + 3_000), "5m 3s");
  assert.equal(formatAge(3 * 3_600_000 + 12 * 60_000), "3h 12m");
  assert.equal(formatAge(2 * 86_400_000 + 4 * 3_600_000), "2d 4h");
  assert.equal(formatAge(-5), "0s");
});

Deno.test("dead list and show print stream, job, reason and age", async () => {
  await withRedis(async (redis, url) => {
    assert.match((await cli(url, ["list"])).out, /llm:dead is empty/);
    const envelope = '{"job_id":"j-7","job_type":"nope","payload":{},"user_id":1}';
    const { deadId } = await deadLetter(
      redis,
      "llm:intent",
      ["data", envelope],
      'malformed job entry: unknown job_type "nope"',
    );
    const list = await cli(url, ["list"]);
    assert.equal(list.code, 0);
    const [header, row, total] = list.out.split("\n");
    assert.match(header, /^ID\s+AGE\s+STREAM\s+JOB\s+REASON$/);
    assert.match(
      row,
      new RegExp(`^${deadId}\\s+\\d+s\\s+llm:intent\\s+j-7\\s+malformed job entry`),
    );
    assert.equal(total, "1 dead letter in llm:dead.");
    const show = await cli(url, ["show", deadId]);
    assert.equal(show.code, 0);
    assert.match(show.out, /stream:\s+llm:intent/);
    assert.match(show.out, /"job_type": "nope"/, "data is pretty-printed");
    const missing = await cli(url, ["show", "1-0"]);
    assert.equal(missing.code, 1);
    assert.match(missing.err, /No dead letter 1-0/);
  });
});

Deno.test("dead requeue --all and drop --all ask first, and touch nothing on no", async () => {
  await withRedis(async (redis, url) => {
    await deadLetter(redis, "llm:intent", ["data", "{1"]);
    await deadLetter(redis, "llm:followup", ["data", "{2"]);
    const refused = await cli(url, ["drop", "--all"], "n");
    assert.equal(refused.code, 1);
    assert.match(refused.asked[0], /Delete these 2 entries from llm:dead\? \[y\/N\]/);
    assert.match(refused.out, /Nothing changed/);
    const ended = await cli(url, ["requeue", "--all"], null); // end of input counts as no
    assert.equal(ended.code, 1);
    assert.equal(await redis.xlen(DEAD_STREAM), 2);

    const before = [await redis.xlen("llm:intent"), await redis.xlen("llm:followup")];
    const yes = await cli(url, ["requeue", "--all"], "y");
    assert.equal(yes.code, 0, yes.err);
    assert.equal((yes.out.match(/^Requeued /gm) ?? []).length, 2);
    assert.deepEqual(
      [await redis.xlen("llm:intent"), await redis.xlen("llm:followup")],
      [before[0] + 1, before[1] + 1],
    );
    assert.equal(await redis.xlen(DEAD_STREAM), 0);

    await deadLetter(redis, "llm:intent", ["data", "{3"]);
    const dropped = await cli(url, ["drop", "--all", "--yes"]);
    assert.equal(dropped.code, 0);
    assert.deepEqual(dropped.asked, [], "--yes asks nothing");
    assert.equal(await redis.xlen(DEAD_STREAM), 0);
  });
});

Deno.test("dead refuses bad usage with exit 2 and an unreachable Redis with exit 1", async () => {
  for (
    const args of [
      [],
      ["list", "1-0"],
      ["show"],
      ["requeue"],
      ["requeue", "1-0", "--all"],
      ["drop", "--limit", "2", "--all"],
      ["frobnicate"],
    ]
  ) {
    const result = await cli("redis://127.0.0.1:1", args);
    assert.equal(result.code, 2, args.join(" "));
  }
  const down = await cli("redis://127.0.0.1:1", ["list"]);
  assert.equal(down.code, 1);
  assert.match(down.err, /not reachable.*REDIS_URL/);
  await withRedis(async (_redis, url) => {
    const result = await cli(url, ["requeue", "not-an-id"]);
    assert.equal(result.code, 1);
    assert.match(result.err, /not an entry id/);
  });
});

Deno.test("a requeued job runs in a real worker though Core had marked it failed", async () => {
  await using stack = await startStack();
  await ensureGroups(stack.client);
  const jobId = await stack.enqueue("followup", { message: "the thing next week" });
  // As an older worker would: read the entry and dead-letter it; Core marks the job failed.
  const [[, [[entryId, fields]]]] = await stack.client.xreadgroup(
    "GROUP",
    GROUP,
    "old-worker",
    "STREAMS",
    "llm:followup",
    ">",
  ) as [string, [string, string[]][]][];
  await moveToDead(stack.client, "llm:followup", entryId, "unknown job_type", fields);
  stack.core.state.jobs.get(jobId)!.status = "failed";

  await stack.startWorker();
  const [letter] = await stack.deadLetters();
  assert.equal(letter.stream, "llm:followup");
  const deadId = (await stack.client.xrange(DEAD_STREAM, "-", "+"))[0][0];
  const result = await cli(stack.redis.url, ["requeue", deadId]);
  assert.equal(result.code, 0, result.err);
  await stack.waitFor(
    () => stack.core.state.jobs.get(jobId)?.status === "completed",
    "the requeued job to complete",
  );
  await stack.waitForAcks();
  const sent = await stack.notifications();
  assert.deepEqual(sent.map((n) => n.message_type), ["llm_followup_result"]);
  assert.equal(await stack.client.xlen(DEAD_STREAM), 0);
});

Deno.test("deno task dead runs with its own narrow permissions", async () => {
  await withRedis(async (redis, url) => {
    const { deadId } = await deadLetter(redis, "llm:intent", ["data", "{"]);
    const run = (args: string[]) =>
      new Deno.Command(Deno.execPath(), {
        args: ["task", "--quiet", "dead", ...args],
        cwd: REPO_ROOT,
        env: { REDIS_URL: url, NO_COLOR: "1" },
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      });
    const listing = run(["list"]).spawn();
    await listing.stdin.close();
    const list = await listing.output();
    const text = new TextDecoder().decode(list.stdout);
    assert.equal(list.code, 0, new TextDecoder().decode(list.stderr));
    assert.match(text, new RegExp(`${deadId}.*llm:intent`));
    // The confirmation is read from standard input.
    const child = run(["drop", "--all"]).spawn();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode("y\n"));
    await writer.close();
    const dropped = await child.output();
    assert.equal(dropped.code, 0, new TextDecoder().decode(dropped.stderr));
    assert.match(new TextDecoder().decode(dropped.stdout), /Dropped 1 of 1/);
    assert.equal(await redis.xlen(DEAD_STREAM), 0);
  });
});
