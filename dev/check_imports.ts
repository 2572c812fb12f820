/**
 * `deno task check`'s import check: builds the graph of the repository's own modules with
 * `deno info --json` and fails when
 *
 * - files import each other in a cycle (type-only and dynamic imports count: a cycle of types is
 *   still two modules that cannot be read one without the other), or
 * - an import crosses a layer the wrong way (see {@linkcode RULES}): imports run from the entry
 *   through the consumer to the handlers and on to clients and utilities; `testing/` (the
 *   stand-ins tests, bench and dev share) imports only `lib/` and itself.
 *
 * Every import that lies on a cycle shows up in at least one reported chain, so one report lists
 * everything there is to untangle. Run it alone with
 * `deno run --allow-read --allow-run=deno dev/check_imports.ts`; exit code 0 when the imports are
 * clean, 1 otherwise.
 *
 * @module
 */
import { join, relative, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

/** Each module (a path relative to the repository, `/`-separated) and the modules it imports. */
export type ImportGraph = ReadonlyMap<string, readonly string[]>;

/** The part of `deno info --json`'s output the check reads. */
export interface DenoInfo {
  /** Every module of the graph. */
  modules: {
    /** The module's URL. */
    specifier: string;
    /** What it imports; `code` and `type` hold where each import resolved to. */
    dependencies?: {
      code?: { specifier?: string };
      type?: { specifier?: string };
    }[];
  }[];
}

/** A rule on which folders may import which. */
export interface LayerRule {
  /** Path prefixes of the importing files the rule applies to. */
  from: readonly string[];
  /** Path prefixes those files must not import. */
  to: readonly string[];
  /** Files matched by `from` that may import `to` all the same. */
  except?: readonly string[];
  /** Why, and what to do instead: printed with every import that breaks the rule. */
  why: string;
}

/** An import that breaks a {@linkcode LayerRule}. */
export interface BrokenRule {
  /** The importing file. */
  from: string;
  /** The imported file. */
  to: string;
  /** The rule it breaks. */
  rule: LayerRule;
}

/** The files under `lib/` that run handlers and so may import `lib/handlers/`. */
export const HANDLER_RUNNERS: readonly string[] = ["lib/consumer.ts", "lib/runner.ts"];

/** The folders the check reads, relative to the repository. */
export const CHECKED: readonly string[] = [
  "main.ts",
  "cli",
  "lib",
  "testing",
  "tests",
  "bench",
  "dev",
];

/** The layers' rules. `tests/` may import anything (it tests dev's and bench's tools too). */
export const RULES: readonly LayerRule[] = [
  {
    from: ["lib/"],
    to: ["lib/handlers/"],
    except: ["lib/handlers/", ...HANDLER_RUNNERS],
    why: `only the handlers and the code that runs them (${
      HANDLER_RUNNERS.join(", ")
    }) import lib/handlers/; the job's own types are in lib/job.ts`,
  },
  {
    from: ["main.ts", "cli/", "lib/"],
    to: ["testing/", "tests/", "bench/", "dev/"],
    why: "the worker itself never imports test, bench or dev code",
  },
  {
    from: ["testing/"],
    to: ["tests/", "bench/", "dev/"],
    why: "testing/ imports only lib/ and itself; move what it needs into testing/",
  },
  {
    from: ["bench/"],
    to: ["tests/", "dev/"],
    why: "bench/ imports lib/ and testing/; move shared stand-ins into testing/",
  },
  {
    from: ["dev/"],
    to: ["tests/", "bench/"],
    why: "dev/ imports lib/ and testing/; move shared stand-ins into testing/",
  },
];

/**
 * The local-file part of `deno info --json`'s output, with paths relative to `root`. Imports of
 * npm packages, `node:` modules and files outside `root` are left out.
 *
 * @example Two files, one importing the other and an npm package
 * ```ts
 * import assert from "node:assert/strict";
 * import { graphFromInfo } from "./check_imports.ts";
 *
 * const graph = graphFromInfo({
 *   modules: [
 *     {
 *       specifier: "file:///repo/lib/a.ts",
 *       dependencies: [
 *         { code: { specifier: "file:///repo/lib/b.ts" } },
 *         { code: { specifier: "npm:zod@^4" } },
 *       ],
 *     },
 *     { specifier: "file:///repo/lib/b.ts" },
 *   ],
 * }, "/repo");
 * assert.deepEqual([...graph], [["lib/a.ts", ["lib/b.ts"]], ["lib/b.ts", []]]);
 * ```
 */
export function graphFromInfo(info: DenoInfo, root: string): ImportGraph {
  const local = (specifier: string | undefined): string | undefined => {
    if (!specifier?.startsWith("file:")) return undefined;
    const path = relative(root, fileURLToPath(specifier)).split("\\").join("/");
    return path.startsWith("..") ? undefined : path;
  };
  const graph = new Map<string, string[]>();
  for (const module of info.modules) {
    const from = local(module.specifier);
    if (from === undefined) continue;
    const to = new Set<string>();
    for (const dep of module.dependencies ?? []) {
      for (const target of [dep.code?.specifier, dep.type?.specifier]) {
        const path = local(target);
        if (path !== undefined) to.add(path);
      }
    }
    graph.set(from, [...to].sort());
  }
  return graph;
}

/**
 * The import graph of every `.ts` file in `entries` (files or folders, relative to `root`), read
 * with `deno info --json` run in `root` (so `root`'s deno.json resolves bare specifiers).
 * Throws when `deno info` fails (a file that does not parse, an import that does not resolve).
 */
export async function loadGraph(
  root: string,
  entries: readonly string[] = CHECKED,
): Promise<ImportGraph> {
  const files: string[] = [];
  for (const entry of entries) await collect(resolve(root, entry), files);
  if (files.length === 0) return new Map();
  const imports = files.sort().map((file) => `import ${JSON.stringify(pathToFileURL(file).href)};`);
  const rootModule = `data:application/typescript,${encodeURIComponent(imports.join("\n"))}`;
  const { code, stdout, stderr } = await new Deno.Command("deno", {
    args: ["info", "--json", rootModule],
    cwd: root,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  if (code !== 0) {
    throw new Error(`deno info failed (exit code ${code}): ${text.decode(stderr).trim()}`);
  }
  return graphFromInfo(JSON.parse(text.decode(stdout)) as DenoInfo, root);
}

async function collect(path: string, files: string[]): Promise<void> {
  const info = await Deno.stat(path).catch((error) => {
    throw new Error(`cannot read ${path} (is the list of checked folders up to date?): ${error}`);
  });
  if (info.isFile) {
    if (/\.(ts|tsx|mts)$/.test(path)) files.push(path);
    return;
  }
  for await (const entry of Deno.readDir(path)) {
    if (entry.name === "node_modules" || entry.name.startsWith(".")) continue;
    await collect(join(path, entry.name), files);
  }
}

/**
 * The import cycles of `graph`, each as its chain of files from one file back to itself. Every
 * import that lies on a cycle is in at least one chain (for each such import, the shortest way
 * back); a chain is reported once whichever file it starts at. A file that imports itself is a
 * chain of two.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { findCycles } from "./check_imports.ts";
 *
 * const graph = new Map([["a.ts", ["b.ts"]], ["b.ts", ["a.ts"]], ["c.ts", ["a.ts"]]]);
 * assert.deepEqual(findCycles(graph), [["a.ts", "b.ts", "a.ts"]]);
 * ```
 */
export function findCycles(graph: ImportGraph): string[][] {
  const component = stronglyConnected(graph);
  const cycles = new Map<string, string[]>();
  for (const [from, targets] of [...graph].sort(([a], [b]) => a < b ? -1 : a > b ? 1 : 0)) {
    for (const to of targets) {
      // An import lies on a cycle when both files are in the same strongly connected component.
      if (component.get(from) !== component.get(to)) continue;
      const back = shortestPath(graph, to, from);
      if (back === undefined) continue;
      const ring = [from, ...back.slice(0, -1)];
      const start = ring.indexOf([...ring].sort()[0]);
      const chain = [...ring.slice(start), ...ring.slice(0, start)];
      cycles.set(chain.join("\n"), [...chain, chain[0]]);
    }
  }
  return [...cycles.values()];
}

/** Tarjan's strongly connected components: each file's component number. */
function stronglyConnected(graph: ImportGraph): Map<string, number> {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const component = new Map<string, number>();
  let next = 0;
  let components = 0;
  const visit = (file: string): void => {
    index.set(file, next);
    low.set(file, next);
    next++;
    stack.push(file);
    onStack.add(file);
    for (const to of graph.get(file) ?? []) {
      if (!index.has(to)) {
        visit(to);
        low.set(file, Math.min(low.get(file)!, low.get(to)!));
      } else if (onStack.has(to)) {
        low.set(file, Math.min(low.get(file)!, index.get(to)!));
      }
    }
    if (low.get(file) === index.get(file)) {
      let member: string;
      do {
        member = stack.pop()!;
        onStack.delete(member);
        component.set(member, components);
      } while (member !== file);
      components++;
    }
  };
  for (const file of graph.keys()) if (!index.has(file)) visit(file);
  return component;
}

/** Breadth-first: the files on the shortest way from `from` to `to`, both included. */
function shortestPath(graph: ImportGraph, from: string, to: string): string[] | undefined {
  const cameFrom = new Map<string, string | null>([[from, null]]);
  const queue = [from];
  for (let i = 0; i < queue.length; i++) {
    const file = queue[i];
    if (file === to) {
      const path: string[] = [];
      for (let at: string | null = file; at !== null; at = cameFrom.get(at)!) path.unshift(at);
      return path;
    }
    for (const next of graph.get(file) ?? []) {
      if (!cameFrom.has(next)) {
        cameFrom.set(next, file);
        queue.push(next);
      }
    }
  }
  return undefined;
}

/**
 * The imports of `graph` that break one of `rules`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { findBrokenRules } from "./check_imports.ts";
 *
 * const graph = new Map([
 *   ["lib/streams.ts", ["lib/handlers/types.ts"]],
 *   ["lib/consumer.ts", ["lib/handlers/mod.ts"]],
 * ]);
 * const broken = findBrokenRules(graph);
 * assert.deepEqual(broken.map((b) => `${b.from} → ${b.to}`), ["lib/streams.ts → lib/handlers/types.ts"]);
 * ```
 */
export function findBrokenRules(
  graph: ImportGraph,
  rules: readonly LayerRule[] = RULES,
): BrokenRule[] {
  const under = (file: string, prefixes: readonly string[]) =>
    prefixes.some((prefix) => file === prefix || file.startsWith(prefix));
  const broken: BrokenRule[] = [];
  for (const [from, targets] of graph) {
    for (const rule of rules) {
      if (!under(from, rule.from) || under(from, rule.except ?? [])) continue;
      for (const to of targets) if (under(to, rule.to)) broken.push({ from, to, rule });
    }
  }
  return broken;
}

/**
 * Checks the repository at `root` and prints what is wrong; 0 when the imports are clean, 1
 * otherwise.
 */
export async function main(
  root: string = fileURLToPath(new URL("../", import.meta.url)),
  print: (line: string) => void = console.log,
): Promise<number> {
  const graph = await loadGraph(root);
  const cycles = findCycles(graph);
  const broken = findBrokenRules(graph);
  for (const cycle of cycles) print(`import cycle: ${cycle.join(" → ")}`);
  for (const { from, to, rule } of broken) print(`${from} imports ${to}: ${rule.why}`);
  if (cycles.length === 0 && broken.length === 0) {
    print(`imports: ${graph.size} files, no cycle, every layer rule kept`);
    return 0;
  }
  print(
    `imports: ${cycles.length} cycle(s) and ${broken.length} import(s) across a layer the wrong way`,
  );
  return 1;
}

if (import.meta.main) Deno.exit(await main());
