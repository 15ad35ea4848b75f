"""Moving a spool into Redis: the ingest node's way back from an outage.

While Redis cannot take events, ``bklit.queue.StreamProducer`` appends
its batches to the spool (``bklit.spool``), each behind its number.  The
``Replayer`` reads the spool back, oldest segment first, whole batches a
call of ``batch.lua``; Redis skips a batch whose number it has applied
already, so a replay cut short (a crash, a lost reply) is safe to repeat.
A segment is removed once replayed; when none is left, the producer sends
to Redis directly again.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from bklit.keys import DEAD_STREAM
from bklit.ops import REFUSED, pack
from bklit.spool import Spool, SpoolError

REPLAY_BATCH = 500
REPLAY_RETRY = (0.1, 2.0)  # seconds between replay attempts while Redis cannot take them


class Replayer:
    """Replays ``spool`` through ``run`` (one script call, fires with its replies).

    ``caught_up()`` is asked once the spool is empty: True ends the replay
    (the producer stops spooling), False means batches sent before
    spooling began are still out, and the replayer looks again shortly.
    ``confirm()`` waits for the replicas a replayed call needs (None: none
    needed); ``refused(op, reason)`` counts an operation Redis refused.
    """

    log = Logger()

    def __init__(self, spool: Spool, redis: Any, clock: Any, run: Callable[[list[str]], defer.Deferred],
                 caught_up: Callable[[], bool], refused: Callable[[list[str], str], None],
                 confirm: Callable[[], defer.Deferred | None] = lambda: None, metrics: Any = None):
        self.spool = spool
        self.redis = redis
        self.clock = clock
        self.run = run
        self.caught_up = caught_up
        self.refused = refused
        self.confirm = confirm
        self.metrics = metrics
        self._running: defer.Deferred | None = None
        self._nap: defer.Deferred | None = None
        self._stopped = False

    def soon(self) -> None:
        """Start replaying unless it runs (or the replayer was stopped)."""
        if self._running is None and not self._stopped:
            # _replay may finish at once (nothing was spooled): only then may _finished clear it.
            self._running = defer.ensureDeferred(self._replay())
            self._running.addBoth(self._finished)

    async def stop(self) -> None:
        """Stop after the batch in progress; what is left is replayed at the next start."""
        self._stopped = True
        if self._nap is not None:
            self._nap.cancel()
        if self._running is not None:
            await self._running

    def _finished(self, outcome: Any) -> None:
        self._running = None
        if isinstance(outcome, Failure):
            self.log.failure("spool: the replayer stopped", outcome)

    async def _replay(self) -> None:
        """Move the spool into Redis, oldest segment first, until ``caught_up``."""
        delay, trouble = REPLAY_RETRY[0], ""
        try:
            while not self._stopped:
                name = self.spool.oldest()
                if name is None:
                    if self.caught_up():
                        self.log.info("spool replayed: sending to Redis directly again")
                        break
                    await self._sleep(REPLAY_RETRY[0])  # batches sent before spooling are still out
                    continue
                try:
                    await self._replay_segment(name)
                    delay, trouble = REPLAY_RETRY[0], ""
                except SpoolError as e:
                    self.log.error("spool: {error}; moved aside as {damaged}, its other events are not replayed",
                                   error=str(e), damaged=self.spool.quarantine(name))
                except Exception as e:
                    if str(e) != trouble:
                        trouble = str(e)
                        self.log.warn("spool: replay waits for Redis: {error}", error=trouble)
                    await self._sleep(delay)
                    delay = min(delay * 2, REPLAY_RETRY[1])
        except defer.CancelledError:  # stop() cut a pause short
            pass

    def _sleep(self, seconds: float) -> defer.Deferred:
        self._nap = task.deferLater(self.clock, seconds, lambda: None)
        return self._nap.addBoth(self._woke)

    def _woke(self, result: Any) -> Any:
        self._nap = None
        return result

    async def _replay_segment(self, name: str) -> None:
        """Replay one segment, whole batches a call, then remove it."""
        offset = 0
        while not self._stopped:
            ops, end = await self.spool.read_later(name, offset, REPLAY_BATCH, lambda op: op[0] == "S")
            if not ops:
                if self.spool.sizes.get(name, 0) > offset:
                    continue  # appended to while it was read
                # Removed, and spooling ended by caught_up, in this reactor step: nothing slips in between.
                self.spool.remove(name)
                return
            replies = await self.run([pack(*op) for op in ops])
            refused = [(op, reply[1:]) for op, reply in zip(ops, replies)
                       if isinstance(reply, str) and reply.startswith(REFUSED)]
            if refused:
                await self._dead_letter(refused)
            confirmed = self.confirm()  # replicas have it before it leaves the spool
            if confirmed is not None:
                await confirmed
            offset = end
            if self.metrics is not None:
                self.metrics.spool_operations.labels("replayed").inc(sum(op[0] != "S" for op in ops))

    async def _dead_letter(self, refused: list[tuple[list[str], str]]) -> None:
        """Keep the records of spooled events Redis refused at replay in the dead letters.

        They were acked when spooled, so they are not dropped: ``bklit
        events retry-dead`` moves them back into the stream once the cause
        is fixed.  Session ends and heartbeats carry no record.
        """
        for op, reason in refused:
            self.refused(op, reason)
            if op[0] in ("E", "P"):
                await self.redis.call("XADD", DEAD_STREAM, "*", "e", op[1], "error", f"Redis: {reason}", "id", "")
