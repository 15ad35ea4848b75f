"""ClickHouse with several hosts and replicated tables: the pool, the settings, the schema.

The replicated cases run two Debian ``clickhouse-server`` processes as the
replicas of one shard of ``bklit_cluster``, kept by Debian's ``zookeeper``
(``conftest.clickhouse_replicas``); ``bklit schema migrate`` makes the
tables there with ``clickhouse_cluster`` set.  The fault suite's row for a
replica stopped under load is in ``test_faults.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from bklit import schema
from bklit.clickhouse import ClickHousePool, Inserter, PoolStopped, connect, thd_migrate, thd_once, thd_ping
from bklit.config import ConfigError, load_config
from bklit.clickhouse_urls import clickhouse_hosts, driver_url

from harness import clickhouse_rows, eventually, running_daemon, settings

BKLIT = Path(sys.executable).parent / "bklit"
CLUSTER = "bklit_cluster"
TABLES = ("page_view_event", "tracked_event", "tracked_session")


def bklit(*args: str, **settings: str) -> subprocess.CompletedProcess:
    """Run the ``bklit`` command with ``settings`` as ``BKLIT_*`` variables."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BKLIT_")}
    env.update({f"BKLIT_{key.upper()}": value for key, value in settings.items()})
    return subprocess.run([str(BKLIT), *args], env=env, capture_output=True, text=True, timeout=300)


# The settings --------------------------------------------------------------------------


def test_clickhouse_names_several_hosts_in_order():
    """host:port,host:port: the first is the driver's host, the others its alt_hosts, in order."""
    url = "clickhouse://bklit:secret@10.0.0.5:9000,[::1]:9001,ch3/events?secure=False"
    assert clickhouse_hosts(url) == ["10.0.0.5:9000", "[::1]:9001", "ch3"]
    config = load_config(None, {"BKLIT_CLICKHOUSE": url})
    assert config.clickhouse_database == "events"
    assert "secret" not in repr(config) and "10.0.0.5:9000,[::1]:9001,ch3" in repr(config)
    client = connect(url)
    assert list(client.connection.hosts) == [("10.0.0.5", 9000), ("::1", 9001), ("ch3", 9000)]
    assert (client.connection.database, client.connection.user, client.connection.password) == (
        "events", "bklit", "secret")
    assert driver_url("clickhouse://default:@h:9000/bklit") == "clickhouse://default:@h:9000/bklit"


@pytest.mark.parametrize("value, message", [
    ("clickhouse://default:@h1:9000,h2:x/bklit", "invalid port in 'h2:x'"),
    ("clickhouse://default:@h1:9000,,h2/bklit", "needs a host"),
    ("clickhouse://default:@h1,h2/bklit?alt_hosts=h3", "alt_hosts too"),
])
def test_bad_host_lists_are_refused_by_name(value, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"BKLIT_CLICKHOUSE": value})
    assert caught.value.errors[0][0] == "clickhouse" and message in caught.value.errors[0][1]


def test_clickhouse_cluster_is_a_plain_name():
    assert load_config(None, {}).clickhouse_cluster == ""
    assert load_config(None, {"BKLIT_CLICKHOUSE_CLUSTER": "events_1"}).clickhouse_cluster == "events_1"
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"BKLIT_CLICKHOUSE_CLUSTER": "a b; DROP"})
    assert caught.value.errors[0][0] == "clickhouse_cluster"


# The replicated DDL -------------------------------------------------------------------------


def rendered(cluster):
    return [schema.render(statement.format(db="bklit"), "bklit", cluster)
            for _, statements in schema.MIGRATIONS for statement in statements]


def test_without_a_cluster_the_statements_run_as_released():
    assert rendered("") == [statement.format(db="bklit") for _, statements in schema.MIGRATIONS
                            for statement in statements]


