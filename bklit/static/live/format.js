// How numbers, times, places and pages are written, in the viewer's locale and time zone.

const numbers = new Intl.NumberFormat();
const percents = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 });
const clockFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const minuteFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
let regions = null;
try {
  regions = new Intl.DisplayNames(undefined, { type: "region" });
} catch {
  regions = null; // older browsers: the English name from the server
}

export const timeZone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";

export function count(n) {
  return n === null || n === undefined ? "–" : numbers.format(n);
}

// "1 pageview", "2 pageviews"
export function counted(n, noun) {
  return `${count(n)} ${n === 1 ? noun : `${noun}s`}`;
}

export function percent(fraction) {
  return fraction === null || fraction === undefined ? "–" : percents.format(fraction);
}

export function clock(ms) {
  return clockFormat.format(new Date(ms));
}

export function minute(ms) {
  return minuteFormat.format(new Date(ms));
}

export function date(ms) {
  return dateFormat.format(new Date(ms));
}

// 42 s, 3 min 05 s, 1 h 02 min
export function duration(seconds) {
  if (seconds === null || seconds === undefined) {
    return "–";
  }
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  }
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

// 0:42, 12:05, 1:02:09 (time on site, ticking)
export function elapsed(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const mm = String(Math.floor((s % 3600) / 60));
  const ss = String(s % 60).padStart(2, "0");
  return s >= 3600 ? `${Math.floor(s / 3600)}:${mm.padStart(2, "0")}:${ss}` : `${mm}:${ss}`;
}

export function country(code, name) {
  if (!code) {
    return name || "Unknown";
  }
  try {
    return (regions && regions.of(code)) || name || code;
  } catch {
    return name || code;
  }
}

const LONG_QUERY = 24;

// The path and query of a page URL (the host is the site's own), or the text as it came;
// `short`: a long query cut to its start; `host`: with the host.
export function page(url, { short = false, host = false } = {}) {
  if (!url) {
    return "–";
  }
  try {
    const parsed = new URL(url);
    const query = parsed.search + parsed.hash;
    const shown = short && query.length > LONG_QUERY ? `${query.slice(0, LONG_QUERY - 4)}…` : query;
    return (host ? parsed.host : "") + parsed.pathname + shown;
  } catch {
    return url;
  }
}

// Whether URLs name more than one host (then pages are shown with theirs).
export function manyHosts(urls) {
  const hosts = new Set();
  for (const url of urls) {
    try {
      hosts.add(new URL(url).host);
    } catch {
      hosts.add(url);
    }
  }
  return hosts.size > 1;
}

export function agent(browser, os, device) {
  const software = [browser, os].filter(Boolean).join(" on ");
  return [software || "Unknown browser", device].filter(Boolean).join(" · ");
}
