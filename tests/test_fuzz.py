"""Property-based fuzzing of the parser and the row mapping.

Frames are generated the way a careless or hostile client would make them:
SDK messages with every field at its edges (longest strings, astral and
right-to-left characters, odd but valid URLs, times across the calendar,
nested metadata), the same messages with one to three fields dropped or
replaced by anything JSON can carry, and their bytes flipped, cut or
spliced.  Whatever comes in:

- ``parse_message`` returns a record or raises ``ProtocolError`` with a
  documented code, nothing else;
- an accepted message becomes, by the steps ``Ingest.queue`` takes, a row
  and a broadcast without raising; the row survives the stream's JSON and
  ``schema.to_insert_row`` as values ClickHouse's column types hold;
- and a fixed sample of such rows goes into a real ClickHouse as it is,
  reading back unchanged.
"""

import json
import math
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bklit import agents, clickhouse, enrich, entries, geo, rows, schema, typed, wire
from bklit.clickhouse_urls import clickhouse_database
from bklit.wire import Auth, Event, PageView, ProtocolError, parse_message
from harness import clickhouse_rows

NOW = 1_795_682_666.0  # received_at of every row: 2026-11-26T08:44:26Z
AGENTS = agents.shared()
LOCATOR = geo.Locator()

# ---------------------------------------------------------------- strategies

ACCEPTED_TEXT = st.characters(blacklist_categories=("Cc", "Cs"))  # string fields refuse controls
EDGE_TEXT = st.sampled_from([
    "", " ", "\u2028", "\u202e\u202dRTL", "\ufeff", "\U0001f600" * 3, "e\u0301" * 5, "\uffff", "'; DROP TABLE x;--",
    "<script>alert(1)</script>", "\\", '"', "%00", "${jndi:ldap://x}", "\U0010ffff",
])


def text(max_size, required=False):
    """Strings a string field accepts, up to ``max_size`` characters, now and then at the edges."""
    short = st.text(ACCEPTED_TEXT, min_size=int(required), max_size=min(max_size, 40))
    longest = st.sampled_from(["a", "\U0001d54f", "\u00e9"]).map(lambda c: c * max_size)
    return st.one_of(short, short, short, EDGE_TEXT.filter(lambda s: s or not required), longest)


HOSTS = st.sampled_from([
    "example.com", "EXAMPLE.COM.", "xn--bcher-kva.example", "b\u00fccher.example", "127.0.0.1",
    "[2001:db8::1]", "[::1]:8080", "user:pw@example.com", "example.com:0", "example.com:99999",
    "a" * 250 + ".example", "\u4f8b\u3048.\u30c6\u30b9\u30c8", "example.com\u3002evil",
])
QUERY_VALUES = st.one_of(st.text(max_size=20).map(quote), st.text(ACCEPTED_TEXT, max_size=20),
                         st.sampled_from(["%00", "%ED%A0%80", "%FF%FE", "%", "%zz", "+", "a%0Ab", "%E2%80%AE"]))
QUERY = st.lists(st.tuples(st.sampled_from(enrich.URL_PARAMETERS + ("UTM_SOURCE", "q", "")), QUERY_VALUES),
                 max_size=4).map(lambda pairs: "&".join(f"{name}={value}" for name, value in pairs))
URLS = st.one_of(
    st.builds(lambda scheme, host, path, query, fragment: f"{scheme}://{host}/{path}?{query}#{fragment}",
              st.sampled_from(["http", "https", "HTTPS"]), HOSTS, st.text(ACCEPTED_TEXT, max_size=30),
              QUERY, st.text(ACCEPTED_TEXT, max_size=10)),
    st.sampled_from(["https://example.com/" + "\U0001d54f" * 2028, "http://example.com", "https://example.com/" + "a" * 2028]),
)
REFERRERS = st.one_of(st.none(), URLS, st.sampled_from([
    "", "android-app://com.google.android.gm/", "javascript:alert(1)", "data:text/html,x", "//example.com/",
    "https://[::1/", "about:blank", "file:///etc/passwd"]))


