/**
 * Time zones without a date library: IANA zone names checked and read through `Intl`, wall-clock
 * times in a zone turned into instants (across daylight-saving changes), instants written as
 * ISO-8601 with an explicit offset, and the strict reading of the date-times a model answers.
 *
 * Used by `intent_classify` (reminder and task times) and `email_extract` (event times).
 *
 * @module
 */

/** A wall-clock date and time, as read on a clock in some zone (month 1-12). */
export interface WallClock {
  year: number;
  month: number;
  day: number;
  hour: number;
  minute: number;
  second: number;
  millisecond: number;
}

/**
 * The hour a date without a time is read at (09:00 in the user's timezone): a daytime hour that
 * keeps the day right in every zone, where midnight would put a reminder in the middle of the
 * night.
 */
export const DATE_ONLY_HOUR = 9;

const MINUTE_MS = 60_000;
const DAY_MS = 86_400_000;

const formatters = new Map<string, Intl.DateTimeFormat>();

function formatterFor(timeZone: string): Intl.DateTimeFormat {
  let formatter = formatters.get(timeZone);
  if (!formatter) {
    formatter = new Intl.DateTimeFormat("en-US", {
      timeZone,
      hourCycle: "h23",
      era: "short",
      year: "numeric",
      month: "numeric",
      day: "numeric",
      hour: "numeric",
      minute: "numeric",
      second: "numeric",
      weekday: "long",
    });
    formatters.set(timeZone, formatter);
  }
  return formatter;
}

/**
 * True when `name` is an IANA time zone this runtime knows (`Europe/London`, `UTC`, ...).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(isValidTimeZone("Europe/Berlin"), true);
 * assert.equal(isValidTimeZone("Mars/Olympus"), false);
 * ```
 */
export function isValidTimeZone(name: unknown): name is string {
  if (typeof name !== "string" || !name.trim()) return false;
  try {
    formatterFor(name);
    return true;
  } catch {
    return false;
  }
}

/** The zone `name`, or `UTC` when it is missing or unknown. */
export function timeZoneOrUtc(name: unknown): string {
  return isValidTimeZone(name) ? name : "UTC";
}

/**
 * From this instant on (1973-01-01T00:00:00Z), every zone's offset is a whole number of minutes
 * and changes only at a whole minute (the last offset with seconds, Monrovia's -00:44:30, ended
 * in January 1972): the offset found for any instant of a minute holds for the whole minute.
 */
const WHOLE_MINUTE_OFFSETS_FROM_MS = Date.UTC(1973, 0, 1);
const WEEKDAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
/** Offsets already asked of `Intl`, by zone and minute since the epoch. */
const minuteOffsets = new Map<string, number>();
const MINUTE_OFFSETS_KEPT = 4_096;

/**
 * The wall clock and weekday shown in `timeZone` at `instant`.
 *
 * `Intl` is asked once per zone and minute (about 25 µs a time, the largest cost of a prompt's
 * "current time"); other instants of that minute are worked out from its offset.
 */
export function wallClockAt(
  instant: Date,
  timeZone: string,
): WallClock & { weekday: string } {
  const ms = instant.getTime();
  if (!(ms >= WHOLE_MINUTE_OFFSETS_FROM_MS)) return intlWallClockAt(instant, timeZone);
  const minute = Math.floor(ms / MINUTE_MS);
  const key = `${minute} ${timeZone}`;
  let offset = minuteOffsets.get(key);
  if (offset === undefined) {
    const wall = intlWallClockAt(instant, timeZone);
    offset = wallAsUtcMs(wall) - ms;
    if (minuteOffsets.size >= MINUTE_OFFSETS_KEPT) minuteOffsets.clear();
    minuteOffsets.set(key, offset);
    return wall;
  }
  const shown = new Date(ms + offset);
  return {
    year: shown.getUTCFullYear(),
    month: shown.getUTCMonth() + 1,
    day: shown.getUTCDate(),
    hour: shown.getUTCHours(),
    minute: shown.getUTCMinutes(),
    second: shown.getUTCSeconds(),
    millisecond: shown.getUTCMilliseconds(),
    weekday: WEEKDAYS[shown.getUTCDay()],
  };
}

/** {@linkcode wallClockAt}, read from `Intl` itself. */
function intlWallClockAt(
  instant: Date,
  timeZone: string,
): WallClock & { weekday: string } {
  const parts: Record<string, string> = {};
  for (const part of formatterFor(timeZone).formatToParts(instant)) parts[part.type] = part.value;
  const year = Number(parts.year);
  return {
    // `era` tells 1 BC from AD 1; such dates never matter here but must not come out wrong.
    year: parts.era === "BC" || parts.era === "B" ? 1 - year : year,
    month: Number(parts.month),
    day: Number(parts.day),
    hour: Number(parts.hour) % 24,
    minute: Number(parts.minute),
    second: Number(parts.second),
    millisecond: instant.getUTCMilliseconds(),
    weekday: parts.weekday,
  };
}

