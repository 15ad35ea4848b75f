"""Who may watch a project's live stream, and what a stuck dashboard may cost."""

import base64
import contextlib
import json
import os
import socket
from types import SimpleNamespace

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from bklit.broadcast import Broadcaster
from bklit.dashboard import DashboardProtocol, Dashboards
from bklit.frames import FrameLimits
from bklit.metrics import Metrics
from bklit.revocation import OpenKeys
from bklit.tokens import TokenStore
from harness import SocketClient, connect, eventually, running_daemon, sdk_event, sdk_pageview, settings
from harness import open_dashboard, sdk_client


# A null origin passes the handshake but is never taken as allowlisted, even when listed.
NULL_ORIGINS = "p1=https://app.example.com"
ORIGINS = {"wrong_origin": "https://evil.example.com", "null_origin": "null", "file_origin": "file://",
           "origin_of_another_project": "https://other.example.com"}


@pytest.mark.parametrize("case", ["no_key", "ingest_key", "other_project", "wrong_origin", "not_auth",
                                  "null_origin", "file_origin", "origin_of_another_project"])
@pytest_twisted.ensureDeferred
async def test_dashboard_refusals(case, redis_url, clickhouse_url):
    """Without a read key of the project (or an allowlisted Origin): error, close 1008, nothing else."""
    values = {"dashboard_auth_timeout": "0.5", "dashboard_origins": NULL_ORIGINS + ",p2=https://other.example.com"}
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
    values = {"dashboard_origins": "p1=https://app.example.com, p2=https://other.example.com"}
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


def _waiting_for_snapshot(*, max_skipped: int = 100, count: int = 1):
    """``count`` dashboards of p1, authorized in memory, whose snapshot reads have not finished.

    Returns the broadcaster (a real one, without Redis), the shared
    ``Dashboards`` and, per dashboard, its snapshot Deferred (fire it to finish
    the read) and what it sent: message types, live event ids, ``close <code>``
    and ``aborted``.
    """
    reads = []

    def snapshot(project):
        reads.append(defer.Deferred())
        return reads[-1]

    dash = Dashboards(None, SimpleNamespace(snapshot=snapshot), task.Clock(), origins=(), auth_timeout=5,
                      max_skipped=max_skipped, metrics=Metrics(), admission=None, trusted_proxies=(),
                      frame_limits=FrameLimits(10, 100, 100, 400, 64), open_keys=OpenKeys(None, task.Clock()))
    factory = WebSocketServerFactory()
    factory.prepared = 0
    prepare = factory.prepareMessage

    def counted_prepare(payload, *args):
        factory.prepared += 1
        return prepare(payload, *args)

    factory.prepareMessage = counted_prepare
    dash.broadcaster = Broadcaster(None, factory, dash.open_keys)
    dashboards = []
    for _ in range(count):
        protocol, sent = DashboardProtocol(), []

        def record(payload, *args, sent=sent):
            message = json.loads(payload)
            sent.append(message["data"]["eventId"] if "eventId" in message["data"] else message["type"])

        def close_frame(code, reasonUtf8, isReply, protocol=protocol, sent=sent):
            sent.append(f"close {code}")
            protocol.state = protocol.STATE_CLOSING

        protocol.dash, protocol.project_id, protocol.state = dash, "p1", protocol.STATE_OPEN
        protocol.sendMessage = record
        protocol.sendPreparedMessage = lambda prepared, record=record: record(prepared.payload)
        protocol.sendCloseFrame = close_frame
        protocol.transport = SimpleNamespace(abortConnection=lambda sent=sent: sent.append("aborted"))
        protocol.authorize()
        dashboards.append((protocol, reads[-1], sent))
    return dash.broadcaster, dash, dashboards


def _publish(broadcaster, *event_ids):
    """Deliver one live event per id on p1's channel, as the subscriber does."""
    for event_id in event_ids:
        broadcaster.deliver("bklit:live:p1", json.dumps({"type": "event", "data": {"eventId": event_id}}))


