/**
 * What the worker accepts from a model, apart from what it asks for.
 *
 * The worker asks with a strict answer schema (sent as `response_format` where the server takes
 * it). Models that are not held to it — small local models without a grammar, proxies that drop
 * `response_format`, the prompt-only fallback — answer close to it but not on it. Before an
 * answer is validated, {@linkcode acceptAnswer} walks the same zod schema beside the parsed JSON
 * and mends what can be mended without guessing:
 *
 * | repair | what the model wrote | what is used |
 * |---|---|---|
 * | `json_in_text` | JSON inside prose or a code fence (set by the caller, see `readJson`) | the JSON |
 * | `json_syntax` | trailing commas, comments, single quotes, bare keys (set by the caller) | JSON5's reading |
 * | `text_from_json` | a JSON object where plain text was asked ({@linkcode textFromJson}) | its text field |
 * | `missing_field` | a key left out | `null` where the schema takes null, else the value registered with {@linkcode whenMissing} |
 * | `null_text` | `"null"`, `"none"`, `"n/a"` or `""` where null is allowed | `null` |
 * | `key_spelling` | `"Intent"`, `"matched task id"` | the schema's key |
 * | `enum_spelling` | `"Reminder"`, `"General note"`, `"general-note"` | `"reminder"`, `"general_note"` |
 * | `number_from_text` | `"0.95"` | `0.95` |
 * | `text_from_number` | `42` where a string is asked | `"42"` |
 * | `list_from_text` | `"bicycle, red, street"` | `["bicycle", "red", "street"]` |
 * | `list_item_from_object` | `[{"tag": "bicycle"}]` | `["bicycle"]` |
 * | `root_array` | `[{…}, {…}]` for an object with one array field | `{"events": [{…}, {…}]}` |
 *
 * Invariants: nothing is invented — a field the schema needs and the answer lacks stays missing
 * (and validation refuses the answer), as do values out of range and enum values that match no
 * member after spelling is set aside. Extra fields are left for zod to drop. The input is never
 * changed; a mended copy is returned.
 *
 * @module
 */
import { z } from "zod";
import { readJson } from "./utils.ts";

/** The kinds of mending {@linkcode acceptAnswer} does (the `repair` label of the metric). */
export const REPAIRS = [
  "json_in_text",
  "json_syntax",
  "text_from_json",
  "missing_field",
  "null_text",
  "key_spelling",
  "enum_spelling",
  "number_from_text",
  "text_from_number",
  "list_from_text",
  "list_item_from_object",
  "root_array",
] as const;

/** One of {@linkcode REPAIRS}. */
export type Repair = (typeof REPAIRS)[number];

/** What {@linkcode acceptAnswer} returns: the mended value and what was mended, once each. */
export interface Accepted {
  /** The value to validate. */
  value: unknown;
  /** The repairs made, each kind once, in the order first made. */
  repairs: Repair[];
}

/** Values used for a field a model left out, by field schema (see {@linkcode whenMissing}). */
const missingValues = z.registry<{ whenMissing: unknown }>();

/**
 * Marks a field the job can do without: when an answer leaves it out, `value` is used. The
 * schema sent to the model is unchanged (the field is still asked for).
 *
 * @example
 * ```ts
 * import { z } from "zod";
 * import assert from "node:assert/strict";
 * const schema = z.object({ reason: whenMissing(z.string(), "") });
 * assert.deepEqual(acceptAnswer(schema, {}).value, { reason: "" });
 * ```
 */
export function whenMissing<T extends z.ZodType>(schema: T, value: z.input<T>): T {
  missingValues.add(schema, { whenMissing: value });
  return schema;
}

/**
 * Mends `value` towards `schema` (see the module doc for what is mended), without validating it.
 *
 * @example
 * ```ts
 * import { z } from "zod";
 * import assert from "node:assert/strict";
 * const schema = z.object({ intent: z.enum(["reminder", "general_note"]), note: z.string().nullable() });
 * const { value, repairs } = acceptAnswer(schema, { Intent: "General note" });
 * assert.deepEqual(value, { intent: "general_note", note: null });
 * assert.deepEqual(repairs, ["key_spelling", "enum_spelling", "missing_field"]);
 * ```
 */
export function acceptAnswer(schema: z.ZodType, value: unknown): Accepted {
  const repairs = new Set<Repair>();
  const mended = mend(schema, value, (repair) => repairs.add(repair));
  return { value: mended, repairs: [...repairs] };
}

type Note = (repair: Repair) => void;

// deno-lint-ignore no-explicit-any
type AnyDef = any;

const defOf = (schema: z.ZodType): AnyDef => schema.def;

const NULL_WORDS = new Set(["", "null", "none", "n/a", "nil", "undefined"]);
const NUMBER_TEXT = /^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?\s*$/i;
const ITEM_KEYS = ["tag", "name", "value", "label", "text", "keyword"];

/** A spelling key: lower case, letters and digits only (`General note` → `generalnote`). */
const spelling = (text: string) => text.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, "");

