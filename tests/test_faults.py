"""The fault suite: outages and crashes under load lose nothing acked and count nothing twice.

Each case runs the daemon as ``twistd`` subprocesses against the real Redis
and ClickHouse, puts 50 SDK sockets (one session each) under a steady load
of 10 messages a second each, applies its fault in the middle, and then
checks in ClickHouse that every acked event id is stored exactly once and no
message is stored under two ids (``faults.FaultCase.finish``).  The servers
are the session's: a case that stops or kills one starts it again, and the
next test finds them running.  ``make faults`` runs only these; the table of
what each fault did is printed at the end and written to
``.run/fault-report.md``.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from bklit import rows, wire
from bklit.clickhouse import thd_migrate
from bklit.ids import EventIds
from bklit.keys import DEAD_STREAM, GROUP, STREAM

from faults import CONNECTIONS, PROJECT, FaultCase, Node, pause, session_id, thd_stored_ids
from harness import clickhouse_rows, redis_connection

pytestmark = pytest.mark.fault

HALF = range(CONNECTIONS // 2)
OTHER_HALF = range(CONNECTIONS // 2, CONNECTIONS)


@pytest.fixture
def fault_case(tmp_path, redis_server, redis_url, clickhouse_server, clickhouse_url):
    """Makes this test's ``FaultCase``: Redis emptied, a ClickHouse database of its own."""
    def make(fault: str, **options) -> FaultCase:
        return FaultCase(fault, tmp_path, redis_server, clickhouse_server, clickhouse_url, **options)
    return make


@pytest_twisted.ensureDeferred
async def test_redis_stopped_for_10_s(fault_case, redis_server):
    """Redis stopped for 10 s: the node spools and acks, then replays into the stream; nothing refused."""
    async with fault_case("Redis stopped 10 s, then restarted", load_seconds=14) as case:
        node = await case.node("all").start()
        await case.start_load(node)
        await case.at(2)
        await deferToThread(redis_server.stop)
        case.fault_began()
        await pause(10)
        await deferToThread(redis_server.start)
        case.fault_ended()
        await case.finish()
        case.note(f"{case.acked_during_fault()} acked while Redis was down")
        case.expect(case.acked_during_fault() > 0, "nothing acked while Redis was down (no spool?)")


@pytest_twisted.ensureDeferred
async def test_redis_killed(fault_case, redis_server):
    """Redis SIGKILLed (AOF, appendfsync always) and restarted: the gap is spooled, nothing acked is lost."""
    async with fault_case("Redis SIGKILL, then restarted") as case:
        node = await case.node("all").start()
        await case.start_load(node)
        await case.at(4)
        await deferToThread(redis_server.kill)
        case.fault_began()
        await pause(1)
        await deferToThread(redis_server.start)
        case.fault_ended()
        await case.finish()


@pytest_twisted.ensureDeferred
async def test_clickhouse_stopped_for_20_s(fault_case, clickhouse_server):
    """ClickHouse stopped for 20 s: ingest goes on, events wait in the stream, the writer catches up.

    Every session's end row (its highest version) wins FINAL: ``finish``
    checks that each session with a pageview ended with reason ``disconnect``.
    """
    async with fault_case("ClickHouse stopped 20 s, then restarted") as case:
        node = await case.node("all").start()
        await case.start_load(node)
        await case.at(3)
        await deferToThread(clickhouse_server.stop)
        case.fault_began()
        await pause(20)
        await deferToThread(clickhouse_server.start)
        case.fault_ended()
        await case.finish()
        case.note(f"{case.acked_during_fault()} acked while ClickHouse was down")
        case.expect(case.acked_during_fault() > 0, "ingest stopped acking while ClickHouse was down")


async def kill_mid_batch(writer: Node, redis_url: str) -> int:
    """SIGKILL ``writer`` while it holds a batch read but not acked; returns how many entries.

    The writer is frozen (SIGSTOP) while the pending count is read, so the
    batch seen is the one it dies with.  Until the writer has made its
    consumer group (after its migrations, slow on a loaded machine) nothing
    is pending.
    """
    deadline = time.monotonic() + 30
    async with redis_connection(redis_url) as redis:
        while not (await redis.call("EXISTS", STREAM) and await redis.call("XINFO", "GROUPS", STREAM)):
            if time.monotonic() > deadline:
                raise AssertionError("the writer never made its consumer group")
            await pause(0.1)
        while time.monotonic() < deadline:
            writer.signal(signal.SIGSTOP)
            pending = int((await redis.call("XPENDING", STREAM, GROUP))[0])
            if pending:
                await writer.kill()
                return pending
            writer.signal(signal.SIGCONT)
            await pause(0.03)
    raise AssertionError("the writer never held a batch")


