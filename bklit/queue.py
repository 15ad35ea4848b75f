"""The Redis stream every accepted event goes through on its way to ClickHouse.

``StreamProducer.enqueue`` gathers the entries of one reactor turn and appends
them with a single Lua script call (one round trip and one reply for the
whole batch, instead of one command per event), then fires each entry's
Deferred with its stream id.  An entry's Deferred fires only once Redis has
replied, so the ack sent from it promises the event is durably queued.

Each stream entry holds one field ``e``: the JSON of a record,
``{"table": <ClickHouse table>, "row": {column: value}}``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from bklit.redis_client import RedisService, RedisUnavailable

STREAM = "bklit:events"
DEAD_STREAM = "bklit:events:dead"
GROUP = "bklit-writers"

XADD_ALL = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
return ids
"""


class StreamProducer:
    """Appends entries to the stream in per-turn batches.

    ``max_batch`` bounds one script call; a larger turn is split.
    """

    log = Logger()

    def __init__(self, redis: RedisService, clock: Any, max_batch: int = 2000):
        self.redis = redis
        self.clock = clock
        self.max_batch = max_batch
        self._pending: list[tuple[str, defer.Deferred]] = []
        self._scheduled: Any = None

    def enqueue(self, entry: str) -> defer.Deferred:
        """Queue one entry; fires with its stream id once Redis stored it.

        Fails with ``RedisUnavailable`` when Redis cannot take it.
        """
        d: defer.Deferred = defer.Deferred()
        self._pending.append((entry, d))
        if self._scheduled is None:
            self._scheduled = self.clock.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """Send everything gathered so far (runs once per reactor turn)."""
        self._scheduled = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            batch = pending[start:start + self.max_batch]
            sent = self.redis.eval(XADD_ALL, [STREAM], [entry for entry, _ in batch])
            sent.addBoth(self._settle, [d for _, d in batch])

    def _settle(self, outcome: Any, waiters: list[defer.Deferred]) -> None:
        if isinstance(outcome, Failure) or len(outcome) != len(waiters):
            reason = outcome.getErrorMessage() if isinstance(outcome, Failure) else "short reply"
            error = RedisUnavailable(reason)
            for d in waiters:
                d.errback(error)
            return
        for d, stream_id in zip(waiters, outcome):
            d.callback(stream_id)
