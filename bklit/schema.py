"""The ClickHouse tables: column lists, versioned DDL migrations, insert value conversion.

Types are limited to those of every ClickHouse from 18.16 to current:
String, UInt8 (booleans), UInt32, UInt64, Float64, DateTime, and
Nullable(DateTime) for tracked_session.ended_at only. Plain columns take
their type's default, so no column needs Nullable where NULL means nothing.
Table and column names follow the original product's so its queries work.
"""

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable
from datetime import datetime, timezone


@dataclass(frozen=True)
class Column:
    """One table column: its name and ClickHouse type."""

    name: str
    type: str


def _columns(spec: str) -> tuple[Column, ...]:
    """Build columns from ``name Type`` lines."""
    return tuple(Column(*line.split(None, 1)) for line in spec.strip().splitlines())


TABLES: dict[str, tuple[Column, ...]] = {
    "page_view_event": _columns("""
        id String
        project_id String
        session_id String
        timestamp DateTime
        received_at DateTime
        url String
        title String
        referrer String
        referrer_hostname String
        referrer_path String
        referrer_type String
        utm_source String
        utm_medium String
        utm_campaign String
        utm_term String
        utm_content String
        utm_id String
        gclid String
        fbclid String
        msclkid String
        ttclid String
        li_fat_id String
        twclid String
        user_agent String
        browser String
        os String
        device_type String
        mobile UInt8
        is_bot UInt8
        language String
        timezone String
        screen_width UInt32
        screen_height UInt32
        viewport_width UInt32
        viewport_height UInt32
        ip String
        country String
        country_code String
        region String
        region_name String
        city String
        lat Float64
        lon Float64
        is_new_visitor UInt8
        landing_page String
    """),
    "tracked_event": _columns("""
        id String
        project_id String
        session_id String
        timestamp DateTime
        received_at DateTime
        tracking_id String
        event_type String
        event_definition_id String
        metadata String
        trigger_method String
        is_bot UInt8
    """),
    "tracked_session": _columns("""
        id String
        session_id String
        project_id String
        started_at DateTime
        ended_at Nullable(DateTime)
        duration UInt32
        pageviews UInt32
        did_bounce UInt8
        entry_page String
        exit_page String
        user_agent String
        country String
        country_code String
        city String
        end_reason String
        updated_at DateTime
        version UInt64
        started_ms UInt64
        is_bot UInt8
    """),
}

# Version 1 as it was released. Later changes get a new version with their
# own statements (ALTER TABLE ... ADD COLUMN ...); never edit a released one,
# since databases already at that version would not see the change.
_V1_PAGE_VIEW_EVENT = """CREATE TABLE IF NOT EXISTS {db}.page_view_event (
    id String, project_id String, session_id String,
    timestamp DateTime, received_at DateTime,
    url String, title String,
    referrer String, referrer_hostname String, referrer_path String, referrer_type String,
    utm_source String, utm_medium String, utm_campaign String,
    utm_term String, utm_content String, utm_id String,
    gclid String, fbclid String, msclkid String, ttclid String, li_fat_id String, twclid String,
    user_agent String, browser String, os String, device_type String,
    mobile UInt8, is_bot UInt8,
    language String, timezone String,
    screen_width UInt32, screen_height UInt32, viewport_width UInt32, viewport_height UInt32,
    ip String, country String, country_code String, region String, region_name String,
    city String, lat Float64, lon Float64,
    is_new_visitor UInt8, landing_page String
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project_id, timestamp, id)"""

_V1_TRACKED_EVENT = """CREATE TABLE IF NOT EXISTS {db}.tracked_event (
    id String, project_id String, session_id String,
    timestamp DateTime, received_at DateTime,
    tracking_id String, event_type String, event_definition_id String,
    metadata String, trigger_method String
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project_id, tracking_id, timestamp, id)"""

_V1_TRACKED_SESSION = """CREATE TABLE IF NOT EXISTS {db}.tracked_session (
    id String, session_id String, project_id String,
    started_at DateTime, ended_at Nullable(DateTime),
    duration UInt32, pageviews UInt32, did_bounce UInt8,
    entry_page String, exit_page String, user_agent String,
    country String, country_code String, city String,
    end_reason String, updated_at DateTime, version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(started_at)
ORDER BY (project_id, session_id)"""

# Version 2: every visit its own session row.  A session id that comes back
# after its state expired is a new visit: the row key gains the visit's
# start (``started_ms``; rows stored before are 0 there and keep their key).
# Bots under bot_policy = mark are flagged on events and sessions too.
# (ClickHouse only lets a sort key grow by columns added in the same ALTER.)
_V2_VISITS = """ALTER TABLE {db}.tracked_session
    ADD COLUMN started_ms UInt64, ADD COLUMN is_bot UInt8,
    MODIFY ORDER BY (project_id, session_id, started_ms)"""
_V2_EVENT_BOTS = "ALTER TABLE {db}.tracked_event ADD COLUMN is_bot UInt8"

# (version, statements), applied in order by the migration runner after
# ``statement.format(db=database)``; each statement is harmless to run again
# (an ALTER that adds a column it finds there already is skipped).
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        "CREATE DATABASE IF NOT EXISTS {db}",
        _V1_PAGE_VIEW_EVENT,
        _V1_TRACKED_EVENT,
        _V1_TRACKED_SESSION,
    )),
    (2, (
        _V2_VISITS,
        _V2_EVENT_BOTS,
    )),
)

