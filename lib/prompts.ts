/**
 * Prompt templates: each job type's prompt is a template with a system part and a user part and
 * `{{placeholders}}` the handler fills in. The built-in templates live beside their handlers;
 * `LLM_PROMPTS_DIR` may hold one file per job type (`<job_type>.txt`) that replaces one.
 *
 * A prompt file:
 *
 * ```text
 * # Lines starting with "#" before the first section are comments.
 * === system ===
 * You read emails for Life Organiser…
 * === user ===
 * Current time: {{current_time}}
 * …
 * ```
 *
 * Invariants: a file is checked when the settings are loaded, so a bad one stops the start (exit
 * 2) instead of failing jobs: an unknown file name, a missing `=== user ===` section, an unknown
 * placeholder or a missing required one is refused, naming the file. Rendering is one pass, so a
 * value that contains `{{…}}` (a user's message) is never expanded. A line holding nothing but a
 * placeholder whose value is empty is left out, line break included.
 *
 * @module
 */
import { join } from "node:path";
import type { JobType } from "./job.ts";

/** A placeholder a job type's prompt may use. */
export interface Placeholder {
  /** A prompt without it cannot do the job (the model would miss part of the input). */
  required: boolean;
  /** What it is replaced with. */
  description: string;
}

/** The placeholders of each job type's prompt. */
export const PROMPT_PLACEHOLDERS: Readonly<Record<JobType, Readonly<Record<string, Placeholder>>>> =
  {
    image_tag: {
      caption: {
        required: false,
        description: "the owner's caption, introduced as a hint and fenced by <<< >>>; " +
          "empty when the photo has none",
      },
      language: {
        required: false,
        description: 'the name of the language the user reads ("French")',
      },
    },
    intent_classify: {
      reference_time: {
        required: true,
        description: "when the user wrote the message, in their timezone " +
          '("Tuesday 2026-06-30T00:30:00+01:00 (…)")',
      },
      timezone: { required: true, description: "the user's IANA timezone (Europe/London)" },
      message: {
        required: true,
        description: 'the message between """ quotes; after a follow-up question, the whole ' +
          "exchange (original message, question asked, the user's answer)",
      },
      language: {
        required: false,
        description: 'the name of the language the user reads ("French")',
      },
    },
    followup: {
      message: { required: true, description: "the user's message" },
      context: {
        required: false,
        description: "the payload's context, introduced and fenced by <<< >>>; empty when there " +
          "is none or no room",
      },
      language: {
        required: false,
        description: 'the name of the language the user reads ("French")',
      },
    },
    task_match: {
      memory: { required: true, description: "the user's new memory (its text)" },
      tasks: {
        required: true,
        description: 'the open tasks, one per line: "1. [id: abc] Buy milk (due …)"',
      },
    },
    email_extract: {
      current_time: {
        required: true,
        description: "the current time in the user's timezone",
      },
      timezone: { required: true, description: "the user's IANA timezone" },
      subject: { required: true, description: "the email's subject" },
      email: { required: true, description: "the email's text (HTML and quoted history removed)" },
      language: {
        required: false,
        description: 'the name of the language the user reads ("French")',
      },
    },
  };

/** A prompt template: what to send as the system message and as the user message. */
export interface PromptTemplate {
  /** The system part (may be empty: then no system message is sent). */
  system: string;
  /** The user part. */
  user: string;
}

/** A prompt as sent to the model. */
export interface RenderedPrompt {
  /** The system message, or `undefined` when the template has none. */
  system?: string;
  /** The user message. */
  prompt: string;
}

/** Thrown for prompt files that cannot be used; the message names every file and problem. */
export class PromptError extends Error {
  /** One line per problem, each naming its file. */
  readonly problems: readonly string[];

  /** Builds the error from one line per problem. */
  constructor(problems: string[]) {
    super(problems.join("\n"));
    this.name = "PromptError";
    this.problems = problems;
  }
}

const PLACEHOLDER = /\{\{\s*([A-Za-z0-9_]+)\s*\}\}/g;
const SECTION = /^===\s*(system|user)\s*===\s*$/;

/** The file name of a job type's prompt in `LLM_PROMPTS_DIR`. */
export function promptFileName(jobType: JobType): string {
  return `${jobType}.txt`;
}

/**
 * Reads a prompt file's text and checks it against the job type's placeholders.
 *
 * @throws {PromptError} naming `source` and every problem.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const template = parsePrompt(
 *   "followup",
 *   "=== system ===\nAsk one question.\n=== user ===\n{{message}}\n",
 * );
 * assert.deepEqual(template, { system: "Ask one question.", user: "{{message}}" });
 * ```
 */
export function parsePrompt(
  jobType: JobType,
  text: string,
  source: string = jobType,
): PromptTemplate {
  const problems: string[] = [];
  const parts: Partial<Record<"system" | "user", string[]>> = {};
  let current: string[] | undefined;
  for (const [index, line] of text.replace(/^\uFEFF/, "").split(/\r?\n/).entries()) {
    const section = line.match(SECTION)?.[1] as "system" | "user" | undefined;
    if (section) {
      if (parts[section]) problems.push(`${source}: "=== ${section} ===" appears twice.`);
      if (section === "system" && parts.user) {
        problems.push(`${source}: "=== system ===" must come before "=== user ===".`);
      }
      current = parts[section] = [];
    } else if (current) current.push(line);
    else if (line.trim() !== "" && !line.startsWith("#")) {
      problems.push(
        `${source}: line ${index + 1} is outside a section (start with "=== system ===" or ` +
          `"=== user ==="; lines before them must be comments starting with "#").`,
      );
      break;
    }
  }
  const template = {
    system: (parts.system ?? []).join("\n").trim(),
    user: (parts.user ?? []).join("\n").trim(),
  };
  if (!template.user) problems.push(`${source}: the "=== user ===" section is missing or empty.`);
  problems.push(...checkPlaceholders(jobType, template, source));
  if (problems.length > 0) throw new PromptError(problems);
  return template;
}

