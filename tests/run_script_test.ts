import assert from "node:assert/strict";
import { closeRedis, createRedis, runScript } from "../lib/redis.ts";
import { startRedis } from "../testing/redis_server.ts";

Deno.test("runScript sends a script's text once, and again after Redis forgot it", async () => {
  await using redis = await startRedis();
  const client = createRedis(redis.url, { eager: true });
  try {
    const script = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
    await client.call("CONFIG", "RESETSTAT");
    assert.equal(await runScript(client, script, 1, "counter", 2), 2);
    assert.equal(await runScript(client, script, 1, "counter", 3), 5);
    const stats = await client.call("INFO", "commandstats") as string;
    const calls = (name: string) =>
      Number(new RegExp(`cmdstat_${name}:calls=(\\d+)`).exec(stats)?.[1] ?? 0);
    assert.equal(calls("eval"), 1, "the text went once");
    assert.equal(calls("evalsha"), 2, "then by its SHA1 (the first one answered NOSCRIPT)");

    await client.call("SCRIPT", "FLUSH"); // as a restarted Redis
    assert.equal(await runScript(client, script, 1, "counter", 1), 6);

    // A script's own error is the caller's, not a reason to send it again.
    await assert.rejects(runScript(client, "return redis.error_reply('FENCED')", 0), /FENCED/);
  } finally {
    await closeRedis(client);
  }
});
