"""The writer: moves the Redis stream into ClickHouse in batches.

A timer (``bklit.lifecycle.Periodic``) runs ``write_once``: read up to ``batch_size`` entries with
XREADGROUP (group ``bklit-writers``, a consumer name unique to this process),
insert them with clickhouse-driver in the ClickHouse pool's threads
(``ClickHousePool``, which the daemon owns and stops after the writer), and only then
acknowledge and delete them from the stream.  A full batch loops again at
once.  When an insert fails for a passing reason (ClickHouse down, network)
nothing is acknowledged: the entries stay pending and are retried, with a
capped backoff, before any new entry is read, so order is kept.  Rows that
ClickHouse refuses are found by splitting the batch and go to the dead-letter
stream with the error; the rest is stored.  Entries left pending by a dead
consumer are taken over with XAUTOCLAIM once they have been idle for
``claim_idle`` seconds; its own, after a failed run or a new Redis
connection (a failover or restart may have lost its acks), are read again at
once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import orjson

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from bklit import schema
from bklit.clickhouse import ClickHousePool, Inserter, is_data_error
from bklit.lifecycle import Periodic
from bklit.metrics import Metrics
from bklit.keys import DEAD_STREAM, GROUP, STREAM
from bklit.redis_client import RedisService, RedisUnavailable

ACK_AND_DELETE = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"""

MAX_BACKOFF = 30.0


def consumer_name() -> str:
    """A consumer name unique to this process: host, pid and start time."""
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


def decode_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """``[(id, fields)]`` from an XREADGROUP or XAUTOCLAIM entry list.

    Entries deleted while pending come back as ``None`` and are skipped.
    """
    entries = []
    for item in reply or ():
        if not item or item[1] is None:
            continue
        entry_id, flat = item
        entries.append((entry_id, dict(zip(flat[::2], flat[1::2]))))
    return entries


def _loads(raw: str) -> Any:
    """An entry's JSON (orjson, C); a broken one is read again by the standard library for its
    error message, which the dead letters keep."""
    try:
        return orjson.loads(raw)
    except ValueError:
        return json.loads(raw)


def rows_by_table(entries: list[tuple[str, dict[str, str]]]) -> tuple[dict[str, list[tuple[str, dict]]], list[tuple[str, str, str]]]:
    """Group decoded entries per table, and pick out the undecodable ones.

    Returns ``({table: [(entry_id, row)]}, [(entry_id, raw, error)])``.
    """
    tables: dict[str, list[tuple[str, dict]]] = {}
    broken = []
    for entry_id, fields in entries:
        raw = fields.get("e", "")
        try:
            record = _loads(raw)
            table, row = record["table"], record["row"]
            if table not in schema.TABLES or not isinstance(row, dict):
                raise ValueError(f"unknown table {table!r}")
        except (ValueError, KeyError, TypeError) as e:
            broken.append((entry_id, raw, f"undecodable entry: {e}"))
            continue
        tables.setdefault(table, []).append((entry_id, row))
    return tables, broken