def iso(moment):
    """ISO 8601 with Z, as the SDK writes times."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


TIMESTAMPS = st.one_of(
    st.floats(-3 * 86400, 3600).map(lambda offset: iso(datetime.fromtimestamp(NOW + offset, timezone.utc))),
    st.builds(lambda moment, offset: moment.replace(tzinfo=timezone(offset)).isoformat(),
              st.datetimes(), st.timedeltas(timedelta(hours=-23, minutes=-59), timedelta(hours=23, minutes=59))),
    st.datetimes().map(datetime.isoformat),  # no zone: names no instant
    st.sampled_from(["9999-12-31T23:59:59.999Z", "0001-01-01T00:00:00+14:00", "2026-02-30T00:00:00Z",
                     "2026-11-26T08:00:00.123456789Z", "1732608000000", "NaN", "", "now"]),
    text(64),
)
SIZES = st.fixed_dictionaries({"width": st.integers(0, wire.MAX_DIMENSION),
                               "height": st.integers(0, wire.MAX_DIMENSION)})
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15)
ANYTHING = st.one_of(
    JSON_VALUES, EDGE_TEXT, st.text(max_size=50), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([float("nan"), float("inf"), 1e308, -0.0, "\x00", "\ud800", "a" * 3000, [[[[]]]],
                     {"width": -1, "height": True}, "javascript:alert(1)"]))

PAGEVIEW_FIELDS = {
    "timestamp": TIMESTAMPS, "referrer": REFERRERS, "referrerHostname": st.none() | text(512),
    "referrerType": st.sampled_from(["direct", "internal", "organic", "social", "referral", None]),
    "userAgent": st.none() | text(1024) | st.sampled_from([
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        "Googlebot/2.1 (+http://www.google.com/bot.html)", "curl/8.5.0"]),
    "viewport": st.none() | SIZES, "screen": st.none() | SIZES, "language": st.none() | text(512),
    "timezone": st.none() | text(512), "sessionId": st.just("s1"), "projectId": st.just("p1"),
    "isNewVisitor": st.none() | st.booleans(), "landingPage": st.none() | URLS, "title": st.none() | text(512),
    "extra": JSON_VALUES,
}
EVENT_FIELDS = {
    "timestamp": TIMESTAMPS,
    "metadata": st.none() | st.dictionaries(st.text(max_size=20), JSON_VALUES, max_size=6)
    | st.fixed_dictionaries({"triggerMethod": st.none() | st.text(max_size=10) | st.integers()})
    | st.sampled_from([{"blob": "\u00e9" * 2040}, {"deep": json.loads("[" * 28 + "]" * 28)},
                       {"n": 10 ** 300, "f": 1e308, "z": -0.0, "": None, "\u0000": "\u001b"}]),
    "sessionId": st.just("s1"), "projectId": st.just("p1"),
}
API_KEYS = st.one_of(st.just("bk_" + "x" * 43), text(wire.MAX_API_KEY_LENGTH, required=True))
VALID = st.one_of(
    st.fixed_dictionaries({"type": st.just("pageview"),
                           "data": st.fixed_dictionaries({"url": URLS}, optional=PAGEVIEW_FIELDS)},
                          optional={"apiKey": st.none() | API_KEYS}),
    st.fixed_dictionaries({"type": st.just("event"), "data": st.fixed_dictionaries(
        {"trackingId": text(wire.MAX_TRACKING_ID_LENGTH, required=True),
         "eventType": text(wire.MAX_EVENT_TYPE_LENGTH, required=True)},
        optional=EVENT_FIELDS)}, optional={"apiKey": st.none() | API_KEYS}),
    st.fixed_dictionaries({"type": st.just("auth"), "apiKey": API_KEYS}),
)
FIELD_NAMES = sorted({*PAGEVIEW_FIELDS, *EVENT_FIELDS, "url", "trackingId", "eventType"})


@st.composite
def near_misses(draw):
    """A valid-looking message with one to three fields dropped or replaced by anything."""
    message = draw(VALID)
    for _ in range(draw(st.integers(1, 3))):
        data = message.get("data")
        place = data if isinstance(data, dict) and draw(st.booleans()) else message
        name = draw(st.sampled_from(FIELD_NAMES if place is data else ["type", "apiKey", "data"]))
        if draw(st.booleans()):
            place.pop(name, None)
        else:
            place[name] = draw(ANYTHING)
    return message


@st.composite
def frames(draw, messages):
    """A message as the bytes or text of a frame, now and then with bytes flipped, cut or spliced."""
    text_form = json.dumps(draw(messages), ensure_ascii=draw(st.booleans()))
    payload = text_form.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["as_is", "as_is", "as_text", "flip", "cut", "splice"]))
    if how == "as_text":
        return text_form
    if how != "as_is" and payload:
        at = draw(st.integers(0, len(payload) - 1))
        if how == "flip":
            payload = payload[:at] + bytes([draw(st.integers(0, 255))]) + payload[at + 1:]
        elif how == "cut":
            payload = payload[:at]
        else:
            payload = payload[:at] + draw(st.sampled_from([b'"', b"{", b"]", b",", b"\\u0000", b"\xc3", b"1e999"])) \
                + payload[at:]
    return payload


# ---------------------------------------------------------------- checks

def accepted(payload):
    """The record parse_message makes of the payload, or None when it raised a documented ProtocolError."""
    try:
        record = parse_message(payload)
    except ProtocolError as error:
        assert error.code in wire.ERROR_CODES
        assert isinstance(error.message, str) and error.message
        return None
    assert isinstance(record, (Auth, PageView, Event))
    return record


def ingest_row(record, ip="203.0.113.66"):
    """(table, row) as ``Ingest.queue`` builds them (``bklit.entries``), its broadcast checked to be valid JSON."""
    event_id = str(uuid.uuid4())
    visitor = entries.Visitor.of("p1", "s1", "n:1", enrich.anonymise_ip(ip), LOCATOR.locate(ip))
    if isinstance(record, PageView):
        agent = AGENTS.describe(record.user_agent or "")
        entry, head, tail = entries.pageview(record, visitor, agent, agent.is_bot, event_id, NOW)
        assert json.loads(head + "true" + tail)["data"]["isNewSession"] is True
        return "page_view_event", json.loads(entry)["row"]
    entry, broadcast = entries.event(record, visitor, False, event_id, NOW)
    assert json.loads(broadcast)["type"] == "event"
    return "tracked_event", json.loads(entry)["row"]


def through_the_stream(table, row):
    """The row as the writer reads it back from its stream entry."""
    record = json.loads(json.dumps({"table": table, "row": row}, separators=(",", ":")))
    return record["row"]


UINT_MAX = {"UInt8": 2 ** 8 - 1, "UInt32": 2 ** 32 - 1, "UInt64": 2 ** 64 - 1}


def assert_storable(table, row):
    """to_insert_row's values are what ClickHouse's column types hold."""
    values = schema.to_insert_row(table, row)
    for column, value in zip(schema.TABLES[table], values):
        kind = column.type
        if kind.startswith("Nullable(") and value is None:
            continue
        kind = kind.removeprefix("Nullable(").removesuffix(")")
        where = f"{table}.{column.name} = {value!r}"
        if kind == "String":
            assert isinstance(value, str) and len(value.encode("utf-8")) <= 16384, where  # strict UTF-8
        elif kind in UINT_MAX:
            assert type(value) is int and 0 <= value <= UINT_MAX[kind], where
        elif kind == "Float64":
            assert isinstance(value, float) and math.isfinite(value), where
        elif kind == "DateTime":  # whole epoch seconds, as clickhouse-driver sends them
            assert type(value) is int and 0 <= value < 2 ** 32, where
        else:
            raise AssertionError(f"unexpected column type {column.type}")
    if table == "page_view_event" or table == "tracked_event":
        assert NOW - rows.MAX_PAST <= row["timestamp"] <= NOW + rows.MAX_FUTURE


def check(payload):
    """Everything this module promises about one frame."""
    record = accepted(payload)
    if isinstance(record, (PageView, Event)):
        table, row = ingest_row(record)
        assert_storable(table, through_the_stream(table, row))
    return record


# ---------------------------------------------------------------- properties

@settings(max_examples=2000, deadline=None)
@given(frames(near_misses()))
def test_near_misses_raise_only_protocol_errors(payload):
    """Messages with broken fields, and their mangled bytes, get a documented error or parse cleanly."""
    check(payload)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(VALID))
def test_accepted_messages_make_storable_rows(payload):
    """Messages at the edges of what is valid parse (unless mangled) into rows ClickHouse can hold."""
    check(payload)


@settings(max_examples=500, deadline=None)
@given(VALID)
def test_valid_messages_are_accepted(message):
    """The edge-of-valid strategy really is valid, so the other properties reach the row mapping."""
    try:
        record = parse_message(json.dumps(message))
    except ProtocolError as error:  # several fields at their longest can pass 16 KiB together
        assert (error.code, error.message) == ("too_large", "message is too large"), error
    else:
        assert type(record).__name__.lower() == message["type"]


def test_sample_of_accepted_rows_goes_into_clickhouse(clickhouse_url):
    """200 generated frames (a fixed seed): every accepted row inserts into ClickHouse and reads back unchanged."""
    sample = {"page_view_event": [], "tracked_event": []}

    @settings(max_examples=200, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(frames(VALID))
    def collect(payload):
        record = check(payload)
        if isinstance(record, (PageView, Event)):
            table, row = ingest_row(record)
            sample[table].append(through_the_stream(table, row))

    collect()
    assert len(sample["page_view_event"]) >= 50 and len(sample["tracked_event"]) >= 30, \
        {table: len(found) for table, found in sample.items()}
    database = clickhouse_database(clickhouse_url)
    clickhouse.thd_migrate(clickhouse_url, database)
    inserter = clickhouse.Inserter(database)
    client = clickhouse.connect(clickhouse_url)
    try:
        for table, found in sample.items():
            try:
                inserter.thd_insert(client, table, found)
            except Exception:  # name the row ClickHouse refused
                for row in found:
                    try:
                        inserter.thd_insert(client, table, [row])
                    except Exception as error:
                        raise AssertionError(f"ClickHouse refused {row!r}: {error}") from error
                raise
    finally:
        client.disconnect()
    for table, columns in (("page_view_event", ("url", "referrer", "title", "user_agent", "utm_source")),
                           ("tracked_event", ("tracking_id", "event_type", "metadata", "trigger_method"))):
        stored = {row[0]: row[1:] for row in clickhouse_rows(
            clickhouse_url, f"SELECT id, {', '.join(columns)} FROM {database}.{table}")}
        sent = {row["id"]: tuple(row[column] for column in columns) for row in sample[table]}
        assert stored == sent


# ---------------------------------------------------------------- the typed parser

def outcome(parse, payload):
    """What a parser makes of a payload: its record, or its error's code and message."""
    try:
        return parse(payload)
    except ProtocolError as error:
        return (error.code, error.message)


