// The comparison peer for bench/compare.py: a minimal reproduction, written
// for this benchmark, of the original product's WebSocket server hot path
// (Node `ws` + `ioredis`).  Per pageview, each Redis command awaited in turn
// as the original did:
//
//   1. ZADD live:sessions:<project> now <session>, then ZCARD of it (the
//      session tracking);
//   2. LPUSH of the queued event (id, type, payload, queuedAt, projectId);
//   3. PUBLISH of an "Event queued" debug record (the queue's own log);
//   4. PUBLISH of a "Pageview received via WebSocket" debug record;
//
// then the pageview is broadcast to the project's dashboards and acked.  A
// custom event is queued (2, 3), logged ("Custom event received") and
// broadcast, with no session tracking.  Do not pipeline the commands here:
// awaiting them one by one is what the comparison measures.  Geolocation
// (an HTTP call per pageview in the original) and the console logging are
// left out, so the peer does less than the original per message.
//
//     REDIS_URL=redis://127.0.0.1:6379 node bench/peers/server.mjs [PORT]
//
// Prints "listening PORT" on stdout once it accepts connections.

import { randomUUID } from "node:crypto";
import Redis from "ioredis";
import { WebSocketServer } from "ws";

const port = Number(process.argv[2] || process.env.PORT || 8081);
const redis = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379");
const QUEUE = "analytics:queue";
const DEBUG_CHANNEL = "debug-logs";

// projectId -> Set of dashboard sockets
const dashboards = new Map();
// sessions seen since they connected (the original's isNewSession)
const seenSessions = new Set();

function debugLog(stage, message, data, eventId, projectId, duration) {
  const record = { timestamp: new Date().toISOString(), stage, level: "info", message, data, eventId, projectId };
  if (duration !== undefined) record.duration = duration;
  return redis.publish(DEBUG_CHANNEL, JSON.stringify(record));
}

async function trackSession(projectId, sessionId) {
  const key = `live:sessions:${projectId}`;
  await redis.zadd(key, Date.now(), sessionId);
  await redis.zcard(key);
}

async function queue(event) {
  const started = Date.now();
  await redis.lpush(QUEUE, JSON.stringify(event));
  await debugLog("queue", "Event queued", { queueKey: QUEUE, eventType: event.type }, event.id,
    event.projectId, Date.now() - started);
}

function broadcast(projectId, message) {
  const sockets = dashboards.get(projectId);
  if (!sockets) return;
  const payload = JSON.stringify(message);
  for (const dashboard of sockets) dashboard.send(payload);
}

async function pageview(message, projectId, sessionId) {
  const eventId = randomUUID();
  await trackSession(projectId, sessionId);
  const isNewSession = !seenSessions.has(sessionId);
  if (isNewSession) seenSessions.add(sessionId);
  const payload = { ...message.data, sessionId, isNewSession };
  await queue({ id: eventId, type: "pageview", payload, queuedAt: new Date().toISOString(), projectId });
  await debugLog("websocket", "Pageview received via WebSocket",
    { url: message.data?.url, sessionId, isNewSession }, eventId, projectId);
  broadcast(projectId, { type: "pageview", data: payload, timestamp: new Date().toISOString() });
  return eventId;
}

async function customEvent(message, projectId, sessionId) {
  const eventId = randomUUID();
  const payload = { ...message.data, sessionId };
  await queue({ id: eventId, type: "event", payload, queuedAt: new Date().toISOString(), projectId });
  await debugLog("websocket", "Custom event received via WebSocket",
    { trackingId: message.data?.trackingId, eventType: message.data?.eventType, sessionId }, eventId, projectId);
  broadcast(projectId, { type: "event", data: payload, timestamp: new Date().toISOString() });
  return eventId;
}

const handlers = new Map([["pageview", pageview], ["event", customEvent]]);
const wss = new WebSocketServer({ host: "127.0.0.1", port });

wss.on("connection", (socket, request) => {
  const url = new URL(request.url, "http://localhost");
  const projectId = url.searchParams.get("projectId") || "";
  const sessionId = url.searchParams.get("sessionId") || randomUUID();

  if (url.pathname === "/dashboard") {
    let sockets = dashboards.get(projectId);
    if (!sockets) dashboards.set(projectId, (sockets = new Set()));
    sockets.add(socket);
    socket.on("close", () => {
      sockets.delete(socket);
      if (sockets.size === 0) dashboards.delete(projectId);
    });
    socket.send(JSON.stringify({ type: "connected", projectId, timestamp: new Date().toISOString() }));
    return;
  }

  socket.send(JSON.stringify({ type: "connected", projectId, sessionId, timestamp: new Date().toISOString() }));
  socket.on("close", () => seenSessions.delete(sessionId));

  socket.on("message", async (raw) => {
    let message;
    try {
      message = JSON.parse(raw.toString());
    } catch {
      socket.send(JSON.stringify({ type: "error", message: "invalid JSON" }));
      return;
    }
    if (message.type === "auth") {
      // Any key is accepted, as the original did in its allow-anyway mode
      // (an unknown key was logged and the socket authenticated regardless).
      socket.send(JSON.stringify({ type: "auth_success" }));
      return;
    }
    const handler = handlers.get(message.type);
    if (!handler) return;
    try {
      const eventId = await handler(message, projectId, sessionId);
      socket.send(JSON.stringify({ type: "ack", eventId, messageType: message.type }));
    } catch (error) {
      socket.send(JSON.stringify({ type: "error", message: String(error) }));
    }
  });
});

wss.on("listening", () => console.log(`listening ${wss.address().port}`));

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    wss.close();
    redis.disconnect();
    process.exit(0);
  });
}
