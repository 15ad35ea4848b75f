"""The local spool: acked while Redis is away, replayed in order, once, when it is back.

The first tests drive ``Spool`` on real files; the others run the daemon
against real Redis and ClickHouse servers and stop Redis underneath it.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs

from bklit.keys import SCRIPT_PREFIXES, STREAM, applied as applied_key
from bklit.queue import OperationRefused, StreamProducer
from bklit.redis_client import RedisUnavailable
from bklit.records import HEADER, decode
from bklit.spool import Spool, SpoolError, SpoolFull
from harness import clickhouse_rows, eventually, health, redis_connection, running_daemon, sdk_pageview, settings
from loadgen import close, expected_rows, message, open_client, send_acked, session_of, stored

OPS = [["E", "entry-%d" % n, "channel", "message é %d" % n] for n in range(10)]


_open_spools = []


def opened(directory, max_bytes=1 << 20, **kwargs):
    """A started spool on ``directory`` (closed after the test if it still runs)."""
    spool = Spool(str(directory), max_bytes, reactor, **kwargs)
    spool.open()
    spool.start()
    _open_spools.append(spool)
    return spool


@pytest_twisted.async_yield_fixture(autouse=True)
async def _close_spools():
    yield
    while _open_spools:
        spool = _open_spools.pop()
        if spool._pool.started:
            await spool.close()


def everything(spool):
    """Every operation in the spool, oldest first."""
    ops = []
    for name in sorted(spool.sizes):
        offset = 0
        while True:
            more, offset = spool.read(name, offset, 3)
            if not more:
                break
            ops.extend(more)
    return ops


@pytest_twisted.ensureDeferred
async def test_appended_operations_read_back_in_order_after_a_restart(tmp_path):
    """What was appended (and synced) is read back in order, also by a spool opened later."""
    spool = opened(tmp_path)
    await defer.gatherResults([spool.append(OPS[:4]), spool.append(OPS[4:])])
    assert everything(spool) == OPS
    assert spool.size == sum(os.path.getsize(tmp_path / name) for name in spool.sizes) > 0
    await spool.close()

    again = opened(tmp_path)
    assert everything(again) == OPS and not again.empty
    await again.append([["X", "p", "s", "", "1", "1", "timeout", "", ""]])
    assert everything(again)[-1][0] == "X"
    await again.close()


@pytest_twisted.ensureDeferred
async def test_nothing_is_appended_once_closed(tmp_path):
    """After close (shutdown) an append fails instead of writing a file nobody syncs or replays now."""
    spool = opened(tmp_path)
    await spool.close()
    with pytest.raises(SpoolError, match="closed"):
        await spool.append(OPS[:1])
    assert not list(tmp_path.glob("*.spool"))


@pytest_twisted.ensureDeferred
async def test_an_incomplete_last_record_is_cut_when_opened(tmp_path):
    """A crash in the middle of a write leaves a torn record: it is removed, the rest kept."""
    spool = opened(tmp_path)
    await spool.append(OPS[:3])
    name = spool.oldest()
    await spool.close()
    whole = os.path.getsize(tmp_path / name)
    with open(tmp_path / name, "ab") as handle:
        handle.write(HEADER.pack(100, 0) + b'["E","cut')
    again = opened(tmp_path)
    assert os.path.getsize(tmp_path / name) == whole
    assert everything(again) == OPS[:3]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_one_daemon_per_directory(tmp_path):
    """A second spool on the same directory is refused with a one-line reason."""
    first = opened(tmp_path)
    with pytest.raises(SpoolError, match="in use by another bklit process"):
        Spool(str(tmp_path), 1 << 20, reactor).open()
    await first.close()
    opened(tmp_path)._unlock()


@pytest_twisted.ensureDeferred
async def test_past_the_cap_nothing_is_written_and_it_is_logged_once(tmp_path):
    """An append that would pass max_bytes fails whole; the refusal is logged once; room again clears it."""
    spool = opened(tmp_path, max_bytes=400)
    await spool.append(OPS[:4])
    size = spool.size
    with capturedLogs() as logged:
        for _ in range(5):
            with pytest.raises(SpoolFull):
                await spool.append(OPS)
    assert spool.size == size and everything(spool) == OPS[:4] and spool.trouble == "full"
    assert len([e for e in logged if "cap" in e.get("message", "")]) == 1
    spool.remove(spool.oldest())
    await spool.append(OPS[:1])
    assert spool.trouble == "" and everything(spool) == OPS[:1]
    await spool.close()


@pytest_twisted.ensureDeferred
async def test_segments_rotate_and_are_removed_oldest_first(tmp_path):
    """Past segment_bytes a new segment starts; names sort in append order; remove deletes the file."""
    spool = opened(tmp_path, segment_bytes=100)
    for op in OPS:
        await spool.append([op])
    names = sorted(spool.sizes)
    assert len(names) > 3 and spool.oldest() == names[0]
    assert everything(spool) == OPS
    spool.remove(names[0])
    assert not (tmp_path / names[0]).exists() and spool.oldest() == names[1]
    for name in names[1:]:
        spool.remove(name)
    assert spool.empty and spool.oldest() is None
    await spool.append(OPS[:1])  # the tail was removed: a new segment starts
    assert everything(spool) == OPS[:1] and spool.oldest() not in names
    await spool.close()


@pytest_twisted.ensureDeferred
async def test_a_damaged_record_in_the_middle_stops_the_read(tmp_path):
    """A record whose checksum fails is not replayed as something else."""
    spool = opened(tmp_path)
    await spool.append(OPS[:3])
    name = spool.oldest()
    data = bytearray((tmp_path / name).read_bytes())
    _, second = decode(bytes(data), 0)
    data[second + HEADER.size + 2] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(data))
    ops, offset = spool.read(name, 0, 10)
    assert ops == OPS[:1] and offset == second
    with pytest.raises(SpoolError, match="damaged"):
        spool.read(name, offset, 10)
    await spool.close()


DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys
    from twisted.internet import defer, task
    from twisted.logger import LogLevel, capturedLogs
    from bklit.spool import Spool, SpoolError

    async def main(reactor):
        spool = Spool(sys.argv[1], 1 << 30, reactor)
        spool.open()
        spool.start()
        await spool.append([["E", "x" * 1000, "", ""]])
        # Files may not grow past 3000 bytes now: the kernel refuses the write (EFBIG).
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
        refused = 0
        with capturedLogs() as logged:
            for _ in range(5):
                try:
                    await spool.append([["E", "y" * 1000, "", ""], ["E", "z" * 1000, "", ""]])
                except SpoolError:
                    refused += 1
        errors = [event for event in logged if event["log_level"] == LogLevel.error]
        size_when_full = spool.size
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await spool.append([["E", "w", "", ""]])
        name = spool.oldest()
        ops, _ = spool.read(name, 0, 10)
        await spool.close()
        print(json.dumps({"refused": refused, "logged": len(errors), "size_when_full": size_when_full,
                          "kept": [op[1][:1] for op in ops], "trouble": spool.trouble}))

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


def test_a_disk_error_refuses_whole_batches_logged_once(tmp_path):
    """A write the kernel refuses (file size limit) fails the batch whole, logs once, and leaves no torn record."""
    result = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["refused"] == 5 and report["logged"] == 1
    assert report["kept"] == ["x", "w"] and report["trouble"] == ""
    assert report["size_when_full"] < 3000


@pytest_twisted.ensureDeferred
async def test_a_failed_batch_of_heartbeats_alone_does_not_stop_later_replays(redis_server, redis_url, tmp_path):
    """Heartbeats are never spooled: their failure spools nothing, and the next failed batch still replays."""
    async with redis_connection(redis_url) as redis:
        producer = StreamProducer(redis, reactor, spool=opened(tmp_path))
        await deferToThread(redis_server.stop)
        try:
            assert await producer.heartbeat("p1", "s1", 1) == 0
            await eventually(lambda: not producer.spooling)  # nothing was spooled
            assert await producer.enqueue('{"n":1}') == "spooled"
            assert producer.spooling
        finally:
            await deferToThread(redis_server.start)
        await eventually(lambda: not producer.spooling, timeout=15)
        assert [fields for _, fields in await redis.call("XRANGE", STREAM, "-", "+")] == [["e", '{"n":1}']]
        await producer.drain()


class LosingReplies:
    """The real Redis, but the replies of the next ``lose`` script calls never arrive (as if cut off)."""

    def __init__(self, redis, lose):
        self.redis = redis
        self.lose = lose

    def eval(self, script, keys, args):
        d = self.redis.eval(script, keys, args)
        if self.lose:
            self.lose -= 1
            d.addCallback(lambda _: defer.fail(RedisUnavailable("TimeoutError: no reply (the test cut it)")))
        return d

    def call(self, command, *args):
        return self.redis.call(command, *args)


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_reply_was_lost_is_not_applied_twice(redis_server, redis_url, tmp_path):
    """Redis applied a batch but its reply was lost: spooled with its number, the replay skips it."""
    async with redis_connection(redis_url) as redis:
        producer = StreamProducer(LosingReplies(redis, lose=1), reactor, spool=opened(tmp_path))
        entries = [f'{{"n":{n}}}' for n in range(3)]
        replies = await defer.gatherResults([producer.enqueue(entry) for entry in entries])
        assert replies == ["spooled"] * 3
        await eventually(lambda: not producer.spooling, timeout=10)
        assert [fields[1] for _, fields in await redis.call("XRANGE", STREAM, "-", "+")] == entries
        assert (await producer.enqueue('{"n":3}')).count("-") == 1  # straight to Redis again: a stream id
        assert await redis.call("XLEN", STREAM) == 4
        await producer.drain()


SCRIPT_HEADER = ("resume window", *SCRIPT_PREFIXES)  # the batch script's first arguments


class HeldReplays(LosingReplies):
    """The real Redis; the first script call's reply is lost, and later numbered calls wait for ``release``."""

    def __init__(self, redis):
        super().__init__(redis, lose=1)
        self.held = []

    def eval(self, script, keys, args):
        if self.lose or args[len(SCRIPT_HEADER)][0] != "S":  # the first operation's code
            return super().eval(script, keys, args)
        held = defer.Deferred()
        self.held.append(held)
        return held.addCallback(lambda _: self.redis.eval(script, keys, args))

    def release(self):
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


