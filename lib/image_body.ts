/**
 * The body of a vision request, streamed: the JSON the `openai` SDK made, with the image's
 * base64 written in place of a placeholder while the request is being sent.
 *
 * Why: built the usual way, a 1 MB photo becomes a 1.33 MB base64 string, a data URL, a 1.4 MB
 * JSON string, and then copies of it inside the runtime's `fetch`: about 8 MB of short-lived
 * memory per photo that V8 frees only in its late major collections, so a worker tagging photos
 * grew to hundreds of MB. Streamed, a request holds the JSON's two ends, one 48 KiB read buffer
 * and two or three 64 KiB pieces of base64 (the one being sent and the next). The request goes
 * out with `Transfer-Encoding: chunked`, which OpenAI, Ollama, llama.cpp's server and vLLM accept.
 *
 * The pieces are bytes from the start (each piece's base64 string is dropped as soon as it is
 * made, so it dies young instead of being copied by V8's scavenges while the request waits on
 * the network), and every buffer is released (detached) as soon as the runtime is done with it
 * rather than when V8 next collects: in the benchmark's photo traffic the buffers waiting for a
 * collection were 25 MB of the worker's peak.
 *
 * @module
 */

/** An image read only while its request is being sent. */
export interface ImageSource {
  /** The image's MIME type, e.g. `image/png`. */
  mimeType: string;
  /**
   * Opens the image's bytes. Called at most once per request, once the request is on its way;
   * what it throws, or its chunks throw, is what the request throws. A chunk is read before the
   * next is asked for, so a source may reuse one buffer for all of them.
   */
  open(): Promise<AsyncIterable<Uint8Array> | Iterable<Uint8Array>>;
}

/** A request body with its image, from {@linkcode imageRequestBody}. */
export interface ImageRequestBody {
  /**
   * The body to send: the whole body at once when it is one chunk (a small image, sent with a
   * `Content-Length`), else a stream (sent with `Transfer-Encoding: chunked`). A chunk of the
   * stream is valid until the next one is read (the runtime's `fetch` has written it by then);
   * another reader must copy it first.
   */
  readonly body: Uint8Array | ReadableStream<Uint8Array>;
  /** What the image threw while it was read, if it did (the request then failed). */
  readonly imageError: unknown;
  /**
   * Closes the image, if the request ended before reading all of it, and releases the body's
   * buffers. Call it once the request has ended.
   */
  close(): Promise<void>;
}

/** Bytes in an `ArrayBuffer` of their own, so they can be released (detached). */
type Bytes = Uint8Array<ArrayBuffer>;

/** Bytes of the image turned into base64 at a time: a multiple of 3, so the pieces join. */
const PIECE_BYTES = 3 * 16_384;
/** The base64 of a full piece: 64 KiB of text. */
const PIECE_TEXT = (PIECE_BYTES / 3) * 4;

/**
 * Streams `init.body` (the SDK's JSON, a string) with `placeholder` replaced by the base64 of
 * `image`: its bytes from an {@linkcode ImageSource}, or base64 already.
 *
 * Resolves once the first chunk (the JSON's head and the first 64 KiB of base64) is ready, so the
 * runtime sends it with the request's headers; a small image's whole body is that one chunk, and
 * is then sent as plain bytes with a `Content-Length`. Every chunk is sent
 * whole: had the headers gone out alone while the image was still being read, the next small
 * write would wait for the server's delayed ACK (Nagle's algorithm), about 40 ms per request.
 * The last full piece of base64 goes with the rest and the JSON's tail for the same reason.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const init = { method: "POST", body: '{"url":"data:image/png;base64,IMG"}' };
 * const body = await imageRequestBody(init, "IMG", "iVBORw0KGgo=");
 * assert.equal(
 *   new TextDecoder().decode(body.body as Uint8Array),
 *   '{"url":"data:image/png;base64,iVBORw0KGgo="}',
 * );
 * ```
 *
 * @throws {Error} when the body is not a string holding the placeholder; what the image's
 * `open()` or first chunk throws.
 */
export async function imageRequestBody(
  init: RequestInit | undefined,
  placeholder: string,
  image: ImageSource | string,
): Promise<ImageRequestBody> {
  const json = init?.body;
  const at = typeof json === "string" ? json.indexOf(placeholder) : -1;
  if (typeof json !== "string" || at < 0) {
    throw new Error("The image request's body lost its image placeholder; this is a bug.");
  }
  const encoder = new TextEncoder();
  const head = encoder.encode(json.slice(0, at));
  const tail = encoder.encode(json.slice(at + placeholder.length));
  let imageError: unknown;
  const pieces = typeof image === "string" ? stringPieces(image) : base64Pieces(image, (error) => {
    imageError = error;
  });
  // The next piece, read ahead so that the last chunk can carry the JSON's tail.
  let ahead: IteratorResult<Bytes, void> | undefined;
  const nextParts = async (): Promise<{ parts: Bytes[]; last: boolean }> => {
    const current = ahead ?? await pieces.next();
    ahead = current.done ? current : await pieces.next();
    const parts = current.done ? [] : [current.value];
    if (!ahead.done && ahead.value.length < PIECE_TEXT) { // the short last piece
      parts.push(ahead.value);
      ahead = await pieces.next();
    }
    return { parts, last: ahead.done === true };
  };
  let first: { parts: Bytes[]; last: boolean };
  try {
    first = await nextParts();
  } catch (error) {
    await pieces.return(undefined);
    throw error;
  }
  // The chunks handed to the runtime, oldest first, until they are released.
  const handed: Bytes[] = [];
  const hand = (parts: Bytes[]): Bytes => {
    const chunk = parts.length === 1 ? parts[0] : joined(parts);
    handed.push(chunk);
    return chunk;
  };
  const firstChunk = hand(first.last ? [head, ...first.parts, tail] : [head, ...first.parts]);
  const body = first.last ? firstChunk : new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(firstChunk);
    },
    async pull(controller) {
      // Asked for when a chunk is read. The runtime's fetch writes each chunk it reads to its
      // own side (which keeps a reference of its own until the bytes are on the wire) before it
      // reads the next: every chunk but the one just read is the runtime's alone, ours can go.
      while (handed.length > 1) release(handed.shift()!);
      const { parts, last } = await nextParts();
      controller.enqueue(hand(last ? [...parts, tail] : parts));
      if (last) controller.close();
    },
    async cancel() {
      await pieces.return(undefined);
    },
  });
  return {
    body,
    get imageError() {
      return imageError;
    },
    async close() {
      await pieces.return(undefined);
      for (const chunk of handed.splice(0)) release(chunk);
    },
  };
}

