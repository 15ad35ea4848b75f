"""The Redis side of every accepted event, one round trip per reactor turn.

``StreamProducer`` gathers the operations of one reactor turn (events,
pageviews with their session bookkeeping, session ends, heartbeats) and
applies them with a single call of ``batch.lua``: one round trip and one
reply for the whole turn instead of one command per event.  Each operation's
receipt (a Deferred, or the SDK endpoint's lighter one) is answered once
Redis has replied, so an ack sent from it promises that the event is
durably queued.

Each stream entry holds one field ``e``: the JSON of a record,
``{"table": <ClickHouse table>, "row": {column: value}}``.

The operations are built by ``bklit.ops`` (one script argument each); the
spool is replayed by ``bklit.replay``.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from bklit import keys
from bklit.ops import (BATCH_SCRIPT, OPERATIONS, REFUSED, SCRIPT_KEYS, OperationRefused, end_op, event_op,
                       heartbeat_op, pack, script_args, unpack)
from bklit.redis_client import RedisService, RedisUnavailable
from bklit.replay import Replayer
from bklit.spool import Spool

SPOOLED = {"E": "spooled", "P": ["spooled", "0"], "X": 0}  # a spooled operation's reply
# Error replies after which a batch is spooled (Redis did not apply it, and may later).
TRANSIENT_ERRORS = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "CLUSTERDOWN")

Batch = list[tuple[str, Any]]  # (operation, receipt): see StreamProducer.submit


class Refusals:
    """Logs operations Redis refused at most once a minute, with how many there were."""

    interval = 60.0

    def __init__(self, log: Logger, clock: Any):
        self.log = log
        self.clock = clock
        self.count = 0
        self.last = -self.interval

    def note(self, reason: str) -> None:
        self.count += 1
        now = self.clock.seconds()
        if now - self.last >= self.interval:
            self.log.error("Redis refused {count} operations (the rest of their batches were applied); "
                           "last: {reason}", count=self.count, reason=reason)
            self.last, self.count = now, 0


class StreamProducer:
    """Applies operations to Redis in per-turn batches, in the order given.

    ``max_batch`` bounds the operations of one script call; a larger turn is
    split into several calls, still sent in order.

    With a ``spool``, a batch Redis cannot take (down, too slow, out of
    memory) is appended to it instead and its operations succeed once on
    disk; from then on everything goes to the spool, in order, while a
    replayer moves the spool into Redis, oldest first.  Once the spool is
    empty, batches go to Redis directly again.  Heartbeats are never
    spooled: they only refresh the scores of live sessions, in any order,
    so while spooling they still go to Redis on their own (and fail while
    it is away), keeping the sweeper off this node's sessions during a
    long replay.

    Every batch then starts with its number (``S``, growing): Redis keeps
    the last number it applied from this spool and skips a batch numbered
    at or below it.  A batch whose reply was lost (a timeout, a dropped
    connection) may have been applied; spooled with its number, its replay
    is skipped if so.  A replay cut short by a crash is skipped the same
    way for what it did.  A batch Redis refused with an error was not
    applied: it is spooled with a new number.

    With ``min_replicas``, a batch's operations succeed only once ``WAIT``
    says that many replicas have it (one ``WAIT`` after each batch, and
    after each replayed call); a batch they did not confirm within
    ``replica_timeout`` is spooled with its number, like one whose reply
    was lost, so an ack survives the loss of the primary.
    """

    log = Logger()

    def __init__(self, redis: RedisService, clock: Any, resume_window: float = 1800.0,
                 max_batch: int = 2000, spool: Spool | None = None, metrics: Any = None,
                 min_replicas: int = 0, replica_timeout: float = 1.0):
        self.redis = redis
        self.clock = clock
        self.resume_ms = int(resume_window * 1000)
        self.max_batch = max_batch
        self.spool = spool
        self.applied_key = keys.applied(spool.id) if spool is not None else ""
        self.metrics = metrics
        self.min_replicas = min_replicas
        self.replica_timeout_ms = max(1, int(replica_timeout * 1000))
        self._number = 0
        self.spooling = False
        self._refusing = False
        self._refusals = Refusals(self.log, clock)
        self._pending: Batch = []
        self._scheduled: Any = None
        self._inflight: set[defer.Deferred] = set()
        self._barrier: set[defer.Deferred] = set()
        self._held: list[Batch] = []
        self.replayer = None if spool is None else Replayer(
            spool, redis, clock, self._run, self._caught_up, self._count_refused,
            (lambda: self._replicated(None)) if min_replicas else (lambda: None), metrics)

    def start(self) -> None:
        """Replay what an earlier run left in the spool."""
        if self.spool is None:
            return
        self.spool.start()
        if not self.spool.empty:
            self.log.info("spool: {size} bytes left by an earlier run; replaying them into Redis",
                          size=self.spool.size)
            self._begin_spooling()
            self.replayer.soon()

    def submit(self, op: str, receipt: Any) -> None:
        """Queue a packed operation for this turn's batch.

        Once Redis replied (or the spool has it), ``receipt.callback(reply)``
        is called, or ``receipt.errback(exception)``: ``OperationRefused``
        when Redis refused it alone, ``RedisUnavailable`` when its batch
        could be neither stored nor spooled.  A Deferred is a receipt; the
        SDK endpoint passes a lighter one per event.
        """
        self._pending.append((op, receipt))
        if self._scheduled is None:
            self._scheduled = self.clock.callLater(0, self.flush)

    def apply(self, op: str) -> defer.Deferred:
        """Queue a packed operation; fires with its reply (see ``submit``)."""
        d: defer.Deferred = defer.Deferred()
        self.submit(op, d)
        return d

    def enqueue(self, entry: str, channel: str = "", message: str = "") -> defer.Deferred:
        """Append a stream entry (and publish ``message``); fires with its stream id."""
        return self.apply(event_op(entry, channel, message))

    def end_session(self, project: str, session: str, socket: str, now_ms: int, ended_ms: int,
                    reason: str, message: str) -> defer.Deferred:
        """Detach ``socket`` from a session and end it when none is left.

        ``socket=""`` ends it whatever sockets remain (the sweeper, an admin).
        Fires with True when the session ended (stored and broadcast; False
        when spooled, as that is decided at replay).
        """
        d = self.apply(end_op(project, session, socket, now_ms, ended_ms, reason, message))
        return d.addCallback(lambda ended: ended == 1)

    def heartbeat(self, project: str, session: str, now_ms: int) -> defer.Deferred:
        """Refresh a live session's score (only if it is still live)."""
        return self.apply(heartbeat_op(project, session, now_ms))

    def flush(self) -> None:
        """Send everything gathered so far (runs once per reactor turn)."""
        self._scheduled = None
        pending, self._pending = self._pending, []
        if self.spooling:
            beats = [item for item in pending if item[0][0] == "H"]
            if beats:
                self._send_beats(beats)
                pending = [item for item in pending if item[0][0] != "H"]
        for start in range(0, len(pending), self.max_batch):
            batch = pending[start:start + self.max_batch]
            if not self.spooling:
                self._send(batch)
            elif self._barrier:  # batches sent before spooling began go first
                self._held.append(batch)
            else:
                self._append(batch)

    def _run(self, ops: Any) -> defer.Deferred:
        """One call of the batch script with ``ops``; fires with its reply, one entry per operation."""
        return self.redis.eval(BATCH_SCRIPT, SCRIPT_KEYS, script_args(self.resume_ms, ops))

    def _send(self, batch: Batch) -> None:
        number = self._number_op() if self.spool is not None else None
        ops = [op for op, _ in batch]
        sent = self._run([number, *ops] if number else ops)
        if self.min_replicas:
            sent.addCallback(self._replicated)
        self._inflight.add(sent)
        sent.addBoth(self._settle, sent, batch, number)

    def _replicated(self, reply: Any) -> defer.Deferred:
        """The script's reply, once ``min_replicas`` replicas confirmed the batch (one WAIT).

        Not confirmed in time, or WAIT failing, counts as a lost reply: the
        batch is spooled with its number, so a replay skips it where Redis
        has it and applies it where it is missing (a promoted replica).
        """
        d = self.redis.call("WAIT", str(self.min_replicas), str(self.replica_timeout_ms))
        return d.addCallbacks(self._confirmed, self._not_confirmed, (reply,))

    def _confirmed(self, count: Any, reply: Any) -> Any:
        if int(count) < self.min_replicas:
            raise RedisUnavailable(f"{count} of {self.min_replicas} replicas confirmed a batch "
                                   f"within {self.replica_timeout_ms} ms")
        return reply

    def _not_confirmed(self, failure: Failure) -> None:
        raise RedisUnavailable(f"WAIT for replicas: {failure.getErrorMessage()}")

    def _send_beats(self, beats: Batch) -> None:
        """Heartbeats straight to Redis while spooling (unnumbered: applying one twice is harmless)."""
        sent = self._run([op for op, _ in beats])
        sent.addCallbacks(self._answer, self._not_beaten, (beats,), None, (beats,))

    def _answer(self, replies: list, batch: Batch) -> None:
        """Answer each operation's receipt with its reply, or with ``OperationRefused``.

        A receipt that raises is logged and does not keep the others of
        its batch from their answers.
        """
        for (op, receipt), reply in zip(batch, replies):
            try:
                if isinstance(reply, str) and reply.startswith(REFUSED):
                    self._count_refused(op, reply[1:])
                    receipt.errback(OperationRefused(reply[1:]))
                else:
                    receipt.callback(reply)
            except Exception:
                self.log.failure("answering a stored operation failed")

    def _count_refused(self, op: str | list[str], reason: str) -> None:
        if self.metrics is not None:
            self.metrics.operations_refused.labels(OPERATIONS.get(op[0], op[0])).inc()
        self._refusals.note(reason)

    def _not_beaten(self, failure: Failure, beats: Batch) -> None:
        for _, d in beats:
            d.errback(failure.value)

    def _number_op(self) -> str:
        """A batch's first operation: its number, above every earlier one (also across restarts)."""
        self._number = max(self._number + 1, time.time_ns() // 1000)
        return pack("S", self.applied_key, str(self._number))

    def _settle(self, outcome: Any, sent: defer.Deferred, batch: Batch, number: str | None) -> None:
        self._inflight.discard(sent)
        self._barrier.discard(sent)
        if isinstance(outcome, Failure):
            self._failed(outcome, batch, number)
        elif number is not None and outcome[:1] != [1]:
            self._refuse(batch, "Redis had applied a later batch of this node (two nodes on one spool?)")
        elif len(outcome) - (number is not None) != len(batch):
            self._refuse(batch, "short reply")
        else:
            if self._refusing:
                self._refusing = False
                self.log.info("Redis takes events again")
            self._answer(outcome[number is not None:], batch)
        if self._held and not self._barrier:
            held, self._held = self._held, []
            for batch in held:
                self._append(batch)

    def _failed(self, failure: Failure, batch: Batch, number: str | None) -> None:
        """Spool a batch Redis could not take (or refuse it: no spool, or an error that will stay)."""
        reason = failure.getErrorMessage()
        lost_reply = failure.check(RedisUnavailable) is not None
        if self.spool is None or not (lost_reply or reason.split(" ", 1)[0] in TRANSIENT_ERRORS):
            self._refuse(batch, reason)
            return
        if not self.spooling:
            self._begin_spooling(reason)
        self._append(batch, number if lost_reply else None)
        self.replayer.soon()

    def _refuse(self, batch: Batch, reason: str) -> None:
        """Fail a batch's operations (overloaded); logged once until Redis takes events again."""
        if not self._refusing:
            self._refusing = True
            self.log.error("Redis cannot take events ({reason}): refusing them as overloaded", reason=reason)
        error = RedisUnavailable(reason)
        for _, d in batch:
            d.errback(error)

    # The spool -------------------------------------------------------------------

    def _begin_spooling(self, reason: str = "") -> None:
        """Send to the spool from now on (batches still out at Redis go first)."""
        self.spooling = True
        self._barrier = set(self._inflight)
        if reason:
            self.log.warn("Redis cannot take events ({reason}): spooling them to {directory} until it can",
                          reason=reason, directory=str(self.spool.directory))

    def _caught_up(self) -> bool:
        """The spool is empty: send to Redis directly again, unless batches sent before spooling are out."""
        if self._held or self._barrier:
            return False
        self.spooling = False
        return True

    def _append(self, batch: Batch, number: str | None = None) -> None:
        """Write a batch (behind its number) to the spool; its operations succeed once it is on disk."""
        kept = []
        for op, d in batch:
            if op[0] == "H":
                d.callback(0)
            else:
                kept.append((op, d))
        if not kept:
            return
        written = self.spool.append([unpack(number or self._number_op()), *(unpack(op) for op, _ in kept)])
        written.addCallbacks(self._spooled, self._not_spooled, (kept,), None, (kept,))

    def _spooled(self, _: None, kept: Batch) -> None:
        if self.metrics is not None:
            self.metrics.spool_operations.labels("written").inc(len(kept))
        for op, d in kept:
            d.callback(SPOOLED[op[0]])

    def _not_spooled(self, failure: Failure, kept: Batch) -> None:
        for _, d in kept:
            d.errback(failure.value)

    async def drain(self) -> None:
        """Wait until every operation given so far has been answered or spooled.

        Then the replayer stops after its current batch, and the spool is
        closed; what is left in it is replayed at the next start.
        """
        if self._scheduled is not None:
            self._scheduled.cancel()
            self.flush()
        while self._inflight:
            await defer.DeferredList(list(self._inflight), consumeErrors=True)
        if self.replayer is not None:
            await self.replayer.stop()
        if self.spool is not None:
            await self.spool.close()
            if not self.spool.empty:
                self.log.info("spool: {size} bytes are left to replay at the next start", size=self.spool.size)