# Replicated tables (setting ``clickhouse_cluster``): the same statements,
# rendered by ``render``.  CREATE goes ``ON CLUSTER`` with the engine made
# Replicated (its ZooKeeper path per shard, one name per replica from the
# servers' macros); an ALTER goes to one replica, and the table's
# replication carries it to the others (18.16 refuses MODIFY ORDER BY in
# an ALTER ... ON CLUSTER).
REPLICA_PATH = "/clickhouse/tables/{{shard}}/{db}/{table}"
_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)\.(\w+) \(")
_ENGINE = re.compile(r"ENGINE = (ReplacingMergeTree|MergeTree)\((\w*)\)")


def render(statement: str, database: str, cluster: str = "") -> str:
    """``statement`` (its ``{db}`` filled in) as it runs: as is without ``cluster``, else replicated."""
    if not cluster or statement.startswith("ALTER TABLE "):
        return statement
    if statement.startswith("CREATE DATABASE IF NOT EXISTS "):
        return f"{statement} ON CLUSTER {cluster}"
    created = _CREATE_TABLE.match(statement)
    engine = _ENGINE.search(statement)
    if created is None or engine is None:
        raise ValueError(f"no replicated form for: {statement.splitlines()[0]}")
    table = created.group(2)
    path = REPLICA_PATH.format(db=database, table=table)
    arguments = ", ".join([f"'{path}'", "'{replica}'"] + ([engine.group(2)] if engine.group(2) else []))
    statement = statement[:engine.start()] + f"ENGINE = Replicated{engine.group(1)}({arguments})" + statement[engine.end():]
    return _CREATE_TABLE.sub(f"CREATE TABLE IF NOT EXISTS {database}.{table} ON CLUSTER {cluster} (", statement, count=1)


def migrations_table(database: str, name: str, cluster: str = "") -> str:
    """The DDL of the table that records applied migrations (replicated with ``cluster``)."""
    if not cluster:
        return (f"CREATE TABLE IF NOT EXISTS {database}.{name}"
                " (version UInt32, applied_at DateTime DEFAULT now()) ENGINE = TinyLog")
    return render(f"CREATE TABLE IF NOT EXISTS {database}.{name}"
                  " (version UInt32, applied_at DateTime DEFAULT now()) ENGINE = MergeTree() ORDER BY version",
                  database, cluster)


_MAX_DATETIME = 2**32 - 1
_UINT_MAX = {"UInt8": 2**8 - 1, "UInt16": 2**16 - 1, "UInt32": 2**32 - 1, "UInt64": 2**64 - 1}


def _table(table: str) -> tuple[Column, ...]:
    """The columns of a table; ValueError naming an unknown table."""
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}") from None


def insert_columns(table: str) -> list[str]:
    """Column names of a table in DDL order, as an INSERT lists them."""
    return [column.name for column in _table(table)]


def _datetime(value, where: str) -> datetime | int:
    """A DateTime value: whole epoch seconds (clamped to DateTime's range) from epoch seconds,
    aware UTC from a datetime or ISO text.

    Only epoch seconds are clamped; ingest writes those.  A datetime or ISO
    text outside DateTime's range is passed on, and ClickHouse's refusal
    sends the row to the dead letters.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            return _datetime(datetime.fromisoformat(value), where)
        except ValueError:
            raise ValueError(f"{where}: not an ISO 8601 time") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{where}: time must be finite")
        return int(min(max(value, 0), _MAX_DATETIME))
    raise ValueError(f"{where}: expected epoch seconds or a datetime")


def _unsigned(value, maximum: int, where: str) -> int:
    """An unsigned integer value: bools to 0/1, floats truncated, clamped to [0, maximum]."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: number must be finite")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer")
    return min(max(int(value), 0), maximum)


def _text(value) -> str | bytes:
    """A String value: text and bytes as given, dicts and lists as compact JSON, else str()."""
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return str(value)


def _converter(table: str, column: Column) -> Callable[[Any], Any]:
    """What turns a row value into what clickhouse-driver expects for the column's type."""
    kind, where = column.type, f"{table}.{column.name}"
    nullable = kind.startswith("Nullable(")
    if nullable:
        kind = kind[len("Nullable("):-1]
    if kind == "String":
        def convert(value: Any) -> Any:
            return value if type(value) is str else ("" if value is None else _text(value))
    elif kind in _UINT_MAX:
        maximum = _UINT_MAX[kind]

        def convert(value: Any) -> Any:
            if type(value) is int and 0 <= value <= maximum:
                return value
            return 0 if value is None else _unsigned(value, maximum, where)
    elif kind == "Float64":
        def convert(value: Any) -> Any:
            if value is None:
                return 0.0
            if isinstance(value, (int, float)):
                return float(value)
            raise ValueError(f"{where}: expected a number")
    elif kind == "DateTime":
        def convert(value: Any) -> Any:
            return 0 if value is None else _datetime(value, where)
    else:
        raise ValueError(f"{where}: unsupported type {column.type}")
    if not nullable:
        return convert
    return lambda value: None if value is None else convert(value)


@lru_cache(maxsize=None)
def _converters(table: str) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    """Each column's name and converter, in order (built once per table)."""
    return tuple((column.name, _converter(table, column)) for column in _table(table))


def to_insert_row(table: str, row: dict) -> tuple:
    """Values of a row dict in column order, for ``INSERT INTO db.t (cols) VALUES``.

    Missing keys take the type's zero value ("", 0, 0.0, the epoch; None for
    Nullable); DateTime values given as epoch seconds become whole epoch
    seconds (clamped to DateTime's range), which clickhouse-driver sends as
    they are; a datetime or ISO text becomes an aware datetime. Keys that
    are not columns are ignored, so rows written by a newer or older version
    still insert. Raises ValueError naming the column for a value of the
    wrong kind.
    """
    get = row.get
    return tuple([convert(get(name)) for name, convert in _converters(table)])
