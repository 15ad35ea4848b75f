"""The project's SQL on a current ClickHouse: chdb, the ClickHouse engine in process.

Debian's clickhouse-server is 18.16, the oldest release bklit supports; the
other suites run against it.  This one runs the same statements on the
engine of the current release line (the ``chdb`` wheel, a test extra): the
migrations from an empty database and from version 1, inserts of rows made
by ``bklit.rows`` and shaped as ``batch.lua`` writes visits, ``FINAL``
reads, the ``bklit stats`` queries and the ``/api/`` queries
(``bklit.rollup``, the timeseries).

chdb has no network protocol, so ``ChdbClient`` stands in for
clickhouse-driver's ``Client`` where the code makes one
(``bklit.clickhouse.connect``): it fills in parameters with the driver's own
escaping, runs the SQL in chdb and turns the JSON answer back into the
Python values the driver returns.  The SQL itself is the project's, unchanged.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from chdb import session as chdb_session
from clickhouse_driver import errors
from clickhouse_driver.util.escape import escape_param, escape_params
from twisted.internet import task

from bklit import api, clickhouse, rollup, rows, schema, wire
from bklit.commands import stats as stats_command

DATABASE = "bklit_chdb"
URL = f"clickhouse://chdb/{DATABASE}"
PROJECT = "p1"
HOUR = 3600


class _ServerInfo:
    @staticmethod
    def get_timezone() -> str:
        return "UTC"


class _Context:
    """What clickhouse-driver's escaping asks of a connection: the server's time zone."""

    server_info = _ServerInfo()


def _split_types(inner: str) -> list[str]:
    """``A, Array(B), C`` -> ``["A", "Array(B)", "C"]`` (commas at the top level only)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return parts


def python_value(kind: str, value):
    """A JSON value of ClickHouse type ``kind`` as clickhouse-driver returns it."""
    match = re.fullmatch(r"(\w+)\((.*)\)", kind)
    if match:
        outer, inner = match.groups()
        if outer == "Nullable":
            return None if value is None else python_value(inner, value)
        if outer == "LowCardinality":
            return python_value(inner, value)
        if outer == "Array":
            return [python_value(inner, item) for item in value]
        if outer == "Tuple":
            return tuple(python_value(k, v) for k, v in zip(_split_types(inner), value))
    if re.fullmatch(r"U?Int\d+", kind):
        return int(value)
    if kind.startswith("Float"):
        return float(value)
    if kind == "DateTime":
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S")  # naive, in the server's zone (UTC), as the driver
    return value


class ChdbClient:
    """clickhouse-driver's ``Client.execute`` and ``disconnect`` over one chdb session."""

    def __init__(self, session: chdb_session.Session, database: str = "default"):
        self.session = session
        self.database = database
        self.statements: list[str] = []

    def execute(self, query: str, params=None, settings=None) -> list[tuple]:
        if isinstance(params, (list, tuple)):  # INSERT ... VALUES with rows
            query = query + " " + ", ".join(str(escape_param(tuple(row), _Context())) for row in params)
        elif params:
            query = query % escape_params(params, _Context())
        self.statements.append(query)
        try:
            self.session.query(f"USE {self.database}")
            answer = self.session.query(query, "JSONCompact")
        except Exception as e:  # ChdbError: "Code: 15. DB::Exception: ..."
            code = re.match(r"Code: (\d+)\.", str(e))
            raise errors.ServerException(str(e), int(code[1]) if code else 0) from None
        text = answer.bytes().decode() if hasattr(answer, "bytes") else str(answer)
        if not text.strip():
            return []
        result = json.loads(text)
        kinds = [column["type"] for column in result["meta"]]
        return [tuple(python_value(k, v) for k, v in zip(kinds, row)) for row in result["data"]]

    def disconnect(self) -> None:
        pass


