// The live page's model (bklit/static/live/state.js) without a browser: `node --test state.test.mjs`,
// run by tests/test_livepage.py.

import assert from "node:assert/strict";
import { test } from "node:test";

import { FEED_LENGTH, LiveState } from "../../bklit/static/live/state.js";

const MINUTE = 60_000;

function clock(start = Date.UTC(2026, 0, 1, 12, 0, 30)) {
  const c = { now: start };
  c.fn = () => c.now;
  return c;
}

function pageview(sessionId, { isNewSession = false, url = "https://example.com/", at, ...more } = {}) {
  return { sessionId, url, isNewSession, timestamp: new Date(at).toISOString(), browser: "Chrome",
           deviceType: "desktop", countryCode: "DE", country: "Germany", ...more };
}

test("sessions that start, end and resume move the live count; their start comes back", () => {
  const c = clock();
  const state = new LiveState(c.fn);
  state.snapshot({ live: 1, sessions: [{ sessionId: "a", startedAt: c.now - 5000, pageviews: 2, entryPage: "/", exitPage: "/x" }] });
  assert.equal(state.live, 1);
  assert.equal(state.complete, true);

  c.now += 100;
  state.pageview(pageview("b", { isNewSession: true, url: "https://example.com/b", at: c.now }));
  assert.equal(state.live, 2);
  assert.deepEqual(state.active(10).map((s) => s.sessionId), ["b", "a"]);

  c.now += 1000;
  state.sessionEnd({ sessionId: "b", reason: "disconnect" }, new Date(c.now).toISOString());
  assert.equal(state.live, 1);
  assert.equal(state.feed.at(-1).kind, "end");
  assert.equal(state.feed.at(-1).pageviews, 1);

  // A full page load: the socket closed (the session ended), the next page resumes it (not new).
  c.now += 500;
  state.pageview(pageview("b", { url: "https://example.com/c", at: c.now }));
  assert.equal(state.live, 2);
  const b = state.sessions.get("b");
  assert.equal(b.pageviews, 2);
  assert.equal(b.entryPage, "https://example.com/b");
  assert.equal(b.currentPage, "https://example.com/c");
});

test("a session not in a partial snapshot was live already; bots are never counted", () => {
  const c = clock();
  const state = new LiveState(c.fn);
  state.snapshot({ live: 300, sessions: [{ sessionId: "a", startedAt: c.now, pageviews: 1, entryPage: "/", exitPage: "/" }] });
  assert.equal(state.complete, false);
  state.pageview(pageview("unlisted", { at: c.now }));
  assert.equal(state.live, 300);
  state.pageview(pageview("robot", { isNewSession: true, isBot: true, at: c.now }));
  state.event({ sessionId: "robot", trackingId: "x", eventType: "click", timestamp: new Date(c.now).toISOString() });
  state.sessionEnd({ sessionId: "robot", reason: "disconnect" });
  assert.equal(state.live, 300);
  assert.equal(state.feed.filter((item) => item.sessionId === "robot").length, 0);
});

test("the server's list corrects the count unless the socket changed it meanwhile", () => {
  const c = clock();
  const state = new LiveState(c.fn);
  state.snapshot({ live: 3, sessions: [] });
  const asked = state.changed;
  state.details({ live: 2, readAt: c.now, sessions: [
    { sessionId: "a", startedAt: c.now - 1000, lastSeen: c.now - 10, pageviews: 1, currentPage: "/a", browser: "Safari" },
    { sessionId: "b", startedAt: c.now - 2000, lastSeen: c.now - 20, pageviews: 4, currentPage: "/b" },
  ] }, asked);
  assert.equal(state.live, 2);
  assert.equal(state.complete, true);
  assert.equal(state.sessions.get("a").browser, "Safari");

  const before = state.changed;
  state.pageview(pageview("c", { isNewSession: true, at: c.now }));
  state.details({ live: 2, readAt: c.now - 5, sessions: [] }, before);
  assert.equal(state.live, 3); // the socket's count stands
  assert.ok(state.sessions.has("c")); // seen after the server read its list
});

test("pageviews per minute: stored counts, then what arrived live after they were asked for", () => {
  const c = clock();
  const state = new LiveState(c.fn);
  const current = c.now - (c.now % MINUTE);
  state.pageview(pageview("early", { isNewSession: true, at: c.now }));
  c.now += 5;
  const asked = c.now; // the request went out after "early" came
  c.now += 10;
  state.pageview(pageview("late", { isNewSession: true, at: c.now }));
  state.timeseries({ points: [{ minute: (current - MINUTE) / 1000, pageviews: 7 }, { minute: current / 1000, pageviews: 1 }] }, asked);
  const points = state.points(60);
  assert.equal(points.length, 60);
  assert.equal(points.at(-1).minute, current);
  assert.equal(points.at(-1).pageviews, 2); // the stored one ("early") and "late"
  assert.equal(points.at(-2).pageviews, 7);
  c.now += 3 * MINUTE;
  assert.equal(state.points(60).at(-1).pageviews, 0);
  assert.equal(state.points(60).at(-4).pageviews, 2);
});

test("the feed keeps the last FEED_LENGTH items", () => {
  const c = clock();
  const state = new LiveState(c.fn);
  state.snapshot({ live: 0, sessions: [] });
  for (let i = 0; i < FEED_LENGTH + 20; i += 1) {
    state.pageview(pageview(`s${i}`, { isNewSession: true, at: c.now }));
  }
  assert.equal(state.feed.length, FEED_LENGTH);
  assert.equal(state.feed.at(-1).sessionId, `s${FEED_LENGTH + 19}`);
  assert.equal(state.live, FEED_LENGTH + 20);
  assert.deepEqual(state.openPages(3), [["https://example.com/", FEED_LENGTH + 20]]);
});
