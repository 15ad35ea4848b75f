"""ClickHouse: the thread pool every part uses, and the blocking work it runs.

``ClickHousePool`` owns a thread pool in which each thread holds its own
clickhouse-driver ``Client``; ``do(thd_function, *args)`` runs
``thd_function(client, *args)`` there and returns a Deferred (as Buildbot's
``DBThreadPool`` does with its engine).  The writer, migrations, health and
the API each use one; ``bklit`` commands make a short-lived one.  Functions
whose names start with ``thd_`` block and take the thread's client first.
Plain data goes in and out; a ``Client`` never crosses into the reactor
thread.

A ``clickhouse`` URL may name several hosts (``clickhouse://u:p@h1:9000,
h2:9000/bklit``): clickhouse-driver gets the first as its host and the rest
as ``alt_hosts``, tries them in order when a connection fails, and keeps to
the one that answered.  A thread's client is kept across failures (the
driver disconnects it itself), so it stays on the host that works.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from clickhouse_driver import Client, errors
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from bklit import schema
from bklit.clickhouse_urls import driver_url, server_url

MIGRATIONS_TABLE = "schema_migrations"

# Server error codes that mean "this data is wrong", not "try again later".
DATA_ERROR_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    26, 27, 38, 41,  # CANNOT_PARSE_QUOTED_STRING, ..._INPUT_ASSERTION_FAILED, ..._DATE, ..._DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    117,  # INCORRECT_DATA
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
})


def is_data_error(error: BaseException) -> bool:
    """Whether an insert failed because of the rows, not the server or network.

    Such a batch will never go in as it is; it is split to find the bad rows.
    Anything else (connection refused, timeouts, too many parts) is retried.
    """
    if isinstance(error, errors.ServerException):
        return error.code in DATA_ERROR_CODES
    return isinstance(error, (
        errors.TypeMismatchError, TypeError, ValueError, OverflowError, UnicodeError,
    )) or type(error).__name__ == "error"  # struct.error from packing a value


def connect(url: str) -> Client:
    """A clickhouse-driver client for ``url``, one host or several (connects on first use)."""
    return Client.from_url(driver_url(url))


def thd_once(url: str, thd: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``thd(client, *args, **kw)`` with a client of its own, disconnected after (blocking)."""
    client = connect(url)
    try:
        return thd(client, *args, **kw)
    finally:
        client.disconnect()


def host_of(client: Client) -> str:
    """``host:port`` the client is connected to (or will try first)."""
    connection = client.connection
    if connection.connected:
        return f"{connection.host}:{connection.port}"
    host, port = connection.hosts[0]
    return f"{host}:{port}"


class PoolStopped(RuntimeError):
    """Work was given to a ClickHousePool that is not running."""


