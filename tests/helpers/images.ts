/**
 * Image bytes for tests.
 *
 * @module
 */

/** The eight bytes every PNG file starts with. */
export const PNG_SIGNATURE: readonly number[] = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/**
 * Bytes that read as a PNG by their signature, padded with `fill` to `size` bytes.
 *
 * @example
 * ```ts
 * await Deno.writeFile(path, fakePng(64));
 * ```
 */
export function fakePng(size = 64, fill = 7): Uint8Array {
  const bytes = new Uint8Array(size).fill(fill);
  bytes.set(PNG_SIGNATURE);
  return bytes;
}
