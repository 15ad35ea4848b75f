"""The bad-input catalogue, part 1: messages, fields, and floods of them.

Every case runs a daemon on real Redis and ClickHouse with a well-behaved
client on a socket (and address) of its own, sending a pageview every
``PACE`` seconds, each only after the previous ack.  The bad input arrives on
another socket; the case asserts the exact answer (error code and message, or
close code and reason, or how the event was stored).  Afterwards the good
client must have gone on getting acks, none slower than ``MAX_ACK_SECONDS``,
every bad socket must have given back its place in the connection limits,
and once the writer drained the stream ClickHouse holds exactly the events
the case expects: the good client's, the bad input's that were accepted,
nothing else, nothing in the dead letters.

Part 2, keys, frames, connections and headers, is tests/test_bad_protocol.py;
the scenario both use is tests/catalogue.py.
"""

import json
import time

import pytest
import pytest_twisted

from catalogue import AFTER_URL, BAD_ADDRESS, BAD_SESSION, GOOD_URL, acked, close, pageview, scenario, text_frames
from harness import clickhouse_rows, connect, eventually, sdk_event


def without(field):
    """A pageview whose data lacks ``field``."""
    def build(key):
        message = pageview(key)
        del message["data"][field]
        return message
    return build


def event(key, **changes):
    """A valid custom event of the bad socket's session, with ``changes`` to its data."""
    message = sdk_event("p1", BAD_SESSION, key=key)
    message["data"].update(changes)
    return message


def raw(template):
    """A frame given as text, with ``{key}`` standing for the key."""
    return lambda key: template.replace("{key}", key)


EVENT_JSON = '{"type":"event","apiKey":"{key}","data":{"trackingId":"t","eventType":"e","metadata":%s}}'

