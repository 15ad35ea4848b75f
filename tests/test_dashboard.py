"""Who may watch a project's live stream, and what a stuck dashboard may cost."""

import base64
import os
import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from bklit.tokens import TokenStore
from harness import connect, eventually, running_daemon, sdk_pageview, settings
from test_live import open_dashboard, sdk_client


@pytest.mark.parametrize("case", ["no_key", "ingest_key", "other_project", "wrong_origin", "not_auth"])
@pytest_twisted.ensureDeferred
async def test_dashboard_refusals(case, redis_url, clickhouse_url):
    """Without a read key of the project (or an allowlisted Origin): error, close 1008, nothing else."""
    values = {"dashboard_auth_timeout": "0.5", "dashboard_origins": "https://app.example.com"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        ingest, other = await daemon.token("p1"), await daemon.token("p2", scope="read")
        dash = await connect(daemon.port, path="/dashboard?projectId=p1",
                             origin="https://evil.example.com" if case == "wrong_origin" else None)
        assert (await dash.next())["type"] == "connected"
        if case == "ingest_key":
            dash.send({"type": "auth", "apiKey": ingest})
        elif case == "other_project":
            dash.send({"type": "auth", "apiKey": other})
        elif case == "not_auth":
            dash.send({"type": "pageview", "data": {}})
        error = await dash.next()
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert ingest not in error["message"] and other not in error["message"]
        code, _ = await dash.wait_closed()
        assert code == 1008
        assert daemon.service.dashboards.connected == set()


@pytest_twisted.ensureDeferred
async def test_allowlisted_origin_and_auth_message_are_accepted(redis_url, clickhouse_url):
    """An allowlisted Origin needs no key; a read key in the first message works too."""
    values = {"dashboard_origins": "https://app.example.com"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        read, key = await daemon.token("p1", scope="read"), await daemon.token("p1")
        by_origin = await connect(daemon.port, path="/dashboard?projectId=p1", origin="https://app.example.com")
        by_message = await connect(daemon.port, path="/dashboard?projectId=p1")
        by_message.send({"type": "auth", "apiKey": read})
        for dash in (by_origin, by_message):
            assert (await dash.next())["type"] == "connected"
            assert (await dash.next())["type"] == "snapshot"
        client = await sdk_client(daemon.port, key)
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next_of("ack")
        for dash in (by_origin, by_message):
            assert (await dash.next())["data"]["eventId"] == ack["eventId"]
            dash.sendClose()
            await dash.wait_closed()


@pytest_twisted.ensureDeferred
async def test_snapshot_lists_live_sessions(redis_url, clickhouse_url):
    """A dashboard opened while a session is live sees it in the snapshot."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        client = await sdk_client(daemon.port, key, session="s-live")
        client.send(sdk_pageview("p1", session="s-live", key=key, url="https://example.com/a"))
        await client.next_of("ack")
        _, snapshot = await open_dashboard(daemon.port, read)
        assert snapshot["data"]["live"] == 1
        [entry] = snapshot["data"]["sessions"]
        assert entry["sessionId"] == "s-live" and entry["pageviews"] == 1
        assert entry["entryPage"] == entry["exitPage"] == "https://example.com/a"


def _stuck_dashboard(port, key):
    """A dashboard that completes the handshake and then never reads (blocking; run in a thread)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /dashboard?projectId=p1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {key}\r\n\r\n").encode())
    response = sock.recv(256)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


@pytest_twisted.ensureDeferred
async def test_a_dashboard_that_never_reads_is_dropped_and_never_delays_acks(redis_url, clickhouse_url):
    """Broadcasts to a stuck dashboard stop at its socket buffer; it is dropped; every ack still comes."""
    values = {"dashboard_max_skipped": "20", "rate_limit": "100000", "rate_burst": "100000"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        stuck = await deferToThread(_stuck_dashboard, daemon.port, read)
        dashboards = daemon.service.dashboards
        await eventually(lambda: len(dashboards.connected) == 1)
        [server_side] = dashboards.connected
        server_side.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client = await sdk_client(daemon.port, key)
        long_url = "https://example.com/" + "x" * 1900
        acked = 0
        for _ in range(300):
            client.send(sdk_pageview("p1", key=key, url=long_url))
            await client.next_of("ack")
            acked += 1
            if dashboards.dropped:
                break
        assert dashboards.dropped == 1
        assert dashboards.connected == set()
        scraped = daemon.service.metrics.render().decode()
        assert "bklit_dashboards_dropped_total 1.0" in scraped
        assert 'bklit_connections{kind="dashboard"} 0.0' in scraped
        # paused by its full socket, it missed events instead of queueing them
        assert server_side.skipped > 20
        for _ in range(20):  # and acks keep coming after the drop
            client.send(sdk_pageview("p1", key=key))
            await client.next_of("ack")
        stuck.close()
        assert acked < 300


@pytest.mark.parametrize("case,reason", [
    ("ingest_key", "API key is not valid for read"),
    ("other_project", "API key is not valid for this project"),
    ("unknown_key", "invalid API key"),
])
@pytest_twisted.ensureDeferred
async def test_bad_auth_after_authorization_refuses_the_dashboard(case, reason, redis_url, clickhouse_url):
    """An ``auth`` on an authorized dashboard is checked like the first: a key that may not read the project
    gets ``unauthorized`` with its reason and close 1008."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        read = await daemon.token("p1", scope="read")
        key = {"ingest_key": await daemon.token("p1"), "other_project": await daemon.token("p2", scope="read"),
               "unknown_key": "bk_" + "0" * 43}[case]
        dash, _ = await open_dashboard(daemon.port, read)
        dash.send({"type": "auth", "apiKey": key})
        assert await dash.next() == {"type": "error", "code": "unauthorized", "message": reason}
        assert (await dash.wait_closed())[0] == 1008
        await eventually(lambda: daemon.service.dashboards.connected == set())


@pytest_twisted.ensureDeferred
async def test_good_auth_after_authorization_binds_that_key_too(redis_url, clickhouse_url):
    """The same key again or another read key of the project: nothing is sent, events keep coming, and the
    dashboard closes ("API key revoked", 1008) when the key it was opened with or the later one is revoked."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key, first, second = (await daemon.token("p1"), await daemon.token("p1", scope="read"),
                              await daemon.token("p1", scope="read"))
        keeps_first, adds_second = [(await open_dashboard(daemon.port, first))[0] for _ in range(2)]
        keeps_first.send({"type": "auth", "apiKey": first})
        adds_second.send({"type": "auth", "apiKey": second})
        keeps_first.send({"type": "something else"})  # ignored once authorized, as before
        client = await sdk_client(daemon.port, key)
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next_of("ack")
        for dash in (keeps_first, adds_second):
            assert (await dash.next())["data"]["eventId"] == ack["eventId"]
        store = TokenStore(daemon.service.redis.call)
        [token] = await store.find(second)
        await store.revoke(token)
        assert await adds_second.next() == {"type": "error", "code": "unauthorized", "message": "API key revoked"}
        assert (await adds_second.wait_closed())[0] == 1008
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next_of("ack")
        assert (await keeps_first.next())["data"]["eventId"] == ack["eventId"]
        [token] = await store.find(first)
        await store.revoke(token)
        assert await keeps_first.next() == {"type": "error", "code": "unauthorized", "message": "API key revoked"}
        assert (await keeps_first.wait_closed())[0] == 1008
