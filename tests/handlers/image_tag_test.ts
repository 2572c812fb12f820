import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { join } from "node:path";
import { startCoreEmulator } from "../../testing/core_emulator.ts";
import { InvalidAnswerError, JobFailedError } from "../../lib/errors.ts";
import { CoreApiError } from "../../lib/core_api.ts";
import {
  createImageTagHandler,
  imageTagHandler,
  imageTagPayloadSchema,
  MAX_IMAGE_BYTES,
  normaliseTags,
} from "../../lib/handlers/image_tag.ts";
import type { JobContext, JobHandler } from "../../lib/handlers/types.ts";
import { type ChatRequest, promptOf, startModelServer } from "../helpers/model_server.ts";
import { makeContext, MemoryEffects } from "../helpers/context.ts";
import { fakePng } from "../helpers/images.ts";

const PNG = fakePng(64, 7);
const JPEG = new Uint8Array([0xff, 0xd8, 0xff, 0xe0, ...new Array(60).fill(3)]);

const ANSWER = JSON.stringify({
  description: "  A dog   running on a sandy beach at sunset. ",
  tags: ["beach", "dog", "sunset", "sea"],
});

/** A temp dir with `images/` (the storage folder) and `outside/` next to it. */
async function tempStorage() {
  const dir = await Deno.makeTempDir({ prefix: "image_tag_test_" });
  const storage = join(dir, "images");
  const outside = join(dir, "outside");
  await Deno.mkdir(storage);
  await Deno.mkdir(outside);
  return {
    dir,
    storage,
    outside,
    [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }),
  };
}

/** What the consumer does: check the payload, then run. */
async function runJob<P>(handler: JobHandler<P>, ctx: JobContext) {
  const payload = handler.payloadSchema.parse(ctx.job.payload);
  return await handler.run(ctx, payload);
}

function imageUrlOf(request: ChatRequest): string {
  const content = request.body.messages.at(-1)?.content as Array<
    { type: string; image_url?: { url: string } }
  >;
  return content.find((part) => part.type === "image_url")!.image_url!.url;
}

function tagPosts(core: ReturnType<typeof startCoreEmulator>) {
  return core.state.requests.filter((r) => r.method === "POST" && r.path.endsWith("/tags"));
}

Deno.test("image_tag: an extension-less PNG is sent as data:image/png and new tags are suggested", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWER);
  const memory = core.seedMemory({
    owner_user_id: 1,
    content: "Max at the beach",
    media_type: "image",
  });
  const path = join(fs.storage, crypto.randomUUID());
  await Deno.writeFile(path, PNG);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: path },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  const out = await runJob(imageTagHandler, ctx);

  assert.equal(model.requests.length, 1);
  const request = model.requests[0];
  assert.equal(request.body.model, "llava");
  assert.equal(imageUrlOf(request), `data:image/png;base64,${Buffer.from(PNG).toString("base64")}`);
  assert.equal(request.body.response_format?.type, "json_schema");
  assert.match(promptOf(request), /Max at the beach/);

  const tags = ["beach", "dog", "sunset", "sea"];
  const description = "A dog running on a sandy beach at sunset.";
  assert.deepEqual(out.result, { memory_id: memory.id, description, tags });
  assert.deepEqual(out.notifications, [{
    message_type: "llm_image_tag_result",
    content: { memory_id: memory.id, tags, description },
  }]);

  const posts = tagPosts(core);
  assert.equal(posts.length, 1);
  assert.equal(posts[0].path, `/memories/${memory.id}/tags`);
  assert.deepEqual(posts[0].body, { tags, status: "suggested" });
  assert.equal(posts[0].status, 200);
  assert.deepEqual(
    core.state.memories.get(memory.id)!.tags,
    tags.map((tag) => ({ tag, status: "suggested" })),
  );
});

Deno.test("image_tag: a relative path is read from the storage folder; JPEG bytes give image/jpeg", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWER);
  const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
  await Deno.writeFile(join(fs.storage, "photo.bin"), JPEG);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: "photo.bin" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  await runJob(imageTagHandler, ctx);
  assert.match(imageUrlOf(model.requests[0]), /^data:image\/jpeg;base64,/);
});

