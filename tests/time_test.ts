import assert from "node:assert/strict";
import {
  describeInTimeZone,
  formatInTimeZone,
  isValidTimeZone,
  normalizeDateTime,
  offsetMs,
  parseDateTime,
  resolveDateTime,
  timeZoneOrUtc,
  type WallClock,
  wallClockAt,
  wallClockToInstant,
} from "../lib/time.ts";

const wall = (text: string): WallClock => {
  const parsed = parseDateTime(text);
  assert.ok(parsed, text);
  return parsed.wall;
};
const instant = (text: string, zone: string) => wallClockToInstant(wall(text), zone).toISOString();

Deno.test("wallClockToInstant: plain winter and summer times", () => {
  assert.equal(instant("2026-12-01T15:00:00", "Europe/Berlin"), "2026-12-01T14:00:00.000Z");
  assert.equal(instant("2026-07-01T15:00:00", "Europe/Berlin"), "2026-07-01T13:00:00.000Z");
  assert.equal(instant("2026-07-01T09:00:00", "America/New_York"), "2026-07-01T13:00:00.000Z");
  assert.equal(instant("2026-07-01T09:00:00", "Asia/Kolkata"), "2026-07-01T03:30:00.000Z");
  assert.equal(instant("2026-07-01T09:00:00", "UTC"), "2026-07-01T09:00:00.000Z");
});

Deno.test("wallClockToInstant: either side of the spring-forward change", () => {
  // London springs forward on 2026-03-29 at 01:00 UTC (01:00 GMT becomes 02:00 BST).
  assert.equal(instant("2026-03-29T00:59:00", "Europe/London"), "2026-03-29T00:59:00.000Z");
  assert.equal(instant("2026-03-29T02:00:00", "Europe/London"), "2026-03-29T01:00:00.000Z");
  assert.equal(instant("2026-03-29T09:00:00", "Europe/London"), "2026-03-29T08:00:00.000Z");
  // New York springs forward on 2026-03-08 at 02:00 local.
  assert.equal(instant("2026-03-08T01:59:00", "America/New_York"), "2026-03-08T06:59:00.000Z");
  assert.equal(instant("2026-03-08T03:00:00", "America/New_York"), "2026-03-08T07:00:00.000Z");
});

Deno.test("wallClockToInstant: a time in the spring-forward gap moves forward", () => {
  // 01:30 never happens in London that morning: it is read as 02:30 BST.
  assert.equal(instant("2026-03-29T01:30:00", "Europe/London"), "2026-03-29T01:30:00.000Z");
  assert.equal(
    normalizeDateTime("2026-03-29T01:30:00", "Europe/London"),
    "2026-03-29T02:30:00+01:00",
  );
  assert.equal(
    normalizeDateTime("2026-03-08T02:30:00", "America/New_York"),
    "2026-03-08T03:30:00-04:00",
  );
});

Deno.test("wallClockToInstant: a time repeated at fall-back is the earlier one", () => {
  // London falls back on 2026-10-25: 01:30 happens at 00:30Z (BST) and again at 01:30Z (GMT).
  assert.equal(instant("2026-10-25T01:30:00", "Europe/London"), "2026-10-25T00:30:00.000Z");
  assert.equal(instant("2026-10-25T02:30:00", "Europe/London"), "2026-10-25T02:30:00.000Z");
  assert.equal(
    normalizeDateTime("2026-11-01T01:30:00", "America/New_York"),
    "2026-11-01T01:30:00-04:00",
  );
});

Deno.test("wallClockToInstant: half-hour offsets and half-hour DST (Lord Howe)", () => {
  assert.equal(
    normalizeDateTime("2026-10-04T02:30:00", "Australia/Lord_Howe"),
    "2026-10-04T02:30:00+11:00",
  );
  assert.equal(
    normalizeDateTime("2026-07-01T12:00:00", "Australia/Lord_Howe"),
    "2026-07-01T12:00:00+10:30",
  );
});

Deno.test("wallClockToInstant round-trips every hour across a year of DST changes", () => {
  for (const zone of ["Europe/London", "America/New_York", "Australia/Sydney", "Asia/Tokyo"]) {
    for (let t = Date.UTC(2026, 0, 1); t < Date.UTC(2027, 0, 1); t += 3_600_000) {
      const at = new Date(t);
      const iso = formatInTimeZone(at, zone);
      // Ambiguous wall times map to the earlier instant; everything else round-trips exactly.
      const back = resolveDateTime(iso.slice(0, 19), zone)!;
      const withOffset = resolveDateTime(iso, zone)!;
      assert.equal(withOffset.getTime(), t, `${zone} ${iso}`);
      assert.ok(back.getTime() === t || back.getTime() === t - 3_600_000, `${zone} ${iso}`);
    }
  }
});