def test_with_a_cluster_tables_are_made_on_it_replicated_and_alters_go_to_one_replica():
    """CREATE ... ON CLUSTER with the Replicated engine (path per shard, {replica}); ALTERs as they are."""
    statements = rendered(CLUSTER)
    assert statements[0] == f"CREATE DATABASE IF NOT EXISTS bklit ON CLUSTER {CLUSTER}"
    creates = [s for s in statements if s.startswith("CREATE TABLE")]
    assert len(creates) == 3
    for table, statement in zip(TABLES, creates):
        assert statement.startswith(f"CREATE TABLE IF NOT EXISTS bklit.{table} ON CLUSTER {CLUSTER} (")
        assert f"ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/bklit/{table}', '{{replica}}'" \
            in statement
        assert "ENGINE = ReplacingMergeTree" not in statement
    assert creates[2].count("'{replica}', version)") == 1  # tracked_session keeps its version column
    alters = [s for s in statements if s.startswith("ALTER")]
    assert len(alters) == 2 and all("ON CLUSTER" not in s for s in alters)
    assert schema.migrations_table("bklit", "schema_migrations", CLUSTER) == (
        f"CREATE TABLE IF NOT EXISTS bklit.schema_migrations ON CLUSTER {CLUSTER}"
        " (version UInt32, applied_at DateTime DEFAULT now()) ENGINE ="
        " ReplicatedMergeTree('/clickhouse/tables/{shard}/bklit/schema_migrations', '{replica}') ORDER BY version")


def test_a_statement_without_a_replicated_form_is_refused():
    with pytest.raises(ValueError, match="no replicated form"):
        schema.render("CREATE TABLE IF NOT EXISTS bklit.x (a String) ENGINE = Log", "bklit", CLUSTER)


def test_the_test_replicas_config_has_zookeeper_cluster_and_macros(clickhouse_replicas):
    import xml.etree.ElementTree as ET

    first, second = clickhouse_replicas.servers
    root = ET.parse(second.base_dir / "config.xml").getroot()
    assert root.find("zookeeper/node/port").text == str(clickhouse_replicas.zookeeper.port)
    assert [int(r.find("port").text) for r in root.findall(f"remote_servers/{CLUSTER}/shard/replica")] == [
        first.port, second.port]
    assert (root.find("macros/shard").text, root.find("macros/replica").text) == ("01", "r2")


# The pool -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pool_runs_work_with_one_client_per_thread_and_stop_closes_them(clickhouse_url):
    pool = ClickHousePool(clickhouse_url, reactor, threads=2, name="bklit-test")
    with pytest.raises(PoolStopped):
        await pool.do(thd_ping)
    pool.startService()
    seen = []

    def thd_which(client):
        seen.append((threading.current_thread().name, client))
        time.sleep(0.2)  # both threads busy at once
        return client.execute("SELECT 1")[0][0]

    assert await pool.do(thd_which) == 1
    results = await defer_all([pool.do(thd_which) for _ in range(4)])
    assert results == [1] * 4
    by_thread = {}
    for name, client in seen:
        by_thread.setdefault(name, set()).add(id(client))
    assert len(by_thread) == 2 and all(len(clients) == 1 for clients in by_thread.values())
    clients = {id(client): client for _, client in seen}.values()
    assert all(client.connection.connected for client in clients)
    await pool.stopService()
    assert pool.pool.joined and not any(thread.is_alive() for thread in pool.pool.threads)
    assert not any(client.connection.connected for client in clients)
    with pytest.raises(PoolStopped):
        await pool.do(thd_ping)