@pytest.fixture(scope="module")
def engine():
    """One chdb session (an in-memory ClickHouse) for the module."""
    session = chdb_session.Session()
    yield session
    session.close()


@pytest.fixture
def chdb(engine, monkeypatch):
    """An empty database; ``bklit.clickhouse.connect`` gives clients of it."""
    engine.query(f"DROP DATABASE IF EXISTS {DATABASE}")
    made: list[ChdbClient] = []

    def connect(url: str) -> ChdbClient:
        made.append(ChdbClient(engine, urlsplit(url).path.strip("/") or "default"))
        return made[-1]

    monkeypatch.setattr(clickhouse, "connect", connect)
    yield connect
    engine.query(f"DROP DATABASE IF EXISTS {DATABASE}")


class Insert:
    """``thd_insert(table, rows)``: ``clickhouse.Inserter``'s, with a client of its own each time."""

    def thd_insert(self, table: str, rows: list[dict]) -> int:
        return clickhouse.thd_once(URL, clickhouse.Inserter(DATABASE).thd_insert, table, rows)


def select(query: str, params: dict | None = None) -> list[tuple]:
    return clickhouse.connect(URL).execute(query, params or {})


def test_the_engine_is_of_the_current_release_line(chdb):
    """Not 18.16 again: the point of this suite is a current ClickHouse."""
    version = clickhouse.connect("clickhouse://chdb/default").execute("SELECT version()")[0][0]
    assert int(version.split(".")[0]) >= 24, version


def test_migrations_make_the_tables_of_schema_py(chdb):
    """From an empty database to the current version; again: nothing to do; the columns are TABLES'."""
    assert clickhouse.thd_migrate(URL, DATABASE) == [version for version, _ in schema.MIGRATIONS]
    assert clickhouse.thd_migrate(URL, DATABASE) == []
    assert clickhouse.thd_once(URL, clickhouse.thd_schema_version, DATABASE) == schema.MIGRATIONS[-1][0]
    for table, columns in schema.TABLES.items():
        found = select("SELECT name, type FROM system.columns WHERE database = %(db)s AND table = %(t)s"
                       " ORDER BY position", {"db": DATABASE, "t": table})
        assert found == [(c.name, c.type) for c in columns]
    keys = dict(select("SELECT name, sorting_key FROM system.tables WHERE database = %(db)s", {"db": DATABASE}))
    assert keys["tracked_session"] == "project_id, session_id, started_ms"
    assert keys["page_view_event"] == "project_id, timestamp, id"


def test_migrating_a_version_1_database_keeps_its_rows(chdb, monkeypatch):
    """A visit stored under version 1 (no started_ms, no is_bot) is there after version 2, with zeros."""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    assert clickhouse.thd_migrate(URL, DATABASE) == [1]
    client = clickhouse.connect(URL)
    client.execute("INSERT INTO tracked_session (id, session_id, project_id, started_at, version) VALUES",
                   [("s-old", "s-old", PROJECT, datetime(2026, 1, 1, tzinfo=timezone.utc), 3)])
    monkeypatch.undo()
    monkeypatch.setattr(clickhouse, "connect", chdb)
    assert clickhouse.thd_migrate(URL, DATABASE) == [2]
    assert select("SELECT id, started_ms, is_bot, version FROM tracked_session FINAL") == [("s-old", 0, 0, 3)]


def test_an_alter_that_ran_before_is_skipped(chdb):
    """A migration cut off after its first ALTER runs again: the column there already is not an error."""
    clickhouse.thd_migrate(URL, DATABASE)
    client = clickhouse.connect(URL)
    client.execute(f"DROP TABLE {DATABASE}.{clickhouse.MIGRATIONS_TABLE}")
    client.execute(f"CREATE TABLE {DATABASE}.{clickhouse.MIGRATIONS_TABLE}"
                   " (version UInt32, applied_at DateTime DEFAULT now()) ENGINE = TinyLog")
    client.execute(f"INSERT INTO {DATABASE}.{clickhouse.MIGRATIONS_TABLE} (version) VALUES", [(1,)])
    assert clickhouse.thd_migrate(URL, DATABASE) == [2]