class WriterService(Service):
    """Runs the batch loop; inserts go through ``clickhouse``, a pool it uses but does not own."""

    log = Logger()

    def __init__(self, redis: RedisService, inserter: Inserter, clock: Any, *,
                 clickhouse: ClickHousePool, batch_size: int, flush_interval: float, claim_idle: float,
                 consumer: str | None = None, prepare: Any = None, metrics: Any = None):
        self.redis = redis
        self.inserter = inserter
        self.clickhouse = clickhouse
        self.clock = clock
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.claim_idle = claim_idle
        self.consumer = consumer or consumer_name()
        self.loop = Periodic(flush_interval, self._run, clock, name="writer loop")
        self._group_ready = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_claim = 0.0
        self._stopping = False
        # Own pending entries are read first: a reply lost with Redis, or a
        # consumer name used before, may have left some.
        self._retrying = True
        self._link: Any = None
        self._redis_trouble = ""
        self.stored = 0
        self.prepare = prepare
        self.metrics = metrics if metrics is not None else Metrics()

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.loop.startService()

    def stopService(self) -> defer.Deferred:
        """Stop the loop and write what is pending once more."""
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self.loop.running:
            await self.loop.stopService()  # after the run in progress
        try:
            await self.write_once()
        except Exception:
            self.log.failure("final flush failed; entries stay in the stream")

    def _run(self) -> defer.Deferred:
        d = defer.ensureDeferred(self.write_once())
        return d.addCallbacks(self._ran, self._failed)

    def _ran(self, _: int) -> None:
        if self._redis_trouble:
            self._redis_trouble = ""
            self.log.info("writer: Redis answers again")

    def _failed(self, failure: Any) -> None:
        """A run failed: own pending entries go first next run; a Redis outage is logged once."""
        message = failure.getErrorMessage()
        self._retrying = True  # a read whose reply was lost left its entries pending here
        if "NOGROUP" in message:  # Redis lost its data: make the group again
            self._group_ready = False
            self.log.error("writer: the consumer group is gone: Redis lost its data (and any events"
                           " queued in it); making the group again")
        elif not failure.check(RedisUnavailable):
            self.log.failure("writer run failed", failure)
        elif not self._redis_trouble:
            self._redis_trouble = message
            self.log.warn("writer: cannot read the stream ({error}); retrying every run", error=message)

    def _follow_reconnect(self) -> None:
        """After Redis reconnected, own pending entries go first.

        Acks a primary took but had not passed to its replica (a failover), or
        not yet written to disk (a restart), are lost with it: those entries
        are pending under this name again, and XAUTOCLAIM would leave them
        there ``claim_idle`` seconds.  (Stored again, they merge by event id.)
        """
        link = self.redis.link
        if link is None or link is self._link:
            return
        if self._link is not None:
            self.log.info("writer: Redis reconnected ({primary}); reading own pending entries again",
                          primary=self.redis.primary)
            self._retrying = True
        self._link = link

    async def ensure_group(self) -> None:
        """Create the consumer group (and stream) unless it exists."""
        if self._group_ready:
            return
        try:
            await self.redis.call("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def write_once(self) -> int:
        """Move batches into ClickHouse until the stream has no full batch.

        Returns how many entries were stored or dead-lettered.
        """
        if self.clock.seconds() < self._retry_at:
            return 0
        if self.prepare is not None:
            try:
                await self.prepare()
            except Exception as e:
                self._defer_retry(f"preparing ClickHouse failed ({type(e).__name__}: {e})")
                return 0
            self.prepare = None
        self._follow_reconnect()
        await self.ensure_group()
        done = 0
        while True:
            entries = await self._read_batch()
            if not entries:
                break
            try:
                done += await self._store(entries)
            except Exception as e:
                self.metrics.insert_failures.inc()
                self._retrying = True
                self._defer_retry(f"insert of {len(entries)} entries failed ({type(e).__name__}: {e})")
                break
            self._backoff = 0.0
            if len(entries) < self.batch_size or self._stopping:
                break
        return done

    def _defer_retry(self, why: str) -> None:
        """Back off (doubling, capped) before the next attempt, and say why."""
        self._backoff = min(MAX_BACKOFF, max(self.flush_interval, self._backoff * 2 or 0.5))
        self._retry_at = self.clock.seconds() + self._backoff
        self.log.warn("{why}; retrying in {delay:.1f} s", why=why, delay=self._backoff)

    async def _read_batch(self) -> list[tuple[str, dict[str, str]]]:
        """Own pending entries first (after a failure), then claimed, then new."""
        if self._retrying:
            entries = await self._read("0")
            if entries:
                return entries
            self._retrying = False
        now = self.clock.seconds()
        if now - self._last_claim >= self.claim_idle / 2:
            self._last_claim = now
            reply = await self.redis.call(
                "XAUTOCLAIM", STREAM, GROUP, self.consumer,
                str(int(self.claim_idle * 1000)), "0-0", "COUNT", str(self.batch_size))
            claimed = decode_entries(reply[1])
            if claimed:
                self.log.info("claimed {count} entries left by another writer", count=len(claimed))
                return claimed
        return await self._read(">")

    async def _read(self, start: str) -> list[tuple[str, dict[str, str]]]:
        reply = await self.redis.call(
            "XREADGROUP", "GROUP", GROUP, self.consumer,
            "COUNT", str(self.batch_size), "STREAMS", STREAM, start)
        if not reply:
            return []
        return decode_entries(reply[0][1])

    async def _store(self, entries: list[tuple[str, dict[str, str]]]) -> int:
        """Insert one batch, dead-letter what ClickHouse refuses, then ack."""
        started = time.monotonic()
        tables, dead = rows_by_table(entries)
        for table, items in tables.items():
            dead += await self._insert_splitting(table, items)
        for entry_id, raw, error in dead:
            await self.redis.call("XADD", DEAD_STREAM, "*", "e", raw, "error", error, "id", entry_id)
        self.metrics.batch_rows.observe(len(entries))
        if dead:
            self.metrics.dead_letters.inc(len(dead))
            self.log.warn("{count} entries refused by ClickHouse went to {stream}", count=len(dead), stream=DEAD_STREAM)
        ids = [entry_id for entry_id, _ in entries]
        await self.redis.eval(ACK_AND_DELETE, [STREAM], [GROUP, *ids])
        self.stored += len(entries) - len(dead)
        self.log.debug("stored {count} entries in {ms:.1f} ms", count=len(entries), ms=(time.monotonic() - started) * 1000)
        return len(entries)

    async def _insert_splitting(self, table: str, items: list[tuple[str, dict]]) -> list[tuple[str, str, str]]:
        """Insert ``items``; on a data error bisect to isolate refused rows.

        Returns the refused ones as dead letters; passing errors propagate.
        """
        try:
            started = time.monotonic()
            await self.clickhouse.do(self.inserter.thd_insert, table, [row for _, row in items])
            self.metrics.insert_latency.observe(time.monotonic() - started)
            return []
        except Exception as e:
            if not is_data_error(e):
                raise
            if len(items) == 1:
                entry_id, row = items[0]
                record = json.dumps({"table": table, "row": row}, separators=(",", ":"))
                return [(entry_id, record, f"{type(e).__name__}: {e}"[:2000])]
        middle = len(items) // 2
        return (await self._insert_splitting(table, items[:middle])
                + await self._insert_splitting(table, items[middle:]))