Deno.test("image_tag: tags the memory already has (other case, spaces) are not sent again", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    JSON.stringify({
      description: "A dog on a beach.",
      tags: [" Beach ", "SUNSET", "dog", "Dog ", "#dog", "", "  ", "golden retriever"],
    })
  );
  const memory = core.seedMemory({
    owner_user_id: 1,
    media_type: "image",
    tags: [{ tag: "beach", status: "confirmed" }, { tag: " Sunset ", status: "suggested" }],
  });
  await Deno.writeFile(join(fs.storage, "a"), PNG);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: join(fs.storage, "a") },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  const out = await runJob(imageTagHandler, ctx);

  const posts = tagPosts(core);
  assert.equal(posts.length, 1);
  assert.deepEqual(posts[0].body, { tags: ["dog", "golden retriever"], status: "suggested" });
  assert.deepEqual(out.result?.tags, ["dog", "golden retriever"]);
  // The confirmed tag stays confirmed.
  assert.deepEqual(core.state.memories.get(memory.id)!.tags[0], {
    tag: "beach",
    status: "confirmed",
  });
});

Deno.test("image_tag: no new tag means no POST, and the user still gets the description", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    JSON.stringify({ description: "A beach.", tags: ["Beach", "sea"] })
  );
  const memory = core.seedMemory({
    owner_user_id: 1,
    media_type: "image",
    tags: [{ tag: "beach", status: "confirmed" }, { tag: "SEA", status: "confirmed" }],
  });
  await Deno.writeFile(join(fs.storage, "a"), PNG);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: "a" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  const out = await runJob(imageTagHandler, ctx);

  assert.equal(tagPosts(core).length, 0);
  assert.deepEqual(out.result, { memory_id: memory.id, description: "A beach.", tags: [] });
  assert.deepEqual(out.notifications, [{
    message_type: "llm_image_tag_result",
    content: { memory_id: memory.id, tags: [], description: "A beach." },
  }]);
});

Deno.test("image_tag: running twice with the same effects store posts the tags once", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  let call = 0;
  await using model = startModelServer(() =>
    JSON.stringify({
      description: "A dog.",
      tags: call++ === 0 ? ["dog", "park", "ball"] : ["dog", "grass", "ball"],
    })
  );
  const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
  await Deno.writeFile(join(fs.storage, "a"), PNG);
  const effects = new MemoryEffects();
  const options = {
    jobType: "image_tag" as const,
    payload: { memory_id: memory.id, image_path: "a" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
    effects,
  };

  const first = await runJob(imageTagHandler, makeContext(options).ctx);
  const second = await runJob(imageTagHandler, makeContext(options).ctx);

  assert.equal(tagPosts(core).length, 1);
  assert.deepEqual(first.result?.tags, ["dog", "park", "ball"]);
  // The re-run reports what was really suggested the first time.
  assert.deepEqual(second.result?.tags, ["dog", "park", "ball"]);
  assert.deepEqual(second.notifications[0].content.tags, ["dog", "park", "ball"]);
});

Deno.test("image_tag: a memory that is gone (404) fails the job", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWER);
  await Deno.writeFile(join(fs.storage, "a"), PNG);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: "no-such-memory", image_path: "a" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  await assert.rejects(runJob(imageTagHandler, ctx), (error) => {
    assert.ok(error instanceof JobFailedError);
    assert.match(error.message, /no-such-memory no longer exists/);
    assert.ok(error.userMessage);
    return true;
  });
  assert.equal(model.requests.length, 0);
  assert.equal(tagPosts(core).length, 0);
});

Deno.test("image_tag: Core failing with 500 on the memory propagates as a CoreApiError", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator({
    fault: () => new Response("Internal Server Error", { status: 500 }),
  });
  await using model = startModelServer(() => ANSWER);
  await Deno.writeFile(join(fs.storage, "a"), PNG);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: "m1", image_path: "a" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  await assert.rejects(
    runJob(imageTagHandler, ctx),
    (error) => error instanceof CoreApiError && error.status === 500 && error.retryable,
  );
  assert.equal(model.requests.length, 0);
});

/** Runs a job for `imagePath` that must fail with `pattern`, with no model and no Core call. */
async function assertRefused(
  imagePath: string,
  storage: string,
  pattern: RegExp,
  handler: JobHandler<unknown> = imageTagHandler as JobHandler<unknown>,
  /** Runs while the handler reads the memory from Core: after the image check, before the model. */
  whileReadingMemory?: () => Promise<void>,
) {
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWER);
  const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: imagePath },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: storage },
  });
  if (whileReadingMemory) {
    const getMemory = ctx.core.getMemory.bind(ctx.core);
    ctx.core.getMemory = async (id, signal) => {
      await whileReadingMemory();
      return await getMemory(id, signal);
    };
  }
  await assert.rejects(runJob(handler, ctx), (error) => {
    assert.ok(error instanceof JobFailedError, `expected JobFailedError, got ${error}`);
    assert.match(error.message, pattern);
    assert.ok(error.userMessage && /\.$/.test(error.userMessage));
    return true;
  });
  assert.equal(model.requests.length, 0, "the model must not be asked");
  assert.equal(tagPosts(core).length, 0);
}