def _pageview(now: float, event_id: str, session: str, url: str, **data) -> dict:
    """The page_view_event row ingest makes of an SDK pageview, as it travels the stream (JSON)."""
    message = {"type": "pageview", "data": {
        "url": url, "timestamp": wire.iso_timestamp(now), "referrer": "https://www.google.com/search?q=bklit",
        "referrerHostname": "www.google.com", "referrerType": "organic",
        "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0 Safari/537.36",
        "viewport": {"width": 1280, "height": 720}, "screen": {"width": 1920, "height": 1080},
        "language": "en-US", "timezone": "Europe/Berlin", "sessionId": session, "projectId": PROJECT,
        "isNewVisitor": True, "landingPage": url, **data}}
    pv = wire.parse_message(json.dumps(message))
    row = rows.pageview_row(pv, event_id=event_id, project_id=PROJECT, session_id=session,
                            received_at=now, ip="203.0.113.0")
    row.update(browser="Chrome", os="Linux", device_type="desktop", country="Germany", country_code="DE")
    return json.loads(json.dumps(row))


def _event(now: float, event_id: str, session: str, is_bot: bool = False) -> dict:
    message = {"type": "event", "data": {"trackingId": "signup", "eventType": "click",
                                         "timestamp": wire.iso_timestamp(now),
                                         "metadata": {"triggerMethod": "button", "plan": "pro ü"},
                                         "sessionId": session, "projectId": PROJECT}}
    ev = wire.parse_message(json.dumps(message))
    return json.loads(json.dumps(rows.event_row(ev, event_id=event_id, project_id=PROJECT, session_id=session,
                                                received_at=now, is_bot=is_bot)))


def _visit(session: str, started: float, version: int, ended: float | None = None, pageviews: int = 1,
           is_bot: int = 0, entry: str = "https://example.com/?utm_source=news&utm_medium=email") -> dict:
    """A tracked_session row as batch.lua writes it (times in seconds, started_ms in ms)."""
    return {"id": f"{session}/{int(started * 1000)}", "session_id": session, "project_id": PROJECT,
            "started_ms": int(started * 1000), "started_at": int(started),
            "ended_at": int(ended) if ended else None, "duration": int(ended - started) if ended else 0,
            "pageviews": pageviews, "did_bounce": int(pageviews <= 1), "entry_page": entry,
            "exit_page": entry, "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0 Safari/537.36",
            "country": "Germany", "country_code": "DE", "city": "Berlin", "is_bot": is_bot,
            "end_reason": "disconnect" if ended else "", "updated_at": int(ended or started), "version": version}


def stop_merges() -> None:
    """No background merge: the rows stay as inserted while a test looks at them."""
    for table in schema.TABLES:
        select(f"SYSTEM STOP MERGES {DATABASE}.{table}")


