"""Live sessions: this node's share of them, its heartbeat, and the sweeper.

A session (project, session id) is live while at least one socket that sent
one of its pageviews is open.  The state lives in Redis (see ``batch.lua``);
this module keeps only what the node itself must do:

- ``attach``/``detach`` count the local sockets of each session, so the
  heartbeat knows what to refresh;
- every ``heartbeat_interval`` the scores of all local live sessions are
  refreshed in one batch (one round trip);
- every ``sweep_interval`` one node at a time (under a Redis lock) ends the
  sessions whose score is older than ``session_timeout``: their node died
  without closing them.  They end with reason ``timeout``, stored and
  broadcast like any other end.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from bklit.lifecycle import Periodic
from bklit.live import session_end_message
from bklit.metrics import Metrics
from bklit import keys
from bklit.queue import StreamProducer
from bklit.redis_client import RedisService

SWEEP_BATCH = 500


class LiveSessions(MultiService):
    """Heartbeat and sweeper loops (child timers), and the session operations they share."""

    log = Logger()

    def __init__(self, redis: RedisService, producer: StreamProducer, clock: Any, node: str, *,
                 heartbeat_interval: float, session_timeout: float, sweep_interval: float,
                 metrics: Metrics):
        super().__init__()
        self.redis = redis
        self.producer = producer
        self.clock = clock
        self.node = node
        self.heartbeat_interval = heartbeat_interval
        self.session_timeout = session_timeout
        self.sweep_interval = sweep_interval
        self.local: dict[tuple[str, str], int] = {}
        self.metrics = metrics
        self.ended = 0
        for name, interval, step in (("heartbeat", heartbeat_interval, self.heartbeat),
                                     ("sweeper", sweep_interval, self.sweep)):
            Periodic(interval, partial(self._guarded, step), clock, now=False, name=name).setServiceParent(self)

    def _guarded(self, step: Any) -> defer.Deferred:
        d = defer.ensureDeferred(step())
        return d.addErrback(lambda f: self.log.warn("{step} failed: {error}", step=step.__name__,
                                                    error=f.getErrorMessage()))

    def now_ms(self) -> int:
        """The clock in milliseconds."""
        return int(self.clock.seconds() * 1000)

    # This node's sockets -----------------------------------------------------

    def attach(self, project: str, session: str) -> None:
        """A local socket joined the session (its first accepted pageview)."""
        self.local[(project, session)] = self.local.get((project, session), 0) + 1

    def detach(self, project: str, session: str, socket: str) -> defer.Deferred:
        """A local socket of the session closed: end the session if it was the last.

        Fires with True when the session ended.
        """
        key = (project, session)
        left = self.local.get(key, 1) - 1
        if left > 0:
            self.local[key] = left
        else:
            self.local.pop(key, None)
        return self.end(project, session, socket, "disconnect")

    def end(self, project: str, session: str, socket: str, reason: str,
            ended_ms: int | None = None) -> defer.Deferred:
        """End a session (for one socket, or ``socket=""`` whatever is open)."""
        now = self.now_ms()
        message = session_end_message(session, reason, time.time())
        d = self.producer.end_session(project, session, socket, now, ended_ms or now, reason, message)
        return d.addCallback(self._count, reason)

    def _count(self, ended: bool, reason: str) -> bool:
        if ended:
            self.ended += 1
            self.metrics.sessions_ended.labels(reason).inc()
        return ended

    # Loops -----------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Refresh the score of every local live session, in one batch."""
        now = self.now_ms()
        beats = [self.producer.heartbeat(p, s, now) for p, s in self.local]
        if beats:
            await defer.gatherResults(beats, consumeErrors=True)

    async def sweep(self) -> int:
        """End sessions nobody refreshed for ``session_timeout``, if we hold the lock."""
        lock_ms = str(max(1, int(self.sweep_interval * 1000 * 0.9)))
        if await self.redis.call("SET", keys.SWEEP_LOCK, self.node, "NX", "PX", lock_ms) is None:
            return 0
        cutoff = self.now_ms() - int(self.session_timeout * 1000)
        ended = []
        cursor = "0"
        while True:
            cursor, projects = await self.redis.call("SSCAN", keys.LIVE_PROJECTS, cursor, "COUNT", "100")
            for project in projects:
                for live in (keys.live_sessions(project), keys.live_bots(project)):
                    stale = await self.redis.call("ZRANGEBYSCORE", live, "-inf", str(cutoff),
                                                  "WITHSCORES", "LIMIT", "0", str(SWEEP_BATCH))
                    for session, score in zip(stale[::2], stale[1::2]):
                        ended.append(self.end(project, session, "", "timeout", int(float(score))))
            if cursor == "0":
                break
        results = await defer.gatherResults(ended) if ended else []
        count = sum(1 for r in results if r)
        if count:
            self.log.info("ended {count} sessions whose node stopped refreshing them", count=count)
        return count

    # Reads (dashboards, /api/live) -----------------------------------------------
    # Bots (bot_policy = mark) are live apart: they are not in these counts.

    async def live_count(self, project: str) -> int:
        """How many sessions of people the project has live now."""
        return int(await self.redis.call("ZCARD", keys.live_sessions(project)))

    async def bots_count(self, project: str) -> int:
        """How many sessions of bots the project has live now."""
        return int(await self.redis.call("ZCARD", keys.live_bots(project)))

    async def snapshot(self, project: str, limit: int = 200) -> tuple[int, list[dict]]:
        """The live count and the most recently active sessions of people, newest first."""
        count = await self.live_count(project)
        ids = await self.redis.call("ZREVRANGE", keys.live_sessions(project), "0", str(limit - 1))
        states = await defer.gatherResults([
            self.redis.call("HMGET", keys.session_state(project, s), "started_at", "pageviews", "entry_page",
                            "exit_page")
            for s in ids])
        sessions = []
        for session, (started, pageviews, entry, exit_page) in zip(ids, states):
            if started is None:
                continue
            sessions.append({"sessionId": session, "startedAt": int(started), "pageviews": int(pageviews or 0),
                             "entryPage": entry or "", "exitPage": exit_page or ""})
        return count, sessions
