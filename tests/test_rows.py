"""Tests for bklit.rows: client time, and pageview/event rows that fit their tables."""

import json
from datetime import datetime, timezone

import pytest

from bklit import schema
from bklit.rows import MAX_FUTURE, MAX_PAST, event_row, event_time, pageview_row, parse_client_time
from bklit.wire import Event, PageView, parse_message

from samples import SDK_EVENT, SDK_PAGEVIEW

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc).timestamp()  # the SDK samples' time


class TestParseClientTime:
    """parse_client_time reads ISO 8601 instants."""

    @pytest.mark.parametrize("value,expected", [
        ("2026-11-26T08:00:00.000Z", T0),
        ("2026-11-26T08:00:00Z", T0),
        ("2026-11-26T08:00:00.250Z", T0 + 0.25),
        ("2026-11-26T09:00:00+01:00", T0),
        ("2026-11-26T03:30:00-04:30", T0),
        ("2026-11-26 08:00:00+00:00", T0),
    ])
    def test_instants(self, value, expected):
        """Z and offsets are honoured."""
        assert parse_client_time(value) == pytest.approx(expected)

    @pytest.mark.parametrize("value", [
        None, "", "yesterday", "2026-11-26", "2026-11-26T08:00:00", "2026-13-01T00:00:00Z",
        "2026-11-26T08:00:00.000Z" + " " * 100, 1732608000,
        "２０２６-11-26T08:00:00Z",
    ])
    def test_unparseable(self, value):
        """Dates without time or zone, nonsense, over-long text and non-strings give None."""
        assert parse_client_time(value) is None


class TestEventTime:
    """event_time clamps the client's time to a window around the receive time."""

    def test_within_window(self):
        """A plausible client time is kept."""
        assert event_time("2026-11-26T08:00:00.000Z", T0 + 2) == pytest.approx(T0)

    def test_lower_bound(self):
        """Exactly 24 h old is kept; older falls back to received_at."""
        ts = "2026-11-26T08:00:00Z"
        assert event_time(ts, T0 + MAX_PAST) == pytest.approx(T0)
        assert event_time(ts, T0 + MAX_PAST + 1) == T0 + MAX_PAST + 1

    def test_upper_bound(self):
        """Up to 5 min ahead is kept; further ahead falls back to received_at."""
        ts = "2026-11-26T08:00:00Z"
        assert event_time(ts, T0 - MAX_FUTURE) == pytest.approx(T0)
        assert event_time(ts, T0 - MAX_FUTURE - 1) == T0 - MAX_FUTURE - 1

    def test_missing_or_bad(self):
        """No or unparseable client time: received_at."""
        assert event_time(None, T0) == T0
        assert event_time("garbage", T0) == T0

    @pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59"])
    def test_extreme_years(self, ts):
        """Extreme but valid times are simply out of the window."""
        assert event_time(ts, T0) == T0

    def test_constants(self):
        """The window is 24 h back and 5 min ahead."""
        assert (MAX_PAST, MAX_FUTURE) == (86400, 300)


def sdk_pageview_row(**changes) -> dict:
    """The row of the SDK sample pageview received 1 s after its timestamp."""
    pv = parse_message(SDK_PAGEVIEW)
    if changes:
        fields = {name: getattr(pv, name) for name in PageView.__slots__}
        pv = PageView(**{**fields, **changes})
    return pageview_row(pv, event_id="ev1", project_id="proj_1", session_id="s1",
                        received_at=T0 + 1, ip="203.0.113.0")


