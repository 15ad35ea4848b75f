"""Limits: the token bucket, admission per client and in all, lockouts, timeouts, compression bombs."""

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from bklit.limits import Admission, Denied, ProjectBudgets, TokenBucket, client_key
from harness import connect, running_daemon, sdk_pageview, settings


def test_token_bucket_allows_burst_then_rate():
    """A full bucket gives ``burst`` at once, then ``rate`` a second."""
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.advance(10)
    assert sum(bucket.take() for _ in range(10)) == 3


def admission(clock, **overrides):
    values = dict(max_total=3, max_per_client=2, max_auth_failures=3, failure_window=60, lockout=300)
    values.update(overrides)
    return Admission(clock, **values)


def test_admission_per_client_and_total():
    """Per-client and total limits refuse with 429 and 503; releasing makes room again."""
    gate = admission(Clock())
    gate.admit("a")
    gate.admit("a")
    with pytest.raises(Denied) as e:
        gate.admit("a")
    assert e.value.status == 429
    gate.admit("b")
    with pytest.raises(Denied) as e:
        gate.admit("c")
    assert e.value.status == 503
    gate.release("a")
    gate.admit("c")
    assert gate.total == 3 and gate.per_client == {"a": 1, "b": 1, "c": 1}


def test_lockout_after_failures_within_the_window():
    """Three failures within the window lock the client out for ``lockout`` seconds; old ones do not count."""
    clock = Clock()
    gate = admission(clock, max_total=100)
    assert gate.auth_failed("x") is False
    clock.advance(61)
    assert gate.auth_failed("x") is False
    assert gate.auth_failed("x") is False
    assert gate.auth_failed("x") is True
    with pytest.raises(Denied) as e:
        gate.admit("x")
    assert e.value.status == 429
    gate.admit("y")
    clock.advance(301)
    gate.admit("x")


def test_client_key_groups_ipv6_by_64():
    """IPv6 addresses of one /64 are one client; IPv4-mapped addresses count as IPv4."""
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert client_key("203.0.113.5") == "203.0.113.5"


async def sdk(port, key=None, **kwargs):
    client = await connect(port, **kwargs)
    await client.next_of("connected")
    if key:
        client.send({"type": "auth", "apiKey": key})
        assert (await client.next())["type"] == "auth_success"
    return client


@pytest_twisted.ensureDeferred
async def test_rate_limit_drops_messages_over_the_bucket(redis_url, clickhouse_url):
    """burst 3, rate 1/s: the 4th message at once is rate_limited and not acked; later ones pass again."""
    async with running_daemon(settings(redis_url, clickhouse_url, rate_limit="1", rate_burst="3")) as daemon:
        key = await daemon.token("p1")
        client = await sdk(daemon.port)
        client.send({"type": "auth", "apiKey": key})  # 1
        client.send(sdk_pageview("p1", key=key))  # 2
        client.send(sdk_pageview("p1", key=key))  # 3
        client.send(sdk_pageview("p1", key=key))  # 4: over
        replies = [await client.next() for _ in range(4)]
        kinds = sorted(r["type"] if r["type"] != "error" else r["code"] for r in replies)
        assert kinds == ["ack", "ack", "auth_success", "rate_limited"]
        await task.deferLater(reactor, 1.1, lambda: None)
        client.send(sdk_pageview("p1", key=key))
        assert (await client.next())["type"] == "ack"


@pytest_twisted.ensureDeferred
async def test_connections_per_ip_and_in_all(redis_url, clickhouse_url):
    """Past max_connections_per_ip the upgrade gets 429; past max_connections, 503; a close frees a place."""
    async with running_daemon(settings(redis_url, clickhouse_url, max_connections_per_ip="2",
                                       max_connections="3")) as daemon:
        first, second = await sdk(daemon.port), await sdk(daemon.port)
        with pytest.raises(ConnectionError, match=r"\[429\]"):
            await connect(daemon.port)
        # a trusted proxy's forwarded address is another client; an untrusted one's header is ignored
        with pytest.raises(ConnectionError, match=r"\[429\]"):
            await connect(daemon.port, headers={"X-Forwarded-For": "198.51.100.7"})
        first.sendClose()
        await first.wait_closed()
        third = await sdk(daemon.port)
        assert third.close_code is None
        for client in (second, third):
            client.sendClose()
            await client.wait_closed()

    async with running_daemon(settings(redis_url, clickhouse_url, max_connections="2",
                                       trusted_proxies="127.0.0.1")) as daemon:
        clients = [await sdk(daemon.port, headers={"X-Forwarded-For": f"198.51.100.{n}"}) for n in (1, 2)]
        with pytest.raises(ConnectionError, match=r"\[503\]"):
            await connect(daemon.port, headers={"X-Forwarded-For": "198.51.100.3"})
        for client in clients:
            client.sendClose()
            await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_repeated_bad_keys_lock_the_address_out(redis_url, clickhouse_url):
    """After auth_failures_max refused keys, that address's upgrades get 429; others are unaffected."""
    values = {"auth_failures_max": "3", "trusted_proxies": "127.0.0.1"}
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        attacker = {"X-Forwarded-For": "203.0.113.9"}
        for _ in range(3):
            client = await sdk(daemon.port, headers=attacker)
            client.send({"type": "auth", "apiKey": "bk_guess"})
            assert (await client.next())["code"] == "unauthorized"
            await client.wait_closed()
        with pytest.raises(ConnectionError, match=r"\[429\]"):
            await connect(daemon.port, headers=attacker)
        key = await daemon.token("p1")
        good = await sdk(daemon.port, key=key, headers={"X-Forwarded-For": "198.51.100.1"})
        good.sendClose()
        await good.wait_closed()


