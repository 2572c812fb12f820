import assert from "node:assert/strict";
import {
  loadSettings,
  readDotenv,
  readEnvironment,
  redactSettings,
  SETTING_NAMES,
  SettingsError,
} from "../lib/config.ts";

/** Runs `fn` with `vars` set in the real environment, restoring what was there before. */
async function withEnv(vars: Record<string, string>, fn: () => void | Promise<void>) {
  const saved = new Map<string, string | undefined>();
  for (const [name, value] of Object.entries(vars)) {
    saved.set(name, Deno.env.get(name));
    Deno.env.set(name, value);
  }
  try {
    await fn();
  } finally {
    for (const [name, value] of saved) {
      if (value === undefined) Deno.env.delete(name);
      else Deno.env.set(name, value);
    }
  }
}

/** Runs `fn` in a fresh temporary directory holding `.env` with `dotenv`, then cleans up. */
async function inTempDir(dotenv: string | undefined, fn: () => void | Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-config-" });
  const cwd = Deno.cwd();
  try {
    if (dotenv !== undefined) await Deno.writeTextFile(`${dir}/.env`, dotenv);
    Deno.chdir(dir);
    await fn();
  } finally {
    Deno.chdir(cwd);
    await Deno.remove(dir, { recursive: true });
  }
}

/** The {@linkcode SettingsError} that `loadSettings(env)` throws. */
function settingsError(env: Record<string, string>): SettingsError {
  try {
    loadSettings(env);
  } catch (error) {
    assert.ok(error instanceof SettingsError, `expected SettingsError, got ${error}`);
    return error;
  }
  assert.fail("loadSettings accepted bad settings");
}

Deno.test("loadSettings gives every variable of the contract its default", () => {
  const settings = loadSettings({});
  const { workerConsumerName, ...rest } = settings;
  assert.deepEqual(rest, {
    llmBaseUrl: "http://localhost:8080/v1",
    llmVisionModel: "llava",
    llmTextModel: "mistral",
    llmApiKey: "not-needed",
    llmMaxRetries: 5,
    llmStructuredOutput: "auto",
    llmMaxInputChars: 12000,
    llmPromptsDir: undefined,
    llmPrompts: {},
    llmDefaultLanguage: "en",
    llmFallback: null,
    llmMaxInFlight: null,
    llmMaxRequestsPerMinute: null,
    redisUrl: "redis://redis:6379",
    coreApiUrl: "http://core:8000",
    imageStoragePath: "/data/images",
    workerConcurrency: 4,
    workerClaimIdleMs: 600000,
    workerLeaseMs: 30000,
    workerShutdownTimeoutMs: 30000,
    workerHttpPort: 9464,
    logLevel: "info",
    logFormat: "text",
  });
  // "host and pid": unique per replica.
  assert.equal(workerConsumerName, `${Deno.hostname()}-${Deno.pid}`);
});

Deno.test("SETTING_NAMES lists every variable of docs/protocol.md section 5", () => {
  assert.deepEqual([...SETTING_NAMES].sort(), [
    "CORE_API_URL",
    "IMAGE_STORAGE_PATH",
    "LLM_API_KEY",
    "LLM_BASE_URL",
    "LLM_DEFAULT_LANGUAGE",
    "LLM_FALLBACK_API_KEY",
    "LLM_FALLBACK_BASE_URL",
    "LLM_FALLBACK_TEXT_MODEL",
    "LLM_FALLBACK_VISION_MODEL",
    "LLM_MAX_INPUT_CHARS",
    "LLM_MAX_IN_FLIGHT",
    "LLM_MAX_REQUESTS_PER_MINUTE",
    "LLM_MAX_RETRIES",
    "LLM_PROMPTS_DIR",
    "LLM_STRUCTURED_OUTPUT",
    "LLM_TEXT_MODEL",
    "LLM_VISION_MODEL",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "REDIS_URL",
    "WORKER_CLAIM_IDLE_MS",
    "WORKER_CONCURRENCY",
    "WORKER_CONSUMER_NAME",
    "WORKER_HTTP_PORT",
    "WORKER_LEASE_MS",
    "WORKER_SHUTDOWN_TIMEOUT_MS",
  ]);
});

