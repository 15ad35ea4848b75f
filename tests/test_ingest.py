"""The SDK endpoint end to end: real Redis, real ClickHouse, a real socket."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from harness import (SESSION, clickhouse_rows, connect, eventually, running_daemon,
                     sdk_event, sdk_pageview, settings)
from harness import sdk_client


@pytest_twisted.ensureDeferred
async def test_sdk_pageview_and_event_are_acked_and_stored(redis_url, clickhouse_url):
    """A pageview and an event as SDK 1.0.1 sends them become rows with the right values."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        client = await connect(daemon.port, headers={"X-Forwarded-For": "198.51.100.1"})
        connected = await client.next()
        assert connected["type"] == "connected"
        assert connected["projectId"] == "p1" and connected["sessionId"] == SESSION
        assert connected["timestamp"].endswith("Z")

        client.send({"type": "auth", "apiKey": key})
        assert await client.next() == {"type": "auth_success"}
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next()
        assert ack["type"] == "ack" and ack["messageType"] == "pageview"
        client.send(sdk_event("p1", key=key))
        event_ack = await client.next()
        assert event_ack["messageType"] == "event"
        assert event_ack["eventId"] != ack["eventId"]

        rows = await eventually(lambda: clickhouse_rows(clickhouse_url, (
            "SELECT id, project_id, session_id, url, referrer, referrer_hostname, referrer_path,"
            " referrer_type, utm_source, utm_medium, gclid, user_agent, viewport_width,"
            " viewport_height, screen_width, screen_height, language, timezone,"
            " is_new_visitor, landing_page, ip FROM page_view_event")), timeout=10)
        assert rows == [(
            ack["eventId"], "p1", SESSION,
            "https://example.com/pricing?utm_source=news&utm_medium=email&gclid=abc",
            "https://www.google.com/search?q=bklit", "www.google.com", "/search", "organic",
            "news", "email", "abc",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
            1280, 720, 1920, 1080, "en-US", "Europe/Berlin", 1, "https://example.com/",
            "127.0.0.0",  # the peer, anonymised; the spoofed X-Forwarded-For is ignored
        )]
        events = await eventually(lambda: clickhouse_rows(clickhouse_url, (
            "SELECT id, project_id, session_id, tracking_id, event_type, event_definition_id,"
            " metadata, trigger_method FROM tracked_event")), timeout=10)
        assert events == [(event_ack["eventId"], "p1", SESSION, "cta-button", "click", "cta-button",
                           '{"position":"hero","triggerMethod":"manual"}', "manual")]
        client.sendClose()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_pageview_right_behind_auth_waits_for_the_key_check(redis_url, clickhouse_url):
    """Messages sent while the key is checked are handled afterwards, in order."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        client = await connect(daemon.port)
        await client.next_of("connected")
        client.send({"type": "auth", "apiKey": key})
        client.send(sdk_pageview("p1", key=key))
        client.send(sdk_pageview("p1", key=key, url="https://example.com/second"))
        assert await client.next() == {"type": "auth_success"}
        first, second = await client.next(), await client.next()
        assert (first["type"], second["type"]) == ("ack", "ack")
        assert first["eventId"] < second["eventId"]
        client.sendClose()
        await client.wait_closed()


REFUSALS = {
    "none": lambda d: None,
    "unknown": lambda d: "bk_" + "x" * 40,
    "revoked": "revoked",
    "expired": "expired",
    "read_scope": "read",
    "other_project": "other",
    "wrong_origin": "origin",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest_twisted.ensureDeferred
async def test_refused_keys_close_1008_and_store_nothing(case, redis_url, clickhouse_url):
    """Every kind of bad key gets ``unauthorized`` and close 1008; nothing reaches storage."""
    from bklit.tokens import TokenStore

    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        store = TokenStore(daemon.service.redis.call)
        key = None
        if case == "unknown":
            key = "bk_" + "x" * 40
        elif case == "revoked":
            key, token = await store.create(("p1",), "ingest")
            await store.revoke(token)
        elif case == "expired":
            key, _ = await store.create(("p1",), "ingest", expires_at=1.0)
        elif case == "read_scope":
            key, _ = await store.create(("p1",), "read")
        elif case == "other_project":
            key, _ = await store.create(("p2",), "ingest")
        elif case == "wrong_origin":
            key, _ = await store.create(("p1",), "ingest", domains=("example.com",))
        client = await connect(daemon.port, origin="https://evil.example.org")
        await client.next_of("connected")
        if key is not None:
            client.send({"type": "auth", "apiKey": key})
        client.send(sdk_pageview("p1", key=key))
        error = await client.next()
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert key is None or key not in error["message"]
        code, _ = await client.wait_closed()
        assert code == 1008
        # a good client's event is stored, and only that one
        good = await daemon.token("p1")
        other = await connect(daemon.port)
        await other.next_of("connected")
        other.send(sdk_pageview("p1", key=good))
        ack = await other.next_of("ack")
        rows = await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event"))
        assert rows == [(ack["eventId"],)]
        other.sendClose()
        await other.wait_closed()


@pytest_twisted.ensureDeferred
async def test_domain_bound_key_accepts_matching_origin(redis_url, clickhouse_url):
    """A key bound to ``*.example.com`` works from a subdomain's page."""
    from bklit.tokens import TokenStore

    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key, _ = await TokenStore(daemon.service.redis.call).create(("p1",), "ingest", domains=("*.example.com",))
        client = await connect(daemon.port, origin="https://shop.example.com")
        await client.next_of("connected")
        client.send({"type": "auth", "apiKey": key})
        assert await client.next() == {"type": "auth_success"}
        client.sendClose()
        await client.wait_closed()


