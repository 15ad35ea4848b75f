"""Blocking ClickHouse work: migrations and batch inserts.

Everything here blocks and runs either in the writer's thread pool (names
start with ``thd_``) or in the ``bklit`` command.  Plain data goes in and
out; clickhouse-driver's ``Client`` never crosses into the reactor thread.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from clickhouse_driver import Client, errors

from bklit import schema

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


def server_url(url: str, database: str = "default") -> str:
    """``url`` pointing at another database (to create ours before using it)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def connect(url: str) -> Client:
    """A clickhouse-driver client for ``url`` (connects on first use)."""
    return Client.from_url(url)


DUPLICATE_COLUMN = (15, 44)  # ClickHouse: DUPLICATE_COLUMN, ILLEGAL_COLUMN ("column with this name already exists")


def _apply(client: Any, statement: str) -> None:
    """Run one migration statement; an ALTER whose column is there already ran before."""
    try:
        client.execute(statement)
    except errors.ServerException as e:
        if e.code not in DUPLICATE_COLUMN or "already exists" not in e.message or not statement.startswith("ALTER"):
            raise


def thd_migrate(url: str, database: str) -> list[int]:
    """Create the database and apply the migrations it lacks, in order.

    Idempotent and safe to run from several processes at once: every
    statement is ``IF NOT EXISTS``.  Returns the versions applied now.
    """
    client = connect(server_url(url))
    try:
        client.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.execute(
            f"CREATE TABLE IF NOT EXISTS {database}.{MIGRATIONS_TABLE}"
            " (version UInt32, applied_at DateTime DEFAULT now()) ENGINE = TinyLog"
        )
        rows = client.execute(f"SELECT max(version) FROM {database}.{MIGRATIONS_TABLE}")
        current = rows[0][0] if rows and rows[0][0] else 0
        applied = []
        for version, statements in schema.MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                _apply(client, statement.format(db=database))
            client.execute(f"INSERT INTO {database}.{MIGRATIONS_TABLE} (version) VALUES", [(version,)])
            applied.append(version)
        return applied
    finally:
        client.disconnect()


class Inserter:
    """Inserts rows from pool threads, one client per thread."""

    def __init__(self, url: str, database: str):
        self.url = url
        self.database = database
        self._local = threading.local()

    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = connect(self.url)
        return client

    def thd_insert(self, table: str, rows: Iterable[dict]) -> int:
        """Insert row dicts into ``table``; returns how many went in.

        Raises what clickhouse-driver raises; a network error drops the
        thread's client so the next call reconnects.
        """
        values = [schema.to_insert_row(table, row) for row in rows]
        if not values:
            return 0
        columns = ", ".join(schema.insert_columns(table))
        try:
            self._client().execute(f"INSERT INTO {self.database}.{table} ({columns}) VALUES", values)
        except Exception as e:
            if not is_data_error(e):
                self.thd_close()
            raise
        return len(values)

    def thd_ping(self) -> None:
        """Raise unless ClickHouse answers a trivial query."""
        self._client().execute("SELECT 1")

    def thd_close(self) -> None:
        """Drop this thread's client."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            client.disconnect()