Deno.test("loadSettings reads every variable", () => {
  const settings = loadSettings({
    LLM_BASE_URL: "https://models.example/v1",
    LLM_VISION_MODEL: "qwen-vl",
    LLM_TEXT_MODEL: "llama3",
    LLM_API_KEY: "sk-secret",
    LLM_MAX_RETRIES: "3",
    LLM_STRUCTURED_OUTPUT: "off",
    LLM_MAX_INPUT_CHARS: "8000",
    LLM_MAX_IN_FLIGHT: "32",
    LLM_MAX_REQUESTS_PER_MINUTE: "500",
    LLM_FALLBACK_BASE_URL: "http://ollama:11434/v1",
    LLM_FALLBACK_API_KEY: "fallback-secret",
    LLM_FALLBACK_TEXT_MODEL: "qwen2.5:3b",
    REDIS_URL: "rediss://:pw@cache:6380/2",
    CORE_API_URL: "http://core.internal:9000/",
    IMAGE_STORAGE_PATH: "/srv/images",
    WORKER_CONCURRENCY: "8",
    WORKER_CONSUMER_NAME: "worker-a",
    WORKER_CLAIM_IDLE_MS: "120000",
    WORKER_LEASE_MS: "15000",
    WORKER_SHUTDOWN_TIMEOUT_MS: "5000",
    WORKER_HTTP_PORT: "0",
    LOG_LEVEL: "debug",
    LOG_FORMAT: "json",
  });
  assert.deepEqual(settings, {
    llmBaseUrl: "https://models.example/v1",
    llmVisionModel: "qwen-vl",
    llmTextModel: "llama3",
    llmApiKey: "sk-secret",
    llmMaxRetries: 3,
    llmStructuredOutput: "off",
    llmMaxInputChars: 8000,
    llmPromptsDir: undefined,
    llmPrompts: {},
    llmDefaultLanguage: "en",
    llmFallback: {
      baseUrl: "http://ollama:11434/v1",
      apiKey: "fallback-secret",
      textModel: "qwen2.5:3b",
      visionModel: "qwen-vl", // the primary's name when not set
    },
    llmMaxInFlight: 32,
    llmMaxRequestsPerMinute: 500,
    redisUrl: "rediss://:pw@cache:6380/2",
    coreApiUrl: "http://core.internal:9000",
    imageStoragePath: "/srv/images",
    workerConcurrency: 8,
    workerConsumerName: "worker-a",
    workerClaimIdleMs: 120000,
    workerLeaseMs: 15000,
    workerShutdownTimeoutMs: 5000,
    workerHttpPort: 0,
    logLevel: "debug",
    logFormat: "json",
  });
});

Deno.test("variable names are case-insensitive; the upper-case spelling wins a tie", () => {
  const settings = loadSettings({ llm_text_model: "phi3", Worker_Concurrency: "2" });
  assert.equal(settings.llmTextModel, "phi3");
  assert.equal(settings.workerConcurrency, 2);
  assert.equal(loadSettings({ llm_text_model: "a", LLM_TEXT_MODEL: "b" }).llmTextModel, "b");
  assert.equal(loadSettings({ LLM_TEXT_MODEL: "b", llm_text_model: "a" }).llmTextModel, "b");
});

Deno.test("enumerated values are case-insensitive too", () => {
  const settings = loadSettings({ LLM_STRUCTURED_OUTPUT: "ON", LOG_FORMAT: "JSON" });
  assert.equal(settings.llmStructuredOutput, "on");
  assert.equal(settings.logFormat, "json");
});

Deno.test("LOG_LEVEL warn (any case) means warning", () => {
  assert.equal(loadSettings({ LOG_LEVEL: "warn" }).logLevel, "warning");
  assert.equal(loadSettings({ LOG_LEVEL: "WARN" }).logLevel, "warning");
  assert.equal(loadSettings({ LOG_LEVEL: "warning" }).logLevel, "warning");
  assert.equal(loadSettings({ LOG_LEVEL: "error" }).logLevel, "error");
});

