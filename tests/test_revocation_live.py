"""Revocation and expiry reach open sockets: two daemon nodes on one real Redis.

``bklit token revoke`` (the real command) and ``TokenStore.revoke`` publish
the key's SHA-256; every node closes the SDK and dashboard sockets opened
with it.  A message missed while a node's pub/sub connection was away is
made up for by the re-check after it resubscribes.  The token cache is set
far longer than any of these tests, so only the revocation itself can make
a node see it.
"""

import time
from contextlib import AsyncExitStack

import pytest_twisted
from twisted.internet.threads import deferToThread

from bklit.keys import REVOKED_CHANNEL
from bklit.tokens import TokenStore, key_digest, token_key
from catalogue import GOOD_ADDRESS, GOOD_SESSION, GoodClient, close, open_client
from harness import bklit, connect, eventually, open_dashboard, sdk_client, two_nodes

REVOKED = {"type": "error", "code": "unauthorized", "message": "API key revoked"}
LONG_CACHE = {"token_cache_ttl": "600"}


async def sockets_of(nodes, key, read):
    """On each node: an SDK socket (acked once) opened with ``key`` and a dashboard opened with ``read``."""
    sdks, dashboards = [], []
    for n, node in enumerate(nodes):
        session = f"1732608000000-revok{n}"
        sdk = await sdk_client(node.port, key, session=session)
        sdk.send({"type": "event", "apiKey": key, "data": {"trackingId": "t", "eventType": "e"}})
        assert (await sdk.next())["type"] == "ack"
        sdks.append(sdk)
        dashboards.append((await open_dashboard(node.port, read))[0])
    return sdks, dashboards


async def good_clients(nodes, key):
    """A well-behaved SDK socket on each node (test_bad_input's GoodClient), acked once."""
    goods = [GoodClient(await open_client(node.port, GOOD_SESSION, key, headers=GOOD_ADDRESS), key)
             for node in nodes]
    for good in goods:
        await good.more_acks(1)
    return goods


async def refused(client, message=REVOKED, timeout=1.0):
    """``client`` gets ``message`` (skipping live events) and is closed 1008, within ``timeout`` seconds each."""
    assert await client.next_of("error", timeout=timeout) == message
    assert (await client.wait_closed(timeout=timeout))[0] == 1008


async def stop(goods):
    """More acks for each good client, then stop them (none waited a second for an ack)."""
    for good in goods:
        await good.more_acks(2)
    for good in goods:
        await good.stop()
        await close(good.client)


@pytest_twisted.ensureDeferred
async def test_revoking_closes_the_keys_sockets_on_every_node(redis_url, clickhouse_url):
    """``bklit token revoke`` closes the key's SDK sockets on both nodes, TokenStore.revoke a read key's
    dashboards, each within a second; new sockets with either key are refused at once on both nodes;
    the good clients beside keep their acks and their dashboards their live events."""
    async with AsyncExitStack() as stack:
        nodes = await two_nodes(stack, redis_url, clickhouse_url, **LONG_CACHE)
        a = nodes[0]
        key, read = await a.token("p1"), await a.token("p1", scope="read")
        good_key, good_read = await a.token("p1"), await a.token("p1", scope="read")
        sdks, dashboards = await sockets_of(nodes, key, read)
        watching = [(await open_dashboard(node.port, good_read))[0] for node in nodes]
        goods = await good_clients(nodes, good_key)

        done = await deferToThread(bklit, "token", "revoke", key, "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        for sdk in sdks:
            await refused(sdk)

        store = TokenStore(a.service.redis.call)
        [token] = await store.find(read)
        started = time.monotonic()
        await store.revoke(token)
        for dash in dashboards:
            await refused(dash)
        assert time.monotonic() - started < 1.0

        for node in nodes:
            replay = await connect(node.port, path="/?projectId=p1&sessionId=1732608000000-replay")
            await replay.next_of("connected")
            replay.send({"type": "auth", "apiKey": key})
            await refused(replay)
            replay_dash = await connect(node.port, path="/dashboard?projectId=p1",
                                        headers={"Authorization": f"Bearer {read}"})
            await refused(replay_dash)
            await eventually(lambda: len(node.service.ingest.open_keys) == 2)  # good_key and good_read

        for good, dash in zip(goods, watching):
            await good.more_acks(1)
            last = good.acked[-1][0]
            while (await dash.next_of("pageview"))["data"]["eventId"] != last:
                pass
        await stop(goods)
        await close(*watching)


@pytest_twisted.ensureDeferred
async def test_revocation_missed_while_resubscribing_is_caught_by_the_recheck(redis_server, redis_url,
                                                                            clickhouse_url):
    """The nodes' pub/sub connections are killed (CLIENT KILL TYPE pubsub) and two keys revoked before they
    are back, their messages heard by nobody: once resubscribed, each node checks its sockets' keys again
    and closes the SDK sockets and dashboards of both; the good clients keep their acks."""
    async with AsyncExitStack() as stack:
        nodes = await two_nodes(stack, redis_url, clickhouse_url, **LONG_CACHE)
        a = nodes[0]
        key, read, good_key = await a.token("p1"), await a.token("p1", scope="read"), await a.token("p1")
        sdks, dashboards = await sockets_of(nodes, key, read)
        goods = await good_clients(nodes, good_key)

        digests = [key_digest(key), key_digest(read)]
        replies = redis_server.pipeline([("CLIENT", "KILL", "TYPE", "pubsub")] + [
            command for digest in digests for command in (
                ("HSET", token_key(digest), "revoked", "1"), ("PUBLISH", REVOKED_CHANNEL, digest))])
        assert replies[0] == 2  # one subscriber per node
        assert replies[2::2] == [0, 0]  # published to nobody: the messages are lost
        started = time.monotonic()
        for client in sdks + dashboards:
            await refused(client, timeout=10)  # txredisapi reconnects after about a second
        assert time.monotonic() - started < 5
        await stop(goods)


@pytest_twisted.ensureDeferred
async def test_expiry_closes_open_dashboards_at_its_time(redis_url, clickhouse_url):
    """A read key expiring while its dashboards are open, one on each node, closes both at the expiry:
    "API key expired", 1008."""
    async with AsyncExitStack() as stack:
        nodes = await two_nodes(stack, redis_url, clickhouse_url, **LONG_CACHE)
        expires_at = time.time() + 1.5
        read = await nodes[0].token("p1", scope="read", expires_at=expires_at)
        dashboards = [(await open_dashboard(node.port, read))[0] for node in nodes]
        for dash in dashboards:
            await refused(dash, {"type": "error", "code": "unauthorized", "message": "API key expired"}, timeout=5)
            late = time.time() - expires_at
            assert -0.01 < late < 0.5, late
        for node in nodes:
            await eventually(lambda: len(node.service.dashboards.open_keys) == 0)