@pytest_twisted.ensureDeferred
async def test_writer_killed_mid_batch(fault_case, redis_url):
    """A writer SIGKILLed with a batch pending; its restart (a new consumer) reclaims the batch.

    Rows inserted before the kill but never acked are inserted again and
    merged by event id: ``finish`` counts each id once, FINAL and merged.
    """
    async with fault_case("writer SIGKILL mid-batch, then restarted") as case:
        ingest = await case.node("ingest", "ingest").start()
        writer = await case.node("writer", "writer", claim_idle="2").start()
        await case.start_load(ingest)
        await case.at(4)
        pending = await kill_mid_batch(writer, redis_url)
        case.fault_began()
        case.note(f"{pending} entries pending at the kill")
        await pause(1)
        await writer.start()
        case.fault_ended()
        await case.finish()


@pytest_twisted.ensureDeferred
async def test_ingest_node_killed(fault_case, redis_server):
    """An ingest node SIGKILLed while its events go to the spool, then restarted.

    Nodes A and B share the load; Redis stops, so both spool; A is killed;
    Redis returns and A restarts on its spool, replaying it.  A's sockets
    are gone without a close: the sweeper ends their sessions (``timeout``);
    B's end normally (``disconnect``).
    """
    sessions = {"session_timeout": "6", "sweep_interval": "0.5", "heartbeat_interval": "0.5"}
    async with fault_case("ingest node SIGKILL (spooling), then restarted", server_closes=True) as case:
        a = await case.node("ingest-a", "ingest", **sessions).start()
        b = await case.node("ingest-b", "ingest", **sessions).start()
        await case.node("writer", "writer").start()
        await case.start_load(a, HALF)
        await case.start_load(b, OTHER_HALF)
        await case.at(3)
        await deferToThread(redis_server.stop)
        case.fault_began()
        await pause(2)
        await a.kill()
        await deferToThread(redis_server.start)
        await a.start()
        case.fault_ended()
        case.session_reasons.update({n: "timeout" for n in HALF})
        await case.finish()
        closed = case.load.server_closed()
        case.expect(set(closed) == set(HALF), f"sockets closed by the server: {sorted(closed)}, expected node A's")
        spooled = case.acked_during_fault(HALF)
        case.note(f"node A acked {spooled} while Redis was down")
        case.expect(spooled > 0, "node A acked nothing while Redis was down (no spool?)")


@pytest_twisted.ensureDeferred
async def test_sigterm_under_load(fault_case):
    """SIGTERM: every socket closed with 1001, exit within 10 s, nothing acked lost, nothing stored unacked."""
    async with fault_case("SIGTERM under load", server_closes=True) as case:
        node = await case.node("all").start()
        await case.start_load(node)
        await case.at(5)
        case.fault_began()
        code, took = await node.terminate()
        await case.load.wait_closed(5)
        case.note(f"exit {took:.1f} s after SIGTERM")
        case.expect(took < 10, f"exit took {took:.1f} s")
        case.expect(code in (0, -signal.SIGTERM), f"exit status {code}:\n{node.log_tail()}")
        codes = case.load.server_closed()
        case.expect(len(codes) == CONNECTIONS and set(codes.values()) == {1001}, f"close codes {codes}")
        await case.node("drain", "writer").start()
        case.fault_ended()
        outcome = await case.finish()
        # The sockets stop reading first; what they had read is stored and its acks go out before 1001.
        case.expect(outcome.unacked == 0, f"{outcome.unacked} events stored without an ack")


def poison_entry(number: int) -> tuple[str, str]:
    """``(event id, stream entry)`` of a pageview ClickHouse refuses (a time past DateTime's range)."""
    event_id = EventIds().new()
    message = wire.PageView(api_key=None, url=f"https://example.com/poison?p={number}")
    row = rows.pageview_row(message, event_id=event_id, project_id=PROJECT, session_id=session_id(number),
                            received_at=time.time(), ip="192.0.2.0")
    row["timestamp"] = "9999-01-01T00:00:00+00:00"
    return event_id, json.dumps({"table": "page_view_event", "row": row}, separators=(",", ":"))


def dead_letter_ids(reply: list) -> set[str]:
    """The original stream ids of the entries in an XRANGE of the dead-letter stream."""
    return {dict(zip(flat[::2], flat[1::2]))["id"] for _, flat in reply}


@pytest_twisted.ensureDeferred
async def test_poison_rows_mid_batch(fault_case, redis_url, clickhouse_url):
    """Three rows ClickHouse refuses, put in the stream amid the load: dead-lettered, the rest stored."""
    async with fault_case("3 poison rows amid the load") as case:
        node = await case.node("all").start()
        await case.start_load(node)
        poison = {}
        async with redis_connection(redis_url) as redis:
            for number, second in enumerate((4, 6, 8)):
                await case.at(second)
                event_id, entry = poison_entry(number)
                poison[await redis.call("XADD", STREAM, "*", "e", entry)] = event_id
                if number == 0:
                    case.fault_began()
        case.fault_ended()
        await case.finish()
        async with redis_connection(redis_url) as redis:
            dead = dead_letter_ids(await redis.call("XRANGE", DEAD_STREAM, "-", "+"))
        case.note(f"{len(dead)} dead-lettered")
        case.expect(dead == set(poison), f"dead letters {sorted(dead)}, poison {sorted(poison)}")
        stored = await deferToThread(clickhouse_rows, clickhouse_url, "SELECT id FROM page_view_event")
        case.expect(not {row[0] for row in stored} & set(poison.values()), "a poison row was stored")