@pytest.fixture
def stored(chdb):
    """A migrated database with an hour of traffic two hours ago and some now; returns (now, past hour)."""
    clickhouse.thd_migrate(URL, DATABASE)
    stop_merges()
    now = time.time()
    past = int(now) - int(now) % HOUR - 2 * HOUR
    inserter = Insert()
    pageviews = [
        _pageview(past + 60, "pv1", "s1", "https://example.com/?utm_source=news&utm_medium=email"),
        _pageview(past + 60, "pv1", "s1", "https://example.com/?utm_source=news&utm_medium=email"),  # retried insert
        _pageview(past + 120, "pv2", "s1", "https://example.com/pricing#plans", referrer=None,
                  referrerHostname=None, referrerType="direct", landingPage="https://example.com/"),
        _pageview(past + 180, "pv3", "s2", "https://example.com/pricing?ref=x"),
        _pageview(now - 30, "pv4", "s3", "https://example.com/now"),
    ]
    pageviews.append({**_pageview(now - 20, "pv5", "s4", "https://example.com/bot"), "is_bot": 1})
    assert inserter.thd_insert("page_view_event", pageviews) == 6
    assert inserter.thd_insert("tracked_event", [_event(past + 90, "ev1", "s1"), _event(now - 10, "ev2", "s3"),
                                                 _event(now - 10, "ev3", "s4", is_bot=True)]) == 3
    visits = [_visit("s1", past + 60, 1), _visit("s1", past + 60, 5, ended=past + 160, pageviews=2),
              _visit("s2", past + 180, 2, ended=past + 190), _visit("s3", now - 30, 1),
              _visit("s4", now - 20, 1, is_bot=1)]
    assert inserter.thd_insert("tracked_session", [json.loads(json.dumps(v)) for v in visits]) == 5
    # an older version of s2 from a writer that was behind: a batch of its own
    assert inserter.thd_insert("tracked_session", [json.loads(json.dumps(_visit("s2", past + 180, 1)))]) == 1
    return now, past


def _as_read(column, value):
    """A value given to the driver as the server gives it back: DateTime (epoch seconds) as naive UTC."""
    if "DateTime" in column.type and isinstance(value, int):
        return datetime.fromtimestamp(value, timezone.utc).replace(tzinfo=None)
    return value.replace(tzinfo=None) if isinstance(value, datetime) else value


def test_inserted_rows_read_back_as_written(stored):
    """Every column of a pageview, an event and a visit holds what to_insert_row gave the driver."""
    now, past = stored
    for table, key in [("page_view_event", "pv3"), ("tracked_event", "ev1")]:
        columns = ", ".join(schema.insert_columns(table))
        got = select(f"SELECT {columns} FROM {table} WHERE id = %(id)s LIMIT 1", {"id": key})[0]
        source = {"page_view_event": _pageview(past + 180, "pv3", "s2", "https://example.com/pricing?ref=x"),
                  "tracked_event": _event(past + 90, "ev1", "s1")}[table]
        wanted = tuple(_as_read(column, v) for column, v in zip(schema.TABLES[table], schema.to_insert_row(table, source)))
        assert got == wanted
    event = select("SELECT metadata, trigger_method FROM tracked_event WHERE id = 'ev1'")[0]
    assert event == ('{"plan":"pro ü","triggerMethod":"button"}', "button")
    assert select("SELECT utm_source, utm_medium, referrer_hostname FROM page_view_event WHERE id = 'pv1' LIMIT 1") \
        == [("news", "email", "www.google.com")]


def test_final_reads_the_latest_version_of_each_visit(stored):
    """s2's older version came in a later batch: FINAL gives s1's version 5 and s2's version 2."""
    assert select("SELECT count() FROM tracked_session") == [(5,)]  # s2 twice: its late old version
    found = select("SELECT session_id, version, ended_at IS NOT NULL, pageviews, duration FROM tracked_session FINAL"
                   " ORDER BY session_id")
    assert found == [("s1", 5, 1, 2, 100), ("s2", 2, 1, 1, 10), ("s3", 1, 0, 1, 0), ("s4", 1, 0, 1, 0)]


def test_one_insert_with_two_versions_of_a_visit_keeps_one_row(chdb):
    """Found here: a current ClickHouse merges an inserted block as it writes it (``optimize_on_insert``,
    on by default since 21.x), so two versions of a visit in one batch are one row at once; 18.16
    keeps both until a merge.  Only ``FINAL`` reads agree on both, and bklit counts visits only so."""
    clickhouse.thd_migrate(URL, DATABASE)
    stop_merges()
    Insert().thd_insert("tracked_session", [_visit("s1", 1.8e9, 1),
                                                                      _visit("s1", 1.8e9, 2, ended=1.8e9 + 5)])
    assert select("SELECT count(), max(version) FROM tracked_session") == [(1, 2)]
    assert select("SELECT count(), max(version) FROM tracked_session FINAL") == [(1, 2)]


