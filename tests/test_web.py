"""Plain HTTP on the listening port, against a real daemon.

No status page, no redirects, no version banner on the WebSocket paths;
deadlines, keep-alive, size and connection limits, and no log line a
stranger can cause per request.  A raw client (``Raw``) writes exactly the
bytes given, over TCP or TLS, and records what comes back and when the
connection ended.  Its factories are not noisy, so every log line a test
sees comes from the daemon.
"""

import json
import re
import time
from contextlib import contextmanager

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import Agent, PartialDownloadError, readBody

from bklit.httpd import Refusals
from bklit.metrics import Metrics
from harness import TIMEOUT, connect, eventually, running_daemon, settings
from tlscerts import CertificateAuthority


@pytest.mark.parametrize("path", ["/", "/?redirect=https%3A%2F%2Fevil.example%2F", "/dashboard?projectId=p1",
                                  "/any/path?redirect=https%3A%2F%2Fevil.example%2F&after=0"])
@pytest_twisted.ensureDeferred
async def test_get_without_upgrade_is_refused_plainly(path, redis_url, clickhouse_url):
    """426 Upgrade Required: not Autobahn's status page, which would redirect to any ?redirect= URL."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{daemon.port}{path}".encode())
        try:
            body = await readBody(response)
        except PartialDownloadError as e:  # the error page has no length; the connection ends it
            body = e.response
        assert response.code == 426
        assert not response.headers.hasHeader(b"location")
        assert b"evil.example" not in body and b"Autobahn" not in body
        assert b"Autobahn" not in b"".join(response.headers.getRawHeaders(b"server", []))


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: bklit\r\n\r\n"


class Raw(protocol.Protocol):
    """Sends ``send`` on connect; keeps everything received; ``lost`` fires with the time it ended."""

    def __init__(self, send=b""):
        self.send = send
        self.received = b""
        self.lost = defer.Deferred()
        self.open = False
        self._waiting = []

    def connectionMade(self):
        self.open = True
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data):
        self.received += data
        self._check()

    def connectionLost(self, reason):
        self.open = False
        self.lost.callback(time.monotonic())
        for _, d in self._waiting:
            d.errback(ConnectionError(f"closed after {self.responses()} answers: {self.received[-300:]!r}"))
        self._waiting = []

    def responses(self):
        return self.received.count(b"HTTP/1.1 ")

    def answered(self, count=1):
        """Fires once ``count`` responses (in all) came in."""
        d = defer.Deferred()
        self._waiting.append((count, d))
        self._check()
        return d.addTimeout(TIMEOUT, reactor)

    def _check(self):
        for item in [w for w in self._waiting if self.responses() >= w[0]]:
            self._waiting.remove(item)
            item[1].callback(self.received)

    def closed(self):
        return self.lost.addTimeout(TIMEOUT, reactor)


async def open_raw(port, send=b"", tls=None):
    """A connected ``Raw``; ``tls``: client TLS options (wss-like) or None (plain)."""
    raw = Raw(send)
    factory = protocol.Factory.forProtocol(lambda: raw)
    factory.noisy = False
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    await endpoint.connect(factory)
    return raw


async def sleep(seconds):
    await task.deferLater(reactor, seconds, lambda: None)


@contextmanager
def logged():
    """The daemon's log events while in the block, as (level, text)."""
    lines = []

    def observe(event):
        lines.append((event.get("log_level"), formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def refused(daemon, reason):
    return daemon.service.metrics.http_refused.labels(reason)._value.get()


def bad_lines(lines):
    return [(level, text) for level, text in lines if level in (LogLevel.warn, LogLevel.error, LogLevel.critical)]


@pytest.fixture
def ca():
    return CertificateAuthority()


@pytest_twisted.ensureDeferred
async def test_https_that_never_becomes_a_websocket_logs_nothing_and_is_closed(ca, tmp_path, redis_url,
                                                                                 clickhouse_url):
    """/healthz over TLS, failed TLS handshakes and bare connects: closed, and no line past handshake_timeout.

    (The handshake expiry used to fire on connections already lost and hit
    their torn-down TLS layer: a critical traceback for each, 5 s later.)
    """
    cert, key = ca.server(tmp_path)
    config = settings(redis_url, clickhouse_url, tls_cert=str(cert), tls_key=str(key), handshake_timeout="0.5")
    with logged() as lines:
        async with running_daemon(config) as daemon:
            trusted = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca.pem()))
            health = await open_raw(daemon.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                    tls=trusted)
            await health.closed()
            assert health.received.startswith(b"HTTP/1.1 200 OK\r\n")
            stranger = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(CertificateAuthority().pem()))
            wrong_ca = await open_raw(daemon.port, b"GET /healthz HTTP/1.1\r\n\r\n", tls=stranger)
            garbage = await open_raw(daemon.port, b"\x16\x03\x01\x00\x05hello" * 10)
            gone_away = await open_raw(daemon.port)
            gone_away.transport.loseConnection()
            silent = await open_raw(daemon.port)
            started = time.monotonic()
            for raw in (wrong_ca, garbage, gone_away):
                await raw.closed()
            assert await silent.closed() - started < 3
            await sleep(1.5)  # past handshake_timeout of every one of them
            assert daemon.service.http_limits.open == 0
    assert bad_lines(lines) == []