def test_events_published_while_the_snapshot_is_read_follow_it_in_order():
    """Nothing goes out before the snapshot; what came meanwhile follows it once, framed once for all."""
    broadcaster, _, [(early, early_read, early_sent), (late, late_read, late_sent)] = _waiting_for_snapshot(count=2)
    _publish(broadcaster, "e1")
    assert early_sent == late_sent == []
    early_read.callback((0, []))
    assert early_sent == ["snapshot", "e1"]
    _publish(broadcaster, "e2", "e3")
    assert late_sent == []
    late_read.callback((1, []))
    _publish(broadcaster, "e4")
    assert early_sent == late_sent == ["snapshot", "e1", "e2", "e3", "e4"]
    assert broadcaster.ws_factory.prepared == 4


def test_a_dashboard_whose_snapshot_is_late_is_dropped_past_max_skipped():
    """Holding more than ``dashboard_max_skipped`` events drops it like a dashboard that stopped reading."""
    broadcaster, dash, [(protocol, read, sent)] = _waiting_for_snapshot(max_skipped=2)
    _publish(broadcaster, "e1", "e2")
    assert sent == []
    _publish(broadcaster, "e3")
    assert sent == ["aborted"]
    assert dash.dropped == 1
    assert "bklit_dashboards_dropped_total 1.0" in dash.metrics.render().decode()
    read.callback((0, []))
    _publish(broadcaster, "e4")
    assert sent == ["aborted"]


def test_a_failed_snapshot_read_closes_1011_without_sending_events():
    """A dashboard never gets live events without a snapshot before them: it is closed to reconnect."""
    broadcaster, dash, [(protocol, read, sent)] = _waiting_for_snapshot()
    _publish(broadcaster, "e1")
    read.errback(ConnectionError("Redis is not answering"))
    _publish(broadcaster, "e2")
    assert sent == ["close 1011"]
    assert dash.dropped == 0


