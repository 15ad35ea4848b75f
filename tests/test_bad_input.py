"""Bad SDK input, end to end: the exact refusal, working neighbours, clean storage.

Each test runs a daemon on real Redis and ClickHouse with two sockets: a
good client that keeps sending pageviews while the bad input arrives on the
other socket, and the bad one.  Afterwards the stream is drained (the writer
deletes entries once stored) and ClickHouse must hold exactly the acked
events: nothing of the bad input, nothing in the dead-letter stream.
"""

import json

import pytest
import pytest_twisted

from harness import connect, eventually, clickhouse_rows, running_daemon, sdk_event, sdk_pageview, settings

GOOD_SESSION = "1732608000000-good01"
BAD_SESSION = "1732608000000-bad001"
AFTER_URL = "https://example.com/after-the-error"


def pageview(key, **changes):
    """A valid pageview of the bad socket's session, with ``changes`` to its data."""
    return sdk_pageview("p1", BAD_SESSION, key=key, **changes)


def without_url(key):
    """A pageview whose data lacks the required url."""
    message = pageview(key)
    del message["data"]["url"]
    return message


def event(key, **changes):
    """A valid custom event of the bad socket's session, with ``changes`` to its data."""
    message = sdk_event("p1", BAD_SESSION, key=key)
    message["data"].update(changes)
    return message


# name: (build the frame from the key, the error code it must get)
REFUSED = {
    "not_json": (lambda key: '{"type": "pageview", "data": {"url": ', "bad_json"),
    "json_array": (lambda key: json.dumps([pageview(key)]), "bad_message"),
    "unknown_type": (lambda key: {"type": "purchase", "data": {"amount": 5}, "apiKey": key}, "unknown_type"),
    "type_not_a_string": (lambda key: {"type": 7, "data": {}}, "bad_message"),
    "pageview_without_url": (without_url, "bad_message"),
    "pageview_data_a_list": (lambda key: {"type": "pageview", "data": [AFTER_URL], "apiKey": key}, "bad_message"),
    "url_a_number": (lambda key: pageview(key, url=42), "bad_message"),
    "viewport_width_a_string": (lambda key: pageview(key, viewport={"width": "wide", "height": 720}), "bad_message"),
    "is_new_visitor_a_string": (lambda key: pageview(key, isNewVisitor="yes"), "bad_message"),
    "event_tracking_id_a_number": (lambda key: event(key, trackingId=7), "bad_message"),
    "event_metadata_a_list": (lambda key: event(key, metadata=["hero"]), "bad_message"),
    "url_too_long": (lambda key: pageview(key, url="https://example.com/" + "a" * 2030), "bad_message"),
    "metadata_too_large": (lambda key: event(key, metadata={"blob": "x" * 4100}), "too_large"),
    "other_project": (lambda key: pageview(key, projectId="p2"), "project_mismatch"),
    "other_session": (lambda key: event(key, sessionId="1732608000000-other1"), "project_mismatch"),
}


async def open_client(port, session, key=None):
    """A socket for ``session`` of project p1, past ``connected`` (and ``auth`` when given a key)."""
    client = await connect(port, path=f"/?projectId=p1&sessionId={session}")
    assert (await client.next())["type"] == "connected"
    if key is not None:
        client.send({"type": "auth", "apiKey": key})
        assert await client.next() == {"type": "auth_success"}
    return client


async def acked(client, kind="pageview"):
    """The next message, which must be an ack of ``kind``; returns its event id."""
    ack = await client.next()
    assert ack["type"] == "ack" and ack["messageType"] == kind, ack
    assert set(ack) == {"type", "eventId", "messageType"}
    return ack["eventId"]