@pytest_twisted.ensureDeferred
async def test_a_connection_in_use_is_kept_and_an_idle_one_closed(redis_url, clickhouse_url):
    """Keep-alive: requests every 0.4 s for 3.2 s outlive handshake_timeout (1 s); then idle 1 s closes it."""
    config = settings(redis_url, clickhouse_url, handshake_timeout="1", http_idle_timeout="1")
    async with running_daemon(config) as daemon:
        raw = await open_raw(daemon.port)
        for n in range(1, 9):
            raw.transport.write(HEALTHZ)
            await raw.answered(n)
            await sleep(0.4)
        assert raw.open and raw.received.count(b"HTTP/1.1 200 OK\r\n") == 8
        answered = time.monotonic()
        idle = await raw.closed() - answered
        assert 0.5 < idle < 2.5, idle
        assert refused(daemon, "slow_request") == 0


@pytest.mark.parametrize("first", [b"", HEALTHZ], ids=["new", "kept_alive"])
@pytest_twisted.ensureDeferred
async def test_a_request_that_trickles_in_is_dropped(first, redis_url, clickhouse_url):
    """Slowloris: a byte every 0.1 s never resets the clock; the request must be in within handshake_timeout."""
    config = settings(redis_url, clickhouse_url, handshake_timeout="0.6", http_idle_timeout="5")
    async with running_daemon(config) as daemon:
        raw = await open_raw(daemon.port, first)
        if first:
            await raw.answered(1)
        started = time.monotonic()
        trickle = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
        for byte in trickle:
            if not raw.open:
                break
            raw.transport.write(bytes([byte]))
            await sleep(0.1)
        took = await raw.closed() - started
        assert 0.4 < took < 2.5, took
        assert raw.responses() == (1 if first else 0)
        assert refused(daemon, "slow_request") == 1


# name: (request, answer)
TOO_LARGE = {
    "long_url": (b"GET /?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"HTTP/1.1 414 URI Too Long\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", "uri_too_long"),
    "long_header": (b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 20000 + b"\r\n\r\n",
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                    "headers_too_large"),
    "headers_over_16k": (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 500) for n in range(40))
                         + b"\r\n",
                         b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                         "headers_too_large"),
    "six_hundred_headers": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % n for n in range(600)) + b"\r\n",
                            b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                            b"Content-Length: 0\r\n\r\n", "headers_too_large"),
}


@pytest.mark.parametrize("case", list(TOO_LARGE))
@pytest_twisted.ensureDeferred
async def test_oversized_requests_are_answered_then_closed(case, redis_url, clickhouse_url):
    """An over-long request line gets 414, over-large headers 431; then the connection closes."""
    request, answer, reason = TOO_LARGE[case]
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        raw = await open_raw(daemon.port, request)
        await raw.closed()
        assert raw.received == answer
        assert refused(daemon, reason) == 1


async def held(port, count, send=HEALTHZ):
    """``count`` kept-alive connections, each answered once."""
    raws = [await open_raw(port, send) for _ in range(count)]
    for raw in raws:
        await raw.answered(1)
    return raws


@pytest_twisted.ensureDeferred
async def test_plain_http_connections_per_address_are_capped(redis_url, clickhouse_url):
    """Past max_http_connections_per_ip HTTP connections from one address, more are closed at once;
    WebSockets do not count, and a closed connection gives its place back."""
    config = settings(redis_url, clickhouse_url, max_http_connections_per_ip="3", http_idle_timeout="30")
    async with running_daemon(config) as daemon:
        sockets = [await connect(daemon.port) for _ in range(3)]  # upgraded: counted by the WebSocket admission
        raws = await held(daemon.port, 3)
        started = time.monotonic()
        extra = await open_raw(daemon.port, HEALTHZ)
        assert await extra.closed() - started < 1
        assert extra.received == b""
        assert refused(daemon, "too_many_connections") == 1
        raws[0].transport.loseConnection()
        await raws[0].closed()
        await eventually(lambda: daemon.service.http_limits.clients.open == {"127.0.0.1": 2})
        [again] = await held(daemon.port, 1)
        assert again.open
        for raw in raws[1:] + [again]:
            raw.transport.loseConnection()
        for client in sockets:
            client.sendClose()
            await client.wait_closed()
        await eventually(lambda: daemon.service.http_limits.open == 0)


@pytest_twisted.ensureDeferred
async def test_trusted_proxies_are_not_capped(redis_url, clickhouse_url):
    """A trusted proxy's connections carry many clients: none of them is refused."""
    config = settings(redis_url, clickhouse_url, max_http_connections_per_ip="2", trusted_proxies="127.0.0.1",
                      http_idle_timeout="30")
    async with running_daemon(config) as daemon:
        raws = await held(daemon.port, 4)
        assert all(raw.open for raw in raws)
        assert refused(daemon, "too_many_connections") == 0
        for raw in raws:
            raw.transport.loseConnection()