/** The wall clock read as if it were UTC, in epoch milliseconds (years 0-99 included). */
function wallAsUtcMs(wall: WallClock): number {
  const date = new Date(0);
  date.setUTCFullYear(wall.year, wall.month - 1, wall.day);
  date.setUTCHours(wall.hour, wall.minute, wall.second, wall.millisecond);
  return date.getTime();
}

/**
 * The offset of `timeZone` from UTC at `instant`, in milliseconds (`+01:00` is 3 600 000).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(offsetMs(new Date("2026-07-01T12:00:00Z"), "Europe/London"), 3_600_000);
 * ```
 */
export function offsetMs(instant: Date, timeZone: string): number {
  const wall = wallClockAt(instant, timeZone);
  return wallAsUtcMs({ ...wall, millisecond: 0 }) -
    (instant.getTime() - instant.getUTCMilliseconds());
}

/**
 * The instant at which clocks in `timeZone` show `wall`.
 *
 * Daylight-saving changes are handled as `Temporal`'s `"compatible"` disambiguation does: a time
 * that happens twice (clocks going back) is the earlier of the two; a time that never happens
 * (clocks going forward) is moved forward by the length of the gap, so 01:30 on the morning
 * London springs forward is 02:30 BST.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const wall = { year: 2026, month: 12, day: 1, hour: 15, minute: 0, second: 0, millisecond: 0 };
 * const instant = wallClockToInstant(wall, "Europe/Berlin");
 * assert.equal(instant.toISOString(), "2026-12-01T14:00:00.000Z");
 * ```
 */
export function wallClockToInstant(wall: WallClock, timeZone: string): Date {
  const local = wallAsUtcMs(wall);
  // The offsets a day either side cover any single transition near this wall time.
  const before = offsetMs(new Date(local - DAY_MS), timeZone);
  const after = offsetMs(new Date(local + DAY_MS), timeZone);
  const fits = [before, after]
    .map((offset) => local - offset)
    .filter((candidate) => offsetMs(new Date(candidate), timeZone) === local - candidate)
    .sort((a, b) => a - b);
  if (fits.length > 0) return new Date(fits[0]);
  // A gap: read the wall time with the offset in force before the change.
  return new Date(local - before);
}

/** `+01:00`, `-05:30`, `+00:00` for an offset in milliseconds. */
export function formatOffset(offset: number): string {
  const minutes = Math.round(offset / MINUTE_MS);
  const sign = minutes < 0 ? "-" : "+";
  const abs = Math.abs(minutes);
  return `${sign}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`;
}

function pad(value: number, width = 2): string {
  return String(value).padStart(width, "0");
}

function formatYear(year: number): string {
  return year >= 0 && year <= 9999
    ? pad(year, 4)
    : `${year < 0 ? "-" : "+"}${pad(Math.abs(year), 6)}`;
}

/**
 * `instant` as ISO-8601 in `timeZone`'s local time with its offset, to the second:
 * `2026-12-01T15:00:00+01:00`. (A historic offset with seconds, which ISO-8601 offsets cannot
 * carry, is written in UTC with `Z` instead, so the instant is always exact.)
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(
 *   formatInTimeZone(new Date("2026-12-01T14:00:00Z"), "Europe/Berlin"),
 *   "2026-12-01T15:00:00+01:00",
 * );
 * ```
 */
export function formatInTimeZone(instant: Date, timeZone: string): string {
  return formatWall(instant, timeZone).iso;
}

/** The ISO form of `instant` in `timeZone`, with the wall clock and offset it was made from. */
function formatWall(
  instant: Date,
  timeZone: string,
): { iso: string; wall: WallClock & { weekday: string }; offset: number } {
  const seconds = new Date(Math.floor(instant.getTime() / 1000) * 1000);
  const wall = wallClockAt(seconds, timeZone);
  const offset = wallAsUtcMs({ ...wall, millisecond: 0 }) - seconds.getTime();
  const iso = offset % MINUTE_MS !== 0
    ? `${seconds.toISOString().slice(0, 19)}Z`
    : `${formatYear(wall.year)}-${pad(wall.month)}-${pad(wall.day)}T${pad(wall.hour)}:${
      pad(wall.minute)
    }:${pad(wall.second)}${formatOffset(offset)}`;
  return { iso, wall, offset };
}

/**
 * `instant` for a prompt: weekday, ISO date-time with offset, and the zone, e.g.
 * `Tuesday 2026-12-01T15:00:00+01:00 (Europe/Berlin, UTC+01:00)`.
 */
