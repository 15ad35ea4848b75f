"""Who may watch a project's live stream, and what a stuck dashboard may cost."""

import base64
import os
import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from harness import connect, eventually, running_daemon, sdk_pageview, settings
from test_live import open_dashboard, sdk_client


# A null origin passes the handshake but is never taken as allowlisted, even when listed.
NULL_ORIGINS = "https://app.example.com,null,file://"
ORIGINS = {"wrong_origin": "https://evil.example.com", "null_origin": "null", "file_origin": "file://"}


@pytest.mark.parametrize("case", ["no_key", "ingest_key", "other_project", "wrong_origin", "not_auth",
                                  "null_origin", "file_origin"])
@pytest_twisted.ensureDeferred
async def test_dashboard_refusals(case, redis_url, clickhouse_url):
    """Without a read key of the project (or an allowlisted Origin): error, close 1008, nothing else."""
    values = {"dashboard_auth_timeout": "0.5", "dashboard_origins": NULL_ORIGINS}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        ingest, other = await daemon.token("p1"), await daemon.token("p2", scope="read")
        dash = await connect(daemon.port, path="/dashboard?projectId=p1", origin=ORIGINS.get(case))
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


@pytest.mark.parametrize("origin", ["null", "file://"])
@pytest_twisted.ensureDeferred
async def test_read_key_works_from_a_null_origin(origin, redis_url, clickhouse_url):
    """A dashboard in a sandboxed iframe or a file:// page is served once it presents a read key."""
    async with running_daemon(settings(redis_url, clickhouse_url, dashboard_origins=NULL_ORIGINS)) as daemon:
        read = await daemon.token("p1", scope="read")
        by_header = await connect(daemon.port, path="/dashboard?projectId=p1", origin=origin,
                                  headers={"Authorization": f"Bearer {read}"})
        by_message = await connect(daemon.port, path="/dashboard?projectId=p1", origin=origin)
        assert (await by_message.next())["type"] == "connected"
        by_message.send({"type": "auth", "apiKey": read})
        assert (await by_message.next())["type"] == "snapshot"
        assert [(await by_header.next())["type"] for _ in range(2)] == ["connected", "snapshot"]
        for dash in (by_header, by_message):
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
