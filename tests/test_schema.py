"""Tests for bklit.schema: migrations match TABLES, portable types, insert conversion."""

import math
import re
from datetime import datetime, timedelta, timezone

import pytest

from bklit import schema
from bklit.schema import MIGRATIONS, TABLES, Column, insert_columns, to_insert_row

ALLOWED_TYPES = {"String", "UInt8", "UInt16", "UInt32", "UInt64", "Float64", "DateTime"}
CREATE = re.compile(r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+) \((.*)\) ENGINE = (.*)", re.S)
ALTER = re.compile(r"ALTER TABLE \{db\}\.(\w+)\s+(.*)", re.S)
ADD_COLUMN = re.compile(r"ADD COLUMN (\w+) (\w+)")
MODIFY_ORDER = re.compile(r"MODIFY ORDER BY \((.*)\)")


def alterations(statement):
    """The table of an ALTER, its added (name, type) columns and its new sort key (or None)."""
    table, body = ALTER.fullmatch(statement).groups()
    added, order = [], None
    for part in re.split(r",\s+(?=ADD|MODIFY)", body.strip()):
        if column := ADD_COLUMN.fullmatch(part):
            added.append(column.groups())
        elif modified := MODIFY_ORDER.fullmatch(part):
            order = [name.strip() for name in modified.group(1).split(",")]
        else:
            pytest.fail(f"unrecognised alteration: {part[:60]}")
    return table, added, order


def replay_migrations() -> dict[str, list[tuple[str, str]]]:
    """The (name, type) columns of every table after applying all migrations' DDL text."""
    tables: dict[str, list[tuple[str, str]]] = {}
    for _, statements in MIGRATIONS:
        for statement in statements:
            if statement.startswith("CREATE DATABASE"):
                continue
            if created := CREATE.fullmatch(statement):
                table, body, _ = created.groups()
                columns = [part.split(None, 1) for part in body.split(",")]
                tables.setdefault(table, [(name, kind.strip()) for name, kind in columns])
            elif ALTER.fullmatch(statement):
                table, added, _ = alterations(statement)
                tables[table].extend(added)
            else:
                pytest.fail(f"unrecognised migration statement: {statement[:60]}")
    return tables


class TestMigrations:
    """The DDL and TABLES cannot drift apart."""

    def test_replayed_ddl_equals_tables(self):
        """Every column of TABLES, with its type, in order, is created by the migrations."""
        expected = {table: [(c.name, c.type) for c in columns] for table, columns in TABLES.items()}
        assert replay_migrations() == expected

    def test_versions_increase_from_one(self):
        """Versions are 1, 2, 3, ... in order."""
        assert [version for version, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))

    def test_version_one_creates_the_tables(self):
        """Version 1 creates the database and the three tables, re-runnably."""
        version, statements = MIGRATIONS[0]
        assert version == 1
        assert statements[0] == "CREATE DATABASE IF NOT EXISTS {db}"
        created = [CREATE.fullmatch(s).group(1) for s in statements[1:]]
        assert created == ["page_view_event", "tracked_event", "tracked_session"]

    def test_statements_idempotent_and_formattable(self):
        """CREATE says IF NOT EXISTS; an ALTER only adds columns (found there: skipped) and grows the
        sort key by them, as ClickHouse allows; each formats with only {db}."""
        for _, statements in MIGRATIONS:
            for statement in statements:
                if statement.startswith("ALTER"):
                    table, added, order = alterations(statement)
                    assert added
                    if order is not None:  # the key grows only by columns this ALTER adds
                        assert order[-1] in {name for name, _ in added}
                else:
                    assert "IF NOT EXISTS" in statement
                formatted = statement.format(db="bklit")
                assert "{" not in formatted and "bklit" in formatted

    @pytest.mark.parametrize("table,order_by,partition,engine", [
        ("page_view_event", "(project_id, timestamp, id)", "toYYYYMM(timestamp)",
         "ReplacingMergeTree()"),
        ("tracked_event", "(project_id, tracking_id, timestamp, id)", "toYYYYMM(timestamp)",
         "ReplacingMergeTree()"),
        ("tracked_session", "(project_id, session_id)", "toYYYYMM(started_at)",
         "ReplacingMergeTree(version)"),
    ])
    def test_engines(self, table, order_by, partition, engine):
        """Engine, partition key and sorting key as designed; keys are plain columns."""
        statement = next(s for s in MIGRATIONS[0][1] if f"{{db}}.{table} (" in s)
        tail = CREATE.fullmatch(statement).group(3)
        assert tail == f"{engine}\nPARTITION BY {partition}\nORDER BY {order_by}"
        types = {c.name: c.type for c in TABLES[table]}
        for key in re.findall(r"\w+", order_by) + [re.search(r"\((\w+)\)", partition).group(1)]:
            assert not types[key].startswith("Nullable")


