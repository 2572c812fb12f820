/**
 * Writes `dev/samples/sunset.png`, the demo's photo: a small, valid PNG (a sun setting over the
 * sea) made from code, with a description and keywords in `tEXt` chunks, as cameras and photo
 * apps embed them. The scripted model reads those; a real vision model looks at the pixels.
 *
 * `deno run --allow-write=dev/samples dev/samples/make_image.ts` (the PNG is committed; run this
 * only to change it).
 *
 * @module
 */

const WIDTH = 96;
const HEIGHT = 64;

/** CRC-32 of PNG chunks. */
function crc32(bytes: Uint8Array): number {
  let crc = 0xffffffff;
  for (const byte of bytes) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = crc & 1 ? 0xedb88320 ^ (crc >>> 1) : crc >>> 1;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

function text(keyword: string, value: string): Uint8Array {
  return chunk("tEXt", new TextEncoder().encode(`${keyword}\0${value}`));
}

/** The pixel at (x, y): sky from orange to yellow, a sun, the sea with a glittering path. */
function pixel(x: number, y: number): [number, number, number] {
  const horizon = 40;
  const [sunX, sunY, sunR] = [48, 38, 11];
  const inSun = (x - sunX) ** 2 + (y - sunY) ** 2 <= sunR ** 2;
  if (y < horizon) {
    if (inSun) return [255, 236, 140];
    const t = y / horizon;
    return [255, Math.round(120 + 90 * t), Math.round(60 + 40 * t)];
  }
  const glitter = Math.abs(x - sunX) < 10 - (y - horizon) / 4 && (x + y) % 3 === 0;
  if (glitter) return [255, 200, 120];
  const t = (y - horizon) / (HEIGHT - horizon);
  return [Math.round(30 - 20 * t), Math.round(90 - 40 * t), Math.round(160 - 50 * t)];
}

async function deflate(bytes: Uint8Array<ArrayBuffer>): Promise<Uint8Array> {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** The PNG's bytes. */
export async function makeSunsetPng(): Promise<Uint8Array> {
  const raw = new Uint8Array(HEIGHT * (1 + WIDTH * 3));
  for (let y = 0; y < HEIGHT; y++) {
    const row = y * (1 + WIDTH * 3);
    raw[row] = 0; // filter: none
    for (let x = 0; x < WIDTH; x++) raw.set(pixel(x, y), row + 1 + x * 3);
  }
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, WIDTH);
  view.setUint32(4, HEIGHT);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB, no interlace
  const parts = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", header),
    text("Title", "Sunset over the sea"),
    text("Description", "The sun setting over a calm sea under an orange sky"),
    text("Keywords", "sunset, sea, beach, evening"),
    chunk("IDAT", await deflate(raw)),
    chunk("IEND", new Uint8Array()),
  ];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

if (import.meta.main) {
  const path = new URL("./sunset.png", import.meta.url);
  await Deno.writeFile(path, await makeSunsetPng());
  console.log(`Wrote ${path.pathname}`);
}
