// The live page: asks for a project and a read key, then shows the project's live traffic from
// the dashboard socket and its numbers from the JSON API, both on this server.
//
// The key is kept in sessionStorage (this tab only) and sent only as the socket's first message
// and as Authorization: Bearer; never in a URL. A refused key is forgotten.

import { Chart } from "./chart.js";
import * as format from "./format.js";
import { LiveState } from "./state.js";

const STORED_PROJECT = "bklit.live.project";
const STORED_KEY = "bklit.live.key";
const SESSION_ROWS = 100; // live sessions shown, most recently active first
const OPEN_PAGES = 6;
const DRAW_EVERY = 250; // ms: at most four redraws a second, however busy the project
const STATS_EVERY = 60_000;
const SERIES_EVERY = 60_000;
const SESSIONS_EVERY = 30_000;
const RETRY_MAX = 30_000;
const PROJECT_ID = /^[A-Za-z0-9_-]{1,64}$/;

const $ = (id) => document.getElementById(id);

class Refused extends Error {}

function store() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // storage blocked: the key lives in memory only
  }
}

function text(tag, content, className) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (className) {
    node.className = className;
  }
  return node;
}

function setStatus(state, message) {
  const line = $("connection");
  line.dataset.state = state;
  line.textContent = message;
}

class View {
  constructor(project, key) {
    this.project = project;
    this.key = key;
    this.state = new LiveState();
    this.chart = new Chart($("chart"));
    this.aborts = new AbortController();
    this.timers = [];
    this.socket = null;
    this.retries = 0;
    this.stopped = false;
    this.drawn = 0;
    this.drawTimer = 0;
    this.feedShown = 0;
    this.rows = new Map(); // sessionId -> its row in the sessions table
    this.range = document.querySelector("input[name=range]:checked").value;
  }

  start() {
    $("project-name").textContent = this.project;
    $("project-line").hidden = false;
    $("sign-out").hidden = false;
    $("sign-in").hidden = true;
    $("board").hidden = false;
    $("feed").replaceChildren();
    $("sessions-body").replaceChildren();
    $("chart-card").setAttribute("aria-busy", "true");
    $("summary").setAttribute("aria-busy", "true");
    this.connect();
    this.refreshStats();
    this.refreshSeries();
    this.every(STATS_EVERY, () => this.refreshStats());
    this.every(SERIES_EVERY, () => this.refreshSeries());
    this.every(SESSIONS_EVERY, () => this.refreshSessions());
    this.every(1000, () => this.draw()); // time on site and the chart's minute move on
    this.draw();
  }

  stop() {
    this.stopped = true;
    this.aborts.abort();
    for (const timer of this.timers) {
      clearInterval(timer);
      clearTimeout(timer);
    }
    clearTimeout(this.drawTimer);
    if (this.socket) {
      this.socket.close(1000);
    }
    $("board").hidden = true;
    $("project-line").hidden = true;
    $("sign-out").hidden = true;
  }

  every(ms, step) {
    this.timers.push(setInterval(step, ms));
  }