class TestTypes:
    """Only types that exist from ClickHouse 18.16 to current."""

    @pytest.mark.parametrize("word", ["LowCardinality", "Bool", "DateTime64", "TTL", "JSON",
                                      "Decimal", "Enum", "Array", "Map", "UUID"])
    def test_forbidden_words_absent(self, word):
        """Neither TABLES nor any statement uses a type or clause 18.16 lacks."""
        texts = [c.type for columns in TABLES.values() for c in columns]
        texts += [s for _, statements in MIGRATIONS for s in statements]
        assert not any(re.search(rf"\b{word}\b", text) for text in texts)

    def test_allowed_types_only(self):
        """Every column type is in the portable set."""
        for table, columns in TABLES.items():
            for column in columns:
                assert column.type.removeprefix("Nullable(").removesuffix(")") in ALLOWED_TYPES

    def test_nullable_only_ended_at(self):
        """Nullable is used for tracked_session.ended_at and nothing else."""
        nullable = [(t, c.name) for t, cs in TABLES.items() for c in cs if "Nullable" in c.type]
        assert nullable == [("tracked_session", "ended_at")]
        assert Column("ended_at", "Nullable(DateTime)") in TABLES["tracked_session"]

    def test_sizes_hold_protocol_range(self):
        """Screen and viewport columns hold the protocol's 0..100000."""
        types = {c.name: c.type for c in TABLES["page_view_event"]}
        for name in ("screen_width", "screen_height", "viewport_width", "viewport_height"):
            assert types[name] == "UInt32"

    def test_unique_column_names(self):
        """No table repeats a column."""
        for columns in TABLES.values():
            assert len({c.name for c in columns}) == len(columns)


class TestInsertColumns:
    """insert_columns."""

    def test_order(self):
        """Names in DDL order."""
        assert insert_columns("tracked_event") == [
            "id", "project_id", "session_id", "timestamp", "received_at", "tracking_id",
            "event_type", "event_definition_id", "metadata", "trigger_method", "is_bot"]
        assert insert_columns("page_view_event")[:3] == ["id", "project_id", "session_id"]
        assert insert_columns("tracked_session")[-4:] == ["updated_at", "version", "started_ms", "is_bot"]

    def test_a_visit_is_keyed_by_its_start(self):
        """Version 2 makes tracked_session's key (project_id, session_id, started_ms)."""
        orders = [alterations(s)[2] for _, statements in MIGRATIONS for s in statements
                  if s.startswith("ALTER") and alterations(s)[0] == "tracked_session"]
        assert [o for o in orders if o] == [["project_id", "session_id", "started_ms"]]

    def test_unknown_table(self):
        """An unknown table is a ValueError naming it."""
        with pytest.raises(ValueError, match="nope"):
            insert_columns("nope")
        with pytest.raises(ValueError, match="nope"):
            to_insert_row("nope", {})


def value(table: str, row: dict, column: str):
    """The converted value of one column."""
    return to_insert_row(table, row)[insert_columns(table).index(column)]