def test_bklit_stats_queries(stored):
    """``bklit stats``: pageviews by id (the retried insert once), visits under FINAL, bots apart."""
    now, past = stored
    numbers = clickhouse.thd_once(URL, stats_command.thd_stats, PROJECT, past)
    assert numbers == {
        "pageviews": 4, "bot_pageviews": 1, "events": 2, "bot_events": 1, "sessions": 3, "bot_sessions": 1,
        "top_pages": [{"url": url, "pageviews": 1} for url in sorted([
            "https://example.com/?utm_source=news&utm_medium=email", "https://example.com/now",
            "https://example.com/pricing#plans", "https://example.com/pricing?ref=x"])]}
    assert clickhouse.thd_once(URL, stats_command.thd_stats, PROJECT, int(now) - 60)["pageviews"] == 1


def run_queries(queries: dict[str, str], params: dict) -> dict[str, list[tuple]]:
    return {name: select(query, params) for name, query in queries.items()}


@pytest_twisted.ensureDeferred
async def test_api_stats_queries_kept_hours_and_the_current_one(stored):
    """``/api/stats``: the past hour through HourCache (signature and partials), the current hour fresh."""
    now, past = stored

    async def pool_select(queries, params):
        return run_queries(queries, params)

    clock = task.Clock()
    clock.advance(now)
    hours = rollup.HourCache(pool_select, clock)
    current = int(now) - int(now) % HOUR
    total = await hours.span(PROJECT, current - 24 * HOUR, current)
    for part in rollup.partials(run_queries(rollup.PARTIAL_QUERIES,
                                            rollup.params(PROJECT, current, rollup.FOREVER))).values():
        total.add(part)
    answer = rollup.answer(total, lambda agent: type("Described", (), {"browser": "Chrome",
                                                                       "device_type": "desktop"}))
    assert (answer["pageviews"], answer["events"], answer["sessions"], answer["endedSessions"]) == (4, 2, 3, 2)
    assert answer["bounceRate"] == 0.5 and answer["medianSessionSeconds"] == 100
    assert answer["topPages"] == [{"url": "https://example.com/pricing", "pageviews": 2},
                                  {"url": "https://example.com/", "pageviews": 1},
                                  {"url": "https://example.com/now", "pageviews": 1}]
    assert answer["referrers"] == [{"hostname": "www.google.com", "sessions": 3}]
    assert answer["campaigns"] == [{"source": "news", "medium": "email", "campaign": "", "sessions": 3}]
    assert answer["countries"] == [{"countryCode": "DE", "country": "Germany", "sessions": 3}]
    signature = hours.projects[PROJECT].hours[past][0]
    rows_now = select("SELECT count(), sum(version) FROM tracked_session WHERE started_at < toDateTime(%(end)s)",
                      {"end": past + HOUR})[0]
    assert dict(signature)["visits"] == rows_now  # every stored row, each version, unmerged
    assert await hours.check() == 0  # nothing changed since
    inserter = Insert()
    inserter.thd_insert("tracked_session", [_visit("s2", past + 180, 3, ended=past + 400, pageviews=3)])
    assert await hours.check() == 1  # the visit's new version: its hour again
    assert (await hours.span(PROJECT, past, past + HOUR)).durations == {100: 1, 220: 1}


def test_api_timeseries_query(stored):
    """``/api/timeseries``: people's pageviews per minute (the bot's left out)."""
    now, _ = stored
    start = int(now) - int(now) % 60 - 60 * (api.MINUTES - 1)
    points = api.timeseries_answer(select(api.TIMESERIES_QUERY, {"project": PROJECT, "since": start}), start)
    assert sum(p["pageviews"] for p in points) == 1
    assert len(points) == api.MINUTES
