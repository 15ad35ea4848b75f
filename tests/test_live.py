"""Live sessions and the dashboard stream, with two daemon nodes sharing Redis and ClickHouse."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from harness import (SESSION, clickhouse_rows, connect, eventually, free_port, http_get, open_dashboard,
                     port_open, running_daemon, sdk_client, sdk_event, sdk_pageview, settings, two_nodes)

FAST = {"heartbeat_interval": "0.2", "session_timeout": "1.5", "sweep_interval": "0.2"}


def redis_int(daemon, *command):
    """An integer reply of a Redis command, through the daemon's connection."""
    return daemon.service.redis.call(*command).addCallback(int)


@pytest_twisted.ensureDeferred
async def test_dashboard_on_other_node_sees_pageview_event_and_session_end(redis_url, clickhouse_url):
    """SDK on node A, dashboard on node B: every event arrives, session_end within 1 s of the close."""
    async with AsyncExitStack() as stack:
        a, b = await two_nodes(stack, redis_url, clickhouse_url)
        key, read = await a.token("p1"), await a.token("p1", scope="read")
        dash, snapshot = await open_dashboard(b.port, read)
        assert snapshot["data"] == {"live": 0, "sessions": []}

        client = await sdk_client(a.port, key)
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next_of("ack")
        pageview = await dash.next()
        assert pageview["type"] == "pageview"
        assert pageview["data"]["eventId"] == ack["eventId"]
        assert pageview["data"]["sessionId"] == SESSION and pageview["data"]["isNewSession"] is True
        assert pageview["data"]["url"].startswith("https://example.com/pricing")
        assert "ip" not in pageview["data"]

        client.send(sdk_event("p1", key=key))
        event_ack = await client.next_of("ack")
        event = await dash.next()
        assert event["type"] == "event" and event["data"]["eventId"] == event_ack["eventId"]
        assert event["data"]["trackingId"] == "cta-button" and event["data"]["metadata"]["position"] == "hero"

        client.send(sdk_pageview("p1", key=key, url="https://example.com/docs"))
        await client.next_of("ack")
        second = await dash.next()
        assert second["data"]["isNewSession"] is False

        client.sendClose()
        closed_at = time.monotonic()
        end = await dash.next()
        latency = time.monotonic() - closed_at
        assert end["type"] == "session_end"
        assert end["data"] == {"sessionId": SESSION, "reason": "disconnect"}
        assert latency < 1.0

        query = ("SELECT session_id, pageviews, did_bounce, entry_page, exit_page, end_reason,"
                 " ended_at IS NOT NULL FROM tracked_session FINAL")
        # the writer may store the session's first version before its end: wait for the ended one
        rows = await eventually(lambda: [r for r in clickhouse_rows(clickhouse_url, query) if r[6]])
        assert rows == [(SESSION, 2, 0, "https://example.com/pricing?utm_source=news&utm_medium=email&gclid=abc",
                         "https://example.com/docs", "disconnect", 1)]
        dash.sendClose()
        await dash.wait_closed()


@pytest_twisted.ensureDeferred
async def test_live_count_goes_0_1_0(redis_url, clickhouse_url):
    """Connect, pageview, close: ZCARD and /api/live say 0, 1, 0."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")

        async def counts():
            zcard = await redis_int(daemon, "ZCARD", "live:sessions:p1")
            code, body = await http_get(daemon.port, "/api/live?projectId=p1", read)
            assert code == 200
            return zcard, body

        client = await sdk_client(daemon.port, key)
        assert await counts() == (0, {"projectId": "p1", "live": 0, "bots": 0})
        client.send(sdk_pageview("p1", key=key))
        await client.next_of("ack")
        assert await counts() == (1, {"projectId": "p1", "live": 1, "bots": 0})
        client.sendClose()
        await client.wait_closed()
        for _ in range(50):
            if (await counts())[0] == 0:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert await counts() == (0, {"projectId": "p1", "live": 0, "bots": 0})


@pytest_twisted.ensureDeferred
async def test_api_live_refuses_missing_ingest_and_other_project_keys(redis_url, clickhouse_url):
    """/api/live wants a read key of that project."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        ingest, other = await daemon.token("p1"), await daemon.token("p2", scope="read")
        assert (await http_get(daemon.port, "/api/live?projectId=p1"))[0] == 401
        code, body = await http_get(daemon.port, "/api/live?projectId=p1", ingest)
        assert code == 403 and ingest not in json.dumps(body)
        assert (await http_get(daemon.port, "/api/live?projectId=p1", other))[0] == 403
        assert (await http_get(daemon.port, "/api/live?projectId=", other))[0] == 400


