"""Every visit its own session row: a session id reused after its state expired never replaces the
earlier visit, in ClickHouse or in ``bklit stats``; schema version 2 keeps the rows stored before it."""

import time
from datetime import datetime, timezone

import pytest_twisted
from clickhouse_driver import Client
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from bklit.commands.stats import thd_stats
from bklit.clickhouse import MIGRATIONS_TABLE, thd_migrate, thd_once
from bklit.keys import session_state
from bklit.schema import MIGRATIONS, insert_columns, to_insert_row
from harness import SESSION, clickhouse_rows, connect, eventually, running_daemon, sdk_pageview, settings


async def visit(port, key, pages):
    """One tab's visit of session SESSION: ``pages`` pageviews, each acked, then the socket closes."""
    client = await connect(port, path=f"/?projectId=p1&sessionId={SESSION}")
    await client.next_of("connected")
    for n in range(pages):
        client.send(sdk_pageview("p1", key=key, url=f"https://example.com/{n}"))
        await client.next_of("ack")
    client.sendClose()
    await client.wait_closed()


def visits(clickhouse_url):
    return clickhouse_rows(clickhouse_url, "SELECT id, started_ms, pageviews, ended_at IS NOT NULL"
                                           " FROM tracked_session FINAL ORDER BY started_ms")


@pytest_twisted.ensureDeferred
async def test_a_session_id_that_comes_back_after_its_state_expired_is_a_new_visit(redis_url, clickhouse_url):
    """Visit 1 with 2 pageviews, its state expires, visit 2 with 1: two rows, 2 and 1 pageviews, and
    ``bklit stats`` counts two sessions; a resume within the window stays in its visit's row."""
    async with running_daemon(settings(redis_url, clickhouse_url, resume_window="1")) as daemon:
        key = await daemon.token("p1")
        await visit(daemon.port, key, 1)
        await visit(daemon.port, key, 1)  # within the window: resumed, the same row
        await task.deferLater(reactor, 1.3, lambda: None)  # the state expired
        assert await daemon.service.redis.call("EXISTS", session_state("p1", SESSION)) == 0
        await visit(daemon.port, key, 1)
        rows = await eventually(lambda: len(visits(clickhouse_url)) == 2 and all(r[3] for r in visits(clickhouse_url))
                                and visits(clickhouse_url), timeout=10)
        assert [(pageviews, ended) for _, _, pageviews, ended in rows] == [(2, 1), (1, 1)]
        assert [row_id for row_id, *_ in rows] == [f"{SESSION}/{started}" for _, started, *_ in rows]
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT count() FROM page_view_event") == [(3,)])
        stats = await deferToThread(thd_once, clickhouse_url, thd_stats, "p1", int(time.time()) - 3600)
        assert (stats["pageviews"], stats["sessions"]) == (3, 2)


def test_schema_2_keeps_the_rows_stored_before_it(clickhouse_server, clickhouse_db, clickhouse_url):
    """A version-1 database with a session row migrates in place: the old row keeps its key (started_ms
    0) and is updated by a newer version of itself, a new visit of the same id is a row of its own."""
    client = Client.from_url(clickhouse_url)
    try:
        for statement in MIGRATIONS[0][1]:
            client.execute(statement.format(db=clickhouse_db))
        client.execute(f"CREATE TABLE {clickhouse_db}.{MIGRATIONS_TABLE} (version UInt32, applied_at DateTime"
                       " DEFAULT now()) ENGINE = TinyLog")
        client.execute(f"INSERT INTO {clickhouse_db}.{MIGRATIONS_TABLE} (version) VALUES", [(1,)])
        old = {"id": "s1", "session_id": "s1", "project_id": "p1", "started_at": 1_700_000_000, "pageviews": 2,
               "version": 1}
        client.execute(f"INSERT INTO {clickhouse_db}.tracked_session (id, session_id, project_id, started_at,"
                       " pageviews, version) VALUES", [("s1", "s1", "p1", datetime.fromtimestamp(
                           old["started_at"], timezone.utc), 2, 1)])
        # A migration cut short after its first ALTER is finished by the next run.
        client.execute(MIGRATIONS[1][1][0].format(db=clickhouse_db))
        assert thd_migrate(clickhouse_url, clickhouse_db) == [2]
        assert thd_migrate(clickhouse_url, clickhouse_db) == []

        def insert(row):
            order = insert_columns("tracked_session")
            client.execute(f"INSERT INTO {clickhouse_db}.tracked_session ({', '.join(order)}) VALUES",
                           [to_insert_row("tracked_session", row)])

        insert({**old, "pageviews": 3, "version": 2})  # the old visit resumed: same row
        insert({"id": "s1/1800000000000", "session_id": "s1", "project_id": "p1", "started_at": 1_800_000_000,
                "started_ms": 1_800_000_000_000, "pageviews": 1, "version": 1})
        rows = client.execute(f"SELECT id, started_ms, pageviews FROM {clickhouse_db}.tracked_session FINAL"
                              " ORDER BY started_ms")
        assert rows == [("s1", 0, 3), ("s1/1800000000000", 1_800_000_000_000, 1)]
    finally:
        client.disconnect()