def proxied(source, rest=HEALTHZ):
    return f"PROXY TCP4 {source} 127.0.0.1 40000 8080\r\n".encode() + rest


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_the_proxied_address_is_counted(redis_url, clickhouse_url):
    """On a haproxy: listener the cap counts the PROXY-protocol source address, not haproxy's."""
    config = settings(redis_url, clickhouse_url, max_http_connections_per_ip="2", http_idle_timeout="30")
    config = config.replace(listen="haproxy:tcp:0:interface=127.0.0.1")
    async with running_daemon(config) as daemon:
        first = [await open_raw(daemon.port, proxied("203.0.113.7")) for _ in range(2)]
        for raw in first:
            await raw.answered(1)
        extra = await open_raw(daemon.port, proxied("203.0.113.7"))
        await extra.closed()
        assert extra.received == b"", extra.received
        other = await open_raw(daemon.port, proxied("198.51.100.2"))
        await other.answered(1)
        assert daemon.service.http_limits.clients.open == {"203.0.113.7": 2, "198.51.100.2": 1}
        for raw in first + [other]:
            raw.transport.loseConnection()


def head_blocks(received):
    """The header blocks of pipelined HEAD answers (no bodies between them)."""
    blocks = received.split(b"\r\n\r\n")
    assert blocks[-1] == b""
    return blocks[:-1]


@pytest_twisted.ensureDeferred
async def test_heads_and_failed_upgrades_are_counted_not_logged(redis_url, clickhouse_url):
    """500 HEAD /healthz and 200 failed upgrades (SDK and dashboard): a line at most, every one counted."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        with logged() as lines:
            for _ in range(5):
                raw = await open_raw(daemon.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
                blocks = head_blocks(await raw.answered(100))
                assert len(blocks) == 100
                assert all(re.search(rb"\r\nContent-Length: [1-9][0-9]*(\r\n|$)", block) for block in blocks)
                raw.transport.loseConnection()
            for path in (b"/?projectId=p1&sessionId=s1", b"/dashboard?projectId=p1") * 100:
                raw = await open_raw(daemon.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                await raw.closed()
                assert raw.received.startswith(b"HTTP/1.1 426 ")
            for method in (b"POST", b"DELETE", b"BREW"):
                raw = await open_raw(daemon.port, method + b" /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                await raw.answered(1)
                assert raw.received.startswith(b"HTTP/1.1 405 ")
                raw.transport.loseConnection()
        assert len(lines) <= 2, lines
        assert all("127.0.0.1" not in text for _, text in lines)
        assert refused(daemon, "sdk_upgrade") == 100
        assert refused(daemon, "dashboard_upgrade") == 100
        assert refused(daemon, "bad_method") == 3


@pytest.mark.parametrize("networks,whole", [("127.0.0.0/8", True), ("10.0.0.0/8", False)])
@pytest_twisted.ensureDeferred
async def test_healthz_in_full_only_to_metrics_networks(networks, whole, redis_url, clickhouse_url):
    """Outside metrics_networks /healthz says only its status, with the same code."""
    async with running_daemon(settings(redis_url, clickhouse_url, metrics_networks=networks)) as daemon:
        await eventually(lambda: daemon.service.health.state["status"] != "starting")
        raw = await open_raw(daemon.port, HEALTHZ)
        await raw.answered(1)
        head, _, body = raw.received.partition(b"\r\n\r\n")
        report = json.loads(body)
        code = int(head.split()[1])
        assert code == (200 if report["status"] in ("ok", "degraded") else 503)
        if whole:
            assert {"status", "redis", "clickhouse", "connections", "warnings"} <= set(report)
        else:
            assert report == {"status": daemon.service.health.state["status"]}
        raw.transport.loseConnection()


def test_refusals_log_at_most_once_per_interval_with_the_counts_since():
    """The first refusal is logged at once; the next ones together when the interval ends."""
    clock = task.Clock()
    metrics = Metrics()
    refusals = Refusals(clock, metrics.http_refused, interval=60)
    with logged() as lines:
        refusals.note("bad_request")
        for _ in range(500):
            refusals.note("sdk_upgrade")
        refusals.note("bad_request")
        assert [text for _, text in lines if "HTTP refusals" in text] == [
            "HTTP refusals since the last such line: bad_request 1 (bklit_http_refused counts them all;"
            " logged at most once every 60 s)"]
        clock.advance(60)
        assert "bad_request 1, sdk_upgrade 500" in lines[-1][1]
        clock.advance(600)
        assert len(lines) == 2
        refusals.note("bad_method")
        assert len(lines) == 3 and "bad_method 1" in lines[-1][1]
    assert metrics.http_refused.labels("sdk_upgrade")._value.get() == 500
    assert metrics.http_refused.labels("bad_request")._value.get() == 2