@pytest.mark.parametrize("origin", ["null", "file://"])
@pytest_twisted.ensureDeferred
async def test_key_without_domains_works_from_a_null_origin(origin, redis_url, clickhouse_url):
    """A sandboxed iframe (``Origin: null``) or a file:// page may use a key without domains."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        client = await sdk_client(daemon.port, key, origin=origin)
        client.send(sdk_pageview("p1", key=key))
        ack = await client.next_of("ack")
        rows = await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event"))
        assert rows == [(ack["eventId"],)]
        client.sendClose()
        await client.wait_closed()


@pytest.mark.parametrize("path,reason", [
    ("/?sessionId=s1", "Missing projectId"),
    ("/?projectId=p1", "Missing sessionId"),
    ("/?projectId=p%201&sessionId=s1", "Invalid projectId"),
    ("/?projectId=p1&sessionId=s%3Cx", "Invalid sessionId"),
])
@pytest_twisted.ensureDeferred
async def test_bad_ids_close_1008_with_reason(path, reason, redis_url, clickhouse_url):
    """Missing or malformed ids: the upgrade succeeds, then close 1008 naming the problem."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        client = await connect(daemon.port, path=path)
        assert await client.wait_closed() == (1008, reason)


@pytest_twisted.ensureDeferred
async def test_socket_without_a_key_is_closed_after_auth_timeout(redis_url, clickhouse_url):
    """A socket that never presents a key (an SDK without apiKey reconnecting) does not idle forever."""
    async with running_daemon(settings(redis_url, clickhouse_url, auth_timeout="0.3")) as daemon:
        key = await daemon.token("p1")
        idle = await connect(daemon.port)
        authed = await connect(daemon.port)
        await idle.next_of("connected")
        await authed.next_of("connected")
        authed.send({"type": "auth", "apiKey": key})
        assert await authed.next() == {"type": "auth_success"}
        error = await idle.next()
        assert error == {"type": "error", "code": "unauthorized", "message": "No API key within 0.3 s"}
        assert (await idle.wait_closed())[0] == 1008
        await task.deferLater(reactor, 0.5, lambda: None)
        authed.send(sdk_pageview("p1", key=key))
        assert (await authed.next())["type"] == "ack"
        assert authed.close_code is None
        authed.sendClose()
        await authed.wait_closed()