async def defer_all(deferreds):
    return await defer.gatherResults(deferreds, consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_pool_moves_to_the_next_host_and_stays_there(clickhouse_replicas):
    """The first host stops: the next call fails or not, the one after runs on the second host, and stays."""
    first, second = clickhouse_replicas.servers
    pool = ClickHousePool(clickhouse_replicas.url("default") + "?connect_timeout=2", reactor, threads=1)
    pool.startService()
    try:
        assert await pool.do(thd_ping) == f"127.0.0.1:{first.port}"
        await deferToThread(first.stop)
        hosts = []
        for _ in range(2):
            try:
                hosts.append(await pool.do(thd_ping))
            except Exception as e:  # the dead connection's query
                hosts.append(type(e).__name__)
        assert hosts[-1] == f"127.0.0.1:{second.port}", hosts
        await deferToThread(first.start)
        assert await pool.do(thd_ping) == f"127.0.0.1:{second.port}"
    finally:
        await deferToThread(first.ensure_running)
        await pool.stopService()


@pytest_twisted.ensureDeferred
async def test_the_daemon_stops_its_clickhouse_pools_after_the_writer(redis_url, clickhouse_url):
    """The writer's pool (inserts, migration, health) and the API's: threads joined, clients closed at stop."""
    async with running_daemon(settings(redis_url, clickhouse_url, health_interval="0.1")) as daemon:
        service = daemon.service
        await eventually(lambda: service.health.state.get("clickhouse", {}).get("up"))
        pools = [service.clickhouse, service.api_clickhouse]
        assert [pool.pool.name for pool in pools] == ["bklit-clickhouse", "bklit-api"]
        clients = list(service.clickhouse._clients)
        assert clients and all(client.connection.database == "default" for client in clients)
    for pool in pools:
        assert pool.pool.joined and not any(thread.is_alive() for thread in pool.pool.threads)
    assert not any(client.connection.connected for client in clients)
    with pytest.raises(PoolStopped):
        await service.clickhouse.do(thd_ping)


# Migrations on the cluster ---------------------------------------------------------------------


def engines(server, database):
    return dict(line.split("\t") for line in server.query(
        f"SELECT name, engine FROM system.tables WHERE database = '{database}' FORMAT TSV").splitlines())


def test_schema_migrate_makes_replicated_tables_on_every_replica(clickhouse_replicas, replicated_db):
    """``bklit schema migrate`` with clickhouse_cluster: the same tables, replicated, on both replicas."""
    url = clickhouse_replicas.url(replicated_db)
    done = bklit("schema", "migrate", "--json", clickhouse=url, clickhouse_cluster=CLUSTER)
    assert done.returncode == 0, done.stderr
    assert '"applied": [1, 2]' in done.stdout
    for server in clickhouse_replicas.servers:
        found = engines(server, replicated_db)
        assert found == {**{table: "ReplicatedReplacingMergeTree" for table in TABLES},
                         "schema_migrations": "ReplicatedMergeTree"}, server
        session = server.query(f"SHOW CREATE TABLE {replicated_db}.tracked_session")
        assert "ORDER BY (project_id, session_id, started_ms)" in session and "is_bot UInt8" in session
    # the record of versions is replicated too: a migrate through the second replica has nothing to do
    second_first = "clickhouse://default:@127.0.0.1:%d/%s" % (clickhouse_replicas.servers[1].port, replicated_db)
    again = bklit("schema", "migrate", "--json", clickhouse=second_first, clickhouse_cluster=CLUSTER)
    assert again.returncode == 0 and '"applied": []' in again.stdout, again.stderr


@pytest_twisted.ensureDeferred
async def test_rows_inserted_through_one_replica_are_read_exactly_on_the_other(clickhouse_replicas, replicated_db):
    """A batch inserted twice on replica 1 (a retried insert) counts once under FINAL on replica 2."""
    first, second = clickhouse_replicas.servers
    url = clickhouse_replicas.url(replicated_db)
    assert await deferToThread(thd_migrate, url, replicated_db, CLUSTER) == [1, 2]
    now = int(time.time())
    rows = [{"id": f"e{n}", "project_id": "p1", "session_id": "s1", "timestamp": now, "url": "https://x/"}
            for n in range(50)]
    inserter = Inserter(replicated_db)
    for batch in (rows, rows[:25], rows[25:]):  # different blocks: ClickHouse's own dedup does not apply
        assert await deferToThread(thd_once, url, inserter.thd_insert, "page_view_event", batch) == len(batch)
    on_second = "clickhouse://default:@127.0.0.1:%d/%s" % (second.port, replicated_db)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if clickhouse_rows(on_second, "SELECT count() FROM page_view_event")[0][0] == 100:
            break
        time.sleep(0.2)
    assert clickhouse_rows(on_second, "SELECT count() FROM page_view_event")[0][0] == 100
    assert clickhouse_rows(on_second, "SELECT count() FROM page_view_event FINAL")[0][0] == 50
    assert clickhouse_rows(on_second, "SELECT uniqExact(id) FROM page_view_event")[0][0] == 50


def test_schema_migrate_names_a_cluster_the_server_lacks(clickhouse_url):
    done = bklit("schema", "migrate", clickhouse=clickhouse_url, clickhouse_cluster="nowhere")
    assert done.returncode == 1
    assert "has no cluster 'nowhere' in its remote_servers" in done.stderr, done.stderr


def test_schema_migrate_refuses_plain_tables_when_a_cluster_is_set(clickhouse_url):
    """Tables made before clickhouse_cluster was set are named, not silently left unreplicated."""
    assert bklit("schema", "migrate", clickhouse=clickhouse_url).returncode == 0
    done = bklit("schema", "migrate", clickhouse=clickhouse_url, clickhouse_cluster=CLUSTER)
    assert done.returncode == 1
    assert "not replicated: page_view_event (ReplacingMergeTree)" in done.stderr, done.stderr
    assert "schema_migrations (TinyLog)" in done.stderr
