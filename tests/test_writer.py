"""The writer against real Redis and ClickHouse: no loss, no doubles, no poison, no spinning.

Entries are put in the stream directly (as the producer writes them), so
each test controls exactly what the writer finds: entries another writer
read and never acknowledged, rows ClickHouse refuses, a ClickHouse that is
down.  Counts are taken ``FINAL``: the tables are ReplacingMergeTrees keyed
by event id, so a row inserted twice by a writer that crashed before its
XACK collapses into one.
"""

import itertools
import json
import threading
import time
from contextlib import asynccontextmanager

import pytest
import pytest_twisted
from clickhouse_driver import errors
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from bklit import rows, wire
from bklit.clickhouse import ClickHousePool, Inserter, thd_migrate, thd_once
from bklit.clickhouse_urls import clickhouse_database
from bklit.ids import EventIds
from bklit.keys import DEAD_STREAM, GROUP, STREAM
from bklit.writer import WriterService

from harness import clickhouse_rows, eventually, redis_connection

SESSION = "1732608000000-writer"
_ids = EventIds()
_pages = itertools.count()


def pageview(**changes):
    """``(event id, row)`` of a page_view_event row as ingest makes it, with ``changes``."""
    event_id = _ids.new()
    message = wire.PageView(api_key=None, url=f"https://example.com/{next(_pages)}",
                            viewport_width=1280, viewport_height=720)
    row = rows.pageview_row(message, event_id=event_id, project_id="p1", session_id=SESSION,
                            received_at=time.time(), ip="192.0.2.0")
    row.update(changes)
    return event_id, row


def event():
    """``(event id, row)`` of a tracked_event row."""
    event_id = _ids.new()
    message = wire.Event(api_key=None, tracking_id="cta", event_type="click", metadata={"a": 1})
    return event_id, rows.event_row(message, event_id=event_id, project_id="p1", session_id=SESSION,
                                    received_at=time.time())


def record(table, row):
    """A stream entry's ``e`` field, as the producer writes it."""
    return json.dumps({"table": table, "row": row}, separators=(",", ":"))


async def add(redis, *raw_entries):
    """XADD each raw ``e`` value; returns the stream ids in order."""
    return [await redis.call("XADD", STREAM, "*", "e", raw) for raw in raw_entries]


@asynccontextmanager
async def running_writer(redis, inserter, consumer, *, batch_size=100, claim_idle=60.0, flush_interval=0.1):
    """A started ``WriterService`` with a ClickHousePool of ``inserter.url``, stopped on exit."""
    pool = ClickHousePool(inserter.url, reactor, threads=2)
    writer = WriterService(redis, inserter, reactor, clickhouse=pool, batch_size=batch_size,
                           flush_interval=flush_interval, claim_idle=claim_idle, consumer=consumer)
    pool.startService()
    writer.startService()
    try:
        yield writer
    finally:
        await writer.stopService()
        await pool.stopService()


async def migrate(clickhouse_url):
    """Create the test database's tables."""
    await deferToThread(thd_migrate, clickhouse_url, clickhouse_database(clickhouse_url))


class UrlInserter(Inserter):
    """A real ``Inserter`` for the test database, which knows its URL (for ``running_writer``)."""

    def __init__(self, url, database):
        super().__init__(database)
        self.url = url


def inserter_for(clickhouse_url):
    """A real ``Inserter`` for the test database."""
    return UrlInserter(clickhouse_url, clickhouse_database(clickhouse_url))


def thd_insert_once(clickhouse_url, table, row_dicts):
    """Insert rows with a client of its own, as a writer does before its XACK."""
    return thd_once(clickhouse_url, inserter_for(clickhouse_url).thd_insert, table, row_dicts)


def stored_ids(clickhouse_url, table="page_view_event", final=True):
    """The ids in ``table`` (FINAL unless told), sorted, repeats kept."""
    query = f"SELECT id FROM {table}{' FINAL' if final else ''} ORDER BY id"
    return [row[0] for row in clickhouse_rows(clickhouse_url, query)]


async def drained(redis):
    """Whether the stream is empty and nothing is pending."""
    return (await redis.call("XLEN", STREAM) == 0
            and (await redis.call("XPENDING", STREAM, GROUP))[0] == 0)


