"""The service tree: the stop order, the timers, and nothing of the daemon left after ``stopService``."""

import threading

import pytest_twisted
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bklit import rollup
from bklit.api import Api
from bklit.lifecycle import OrderedService, Part, Periodic
from harness import open_dashboard, running_daemon, sdk_client, sdk_pageview, settings
from tlscerts import CertificateAuthority


class Recording(Service):
    """A child that records its start and stop, and stops when told to (``release``)."""

    def __init__(self, name, journal):
        self.name = name
        self.journal = journal
        self.stopping = defer.Deferred()

    def startService(self):
        super().startService()
        self.journal.append(("start", self.name))

    def stopService(self):
        super().stopService()
        self.journal.append(("stop", self.name))
        return self.stopping

    def release(self):
        self.stopping.callback(None)


class OrderedServiceTests(SynchronousTestCase):
    """Named children stop first, in ``stop_order``; the rest in reverse start order; one at a time."""

    def test_stop_order_then_reverse_start_order_each_after_the_last(self):
        journal = []
        tree = OrderedService()
        tree.stop_order = ("c", "a")
        children = {name: Recording(name, journal) for name in "abcde"}
        for name in "abcde":
            children[name].setServiceParent(tree)
        tree.startService()
        assert journal == [("start", n) for n in "abcde"]
        del journal[:]
        stopped = tree.stopService()
        for name in "caedb":
            assert journal[-1] == ("stop", name)  # the next one waits for this one
            assert not stopped.called
            children[name].release()
        assert journal == [("stop", n) for n in "caedb"]
        self.successResultOf(stopped)
        assert not tree.running

    def test_a_child_that_fails_to_stop_does_not_keep_the_others_running(self):
        journal = []
        tree = OrderedService()
        first, second = Recording("first", journal), Recording("second", journal)
        first.setServiceParent(tree)
        second.setServiceParent(tree)
        tree.startService()
        stopped = tree.stopService()
        second.stopping.errback(RuntimeError("broken"))
        first.release()
        self.successResultOf(stopped)
        assert journal[-2:] == [("stop", "second"), ("stop", "first")]
        assert len(self.flushLoggedErrors(RuntimeError)) == 1

    def test_a_part_runs_its_start_and_stop_functions(self):
        calls = []
        part = Part("p", lambda: calls.append("start"), lambda: calls.append("stop"))
        part.startService()
        self.successResultOf(part.stopService())
        assert calls == ["start", "stop"]


class PeriodicTests(SynchronousTestCase):
    """``TimerService`` with a first run one interval late, runs that may fail, and 0 for never."""

    def test_stopping_waits_for_the_run_in_progress(self):
        clock, runs = Clock(), []

        def work():
            runs.append(defer.Deferred())
            return runs[-1]

        timer = Periodic(5, work, clock)
        timer.startService()
        assert len(runs) == 1  # at start
        stopped = timer.stopService()
        assert not stopped.called and timer.running
        runs[0].callback(None)
        self.successResultOf(stopped)
        assert not timer.running
        clock.advance(10)
        assert len(runs) == 1
        assert clock.getDelayedCalls() == []

    def test_not_now_waits_one_interval_and_a_failed_run_does_not_stop_it(self):
        clock, runs = Clock(), []

        def work():
            runs.append(clock.seconds())
            raise ValueError("once")

        timer = Periodic(5, work, clock, now=False)
        timer.startService()
        assert runs == []
        clock.advance(5)
        clock.advance(5)
        assert runs == [5, 10]
        assert len(self.flushLoggedErrors(ValueError)) == 2
        self.successResultOf(timer.stopService())
        timer.startService()  # started again: again one interval late
        assert runs == [5, 10]
        self.successResultOf(timer.stopService())

    def test_zero_never_runs(self):
        clock, runs = Clock(), []
        timer = Periodic(0, lambda: runs.append(1), clock)
        timer.startService()
        clock.advance(100)
        self.successResultOf(timer.stopService())
        assert runs == [] and clock.getDelayedCalls() == [] and not timer.running

    def test_the_api_stops_once_its_check_of_the_kept_hours_is_over(self):
        clock, checks = Clock(), []

        class Hours:
            def check(self):
                checks.append(defer.Deferred())
                return checks[-1]

        api = Api(None, verifier=None, redis_call=None, reactor=clock)
        api.hours = Hours()
        api.startService()
        clock.advance(rollup.CHECK_EVERY)
        assert len(checks) == 1  # one interval after start
        stopped = api.stopService()
        assert not stopped.called  # the check reads ClickHouse through a pool stopped after the API
        checks[0].callback(None)
        self.successResultOf(stopped)
        clock.advance(rollup.CHECK_EVERY * 2)
        assert len(checks) == 1 and clock.getDelayedCalls() == []


def _services(tree):
    yield tree
    for child in getattr(tree, "services", ()):
        yield from _services(child)


def _threads():
    """Live threads but the reactor's own pool's (name resolution; the reactor joins it when it stops)."""
    return {t for t in threading.enumerate() if t.is_alive() and not t.name.startswith("PoolThread-twisted.internet")}


@pytest_twisted.ensureDeferred
async def test_after_stop_nothing_of_the_daemon_is_left(tmp_path, redis_url, clickhouse_url):
    """A TLS node with an SDK socket, a dashboard and stored events stops with no timer, socket or thread left."""
    ca = CertificateAuthority()
    cert, key_file = ca.server(tmp_path)
    calls, readers, writers = set(reactor.getDelayedCalls()), set(reactor.getReaders()), set(reactor.getWriters())
    threads = _threads()
    config = settings(redis_url, clickhouse_url, tls_cert=str(cert), tls_key=str(key_file),
                      tls_check_interval="30", health_interval="0.2")
    async with running_daemon(config) as daemon:
        service = daemon.service
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read, trust=ca.pem())
        client = await sdk_client(daemon.port, key, trust=ca.pem())
        client.send(sdk_pageview("p1", key=key))
        assert (await client.next_of("ack"))["messageType"] == "pageview"
        assert (await dash.next())["type"] == "pageview"
        names = {s.name for s in service}
        assert {"listener", "sdk sockets", "dashboard sockets", "timers", "sessions", "producer", "writer",
                "api", "clickhouse", "api clickhouse", "broadcaster", "redis"} <= names
        assert {type(t).__name__ for t in service.getServiceNamed("timers")} >= {"HealthCheck", "CertificateWatch"}
        assert [s.name for s in service.stopping_order()][-1] == "redis"
    assert await client.wait_closed() == (1001, "Server shutting down")
    assert (await dash.wait_closed())[0] == 1001
    assert [s for s in _services(service) if s.running] == []
    left = [c for c in reactor.getDelayedCalls() if c not in calls and c.active()]
    assert left == [], [repr(c) for c in left]
    assert set(reactor.getReaders()) - readers == set()
    assert set(reactor.getWriters()) - writers == set()
    assert [t.name for t in _threads() - threads] == []
    assert not service.clickhouse.pool.started and not service.api_clickhouse.pool.started