@st.composite
def repeated_keys(draw):
    """A valid message's text with one of its keys (top level or in data) given twice."""
    message = draw(VALID)
    place = message["data"] if "data" in message and draw(st.booleans()) else message
    name = draw(st.sampled_from(sorted(place)))
    text = json.dumps(message, separators=(",", ":"))
    inner = json.dumps(place, separators=(",", ":"))
    again = json.dumps({name: draw(ANYTHING)}, separators=(",", ":"))[1:-1]
    spliced = inner[:1] + again + "," + inner[1:] if draw(st.booleans()) else inner[:-1] + "," + again + "}"
    return text.replace(inner, spliced, 1).encode("utf-8", "surrogatepass")


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(near_misses()) | frames(VALID) | repeated_keys())
def test_the_typed_parser_answers_as_the_general_one(payload):
    """bklit.typed.parse_message gives the same record or the same error as wire.parse_message."""
    assert outcome(typed.parse_message, payload) == outcome(parse_message, payload)


def test_the_typed_parser_takes_the_sdks_pageview_itself():
    """The SDK's own pageview is decoded the typed way (not left to the general parser)."""
    sdk = json.dumps({"type": "pageview", "apiKey": "bk_x", "data": {
        "url": "https://example.com/a?utm_source=x", "timestamp": "2026-11-26T08:00:00.000Z", "referrer": None,
        "referrerHostname": None, "referrerType": "direct", "userAgent": "Mozilla/5.0",
        "viewport": {"width": 1280, "height": 720}, "screen": {"width": 1920, "height": 1080},
        "language": "en-US", "timezone": "Europe/Berlin", "sessionId": "s1", "projectId": "p1",
        "isNewVisitor": True, "landingPage": "https://example.com/"}}).encode()
    record = typed._typed(sdk, wire.Limits())
    assert record == parse_message(sdk)
    with pytest.raises(typed._Doubt):  # a repeated key is left to the general parser, which refuses it
        typed._typed(sdk.replace(b'{"type"', b'{"type":"auth","type"'), wire.Limits())