Deno.test("image_tag: paths leading out of the storage folder are refused", async (t) => {
  await using fs = await tempStorage();
  const secret = join(fs.outside, "secret.png");
  await Deno.writeFile(secret, PNG);

  await t.step(
    "../ to an existing image",
    () => assertRefused("../outside/secret.png", fs.storage, /outside the image folder/),
  );
  await t.step(
    "absolute path outside",
    () => assertRefused(secret, fs.storage, /outside the image folder/),
  );
  await t.step(
    "../ inside an absolute path",
    () => assertRefused(join(fs.storage, "..", "outside", "secret.png"), fs.storage, /outside/),
  );
  await t.step(
    "../ to a file that does not exist is still 'outside'",
    () => assertRefused("../outside/nothing.png", fs.storage, /outside the image folder/),
  );
  await t.step("a sibling folder sharing the prefix", async () => {
    const sibling = `${fs.storage}-evil`;
    await Deno.mkdir(sibling);
    await Deno.writeFile(join(sibling, "x"), PNG);
    await assertRefused(join(sibling, "x"), fs.storage, /outside the image folder/);
  });
  await t.step(
    "the storage folder itself",
    () => assertRefused(".", fs.storage, /outside the image folder/),
  );
  await t.step("a symlink inside pointing outside", async () => {
    await Deno.symlink(secret, join(fs.storage, "link"));
    await assertRefused("link", fs.storage, /outside the image folder/);
  });
  await t.step("a symlinked folder inside pointing outside", async () => {
    await Deno.symlink(fs.outside, join(fs.storage, "dirlink"));
    await assertRefused("dirlink/secret.png", fs.storage, /outside the image folder/);
  });
});

Deno.test("image_tag: a symlink that stays inside the folder, and a symlinked folder, are fine", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() => ANSWER);
  const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
  await Deno.writeFile(join(fs.storage, "real"), PNG);
  await Deno.symlink(join(fs.storage, "real"), join(fs.storage, "alias"));
  // The configured folder is itself a symlink to the real one (a common volume layout).
  const linkedStorage = join(fs.dir, "linked-images");
  await Deno.symlink(fs.storage, linkedStorage);

  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: join(linkedStorage, "alias") },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: linkedStorage },
  });
  await runJob(imageTagHandler, ctx);
  assert.equal(model.requests.length, 1);
});

Deno.test("image_tag: a missing file, a folder, and a file that is not an image are refused", async (t) => {
  await using fs = await tempStorage();
  await t.step(
    "missing file",
    () => assertRefused(crypto.randomUUID(), fs.storage, /does not exist/),
  );
  await t.step("a dangling symlink", async () => {
    await Deno.symlink(join(fs.storage, "gone"), join(fs.storage, "dangling"));
    await assertRefused("dangling", fs.storage, /does not exist/);
  });
  await t.step("a folder", async () => {
    await Deno.mkdir(join(fs.storage, "sub"));
    await assertRefused("sub", fs.storage, /not a regular file/);
  });
  await t.step("text", async () => {
    await Deno.writeTextFile(join(fs.storage, "notes.png"), "hello, not an image");
    await assertRefused("notes.png", fs.storage, /not a JPEG, PNG, WebP or GIF/);
  });
  await t.step("an empty file", async () => {
    await Deno.writeFile(join(fs.storage, "empty"), new Uint8Array());
    await assertRefused("empty", fs.storage, /not a JPEG, PNG, WebP or GIF/);
  });
  await t.step(
    "a storage folder that does not exist",
    () => assertRefused("a", join(fs.dir, "not-mounted"), /IMAGE_STORAGE_PATH/),
  );
});