Deno.test("unknown variables are ignored", () => {
  assert.equal(loadSettings({ PATH: "/usr/bin", HOME: "/root" }).llmTextModel, "mistral");
});

Deno.test("readDotenv reads a file and answers {} when there is none", async () => {
  const dir = await Deno.makeTempDir({ prefix: "llm-worker-config-" });
  try {
    const path = `${dir}/.env`;
    await Deno.writeTextFile(
      path,
      '# the model\nLLM_TEXT_MODEL=phi3\nLLM_API_KEY="quoted secret"\n\nlog_level=debug\n',
    );
    assert.deepEqual(readDotenv(path), {
      LLM_TEXT_MODEL: "phi3",
      LLM_API_KEY: "quoted secret",
      log_level: "debug",
    });
    assert.deepEqual(readDotenv(`${dir}/missing.env`), {});
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadSettings() reads .env in the working directory", async () => {
  await inTempDir("LLM_VISION_MODEL=bakllava\nWORKER_CONCURRENCY=3\n", () => {
    const settings = loadSettings();
    assert.equal(settings.llmVisionModel, "bakllava");
    assert.equal(settings.workerConcurrency, 3);
  });
});

Deno.test("loadSettings() works with no .env at all", async () => {
  await inTempDir(undefined, () => {
    assert.equal(loadSettings().llmMaxRetries, Number(Deno.env.get("LLM_MAX_RETRIES") ?? 5));
  });
});

Deno.test("the real environment beats .env", async () => {
  await inTempDir("LLM_TEXT_MODEL=from-file\nLLM_VISION_MODEL=vision-from-file\n", async () => {
    await withEnv({ LLM_TEXT_MODEL: "from-env" }, () => {
      const env = readEnvironment();
      assert.equal(env.LLM_TEXT_MODEL, "from-env");
      assert.equal(env.LLM_VISION_MODEL, "vision-from-file");
      const settings = loadSettings();
      assert.equal(settings.llmTextModel, "from-env");
      assert.equal(settings.llmVisionModel, "vision-from-file");
    });
  });
});

Deno.test("the real environment beats .env whatever the spelling of either", async () => {
  await inTempDir("LLM_TEXT_MODEL=from-file\nllm_vision_model=vision-from-file\n", async () => {
    await withEnv({ llm_text_model: "from-env", LLM_VISION_MODEL: "vision-from-env" }, () => {
      const settings = loadSettings();
      assert.equal(settings.llmTextModel, "from-env");
      assert.equal(settings.llmVisionModel, "vision-from-env");
    });
  });
});

Deno.test("every bad variable is named at once in one SettingsError", () => {
  const error = settingsError({
    LLM_MAX_RETRIES: "abc",
    LLM_BASE_URL: "not a url",
    REDIS_URL: "http://redis:6379",
    CORE_API_URL: "core:8000",
    LLM_TEXT_MODEL: "fine",
  });
  const named = error.problems.map((p) => p.split("=")[0]).sort();
  assert.deepEqual(named, ["CORE_API_URL", "LLM_BASE_URL", "LLM_MAX_RETRIES", "REDIS_URL"]);
  for (const name of named) assert.ok(error.message.includes(name), `${name} in message`);
  assert.ok(!error.message.includes("LLM_TEXT_MODEL"));
  // Each problem says what the variable expects.
  assert.match(error.message, /LLM_MAX_RETRIES="abc" expects a whole number/);
  assert.match(
    error.message,
    /REDIS_URL="http:\/\/redis:6379" expects a URL starting with redis:\/\//,
  );
  assert.match(error.message, /rediss:\/\//);
  assert.match(error.message, /LLM_BASE_URL="not a url" expects a URL/);
});

Deno.test("LLM_MAX_RETRIES must be a positive whole number", () => {
  for (const bad of ["-1", "1.5", "five", "0"]) {
    const error = settingsError({ LLM_MAX_RETRIES: bad });
    assert.equal(error.problems.length, 1, bad);
    assert.match(error.problems[0], /^LLM_MAX_RETRIES=/, bad);
  }
  assert.equal(loadSettings({ LLM_MAX_RETRIES: " 7 " }).llmMaxRetries, 7);
});

Deno.test("LLM_MAX_IN_FLIGHT and LLM_MAX_REQUESTS_PER_MINUTE take positive whole numbers", () => {
  for (const name of ["LLM_MAX_IN_FLIGHT", "LLM_MAX_REQUESTS_PER_MINUTE"]) {
    for (const bad of ["0", "-4", "2.5", "many"]) {
      const error = settingsError({ [name]: bad });
      assert.equal(error.problems.length, 1, `${name}=${bad}`);
      assert.match(error.problems[0], new RegExp(`^${name}="${bad}" expects a whole number`));
    }
  }
  assert.match(settingsError({ LLM_MAX_IN_FLIGHT: "100001" }).message, /up to 100000/);
  const settings = loadSettings({ LLM_MAX_IN_FLIGHT: "16", LLM_MAX_REQUESTS_PER_MINUTE: "" });
  assert.equal(settings.llmMaxInFlight, 16);
  assert.equal(settings.llmMaxRequestsPerMinute, null); // empty: unset, no limit
});

Deno.test("REDIS_URL accepts redis:// and rediss:// only", () => {
  assert.equal(loadSettings({ REDIS_URL: "rediss://cache:6380" }).redisUrl, "rediss://cache:6380");
  for (const bad of ["tcp://redis:6379", "redis", "unix:///tmp/redis.sock"]) {
    assert.match(settingsError({ REDIS_URL: bad }).problems[0], /^REDIS_URL=/);
  }
});

Deno.test("other bad values are refused and named", () => {
  const error = settingsError({
    LLM_STRUCTURED_OUTPUT: "maybe",
    LOG_LEVEL: "verbose",
    LOG_FORMAT: "xml",
    WORKER_HTTP_PORT: "70000",
    WORKER_CONCURRENCY: "0",
  });
  assert.deepEqual(error.problems.map((p) => p.split("=")[0]).sort(), [
    "LLM_STRUCTURED_OUTPUT",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "WORKER_CONCURRENCY",
    "WORKER_HTTP_PORT",
  ]);
  assert.match(error.message, /LLM_STRUCTURED_OUTPUT="maybe" expects one of auto, on, off/);
});

Deno.test("an empty value takes the default, as compose's ${VAR:-} expects", () => {
  const settings = loadSettings({
    LLM_API_KEY: "   ",
    LLM_MAX_RETRIES: "",
    WORKER_CONCURRENCY: "",
  });
  assert.equal(settings.llmApiKey, "not-needed");
  assert.equal(settings.llmMaxRetries, 5);
  assert.equal(settings.workerConcurrency, 4);
});

Deno.test("redactSettings hides the API key and the Redis password", () => {
  const settings = loadSettings({
    LLM_API_KEY: "sk-very-secret",
    LLM_FALLBACK_BASE_URL: "https://fallback.example/v1",
    LLM_FALLBACK_API_KEY: "sk-fallback-secret",
    REDIS_URL: "redis://user:hunter2@cache:6379/0",
  });
  const shown = redactSettings(settings);
  const text = JSON.stringify(shown);
  assert.ok(!text.includes("sk-very-secret"));
  assert.ok(!text.includes("hunter2"));
  assert.ok(!text.includes("sk-fallback-secret"));
  assert.equal(shown.llmApiKey, "***");
  assert.equal(shown.redisUrl, "redis://user:***@cache:6379/0");
  assert.equal(shown.llmTextModel, settings.llmTextModel);
  // The original is left untouched.
  assert.equal(settings.llmApiKey, "sk-very-secret");
});

Deno.test("WORKER_LEASE_MS must be a whole number from 1000 to an hour", () => {
  for (const bad of ["999", "0", "-5", "1.5", "soon", "3600001"]) {
    const error = settingsError({ WORKER_LEASE_MS: bad });
    assert.equal(error.problems.length, 1, bad);
    assert.match(error.problems[0], /^WORKER_LEASE_MS=/, bad);
  }
  assert.equal(loadSettings({ WORKER_LEASE_MS: "1000" }).workerLeaseMs, 1000);
});