@pytest_twisted.ensureDeferred
async def test_api_live_counts_refused_keys_toward_the_lockout(redis_url, clickhouse_url):
    """Refused keys on /api/live and /api/stats lock the client out like those on sockets: then 429 there,
    and its WebSocket upgrades get 429 too; another client is served."""
    values = {"auth_failures_max": "3", "trusted_proxies": "127.0.0.1"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        read = await daemon.token("p1", scope="read")
        guesser = {"X-Forwarded-For": "203.0.113.9"}
        for n, path in enumerate(["/api/live?projectId=p1", "/api/stats?projectId=p1&range=24h",
                                  "/api/live?projectId=p1"]):
            assert (await http_get(daemon.port, path, f"bk_{n:043d}", guesser))[0] in (401, 403)
        code, body = await http_get(daemon.port, "/api/live?projectId=p1", read, guesser)
        assert (code, body["error"]) == (429, "locked_out")
        code, body = await http_get(daemon.port, "/api/stats?projectId=p1&range=24h", read, guesser)
        assert (code, body["error"]) == (429, "locked_out")
        try:
            await connect(daemon.port, path="/dashboard?projectId=p1", headers=guesser)
        except ConnectionError as e:
            assert "429" in str(e)
        else:
            raise AssertionError("a locked-out client opened a dashboard")
        assert await http_get(daemon.port, "/api/live?projectId=p1", read, {"X-Forwarded-For": "203.0.113.10"}) == (
            200, {"projectId": "p1", "live": 0, "bots": 0})


@pytest_twisted.ensureDeferred
async def test_reconnect_resumes_the_session(redis_url, clickhouse_url):
    """A new socket with the same ids continues the session: one row, pageviews of both, first started_at."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read)
        first = await sdk_client(daemon.port, key)
        first.send(sdk_pageview("p1", key=key, url="https://example.com/one"))
        await first.next_of("ack")
        started = await eventually(lambda: clickhouse_rows(
            clickhouse_url, "SELECT started_at FROM tracked_session FINAL"))
        first.sendClose()
        await first.wait_closed()
        assert (await dash.next_of("session_end"))["data"]["sessionId"] == SESSION

        await task.deferLater(reactor, 1.1, lambda: None)  # started_at is in whole seconds
        second = await sdk_client(daemon.port, key)
        second.send(sdk_pageview("p1", key=key, url="https://example.com/two"))
        await second.next_of("ack")
        resumed = await dash.next_of("pageview")
        assert resumed["data"]["isNewSession"] is False
        assert await redis_int(daemon, "ZCARD", "live:sessions:p1") == 1
        second.sendClose()
        await second.wait_closed()
        await dash.next_of("session_end")

        query = ("SELECT count(), any(started_at), any(pageviews), any(entry_page), any(exit_page),"
                 " any(ended_at IS NOT NULL) FROM tracked_session FINAL")
        rows = await eventually(lambda: [r for r in clickhouse_rows(clickhouse_url, query) if r[2] == 2 and r[5]])
        assert rows == [(1, started[0][0], 2, "https://example.com/one", "https://example.com/two", 1)]


@pytest_twisted.ensureDeferred
async def test_full_page_loads_overlapping_sockets_make_one_session(redis_url, clickhouse_url):
    """The next page's socket may send before the old one's close is seen: still one live session."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        old = await sdk_client(daemon.port, key)
        old.send(sdk_pageview("p1", key=key, url="https://example.com/one"))
        await old.next_of("ack")
        new = await sdk_client(daemon.port, key)
        new.send(sdk_pageview("p1", key=key, url="https://example.com/two"))
        await new.next_of("ack")
        old.sendClose()
        await old.wait_closed()
        await task.deferLater(reactor, 0.3, lambda: None)
        assert await redis_int(daemon, "ZCARD", "live:sessions:p1") == 1
        new.sendClose()
        await new.wait_closed()
        assert await eventually(lambda: clickhouse_rows(clickhouse_url, (
            "SELECT count(), any(pageviews), any(end_reason) FROM tracked_session FINAL"
            " WHERE ended_at IS NOT NULL"))[0][0] == 1) is True
        assert clickhouse_rows(clickhouse_url, "SELECT count(), any(pageviews) FROM tracked_session FINAL") == [(1, 2)]


async def authenticated_once_redis_answers(port, key, timeout=10.0):
    """An SDK socket of a node that started just now: it listens before its Redis connection is up, and
    answers ``overloaded`` (close 1001) until then, so try again until the key is accepted."""
    waited = 0.0
    while True:
        client = await connect(port, path=f"/?projectId=p1&sessionId={SESSION}")
        await client.next_of("connected")
        client.send({"type": "auth", "apiKey": key})
        reply = await client.next()
        if reply == {"type": "auth_success"}:
            return client
        assert reply["code"] == "overloaded" and waited < timeout, reply
        await client.wait_closed()
        await task.deferLater(reactor, 0.2, lambda: None)
        waited += 0.2


@pytest_twisted.ensureDeferred
async def test_sessions_of_a_killed_node_end_by_timeout(redis_url, clickhouse_url, tmp_path):
    """Node A (a real twistd) is SIGKILLed with a live session: node B's sweeper ends it, stored and broadcast."""
    env = dict(os.environ, BKLIT_REDIS=redis_url, BKLIT_CLICKHOUSE=clickhouse_url,
               **{f"BKLIT_{k.upper()}": v for k, v in FAST.items()})
    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    node_a = subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile", str(tmp_path / "a.log"), "bklit",
                               "--listen", f"tcp:{port}:interface=127.0.0.1", "--role", "ingest"], env=env)
    try:
        async with running_daemon(settings(redis_url, clickhouse_url, **FAST)) as b:
            key, read = await b.token("p1"), await b.token("p1", scope="read")
            await eventually(lambda: port_open(port), timeout=15)
            dash, _ = await open_dashboard(b.port, read)
            client = await authenticated_once_redis_answers(port, key)
            client.send(sdk_pageview("p1", key=key))
            await client.next_of("ack")
            assert (await dash.next_of("pageview"))["data"]["isNewSession"] is True
            node_a.send_signal(signal.SIGKILL)
            await deferToThread(node_a.wait, 10)
            end = await dash.next_of("session_end", timeout=10)
            assert end["data"] == {"sessionId": SESSION, "reason": "timeout"}
            assert await redis_int(b, "ZCARD", "live:sessions:p1") == 0
            rows = await eventually(lambda: clickhouse_rows(clickhouse_url, (
                "SELECT end_reason, pageviews FROM tracked_session FINAL WHERE ended_at IS NOT NULL")))
            assert rows == [("timeout", 1)]
    finally:
        if node_a.poll() is None:
            node_a.kill()
            node_a.wait()


