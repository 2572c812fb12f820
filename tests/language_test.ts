/**
 * The user's language: read from Core's settings once per job (and kept a minute per user),
 * named in the prompts of what the user reads, `LLM_DEFAULT_LANGUAGE` for jobs with no user.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { getLogger } from "@logtape/logtape";
import { loadSettings, SettingsError } from "../lib/config.ts";
import { CoreApiClient, SETTINGS_CACHE_MS } from "../lib/core_api.ts";
import { readLanguage, readUserContext } from "../lib/language.ts";
import { startCoreEmulator } from "../testing/core_emulator.ts";
import { fakePng } from "./helpers/images.ts";
import { type ChatRequest, promptOf } from "./helpers/model_server.ts";
import { startStack } from "./helpers/stack.ts";

const log = getLogger(["llm-worker", "test"]);

Deno.test("readLanguage reads ISO 639-1 codes and BCP 47 tags, and nothing else", () => {
  assert.deepEqual(readLanguage("fr"), { code: "fr", name: "French" });
  assert.deepEqual(readLanguage(" DE "), { code: "de", name: "German" });
  assert.deepEqual(readLanguage("pt_BR"), { code: "pt-br", name: "Brazilian Portuguese" });
  for (const bad of ["", "x", "xx", "french", "e n", "12", null, 3]) {
    assert.equal(readLanguage(bad), undefined, String(bad));
  }
});

Deno.test("LLM_DEFAULT_LANGUAGE defaults to en and refuses what is no language", () => {
  assert.equal(loadSettings({}).llmDefaultLanguage, "en");
  assert.equal(loadSettings({ LLM_DEFAULT_LANGUAGE: "ES" }).llmDefaultLanguage, "es");
  assert.throws(
    () => loadSettings({ LLM_DEFAULT_LANGUAGE: "klingon" }),
    (error: unknown) =>
      error instanceof SettingsError &&
      /LLM_DEFAULT_LANGUAGE="klingon" expects an ISO 639-1 language code/.test(error.message),
  );
});

Deno.test("readUserContext: no user, no call; a missing or unknown language takes the default", async () => {
  const answers: Record<string, unknown>[] = [];
  const core = {
    getSettings: (userId: number) => {
      answers.push({ userId });
      return Promise.resolve(
        [
          { timezone: "Europe/Paris", language: "fr" },
          { timezone: "Asia/Tokyo" },
          { timezone: "Nowhere/Else", language: "zz-top-secret!" },
        ][answers.length - 1],
      );
    },
  };
  assert.deepEqual(await readUserContext(core, null, "de", log), {
    timeZone: "UTC",
    language: { code: "de", name: "German" },
  });
  assert.equal(answers.length, 0);
  assert.deepEqual((await readUserContext(core, 1, "de", log)).language.name, "French");
  assert.deepEqual((await readUserContext(core, 2, "de", log)).language.name, "German");
  assert.deepEqual(await readUserContext(core, 3, "it", log), {
    timeZone: "UTC",
    language: { code: "it", name: "Italian" },
  });
});

Deno.test("the Core client keeps a user's settings for a minute, per user", async () => {
  await using core = startCoreEmulator();
  let now = 1_000_000;
  const client = new CoreApiClient({ baseUrl: core.url, now: () => now });
  const settingsCalls = () => core.state.requests.filter((r) => r.path.startsWith("/settings/"));
  assert.equal((await client.getSettings(1)).language, "en");
  core.state.settings.set(1, { user_id: 1, timezone: "Europe/Paris", language: "fr" });
  now += SETTINGS_CACHE_MS - 1;
  assert.equal((await client.getSettings(1)).language, "en", "still the kept answer");
  await client.getSettings(2);
  assert.deepEqual(settingsCalls().map((r) => r.path), ["/settings/1", "/settings/2"]);
  now += 1;
  assert.equal((await client.getSettings(1)).language, "fr", "a minute later, asked again");
  assert.equal(settingsCalls().length, 3);

  const uncached = new CoreApiClient({ baseUrl: core.url, settingsCacheMs: 0 });
  await uncached.getSettings(1);
  await uncached.getSettings(1);
  assert.equal(settingsCalls().length, 5);
});

Deno.test("what the user reads is asked for in their language; jobs with no user take the default", async () => {
  await using stack = await startStack({ env: { LLM_DEFAULT_LANGUAGE: "de" } });
  stack.core.state.users.add(2);
  stack.core.state.settings.set(2, { user_id: 2, timezone: "Europe/Paris", language: "fr" });
  const photo = stack.core.seedMemory({ owner_user_id: 2, content: "", media_type: "image" });
  const path = join(stack.imageDir, crypto.randomUUID());
  await Deno.writeFile(path, fakePng(48, 1));
  stack.core.seedTask({ id: "t-1", owner_user_id: 2, description: "Acheter du lait" });
  await stack.startWorker();
  const jobs = [
    await stack.enqueue("image_tag", { memory_id: photo.id, image_path: path }, 2),
    await stack.enqueue("followup", { message: "le truc" }, 2),
    await stack.enqueue("intent_classify", { message: "note: le code est 1234" }, 2),
    await stack.enqueue("email_extract", { subject: "RDV", body: "Dentiste le 3 mars à 15h" }, 2),
    await stack.enqueue("intent_classify", { message: "et aussi ça" }, 2),
    await stack.enqueue("followup", { message: "no owner" }, null),
  ];
  await stack.waitForJobs(jobs);
  for (const id of jobs) assert.equal(stack.core.state.jobs.get(id)!.status, "completed", id);

  const requests = stack.model.requests;
  const schema = (r: ChatRequest) => r.body.response_format?.json_schema?.name;
  const system = (r: ChatRequest) => String(r.body.messages[0].content);
  const [image] = requests.filter((r) => schema(r) === "image_tags");
  assert.match(promptOf(image), /Write the description and the tags in French\./);
  const followups = requests.filter((r) => !r.body.response_format);
  const followupFr = followups.find((r) => promptOf(r).includes("le truc"))!;
  const followupNone = followups.find((r) => promptOf(r).includes("no owner"))!;
  assert.match(system(followupFr), /Write in French, friendly and brief/);
  assert.match(system(followupNone), /Write in German, friendly and brief/, "no user: default");
  const [intent] = requests.filter((r) => schema(r) === "intent_result");
  assert.match(
    promptOf(intent),
    /write followup_question and suggested_tags in French, keywords in the language of the user's own notes/,
  );
  assert.match(promptOf(intent), /User's timezone: Europe\/Paris/);
  assert.match(system(intent), /"intent": "reminder" \| "task"/, "intent names stay as they are");
  const [email] = requests.filter((r) => schema(r) === "email_events");
  assert.match(promptOf(email), /Write each description in French\./);

  // Read once per job at most, and kept a minute: one settings call for user 2's five jobs.
  const settingsCalls = stack.core.state.requests.filter((r) => r.path.startsWith("/settings/"));
  assert.deepEqual(settingsCalls.map((r) => r.path), ["/settings/2"]);
});