async def assert_stored_exactly(redis_server, clickhouse_url, pageviews):
    """Once the writer drained the stream, ClickHouse holds exactly ``pageviews`` and no event.

    ``pageviews`` is a set of ``(session_id, id, url)``.
    """
    await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0)
    assert set(clickhouse_rows(clickhouse_url, "SELECT session_id, id, url FROM page_view_event")) == pageviews
    assert len(clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event")) == len(pageviews)
    assert clickhouse_rows(clickhouse_url, "SELECT id FROM tracked_event") == []
    assert redis_server.execute("XLEN", "bklit:events:dead") == 0


async def close(*clients):
    """Close the sockets still open and wait until each is closed."""
    for client in clients:
        if client.close_code is None:
            client.sendClose()
        await client.wait_closed()


@pytest.mark.parametrize("case", list(REFUSED))
@pytest_twisted.ensureDeferred
async def test_refused_message_gets_its_error_and_is_not_stored(case, redis_server, redis_url, clickhouse_url):
    """The bad message gets its error code and no ack; its socket and the neighbour keep working."""
    build, code = REFUSED[case]
    url = "https://example.com/good"
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        good = await open_client(daemon.port, GOOD_SESSION, key)
        bad = await open_client(daemon.port, BAD_SESSION, key)
        good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
        first = await acked(good)

        bad.send(build(key))
        good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
        error = await bad.next()
        assert error["type"] == "error" and error["code"] == code, error
        assert set(error) == {"type", "code", "message"} and error["message"]
        second = await acked(good)

        bad.send(pageview(key, url=AFTER_URL))
        after = await acked(bad)  # the refused message was dropped: this ack is the next message

        await assert_stored_exactly(redis_server, clickhouse_url, {
            (GOOD_SESSION, first, url), (GOOD_SESSION, second, url), (BAD_SESSION, after, AFTER_URL)})
        assert bad.inbox.pending == [] and good.inbox.pending == []
        assert bad.close_code is None
        await close(good, bad)


def oversize(key):
    """A 100 KB pageview, over the 16 KiB message limit."""
    return pageview(key, url="https://example.com/" + "a" * 100_000)


# name: (send the bad input, authenticate first, error codes expected before the close, close code)
CLOSING = {
    "oversize_message": (lambda client, key: client.send(oversize(key)), True, [], 1009),
    "binary_frame": (lambda client, key: client.sendMessage(json.dumps(pageview(key)).encode(), isBinary=True),
                     True, [], 1003),
    "pageview_without_api_key": (lambda client, key: client.send(pageview(None)), False, ["unauthorized"], 1008),
}


@pytest.mark.parametrize("case", list(CLOSING))
@pytest_twisted.ensureDeferred
async def test_input_that_closes_the_socket(case, redis_server, redis_url, clickhouse_url):
    """Over-size and binary frames, and a keyless pageview, close the socket with their code."""
    send_bad, authenticate, errors, code = CLOSING[case]
    url = "https://example.com/good"
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        good = await open_client(daemon.port, GOOD_SESSION, key)
        bad = await open_client(daemon.port, BAD_SESSION, key if authenticate else None)

        send_bad(bad, key)
        good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
        for expected in errors:
            error = await bad.next()
            assert error["type"] == "error" and error["code"] == expected, error
        closed_with, _ = await bad.wait_closed()
        first = await acked(good)
        assert closed_with == code
        assert bad.inbox.pending == []
        good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
        second = await acked(good)

        await assert_stored_exactly(redis_server, clickhouse_url, {
            (GOOD_SESSION, first, url), (GOOD_SESSION, second, url)})
        await close(good)


@pytest_twisted.ensureDeferred
async def test_tenth_error_closes_the_socket_1008(redis_server, redis_url, clickhouse_url):
    """Nine errors are answered one by one; the tenth is answered, then the socket closes 1008."""
    url = "https://example.com/good"
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        good = await open_client(daemon.port, GOOD_SESSION, key)
        bad = await open_client(daemon.port, BAD_SESSION, key)
        good_ids = []
        for _ in range(9):
            bad.send("not json")
            good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
            assert (await bad.next())["code"] == "bad_json"
            good_ids.append(await acked(good))
        bad.send({"type": "auth", "apiKey": key})
        assert await bad.next() == {"type": "auth_success"}  # still open after nine
        assert bad.close_code is None

        bad.send(pageview(key, projectId="p2"))
        good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
        assert (await bad.next())["code"] == "project_mismatch"
        assert await bad.wait_closed() == (1008, "Too many errors")
        assert bad.inbox.pending == []
        good_ids.append(await acked(good))
        good.send(sdk_pageview("p1", GOOD_SESSION, key=key, url=url))
        good_ids.append(await acked(good))

        await assert_stored_exactly(redis_server, clickhouse_url, {(GOOD_SESSION, i, url) for i in good_ids})
        await close(good)