@pytest_twisted.ensureDeferred
async def test_spool_full(fault_case, redis_server):
    """A 64 KiB spool and Redis stopped: past the cap clients get ``overloaded``, no ack; nothing acked lost.

    The load goes on about 10 s after Redis is back (18 s in all): on a
    slow machine the reconnection, the replay of the full spool and the
    writer took 4.6 s, past the end of a 12 s load.
    """
    async with fault_case("spool full (64 KiB cap), Redis stopped 5 s", allowed_errors=("overloaded",),
                          load_seconds=18) as case:
        node = await case.node("all", spool_max_bytes="65536").start()
        await case.start_load(node)
        await case.at(3)
        await deferToThread(redis_server.stop)
        case.fault_began()
        await pause(5)
        await deferToThread(redis_server.start)
        case.fault_ended()
        await case.finish()
        refused = case.load.error_codes()["overloaded"]
        case.note(f"{case.acked_during_fault()} acked while Redis was down")
        case.expect(refused > 0, "no overloaded error although the spool was full")
        case.expect(case.acked_after_fault() > 0, "nothing acked after Redis returned")


@pytest.fixture
def replica_fault_case(tmp_path, redis_server, redis_url, clickhouse_replicas, replicated_db):
    """Makes a ``FaultCase`` on two ClickHouse replicas (``clickhouse`` names both); the first is the one stopped."""
    def make(fault: str, **options) -> FaultCase:
        return FaultCase(fault, tmp_path, redis_server, clickhouse_replicas.servers[0],
                         clickhouse_replicas.url(replicated_db), **options)
    return make


async def stored_there_after(case: FaultCase, url: str, since: float, timeout: float = 30.0) -> float | None:
    """Seconds after ``since`` until an event acked after ``since`` is stored at ``url`` (None: not in time)."""
    while time.monotonic() < since + timeout:
        acked = case.load.acked(since=since)
        try:
            stored = await deferToThread(thd_stored_ids, url)
        except Exception:
            stored = set()
        if acked & stored:
            return time.monotonic() - since
        await pause(0.2)
    return None


@pytest_twisted.ensureDeferred
async def test_clickhouse_replica_stopped(replica_fault_case, clickhouse_replicas, replicated_db):
    """The replica the writer inserts into stops: the writer moves to the other; nothing lost.

    The stopped replica comes back 3 s after events acked since the stop
    are read on the other one (at most 20 s after the stop).

    The schema is made ON CLUSTER first (``thd_migrate``, a few seconds on
    a busy machine); the node's auto_migrate finds it current.  Once the
    stopped replica is back it fetches what it missed: every acked event is
    read on each replica.
    """
    first, second = clickhouse_replicas.servers
    only = {server: "clickhouse://default:@127.0.0.1:%d/%s" % (server.port, replicated_db)
            for server in (first, second)}
    async with replica_fault_case("ClickHouse replica 1 of 2 (the writer's) stopped, back 3 s after the writer moved",
                                  load_seconds=20) as case:
        await deferToThread(thd_migrate, clickhouse_replicas.url(replicated_db), replicated_db, "bklit_cluster")
        node = await case.node("all", clickhouse_cluster="bklit_cluster").start()
        await case.start_load(node)
        before = await stored_there_after(case, only[first], case.load.started_at, timeout=15)
        await case.at(max(3, before or 0))
        await deferToThread(first.stop)
        case.fault_began()
        moved = await stored_there_after(case, only[second], case.fault_began_at, timeout=20)
        await pause(3)
        await deferToThread(first.start)
        case.fault_ended()
        await case.finish()
        acked = case.load.acked()
        for _ in range(50):  # the copy to the other replica is asynchronous
            on_each = {server: acked - await deferToThread(thd_stored_ids, url) for server, url in only.items()}
            if not any(on_each.values()):
                break
            await pause(0.2)
        case.note(f"replica 2 stored events acked after the stop {moved:.1f} s after it" if moved is not None
                  else "replica 2 stored nothing while replica 1 was down")
        case.expect(before is not None, "the writer stored nothing on replica 1 in its first 15 s")
        case.expect(moved is not None, "the writer did not move to replica 2 within 20 s")
        case.expect(not any(on_each.values()), "acked events missing on a replica: "
                    + ", ".join(f"{len(missing)} on {server.port}" for server, missing in on_each.items() if missing))