class TestPageviewRow:
    """pageview_row maps a PageView onto page_view_event columns."""

    def test_keys_are_columns(self):
        """Every key is a column of page_view_event."""
        assert set(sdk_pageview_row()) <= set(schema.insert_columns("page_view_event"))

    def test_sdk_sample(self):
        """The SDK sample's values land in their columns."""
        row = sdk_pageview_row()
        assert row["id"] == "ev1" and row["project_id"] == "proj_1" and row["session_id"] == "s1"
        assert row["timestamp"] == pytest.approx(T0) and row["received_at"] == T0 + 1
        assert row["url"].startswith("https://example.com/pricing?")
        assert row["referrer"] == "https://www.google.com/search?q=x"
        assert (row["referrer_hostname"], row["referrer_path"]) == ("www.google.com", "/search")
        assert row["referrer_type"] == "organic"
        assert (row["utm_source"], row["utm_medium"], row["gclid"]) == ("news", "email", "abc")
        assert row["utm_campaign"] == "" and row["fbclid"] == ""
        assert row["user_agent"].startswith("Mozilla/5.0")
        assert (row["viewport_width"], row["viewport_height"]) == (1280, 720)
        assert (row["screen_width"], row["screen_height"]) == (1920, 1080)
        assert (row["language"], row["timezone"]) == ("en-US", "Europe/Berlin")
        assert row["is_new_visitor"] == 1 and row["landing_page"] == "https://example.com/"
        assert row["ip"] == "203.0.113.0" and row["title"] == ""

    def test_geo_and_browser_left_out(self):
        """Columns another module fills are absent."""
        row = sdk_pageview_row()
        for column in ("browser", "os", "device_type", "mobile", "is_bot", "country", "city", "lat"):
            assert column not in row

    def test_minimal_pageview(self):
        """Absent optional fields become "" and 0, never None."""
        pv = parse_message('{"type":"pageview","data":{"url":"https://a.b/"}}')
        row = pageview_row(pv, event_id="e", project_id="p", session_id="s", received_at=T0, ip="")
        assert None not in row.values()
        assert row["timestamp"] == T0 and row["referrer_hostname"] == "" and row["referrer_path"] == ""
        assert row["is_new_visitor"] == 0 and row["screen_width"] == 0

    def test_parsed_hostname_when_client_sends_none(self):
        """Without referrerHostname, the hostname is parsed from the referrer."""
        row = sdk_pageview_row(referrer_hostname=None, referrer="https://News.Example/a?b")
        assert (row["referrer_hostname"], row["referrer_path"]) == ("news.example", "/a")

    def test_client_hostname_preferred(self):
        """The client's referrerHostname wins over the parsed one."""
        assert sdk_pageview_row(referrer_hostname="google.com")["referrer_hostname"] == "google.com"

    def test_booleans_as_ints(self):
        """isNewVisitor becomes 0/1."""
        assert sdk_pageview_row(is_new_visitor=False)["is_new_visitor"] == 0
        assert sdk_pageview_row(is_new_visitor=None)["is_new_visitor"] == 0

    def test_stale_client_time(self):
        """A client time outside the window is replaced by received_at."""
        row = sdk_pageview_row(timestamp="2020-01-01T00:00:00Z")
        assert row["timestamp"] == row["received_at"] == T0 + 1

    def test_row_is_json_and_inserts(self):
        """The row survives the JSON stream entry and converts to an insert tuple."""
        row = json.loads(json.dumps(sdk_pageview_row()))
        values = schema.to_insert_row("page_view_event", row)
        assert len(values) == len(schema.TABLES["page_view_event"])


def sdk_event_row(metadata=None) -> dict:
    """The row of the SDK sample event, optionally with other metadata."""
    ev = parse_message(SDK_EVENT)
    if metadata is not None:
        ev = Event(ev.api_key, ev.tracking_id, ev.event_type, ev.timestamp, metadata,
                   ev.project_id, ev.session_id)
    return event_row(ev, event_id="ev2", project_id="proj_1", session_id="s1", received_at=T0 + 2)


class TestEventRow:
    """event_row maps an Event onto tracked_event columns."""

    def test_keys_are_columns(self):
        """Every key is a column of tracked_event, and every column is set."""
        assert set(sdk_event_row()) == set(schema.insert_columns("tracked_event"))

    def test_sdk_sample(self):
        """The SDK sample's values land in their columns."""
        row = sdk_event_row()
        assert row["id"] == "ev2" and row["project_id"] == "proj_1" and row["session_id"] == "s1"
        assert row["timestamp"] == pytest.approx(T0 + 1) and row["received_at"] == T0 + 2
        assert (row["tracking_id"], row["event_type"]) == ("cta-button", "click")
        assert row["event_definition_id"] == "cta-button"
        assert row["metadata"] == '{"position":"hero","triggerMethod":"manual"}'
        assert row["trigger_method"] == "manual"

    def test_metadata_sorted_compact_unicode(self):
        """metadata is compact JSON with sorted keys, non-ASCII kept as is."""
        row = sdk_event_row({"z": 1, "a": {"y": [1, 2], "b": "é"}})
        assert row["metadata"] == '{"a":{"b":"é","y":[1,2]},"z":1}'

    def test_trigger_method_only_strings(self):
        """A non-string triggerMethod gives ""."""
        assert sdk_event_row({"triggerMethod": 5})["trigger_method"] == ""
        assert sdk_event_row({})["trigger_method"] == ""
        assert sdk_event_row({})["metadata"] == "{}"

    def test_future_client_time(self):
        """A client time too far ahead is replaced by received_at."""
        ev = Event(None, "t", "click", "2026-11-26T09:00:00Z")
        row = event_row(ev, event_id="e", project_id="p", session_id="s", received_at=T0)
        assert row["timestamp"] == T0

    def test_row_inserts(self):
        """The row converts to an insert tuple, times as whole epoch seconds."""
        values = schema.to_insert_row("tracked_event", sdk_event_row())
        assert values[3] == datetime(2026, 11, 26, 8, 0, 1, tzinfo=timezone.utc).timestamp()

