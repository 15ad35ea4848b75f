"""Many SDK clients sending acked pageviews and events, and what ClickHouse then holds.

Used by test_pipeline.py and test_spool.py.
"""

from harness import clickhouse_rows, connect, sdk_event, sdk_pageview


IN_FLIGHT = 4


def session_of(n):
    """The session id of load connection ``n``."""
    return f"1732608000000-load{n:03d}"


def message(n, i, key):
    """Message ``i`` of connection ``n``: every third one a custom event, the others pageviews."""
    session = session_of(n)
    if i % 3 == 2:
        event = sdk_event("p1", session, key=key)
        event["data"]["trackingId"] = f"t-{n}-{i}"
        return event
    return sdk_pageview("p1", session, key=key, url=f"https://example.com/{n}/{i}")


def label(msg):
    """What identifies a message's row: its url or tracking id."""
    return msg["data"]["url"] if msg["type"] == "pageview" else msg["data"]["trackingId"]


async def open_client(port, session, key):
    """An authenticated socket for ``session`` of project p1."""
    client = await connect(port, path=f"/?projectId=p1&sessionId={session}")
    assert (await client.next())["type"] == "connected"
    client.send({"type": "auth", "apiKey": key})
    assert await client.next() == {"type": "auth_success"}
    return client


async def send_acked(client, messages, in_flight=IN_FLIGHT):
    """Send ``messages`` with up to ``in_flight`` unacked; return ``{event id: message}``.

    Acks come back in the order the messages were sent.
    """
    acked = {}
    for msg in messages[:in_flight]:
        client.send(msg)
    for i, msg in enumerate(messages):
        ack = await client.next()
        assert ack["type"] == "ack" and ack["messageType"] == msg["type"], ack
        assert ack["eventId"] not in acked
        acked[ack["eventId"]] = msg
        if i + in_flight < len(messages):
            client.send(messages[i + in_flight])
    return acked


def stored(clickhouse_url, final=True):
    """``([(id, url)], [(id, tracking_id)])`` rows in ClickHouse (FINAL unless told)."""
    modifier = " FINAL" if final else ""
    pageviews = clickhouse_rows(clickhouse_url, f"SELECT id, url FROM page_view_event{modifier}")
    events = clickhouse_rows(clickhouse_url, f"SELECT id, tracking_id FROM tracked_event{modifier}")
    return pageviews, events


def counts(clickhouse_url, table):
    """``(count(), uniqExact(id))`` of a table, FINAL."""
    return clickhouse_rows(clickhouse_url, f"SELECT count(), uniqExact(id) FROM {table} FINAL")[0]


def expected_rows(acked):
    """``({(id, url)}, {(id, tracking_id)})`` that the acked messages must become."""
    pageviews = {(i, label(m)) for i, m in acked.items() if m["type"] == "pageview"}
    events = {(i, label(m)) for i, m in acked.items() if m["type"] == "event"}
    return pageviews, events


async def close(*clients):
    """Close the sockets still open and wait until each is closed."""
    for client in clients:
        if client.close_code is None:
            client.sendClose()
        await client.wait_closed()