def _silent_socket(port, send=b""):
    """Connect, send ``send`` and then nothing; return seconds until the server closed it."""
    import time

    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    started = time.monotonic()
    if send:
        sock.sendall(send)
    try:
        while sock.recv(1024):
            pass
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return time.monotonic() - started


@pytest.mark.parametrize("send", [b"", b"GET /?projectId=p1&sessionId=s HTTP/1.1\r\nHost: x\r\n"])
@pytest_twisted.ensureDeferred
async def test_silent_or_slow_handshakes_are_dropped(send, redis_url, clickhouse_url):
    """A connection that never finishes its upgrade (slowloris) is dropped after handshake_timeout."""
    async with running_daemon(settings(redis_url, clickhouse_url, handshake_timeout="0.5")) as daemon:
        took = await deferToThread(_silent_socket, daemon.port, send)
        assert 0.4 < took < 5


@pytest_twisted.ensureDeferred
async def test_compression_bomb_closes_1009(redis_url, clickhouse_url):
    """With compression on, a message that inflates past the limit closes with 1009."""
    from autobahn.twisted.websocket import WebSocketClientFactory
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponse, \
        PerMessageDeflateResponseAccept
    from twisted.internet.endpoints import clientFromString

    from harness import SocketClient

    async with running_daemon(settings(redis_url, clickhouse_url, compression="true")) as daemon:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{daemon.port}/?projectId=p1&sessionId=s1")
        factory.protocol = SocketClient
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=lambda r: PerMessageDeflateResponseAccept(r)
            if isinstance(r, PerMessageDeflateResponse) else None)
        client = await clientFromString(reactor, f"tcp:127.0.0.1:{daemon.port}").connect(factory)
        await client.opened
        await client.next_of("connected")
        assert client._perMessageCompress is not None
        client.send('{"type":"auth","apiKey":"' + "a" * 200_000 + '"}')
        code, _ = await client.wait_closed()
        assert code == 1009


def test_a_network_cannot_take_every_socket():
    """Per /64 the client cap; per /56 a quarter of the network cap, per /48 (or IPv4 /24) all of it."""
    gate = admission(Clock(), max_total=1000, max_per_client=100, max_per_network=8)
    for n in range(2):  # two /64s of one /56: its quarter (2)
        gate.admit(client_key(f"2001:db8:0:{n}::1"))
    with pytest.raises(Denied) as e:
        gate.admit(client_key("2001:db8:0:2::1"))
    assert (e.value.status, e.value.reason) == (429, "Too many connections from this network")
    for n in range(6):  # other /56s of the same /48, up to 8 in all
        gate.admit(client_key(f"2001:db8:0:{(n + 1) * 256:x}::1"))
    with pytest.raises(Denied):
        gate.admit(client_key("2001:db8:0:ff00::1"))
    gate.admit(client_key("2001:db8:1::1"))  # another /48
    for n in range(8):
        gate.admit(f"203.0.113.{n}")
    with pytest.raises(Denied):
        gate.admit("203.0.113.200")
    gate.admit("198.51.100.1")
    gate.release(client_key("2001:db8:0:0::1"))
    gate.admit(client_key("2001:db8:0:2::1"))  # room again in that /56
    for key in list(gate.per_client):
        for _ in range(gate.per_client[key]):
            gate.release(key)
    assert gate.total == 0 and gate.per_client == {} and gate.per_network == {}


def test_failure_records_are_bounded_and_purged():
    """Failure records are kept for at most max_records clients and dropped once their window passed."""
    clock = Clock()
    gate = admission(clock, max_total=100)
    gate.max_records = 1000
    for n in range(5000):
        gate.auth_failed(f"198.51.{n // 256}.{n % 256}")
    assert len(gate.failures) == 1000
    clock.advance(61)
    gate.purge()
    assert gate.failures == {}
    for _ in range(3):
        gate.auth_failed("x")
    assert list(gate.locked) == ["x"]
    clock.advance(301)
    gate.purge()
    assert gate.locked == {}


def test_project_budgets():
    """Per project: open sockets up to the cap; distinct new session ids a minute up to the cap, a known id
    again is free; both counts come back."""
    clock = Clock()
    budgets = ProjectBudgets(clock, max_sockets=3, sessions_per_minute=2)
    assert budgets.open("p", "s1") is None and budgets.open("p", "s2") is None
    assert budgets.open("p", "s3") == "This project starts too many sessions a minute on this server"
    assert budgets.open("p", "s1") is None  # the same tab again
    assert budgets.open("p", "s2") == "This project has too many open sockets on this server"
    assert budgets.open("q", "s3") is None  # another project
    budgets.close("p")
    clock.advance(60)
    assert budgets.open("p", "s3") is None
    budgets.purge()
    assert set(budgets.sessions) == {"p"}
    for project, count in list(budgets.sockets.items()):
        for _ in range(count):
            budgets.close(project)
    assert budgets.sockets == {}
    clock.advance(60)
    budgets.purge()
    assert budgets.sessions == {}
