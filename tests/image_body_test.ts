import assert from "node:assert/strict";
import { imageFileChunks, imageRequestBody, type ImageSource } from "../lib/image_body.ts";

const JSON_BODY = '{"messages":[{"content":[{"type":"image_url","image_url":' +
  '{"url":"data:image/png;base64,IMAGE1"}}]}],"model":"llava"}';
const INIT = { method: "POST", body: JSON_BODY };

/** Random bytes (crypto.getRandomValues fills at most 64 KiB at a time). */
function randomBytes(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let at = 0; at < length; at += 65_536) {
    crypto.getRandomValues(bytes.subarray(at, at + 65_536));
  }
  return bytes;
}

/** A source yielding `bytes` cut at the given sizes, recording whether it was closed. */
function sourceOf(bytes: Uint8Array, sizes: number[]): ImageSource & { closed: boolean } {
  const source = {
    mimeType: "image/png",
    closed: false,
    open: () =>
      Promise.resolve((async function* () {
        try {
          let at = 0;
          for (let i = 0; at < bytes.length; i++) {
            const size = sizes[i % sizes.length];
            yield bytes.subarray(at, at + size);
            at += size;
          }
        } finally {
          source.closed = true;
        }
      })()),
  };
  return source;
}

/**
 * Every chunk the body is sent in, decoded as text (one when it is plain bytes), each as it is
 * read, as the runtime's fetch takes them (a chunk is released once the next one is read).
 */
async function chunksOf(body: Uint8Array | ReadableStream<Uint8Array>): Promise<string[]> {
  const decoder = new TextDecoder();
  if (body instanceof Uint8Array) return [decoder.decode(body)];
  const texts: string[] = [];
  for await (const chunk of body) texts.push(decoder.decode(chunk));
  return texts;
}

Deno.test("the placeholder becomes the base64 of the bytes, whatever the chunk sizes", async () => {
  for (
    const [length, sizes] of [
      [0, [1]],
      [1, [1]],
      [2, [1]],
      [1000, [7, 13]],
      [49_152, [49_152]],
      [49_153, [49_151, 2]],
      [300_001, [65_536]],
      [300_001, [1, 100_000, 3]],
      [98_305, [2, 49_150, 5, 1]], // pieces end mid-chunk
      [49_154, [49_153, 1]], // a full piece, then a padded end
    ] as Array<[number, number[]]>
  ) {
    const bytes = randomBytes(length);
    const source = sourceOf(bytes, sizes);
    const body = await imageRequestBody(INIT, "IMAGE1", source);
    const text = (await chunksOf(body.body)).join("");
    assert.equal(
      text,
      JSON_BODY.replace("IMAGE1", bytes.toBase64()),
      `${length} bytes in chunks of ${sizes}`,
    );
    assert.ok(source.closed, "the source is read to its end");
    assert.equal(body.imageError, undefined);
  }
});

Deno.test("a small image is one plain body; a large one streams in 64 KiB pieces, the tail with the last", async () => {
  const small = await imageRequestBody(INIT, "IMAGE1", sourceOf(randomBytes(5_000), [4096]));
  assert.ok(small.body instanceof Uint8Array, "sent with a Content-Length, in one write");

  const large = await chunksOf(
    (await imageRequestBody(INIT, "IMAGE1", sourceOf(randomBytes(1_000_000), [65_536]))).body,
  );
  // 1,000,000 bytes = 20 full pieces of 49,152 bytes and 16,960 more: 21 chunks, the short last
  // piece going out with the full one before it and the JSON's tail.
  assert.equal(large.length, 20);
  assert.ok(large[0].startsWith(JSON_BODY.slice(0, JSON_BODY.indexOf("IMAGE1"))));
  assert.ok(large.at(-1)!.endsWith('"}}]}],"model":"llava"}'));
  for (const middle of large.slice(1, -1)) assert.equal(middle.length, 65_536);
});