  // The dashboard socket: same host, ws or wss as the page; the key as its first message.
  connect() {
    const url = new URL(`dashboard?projectId=${encodeURIComponent(this.project)}`, window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    setStatus("waiting", "Connecting…");
    const socket = new WebSocket(url);
    this.socket = socket;
    let refusal = null;
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ type: "auth", apiKey: this.key }));
      setStatus("waiting", "Checking the key…");
    });
    socket.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === "error") {
        // "Cannot check the key now" is the server's trouble (Redis), not the key's: try again later.
        const transient = /cannot check/i.test(message.message || "");
        refusal = message.code === "unauthorized" && !transient ? message.message || "the key was refused" : null;
        return;
      }
      this.receive(message);
    });
    socket.addEventListener("close", (event) => {
      if (this.stopped || socket !== this.socket) {
        return;
      }
      if (refusal) {
        refuse(this.project, `The server refused the key: ${refusal}.`);
        return;
      }
      const wait = Math.min(RETRY_MAX, 1000 * 2 ** this.retries);
      this.retries += 1;
      setStatus("waiting", `Disconnected (${event.code || "no answer"}); trying again in ${Math.round(wait / 1000)} s`);
      this.timers.push(setTimeout(() => this.stopped || this.connect(), wait));
    });
  }

  receive(message) {
    const state = this.state;
    switch (message.type) {
      case "snapshot":
        state.snapshot(message.data);
        this.retries = 0;
        setStatus("live", "Live");
        this.refreshSessions();
        this.draw(); // at once: the count and the status change together
        return;
      case "pageview":
        state.pageview(message.data);
        break;
      case "event":
        state.event(message.data);
        break;
      case "session_end":
        state.sessionEnd(message.data, message.timestamp);
        break;
      default:
        return;
    }
    this.schedule();
  }

  async api(path) {
    const response = await fetch(new URL(path, window.location.href), {
      headers: { Authorization: `Bearer ${this.key}` },
      cache: "no-store",
      credentials: "omit",
      signal: this.aborts.signal,
    });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (response.status === 401 || response.status === 403) {
      throw new Refused((body && body.message) || `HTTP ${response.status}`);
    }
    if (!response.ok) {
      throw new Error((body && body.message) || `HTTP ${response.status}`);
    }
    return body;
  }

  // Runs an API request; a refused key ends the view, other failures go to `failed`.
  async ask(path, done, failed) {
    try {
      done(await this.api(path));
    } catch (error) {
      if (this.stopped || error.name === "AbortError") {
        return;
      }
      if (error instanceof Refused) {
        refuse(this.project, `The server refused the key: ${error.message}.`);
        return;
      }
      failed(error.message);
    }
  }

  query() {
    return `projectId=${encodeURIComponent(this.project)}`;
  }

  refreshSessions() {
    const changed = this.state.changed;
    this.ask(`api/sessions?${this.query()}`, (answer) => {
      this.state.details(answer, changed);
      this.schedule();
    }, () => {}); // the socket's view stands; asked again shortly
  }

  refreshSeries() {
    const asked = Date.now();
    this.ask(`api/timeseries?${this.query()}`, (answer) => {
      $("chart-card").removeAttribute("aria-busy");
      $("chart-error").hidden = true;
      this.state.timeseries(answer, asked);
      this.draw();
    }, (message) => {
      $("chart-card").removeAttribute("aria-busy");
      $("chart-error").textContent = `Stored pageviews are unavailable (${message}); the chart shows only what arrived live.`;
      $("chart-error").hidden = false;
    });
  }

  refreshStats() {
    const range = this.range;
    $("summary").setAttribute("aria-busy", "true");
    this.ask(`api/stats?${this.query()}&range=${range}`, (answer) => {
      if (range === this.range) {
        $("summary-error").hidden = true;
        this.showStats(answer);
      }
    }, (message) => {
      $("summary-error").textContent = `The summary is unavailable: ${message}.`;
      $("summary-error").hidden = false;
      $("summary").removeAttribute("aria-busy");
    });
  }

  setRange(range) {
    this.range = range;
    this.refreshStats();
  }

  // Redraws at most every DRAW_EVERY ms, in an animation frame.
  schedule() {
    if (this.drawTimer) {
      return;
    }
    const wait = Math.max(0, this.drawn + DRAW_EVERY - performance.now());
    this.drawTimer = setTimeout(() => requestAnimationFrame(() => {
      this.drawTimer = 0;
      this.draw();
    }), wait);
  }

  draw() {
    if (this.stopped || document.hidden) {
      return; // drawn again when the tab is shown (the one-second tick)
    }
    this.drawn = performance.now();
    const state = this.state;
    $("live-count").textContent = state.live === null ? "–" : format.count(state.live);
    $("live-note").textContent = state.live === null ? "" : `as of ${format.clock(Date.now())}`;
    this.chart.update(state.points());
    const open = state.openPages(OPEN_PAGES).map(([url, n]) => {
      const li = document.createElement("li");
      li.title = url;
      li.append(text("span", format.page(url, { short: true }), "label"), text("span", format.count(n), "n"));
      return li;
    });
    $("open-pages").replaceChildren(...open);
    $("open-title").hidden = !open.length;
    this.drawSessions();
    this.drawFeed();
  }

  // The table keeps a row per shown session and changes only what changed: with 1,000 live
  // sessions and pageviews arriving all the time, a redraw moves a few rows and a few texts.
  drawSessions() {
    const now = Date.now();
    const body = $("sessions-body");
    const shown = this.state.active(SESSION_ROWS);
    const wanted = new Set(shown.map((s) => s.sessionId));
    for (const [id, row] of this.rows) {
      if (!wanted.has(id)) {
        row.element.remove();
        this.rows.delete(id);
      }
    }
    let before = body.firstChild;
    for (const s of shown) {
      let row = this.rows.get(s.sessionId);
      if (!row) {
        row = sessionRow();
        this.rows.set(s.sessionId, row);
      }
      row.show([
        format.page(s.currentPage),
        format.page(s.entryPage),
        format.count(s.pageviews),
        s.countryCode || s.country ? format.country(s.countryCode, s.country) : "–",
        s.browser || s.deviceType ? format.agent(s.browser, s.os, s.deviceType) : "–",
        s.startedAt ? format.elapsed(now - s.startedAt) : "–",
      ], [s.currentPage || "", s.entryPage || ""]);
      row.element.classList.toggle("fresh", now - s.lastSeen < 2000);
      if (row.element === before) {
        before = before.nextSibling;
      } else {
        body.insertBefore(row.element, before);
      }
    }
    const total = this.state.live === null ? this.state.sessions.size : Math.max(this.state.live, shown.length);
    const note = !shown.length
      ? "No live sessions right now."
      : total > shown.length
        ? `The ${format.count(shown.length)} most recently active of ${format.count(total)} live sessions.`
        : "";
    if ($("sessions-note").textContent !== note) {
      $("sessions-note").textContent = note;
    }
  }

  drawFeed() {
    const list = $("feed");
    const fresh = this.state.feed.filter((item) => item.seq > this.feedShown);
    if (!fresh.length) {
      return;
    }
    this.feedShown = fresh[fresh.length - 1].seq;
    const nodes = fresh.reverse().map((item) => {
      const li = document.createElement("li");
      const when = text("time", format.clock(item.at));
      when.dateTime = new Date(item.at).toISOString();
      li.append(when, text("span", feedKind(item), `kind ${item.kind}`), text("span", feedText(item), "what"));
      return li;
    });
    list.prepend(...nodes);
    while (list.children.length > this.state.feed.length) {
      list.lastElementChild.remove();
    }
    $("feed-note").textContent = "";
  }

  showStats(answer) {
    $("summary").removeAttribute("aria-busy");
    $("fig-pageviews").textContent = format.count(answer.pageviews);
    $("fig-sessions").textContent = format.count(answer.sessions);
    $("fig-bounce").textContent = format.percent(answer.bounceRate);
    $("fig-median").textContent = format.duration(answer.medianSessionSeconds);
    $("fig-events").textContent = format.count(answer.events);
    const host = format.manyHosts(answer.topPages.map((r) => r.url));
    topList("top-pages", answer.topPages, (r) => format.page(r.url, { host }), (r) => r.pageviews, "pageviews");
    topList("top-referrers", answer.referrers, (r) => r.hostname, (r) => r.sessions, "sessions");
    topList("top-campaigns", answer.campaigns,
      (r) => [r.source, r.medium, r.campaign].filter(Boolean).join(" / "), (r) => r.sessions, "sessions");
    topList("top-countries", answer.countries, (r) => format.country(r.countryCode, r.country), (r) => r.sessions,
      "sessions");
    topList("top-browsers", answer.browsers, (r) => r.browser || "Unknown", (r) => r.sessions, "sessions");
    topList("top-devices", answer.devices, (r) => r.deviceType || "Unknown", (r) => r.sessions, "sessions");
    $("summary-note").textContent =
      `From ${format.date(answer.since * 1000)} to ${format.date(answer.until * 1000)}; ` +
      `bounce rate and median are of the ${format.count(answer.endedSessions)} sessions that have ended.`;
  }
}