async def wait_drained(redis, timeout=10.0):
    """Wait until the writer deleted every entry and nothing is pending."""
    state = {"done": False}

    async def poll():
        while not state["done"]:
            state["done"] = await drained(redis)
            if not state["done"]:
                await task.deferLater(reactor, 0.1, lambda: None)

    await defer.ensureDeferred(poll()).addTimeout(timeout, reactor)


class FailingInserter(UrlInserter):
    """An inserter whose every insert fails as a dropped connection would."""

    def __init__(self, url, database):
        super().__init__(url, database)
        self.attempts = 0

    def thd_insert(self, client, table, row_dicts):
        self.attempts += 1
        raise errors.NetworkError("Code: 210. Connection reset by peer (simulated)")


class CountingInserter(UrlInserter):
    """A real inserter that records the time of every insert attempt."""

    def __init__(self, url, database):
        super().__init__(url, database)
        self.attempts = []
        self._lock = threading.Lock()

    def thd_insert(self, client, table, row_dicts):
        with self._lock:
            self.attempts.append(time.monotonic())
        return super().thd_insert(client, table, row_dicts)


@pytest.mark.parametrize("crash", ["after_read", "after_insert", "insert_failed"])
@pytest_twisted.ensureDeferred
async def test_new_writer_takes_over_what_a_dead_writer_left(crash, redis_url, clickhouse_url):
    """Entries a writer read but never acked are stored by the next writer: none lost, none doubled.

    ``after_read``: writer "a" read the batch and died.  ``after_insert``: it
    also inserted the rows, then died before XACK (writer "b" inserts them
    again; FINAL still counts each once).  ``insert_failed``: a real writer
    whose inserts fail is stopped with the batch pending.
    """
    await migrate(clickhouse_url)
    made = [pageview() for _ in range(25)]
    expected = sorted(event_id for event_id, _ in made)
    async with redis_connection(redis_url) as redis:
        await redis.call("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
        await add(redis, *(record("page_view_event", row) for _, row in made))
        if crash == "insert_failed":
            failing = FailingInserter(clickhouse_url, clickhouse_database(clickhouse_url))
            async with running_writer(redis, failing, "a"):
                await eventually(lambda: failing.attempts >= 1)
        else:
            reply = await redis.call("XREADGROUP", "GROUP", GROUP, "a", "COUNT", "100", "STREAMS", STREAM, ">")
            assert len(reply[0][1]) == 25
            if crash == "after_insert":
                assert await deferToThread(thd_insert_once, clickhouse_url, "page_view_event",
                                           [row for _, row in made]) == 25
        pending = await redis.call("XPENDING", STREAM, GROUP)
        assert (pending[0], pending[3]) == (25, [["a", "25"]])

        async with running_writer(redis, inserter_for(clickhouse_url), "b", claim_idle=1.0) as b:
            await wait_drained(redis)
            assert b.stored == 25
        assert stored_ids(clickhouse_url) == expected
        assert clickhouse_rows(clickhouse_url, "SELECT count(), uniqExact(id) FROM page_view_event FINAL") == [(25, 25)]
        inserted_before = 25 if crash == "after_insert" else 0
        assert len(stored_ids(clickhouse_url, final=False)) == 25 + inserted_before
        assert await redis.call("XLEN", DEAD_STREAM) == 0


def dead_letters(reply):
    """``{original entry id: (e, error)}`` from an XRANGE of the dead-letter stream."""
    letters = {}
    for _, flat in reply:
        fields = dict(zip(flat[::2], flat[1::2]))
        letters[fields["id"]] = (fields["e"], fields["error"])
    return letters


@pytest_twisted.ensureDeferred
async def test_refused_rows_go_to_the_dead_letter_stream_and_the_rest_is_stored(redis_url, clickhouse_url):
    """Poison in the middle of a batch is dead-lettered with its error; every other row is stored."""
    await migrate(clickhouse_url)
    before = [pageview() for _ in range(5)]
    events = [event() for _ in range(3)]
    after = [pageview() for _ in range(4)]
    _, wide = pageview(viewport_width="wide")  # refused by the value conversion
    _, far = pageview(timestamp="9999-01-01T00:00:00+00:00")  # refused by the driver: no such DateTime
    async with redis_connection(redis_url) as redis:
        ids = await add(
            redis,
            *(record("page_view_event", row) for _, row in before),
            record("page_view_event", wide),
            *(record("tracked_event", row) for _, row in events),
            "not json {",
            record("page_view_event", far),
            *(record("page_view_event", row) for _, row in after),
            record("no_such_table", {"id": "x"}),
        )
        wide_id, not_json_id, far_id, unknown_id = ids[5], ids[9], ids[10], ids[-1]
        async with running_writer(redis, inserter_for(clickhouse_url), "w") as writer:
            await wait_drained(redis)
            assert writer.stored == 12
        letters = dead_letters(await redis.call("XRANGE", DEAD_STREAM, "-", "+"))

    assert sorted(letters) == sorted([wide_id, not_json_id, far_id, unknown_id])
    assert letters[not_json_id] == ("not json {", "undecodable entry: Expecting value: line 1 column 1 (char 0)")
    assert letters[unknown_id] == (record("no_such_table", {"id": "x"}), "undecodable entry: unknown table 'no_such_table'")
    assert json.loads(letters[wide_id][0]) == {"table": "page_view_event", "row": wide}
    assert letters[wide_id][1] == "ValueError: page_view_event.viewport_width: expected an integer"
    assert json.loads(letters[far_id][0]) == {"table": "page_view_event", "row": far}
    assert letters[far_id][1].startswith("TypeMismatchError: Code: 53.")
    assert "Column timestamp" in letters[far_id][1]

    assert stored_ids(clickhouse_url) == sorted(event_id for event_id, _ in before + after)
    assert stored_ids(clickhouse_url, final=False) == stored_ids(clickhouse_url)
    assert stored_ids(clickhouse_url, "tracked_event") == sorted(event_id for event_id, _ in events)
    assert clickhouse_rows(clickhouse_url, "SELECT count() FROM page_view_event WHERE viewport_width = 1280") == [(9,)]


@pytest_twisted.ensureDeferred
async def test_stored_entries_are_deleted_so_the_stream_stays_empty(redis_url, clickhouse_url):
    """Round after round, every stored batch leaves the stream: XLEN is back to 0 each time."""
    await migrate(clickhouse_url)
    expected = []
    async with redis_connection(redis_url) as redis:
        async with running_writer(redis, inserter_for(clickhouse_url), "w", batch_size=50) as writer:
            for _ in range(3):
                made = [pageview() for _ in range(120)]
                expected += [event_id for event_id, _ in made]
                await add(redis, *(record("page_view_event", row) for _, row in made))
                await wait_drained(redis)
                assert await redis.call("XLEN", STREAM) == 0
            assert writer.stored == 360
        groups = await redis.call("XINFO", "GROUPS", STREAM)
        assert dict(zip(groups[0][::2], groups[0][1::2]))["pending"] == 0
    assert stored_ids(clickhouse_url, final=False) == sorted(expected)


@pytest_twisted.ensureDeferred
async def test_writer_backs_off_while_clickhouse_is_down_and_catches_up(redis_url, clickhouse_server, clickhouse_url):
    """With ClickHouse down the writer retries at doubling intervals, not in a loop; then it catches up."""
    await migrate(clickhouse_url)
    made = [pageview() for _ in range(40)]
    inserter = CountingInserter(clickhouse_url, clickhouse_database(clickhouse_url))
    async with redis_connection(redis_url) as redis:
        await add(redis, *(record("page_view_event", row) for _, row in made))
        await deferToThread(clickhouse_server.kill)
        try:
            async with running_writer(redis, inserter, "w") as writer:
                await task.deferLater(reactor, 2.0, lambda: None)  # the observation window
                attempts = list(inserter.attempts)
                gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
                # a busy loop would try every 0.1 s (20 times); the backoff is 0.5 s, 1 s, 2 s, ...
                assert 2 <= len(attempts) <= 4, gaps
                assert all(gap >= 0.5 * 2 ** i - 0.05 for i, gap in enumerate(gaps)), gaps
                assert writer.stored == 0

                await deferToThread(clickhouse_server.start)
                await wait_drained(redis, timeout=30)
                assert stored_ids(clickhouse_url) == sorted(event_id for event_id, _ in made)

                # caught up, the backoff is over: new entries go in on the next run
                later = [pageview() for _ in range(5)]
                await add(redis, *(record("page_view_event", row) for _, row in later))
                started = time.monotonic()
                await wait_drained(redis, timeout=5)
                assert time.monotonic() - started < 2.0  # the next run, not a leftover backoff (>= 2 s by now)
        finally:
            if not clickhouse_server.running:
                await deferToThread(clickhouse_server.start)
    assert stored_ids(clickhouse_url, final=False) == sorted(event_id for event_id, _ in made + later)


@pytest_twisted.ensureDeferred
async def test_a_redis_that_lost_its_data_gets_the_group_again(redis_url, clickhouse_url):
    """After FLUSHALL (a Redis restarted without persistence) the writer makes its group again and goes on."""
    await migrate(clickhouse_url)
    first, second = pageview(), pageview()
    async with redis_connection(redis_url) as redis:
        async with running_writer(redis, inserter_for(clickhouse_url), "w"):
            await add(redis, record("page_view_event", first[1]))
            await wait_drained(redis)
            await redis.call("FLUSHALL")
            await add(redis, record("page_view_event", second[1]))
            await wait_drained(redis)
    assert stored_ids(clickhouse_url, final=False) == sorted([first[0], second[0]])


@pytest_twisted.ensureDeferred
async def test_entries_pending_under_its_own_name_are_stored_at_start(redis_url, clickhouse_url):
    """Entries delivered to this consumer name whose reply was lost are stored at once, not after claim_idle."""
    await migrate(clickhouse_url)
    made = [pageview() for _ in range(5)]
    async with redis_connection(redis_url) as redis:
        await redis.call("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
        await add(redis, *(record("page_view_event", row) for _, row in made))
        await redis.call("XREADGROUP", "GROUP", GROUP, "w", "COUNT", "100", "STREAMS", STREAM, ">")  # reply "lost"
        async with running_writer(redis, inserter_for(clickhouse_url), "w", claim_idle=600):
            await wait_drained(redis, timeout=5)
    assert stored_ids(clickhouse_url) == sorted(event_id for event_id, _ in made)


async def wait_for_consumer(redis):
    """Wait until a consumer of the group made its first read."""
    for _ in range(100):
        if await redis.call("EXISTS", STREAM) and await redis.call("XINFO", "CONSUMERS", STREAM, GROUP):
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("no consumer read the stream within 10 s")


# Entries added and read under a consumer's name in one step, so the
# writer's loop cannot read them first: entries read whose ack was lost.
ADD_AND_READ = """
for i = 3, #ARGV do redis.call('XADD', KEYS[1], '*', 'e', ARGV[i]) end
return redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', #ARGV, 'STREAMS', KEYS[1], '>')
"""


@pytest_twisted.ensureDeferred
async def test_after_a_reconnect_its_own_pending_entries_are_stored_at_once(redis_url, clickhouse_url):
    """Acks lost with a Redis that failed over or restarted leave entries pending under the writer's name.

    Sentinel closes the clients of a demoted primary between two runs, so no
    run fails: the new connection alone tells the writer to read its own
    pending entries again, rather than after ``claim_idle``.  The loop runs
    once at start; the test runs the others.
    """
    await migrate(clickhouse_url)
    made = [pageview() for _ in range(5)]
    async with redis_connection(redis_url) as redis, redis_connection(redis_url) as writer_redis:
        async with running_writer(writer_redis, inserter_for(clickhouse_url), "w", claim_idle=600,
                                  flush_interval=3600) as writer:
            await wait_for_consumer(redis)  # its first read is over
            first = writer_redis.link
            await redis.eval(ADD_AND_READ, [STREAM], [GROUP, "w", *(record("page_view_event", row) for _, row in made)])
            assert await writer.write_once() == 0  # same connection: nothing of its own to read again
            await redis.call("CLIENT", "KILL", "ID", str(await writer_redis.call("CLIENT", "ID")))
            await eventually(lambda: writer_redis.link not in (None, first), timeout=10)
            assert await writer.write_once() == len(made)
            assert await drained(redis)
    assert stored_ids(clickhouse_url) == sorted(event_id for event_id, _ in made)