Deno.test("offsetMs and formatInTimeZone", () => {
  assert.equal(offsetMs(new Date("2026-07-01T12:00:00Z"), "Europe/London"), 3_600_000);
  assert.equal(offsetMs(new Date("2026-01-01T12:00:00Z"), "Europe/London"), 0);
  assert.equal(offsetMs(new Date("2026-01-01T12:00:00Z"), "America/St_Johns"), -12_600_000);
  assert.equal(
    formatInTimeZone(new Date("2026-12-01T14:00:00.750Z"), "Europe/Berlin"),
    "2026-12-01T15:00:00+01:00",
  );
  assert.equal(
    formatInTimeZone(new Date("2026-01-01T12:00:00Z"), "America/St_Johns"),
    "2026-01-01T08:30:00-03:30",
  );
  assert.equal(
    formatInTimeZone(new Date("2026-01-01T00:00:00Z"), "UTC"),
    "2026-01-01T00:00:00+00:00",
  );
});

Deno.test("describeInTimeZone names weekday, offset and zone", () => {
  assert.equal(
    describeInTimeZone(new Date("2026-07-01T08:30:00Z"), "Europe/London"),
    "Wednesday 2026-07-01T09:30:00+01:00 (Europe/London, UTC+01:00)",
  );
});

Deno.test("isValidTimeZone / timeZoneOrUtc", () => {
  assert.equal(isValidTimeZone("Europe/London"), true);
  assert.equal(isValidTimeZone("UTC"), true);
  assert.equal(isValidTimeZone("Mars/Olympus_Mons"), false);
  assert.equal(isValidTimeZone(""), false);
  assert.equal(isValidTimeZone(null), false);
  assert.equal(timeZoneOrUtc("Nowhere/Town"), "UTC");
  assert.equal(timeZoneOrUtc("Asia/Tokyo"), "Asia/Tokyo");
});

Deno.test("parseDateTime accepts ISO-8601 forms and refuses the rest", () => {
  assert.deepEqual(parseDateTime("2026-12-01T15:00:00"), {
    wall: { year: 2026, month: 12, day: 1, hour: 15, minute: 0, second: 0, millisecond: 0 },
    offsetMs: null,
    dateOnly: false,
  });
  assert.equal(parseDateTime("2026-12-01 15:00")?.wall.minute, 0);
  assert.equal(parseDateTime("2026-12-01T15:00:00Z")?.offsetMs, 0);
  assert.equal(parseDateTime("2026-12-01T15:00:00.123456+05:30")?.offsetMs, 19_800_000);
  assert.equal(parseDateTime("2026-12-01T15:00:00-0800")?.offsetMs, -28_800_000);
  assert.equal(parseDateTime("2026-12-01T15:00:00.123456+05:30")?.wall.millisecond, 123);
  assert.deepEqual(parseDateTime("2026-12-01")?.dateOnly, true);
  for (
    const bad of [
      "20990301",
      "1767225600",
      "April 2, 3 PM",
      "02/04/2026",
      "2026-02-30",
      "2026-13-01",
      "2026-12-01T24:00:00",
      "2026-12-01T15:60",
      "2026-12-01Z",
      "tomorrow",
      "",
    ]
  ) {
    assert.equal(parseDateTime(bad), null, bad);
  }
});

Deno.test("normalizeDateTime: offset-less read in the zone, offsets converted, date-only at 09:00", () => {
  assert.equal(
    normalizeDateTime("2026-12-01T15:00:00", "Europe/Berlin"),
    "2026-12-01T15:00:00+01:00",
  );
  assert.equal(
    normalizeDateTime("2026-12-01T14:00:00Z", "Europe/Berlin"),
    "2026-12-01T15:00:00+01:00",
  );
  assert.equal(
    normalizeDateTime("2026-12-01T09:00:00-05:00", "Europe/Berlin"),
    "2026-12-01T15:00:00+01:00",
  );
  assert.equal(normalizeDateTime("2026-07-01", "America/New_York"), "2026-07-01T09:00:00-04:00");
  assert.equal(normalizeDateTime("20990301", "UTC"), null);
  assert.equal(normalizeDateTime("April 2, 3 PM", "UTC"), null);
});

/** The wall clock `Intl` shows in `zone` at `ms`, read independently of lib/time.ts. */
function intlWall(ms: number, zone: string): string {
  return new Intl.DateTimeFormat("en-US", {
    timeZone: zone,
    hourCycle: "h23",
    weekday: "long",
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  }).format(new Date(ms));
}

