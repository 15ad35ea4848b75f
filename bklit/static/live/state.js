// What the page knows of the project's live traffic: the live count, the live sessions,
// the feed and pageviews per minute, kept up to date from the dashboard socket's messages.
// No DOM here.

export const FEED_LENGTH = 100;
const ENDED_KEPT = 5000; // ended sessions remembered, so a resumed one gets its start back
const MINUTE = 60_000;

function minuteOf(ms) {
  return ms - (ms % MINUTE);
}

function time(text, fallback) {
  const ms = Date.parse(text);
  return Number.isFinite(ms) ? ms : fallback;
}

export class LiveState {
  constructor(now = () => Date.now()) {
    this.now = now;
    this.live = null; // unknown until the snapshot
    this.sessions = new Map(); // sessionId -> session, for sessions of people that are live
    this.ended = new Map(); // sessionId -> session, recently ended (oldest first)
    this.bots = new Set(); // sessions seen with isBot: never counted
    this.complete = false; // whether every live session is in this.sessions
    this.feed = []; // newest last; each {seq, kind, at, ...}
    this.seq = 0;
    this.minutes = new Map(); // minute start (ms) -> pageviews
    this.recent = []; // {minute, received} of live pageviews of the last two minutes
    this.changed = 0; // bumped by every change of the live count
  }

  // The dashboard's first message: {live, sessions: [{sessionId, startedAt, pageviews, entryPage, exitPage}]}.
  snapshot(data) {
    const now = this.now();
    const previous = this.sessions;
    this.sessions = new Map();
    data.sessions.forEach((s, i) => {
      const known = previous.get(s.sessionId) || {};
      this.sessions.set(s.sessionId, {
        ...known,
        sessionId: s.sessionId,
        startedAt: s.startedAt,
        pageviews: s.pageviews,
        entryPage: s.entryPage,
        currentPage: s.exitPage,
        lastSeen: known.lastSeen || now - i, // listed most recently active first
      });
    });
    this.live = data.live;
    this.complete = data.live <= data.sessions.length;
    this.changed += 1;
  }

  // /api/sessions: every live session (up to 1,000) with country, browser and device.
  // `changedSince` is this.changed when the request went out: if the count moved meanwhile,
  // the socket's count is kept, else the server's replaces it (correcting any drift).
  details(answer, changedSince) {
    const fresh = new Map();
    for (const s of answer.sessions) {
      const known = this.sessions.get(s.sessionId);
      const newer = known && known.lastSeen > s.lastSeen;
      fresh.set(s.sessionId, newer ? { ...s, ...known } : { ...known, ...s });
    }
    for (const [id, s] of this.sessions) {
      if (!fresh.has(id) && s.lastSeen > answer.readAt) {
        fresh.set(id, s); // started after the server read its list
      }
    }
    this.sessions = fresh;
    if (this.changed === changedSince) {
      this.live = answer.live;
      this.complete = answer.live <= answer.sessions.length;
    }
  }

  pageview(data) {
    const now = this.now();
    const at = time(data.timestamp, now);
    if (data.isBot) {
      this.bots.add(data.sessionId);
      return;
    }
    let session = this.sessions.get(data.sessionId);
    if (!session) {
      const before = this.ended.get(data.sessionId);
      this.ended.delete(data.sessionId);
      // Counted when it starts or resumes; a session not listed yet may have been live all along.
      if (this.live !== null && (data.isNewSession || before || this.complete)) {
        this.live += 1;
        this.changed += 1;
      }
      session = data.isNewSession
        ? { startedAt: at, pageviews: 0, entryPage: data.url }
        : { startedAt: null, pageviews: 0, entryPage: data.landingPage || "", ...before };
      session.sessionId = data.sessionId;
      this.sessions.set(data.sessionId, session);
    }
    session.pageviews += 1;
    session.currentPage = data.url;
    session.lastSeen = now;
    session.country = data.country;
    session.countryCode = data.countryCode;
    session.browser = data.browser;
    session.os = data.os;
    session.deviceType = data.deviceType;
    this.add({ kind: "pageview", at, sessionId: data.sessionId, url: data.url, browser: data.browser,
               deviceType: data.deviceType, countryCode: data.countryCode, country: data.country,
               isNewSession: data.isNewSession });
    this.count(at, now);
  }

  event(data) {
    const now = this.now();
    if (this.bots.has(data.sessionId)) {
      return;
    }
    const session = this.sessions.get(data.sessionId);
    if (session) {
      session.lastSeen = now;
    }
    this.add({ kind: "event", at: time(data.timestamp, now), sessionId: data.sessionId,
               trackingId: data.trackingId, eventType: data.eventType, metadata: data.metadata || {} });
  }

  sessionEnd(data, timestamp) {
    const now = this.now();
    if (this.bots.delete(data.sessionId)) {
      return;
    }
    const session = this.sessions.get(data.sessionId);
    this.sessions.delete(data.sessionId);
    if (session) {
      this.ended.set(data.sessionId, session);
      if (this.ended.size > ENDED_KEPT) {
        this.ended.delete(this.ended.keys().next().value);
      }
    }
    if (this.live !== null && (session || !this.complete)) {
      this.live = Math.max(0, this.live - 1);
      this.changed += 1;
    }
    this.add({ kind: "end", at: time(timestamp, now), sessionId: data.sessionId, reason: data.reason,
               pageviews: session ? session.pageviews : null,
               seconds: session && session.startedAt ? (now - session.startedAt) / 1000 : null });
  }

  add(item) {
    this.seq += 1;
    this.feed.push({ seq: this.seq, ...item });
    if (this.feed.length > FEED_LENGTH) {
      this.feed.splice(0, this.feed.length - FEED_LENGTH);
    }
  }

  count(at, now) {
    const minute = minuteOf(at);
    this.minutes.set(minute, (this.minutes.get(minute) || 0) + 1);
    this.recent.push({ minute, received: now });
    while (this.recent.length && this.recent[0].received < now - 2 * MINUTE) {
      this.recent.shift();
    }
  }

  // /api/timeseries (minutes in epoch seconds), asked at `askedAt` (ms): its counts replace
  // ours, plus the live pageviews that came after it was asked (not stored yet when it was read).
  timeseries(answer, askedAt) {
    this.minutes = new Map(answer.points.map((p) => [p.minute * 1000, p.pageviews]));
    for (const { minute, received } of this.recent) {
      if (received >= askedAt) {
        this.minutes.set(minute, (this.minutes.get(minute) || 0) + 1);
      }
    }
  }

  // The last `length` minutes up to the current one, oldest first.
  points(length = 60) {
    const current = minuteOf(this.now());
    for (const minute of this.minutes.keys()) {
      if (minute <= current - length * MINUTE) {
        this.minutes.delete(minute);
      }
    }
    return Array.from({ length }, (_, i) => {
      const minute = current - (length - 1 - i) * MINUTE;
      return { minute, pageviews: this.minutes.get(minute) || 0 };
    });
  }

  // The pages live sessions are on, most first: [[url, sessions]].
  openPages(limit) {
    const counts = new Map();
    for (const s of this.sessions.values()) {
      if (s.currentPage) {
        counts.set(s.currentPage, (counts.get(s.currentPage) || 0) + 1);
      }
    }
    return [...counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, limit);
  }

  // Live sessions, most recently active first.
  active(limit) {
    return [...this.sessions.values()].sort((a, b) => b.lastSeen - a.lastSeen).slice(0, limit);
  }
}
