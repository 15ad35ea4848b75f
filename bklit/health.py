"""``/healthz``: can this node accept and store events right now?

``HealthCheck`` looks every ``interval`` seconds (never per request, so a
flood of health checks costs nothing): Redis answers PING, ClickHouse
answers ``SELECT 1`` (only where the writer runs; an ingest node does not
store; the report names the host that answered, of those the ``clickhouse``
setting lists), and the stream's length and pending count are read for the report
and the metrics.  It also reads how Redis persists what it holds, which
Redis primary is in use (``redis_primary``: with Sentinel, the one of the
day) and the local spool's state.  ``bklit.status.HealthPage`` serves the
last result as JSON:

- ``ok`` (200): everything answers, nothing to warn about;
- ``degraded`` (200): events are accepted, but ``warnings`` says what is
  wrong: Redis persistence weaker than AOF with ``appendfsync always`` (or
  an evicting ``maxmemory-policy``), a stream longer than
  ``stream_max_length`` (ClickHouse behind), events going to the local
  spool, Redis (spool in use) or ClickHouse (stream in use) not answering;
- ``unavailable`` (503): this node cannot accept (or, for a writer, store)
  events now.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from bklit.clickhouse import thd_ping
from bklit.keys import GROUP, STREAM
from bklit.lifecycle import Periodic

log = Logger()


class HealthCheck(Periodic):
    """Periodic checks of Redis, ClickHouse and the stream (the first at start)."""

    def __init__(self, redis: Any, clock: Any, interval: float, metrics: Any, *,
                 clickhouse: Any = None, connections: Any = None, producer: Any = None,
                 stream_max_length: int = 1_000_000):
        super().__init__(interval, self._run, clock, name="health")
        self.redis = redis
        self.producer = producer
        self.stream_max_length = stream_max_length
        self.persistence = ""
        self.primary = ""
        self.metrics = metrics
        self.clickhouse = clickhouse  # the writer's ClickHousePool (None: not checked)
        self.connections = connections or (lambda: {})
        self.state: dict[str, Any] = {"status": "starting"}
        self.healthy = False

    def _run(self) -> defer.Deferred:
        return defer.ensureDeferred(self.check()).addErrback(
            lambda f: log.failure("health check failed", f))

    async def check(self) -> dict:
        """Run the checks once; returns (and keeps) the report."""
        redis = await self._redis()
        self._note_primary()
        clickhouse = await self._clickhouse()
        spool = self._spool()
        warnings = [redis[name] for name in ("persistence_warning", "backlog") if redis.get(name)]
        if spool.get("spooling"):
            warnings.append(f"events go to the local spool ({spool['bytes']} bytes) until Redis takes them")
        if spool.get("problem"):
            warnings.append(f"the local spool refuses events ({spool['problem']})")
        if self.producer is not None:
            # With a spool an ingest node accepts events while Redis is away, and
            # with Redis it accepts them while ClickHouse is (they wait in the stream).
            needs_spool = spool.get("spooling") or not redis["up"]
            healthy = redis["up"] if not spool else not (needs_spool and spool["problem"])
        else:  # a writer: it stores
            healthy = redis["up"] and clickhouse.get("up", True)
        if healthy and not redis["up"]:
            warnings.append("Redis does not answer")
        if healthy and clickhouse.get("up") is False:
            warnings.append("ClickHouse does not answer: events wait in the stream")
        status = "unavailable" if not healthy else "degraded" if warnings else "ok"
        self.metrics.up.labels("redis").set(int(redis["up"]))
        if "up" in clickhouse:
            self.metrics.up.labels("clickhouse").set(int(clickhouse["up"]))
        if status != self.state.get("status") and self.state.get("status") != "starting":
            # Back to ok is news, not a warning; degraded warns, unavailable is an error.
            level = {"ok": LogLevel.info, "degraded": LogLevel.warn}.get(status, LogLevel.error)
            log.emit(level, "health: {status}", status=status)
        self.healthy = healthy
        self.state = {
            "status": status,
            "checked_at": time.time(),
            "warnings": warnings,
            "redis": redis,
            "redis_primary": self.primary,
            "clickhouse": clickhouse,
            "connections": self.connections(),
        }
        if self.producer is not None:
            self.state["spool"] = spool
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
        self.metrics.backpressure.set(int(length > self.stream_max_length))
        report = {"up": True, "stream_length": length, "stream_pending": pending}
        if length > self.stream_max_length:
            report["backlog"] = (f"the stream holds {length} events, more than stream_max_length "
                                 f"({self.stream_max_length}): ClickHouse is behind")
        report.update(await self._persistence())
        return report

    def _note_primary(self) -> None:
        """Which Redis server takes the commands (after a Sentinel failover: the new primary)."""
        now = getattr(self.redis, "primary", "")
        if now and now != self.primary:
            if self.primary:
                log.warn("Redis primary is now {address} (was {previous})", address=now, previous=self.primary)
            else:
                log.info("Redis primary is {address}", address=now)
            self.primary = now
            self.metrics.redis_primary.clear()
            self.metrics.redis_primary.labels(now).set(1)

    async def _persistence(self) -> dict:
        """How Redis keeps what it holds; logged when first seen and when it changes."""
        try:
            values = [(await self.redis.call("CONFIG", "GET", name) or ["", ""])[1]
                      for name in ("appendonly", "appendfsync", "save", "maxmemory-policy")]
            name, risk = persistence(*values)
        except Exception as e:
            name, risk = "unknown", f"cannot read Redis persistence settings ({_short(e)}); check them by hand"
        if name != self.persistence:
            self.persistence = name
            if risk:
                log.warn("Redis persistence is {name}: {risk} (to change it without losing data: "
                         "CONFIG SET appendonly yes, wait for the rewrite, CONFIG SET appendfsync always, "
                         "CONFIG REWRITE; see the README)", name=name, risk=risk)
            else:
                log.info("Redis persistence is {name}: acked events survive a Redis crash", name=name)
        return {"persistence": name, "persistence_warning": risk} if risk else {"persistence": name}

    def _spool(self) -> dict:
        spool = self.producer.spool if self.producer is not None else None
        if spool is None:
            return {}
        return {"spooling": self.producer.spooling, "bytes": spool.size, "max_bytes": spool.max_bytes,
                "problem": spool.trouble}

    async def _clickhouse(self) -> dict:
        if self.clickhouse is None:
            return {"checked": False}
        try:
            host = await self.clickhouse.do(thd_ping)
        except Exception as e:
            return {"up": False, "error": _short(e)}
        return {"up": True, "host": host}


def persistence(appendonly: str, appendfsync: str, save: str, policy: str = "noeviction") -> tuple[str, str]:
    """Name Redis's persistence settings and say what they risk (empty: nothing)."""
    if policy not in ("noeviction", ""):
        return f"evicting ({policy})", "Redis may evict queued events and keys when full: use noeviction"
    if appendonly == "yes" and appendfsync == "always":
        return "aof-always", ""
    if appendonly == "yes" and appendfsync == "everysec":
        return "aof-everysec", "a crash of the Redis host can lose about the last second of acked events"
    if appendonly == "yes":
        return "aof-no", "a crash of the Redis host can lose acked events the kernel had not yet written"
    if save.strip():
        return "rdb", "a Redis crash loses the acked events queued since its last snapshot"
    return "none", "Redis keeps nothing on disk: a restart loses every queued event"


def _short(error: Exception) -> str:
    return (f"{type(error).__name__}: {error}".splitlines() or [""])[0][:200]