Deno.test("a chunk is released once the next one is read, and every chunk by close()", async () => {
  const body = await imageRequestBody(INIT, "IMAGE1", sourceOf(randomBytes(500_000), [65_536]));
  assert.ok(body.body instanceof ReadableStream);
  const reader = body.body.getReader();
  const chunks: Uint8Array[] = [];
  for (let i = 0; i < 3; i++) {
    const { value } = await reader.read();
    chunks.push(value!);
  }
  await new Promise((resolve) => setTimeout(resolve, 0)); // the pull the third read started
  // The runtime's fetch writes a chunk as it reads it: all but the latest read are released.
  assert.deepEqual(chunks.map((chunk) => chunk.byteLength), [0, 0, 65_536]);
  reader.releaseLock();
  await body.close();
  assert.deepEqual(chunks.map((chunk) => chunk.byteLength), [0, 0, 0]);
});

Deno.test("base64 text already made is copied in as it is", async () => {
  const base64 = randomBytes(200_000).toBase64();
  const body = await imageRequestBody(INIT, "IMAGE1", base64);
  const text = (await chunksOf(body.body)).join("");
  assert.equal(text, JSON_BODY.replace("IMAGE1", base64));
});

Deno.test("an image that cannot be opened fails before anything is sent", async () => {
  const missing = new Error("no such file");
  const source: ImageSource = { mimeType: "image/png", open: () => Promise.reject(missing) };
  await assert.rejects(imageRequestBody(INIT, "IMAGE1", source), (error) => error === missing);
});

Deno.test("an image failing half way errors the stream and is kept as imageError", async () => {
  const broken = new Error("disk gone");
  const source: ImageSource = {
    mimeType: "image/png",
    open: () =>
      Promise.resolve((async function* () {
        for (let i = 0; i < 3; i++) yield new Uint8Array(49_152);
        throw broken;
      })()),
  };
  const body = await imageRequestBody(INIT, "IMAGE1", source);
  await assert.rejects(chunksOf(body.body), (error) => error === broken);
  assert.equal(body.imageError, broken);
});

Deno.test("close() before the end closes the image; cancelling the stream does too", async () => {
  const first = sourceOf(randomBytes(500_000), [49_152]);
  const body = await imageRequestBody(INIT, "IMAGE1", first);
  assert.ok(body.body instanceof ReadableStream);
  const reader = body.body.getReader();
  await reader.read();
  reader.releaseLock();
  assert.equal(first.closed, false);
  await body.close();
  assert.equal(first.closed, true);

  const second = sourceOf(randomBytes(500_000), [49_152]);
  const cancelled = await imageRequestBody(INIT, "IMAGE1", second);
  assert.ok(cancelled.body instanceof ReadableStream);
  await cancelled.body.cancel();
  assert.equal(second.closed, true);
});

Deno.test("a body without the placeholder is a bug, said as one", async () => {
  await assert.rejects(
    imageRequestBody({ body: "{}" }, "IMAGE1", "AAAA"),
    /lost its image placeholder/,
  );
  await assert.rejects(imageRequestBody(undefined, "IMAGE1", "AAAA"), /lost its image placeholder/);
});

Deno.test("imageFileChunks reads a small file whole and a large one in chunks, closing it", async () => {
  const path = await Deno.makeTempFile();
  try {
    for (const size of [1_000, 65_536, 300_000]) {
      const bytes = randomBytes(size);
      await Deno.writeFile(path, bytes);
      // A chunk is valid until the next is asked for (one buffer serves every read): copy it.
      const joined = new Uint8Array(size);
      let at = 0;
      let chunks = 0;
      for await (const chunk of await imageFileChunks(path, size)) {
        joined.set(chunk, at);
        at += chunk.length;
        chunks++;
      }
      assert.equal(chunks, size <= 65_536 ? 1 : Math.ceil(size / 49_152), `${size} bytes`);
      assert.equal(at, size);
      assert.deepEqual(joined, bytes);
    }
    // Stopping after the first chunk closes the file (the resource sanitizer checks).
    for await (const _ of await imageFileChunks(path, 300_000)) break;
  } finally {
    await Deno.remove(path);
  }
});