class ClickHousePool(Service):
    """A thread pool for ClickHouse work; each thread keeps its own client.

    ``do(thd, *args, **kw)`` runs ``thd(client, *args, **kw)`` in a pool
    thread and returns a Deferred of its result.  ``stop()`` waits for the
    work in progress, joins the threads and disconnects every thread's
    client.  Work given before ``startService`` or after ``stop`` fails at
    once with ``PoolStopped``.
    """

    def __init__(self, url: str, reactor: Any = None, *, threads: int = 2, name: str = "bklit-clickhouse"):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.url = driver_url(url)
        self.reactor = reactor
        self.threads = threads
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._local = threading.local()
        self._clients: list[Client] = []
        self._lock = threading.Lock()

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stop()

    def do(self, thd: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        """Run ``thd(client, *args, **kw)`` in a pool thread."""
        if not self.pool.started or self.pool.joined:
            return defer.fail(PoolStopped(f"the ClickHouse pool {self.pool.name} is not running"))
        return deferToThreadPool(self.reactor, self.pool, self._thd_run, thd, args, kw)

    def _thd_run(self, thd: Callable[..., Any], args: tuple, kw: dict) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = Client.from_url(self.url)
            with self._lock:
                self._clients.append(client)
        return thd(client, *args, **kw)

    def stop(self) -> defer.Deferred:
        """Join the threads (after the work in progress), then disconnect their clients."""
        if self.pool.started and not self.pool.joined:
            self.pool.stop()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.disconnect()
        return defer.succeed(None)


async def using_pool(url: str, thd: Callable[..., Any], *args: Any) -> Any:
    """``thd(client, *args)`` in a one-thread ClickHousePool made for it and stopped after (``bklit`` commands)."""
    pool = ClickHousePool(url, threads=1, name="bklit-command")
    pool.startService()
    try:
        return await pool.do(thd, *args)
    finally:
        await pool.stopService()


DUPLICATE_COLUMN = (15, 44)  # ClickHouse: DUPLICATE_COLUMN, ILLEGAL_COLUMN ("column with this name already exists")


def _apply(client: Any, statement: str) -> None:
    """Run one migration statement; an ALTER whose column is there already ran before."""
    try:
        client.execute(statement)
    except errors.ServerException as e:
        if e.code not in DUPLICATE_COLUMN or "already exists" not in e.message or not statement.startswith("ALTER"):
            raise


def thd_schema_version(client: Any, database: str) -> int:
    """The newest migration applied to ``database`` (0 for none, or no table yet)."""
    exists = client.execute(
        "SELECT count() FROM system.tables WHERE database = %(db)s AND name = %(t)s",
        {"db": database, "t": MIGRATIONS_TABLE},
    )[0][0]
    if not exists:
        return 0
    return client.execute(f"SELECT max(version) FROM {database}.{MIGRATIONS_TABLE}")[0][0] or 0


def check_cluster(client: Any, cluster: str) -> None:
    """Raise ``ValueError`` unless ``cluster`` is one shard of replicas this server knows."""
    shards = client.execute("SELECT uniqExact(shard_num) FROM system.clusters WHERE cluster = %(c)s", {"c": cluster})
    count = shards[0][0] if shards else 0
    if count == 0:
        raise ValueError(f"clickhouse_cluster: ClickHouse at {host_of(client)} has no cluster {cluster!r}"
                         " in its remote_servers")
    if count > 1:
        raise ValueError(f"clickhouse_cluster: {cluster!r} has {count} shards; bklit stores into one shard"
                         " of replicas (every replica holds every row, so FINAL and uniqExact stay exact)")


def check_replicated(client: Any, database: str) -> None:
    """Raise ``ValueError`` if a table of ours in ``database`` is there but not replicated.

    ``CREATE TABLE IF NOT EXISTS`` would leave such a table as it is: it was
    made before ``clickhouse_cluster`` was set, and its rows would stay on
    this server alone.
    """
    rows = client.execute("SELECT name, engine FROM system.tables WHERE database = %(db)s AND name IN %(names)s",
                          {"db": database, "names": (*schema.TABLES, MIGRATIONS_TABLE)})
    plain = sorted(f"{name} ({engine})" for name, engine in rows if not engine.startswith("Replicated"))
    if plain:
        raise ValueError(f"clickhouse_cluster is set, but {database} on {host_of(client)} has tables that are"
                         f" not replicated: {', '.join(plain)}; they were made before the setting (see the"
                         " README, Scaling, for moving them)")


def thd_migrate_with(client: Any, database: str, cluster: str = "") -> list[int]:
    """Create the database and apply the migrations it lacks, in order.

    Idempotent and safe to run from several processes at once: every
    statement is ``IF NOT EXISTS``.  With ``cluster`` the database and
    tables are made ``ON CLUSTER`` as replicated tables (``schema.render``);
    nothing is sent to the cluster when the schema is up to date, so a
    replica that is down does not hold up a writer's start.  Returns the
    versions applied now.
    """
    if cluster:
        check_replicated(client, database)
    current = thd_schema_version(client, database)
    if current >= schema.MIGRATIONS[-1][0]:
        return []
    if cluster:
        check_cluster(client, cluster)
    client.execute(schema.render(f"CREATE DATABASE IF NOT EXISTS {database}", database, cluster))
    client.execute(schema.migrations_table(database, MIGRATIONS_TABLE, cluster))
    current = thd_schema_version(client, database)
    applied = []
    for version, statements in schema.MIGRATIONS:
        if version <= current:
            continue
        for statement in statements:
            _apply(client, schema.render(statement.format(db=database), database, cluster))
        client.execute(f"INSERT INTO {database}.{MIGRATIONS_TABLE} (version) VALUES", [(version,)])
        applied.append(version)
    return applied


def thd_migrate(url: str, database: str, cluster: str = "") -> list[int]:
    """``thd_migrate_with`` on a client of its own (connected to the ``default`` database)."""
    return thd_once(server_url(url), thd_migrate_with, database, cluster)


class Inserter:
    """Inserts rows of the writer's tables into ``database``, with the client it is given."""

    def __init__(self, database: str):
        self.database = database

    def thd_insert(self, client: Any, table: str, rows: Iterable[dict]) -> int:
        """Insert row dicts into ``table``; returns how many went in.

        Raises what clickhouse-driver raises (which disconnects the client
        first on a network error, so the next call connects again, to the
        next host when this one does not answer).
        """
        values = [schema.to_insert_row(table, row) for row in rows]
        if not values:
            return 0
        columns = ", ".join(schema.insert_columns(table))
        client.execute(f"INSERT INTO {self.database}.{table} ({columns}) VALUES", values)
        return len(values)


def thd_ping(client: Any) -> str:
    """Raise unless ClickHouse answers a trivial query; returns the host that answered."""
    client.execute("SELECT 1")
    return host_of(client)
