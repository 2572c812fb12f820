/** The benchmark's gauge of how fast the machine was during a run (`testing/machine.ts`). */
import assert from "node:assert/strict";
import {
  cpuShares,
  cpuTimes,
  describeSpeed,
  machineInfo,
  round,
  speedProbe,
  startSpeedGauge,
} from "../testing/machine.ts";

Deno.test("round: one decimal unless told, as a number", () => {
  assert.equal(round(141.94), 141.9);
  assert.equal(round(0.12345, 3), 0.123);
  assert.equal(round(2), 2);
});

Deno.test("cpuShares: steal and idle as shares of the ticks between two readings", () => {
  const before = { total: 1_000, steal: 10, idle: 400 };
  const after = { total: 1_200, steal: 30, idle: 450 };
  assert.deepEqual(cpuShares(before, after), { steal: 0.1, idle: 0.25 });
  assert.deepEqual(cpuShares(after, after), { steal: 0, idle: 0 });
});

Deno.test("cpuTimes reads /proc/stat's counters, which only grow", async () => {
  const before = await cpuTimes();
  assert.ok(before, "/proc/stat is readable on Linux");
  assert.ok(before.total > before.idle && before.idle >= 0 && before.steal >= 0);
  speedProbe(1); // some CPU time between the readings
  const after = await cpuTimes();
  assert.ok(after && after.total > before.total);
  const shares = cpuShares(before, after);
  assert.ok(shares.steal >= 0 && shares.steal <= 1 && shares.idle >= 0 && shares.idle < 1);
});

Deno.test("speedProbe takes measurable time; machineInfo names the CPU and Redis", async () => {
  const ms = speedProbe(1);
  assert.ok(Number.isFinite(ms) && ms > 1, `probe took ${ms} ms`);
  const info = await machineInfo();
  assert.notEqual(info.cpu, "unknown");
  assert.ok(info.cores >= 1 && info.memoryGb > 0);
  assert.match(info.redis, /^\d+\.\d+/);
});

Deno.test("a run's speed gauge: the probe at either end and the CPU's shares, in one line", async () => {
  const gauge = await startSpeedGauge();
  const speed = await gauge.finish();
  assert.ok(speed.probeMsAtStart > 1 && speed.probeMsAtEnd > 1);
  assert.ok(speed.stealShare !== undefined && speed.idleShare !== undefined);
  assert.equal(
    describeSpeed({ probeMsAtStart: 92.9, probeMsAtEnd: 119, stealShare: 0.063, idleShare: 0.49 }),
    "Speed probe 92.9 ms at the start, 119 ms at the end (one thread's fixed JSON and string " +
      "work; lower is faster); over the run, CPU stolen by other guests 6.3%, idle 49%",
  );
  assert.equal(
    describeSpeed({ probeMsAtStart: 90, probeMsAtEnd: 91 }),
    "Speed probe 90 ms at the start, 91 ms at the end (one thread's fixed JSON and string work; " +
      "lower is faster)",
  );
});