class TestToInsertRow:
    """to_insert_row converts row dicts for clickhouse-driver."""

    def test_zero_values(self):
        """Missing keys give each type's zero value."""
        zeros = dict(zip(insert_columns("tracked_session"), to_insert_row("tracked_session", {})))
        assert zeros["id"] == "" and zeros["duration"] == 0 and zeros["did_bounce"] == 0
        assert zeros["started_at"] == 0 and zeros["ended_at"] is None and zeros["version"] == 0
        pv = dict(zip(insert_columns("page_view_event"), to_insert_row("page_view_event", {})))
        assert pv["lat"] == 0.0 and isinstance(pv["lat"], float)

    def test_epoch_seconds_to_whole_seconds(self):
        """int and float epoch seconds become whole epoch seconds (what DateTime holds, sent as they are)."""
        got = value("tracked_event", {"timestamp": 1795682666.5}, "timestamp")
        assert type(got) is int and got == 1795682666
        assert datetime.fromtimestamp(got, timezone.utc) == datetime(2026, 11, 26, 8, 44, 26, tzinfo=timezone.utc)
        assert value("tracked_event", {"received_at": 0}, "received_at") == 0

    def test_nullable_datetime(self):
        """ended_at stays None when missing or None, converts when set."""
        assert value("tracked_session", {"ended_at": None}, "ended_at") is None
        assert value("tracked_session", {"ended_at": 60}, "ended_at") == 60

    def test_datetime_inputs(self):
        """Aware datetimes pass; naive ones and ISO text are taken as UTC."""
        aware = datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
        assert value("tracked_event", {"timestamp": aware}, "timestamp") is aware
        naive = datetime(2026, 1, 1)
        assert value("tracked_event", {"timestamp": naive}, "timestamp") == \
            naive.replace(tzinfo=timezone.utc)
        assert value("tracked_event", {"timestamp": "2026-01-01T00:00:00Z"}, "timestamp") == \
            naive.replace(tzinfo=timezone.utc)

    def test_datetime_clamped(self):
        """Times outside DateTime's range are clamped to it."""
        assert value("tracked_event", {"timestamp": -5}, "timestamp") == 0
        assert value("tracked_event", {"timestamp": 2**40}, "timestamp") == 2**32 - 1

    def test_unsigned(self):
        """Booleans become 0/1, floats truncate, values clamp to the type's range."""
        assert value("page_view_event", {"mobile": True}, "mobile") == 1
        assert value("page_view_event", {"is_bot": False}, "is_bot") == 0
        assert value("page_view_event", {"mobile": 300}, "mobile") == 255
        assert value("tracked_session", {"duration": 12.9}, "duration") == 12
        assert value("tracked_session", {"duration": -3}, "duration") == 0
        assert value("tracked_session", {"version": 2**70}, "version") == 2**64 - 1

    def test_strings(self):
        """None gives "", text passes, dicts become JSON, numbers become text."""
        assert value("tracked_event", {"metadata": {"b": 1, "a": "é"}}, "metadata") == '{"a":"é","b":1}'
        assert value("tracked_event", {"event_type": "click"}, "event_type") == "click"
        assert value("tracked_event", {"event_type": None}, "event_type") == ""
        assert value("tracked_event", {"tracking_id": 5}, "tracking_id") == "5"

    def test_floats(self):
        """lat/lon become floats."""
        assert value("page_view_event", {"lat": 52}, "lat") == 52.0

    def test_unknown_keys_ignored(self):
        """Keys that are not columns do not matter."""
        assert to_insert_row("tracked_event", {"nope": 1}) == to_insert_row("tracked_event", {})

    @pytest.mark.parametrize("column,bad", [
        ("timestamp", "yesterday"), ("timestamp", math.nan), ("timestamp", [1]),
        ("timestamp", True),
    ])
    def test_bad_datetime(self, column, bad):
        """Values of the wrong kind raise ValueError naming table and column."""
        with pytest.raises(ValueError, match=f"tracked_event.{column}"):
            to_insert_row("tracked_event", {column: bad})

    @pytest.mark.parametrize("table,column,bad", [
        ("tracked_session", "duration", "12"), ("tracked_session", "pageviews", math.inf),
        ("page_view_event", "lat", "52.1"),
    ])
    def test_bad_numbers(self, table, column, bad):
        """Numbers of the wrong kind raise ValueError naming the column."""
        with pytest.raises(ValueError, match=f"{table}.{column}"):
            to_insert_row(table, {column: bad})

    def test_tuple_in_column_order(self):
        """The result is a tuple as long as the column list."""
        for table in TABLES:
            result = to_insert_row(table, {})
            assert isinstance(result, tuple) and len(result) == len(insert_columns(table))

    def test_module_has_only_portable_defaults(self):
        """Zero DateTime is the epoch as epoch seconds (no time zone to get wrong)."""
        assert schema.to_insert_row("tracked_event", {})[3] == 0
