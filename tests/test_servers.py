"""The server fixtures run real Redis and ClickHouse that survive restarts."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import txredisapi
from clickhouse_driver import Client
from clickhouse_driver.errors import NetworkError

import servers
from servers import ClickHouseServer, RedisServer, ServerError


def test_free_port_can_be_bound():
    """free_port() returns a loopback port nobody listens on."""
    port = servers.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_answers_ping_set_get(redis_server, redis_url):
    """The session Redis answers on the port its URL names."""
    assert redis_url == "redis://127.0.0.1:%d/0" % redis_server.port
    assert redis_server.execute("PING") == "PONG"
    assert redis_server.execute("SET", "greeting", "hello") == "OK"
    assert redis_server.execute("GET", "greeting") == b"hello"


@pytest_twisted.ensureDeferred
async def test_redis_serves_txredisapi_in_async_tests(redis_server, redis_url):
    """Async tests reach the session Redis with the daemon's client."""
    conn = await txredisapi.Connection(
        redis_server.host, redis_server.port, reconnect=False
    )
    try:
        await conn.set("k", "v")
        assert await conn.get("k") == "v"
    finally:
        await conn.disconnect()


@pytest.mark.parametrize("run", [1, 2])
def test_redis_url_starts_empty(redis_server, redis_url, run):
    """Every test sees an empty Redis, whatever the previous one wrote."""
    assert redis_server.execute("DBSIZE") == 0
    redis_server.execute("SET", "left-over", run)


def test_redis_restart_keeps_data_and_port(redis_server, redis_url):
    """restart() and a crash (kill, start) keep the port and the AOF data."""
    port = redis_server.port
    redis_server.execute("SET", "kept", "1")
    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.execute("GET", "kept") == b"1"
    redis_server.execute("SET", "fsynced", "2")
    redis_server.kill()
    redis_server.start()
    assert redis_server.execute("GET", "fsynced") == b"2"


def test_redis_stop_refuses_connections(redis_server, redis_url):
    """After stop() the port refuses connections until start()."""
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(OSError):
        redis_server.execute("PING")
    redis_server.start()
    assert redis_server.ping()


def test_clickhouse_answers_version(clickhouse_server, clickhouse_url, clickhouse_db):
    """The session ClickHouse answers clickhouse-driver on its URL, in UTC."""
    assert clickhouse_url == "clickhouse://default:@127.0.0.1:%d/%s" % (
        clickhouse_server.port, clickhouse_db,
    )
    client = Client.from_url(clickhouse_url)
    try:
        [(version, day_one, database)] = client.execute(
            "SELECT version(), toString(toDateTime(86400)), currentDatabase()"
        )
    finally:
        client.disconnect()
    assert version
    assert day_one == "1970-01-02 00:00:00"
    assert database == clickhouse_db


def test_clickhouse_replacing_merge_tree_round_trip(clickhouse_url):
    """A ReplacingMergeTree keyed by id keeps one row per id under FINAL."""
    client = Client.from_url(clickhouse_url)
    try:
        client.execute(
            "CREATE TABLE t (id String, n UInt32)"
            " ENGINE = ReplacingMergeTree ORDER BY id"
        )
        client.execute("INSERT INTO t (id, n) VALUES", [("a", 1), ("b", 2)])
        client.execute("INSERT INTO t (id, n) VALUES", [("a", 1)])
        rows = client.execute("SELECT id, n FROM t FINAL ORDER BY id")
    finally:
        client.disconnect()
    assert rows == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("run", [1, 2])
def test_clickhouse_db_starts_empty(clickhouse_server, clickhouse_db, run):
    """Every test gets a database of its own with no tables in it."""
    assert clickhouse_db.startswith("bklit_test_")
    assert clickhouse_server.query("SHOW TABLES FROM %s" % clickhouse_db) == ""
    clickhouse_server.query("CREATE TABLE %s.t (x UInt8) ENGINE = Log" % clickhouse_db)


def test_clickhouse_stop_and_restart(clickhouse_server, clickhouse_url):
    """After stop() clients fail; after restart() the same URL and data work."""
    client = Client.from_url(clickhouse_url)
    client.execute("CREATE TABLE t (id String) ENGINE = ReplacingMergeTree ORDER BY id")
    client.execute("INSERT INTO t (id) VALUES", [("kept",)])
    client.disconnect()
    clickhouse_server.stop()
    try:
        with pytest.raises((NetworkError, OSError)):
            Client.from_url(clickhouse_url).execute("SELECT 1")
    finally:
        clickhouse_server.restart()
    client = Client.from_url(clickhouse_url)
    try:
        assert client.execute("SELECT id FROM t") == [("kept",)]
    finally:
        client.disconnect()


def test_a_missing_binary_fails_with_the_package_name(tmp_path, monkeypatch):
    """Without the binaries, start() says which Debian package to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(servers, "EXTRA_BIN_DIRS", ())
    for server, package in [
        (RedisServer(tmp_path / "r"), "redis-server"),
        (ClickHouseServer(tmp_path / "c"), "clickhouse-server"),
    ]:
        with pytest.raises(ServerError, match="Debian package %s" % package):
            server.start()


def test_a_busy_port_is_refused_before_starting(tmp_path, redis_server):
    """start() refuses a port that answers already, even if it is a Redis."""
    server = RedisServer(tmp_path / "r", port=redis_server.port)
    with pytest.raises(ServerError, match="already listens"):
        server.start()
    assert not server.running


def test_a_failed_start_reports_the_log(tmp_path):
    """A server that cannot start raises with the tail of its log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        for server in [
            RedisServer(tmp_path / "r", port=port),
            ClickHouseServer(tmp_path / "c", port=port),
        ]:
            with pytest.raises(ServerError, match="Address already in use"):
                server.start()
            assert not server.running


def test_a_leaked_thread_fails_the_run_instead_of_hanging(tmp_path):
    """A non-daemon thread left running makes pytest exit 1, naming it."""
    here = Path(__file__).parent
    for name in ("conftest.py", "servers.py"):
        shutil.copy(here / name, tmp_path / name)
    (tmp_path / "test_leak.py").write_text(
        "import threading\n"
        "def test_leaks():\n"
        "    threading.Thread(target=threading.Event().wait, name='leaky').start()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "threads still running after the tests" in result.stderr
    assert "leaky" in result.stderr
