"""The whole pipeline under load and with a server down: acked means stored, once.

Sockets, the Redis stream, the writer and ClickHouse all run for real.  An
ack is a promise: every acked event ends up in ClickHouse exactly once, even
when ClickHouse was down meanwhile, and an event Redis could not take is
refused (``overloaded``) instead of acked.
"""


import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from harness import clickhouse_rows, eventually, running_daemon, sdk_pageview, settings
from loadgen import close, counts, expected_rows, message, open_client, send_acked, session_of, stored

CONNECTIONS = 50
PER_CONNECTION = 200


@pytest_twisted.ensureDeferred
async def test_ten_thousand_events_from_fifty_sockets_are_stored_once_each(redis_server, redis_url, clickhouse_url):
    """50 sessions send 200 events each as fast as acks come; ClickHouse holds exactly the acked ones."""
    async with running_daemon(settings(redis_url, clickhouse_url, rate_limit="100000", rate_burst="100000",
                                       max_http_connections_per_ip="1000")) as daemon:
        key = await daemon.token("p1")
        clients = await defer.gatherResults([
            defer.ensureDeferred(open_client(daemon.port, session_of(n), key)) for n in range(CONNECTIONS)])
        sent = [[message(n, i, key) for i in range(PER_CONNECTION)] for n in range(CONNECTIONS)]
        results = await defer.gatherResults([
            defer.ensureDeferred(send_acked(client, messages)) for client, messages in zip(clients, sent)],
            consumeErrors=True)
        acked = {}
        for result in results:
            acked.update(result)
        assert len(acked) == CONNECTIONS * PER_CONNECTION
        pageviews, events = expected_rows(acked)
        assert (len(pageviews), len(events)) == (6700, 3300)

        await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0, timeout=60)
        assert counts(clickhouse_url, "page_view_event") == (6700, 6700)
        assert counts(clickhouse_url, "tracked_event") == (3300, 3300)
        final_pageviews, final_events = stored(clickhouse_url)
        assert set(final_pageviews) == pageviews and set(final_events) == events
        raw_pageviews, raw_events = stored(clickhouse_url, final=False)
        assert (len(raw_pageviews), len(raw_events)) == (6700, 3300)  # no batch went in twice
        per_session = clickhouse_rows(clickhouse_url, (
            "SELECT session_id, count() FROM (SELECT session_id FROM page_view_event"
            " UNION ALL SELECT session_id FROM tracked_event) GROUP BY session_id"))
        assert sorted(per_session) == [(session_of(n), PER_CONNECTION) for n in range(CONNECTIONS)]
        assert redis_server.execute("XLEN", "bklit:events:dead") == 0
        await close(*clients)


@pytest_twisted.ensureDeferred
async def test_redis_down_without_spool_refuses_events_until_it_is_back(redis_server, redis_url, clickhouse_url):
    """Without a spool, with Redis stopped a pageview gets ``overloaded`` and no ack; once it is back, events flow."""
    async with running_daemon(settings(redis_url, clickhouse_url, spool_dir="")) as daemon:
        key = await daemon.token("p1")
        before = await open_client(daemon.port, session_of(1), key)

        await deferToThread(redis_server.stop)
        before.send(sdk_pageview("p1", session_of(1), key=key, url="https://example.com/refused"))
        error = await before.next()
        assert error["type"] == "error" and error["code"] == "overloaded", error
        assert set(error) == {"type", "code", "message"}

        await deferToThread(redis_server.start)
        await eventually(lambda: daemon.service.redis.connected, timeout=15)
        after = await open_client(daemon.port, session_of(2), key)
        after.send(sdk_pageview("p1", session_of(2), key=key, url="https://example.com/stored"))
        ack = await after.next()
        assert ack["type"] == "ack" and ack["messageType"] == "pageview", ack

        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event"))
        await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0)
        assert clickhouse_rows(clickhouse_url, "SELECT id, session_id, url FROM page_view_event") == [
            (ack["eventId"], session_of(2), "https://example.com/stored")]
        assert before.inbox.pending == []  # the refused pageview was never acked
        await close(before, after)


@pytest_twisted.ensureDeferred
async def test_clickhouse_down_events_wait_in_the_stream_and_land_once(redis_server, clickhouse_server, redis_url, clickhouse_url):
    """While ClickHouse stops and is down events are still acked; once it is back each is stored once."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        client = await open_client(daemon.port, session_of(1), key)
        acked = await send_acked(client, [message(1, 0, key)])
        await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0)

        stopping = deferToThread(clickhouse_server.stop)  # waits for open connections to end
        try:
            acked.update(await send_acked(client, [message(1, i, key) for i in range(1, 16)]))
            await stopping
            acked.update(await send_acked(client, [message(1, i, key) for i in range(16, 31)]))
            assert len(acked) == 31
            assert redis_server.execute("XLEN", "bklit:events") >= 15  # what came after the stop waits
        finally:
            await stopping
            await deferToThread(clickhouse_server.start)

        await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0, timeout=60)
        pageviews, events = expected_rows(acked)
        assert counts(clickhouse_url, "page_view_event") == (len(pageviews), len(pageviews)) == (21, 21)
        assert counts(clickhouse_url, "tracked_event") == (len(events), len(events)) == (10, 10)
        final_pageviews, final_events = stored(clickhouse_url)
        assert set(final_pageviews) == pageviews and set(final_events) == events
        assert await daemon.service.redis.call("XPENDING", "bklit:events", "bklit-writers") == [0, None, None, None]
        await close(client)
