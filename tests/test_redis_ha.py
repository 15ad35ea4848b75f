"""Redis high availability: Sentinel failover, WAIT for replicas, ACL users.

Every test runs real processes: a primary with replicas and Debian's
redis-sentinel (``servers.RedisSet``), or a redis-server with an ACL user.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from bklit.addresses import parse_redis_url
from bklit.keys import STREAM, live_channel
from bklit.queue import SPOOLED, StreamProducer
from bklit.redis_client import RedisService, disconnect, subscriber
from bklit.spool import Spool
from harness import (clickhouse_rows, eventually, health, open_dashboard, redis_connection, running_daemon, sdk_client,
                     sdk_pageview, settings)
from servers import RedisServer, RedisSet

BIN = Path(sys.executable).parent
# The user README.rst suggests: its keys and channels, no dangerous command but two.
ACL = ["user default off",
       "user bklit on >s3cret ~bklit:* ~live:sessions:* &bklit:* +@all -@dangerous +config|get +role"]


@pytest.fixture
def redis_set(tmp_path):
    """A primary, one replica and a Sentinel (service ``bklit``), stopped after the test."""
    servers = RedisSet(tmp_path / "redis", replicas=1)
    yield servers.start()
    servers.cleanup()


@pytest.fixture
def acl_redis(tmp_path):
    """A redis-server whose only user is ``bklit`` (password ``s3cret``): the default user is off."""
    server = RedisServer(tmp_path / "acl", settings=ACL, auth=("bklit", "s3cret"))
    yield server.start()
    server.cleanup()


def bklit(*args, env=None):
    """Run the ``bklit`` command; its completed process."""
    return subprocess.run([str(BIN / "bklit"), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(BIN), **(env or {})})


class Messages(txredisapi.SubscriberProtocol):
    """A subscriber that keeps what it receives in ``factory.received``, subscribing on connect."""

    def connectionMade(self):
        d = super().connectionMade()
        return d.addCallback(lambda _: self.subscribe(self.factory.channel))

    def messageReceived(self, pattern, channel, message):
        self.factory.received.append(message)


async def published(redis, channel, message, received):
    """Publish until a subscriber got ``message`` (it may still be subscribing)."""
    async def got():
        await redis.call("PUBLISH", channel, message)
        return message in received
    for _ in range(100):
        if await got():
            return
        await pause(0.1)
    raise AssertionError(f"{message!r} never arrived")


def pause(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_sentinel_url_finds_the_primary(redis_set):
    """The service, its pub/sub and the command line reach the primary the Sentinel names."""
    primary = redis_set.primary()
    async with redis_connection(redis_set.url) as redis:
        assert redis.primary == f"127.0.0.1:{primary.port}"
        assert (await redis.call("ROLE"))[0] == "master"
        await redis.call("SET", "where", "primary")
        received = []
        handler = subscriber(parse_redis_url(redis_set.url), Messages, 5, channel="news", received=received)
        try:
            await published(redis, "news", "hello", received)
        finally:
            await disconnect(handler)
    assert primary.execute("GET", "where") == b"primary"

    made = await deferToThread(bklit, "token", "create", "--project", "p1", "--redis", redis_set.url)
    assert made.returncode == 0, made.stderr
    assert primary.execute("DBSIZE") >= 2  # the token's hash beside "where"
    down = await deferToThread(bklit, "queue", "status", "--redis", "redis+sentinel://127.0.0.1:1/bklit/0")
    assert down.returncode != 0 and "cannot reach the primary of 'bklit'" in down.stderr


@pytest_twisted.ensureDeferred
async def test_daemon_follows_a_sentinel_failover(redis_set, clickhouse_url):
    """After SENTINEL FAILOVER ingest, the writer, dashboards' pub/sub, tokens and /healthz use the new primary."""
    old = redis_set.primary()
    values = settings(redis_set.url, clickhouse_url, health_interval="0.2", token_cache_ttl="0")
    async with running_daemon(values) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read)
        client = await sdk_client(daemon.port, key)
        client.send(sdk_pageview("p1", key=key, url="https://example.com/before"))
        before = await client.next_of("ack")
        assert (await dash.next())["data"]["eventId"] == before["eventId"]

        await deferToThread(redis_set.sentinel.execute, "SENTINEL", "FAILOVER", "bklit")
        new = await deferToThread(redis_set.wait_failover, old)
        await eventually(lambda: daemon.service.redis.primary == f"127.0.0.1:{new.port}", timeout=20)

        fresh = await daemon.token("p1")  # written to the new primary, read back from it below
        await eventually(lambda: new.execute("PUBSUB", "NUMSUB", live_channel("p1"))[1] == 1, timeout=20)
        again = await sdk_client(daemon.port, fresh, session="1732608000000-after")
        again.send(sdk_pageview("p1", "1732608000000-after", key=fresh, url="https://example.com/after"))
        after = await again.next_of("ack")
        live = await dash.next()
        assert live["data"]["eventId"] == after["eventId"]  # pub/sub resubscribed on the new primary

        rows = await eventually(lambda: len(clickhouse_rows(
            clickhouse_url, "SELECT id FROM page_view_event FINAL")) == 2 and clickhouse_rows(
            clickhouse_url, "SELECT id FROM page_view_event FINAL"), timeout=30)
        assert {row[0] for row in rows} == {before["eventId"], after["eventId"]}
        reports = [(await health(daemon.port))[1] for _ in range(3) if not await pause(0.3)]
        assert reports[-1]["redis_primary"] == f"127.0.0.1:{new.port}", reports
        await eventually(lambda: new.execute("XLEN", STREAM) == 0, timeout=20)  # the writer drains the new primary
        for socket in (client, again, dash):
            socket.sendClose()
            await socket.wait_closed()