@pytest_twisted.ensureDeferred
async def test_heartbeats_reach_redis_while_the_spool_replays(redis_server, redis_url, tmp_path):
    """While spooling (the replay held up here) a heartbeat still refreshes its session's score in Redis."""
    async with redis_connection(redis_url) as redis:
        held = HeldReplays(redis)
        producer = StreamProducer(held, reactor, spool=opened(tmp_path))
        await redis.call("ZADD", "live:sessions:p1", "1000", "s1")
        assert await producer.enqueue('{"n":1}') == "spooled"  # its reply was lost: spooling
        await eventually(lambda: held.held)
        assert producer.spooling
        assert await producer.heartbeat("p1", "s1", 5000) == 0
        assert await redis.call("ZSCORE", "live:sessions:p1", "s1") == "5000"
        held.release()
        await eventually(lambda: not producer.spooling, timeout=10)
        assert await redis.call("XLEN", STREAM) == 1
        await producer.drain()


@pytest_twisted.ensureDeferred
async def test_a_batch_refused_out_of_memory_is_spooled_and_applied_once(redis_server, redis_url, tmp_path):
    """Redis at maxmemory answers OOM: the batch was not applied; it is spooled, then applied when there is room."""
    async with redis_connection(redis_url) as redis:
        producer = StreamProducer(redis, reactor, spool=opened(tmp_path))
        redis_server.execute("CONFIG", "SET", "maxmemory", "1")
        try:
            assert await producer.enqueue('{"n":1}') == "spooled"
            assert producer.spooling and await redis.call("XLEN", STREAM) == 0
        finally:
            redis_server.execute("CONFIG", "SET", "maxmemory", "0")
        await eventually(lambda: not producer.spooling, timeout=10)
        assert [fields for _, fields in await redis.call("XRANGE", STREAM, "-", "+")] == [["e", '{"n":1}']]
        await producer.drain()