/**
 * Frees `bytes`' memory now instead of at V8's next collection of it (a runtime still sending
 * them holds a reference of its own, so the bytes stay valid there until written).
 */
function release(bytes: Bytes): void {
  bytes.buffer.transfer(0);
}

/** The parts in one new buffer; the parts themselves are released. */
function joined(parts: Bytes[]): Bytes {
  const all = new Uint8Array(parts.reduce((length, part) => length + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    all.set(part, offset);
    offset += part.length;
    release(part);
  }
  return all;
}

/**
 * The base64 of the source's bytes, as ASCII bytes, in pieces of at most 64 KiB. A chunk of the
 * source is used up before the next is asked for.
 */
async function* base64Pieces(
  source: ImageSource,
  onError: (error: unknown) => void,
): AsyncGenerator<Bytes, void, undefined> {
  const encoder = new TextEncoder();
  const pending = new Uint8Array(PIECE_BYTES);
  let filled = 0;
  try {
    for await (const chunk of await source.open()) {
      let offset = 0;
      while (offset < chunk.length) {
        if (filled === 0 && chunk.length - offset >= PIECE_BYTES) {
          yield encoder.encode(chunk.subarray(offset, offset + PIECE_BYTES).toBase64());
          offset += PIECE_BYTES;
          continue;
        }
        const take = Math.min(PIECE_BYTES - filled, chunk.length - offset);
        pending.set(chunk.subarray(offset, offset + take), filled);
        filled += take;
        offset += take;
        if (filled === PIECE_BYTES) {
          filled = 0;
          yield encoder.encode(pending.toBase64());
        }
      }
    }
  } catch (error) {
    onError(error);
    throw error;
  }
  if (filled > 0) yield encoder.encode(pending.subarray(0, filled).toBase64());
}

/** Base64 text already made, as ASCII bytes, in pieces of 64 KiB. */
function* stringPieces(base64: string): Generator<Bytes, void, undefined> {
  const encoder = new TextEncoder();
  for (let start = 0; start < base64.length; start += PIECE_TEXT) {
    yield encoder.encode(base64.slice(start, start + PIECE_TEXT));
  }
}

/** Files up to this size are read in one go: one runtime call instead of four. */
const READ_WHOLE_BYTES = 65_536;

/**
 * The bytes of the file at `path` as an image source's chunks: read whole when `expectedSize`
 * (what `stat` said) is at most 64 KiB, else in 48 KiB chunks, each read into the same buffer as
 * the request asks for it (a chunk is valid until the next is asked for), from a handle that is
 * closed once the file is read to its end, or as soon as the reader stops or fails. Every read is
 * synchronous: a few microseconds from the page cache, where an asynchronous one costs the
 * worker's thread 50 to 80 µs under load (a 1 MB photo is 22 reads).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const path = await Deno.makeTempFile();
 * await Deno.writeFile(path, new Uint8Array([0xff, 0xd8, 0xff, 0xe0]));
 * const { size } = await Deno.stat(path);
 * const source = { mimeType: "image/jpeg", open: () => imageFileChunks(path, size) };
 * const bytes = [...await source.open()].flatMap((chunk) => [...chunk]);
 * assert.deepEqual(bytes, [0xff, 0xd8, 0xff, 0xe0]);
 * await Deno.remove(path);
 * ```
 */
export function imageFileChunks(
  path: string,
  expectedSize: number,
): Promise<Iterable<Uint8Array>> {
  try {
    return Promise.resolve(
      expectedSize <= READ_WHOLE_BYTES
        ? [Deno.readFileSync(path)]
        : fileChunks(Deno.openSync(path)),
    );
  } catch (error) {
    return Promise.reject(error);
  }
}

/** The file's bytes, 48 KiB (one piece of base64) at a time, all read into one buffer. */
function* fileChunks(file: Deno.FsFile): Generator<Uint8Array, void, undefined> {
  const buffer = new Uint8Array(PIECE_BYTES);
  try {
    while (true) {
      const read = file.readSync(buffer);
      if (read === null) return;
      yield buffer.subarray(0, read);
    }
  } finally {
    file.close();
    release(buffer);
  }
}