def producer_on(redis, spool_dir, min_replicas=1, timeout=2.0):
    """A started StreamProducer with a spool that waits ``timeout`` seconds for ``min_replicas`` replicas.

    0.3 s was missed now and then while other tests loaded both cores: the
    replica, starved, confirmed late and the first batch spooled.
    """
    spool = Spool(str(spool_dir), 1 << 20, reactor)
    spool.open()
    producer = StreamProducer(redis, reactor, spool=spool, min_replicas=min_replicas, replica_timeout=timeout)
    producer.start()
    return producer


@pytest_twisted.ensureDeferred
async def test_wait_for_a_replica_acks_spools_and_replays(redis_set, tmp_path):
    """With a replica, batches are acked from Redis; without it they spool; back, the spool replays once."""
    primary, [replica] = redis_set.servers[0], redis_set.servers[1:]
    await eventually(lambda: b"master_link_status:up" in replica.execute("INFO", "replication"), timeout=20)
    async with redis_connection(primary.url) as redis:
        producer = producer_on(redis, tmp_path / "spool")
        try:
            replies = await defer.gatherResults([producer.enqueue(f"entry-{n}") for n in range(5)])
            assert all(reply != SPOOLED["E"] for reply in replies) and not producer.spooling
            assert replica.execute("XLEN", STREAM) == 5  # WAIT said so before the acks

            await deferToThread(replica.stop)
            replies = await defer.gatherResults([producer.enqueue(f"late-{n}") for n in range(5)])
            assert replies == [SPOOLED["E"]] * 5 and producer.spooling
            await pause(1.5)  # replays run meanwhile, and are not confirmed either: the spool keeps them
            assert producer.spooling and not producer.spool.empty

            await deferToThread(replica.start)
            await eventually(lambda: not producer.spooling and producer.spool.empty, timeout=30)
            entries = [fields[1] for _, fields in await redis.call("XRANGE", STREAM, "-", "+")]
            # The unconfirmed batch was applied once: its replay was skipped by its number.
            assert entries == [f"entry-{n}" for n in range(5)] + [f"late-{n}" for n in range(5)]
            await eventually(lambda: replica.execute("XLEN", STREAM) == 10)
        finally:
            await producer.drain()


@pytest_twisted.ensureDeferred
async def test_acl_user(acl_redis, clickhouse_url):
    """redis://user:password@ authenticates as that user: the daemon, pub/sub and the command line.

    The user is README.rst's (only ``bklit:*`` keys, no dangerous command
    but ``CONFIG GET`` and ``ROLE``): enough for ingest, dashboards, the
    writer and the health check.
    """
    url = f"redis://bklit:s3cret@127.0.0.1:{acl_redis.port}/0"
    made = await deferToThread(bklit, "token", "create", "--project", "p1", env={"BKLIT_REDIS": url})
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    config = settings(acl_redis.url, clickhouse_url, health_interval="0.2").replace(redis=url)  # not a flag
    async with running_daemon(config) as daemon:
        assert await daemon.service.redis.call("ACL", "WHOAMI") == "bklit"
        read = await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read)
        client = await sdk_client(daemon.port, key)
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next_of("ack")
        assert (await dash.next())["data"]["eventId"] == ack["eventId"]
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event")
                         == [(ack["eventId"],)], timeout=20)
        code, report = await health(daemon.port)
        assert code == 200 and report["redis"]["persistence"] == "aof-always", report
        for socket in (client, dash):
            socket.sendClose()
            await socket.wait_closed()

    wrong = RedisService(parse_redis_url(f"redis://bklit:wrong@127.0.0.1:{acl_redis.port}/0"), 2)
    wrong.startService()
    try:
        with pytest.raises(Exception, match="WRONGPASS|could not auth"):
            await wrong.ready().addTimeout(10, reactor)
        assert not wrong.connected
    finally:
        await wrong.stopService()
    nobody = await deferToThread(bklit, "token", "create", "--project", "p1",
                                 env={"BKLIT_REDIS": f"redis://127.0.0.1:{acl_redis.port}/0"})
    assert nobody.returncode != 0 and "NOAUTH" in nobody.stderr