// A row of the sessions table; show(texts, titles) changes only the cells whose text changed.
function sessionRow() {
  const element = document.createElement("tr");
  const cells = ["page", "page", "num", "", "", "num"].map((kind) => text("td", "", kind));
  element.append(...cells);
  return {
    element,
    show(texts, titles) {
      texts.forEach((value, i) => {
        if (cells[i].textContent !== value) {
          cells[i].textContent = value;
        }
      });
      titles.forEach((value, i) => {
        if (cells[i].title !== value) {
          cells[i].title = value;
        }
      });
    },
  };
}

function feedKind(item) {
  return { pageview: "view", event: "event", end: "left" }[item.kind];
}

function feedText(item) {
  const who = item.sessionId.slice(-6);
  if (item.kind === "pageview") {
    const where = [item.browser, item.deviceType, item.countryCode].filter(Boolean).join(" · ");
    return `${format.page(item.url, { short: true })}${item.isNewSession ? " (new session)" : ""}${where ? ` — ${where}` : ""}`;
  }
  if (item.kind === "event") {
    const details = Object.entries(item.metadata)
      .filter(([name]) => name !== "triggerMethod")
      .map(([name, value]) => `${name}: ${typeof value === "object" ? JSON.stringify(value) : value}`)
      .join(", ");
    return `${item.trackingId} ${item.eventType}${details ? ` (${details})` : ""} — session …${who}`;
  }
  const pages = item.pageviews ? `, ${format.counted(item.pageviews, "page")}` : "";
  const stay = item.seconds !== null ? `, ${format.duration(item.seconds)}` : "";
  return `session …${who} ended (${item.reason}${pages}${stay})`;
}

