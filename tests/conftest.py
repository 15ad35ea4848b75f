"""Fixtures that run a real redis-server and clickhouse-server for the tests.

``redis_server`` and ``clickhouse_server`` start one server each per test
session on free loopback ports (see ``servers.py``); tests may stop, kill and
restart them, and the next test gets them running again. ``redis_url`` gives
a test an empty Redis, ``clickhouse_db``/``clickhouse_url`` a database of its
own. A missing binary or a server that does not start fails the tests that
need it; they are never skipped.
"""

import itertools

import pytest

from servers import ClickHouseServer, RedisServer, ServerError

_database_numbers = itertools.count(1)


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
