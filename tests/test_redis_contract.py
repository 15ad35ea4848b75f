"""One contract, two Redis: ``FakeRedis`` answers as a real Redis (through ``RedisService``) does.

Every test here runs twice, against the fake of the pure tests and against
the session's redis-server, so a pure test that passes on the fake would
pass on Redis too.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from bklit.redis_client import RedisUnavailable
from bklit.tokens import TokenStore
from fakes import FakeRedis
from harness import redis_connection


@pytest_twisted.async_yield_fixture(params=["fake", "real"])
async def redis(request):
    """A ``call`` and a way to take Redis away: the fake's, or a real connection's."""
    if request.param == "fake":
        fake = FakeRedis(reactor)

        def down():
            fake.down = True

        yield fake.call, down
        return
    redis_url = request.getfixturevalue("redis_url")
    async with redis_connection(redis_url) as service:
        yield service.call, service.stopService


@pytest_twisted.ensureDeferred
async def test_hashes(redis):
    call, _ = redis
    assert await call("HSET", "h", "a", "1", "b", "2") == 2
    assert await call("HSET", "h", "a", "3", "c", "4") == 1  # only new fields count
    flat = await call("HGETALL", "h")
    assert dict(zip(flat[::2], flat[1::2])) == {"a": "3", "b": "2", "c": "4"}
    assert await call("HGETALL", "missing") == []


@pytest_twisted.ensureDeferred
async def test_sets_and_publish(redis):
    call, _ = redis
    assert await call("SADD", "s", "x", "y") == 2
    assert await call("SADD", "s", "y", "z") == 1
    assert sorted(await call("SMEMBERS", "s")) == ["x", "y", "z"]
    assert await call("SMEMBERS", "missing") == []
    assert await call("PUBLISH", "nobody-listens", "m") == 0


@pytest_twisted.ensureDeferred
async def test_a_reply_comes_on_a_later_turn(redis):
    call, _ = redis
    replies = []
    d = call("SADD", "s", "x").addCallback(replies.append)
    assert replies == []
    await d
    assert replies == [1]


@pytest_twisted.ensureDeferred
async def test_down_fails_at_once_with_redis_unavailable(redis):
    call, down = redis
    await defer.maybeDeferred(down)
    d = call("SMEMBERS", "s")
    assert d.called
    with pytest.raises(RedisUnavailable):
        await d


@pytest_twisted.ensureDeferred
async def test_the_token_store_on_it(redis):
    call, _ = redis
    store = TokenStore(call)
    key, token = await store.create(("p1",), "ingest", "site")
    assert await store.find(key) == [token]
    assert [t.id for t in await store.list()] == [token.id]
    await store.revoke(token)
    assert (await store.get(token.digest)).revoked