function mend(schema: z.ZodType, value: unknown, note: Note): unknown {
  const def = defOf(schema);
  switch (def.type) {
    case "nullable":
      if (value === null || value === undefined) return value;
      if (typeof value === "string" && NULL_WORDS.has(value.trim().toLowerCase())) {
        note("null_text");
        return null;
      }
      return mend(def.innerType, value, note);
    case "optional":
    case "default":
    case "readonly":
    case "catch":
      return value === undefined ? value : mend(def.innerType, value, note);
    case "pipe":
      // z.preprocess(fn, schema) and schema.transform(fn): mend towards the schema read first.
      return mend(def.in.def.type === "transform" ? def.out : def.in, value, note);
    case "object":
      return mendObject(def.shape, value, note);
    case "array":
      return mendArray(def.element, value, note);
    case "enum":
      return mendEnum(Object.values(def.entries), value, note);
    case "number":
      if (typeof value === "string" && NUMBER_TEXT.test(value)) {
        note("number_from_text");
        return Number(value);
      }
      return value;
    case "string":
      if (typeof value === "number" && Number.isFinite(value)) {
        note("text_from_number");
        return String(value);
      }
      return value;
    default:
      return value;
  }
}

function mendObject(shape: Record<string, z.ZodType>, value: unknown, note: Note): unknown {
  if (Array.isArray(value)) {
    const arrays = Object.keys(shape).filter((key) => isArraySchema(shape[key]));
    if (arrays.length !== 1) return value;
    note("root_array");
    value = { [arrays[0]]: value };
  }
  if (!value || typeof value !== "object") return value;
  const given = value as Record<string, unknown>;
  const out: Record<string, unknown> = { ...given };
  const bySpelling = new Map<string, string>();
  for (const key of Object.keys(given)) {
    if (!bySpelling.has(spelling(key))) bySpelling.set(spelling(key), key);
  }
  for (const [key, field] of Object.entries(shape)) {
    let fieldValue = given[key];
    if (!(key in given)) {
      const other = bySpelling.get(spelling(key));
      if (other !== undefined && !(other in shape)) {
        note("key_spelling");
        fieldValue = given[other];
        delete out[other];
      }
    }
    if (fieldValue === undefined) {
      const fill = missingValue(field);
      if (fill.found) {
        note("missing_field");
        out[key] = fill.value;
      }
      continue;
    }
    out[key] = mend(field, fieldValue, note);
  }
  return out;
}

function mendArray(element: z.ZodType, value: unknown, note: Note): unknown {
  const elementType = baseType(element);
  if (typeof value === "string" && elementType === "string") {
    note("list_from_text");
    return value.split(/[,;\n]/).map((item) => item.trim()).filter((item) => item !== "");
  }
  if (!Array.isArray(value)) return value;
  return value.map((item) => {
    if (elementType === "string" && item && typeof item === "object" && !Array.isArray(item)) {
      const record = item as Record<string, unknown>;
      const key = ITEM_KEYS.find((k) => typeof record[k] === "string");
      if (key !== undefined) {
        note("list_item_from_object");
        return record[key];
      }
    }
    return mend(element, item, note);
  });
}

function mendEnum(members: unknown[], value: unknown, note: Note): unknown {
  if (typeof value !== "string" || members.includes(value)) return value;
  const wanted = spelling(value);
  const match = members.find((member) => typeof member === "string" && spelling(member) === wanted);
  if (match === undefined) return value;
  note("enum_spelling");
  return match;
}

/** The value for a field the answer left out: registered, else null where null is allowed. */
function missingValue(field: z.ZodType): { found: boolean; value?: unknown } {
  const registered = missingValues.get(field);
  if (registered) return { found: true, value: registered.whenMissing };
  if (field.safeParse(null).success) return { found: true, value: null };
  return { found: false };
}

/** The type under wrappers (`nullable`, `optional`, pipes of a preprocess). */
function baseType(schema: z.ZodType): string {
  const def = defOf(schema);
  switch (def.type) {
    case "nullable":
    case "optional":
    case "default":
    case "readonly":
    case "catch":
      return baseType(def.innerType);
    case "pipe":
      return baseType(def.in.def.type === "transform" ? def.out : def.in);
    default:
      return def.type;
  }
}

function isArraySchema(schema: z.ZodType): boolean {
  return baseType(schema) === "array";
}

/**
 * The `text_from_json` repair: when `text` (a plain-text answer) is a JSON object, alone or in a
 * code fence, the text under the first of `keys` that holds some, or `null` when none does (the
 * answer is unusable). `undefined` when `text` is not a JSON object: it is the answer as it is.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(textFromJson('{"question": "When is it?"}', ["question"]), "When is it?");
 * assert.equal(textFromJson('{"answer": 42}', ["question"]), null);
 * assert.equal(textFromJson("When is it?", ["question"]), undefined);
 * ```
 */
export function textFromJson(text: string, keys: readonly string[]): string | null | undefined {
  if (!text.replace(/```[a-zA-Z0-9_-]*/g, "").trim().startsWith("{")) return undefined;
  let value: unknown;
  try {
    value = readJson(text).value;
  } catch {
    return undefined;
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) return undefined;
  const record = value as Record<string, unknown>;
  for (const key of keys) {
    const field = record[key];
    if (typeof field === "string" && field.trim()) return field.trim();
  }
  return null;
}
