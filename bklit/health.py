"""``/healthz``: can this node accept and store events right now?

``HealthCheck`` looks every ``interval`` seconds (never per request, so a
flood of health checks costs nothing): Redis answers PING, ClickHouse
answers ``SELECT 1`` (only where the writer runs; an ingest node does not
store), and the stream's length and pending count are read for the report
and the metrics.  ``HealthPage`` serves the last result: 200 when healthy,
503 otherwise, with the details as JSON.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource

from bklit.queue import GROUP, STREAM

log = Logger()


class HealthCheck(Service):
    """Periodic checks of Redis, ClickHouse and the stream."""

    def __init__(self, redis: Any, clock: Any, interval: float, metrics: Any, *,
                 writer: Any = None, connections: Any = None):
        self.redis = redis
        self.clock = clock
        self.metrics = metrics
        self.writer = writer
        self.connections = connections or (lambda: {})
        self.loop = task.LoopingCall(self._run)
        self.loop.clock = clock
        self.interval = interval
        self.state: dict[str, Any] = {"status": "starting"}
        self.healthy = False

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def _run(self) -> defer.Deferred:
        return defer.ensureDeferred(self.check()).addErrback(
            lambda f: log.failure("health check failed", f))

    async def check(self) -> dict:
        """Run the checks once; returns (and keeps) the report."""
        redis = await self._redis()
        clickhouse = await self._clickhouse()
        healthy = redis["up"] and clickhouse.get("up", True)
        self.metrics.up.labels("redis").set(int(redis["up"]))
        if "up" in clickhouse:
            self.metrics.up.labels("clickhouse").set(int(clickhouse["up"]))
        if healthy != self.healthy and self.state.get("status") != "starting":
            log.warn("health: {status}", status="ok" if healthy else "unavailable")
        self.healthy = healthy
        self.state = {
            "status": "ok" if healthy else "unavailable",
            "checked_at": time.time(),
            "redis": redis,
            "clickhouse": clickhouse,
            "connections": self.connections(),
        }
        return self.state

    async def _redis(self) -> dict:
        try:
            await self.redis.call("PING")
            length = int(await self.redis.call("XLEN", STREAM))
            try:
                pending = int((await self.redis.call("XPENDING", STREAM, GROUP))[0])
            except Exception:  # no group yet
                pending = 0
        except Exception as e:
            return {"up": False, "error": _short(e)}
        self.metrics.stream_length.set(length)
        self.metrics.stream_pending.set(pending)
        return {"up": True, "stream_length": length, "stream_pending": pending}

    async def _clickhouse(self) -> dict:
        if self.writer is None:
            return {"checked": False}
        try:
            await deferToThreadPool(self.writer.reactor, self.writer.pool, self.writer.inserter.thd_ping)
        except Exception as e:
            return {"up": False, "error": _short(e)}
        return {"up": True}


def _short(error: Exception) -> str:
    return (f"{type(error).__name__}: {error}".splitlines() or [""])[0][:200]


class HealthPage(Resource):
    """``GET /healthz``: the last report, 200 when healthy, 503 when not."""

    isLeaf = True

    def __init__(self, health: HealthCheck):
        super().__init__()
        self.health = health

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(200 if self.health.healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.health.state, separators=(",", ":")).encode()
