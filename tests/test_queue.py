"""StreamProducer against a real Redis: one script call per reactor turn, ids in order, fast failure.

``CountingRedis`` is the real ``RedisService`` with a count of the script
calls made through it; Redis's own ``INFO commandstats`` confirms what went
over the wire.
"""

import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from bklit.keys import SCRIPT_PREFIXES, STREAM, session_state
from bklit.entries import Visitor
from bklit.geo import NOWHERE
from bklit.ops import pageview_op
from bklit.queue import StreamProducer
from bklit.redis_client import RedisUnavailable

from harness import eventually, redis_connection

REPLY_TIMEOUT = 5.0
HEADER = ("resume window", *SCRIPT_PREFIXES)  # the batch script's first arguments


def within(d, seconds=REPLY_TIMEOUT + 1):
    """``d``, failing with a timeout instead of hanging the test when it never fires."""
    return d.addTimeout(seconds, reactor)


class CountingRedis:
    """Passes calls to a real ``RedisService`` and records each script call's operation count."""

    def __init__(self, redis):
        self.redis = redis
        self.script_calls = []

    def eval(self, script, keys, args):
        self.script_calls.append(len(args) - len(HEADER))  # the header, then one argument per operation
        return self.redis.eval(script, keys, args)

    def call(self, command, *args):
        return self.redis.call(command, *args)



def command_calls(redis_server, *commands):
    """How many times Redis ran each of ``commands`` since the last CONFIG RESETSTAT."""
    stats = redis_server.execute("INFO", "commandstats").decode()
    calls = dict.fromkeys(commands, 0)
    for line in stats.splitlines():
        name, _, rest = line.partition(":")
        command = name.removeprefix("cmdstat_")
        if command in calls:
            calls[command] = int(rest.split(",")[0].removeprefix("calls="))
    return calls


def stream_key(stream_id):
    """A stream id as a sortable ``(ms, seq)``."""
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


@pytest_twisted.ensureDeferred
async def test_one_turn_is_one_script_call_and_ids_come_in_order(redis_server, redis_url):
    """100 entries enqueued in one turn go in one Redis call; each Deferred fires with its id, in order."""
    async with redis_connection(redis_url, REPLY_TIMEOUT) as redis:
        counting = CountingRedis(redis)
        producer = StreamProducer(counting, reactor)
        redis_server.execute("CONFIG", "RESETSTAT")
        entries = [f'{{"n":{n}}}' for n in range(100)]
        ids = await within(defer.gatherResults([producer.enqueue(entry) for entry in entries]))

        assert counting.script_calls == [100]
        assert command_calls(redis_server, "eval", "evalsha", "xadd") == {"eval": 1, "evalsha": 0, "xadd": 100}
        assert [stream_key(i) for i in ids] == sorted(stream_key(i) for i in ids)
        assert len(set(ids)) == 100
        stored = await redis.call("XRANGE", STREAM, "-", "+")
        assert stored == [[stream_id, ["e", entry]] for stream_id, entry in zip(ids, entries)]


@pytest_twisted.ensureDeferred
async def test_each_turn_is_its_own_call_and_large_turns_are_split_in_order(redis_server, redis_url):
    """A later turn makes its own call; a turn over ``max_batch`` becomes several calls, still in order."""
    async with redis_connection(redis_url, REPLY_TIMEOUT) as redis:
        counting = CountingRedis(redis)
        producer = StreamProducer(counting, reactor, max_batch=30)
        redis_server.execute("CONFIG", "RESETSTAT")
        first = [producer.enqueue(f'{{"turn":1,"n":{n}}}') for n in range(100)]
        first_ids = await within(defer.gatherResults(first))
        second_ids = await within(defer.gatherResults([producer.enqueue(f'{{"turn":2,"n":{n}}}') for n in range(5)]))

        assert counting.script_calls == [30, 30, 30, 10, 5]
        calls = command_calls(redis_server, "eval", "evalsha", "xadd")
        assert calls["eval"] + calls["evalsha"] == 5 and calls["xadd"] == 105
        ids = first_ids + second_ids
        assert [stream_key(i) for i in ids] == sorted(stream_key(i) for i in ids) and len(set(ids)) == 105
        stored = await redis.call("XRANGE", STREAM, "-", "+")
        assert [stream_id for stream_id, _ in stored] == ids


@pytest.mark.parametrize("outage", ["stopped", "killed_before_the_call"])
@pytest_twisted.ensureDeferred
async def test_redis_down_fails_every_pending_entry_quickly(outage, redis_server, redis_url):
    """With Redis gone every pending Deferred fails with RedisUnavailable at once, not after the 5 s timeout.

    ``stopped``: the connection loss is already known.  ``killed_before_the
    _call``: Redis dies after the entries were enqueued, before the turn's
    call is sent, so the call goes out on a dead connection.
    """
    async with redis_connection(redis_url, REPLY_TIMEOUT) as redis:
        producer = StreamProducer(redis, reactor)
        assert await within(producer.enqueue('{"n":"before"}'))
        if outage == "stopped":
            await deferToThread(redis_server.stop)
            await eventually(lambda: not redis.connected)
            started = time.monotonic()
            pending = [producer.enqueue(f'{{"n":{n}}}') for n in range(20)]
        else:
            started = time.monotonic()
            pending = [producer.enqueue(f'{{"n":{n}}}') for n in range(20)]
            redis_server.kill()  # in this turn, before the producer's call goes out
            assert redis.connected  # the loss is not noticed yet: the call is sent to a dead server
        outcomes = await within(defer.DeferredList(pending, consumeErrors=True))
        elapsed = time.monotonic() - started

        assert [ok for ok, _ in outcomes] == [False] * 20
        assert all(failure.check(RedisUnavailable) for _, failure in outcomes), outcomes[0][1]
        assert elapsed < 1.0, elapsed

        await deferToThread(redis_server.start)
        await eventually(lambda: redis.connected, timeout=15)
        after = await within(producer.enqueue('{"n":"after"}'))
        stored = await redis.call("XRANGE", STREAM, "-", "+")
        assert [fields for _, fields in stored] == [["e", '{"n":"before"}'], ["e", '{"n":"after"}']]
        assert stored[-1][0] == after


@pytest_twisted.ensureDeferred
async def test_an_old_pageview_is_scored_live_now_but_keeps_its_times(redis_server, redis_url):
    """A pageview timed an hour ago (as replayed from a spool) starts its session then, scored live now."""
    async with redis_connection(redis_url, REPLY_TIMEOUT) as redis:
        producer = StreamProducer(redis, reactor)
        hour_ago = int(time.time() * 1000) - 3_600_000
        before = int(time.time() * 1000)
        visitor = Visitor.of("p1", "s1", "sock", "", NOWHERE)
        await within(producer.apply(pageview_op('{"n":1}', visitor, hour_ago, "https://e.com/", "", "")))
        score = float(await redis.call("ZSCORE", "live:sessions:p1", "s1"))
        assert before - 1000 <= score <= time.time() * 1000 + 1000
        assert int(await redis.call("HGET", session_state("p1", "s1"), "started_at")) == hour_ago
