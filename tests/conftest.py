"""Fixtures that run a real redis-server and clickhouse-server for the tests.

``redis_server`` and ``clickhouse_server`` start one server each per test
session on free loopback ports (see ``servers.py``); tests may stop, kill and
restart them, and the next test gets them running again. ``redis_url`` gives
a test an empty Redis, ``clickhouse_db``/``clickhouse_url`` a database of its
own. A missing binary or a server that does not start fails the tests that
need it; they are never skipped.

A thread that is still running when the session ends (a thread pool some
service did not stop) would keep the interpreter from exiting: the run then
names it and exits with a failure instead of hanging.
"""

import itertools
import os
import sys
import threading
import time

import pytest

import servers
from servers import ClickHouseServer, RedisServer, Replication, ServerError, ZooKeeperServer

_database_numbers = itertools.count(1)
_exit_status = {}


def _running(server):
    """Return ``server`` started, or fail the test with the server's log."""
    try:
        return server.ensure_running()
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A RedisServer (append-only, fsync always) shared by the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield _running(server)
    server.stop()


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory):
    """A ClickHouseServer shared by the session."""
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    yield _running(server)
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """``redis://127.0.0.1:PORT/0`` of the session's Redis, emptied by FLUSHALL."""
    _running(redis_server).execute("FLUSHALL")
    return redis_server.url


@pytest.fixture
def clickhouse_db(clickhouse_server):
    """The name of a new empty database ``bklit_test_<n>``, dropped afterwards."""
    name = "bklit_test_%d" % next(_database_numbers)
    _running(clickhouse_server).query("CREATE DATABASE %s" % name)
    yield name
    _running(clickhouse_server).query("DROP DATABASE IF EXISTS %s" % name)


@pytest.fixture
def clickhouse_url(clickhouse_server, clickhouse_db):
    """``clickhouse://default:@127.0.0.1:PORT/bklit_test_<n>`` for this test."""
    return clickhouse_server.url_for(clickhouse_db)


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory):
    """A ZooKeeperServer (Debian's zookeeper package) shared by the session."""
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    yield _running(server)
    server.stop()


@pytest.fixture(scope="session")
def clickhouse_replicas(tmp_path_factory, zookeeper_server):
    """Two ClickHouseServers, replicas of one shard of cluster ``bklit_cluster``, shared by the session."""
    replication = Replication(zookeeper_server, base_dir=tmp_path_factory.mktemp("replicas"))
    for server in replication.servers:
        _running(server)
    yield replication
    replication.stop()


@pytest.fixture
def replicated_db(clickhouse_replicas):
    """The name of a database ``bklit_replicated_<n>`` not made yet, dropped on every replica afterwards."""
    name = "bklit_replicated_%d" % next(_database_numbers)
    yield name
    for server in clickhouse_replicas.servers:
        _running(server).query("DROP DATABASE IF EXISTS %s" % name)


def pytest_sessionfinish(session, exitstatus):
    """Remember the exit status for ``pytest_unconfigure``."""
    _exit_status["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Fail, rather than hang, when threads outlive the session.

    Runs after pytest-twisted has stopped the reactor (and so its thread
    pool); any other non-daemon thread left after a short grace period
    would block interpreter exit forever.
    """
    deadline = time.monotonic() + 3
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [
        thread.name for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]
    if not left:
        return
    sys.stdout.flush()
    sys.stderr.write(
        "\nFAILED: threads still running after the tests, which would hang the "
        "exit (a thread pool not stopped?): %s\n" % ", ".join(left)
    )
    sys.stderr.flush()
    servers.stop_all()
    os._exit(_exit_status.get("status") or 1)


@pytest.fixture(autouse=True)
def spool_dir(tmp_path, monkeypatch):
    """Each test's daemons run as twistd get a spool of their own (not /var/lib/bklit)."""
    path = tmp_path / "spool"
    monkeypatch.setenv("BKLIT_SPOOL_DIR", str(path))
    return path


#: The fault report's rows (``faults.Outcome.cells()``) in the order the cases finished:
#: this process's, or with pytest-xdist every worker's, as their reports arrive.
_fault_rows = []
_fault_rows_sent = [0]  # how many of this process's ``faults.RESULTS`` went into a report


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Put the rows of fault cases that finished since the last report into this report's user_properties.

    They travel with the report, so the process writing the terminal
    summary (the pytest-xdist controller too) gets every worker's rows.
    """
    outcome = yield
    faults = sys.modules.get("faults")
    if faults is None or len(faults.RESULTS) <= _fault_rows_sent[0]:
        return
    report = outcome.get_result()
    for case in faults.RESULTS[_fault_rows_sent[0]:]:
        report.user_properties.append(("fault row", case.cells()))
    _fault_rows_sent[0] = len(faults.RESULTS)


def pytest_runtest_logreport(report):
    """Collect the fault rows a report carries."""
    _fault_rows.extend(list(value) for name, value in report.user_properties if name == "fault row")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After fault cases ran: print their table and write it to ``.run/fault-report.md``."""
    if not _fault_rows or hasattr(config, "workerinput"):
        return
    from pathlib import Path

    import faults

    table = faults.markdown_report(_fault_rows)
    terminalreporter.section("fault report")
    terminalreporter.write(table)
    report = Path(config.rootpath) / ".run" / "fault-report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("# Fault report\n\n" + table)
    terminalreporter.write_line(f"(written to {report.relative_to(config.rootpath)})")


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (``--dist loadgroup``) the fault cases run on one worker, one after another."""
    for item in items:
        if item.get_closest_marker("fault") is not None:
            item.add_marker(pytest.mark.xdist_group("fault"))