@pytest_twisted.ensureDeferred
async def test_dashboards_opened_under_load_get_the_snapshot_first_and_then_every_event_once(
        redis_url, clickhouse_url):
    """40 dashboards open while 4 SDK sockets send as fast as acks come.

    Each dashboard gets ``connected``, then ``snapshot``, then live events: no
    event twice, each SDK socket's events in the order they were acked, and
    every event acked after the dashboard had its snapshot among them.
    """
    values = {"rate_limit": "100000", "rate_burst": "100000", "dashboard_max_skipped": "1000",
              "dashboard_connects_per_minute": "1000"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        acked: list[tuple[int, str]] = []  # (SDK socket, eventId) in the order the acks came

        class Dashboard(SocketClient):
            """Notes with each message how many acks had come when it arrived."""

            def __init__(self) -> None:
                super().__init__()
                self.received: list[tuple[int, dict]] = []

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                self.received.append((len(acked), json.loads(payload)))
                super().onMessage(payload, isBinary)

        sending = True

        async def send_until_stopped(number):
            session = f"1732608000000-load{number}"
            client = await sdk_client(daemon.port, key, session=session)
            sent = 0
            while sending:
                make = sdk_pageview if sent % 2 == 0 else sdk_event
                client.send(make("p1", session=session, key=key))
                acked.append((number, (await client.next_of("ack"))["eventId"]))
                sent += 1

        async def open_one():
            dash = await connect(daemon.port, path="/dashboard?projectId=p1",
                                 headers={"Authorization": f"Bearer {read}"}, protocol=Dashboard)
            await dash.next_of("snapshot")
            return dash

        load = [defer.ensureDeferred(send_until_stopped(n)) for n in range(4)]
        await eventually(lambda: len(acked) >= 50)
        opening = []
        for _ in range(40):
            opening.append(defer.ensureDeferred(open_one()))
            await task.deferLater(reactor, 0.01, lambda: None)
        dashboards = await defer.gatherResults(opening, consumeErrors=True)
        more = len(acked) + 100
        await eventually(lambda: len(acked) >= more, timeout=10)
        sending = False
        await defer.gatherResults(load, consumeErrors=True)

        order = {event_id: i for i, (_, event_id) in enumerate(acked)}

        def live_ids(dash):
            return [m["data"]["eventId"] for _, m in dash.received if m["type"] in ("pageview", "event")]

        def owed(dash):
            """The events acked after this dashboard had its snapshot."""
            at = next(stamp for stamp, m in dash.received if m["type"] == "snapshot")
            return {event_id for _, event_id in acked[at:]}

        with contextlib.suppress(AssertionError):  # the checks below say what is wrong
            await eventually(lambda: all(owed(d) <= set(live_ids(d)) for d in dashboards), timeout=10)
        problems = []
        for number, dash in enumerate(dashboards):
            kinds = [m["type"] for _, m in dash.received]
            ids = live_ids(dash)
            if kinds[:2] != ["connected", "snapshot"]:
                problems.append(f"dashboard {number} began with {kinds[:3]}")
            if len(ids) != len(set(ids)):
                problems.append(f"dashboard {number} got {len(ids) - len(set(ids))} events twice")
            if owed(dash) - set(ids):
                problems.append(f"dashboard {number} missed {len(owed(dash) - set(ids))} events")
            for sdk in range(4):
                mine = [e for e in ids if e in order and acked[order[e]][0] == sdk]
                if mine != sorted(mine, key=order.__getitem__):
                    problems.append(f"dashboard {number} got the events of SDK socket {sdk} out of order")
        assert problems == []
        assert daemon.service.dashboards.dropped == 0


@pytest_twisted.ensureDeferred
async def test_dashboard_connects_per_client_are_rate_limited(redis_url, clickhouse_url):
    """Past dashboard_connects_per_minute from one address, upgrades get HTTP 429; another address is served."""
    values = {"dashboard_connects_per_minute": "3", "trusted_proxies": "127.0.0.1"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        read = await daemon.token("p1", scope="read")
        headers = {"Authorization": f"Bearer {read}", "X-Forwarded-For": "203.0.113.7"}
        for _ in range(3):
            dash = await connect(daemon.port, path="/dashboard?projectId=p1", headers=headers)
            assert (await dash.next())["type"] == "connected"
            dash.sendClose()
            await dash.wait_closed()
        with pytest.raises(ConnectionError, match="429"):
            await connect(daemon.port, path="/dashboard?projectId=p1", headers=headers)
        other = await connect(daemon.port, path="/dashboard?projectId=p1",
                              headers={**headers, "X-Forwarded-For": "203.0.113.8"})
        assert (await other.next())["type"] == "connected"
        other.sendClose()
        await other.wait_closed()


@pytest_twisted.ensureDeferred
async def test_the_origin_mode_says_at_start_which_streams_it_makes_public(redis_url, clickhouse_url):
    """With dashboard_origins set, a warning at start names the projects whose live stream is public."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        values = {"dashboard_origins": "shop=https://app.example.com, blog=https://app.example.com"}
        async with running_daemon(settings(redis_url, clickhouse_url, **values)):
            pass
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [line for line in lines if line.startswith("dashboard_origins: the live streams of blog, shop are")]
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


@pytest_twisted.ensureDeferred
async def test_one_key_check_at_a_time(redis_url, clickhouse_url):
    """A second auth sent before the first was answered refuses the dashboard: a socket cannot keep many
    key checks (a hash and a Redis read each) in flight."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        dash = await connect(daemon.port, path="/dashboard?projectId=p1")
        assert (await dash.next())["type"] == "connected"
        for n in range(5):
            dash.send({"type": "auth", "apiKey": f"bk_{n:043d}"})
        assert await dash.next() == {"type": "error", "code": "unauthorized",
                                     "message": "One auth at a time: wait for the answer"}
        assert (await dash.wait_closed())[0] == 1008