@pytest_twisted.ensureDeferred
async def test_an_operation_redis_refuses_is_refused_alone_not_spooled(redis_server, redis_url, tmp_path):
    """An error that would come back on every replay (here a key of the wrong type) refuses that operation."""
    async with redis_connection(redis_url) as redis:
        producer = StreamProducer(redis, reactor, spool=opened(tmp_path))
        await redis.call("SET", STREAM, "not a stream")
        with pytest.raises(OperationRefused, match="WRONGTYPE"):
            await producer.enqueue('{"n":1}')
        assert not producer.spooling and producer.spool.empty
        await producer.drain()


@pytest_twisted.ensureDeferred
async def test_a_damaged_segment_is_moved_aside_and_the_rest_replayed(redis_server, redis_url, tmp_path):
    """A segment whose records cannot be read no longer blocks the spool: set aside, the others replayed."""
    spool = opened(tmp_path, segment_bytes=30)
    for n in range(3):
        await spool.append([["S", "k", str(n + 1)], ["E", f'{{"n":{n}}}', "", ""]])
    names = sorted(spool.sizes)
    assert len(names) == 3
    await spool.close()
    damaged = bytearray((tmp_path / names[1]).read_bytes())
    damaged[HEADER.size + 1] ^= 0xFF
    (tmp_path / names[1]).write_bytes(bytes(damaged))
    async with redis_connection(redis_url) as redis:
        producer = StreamProducer(redis, reactor, spool=opened(tmp_path))
        producer.start()
        await eventually(lambda: not producer.spooling, timeout=10)
        assert [fields[1] for _, fields in await redis.call("XRANGE", STREAM, "-", "+")] == ['{"n":0}', '{"n":2}']
        assert set(os.listdir(tmp_path)) == {"id", "lock", names[1] + ".damaged"}
        await producer.drain()


