/** The import check of `deno task check` (`dev/check_imports.ts`). */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import {
  findBrokenRules,
  findCycles,
  type ImportGraph,
  loadGraph,
  main,
} from "../dev/check_imports.ts";

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

/** A folder of modules, written from `{path: source}`; removed by the returned function. */
async function writeTree(files: Record<string, string>): Promise<[string, () => Promise<void>]> {
  const dir = await Deno.makeTempDir({ prefix: "check_imports_" });
  for (const [path, source] of Object.entries(files)) {
    const full = `${dir}/${path}`;
    await Deno.mkdir(full.slice(0, full.lastIndexOf("/")), { recursive: true });
    await Deno.writeTextFile(full, source);
  }
  return [dir, () => Deno.remove(dir, { recursive: true })];
}

Deno.test("a cycle through type-only and value imports is read from deno info and reported", async () => {
  const [dir, remove] = await writeTree({
    "lib/a.ts": 'import { b } from "./b.ts";\nexport const a = b + 1;\n',
    "lib/b.ts": 'import type { C } from "./deep/c.ts";\nexport const b: C = 1;\n',
    "lib/deep/c.ts": 'import type { a } from "../a.ts";\nexport type C = typeof a;\n',
    "lib/d.ts": 'import { a } from "./a.ts";\nexport const d = a;\n',
    "lib/self.ts":
      'import * as me from "./self.ts";\nexport const x = 1;\nexport const y = me.x;\n',
  });
  try {
    const graph = await loadGraph(dir, ["lib"]);
    assert.deepEqual(graph.get("lib/d.ts"), ["lib/a.ts"]);
    assert.deepEqual(findCycles(graph), [
      ["lib/a.ts", "lib/b.ts", "lib/deep/c.ts", "lib/a.ts"],
      ["lib/self.ts", "lib/self.ts"],
    ]);
  } finally {
    await remove();
  }
});

Deno.test("main prints every cycle's chain and fails", async () => {
  const [dir, remove] = await writeTree({
    "main.ts": 'import "./lib/x.ts";\n',
    "cli/dead.ts": "export {};\n",
    "cli/prompts.ts": "export {};\n",
    "lib/x.ts": 'import "./y.ts";\n',
    "lib/y.ts": 'import "./x.ts";\n',
    "testing/t.ts": "export {};\n",
    "tests/t_test.ts": "export {};\n",
    "bench/b.ts": "export {};\n",
    "dev/d.ts": "export {};\n",
  });
  try {
    const lines: string[] = [];
    assert.deepEqual(await main(dir, (line) => lines.push(line)), 1);
    assert.deepEqual(lines, [
      "import cycle: lib/x.ts → lib/y.ts → lib/x.ts",
      "imports: 1 cycle(s) and 0 import(s) across a layer the wrong way",
    ]);
  } finally {
    await remove();
  }
});

Deno.test("every import that lies on a cycle is in a reported chain, each chain once", () => {
  // Two cycles sharing a.ts (a → b → a and a → c → d → a), and e.ts leading into them.
  const graph: ImportGraph = new Map([
    ["a.ts", ["b.ts", "c.ts"]],
    ["b.ts", ["a.ts"]],
    ["c.ts", ["d.ts"]],
    ["d.ts", ["a.ts"]],
    ["e.ts", ["a.ts"]],
  ]);
  assert.deepEqual(findCycles(graph), [
    ["a.ts", "b.ts", "a.ts"],
    ["a.ts", "c.ts", "d.ts", "a.ts"],
  ]);
  assert.deepEqual(findCycles(new Map([["a.ts", ["b.ts"]], ["b.ts", []]])), []);
});

Deno.test("imports across a layer the wrong way are reported with the rule", () => {
  const graph: ImportGraph = new Map([
    ["lib/streams.ts", ["lib/handlers/types.ts", "lib/job.ts"]],
    ["lib/consumer.ts", ["lib/handlers/mod.ts"]],
    ["lib/handlers/mod.ts", ["lib/handlers/types.ts", "lib/job.ts"]],
    ["lib/worker.ts", ["testing/machine.ts"]],
    ["testing/worker_process.ts", ["tests/helpers/poll.ts", "lib/config.ts"]],
    ["bench/bench.ts", ["testing/machine.ts", "dev/local_stack.ts"]],
    ["dev/dev.ts", ["testing/core_emulator.ts", "bench/bench.ts"]],
    ["tests/demo_test.ts", ["dev/demo.ts", "bench/bench.ts", "testing/machine.ts"]],
  ]);
  assert.deepEqual(findBrokenRules(graph).map(({ from, to }) => `${from} → ${to}`), [
    "lib/streams.ts → lib/handlers/types.ts",
    "lib/worker.ts → testing/machine.ts",
    "testing/worker_process.ts → tests/helpers/poll.ts",
    "bench/bench.ts → dev/local_stack.ts",
    "dev/dev.ts → bench/bench.ts",
  ]);
});

Deno.test("the repository's own imports have no cycle and keep every layer rule", async () => {
  const graph = await loadGraph(REPO_ROOT);
  // The graph is the real one: it holds the files and imports the rules are about.
  assert.deepEqual(graph.get("lib/streams.ts")?.includes("lib/job.ts"), true);
  assert.deepEqual(graph.get("lib/runner.ts")?.includes("lib/handlers/mod.ts"), true);
  assert.deepEqual(graph.get("bench/bench.ts")?.includes("testing/worker_process.ts"), true);
  assert.deepEqual(findCycles(graph), []);
  assert.deepEqual(findBrokenRules(graph), []);
  const lines: string[] = [];
  assert.deepEqual(await main(REPO_ROOT, (line) => lines.push(line)), 0);
  assert.deepEqual(lines, [`imports: ${graph.size} files, no cycle, every layer rule kept`]);
});