export function describeInTimeZone(instant: Date, timeZone: string): string {
  const { iso, wall, offset } = formatWall(instant, timeZone);
  return `${wall.weekday} ${iso} (${timeZone}, UTC${formatOffset(offset)})`;
}

/** A date-time read by {@linkcode parseDateTime}: a wall clock, with its offset when it had one. */
export interface ParsedDateTime {
  /** The clock as written. */
  wall: WallClock;
  /** The written offset in milliseconds (`Z` is 0), or `null` when none was written. */
  offsetMs: number | null;
  /** True when only a date was written (the time is then {@linkcode DATE_ONLY_HOUR}:00). */
  dateOnly: boolean;
}

const DATE_TIME =
  /^([+-]\d{6}|\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?\s*(Z|[+-]\d{2}(?::?\d{2})?)?$/i;

/**
 * Reads an ISO-8601 date or date-time strictly, as models are asked to write them:
 * `YYYY-MM-DD`, optionally `T` (or a space) and `HH:MM[:SS[.fff]]`, optionally `Z` or an offset
 * (`+01:00`, `+0100`, `+01`). Anything else is `null`: strings of digits (`20990301`, which Core
 * would take for Unix seconds), `02/04/2026`, `April 2, 3 PM`, out-of-range fields (`2026-02-30`,
 * `25:00`), an offset on a bare date.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * // No offset: read it in the user's timezone.
 * assert.equal(parseDateTime("2026-12-01T15:00:00")?.offsetMs, null);
 * assert.equal(parseDateTime("20990301"), null); // Core would read digits as Unix seconds
 * ```
 */
export function parseDateTime(text: string): ParsedDateTime | null {
  const match = DATE_TIME.exec(text.trim());
  if (!match) return null;
  const [, y, mo, d, h, mi, s, frac, zone] = match;
  const dateOnly = h === undefined;
  if (dateOnly && zone !== undefined) return null;
  const wall: WallClock = {
    year: Number(y),
    month: Number(mo),
    day: Number(d),
    hour: dateOnly ? DATE_ONLY_HOUR : Number(h),
    minute: dateOnly ? 0 : Number(mi),
    second: s === undefined ? 0 : Number(s),
    millisecond: frac === undefined ? 0 : Math.floor(Number(`0.${frac}`) * 1000),
  };
  if (
    wall.month < 1 || wall.month > 12 || wall.day < 1 ||
    wall.day > daysInMonth(wall.year, wall.month) || wall.hour > 23 || wall.minute > 59 ||
    wall.second > 59
  ) {
    return null;
  }
  let offset: number | null = null;
  if (zone !== undefined) {
    if (zone.toUpperCase() === "Z") offset = 0;
    else {
      const digits = zone.slice(1).replace(":", "");
      const hours = Number(digits.slice(0, 2));
      const minutes = digits.length > 2 ? Number(digits.slice(2)) : 0;
      if (hours > 23 || minutes > 59) return null;
      offset = (zone[0] === "-" ? -1 : 1) * (hours * 60 + minutes) * MINUTE_MS;
    }
  }
  return { wall, offsetMs: offset, dateOnly };
}

function daysInMonth(year: number, month: number): number {
  const date = new Date(0);
  date.setUTCFullYear(year, month, 0);
  return date.getUTCDate();
}

/**
 * The instant a date-time string names, reading one without an offset in `timeZone` (and a bare
 * date at {@linkcode DATE_ONLY_HOUR}:00 there), or `null` when {@linkcode parseDateTime} refuses
 * it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(
 *   resolveDateTime("2026-12-01T15:00:00", "Europe/Berlin")?.toISOString(),
 *   "2026-12-01T14:00:00.000Z",
 * );
 * ```
 */
export function resolveDateTime(text: string, timeZone: string): Date | null {
  const parsed = parseDateTime(text);
  if (!parsed) return null;
  const instant = parsed.offsetMs === null
    ? wallClockToInstant(parsed.wall, timeZone)
    : new Date(wallAsUtcMs(parsed.wall) - parsed.offsetMs);
  return Number.isNaN(instant.getTime()) ? null : instant;
}

/**
 * A model's date-time as a full ISO-8601 date-time with an explicit offset in `timeZone`
 * (`2026-12-01T15:00:00+01:00`), or `null` when it cannot be read reliably.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const berlin = (text: string) => normalizeDateTime(text, "Europe/Berlin");
 * assert.equal(berlin("2026-12-01T15:00:00"), "2026-12-01T15:00:00+01:00");
 * assert.equal(berlin("2026-12-01T14:00:00Z"), "2026-12-01T15:00:00+01:00");
 * assert.equal(berlin("April 2, 3 PM"), null);
 * ```
 */
export function normalizeDateTime(text: string, timeZone: string): string | null {
  const instant = resolveDateTime(text, timeZone);
  return instant ? formatInTimeZone(instant, timeZone) : null;
}
