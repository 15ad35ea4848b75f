"""The Redis side of every accepted event, one round trip per reactor turn.

``StreamProducer`` gathers the operations of one reactor turn (events,
pageviews with their session bookkeeping, session ends, heartbeats) and
applies them with a single call of ``batch.lua``: one round trip and one
reply for the whole turn instead of one command per event.  Each operation's
Deferred fires once Redis has replied, so an ack sent from it promises that
the event is durably queued.

Each stream entry holds one field ``e``: the JSON of a record,
``{"table": <ClickHouse table>, "row": {column: value}}``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from bklit.redis_client import RedisService, RedisUnavailable

STREAM = "bklit:events"
DEAD_STREAM = "bklit:events:dead"
GROUP = "bklit-writers"
LIVE_PROJECTS = "bklit:projects:live"
SESSION_CHANGES = ("", "started", "resumed")

BATCH_SCRIPT = resources.files("bklit").joinpath("batch.lua").read_text(encoding="utf-8")


def live_key(project: str) -> str:
    """The zset of a project's live sessions (score: last heartbeat, ms)."""
    return f"live:sessions:{project}"


def state_key(project: str, session: str) -> str:
    """The hash holding a session's state, kept for resuming."""
    return f"bklit:session:{project}:{session}"


def channel(project: str) -> str:
    """The pub/sub channel of a project's live events."""
    return f"bklit:live:{project}"


class StreamProducer:
    """Applies operations to Redis in per-turn batches, in the order given.

    ``max_batch`` bounds the operations of one script call; a larger turn is
    split into several calls, still sent in order.
    """

    log = Logger()

    def __init__(self, redis: RedisService, clock: Any, resume_window: float = 1800.0,
                 max_batch: int = 2000):
        self.redis = redis
        self.clock = clock
        self.resume_ms = str(int(resume_window * 1000))
        self.max_batch = max_batch
        self._pending: list[tuple[list[str], defer.Deferred]] = []
        self._scheduled: Any = None
        self._inflight: set[defer.Deferred] = set()

    def _add(self, op: list[str]) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._pending.append((op, d))
        if self._scheduled is None:
            self._scheduled = self.clock.callLater(0, self.flush)
        return d

    def enqueue(self, entry: str, channel: str = "", message: str = "") -> defer.Deferred:
        """Append a stream entry (and publish ``message``); fires with its stream id."""
        return self._add(["E", entry, channel, message])

    def pageview(self, entry: str, project: str, session: str, socket: str, now_ms: int,
                 url: str, head: str, tail: str, user_agent: str = "", country: str = "",
                 country_code: str = "", city: str = "") -> defer.Deferred:
        """Append a pageview and start, continue or resume its session.

        The broadcast is ``head + "true"|"false" + tail``: whether this
        pageview started the session is only known inside Redis.  Fires with
        ``(stream id, change)``, change being ``"started"``, ``"resumed"`` or
        ``""``.
        """
        d = self._add(["P", entry, channel(project), head, tail, project, session, socket,
                       str(now_ms), url, user_agent, country, country_code, city])
        return d.addCallback(lambda reply: (reply[0], SESSION_CHANGES[int(reply[1])]))

    def end_session(self, project: str, session: str, socket: str, now_ms: int, ended_ms: int,
                    reason: str, message: str) -> defer.Deferred:
        """Detach ``socket`` from a session and end it when none is left.

        ``socket=""`` ends it whatever sockets remain (the sweeper, an admin).
        Fires with True when the session ended (stored and broadcast).
        """
        d = self._add(["X", project, session, socket, str(now_ms), str(ended_ms), reason,
                       channel(project), message])
        return d.addCallback(lambda ended: ended == 1)

    def heartbeat(self, project: str, session: str, now_ms: int) -> defer.Deferred:
        """Refresh a live session's score (only if it is still live)."""
        return self._add(["H", project, session, str(now_ms)])

    def flush(self) -> None:
        """Send everything gathered so far (runs once per reactor turn)."""
        self._scheduled = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            batch = pending[start:start + self.max_batch]
            args = [self.resume_ms]
            for op, _ in batch:
                args.extend(op)
            sent = self.redis.eval(BATCH_SCRIPT, [STREAM], args)
            self._inflight.add(sent)
            sent.addBoth(self._settle, sent, [d for _, d in batch])

    def _settle(self, outcome: Any, sent: defer.Deferred, waiters: list[defer.Deferred]) -> None:
        self._inflight.discard(sent)
        if isinstance(outcome, Failure) or len(outcome) != len(waiters):
            reason = outcome.getErrorMessage() if isinstance(outcome, Failure) else "short reply"
            error = RedisUnavailable(reason)
            for d in waiters:
                d.errback(error)
            return
        for d, result in zip(waiters, outcome):
            d.callback(result)

    async def drain(self) -> None:
        """Wait until every operation given so far has been answered."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self.flush()
        while self._inflight:
            await defer.DeferredList(list(self._inflight), consumeErrors=True)