function topList(id, rows, label, value, unit) {
  const list = $(id);
  if (!rows.length) {
    list.replaceChildren(text("li", "Nothing in this period.", "empty"));
    return;
  }
  const most = Math.max(...rows.map(value));
  list.replaceChildren(...rows.map((row) => {
    const li = document.createElement("li");
    const share = document.createElement("span");
    share.className = "share";
    share.style.width = `${(100 * value(row)) / most}%`;
    const n = text("span", format.count(value(row)), "n");
    n.title = `${format.count(value(row))} ${unit}`;
    li.append(share, text("span", label(row), "label"), n);
    return li;
  }));
}

let view = null;

function showSignIn(project, message) {
  $("sign-in").hidden = false;
  $("project").value = project || "";
  $("key").value = "";
  const error = $("sign-in-error");
  error.textContent = message || "";
  error.hidden = !message;
  setStatus(message ? "refused" : "idle", message ? "Key refused" : "Not connected");
  (project ? $("key") : $("project")).focus();
}

function open(project, key) {
  if (view) {
    view.stop();
  }
  view = new View(project, key);
  view.start();
  $("main").focus();
}

// The key was refused (or is the wrong kind): forget it, say so, ask again.
function refuse(project, message) {
  if (view) {
    view.stop();
    view = null;
  }
  const storage = store();
  if (storage) {
    storage.removeItem(STORED_KEY);
  }
  showSignIn(project, message);
}

function main() {
  $("time-zone").textContent = format.timeZone;
  const storage = store();
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const project = $("project").value.trim();
    const key = $("key").value.trim();
    if (!PROJECT_ID.test(project)) {
      showSignIn(project, "The project id is 1 to 64 letters, digits, _ or -.");
      $("project").focus();
      return;
    }
    if (!key) {
      showSignIn(project, "Enter a read key.");
      return;
    }
    if (storage) {
      storage.setItem(STORED_PROJECT, project);
      storage.setItem(STORED_KEY, key);
    }
    $("key").value = "";
    open(project, key);
  });
  $("sign-out").addEventListener("click", () => {
    const project = view ? view.project : "";
    if (view) {
      view.stop();
      view = null;
    }
    if (storage) {
      storage.removeItem(STORED_KEY);
    }
    showSignIn(project, "");
  });
  for (const input of document.querySelectorAll("input[name=range]")) {
    input.addEventListener("change", () => view && view.setRange(input.value));
  }
  const project = storage && storage.getItem(STORED_PROJECT);
  const key = storage && storage.getItem(STORED_KEY);
  if (project && key) {
    open(project, key);
  } else {
    showSignIn(project || "", "");
  }
}

main();