/** Problems with the placeholders of `template` for `jobType`, each naming `source`. */
function checkPlaceholders(jobType: JobType, template: PromptTemplate, source: string): string[] {
  const known = PROMPT_PLACEHOLDERS[jobType];
  const used = new Set(
    [...`${template.system}\n${template.user}`.matchAll(PLACEHOLDER)].map((m) => m[1]),
  );
  const problems: string[] = [];
  const unknown = [...used].filter((name) => !Object.hasOwn(known, name));
  if (unknown.length > 0) {
    problems.push(
      `${source}: unknown placeholder${unknown.length > 1 ? "s" : ""} ${
        unknown.map((n) => `{{${n}}}`).join(", ")
      } (${jobType} knows ${Object.keys(known).map((n) => `{{${n}}}`).join(", ")}).`,
    );
  }
  const missing = Object.entries(known).filter(([name, p]) => p.required && !used.has(name));
  for (const [name, placeholder] of missing) {
    problems.push(`${source}: {{${name}}} is missing (${placeholder.description}).`);
  }
  return problems;
}

/**
 * Reads the prompt files of `dir`: `<job_type>.txt` for the job types it replaces. Names that
 * start with `.` are skipped; any other name is refused.
 *
 * @throws {PromptError} naming every bad file, or the folder when it cannot be read.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const dir = Deno.makeTempDirSync();
 * Deno.writeTextFileSync(`${dir}/followup.txt`, "=== user ===\nOne question about: {{message}}");
 * assert.deepEqual(Object.keys(readPromptsDir(dir)), ["followup"]);
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export function readPromptsDir(dir: string): Partial<Record<JobType, PromptTemplate>> {
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(dir)].sort((a, b) => a.name.localeCompare(b.name));
  } catch (error) {
    throw new PromptError([
      `${dir}: cannot read the prompts folder (${error instanceof Error ? error.message : error}).`,
    ]);
  }
  const names = Object.keys(PROMPT_PLACEHOLDERS) as JobType[];
  const byFile = new Map(names.map((jobType) => [promptFileName(jobType), jobType]));
  const prompts: Partial<Record<JobType, PromptTemplate>> = {};
  const problems: string[] = [];
  for (const entry of entries) {
    if (entry.name.startsWith(".")) continue;
    const path = join(dir, entry.name);
    const jobType = byFile.get(entry.name);
    if (!jobType || !entry.isFile) {
      problems.push(
        `${path}: unknown prompt file (expected one of ${[...byFile.keys()].join(", ")}).`,
      );
      continue;
    }
    try {
      prompts[jobType] = parsePrompt(jobType, Deno.readTextFileSync(path), path);
    } catch (error) {
      if (error instanceof PromptError) problems.push(...error.problems);
      else problems.push(`${path}: cannot be read (${(error as Error).message}).`);
    }
  }
  if (problems.length > 0) throw new PromptError(problems);
  return prompts;
}

/**
 * Fills a template's placeholders with `values` in one pass (a value is never expanded again);
 * a line holding only a placeholder whose value is empty is left out.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const rendered = renderPrompt(
 *   { system: "", user: "Message: {{message}}\n{{context}}\nQuestion?" },
 *   { message: "see {{context}}", context: "" },
 * );
 * assert.deepEqual(rendered, { system: undefined, prompt: "Message: see {{context}}\nQuestion?" });
 * ```
 */
export function renderPrompt(
  template: PromptTemplate,
  values: Readonly<Record<string, string>>,
): RenderedPrompt {
  const fill = (text: string) =>
    text.split("\n").flatMap((line) => {
      const alone = line.trim().match(/^\{\{\s*([A-Za-z0-9_]+)\s*\}\}$/)?.[1];
      if (alone !== undefined && (values[alone] ?? "") === "") return [];
      return [line.replace(PLACEHOLDER, (whole, name) => values[name] ?? whole)];
    }).join("\n");
  const system = fill(template.system);
  return { system: system || undefined, prompt: fill(template.user) };
}

/**
 * A template as a prompt file, with a header naming its placeholders (what
 * `deno task prompts` writes).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const text = formatPromptFile("followup", { system: "Ask.", user: "{{message}}" });
 * assert.deepEqual(parsePrompt("followup", text), { system: "Ask.", user: "{{message}}" });
 * ```
 */
export function formatPromptFile(jobType: JobType, template: PromptTemplate): string {
  const header = [
    `# The ${jobType} prompt of the Life Organiser LLM worker. Put it in LLM_PROMPTS_DIR as`,
    `# ${promptFileName(jobType)} to replace the built-in one; the worker checks it at start.`,
    "# Placeholders:",
    ...Object.entries(PROMPT_PLACEHOLDERS[jobType]).map(([name, p]) =>
      `#   {{${name}}}${p.required ? " (required)" : ""}: ${p.description}`
    ),
  ];
  return [...header, "=== system ===", template.system, "=== user ===", template.user, ""].join(
    "\n",
  );
}