Deno.test("image_tag: a file over the limit is refused before it is read", async (t) => {
  await using fs = await tempStorage();

  await t.step("default limit, sparse file of MAX_IMAGE_BYTES + 1", async () => {
    const path = join(fs.storage, "huge");
    await Deno.writeFile(path, PNG);
    await Deno.truncate(path, MAX_IMAGE_BYTES + 1);
    await assertRefused("huge", fs.storage, /over the limit of 20971520 bytes/);
  });

  const small = createImageTagHandler({ maxImageBytes: 1024 }) as JobHandler<unknown>;
  await t.step("injected limit", async () => {
    const bytes = new Uint8Array(1025);
    bytes.set(PNG);
    await Deno.writeFile(join(fs.storage, "big"), bytes);
    await assertRefused("big", fs.storage, /1025 bytes, over the limit of 1024/, small);
  });

  await t.step("exactly at the limit is accepted", async () => {
    const bytes = new Uint8Array(1024);
    bytes.set(PNG);
    await Deno.writeFile(join(fs.storage, "fits"), bytes);
    await using core = startCoreEmulator();
    await using model = startModelServer(() => ANSWER);
    const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
    const { ctx } = makeContext({
      jobType: "image_tag",
      payload: { memory_id: memory.id, image_path: "fits" },
      coreUrl: core.url,
      modelUrl: model.url,
      env: { IMAGE_STORAGE_PATH: fs.storage },
    });
    await runJob(small, ctx);
    assert.equal(model.requests.length, 1);
  });
});

Deno.test("image_tag: a file that grows past the limit or goes away after the check fails the job", async (t) => {
  await using fs = await tempStorage();
  const small = createImageTagHandler({ maxImageBytes: 200_000 }) as JobHandler<unknown>;
  const cases: Array<[string, (path: string) => Promise<void>, RegExp]> = [
    ["grows", (path) => Deno.writeFile(path, new Uint8Array(300_000)), /over the limit/],
    ["goes away", (path) => Deno.remove(path), /does not exist/],
  ];
  for (const [name, change, pattern] of cases) {
    await t.step(name, async () => {
      const path = join(fs.storage, `photo-${name.replace(" ", "-")}.png`);
      await Deno.writeFile(path, PNG);
      await assertRefused(path, fs.storage, pattern, small, () => change(path));
    });
  }
});

Deno.test("image_tag: an answer with no usable tag is an invalid answer and posts nothing", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() =>
    JSON.stringify({ description: "Something.", tags: ["", "   ", "x".repeat(41)] })
  );
  const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
  await Deno.writeFile(join(fs.storage, "a"), PNG);
  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: "a" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  await assert.rejects(runJob(imageTagHandler, ctx), InvalidAnswerError);
  assert.equal(tagPosts(core).length, 0);
});

Deno.test("image_tag: an answer that breaks the schema is an invalid answer", async () => {
  await using fs = await tempStorage();
  await using core = startCoreEmulator();
  await using model = startModelServer(() => '{"description": "A beach.", "labels": "beach"}');
  const memory = core.seedMemory({ owner_user_id: 1, media_type: "image" });
  await Deno.writeFile(join(fs.storage, "a"), PNG);
  const { ctx } = makeContext({
    jobType: "image_tag",
    payload: { memory_id: memory.id, image_path: "a" },
    coreUrl: core.url,
    modelUrl: model.url,
    env: { IMAGE_STORAGE_PATH: fs.storage },
  });
  await assert.rejects(runJob(imageTagHandler, ctx), InvalidAnswerError);
});

Deno.test("image_tag: normaliseTags trims, drops empties, long tags and duplicates, keeps 7", () => {
  assert.deepEqual(
    normaliseTags([
      "  Beach ",
      "beach",
      "#Sunset",
      '"sea"',
      "golden   retriever",
      "",
      "a".repeat(41),
      "a".repeat(40),
      "dog.",
      "DOG",
      "park",
      "ball",
      "tree",
    ]),
    ["Beach", "Sunset", "sea", "golden retriever", "a".repeat(40), "dog", "park"],
  );
  assert.throws(() => normaliseTags(["", " "]), InvalidAnswerError);
  assert.throws(() => normaliseTags([]), InvalidAnswerError);
});

Deno.test("image_tag: the payload needs memory_id and image_path", () => {
  assert.equal(imageTagPayloadSchema.safeParse({ memory_id: "m" }).success, false);
  assert.equal(imageTagPayloadSchema.safeParse({ image_path: "a" }).success, false);
  assert.equal(imageTagPayloadSchema.safeParse({ memory_id: "", image_path: "a" }).success, false);
  assert.equal(imageTagPayloadSchema.safeParse({ memory_id: "m", image_path: " " }).success, false);
  assert.equal(imageTagPayloadSchema.safeParse({ memory_id: "m", image_path: "a" }).success, true);
  assert.equal(imageTagHandler.jobType, "image_tag");
  assert.equal(imageTagHandler.requiresUser, false);
});
