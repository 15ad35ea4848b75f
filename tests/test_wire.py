"""Tests for bklit.wire: every parsing rule with its error code, and the outbound messages."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bklit import wire
from bklit.wire import Auth, Event, Limits, PageView, ProtocolError, parse_message
from samples import SDK_EVENT, SDK_PAGEVIEW

SDK_AUTH = '{"type":"auth","apiKey":"bk_x"}'


def refused(payload, limits=Limits()) -> ProtocolError:
    """Parse a payload that must be refused; return the ProtocolError."""
    with pytest.raises(ProtocolError) as caught:
        parse_message(payload, limits)
    return caught.value


def pageview(**data) -> str:
    """A pageview message with a valid url plus the given data fields (None drops url)."""
    body = {"url": "https://example.com/"}
    body.update(data)
    return json.dumps({"type": "pageview", "data": {k: v for k, v in body.items()
                                                     if not (k == "url" and v is None)}})


def event(**data) -> str:
    """An event message with valid ids plus the given data fields."""
    body = {"trackingId": "t", "eventType": "click"}
    body.update(data)
    return json.dumps({"type": "event", "data": body})


class TestSdkShapes:
    """The three messages SDK 1.0.1 sends parse into the expected records."""

    def test_auth(self):
        """auth carries the api key."""
        assert parse_message(SDK_AUTH) == Auth(api_key="bk_x")

    def test_pageview(self):
        """Every pageview field of the SDK lands in its PageView attribute."""
        pv = parse_message(SDK_PAGEVIEW.encode("utf-8"))
        assert pv == PageView(
            api_key="bk_x",
            url="https://example.com/pricing?utm_source=news&utm_medium=email&gclid=abc",
            timestamp="2026-11-26T08:00:00.000Z", referrer="https://www.google.com/search?q=x",
            referrer_hostname="www.google.com", referrer_type="organic",
            user_agent="Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
                       " Chrome/131.0 Safari/537.36",
            viewport_width=1280, viewport_height=720, screen_width=1920, screen_height=1080,
            language="en-US", timezone="Europe/Berlin", project_id="proj_1",
            session_id="1732608000000-k3j4h5", is_new_visitor=True,
            landing_page="https://example.com/", title=None)

    def test_event(self):
        """Every event field of the SDK lands in its Event attribute."""
        ev = parse_message(SDK_EVENT.encode("utf-8"))
        assert ev == Event(
            api_key="bk_x", tracking_id="cta-button", event_type="click",
            timestamp="2026-11-26T08:00:01.000Z",
            metadata={"position": "hero", "triggerMethod": "manual"},
            project_id="proj_1", session_id="1732608000000-k3j4h5")

    def test_str_and_bytes_agree(self):
        """A str payload parses like its UTF-8 bytes."""
        assert parse_message(SDK_PAGEVIEW) == parse_message(SDK_PAGEVIEW.encode())

    def test_minimal_pageview(self):
        """Only url is required; everything else is None."""
        pv = parse_message('{"type":"pageview","data":{"url":"http://a.example"}}')
        assert pv.url == "http://a.example" and pv.api_key is None
        assert pv.referrer is None and pv.viewport_width is None and pv.is_new_visitor is None

    def test_unknown_fields_ignored(self):
        """Extra fields in data and at the top level are ignored; title is kept."""
        pv = parse_message(pageview(title="Pricing", environment="production", extra=[1]))
        assert pv.title == "Pricing"
        assert isinstance(parse_message('{"type":"auth","apiKey":"k","v":2}'), Auth)

    def test_nulls_mean_absent(self):
        """null optional fields read as None; an empty referrer is None too."""
        pv = parse_message(pageview(referrer="", referrerHostname=None, viewport=None,
                                    isNewVisitor=None, userAgent=None))
        assert pv.referrer is None and pv.referrer_hostname is None
        assert pv.viewport_width is None and pv.is_new_visitor is None

    def test_event_metadata_defaults_to_empty(self):
        """An event without (or with null) metadata gets {}."""
        assert parse_message(event()).metadata == {}
        assert parse_message(event(metadata=None)).metadata == {}

    def test_empty_api_key_on_ingest_is_absent(self):
        """An empty apiKey on a pageview is treated as no key."""
        msg = json.dumps({"type": "pageview", "apiKey": "", "data": {"url": "https://a.b/"}})
        assert parse_message(msg).api_key is None


class TestFraming:
    """Size, encoding and JSON syntax rules."""

    def test_too_large_bytes(self):
        """A payload above max_message_bytes is too_large, before any decoding."""
        assert refused(b"\xff" * 101, Limits(max_message_bytes=100)).code == "too_large"

    def test_size_counts_utf8_bytes_of_str(self):
        """A str is measured in UTF-8 bytes, not characters."""
        msg = json.dumps({"type": "auth", "apiKey": "k", "pad": "é" * 40}, ensure_ascii=False)
        assert len(msg) <= 100 < len(msg.encode())
        assert refused(msg, Limits(max_message_bytes=100)).code == "too_large"
        assert isinstance(parse_message(msg), Auth)

    def test_exactly_at_limit_is_accepted(self):
        """The limit itself is allowed."""
        msg = SDK_AUTH.encode()
        assert isinstance(parse_message(msg, Limits(max_message_bytes=len(msg))), Auth)

    @pytest.mark.parametrize("payload", [
        b"\xff\xfe", b'{"type":"auth","apiKey":"\xc3"}', b"\xed\xa0\x80",
        '{"type":"auth","apiKey":"\ud800"}',
    ])
    def test_invalid_utf8(self, payload):
        """Bytes that are not UTF-8 (and str with lone surrogates) are bad_json."""
        assert refused(payload).code == "bad_json"

    @pytest.mark.parametrize("payload", [
        "", "{", "{'type':'auth'}", '{"type":"auth",}', "nul", '{"a":1} x', "\ufeff{}",
    ])
    def test_invalid_json(self, payload):
        """Malformed JSON is bad_json."""
        assert refused(payload).code == "bad_json"

    @pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
    def test_non_finite_numbers(self, literal):
        """NaN/Infinity literals and overflowing floats are bad_json."""
        assert refused('{"type":"event","data":{"metadata":{"x":%s}}}' % literal).code == "bad_json"

    def test_huge_integer(self):
        """An integer too long to convert is bad_json, not a crash."""
        assert refused('{"type":"auth","apiKey":"k","n":%s}' % ("9" * 5000)).code == "bad_json"

    @pytest.mark.parametrize("payload", ["[]", "1", '"auth"', "null", "true", '[{"type":"auth"}]'])
    def test_not_an_object(self, payload):
        """Valid JSON that is not an object is bad_message."""
        assert refused(payload).code == "bad_message"

    def test_duplicate_keys(self):
        """A repeated key, at any depth, is bad_message."""
        assert refused('{"type":"auth","apiKey":"a","apiKey":"b"}').code == "bad_message"
        nested = '{"type":"event","data":{"trackingId":"t","eventType":"e","metadata":{"a":1,"a":2}}}'
        assert refused(nested).code == "bad_message"

    def test_deep_nesting(self):
        """Deeply nested JSON is refused with bad_message, however deep."""
        for depth in (40, 5000):
            metadata = "[" * depth + "]" * depth
            payload = '{"type":"event","data":{"trackingId":"t","eventType":"e","metadata":{"a":%s}}}'
            assert refused(payload % metadata).code == "bad_message"

    def test_not_a_frame(self):
        """A payload that is neither str nor bytes is bad_message."""
        assert refused(12).code == "bad_message"


class TestType:
    """The type field."""

    @pytest.mark.parametrize("payload", ['{}', '{"type":null}', '{"type":1}', '{"type":["auth"]}'])
    def test_missing_or_not_string(self, payload):
        """Missing or non-string type is bad_message."""
        assert refused(payload).code == "bad_message"

    @pytest.mark.parametrize("kind", ["", "AUTH", "pageView", "heartbeat", "snapshot"])
    def test_unknown(self, kind):
        """An unknown type is unknown_type."""
        assert refused(json.dumps({"type": kind})).code == "unknown_type"


class TestAuth:
    """The auth message."""

    @pytest.mark.parametrize("body", [{}, {"apiKey": None}, {"apiKey": ""}, {"apiKey": 5},
                                      {"apiKey": ["k"]}, {"apiKey": "k" * 257},
                                      {"apiKey": "bk\n"}])
    def test_bad_key(self, body):
        """apiKey must be a non-empty string of at most 256 plain characters."""
        assert refused(json.dumps({"type": "auth", **body})).code == "bad_message"

    def test_max_length_key(self):
        """256 characters are allowed."""
        assert parse_message(json.dumps({"type": "auth", "apiKey": "k" * 256})).api_key == "k" * 256

    def test_errors_never_echo_the_key(self):
        """No error message repeats a client-sent api key."""
        secret = "bk_SECRET_" + "z" * 300
        for msg in ({"type": "auth", "apiKey": secret}, {"type": "auth", "apiKey": secret + "\x00"},
                    {"type": "pageview", "apiKey": secret, "data": {"url": secret}},
                    {"type": secret, "apiKey": secret}):
            error = refused(json.dumps(msg))
            assert "SECRET" not in error.message and "SECRET" not in str(error)


class TestPageView:
    """pageview data rules."""

    @pytest.mark.parametrize("data", [None, [], "x", 1])
    def test_data_must_be_object(self, data):
        """data missing or not an object is bad_message."""
        msg = {"type": "pageview"} if data is None else {"type": "pageview", "data": data}
        assert refused(json.dumps(msg)).code == "bad_message"

    @pytest.mark.parametrize("url", [None, "", 5, "example.com", "ftp://example.com/",
                                     "javascript:alert(1)", "https://", "http:///path",
                                     "https://[::1/", "data:text/html,x"])
    def test_url_must_be_http(self, url):
        """url is required, non-empty and an http(s) URL with a host."""
        assert refused(pageview(url=url)).code == "bad_message"

    @pytest.mark.parametrize("referrer,kept", [
        ("https://www.google.com/", True),
        ("android-app://com.google.android.gm/", True),
        ("javascript:alert(1)", False),
        ("ftp://example.com/", False),
        ("not a url", False),
        ("https://[::1/", False),
    ])
    def test_referrer_schemes(self, referrer, kept):
        """Web and app referrers are kept; any other is dropped, the pageview accepted."""
        pv = parse_message(pageview(referrer=referrer))
        assert pv.referrer == (referrer if kept else None)

    def test_url_error_names_field(self):
        """The message names the offending field."""
        assert refused(pageview(url=5)).message == "data.url must be a string"
        assert "data.viewport.width" in refused(pageview(viewport={"width": "1"})).message

    def test_url_length(self):
        """url up to max_url_length is fine; longer is bad_message."""
        base = "https://example.com/"
        ok = base + "a" * (2048 - len(base))
        assert parse_message(pageview(url=ok)).url == ok
        assert refused(pageview(url=ok + "a")).code == "bad_message"
        limits = Limits(max_url_length=30)
        assert refused(pageview(url=base + "a" * 11), limits).code == "bad_message"

    @pytest.mark.parametrize("field", ["referrer", "landingPage"])
    def test_url_fields_length(self, field):
        """referrer and landingPage are limited by max_url_length too."""
        long_url = "https://example.com/" + "a" * 2048
        assert refused(pageview(**{field: long_url})).code == "bad_message"

    @pytest.mark.parametrize("referrer", [7, ["x"], {"a": 1}])
    def test_referrer_must_be_a_string(self, referrer):
        """A referrer that is not a string (or null) is bad_message."""
        assert refused(pageview(referrer=referrer)).code == "bad_message"

    @pytest.mark.parametrize("field", ["timestamp", "referrerHostname", "referrerType", "userAgent",
                                       "language", "timezone", "sessionId", "projectId",
                                       "landingPage", "title"])
    def test_string_fields_type(self, field):
        """Every string field refuses non-strings with a message naming it."""
        for value in (1, True, {}, [], 1.5):
            error = refused(pageview(**{field: value}))
            assert error.code == "bad_message" and f"data.{field}" in error.message

    @pytest.mark.parametrize("field", ["referrerHostname", "language", "timezone", "title",
                                       "referrerType", "timestamp"])
    def test_string_length(self, field):
        """Other strings are limited by max_string_length."""
        assert parse_message(pageview(**{field: "a" * 512}))
        assert refused(pageview(**{field: "a" * 513})).code == "bad_message"

    def test_user_agent_length(self):
        """userAgent has its own, larger limit."""
        assert parse_message(pageview(userAgent="a" * 1024)).user_agent == "a" * 1024
        assert refused(pageview(userAgent="a" * 1025)).code == "bad_message"
        assert refused(pageview(userAgent="a" * 11), Limits(max_user_agent_length=10))

    @pytest.mark.parametrize("char", ["\x00", "\n", "\t", "\x1b", "\x7f", "\x85"])
    @pytest.mark.parametrize("field", ["url", "title", "userAgent", "referrer", "language"])
    def test_control_characters(self, field, char):
        """Control characters anywhere in a string field are bad_message."""
        value = "https://example.com/" + char if field in ("url", "referrer") else "a" + char
        assert refused(pageview(**{field: value})).code == "bad_message"

    def test_lone_surrogate_escape(self):
        """A \\ud800 escape in a string field is bad_message (not storable as UTF-8)."""
        payload = '{"type":"pageview","data":{"url":"https://a.b/","title":"\\ud800"}}'
        assert refused(payload).code == "bad_message"

    def test_unicode_text_accepted(self):
        """Non-ASCII text and IDN hosts are fine."""
        pv = parse_message(pageview(url="https://bücher.example/straße", title="Bücher ✓ 本"))
        assert pv.title == "Bücher ✓ 本"

    @pytest.mark.parametrize("field", ["viewport", "screen"])
    @pytest.mark.parametrize("value", [
        [], "1280x720", 5, {"width": 1280}, {"height": 720}, {"width": "1", "height": 1},
        {"width": 1.5, "height": 1}, {"width": 1280.0, "height": 720}, {"width": True, "height": 1},
        {"width": 1, "height": False}, {"width": -1, "height": 1}, {"width": 1, "height": 100001},
        {"width": None, "height": 1},
    ])
    def test_dimensions(self, field, value):
        """viewport/screen need integer (not bool, not float) width and height in 0..100000."""
        assert refused(pageview(**{field: value})).code == "bad_message"

    def test_dimension_bounds(self):
        """0 and 100000 are allowed."""
        pv = parse_message(pageview(viewport={"width": 0, "height": 100000}))
        assert (pv.viewport_width, pv.viewport_height) == (0, 100000)

    @pytest.mark.parametrize("value", [1, 0, "true", [], {}])
    def test_is_new_visitor_bool(self, value):
        """isNewVisitor must be a boolean."""
        assert refused(pageview(isNewVisitor=value)).code == "bad_message"

    @pytest.mark.parametrize("value", [5, True, {}, []])
    def test_api_key_type(self, value):
        """apiKey on a pageview, when present, must be a string."""
        msg = {"type": "pageview", "apiKey": value, "data": {"url": "https://a.b/"}}
        assert refused(json.dumps(msg)).code == "bad_message"


class TestEvent:
    """event data rules."""

    @pytest.mark.parametrize("data", [None, [], "x"])
    def test_data_must_be_object(self, data):
        """data missing or not an object is bad_message."""
        msg = {"type": "event"} if data is None else {"type": "event", "data": data}
        assert refused(json.dumps(msg)).code == "bad_message"

    @pytest.mark.parametrize("field,limit", [("trackingId", 128), ("eventType", 64)])
    def test_required_ids(self, field, limit):
        """trackingId (1-128) and eventType (1-64) are required non-empty strings."""
        assert parse_message(event(**{field: "a" * limit}))
        for value in (None, "", 1, [], "a" * (limit + 1), "a\x00"):
            error = refused(event(**{field: value}))
            assert error.code == "bad_message" and f"data.{field}" in error.message

    @pytest.mark.parametrize("value", [[], "x", 1, True])
    def test_metadata_must_be_object(self, value):
        """metadata, when present, must be an object."""
        assert refused(event(metadata=value)).code == "bad_message"

    def test_metadata_size(self):
        """metadata serialized compactly may reach max_metadata_bytes, not exceed it."""
        fits = {"k": "a" * (4096 - len('{"k":""}'))}
        assert parse_message(event(metadata=fits)).metadata == fits
        fits["k"] += "a"
        assert refused(event(metadata=fits)).code == "too_large"

    def test_metadata_size_counts_utf8(self):
        """Non-ASCII metadata is measured in UTF-8 bytes."""
        assert refused(event(metadata={"k": "é" * 30}), Limits(max_metadata_bytes=40)).code \
            == "too_large"

    def test_metadata_lone_surrogate(self):
        """Metadata that cannot be encoded as UTF-8 is bad_message."""
        payload = '{"type":"event","data":{"trackingId":"t","eventType":"e","metadata":{"a":"\\udc00"}}}'
        assert refused(payload).code == "bad_message"

    def test_metadata_nested_values_kept(self):
        """Nested metadata values survive as parsed."""
        meta = {"a": [1, 2.5, None, True], "b": {"c": "d"}}
        assert parse_message(event(metadata=meta)).metadata == meta

    @pytest.mark.parametrize("field", ["timestamp", "projectId", "sessionId"])
    def test_optional_strings(self, field):
        """Optional event strings are type- and length-checked."""
        assert refused(event(**{field: 5})).code == "bad_message"
        assert refused(event(**{field: "a" * 513})).code == "bad_message"


class TestIds:
    """valid_project_id and valid_session_id."""

    @pytest.mark.parametrize("value,ok", [
        ("proj_1", True), ("a" * 64, True), ("A-z_09", True), ("a" * 65, False), ("", False),
        ("proj 1", False), ("proj.1", False), ("proj_1\n", False), ("pröj", False), (None, False),
    ])
    def test_project_id(self, value, ok):
        """1-64 characters of [A-Za-z0-9_-]."""
        assert wire.valid_project_id(value) is ok

    @pytest.mark.parametrize("value,ok", [
        ("1732608000000-k3j4h5", True), ("a.b:c_d-e", True), ("s" * 128, True),
        ("s" * 129, False), ("", False), ("a/b", False), ("a b", False), ("s\n", False),
    ])
    def test_session_id(self, value, ok):
        """1-128 characters of [A-Za-z0-9_.:-]."""
        assert wire.valid_session_id(value) is ok


class TestOutbound:
    """Messages the server sends."""

    def test_iso_timestamp(self):
        """Milliseconds, UTC, Z; rounding carries into the seconds."""
        assert wire.iso_timestamp(1795682666.123) == "2026-11-26T08:44:26.123Z"
        assert wire.iso_timestamp(0) == "1970-01-01T00:00:00.000Z"
        assert wire.iso_timestamp(1795682666.9996) == "2026-11-26T08:44:27.000Z"

    def test_connected(self):
        """connected carries both ids and the time."""
        assert json.loads(wire.connected("proj_1", "s-1", 0.5)) == {
            "type": "connected", "projectId": "proj_1", "sessionId": "s-1",
            "timestamp": "1970-01-01T00:00:00.500Z"}

    def test_connected_dashboard(self):
        """The dashboard variant omits sessionId."""
        assert b"sessionId" not in wire.connected("proj_1", None, 0)

    def test_compact_bytes(self):
        """Builders return compact JSON bytes."""
        assert wire.auth_success() == b'{"type":"auth_success"}'
        assert wire.ack("01J", "pageview") == b'{"type":"ack","eventId":"01J","messageType":"pageview"}'
        assert wire.error("too_large", "message is too large") == \
            b'{"type":"error","code":"too_large","message":"message is too large"}'

    def test_error_code_checked(self):
        """Unknown codes are refused by error() and ProtocolError."""
        with pytest.raises(ValueError):
            wire.error("nope", "x")
        with pytest.raises(ValueError):
            ProtocolError("nope", "x")

    def test_every_code_builds(self):
        """Every documented code can be sent."""
        for code in wire.ERROR_CODES:
            assert json.loads(wire.error(code, "m"))["code"] == code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
data_fields = st.sampled_from(
    ["url", "referrer", "referrerHostname", "referrerType", "userAgent", "viewport", "screen",
     "language", "timezone", "sessionId", "projectId", "isNewVisitor", "landingPage", "title",
     "timestamp", "trackingId", "eventType", "metadata"])
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["auth", "pageview", "event"]) | json_values},
    optional={"apiKey": json_values,
              "data": st.dictionaries(data_fields, json_values | st.just("https://a.b/")) | json_values})


class TestFuzz:
    """parse_message raises nothing but ProtocolError, whatever it is given."""

    @staticmethod
    def check(payload, limits=Limits()):
        """Parse; either a record or a ProtocolError with a known code."""
        try:
            result = parse_message(payload, limits)
        except ProtocolError as error:
            assert error.code in wire.ERROR_CODES
        else:
            assert isinstance(result, (Auth, PageView, Event))

    @settings(max_examples=300)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, payload):
        """Random bytes."""
        self.check(payload)

    @settings(max_examples=300)
    @given(st.text(max_size=300))
    def test_arbitrary_text(self, payload):
        """Random text."""
        self.check(payload)

    @settings(max_examples=500)
    @given(messages)
    def test_message_shaped_json(self, message):
        """JSON objects shaped like messages with arbitrary field values."""
        self.check(json.dumps(message))
        self.check(json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass"))

    @settings(max_examples=200)
    @given(messages, st.integers(min_value=0, max_value=200))
    def test_truncated_and_limited(self, message, cut):
        """Truncated messages and tight limits."""
        payload = json.dumps(message).encode()
        self.check(payload[:cut])
        self.check(payload, Limits(max_message_bytes=cut, max_url_length=cut % 50,
                                   max_string_length=cut % 20, max_metadata_bytes=cut))
