/**
 * `deno task prompts DIR [--force]`: writes the built-in prompt of every job type into `DIR`
 * (`<job_type>.txt`, the format `LLM_PROMPTS_DIR` reads), as a starting point for your own.
 *
 * Files that already exist are left alone (the others are written; exit 1) unless `--force`.
 * Exit codes: 0 written, 1 a file exists or cannot be written, 2 bad usage.
 *
 * @module
 */
import { join } from "node:path";
import { BUILT_IN_PROMPTS } from "../lib/handlers/mod.ts";
import type { JobType } from "../lib/job.ts";
import { formatPromptFile, promptFileName } from "../lib/prompts.ts";

const USAGE = `Usage: deno task prompts DIR [--force]
Writes the built-in prompts into DIR (one <job_type>.txt per job type); edit them, keep the ones
you change, and point LLM_PROMPTS_DIR at the folder. --force overwrites existing files.`;

/**
 * Runs the tool; resolves with the exit code.
 *
 * @example
 * ```ts ignore
 * await writePrompts(["./prompts"]); // 0
 * ```
 */
export async function writePrompts(
  args: string[],
  io: { out?: (line: string) => void; err?: (line: string) => void } = {},
): Promise<number> {
  const out = io.out ?? ((line: string) => console.log(line));
  const err = io.err ?? ((line: string) => console.error(line));
  if (args.includes("--help") || args.includes("-h")) {
    out(USAGE);
    return 0;
  }
  const force = args.includes("--force");
  const rest = args.filter((arg) => arg !== "--force");
  if (rest.length !== 1 || rest[0].startsWith("-")) {
    err(USAGE);
    return 2;
  }
  const dir = rest[0];
  try {
    await Deno.mkdir(dir, { recursive: true });
    const files = Object.entries(BUILT_IN_PROMPTS).map(([jobType, template]) => ({
      path: join(dir, promptFileName(jobType as JobType)),
      text: formatPromptFile(jobType as JobType, template),
    }));
    let written = 0;
    for (const { path, text } of files) {
      try {
        await Deno.writeTextFile(path, text, { createNew: !force });
        written++;
      } catch (error) {
        if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
        err(`${path} already exists: left as it is (--force overwrites it).`);
      }
    }
    out(`Wrote ${written} prompt file${written === 1 ? "" : "s"} into ${dir}.`);
    if (written < files.length) return 1;
    out(`Edit them, delete the ones you keep as they are, and set LLM_PROMPTS_DIR=${dir}.`);
    return 0;
  } catch (error) {
    err(`Cannot write into ${dir}: ${error instanceof Error ? error.message : error}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await writePrompts(Deno.args));
