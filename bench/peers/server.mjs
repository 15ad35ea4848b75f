// The comparison peer for bench/compare.py: a minimal reproduction, written
// for this benchmark, of the original product's WebSocket server hot path
// (Node `ws` + `ioredis`).  Per pageview/event message: JSON.parse, ZADD the
// session, LPUSH the event, PUBLISH a debug log line, broadcast to the
// project's dashboards, ack.  The three Redis commands are awaited one after
// the other per message, as the original did; that is the point of the
// comparison, so do not pipeline them here.
//
//     PORT=8081 REDIS_URL=redis://127.0.0.1:6379 node bench/peers/server.mjs [PORT]
//
// Prints "listening PORT" on stdout once it accepts connections.

import { randomUUID } from "node:crypto";
import Redis from "ioredis";
import { WebSocketServer } from "ws";

const port = Number(process.argv[2] || process.env.PORT || 8081);
const redis = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379");

// projectId -> Set of dashboard sockets
const dashboards = new Map();

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
    if (message.type !== "pageview" && message.type !== "event") return;
    const eventId = randomUUID();
    const event = { ...message.data, id: eventId, type: message.type, projectId, sessionId };
    try {
      await redis.zadd(`live:sessions:${projectId}`, Date.now(), sessionId);
      await redis.lpush("events", JSON.stringify(event));
      await redis.publish("debug", `[ws] ${message.type} ${eventId} project=${projectId} session=${sessionId}`);
    } catch (error) {
      socket.send(JSON.stringify({ type: "error", message: String(error) }));
      return;
    }
    const sockets = dashboards.get(projectId);
    if (sockets) {
      const payload = JSON.stringify({ type: "live_event", event });
      for (const dashboard of sockets) dashboard.send(payload);
    }
    socket.send(JSON.stringify({ type: "ack", eventId, messageType: message.type }));
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
