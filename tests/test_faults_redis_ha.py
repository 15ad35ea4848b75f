"""Fault rows for Redis under Sentinel: a primary lost under load, a Sentinel restarted, the old primary back.

Each case runs on a Redis set of its own (``servers.RedisSet``: a primary,
replicas and Debian's redis-sentinel, which fails a primary over one second
after it stops answering); the nodes use its ``redis+sentinel://`` URL.
The rows join the fault report of ``tests/test_faults.py``.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from faults import RESULTS, FaultCase, pause
from servers import RedisSet

pytestmark = pytest.mark.fault


@pytest.fixture
def redis_set_case(tmp_path, clickhouse_server, clickhouse_url):
    """Makes this test's Redis set (``replicas`` replicas) and its ``FaultCase``; stops the set afterwards."""
    made = []

    def make(fault: str, replicas: int = 1, **options) -> tuple[RedisSet, FaultCase]:
        servers = RedisSet(tmp_path / "redis", replicas=replicas).start()
        made.append(servers)
        return servers, FaultCase(fault, tmp_path, servers, clickhouse_server, clickhouse_url, **options)

    yield make
    for servers in made:
        servers.cleanup()


async def kill_primary(servers: RedisSet, case: FaultCase):
    """SIGKILL the primary; returns ``(old, new)`` once the Sentinel promoted a replica."""
    old = servers.primary()
    await deferToThread(old.kill)
    case.fault_began()
    new = await deferToThread(servers.wait_failover, old)
    return old, new


@pytest_twisted.ensureDeferred
async def test_primary_killed_with_min_replicas_1(redis_set_case):
    """Primary SIGKILLed under load, two replicas, redis_min_replicas = 1: nothing acked lost or doubled.

    Every ack waited for a replica, so whichever the Sentinel promotes has
    it or the batch was spooled and is replayed into it.
    """
    servers, case = redis_set_case("Redis primary SIGKILL, Sentinel promotes (min_replicas 1)", replicas=2)
    async with case:
        node = await case.node("all", redis_min_replicas="1").start()
        await case.start_load(node)
        await case.at(4)
        _, new = await kill_primary(servers, case)
        case.fault_ended()
        await case.finish()
        case.note(f"{case.acked_during_fault()} acked during the failover; new primary :{new.port}")


@pytest_twisted.ensureDeferred
async def test_primary_killed_with_min_replicas_0(redis_set_case):
    """The same with redis_min_replicas = 0: what the dead primary had not replicated may be lost.

    The row says how many acked events were lost; the test checks that the
    row is there and that acked = stored + lost.
    """
    servers, case = redis_set_case("Redis primary SIGKILL, Sentinel promotes (min_replicas 0)", lossy=True)
    async with case:
        node = await case.node("all").start()
        await case.start_load(node)
        await case.at(4)
        await kill_primary(servers, case)
        case.fault_ended()
        await case.finish()
    outcome = RESULTS[-1]
    assert outcome.fault == case.outcome.fault and outcome.acked > 0
    assert outcome.acked >= outcome.lost and outcome.recovery is not None


@pytest_twisted.ensureDeferred
async def test_sentinel_restarted(redis_set_case):
    """The Sentinel SIGKILLed under load and restarted 2 s later: the primary stays, nothing lost."""
    servers, case = redis_set_case("Sentinel SIGKILL, restarted 2 s later")
    async with case:
        node = await case.node("all", redis_min_replicas="1").start()
        await case.start_load(node)
        await case.at(3)
        primary = servers.primary()
        await deferToThread(servers.sentinel.kill)
        case.fault_began()
        await pause(2)
        await deferToThread(servers.sentinel.start)
        case.fault_ended()
        await case.finish()
        case.expect(servers.primary() is primary, "the primary changed although it never went away")
        case.note(f"{case.acked_during_fault()} acked while the Sentinel was down")
        case.expect(case.acked_during_fault() > 0, "nothing acked while the Sentinel was down")


@pytest_twisted.ensureDeferred
async def test_old_primary_returns_as_replica(redis_set_case):
    """One replica, redis_min_replicas = 1: the primary is killed, its replica promoted and left alone.

    Batches spool (no replica can confirm them) until the old primary,
    restarted, is made a replica by the Sentinel; then the spool replays.
    (On a loaded machine the Sentinel may fail over once more, back to the
    old primary: the set is whole again either way.)
    """
    servers, case = redis_set_case("old primary back as a replica (min_replicas 1)")
    async with case:
        node = await case.node("all", redis_min_replicas="1").start()
        await case.start_load(node)
        await case.at(3)
        old, _ = await kill_primary(servers, case)
        await deferToThread(old.start)
        primary = await deferToThread(servers.wait_healed, 60)
        case.fault_ended()
        await case.finish()
        case.note(f"{case.acked_during_fault()} acked (spooled) until the old primary was a replica")
        if primary is old:
            case.note("the Sentinel failed over again, back to the old primary")
        case.expect(case.acked_during_fault() > 0, "nothing acked while no replica could confirm")
        case.expect(primary.execute("XLEN", "bklit:events") == 0 and servers.in_sync(primary),
                    "the stream of the primary is not drained, or the set is not whole")