# With the daemon -------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_redis_down_events_are_acked_from_the_spool_then_replayed_once(redis_server, redis_url, clickhouse_url):
    """Redis stops: events are still acked (spool), a known key still opens sockets, /healthz says degraded;
    back: each event stored once, sessions in order."""
    async with running_daemon(settings(redis_url, clickhouse_url, health_interval="0.1")) as daemon:
        key = await daemon.token("p1")
        clients = [await open_client(daemon.port, session_of(n), key) for n in range(3)]
        acked = await send_acked(clients[0], [message(0, 0, key)])
        await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0)  # stored and acked
        await deferToThread(redis_server.stop)
        try:
            clients.append(await open_client(daemon.port, session_of(3), key))  # a known key: still good
            for n, client in enumerate(clients):
                acked.update(await send_acked(client, [message(n, i, key) for i in range(1, 30)]))
            assert daemon.service.producer.spooling and daemon.service.spool.size > 0
            await close(clients[2])  # its session ends while Redis is away
            code, report = await _degraded(daemon.port)
            assert code == 200 and report["spool"]["spooling"] is True
            assert "Redis does not answer" in report["warnings"]
        finally:
            await deferToThread(redis_server.start)
        await eventually(lambda: daemon.service.spool.empty and not daemon.service.producer.spooling, timeout=20)
        acked.update(await send_acked(clients[0], [message(0, 30, key)]))  # straight to Redis again
        assert not daemon.service.producer.spooling

        pageviews, events = expected_rows(acked)
        await eventually(lambda: (set(stored(clickhouse_url)[0]), set(stored(clickhouse_url)[1])) ==
                         (pageviews, events) or None, timeout=20)
        raw_pageviews, raw_events = stored(clickhouse_url, final=False)
        assert sorted(raw_pageviews) == sorted(pageviews) and sorted(raw_events) == sorted(events)
        # Sessions replayed in order: the one closed during the outage ended, after its pageviews.
        ended = await eventually(lambda: clickhouse_rows(clickhouse_url, (
            "SELECT session_id, pageviews, end_reason FROM tracked_session FINAL WHERE ended_at IS NOT NULL")))
        closed_pageviews = sum(1 for m in acked.values() if m["type"] == "pageview"
                               and m["data"]["sessionId"] == session_of(2))
        assert ended == [(session_of(2), closed_pageviews, "disconnect")] and closed_pageviews > 10
        written = daemon.service.metrics.spool_operations.labels("written")._value.get()
        replayed = daemon.service.metrics.spool_operations.labels("replayed")._value.get()
        assert written == replayed > 0
        await close(clients[0], clients[1], clients[3])