/** wallClockAt's answer in the same shape as {@linkcode intlWall}. */
function libWall(ms: number, zone: string): string {
  const w = wallClockAt(new Date(ms), zone);
  const p = (n: number) => String(n).padStart(2, "0");
  return `${w.weekday}, ${p(w.month)}/${p(w.day)}/${w.year}, ${p(w.hour)}:${p(w.minute)}:${
    p(w.second)
  }`;
}

Deno.test("wallClockAt agrees with Intl second by second around every offset change of 2025-2027", () => {
  const zones = [
    "Europe/London",
    "America/New_York",
    "America/St_Johns", // -03:30 / -02:30
    "Australia/Lord_Howe", // a 30-minute change
    "Pacific/Chatham", // +12:45 / +13:45
    "Asia/Kathmandu", // +05:45, no change
    "America/Santiago", // southern hemisphere
    "Africa/Casablanca", // changes around Ramadan
    "UTC",
  ];
  const HOUR = 3_600_000;
  const offsetAt = (ms: number, zone: string) => {
    const w = wallClockAt(new Date(ms), zone);
    return Date.UTC(w.year, w.month - 1, w.day, w.hour, w.minute, w.second) - ms;
  };
  let changes = 0;
  for (const zone of zones) {
    for (let t = Date.UTC(2025, 0, 1); t < Date.UTC(2028, 0, 1); t += 6 * HOUR) {
      if (offsetAt(t, zone) === offsetAt(t + 6 * HOUR, zone)) continue;
      changes++;
      // Find the change to the second, then compare every 7 s for 5 minutes either side, first
      // at a late second of each minute (so that later instants of a minute use what it cached).
      let [lo, hi] = [t, t + 6 * HOUR];
      while (hi - lo > 1000) {
        const mid = lo + Math.floor((hi - lo) / 2000) * 1000;
        if (offsetAt(mid, zone) === offsetAt(lo, zone)) lo = mid;
        else hi = mid;
      }
      for (let ms = hi - 5 * 60_000 + 59_000; ms < hi + 5 * 60_000; ms += 60_000) {
        assert.equal(
          libWall(ms, zone),
          intlWall(ms, zone),
          `${zone} ${new Date(ms).toISOString()}`,
        );
      }
      for (let ms = hi - 5 * 60_000; ms < hi + 5 * 60_000; ms += 7_000) {
        assert.equal(
          libWall(ms, zone),
          intlWall(ms, zone),
          `${zone} ${new Date(ms).toISOString()}`,
        );
      }
    }
  }
  // 2 a year in 6 zones, more in Casablanca; Kathmandu and UTC have none.
  assert.ok(changes >= 36, `${changes} changes found`);
});

Deno.test("wallClockAt: old offsets with seconds, dates far apart, milliseconds kept", () => {
  // Monrovia was -00:44:30 until 1972: read from Intl every time, not per minute.
  const monrovia = Date.UTC(1971, 5, 1, 12, 0, 0);
  assert.equal(libWall(monrovia, "Africa/Monrovia"), intlWall(monrovia, "Africa/Monrovia"));
  assert.equal(libWall(monrovia + 30_000, "Africa/Monrovia"), "Tuesday, 06/01/1971, 11:16:00");
  // It went to GMT at 1972-01-07T00:44:30Z, half way through a minute.
  const change = Date.UTC(1972, 0, 7, 0, 44, 30);
  for (const ms of [change - 20_000, change - 1_000, change, change + 10_000]) {
    assert.equal(libWall(ms, "Africa/Monrovia"), intlWall(ms, "Africa/Monrovia"));
  }
  assert.equal(libWall(change + 10_000, "Africa/Monrovia"), "Friday, 01/07/1972, 00:44:40");
  for (
    const iso of ["2026-12-31T23:59:59.999Z", "2027-01-01T00:00:00.001Z", "2099-02-28T22:30:00Z"]
  ) {
    const ms = Date.parse(iso);
    for (const zone of ["Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata"]) {
      assert.equal(libWall(ms, zone), intlWall(ms, zone), `${zone} ${iso}`);
      assert.equal(libWall(ms + 1, zone), intlWall(ms + 1, zone), `${zone} ${iso} + 1 ms`);
    }
  }
  const w = wallClockAt(new Date("2026-12-01T14:00:00.750Z"), "Europe/Berlin");
  const again = wallClockAt(new Date("2026-12-01T14:00:00.250Z"), "Europe/Berlin");
  assert.deepEqual([w.hour, w.millisecond, again.millisecond], [15, 750, 250]);
});