# The message is refused with this error; the socket stays open and its next message is acked.
# name: (build the frame from the key, code, message)
REFUSED = {
    # JSON
    "not_json": (raw('{"type": "pageview", "data": {"url": '), "bad_json", "message is not valid JSON"),
    "empty_frame": (raw(""), "bad_json", "message is not valid JSON"),
    "trailing_garbage": (raw('{"type":"auth","apiKey":"{key}"} x'), "bad_json", "message is not valid JSON"),
    "byte_order_mark": (raw('\ufeff{"type":"auth","apiKey":"{key}"}'), "bad_json", "message is not valid JSON"),
    "nan": (raw(EVENT_JSON % '{"x":NaN}'), "bad_json", "numbers must be finite"),
    "infinity": (raw(EVENT_JSON % '{"x":-Infinity}'), "bad_json", "numbers must be finite"),
    "huge_float": (raw(EVENT_JSON % '{"x":1e400}'), "bad_json", "numbers must be finite"),
    "huge_integer": (raw(EVENT_JSON % ('{"x":%s}' % ("9" * 5000))), "bad_json", "message is not valid JSON"),
    "duplicate_keys": (raw('{"type":"auth","apiKey":"{key}","apiKey":"bk_other"}'), "bad_message",
                       "JSON object has a duplicate key"),
    "deep_nesting": (raw(EVENT_JSON % ('{"x":%s}' % ("[" * 3000 + "]" * 3000))), "bad_message",
                     "JSON is nested too deeply"),
    "json_array": (lambda key: json.dumps([pageview(key)]), "bad_message", "message must be a JSON object"),
    "json_string": (raw('"pageview"'), "bad_message", "message must be a JSON object"),
    # the message
    "unknown_type": (lambda key: {"type": "purchase", "data": {"amount": 5}, "apiKey": key}, "unknown_type",
                     "unknown message type"),
    "type_not_a_string": (lambda key: {"type": 7, "data": {}}, "bad_message", "type must be a string"),
    "pageview_data_a_list": (lambda key: {"type": "pageview", "data": [AFTER_URL], "apiKey": key},
                             "bad_message", "data must be an object"),
    "api_key_a_number": (lambda key: {**pageview(key), "apiKey": 12345}, "bad_message", "apiKey must be a string"),
    "api_key_too_long": (lambda key: {**pageview(key), "apiKey": "bk_" + "x" * 300}, "bad_message",
                         "apiKey must be at most 256 characters"),
    # fields: missing, empty, wrong types
    "pageview_without_url": (without("url"), "bad_message", "data.url is required"),
    "empty_url": (lambda key: pageview(key, url=""), "bad_message", "data.url must not be empty"),
    "url_a_number": (lambda key: pageview(key, url=42), "bad_message", "data.url must be a string"),
    "url_an_object": (lambda key: pageview(key, url={"href": GOOD_URL}), "bad_message",
                      "data.url must be a string"),
    "viewport_width_a_string": (lambda key: pageview(key, viewport={"width": "wide", "height": 720}),
                                "bad_message", "data.viewport.width must be an integer"),
    "viewport_width_fractional": (lambda key: pageview(key, viewport={"width": 1280.5, "height": 720}),
                                  "bad_message", "data.viewport.width must be an integer"),
    "screen_a_list": (lambda key: pageview(key, screen=[1920, 1080]), "bad_message", "data.screen must be an object"),
    "is_new_visitor_a_string": (lambda key: pageview(key, isNewVisitor="yes"), "bad_message",
                                "data.isNewVisitor must be a boolean"),
    "title_a_boolean": (lambda key: pageview(key, title=True), "bad_message", "data.title must be a string"),
    "event_tracking_id_a_number": (lambda key: event(key, trackingId=7), "bad_message",
                                   "data.trackingId must be a string"),
    "event_empty_tracking_id": (lambda key: event(key, trackingId=""), "bad_message",
                                "data.trackingId must not be empty"),
    "event_metadata_a_list": (lambda key: event(key, metadata=["hero"]), "bad_message",
                              "data.metadata must be an object"),
    # fields: sizes
    "negative_viewport": (lambda key: pageview(key, viewport={"width": -1, "height": 720}), "bad_message",
                          "data.viewport.width must be between 0 and 100000"),
    "absurd_screen": (lambda key: pageview(key, screen={"width": 1920, "height": 10 ** 12}), "bad_message",
                      "data.screen.height must be between 0 and 100000"),
    "url_too_long": (lambda key: pageview(key, url="https://example.com/" + "a" * 2030), "bad_message",
                     "data.url must be at most 2048 characters"),
    "referrer_too_long": (lambda key: pageview(key, referrer="https://example.com/" + "a" * 2030), "bad_message",
                          "data.referrer must be at most 2048 characters"),
    "user_agent_too_long": (lambda key: pageview(key, userAgent="Mozilla/5.0 " + "x" * 1100), "bad_message",
                            "data.userAgent must be at most 1024 characters"),
    "event_type_too_long": (lambda key: event(key, eventType="c" * 65), "bad_message",
                            "data.eventType must be at most 64 characters"),
    "metadata_too_large": (lambda key: event(key, metadata={"blob": "x" * 4100}), "too_large",
                           "data.metadata is too large"),
    # fields: characters and schemes
    "control_character_in_title": (lambda key: pageview(key, title="Pricing\x1b[31m"), "bad_message",
                                   "data.title must not contain control characters or lone surrogates"),
    "nul_in_url": (lambda key: pageview(key, url="https://example.com/\x00admin"), "bad_message",
                   "data.url must not contain control characters or lone surrogates"),
    "lone_surrogate_in_language": (raw('{"type":"pageview","apiKey":"{key}","data":{"url":"https://example.com/",'
                                       '"language":"en\\ud800"}}'), "bad_message",
                                   "data.language must not contain control characters or lone surrogates"),
    "lone_surrogate_in_metadata": (raw(EVENT_JSON % '{"x":"\\udfff"}'), "bad_message",
                                   "data.metadata must be valid Unicode"),
    "non_http_url": (lambda key: pageview(key, url="ftp://example.com/file"), "bad_message",
                     "data.url must be an http(s) URL"),
    "javascript_url": (lambda key: pageview(key, url="javascript:alert(document.cookie)"), "bad_message",
                       "data.url must be an http(s) URL"),
    "url_without_host": (lambda key: pageview(key, url="https:///pricing"), "bad_message",
                         "data.url must be an http(s) URL"),
    # ids
    "other_project": (lambda key: pageview(key, projectId="p2"), "project_mismatch",
                      "data.projectId does not match the connection"),
    "other_session": (lambda key: event(key, sessionId="1732608000000-other1"), "project_mismatch",
                      "data.sessionId does not match the connection"),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest_twisted.ensureDeferred
async def test_refused_message(case, redis_server, redis_url, clickhouse_url):
    """The message gets exactly its error and no ack; its socket goes on working, and so does the neighbour."""
    build, code, message = REFUSED[case]
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await s.bad(s.key)
        bad.send(build(s.key))
        assert await bad.next() == {"type": "error", "code": code, "message": message}
        bad.send(pageview(s.key, url=AFTER_URL))
        s.pageviews.append((BAD_SESSION, await acked(bad), AFTER_URL))  # the refused one was dropped
        assert bad.inbox.pending == [] and bad.close_code is None
        await close(bad)


def stored_pageview(clickhouse_url, event_id):
    """The stored page_view_event row of an event id, as a dict."""
    columns = ["url", "referrer", "referrer_hostname", "referrer_path", "utm_source", "ip",
               "toUnixTimestamp(timestamp)", "toUnixTimestamp(received_at)", "title"]
    rows = clickhouse_rows(clickhouse_url, f"SELECT {', '.join(columns)} FROM page_view_event FINAL "
                                           f"WHERE id = '{event_id}'")
    assert len(rows) == 1, rows
    return dict(zip(["url", "referrer", "referrer_hostname", "referrer_path", "utm_source", "ip",
                     "timestamp", "received_at", "title"], rows[0]))


def iso_in(seconds):
    """The ISO 8601 UTC time ``seconds`` from now."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + seconds))


def received_time(row):
    """Out-of-range client times are replaced by the receive time."""
    return row["timestamp"] == row["received_at"]


# Accepted and acked, and stored as the check says (clamped, dropped or cleaned).
# name: (changes to the pageview's data (or a function making them), check of the stored row)
ACCEPTED = {
    "timestamp_year_9999": ({"timestamp": "9999-12-31T23:59:59.999Z"}, received_time),
    "timestamp_epoch": ({"timestamp": "1970-01-01T00:00:00.000Z"}, received_time),
    "timestamp_two_days_old": (lambda: {"timestamp": iso_in(-2 * 86400)}, received_time),
    "timestamp_an_hour_ahead": (lambda: {"timestamp": iso_in(3600)}, received_time),
    "timestamp_without_zone": ({"timestamp": "2026-11-26T08:00:00"}, received_time),
    "timestamp_not_a_time": ({"timestamp": "yesterday at noon"}, received_time),
    "javascript_referrer": ({"referrer": "javascript:alert(1)", "referrerHostname": None},
                            lambda row: (row["referrer"], row["referrer_hostname"], row["referrer_path"]) == ("", "", "")),
    "data_uri_referrer": ({"referrer": "data:text/html,<script>alert(1)</script>", "referrerHostname": None},
                          lambda row: row["referrer"] == "" and row["referrer_hostname"] == ""),
    "percent_encoded_controls_in_utm": ({"url": "https://example.com/?utm_source=news%00%1b%0aletter"},
                                        lambda row: row["utm_source"] == "newsletter"),
    "unknown_fields": ({"__proto__": {"admin": True}, "constructor": "x", "ip": "192.0.2.1", "is_bot": 0},
                       lambda row: row["ip"] == "203.0.113.0"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
@pytest_twisted.ensureDeferred
async def test_accepted_and_stored_cleaned(case, redis_server, redis_url, clickhouse_url):
    """Odd but harmless values are accepted; what is stored is the clamped, dropped or cleaned value."""
    changes, check = ACCEPTED[case]
    changes = changes() if callable(changes) else changes
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await s.bad(s.key)
        message = pageview(s.key, **changes)
        bad.send(message)
        event_id = await acked(bad)
        s.pageviews.append((BAD_SESSION, event_id, message["data"]["url"]))
        await close(bad)
        row = await eventually(lambda: stored_pageview(clickhouse_url, event_id))
        assert check(row), row


# The socket is closed; errors (code, message) expected before the close, then (close code, reason).
# name: (config, path query, key (True: the scenario's), frames to send, errors, close)
CLOSING = {
    "pageview_without_api_key": ({}, None, False, lambda key: [pageview(None)],
                                 [("unauthorized", "An API key is required: send auth first")], (1008, "Unauthorized")),
    "no_key_within_auth_timeout": ({"auth_timeout": "0.3"}, None, False, lambda key: [],
                                   [("unauthorized", "No API key within 0.3 s")], (1008, "Unauthorized")),
    "missing_project_id": ({}, f"sessionId={BAD_SESSION}", False, lambda key: [], [], (1008, "Missing projectId")),
    "invalid_project_id": ({}, f"projectId=p1%3Cscript%3E&sessionId={BAD_SESSION}", False, lambda key: [], [],
                           (1008, "Invalid projectId")),
    "missing_session_id": ({}, "projectId=p1", False, lambda key: [], [], (1008, "Missing sessionId")),
    "overlong_session_id": ({}, "projectId=p1&sessionId=" + "s" * 129, False, lambda key: [], [],
                            (1008, "Invalid sessionId")),
    "tenth_error": ({}, None, True, lambda key: ["not json"] * 9 + [pageview(key, projectId="p2")],
                    [("bad_json", "message is not valid JSON")] * 9
                    + [("project_mismatch", "data.projectId does not match the connection")],
                    (1008, "Too many errors")),
    # all in one write: what follows the tenth error is ignored, not stored
    "messages_after_the_closing_error": ({}, None, True, lambda key: ["{"] * 10 + [pageview(key, url=AFTER_URL)],
                                         [("bad_json", "message is not valid JSON")] * 10, (1008, "Too many errors")),
    "rate_flood": ({"rate_limit": "5", "rate_burst": "5"}, None, True,
                   lambda key: [pageview(key, url=AFTER_URL)] * 30,
                   [("rate_limited", "More than 5 messages a second; dropped")] * 10, (1008, "Too many errors")),
}


@pytest.mark.parametrize("case", list(CLOSING))
@pytest_twisted.ensureDeferred
async def test_input_that_closes_the_socket(case, redis_server, redis_url, clickhouse_url):
    """Keyless sockets, bad ids, ten errors and floods get their errors, then their close code and reason."""
    config, query, authenticate, build, errors, closed = CLOSING[case]
    async with scenario(redis_server, redis_url, clickhouse_url, **config) as s:
        query = query or f"projectId=p1&sessionId={BAD_SESSION}"
        bad = await connect(s.port, path="/?" + query, headers=BAD_ADDRESS)
        if not closed[1].startswith(("Missing", "Invalid")):  # bad ids: closed at once
            assert (await bad.next())["type"] == "connected"
        if authenticate:
            bad.send({"type": "auth", "apiKey": s.key})
            assert await bad.next() == {"type": "auth_success"}
        bad.transport.write(text_frames(*build(s.key)))
        for code, message in errors:
            assert await bad.next() == {"type": "error", "code": code, "message": message}
        assert await bad.wait_closed() == closed
        assert bad.inbox.pending == []
        if case == "rate_flood":
            # the four pageviews within the bucket (auth took the fifth token) were queued; their acks
            # were lost to the close that the tenth refusal started, so the SDK would send them again
            s.pageviews += [(BAD_SESSION, None, AFTER_URL)] * 4


@pytest_twisted.ensureDeferred
async def test_oversize_message_closes_1009(redis_server, redis_url, clickhouse_url):
    """A 100 KB pageview, over the 16 KiB limit, closes the socket with 1009 before it is parsed."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await s.bad(s.key)
        bad.send(pageview(s.key, url="https://example.com/" + "a" * 100_000))
        code, reason = await bad.wait_closed()
        assert code == 1009 and "exceeds payload limit of 16384 octets" in reason
        assert bad.inbox.pending == []