async def _degraded(port, timeout=10.0):
    """The first /healthz report that says the node is spooling."""
    for _ in range(int(timeout / 0.1)):
        code, report = await health(port)
        if report.get("status") == "degraded" and report.get("spool", {}).get("spooling"):
            return code, report
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"/healthz never said spooling: {report}")


@pytest_twisted.ensureDeferred
async def test_a_restart_replays_the_spool_skipping_batches_redis_applied(redis_server, redis_url, clickhouse_url,
                                                                          tmp_path):
    """Events spooled by a daemon that stopped are replayed by the next; batches Redis applied are skipped."""
    config = settings(redis_url, clickhouse_url, spool_dir=str(tmp_path / "spool"))
    try:
        async with running_daemon(config) as daemon:  # stops while Redis is away: nothing replayed
            key = await daemon.token("p1")
            client = await open_client(daemon.port, session_of(1), key)
            await deferToThread(redis_server.stop)
            acked = await send_acked(client, [message(1, i, key) for i in range(12)], in_flight=1)
            client.sendClose()
            await client.wait_closed()
    finally:
        await deferToThread(redis_server.start)
    spool = Spool(config.spool_dir, 1 << 20, reactor)
    spool.open()
    name = spool.oldest()
    assert name is not None
    ops, _ = spool.read(name, 0, 100)
    spool._unlock()
    numbers = [op for op in ops if op[0] == "S"]
    assert len(numbers) == 13  # one batch a message (one in flight at a time), and the close
    # As if Redis had applied the first four batches (a replay that crashed, or lost replies).
    redis_server.execute("SET", applied_key(spool.id), numbers[3][2])
    first = ops[:ops.index(numbers[4])]
    skipped = {label(op) for op in first if op[0] in ("E", "P")}

    async with running_daemon(config) as daemon:
        await eventually(lambda: daemon.service.spool.empty, timeout=20)
        rest = {i: m for i, m in acked.items() if m["data"].get("url", m["data"].get("trackingId")) not in skipped}
        pageviews, events = expected_rows(rest)
        await eventually(lambda: (set(stored(clickhouse_url)[0]), set(stored(clickhouse_url)[1])) ==
                         (pageviews, events) or None, timeout=20)
        assert len(rest) == len(acked) - 4
    assert sorted(os.listdir(config.spool_dir)) == ["id", "lock"]


def label(op):
    """The url or tracking id of a spooled pageview or event operation."""
    record = json.loads(op[1]) if op[0] in ("E", "P") else {"row": {}}
    return record["row"].get("url") or record["row"].get("tracking_id")


@pytest_twisted.ensureDeferred
async def test_a_full_spool_refuses_with_overloaded_and_loses_nothing_acked(redis_server, redis_url, clickhouse_url):
    """Past spool_max_bytes events get ``overloaded`` (no ack); every acked one is stored once Redis is back."""
    async with running_daemon(settings(redis_url, clickhouse_url, spool_max_bytes="64K",
                                       rate_limit="100000", rate_burst="100000")) as daemon:
        key = await daemon.token("p1")
        client = await open_client(daemon.port, session_of(1), key)
        await deferToThread(redis_server.stop)
        acked, refused = {}, []
        try:
            for i in range(200):
                msg = sdk_pageview("p1", session_of(1), key=key, url=f"https://example.com/full/{i}")
                client.send(msg)
                reply = await client.next()
                if reply["type"] == "ack":
                    acked[reply["eventId"]] = msg
                else:
                    assert reply["type"] == "error" and reply["code"] == "overloaded", reply
                    refused.append(msg)
            assert acked and len(refused) > 50
            assert daemon.service.spool.size <= 64 * 1024 and daemon.service.spool.trouble == "full"
        finally:
            await deferToThread(redis_server.start)
        pageviews, _ = expected_rows(acked)
        await eventually(lambda: set(stored(clickhouse_url)[0]) == pageviews or None, timeout=30)
        assert len(stored(clickhouse_url, final=False)[0]) == len(acked)
        await close(client)
