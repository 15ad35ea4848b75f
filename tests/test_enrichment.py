"""Enriched pageviews end to end: place, browser and bots through a real daemon, Redis and ClickHouse.

Visitors' addresses arrive as X-Forwarded-For from a trusted proxy
(127.0.0.1), as behind a load balancer.  Only the anonymised address may be
stored, broadcast or left in Redis.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString

from bklit.enrich import referrer_parts, url_fields
from bklit.tap import Options
from harness import (TIMEOUT, SocketClient, clickhouse_rows, eventually, running_daemon, sdk_event,
                     sdk_pageview, settings)
from samples import HEADLESS_CHROMIUM_156
from samples import BERLIN, LONDON, write_city_db
from harness import http_get, open_dashboard

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PAGE_COLUMNS = ("ip, country, country_code, region, region_name, city, lat, lon, timezone,"
                " browser, os, device_type, mobile, is_bot")


async def visitor(port, key, ip=None, session="s1", user_agent=None):
    """An authenticated SDK socket for project p1, from ``ip`` (through the trusted proxy)."""
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/?projectId=p1&sessionId={session}",
                                     headers={"X-Forwarded-For": ip} if ip else {},
                                     useragent=user_agent)
    factory.protocol = SocketClient
    client = await clientFromString(reactor, f"tcp:127.0.0.1:{port}").connect(factory)
    await client.opened.addTimeout(TIMEOUT, reactor)
    await client.next_of("connected")
    client.send({"type": "auth", "apiKey": key})
    assert await client.next() == {"type": "auth_success"}
    return client


async def acked(client, message):
    """Send a message and return its ack."""
    client.send(message)
    ack = await client.next_of("ack")
    assert ack["type"] == "ack"
    return ack


async def close(*clients):
    for client in clients:
        client.sendClose()
        await client.wait_closed()


def stored(clickhouse_url, where="1"):
    """The enrichment columns of the stored pageviews, oldest first."""
    return clickhouse_rows(clickhouse_url, f"SELECT {PAGE_COLUMNS} FROM page_view_event FINAL"
                                           f" WHERE {where} ORDER BY id")


async def redis_text(daemon):
    """Every key and value in Redis, as one string (streams, hashes, sets, sorted sets, strings)."""
    call = daemon.service.redis.call
    parts = []
    for name in await call("KEYS", "*"):
        kind = await call("TYPE", name)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        reply = {"string": ("GET", name), "hash": ("HGETALL", name), "set": ("SMEMBERS", name),
                 "zset": ("ZRANGE", name, 0, -1), "list": ("LRANGE", name, 0, -1),
                 "stream": ("XRANGE", name, "-", "+")}.get(kind)
        parts.append(repr((name, await call(*reply) if reply else kind)))
    return "\n".join(parts)


@pytest.fixture
def city_db(tmp_path):
    return write_city_db(tmp_path / "city.mmdb", {"81.2.69.0/24": LONDON, "2a02:8070::/32": BERLIN,
                                                   "10.0.0.0/8": LONDON})


def enriched(redis_url, clickhouse_url, **values):
    return settings(redis_url, clickhouse_url, trusted_proxies="127.0.0.1", **values)


@pytest_twisted.ensureDeferred
async def test_city_database_fills_rows_sessions_and_broadcasts_without_the_address(
        city_db, redis_url, clickhouse_url):
    """Place and browser in the row, the session and the live pageview; the full address nowhere."""
    async with running_daemon(enriched(redis_url, clickhouse_url, geoip_db=city_db)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read)
        client = await visitor(daemon.port, key, ip="81.2.69.142")
        await acked(client, sdk_pageview("p1", session="s1", key=key))
        await acked(client, sdk_pageview("p1", session="s1", key=key, timezone=None, url="https://example.com/2"))
        live = await dash.next_of("pageview")
        await close(client)

        rows = await eventually(lambda: len(stored(clickhouse_url)) == 2 and stored(clickhouse_url), timeout=5)
        place = ("81.2.69.0", "United Kingdom", "GB", "ENG", "England", "London", 51.5142, -0.0931)
        browser = ("Chrome", "Linux", "desktop", 0, 0)
        assert rows == [place + ("Europe/Berlin",) + browser,  # the browser's own time zone
                        place + ("Europe/London",) + browser]  # none sent: the location's
        sessions = await eventually(lambda: clickhouse_rows(
            clickhouse_url, "SELECT country, country_code, city FROM tracked_session FINAL"), timeout=5)
        assert sessions == [("United Kingdom", "GB", "London")]

        data = live["data"]
        assert (data["country"], data["countryCode"], data["city"], data["regionName"]) == \
               ("United Kingdom", "GB", "London", "England")
        assert (data["lat"], data["lon"]) == (51.5142, -0.0931)
        assert (data["browser"], data["os"], data["deviceType"], data["mobile"], data["isBot"]) == \
               ("Chrome", "Linux", "desktop", False, False)
        assert "81.2.69.142" not in json.dumps(live)
        assert "ip" not in data
        everything = clickhouse_rows(clickhouse_url, "SELECT * FROM page_view_event") + \
            clickhouse_rows(clickhouse_url, "SELECT * FROM tracked_session")
        assert "81.2.69.142" not in repr(everything)
        assert "81.2.69.142" not in await redis_text(daemon)
        await close(dash)


@pytest_twisted.ensureDeferred
async def test_ipv6_visitor_is_located_and_stored_as_a_48(city_db, redis_url, clickhouse_url):
    """IPv6 from the proxy: /48 stored, the city file's Berlin record used."""
    async with running_daemon(enriched(redis_url, clickhouse_url, geoip_db=city_db)) as daemon:
        key = await daemon.token("p1")
        client = await visitor(daemon.port, key, ip="2a02:8070:abcd:1234:5678::1")
        await acked(client, sdk_pageview("p1", session="s1", key=key))
        await close(client)
        [row] = await eventually(lambda: stored(clickhouse_url), timeout=5)
        assert row[:8] == ("2a02:8070:abcd::", "Germany", "DE", "BE", "Land Berlin", "Berlin", 52.5196, 13.4069)
        assert "2a02:8070:abcd:1234" not in repr(clickhouse_rows(clickhouse_url, "SELECT * FROM page_view_event"))


@pytest.mark.parametrize("ip,anonymised,country", [
    ("193.0.6.139", "193.0.6.0", ("Netherlands", "NL")),
    ("2001:4860:4860::8888", "2001:4860:4860::", ("United States", "US")),
    ("10.20.30.40", "10.20.30.0", ("", "")),  # private: not looked up, although the file has 10/8
    (None, "127.0.0.0", ("", "")),  # the loopback peer itself
])
@pytest_twisted.ensureDeferred
async def test_country_from_shipped_data_and_none_for_private_addresses(
        ip, anonymised, country, city_db, redis_url, clickhouse_url):
    """No geoip_db: the country; private and loopback addresses: nothing, whatever the files say."""
    values = {"geoip_db": city_db} if ip and ip.startswith("10.") else {}
    async with running_daemon(enriched(redis_url, clickhouse_url, **values)) as daemon:
        key = await daemon.token("p1")
        client = await visitor(daemon.port, key, ip=ip)
        await acked(client, sdk_pageview("p1", session="s1", key=key))
        await close(client)
        [row] = await eventually(lambda: stored(clickhouse_url), timeout=5)
        assert row[:8] == (anonymised, *country, "", "", "", 0.0, 0.0)


@pytest_twisted.ensureDeferred
async def test_bots_are_acked_but_neither_stored_nor_broadcast(redis_url, clickhouse_url):
    """Default drop: a crawler's pageview and event, and a headless browser pretending in its
    pageview, are acked and counted; only the person's pageview and session exist."""
    async with running_daemon(enriched(redis_url, clickhouse_url)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read)
        crawler = await visitor(daemon.port, key, session="crawler")
        await acked(crawler, sdk_pageview("p1", session="crawler", key=key, userAgent=GOOGLEBOT))
        await acked(crawler, sdk_event("p1", session="crawler", key=key))
        headless = await visitor(daemon.port, key, session="headless", user_agent=HEADLESS_CHROMIUM_156)
        await acked(headless, sdk_pageview("p1", session="headless", key=key))  # a normal userAgent field
        person = await visitor(daemon.port, key, session="person")
        ack = await acked(person, sdk_pageview("p1", session="person", key=key))

        live = await dash.next_of("pageview")
        assert live["data"]["eventId"] == ack["eventId"]
        ids = await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event"), timeout=5)
        assert ids == [(ack["eventId"],)]
        assert clickhouse_rows(clickhouse_url, "SELECT count() FROM tracked_event") == [(0,)]
        assert await daemon.service.redis.call("ZRANGE", "live:sessions:p1", 0, -1) in ([b"person"], ["person"])
        samples = daemon.service.metrics.registry.get_sample_value
        assert samples("bklit_bots_dropped_total", {"type": "pageview"}) == 2
        assert samples("bklit_bots_dropped_total", {"type": "event"}) == 1
        await close(crawler, headless, person, dash)
        sessions = await eventually(lambda: clickhouse_rows(
            clickhouse_url, "SELECT session_id FROM tracked_session FINAL WHERE ended_at IS NOT NULL"), timeout=5)
        assert sessions == [("person",)]


@pytest_twisted.ensureDeferred
async def test_mark_policy_stores_bots_flagged(redis_url, clickhouse_url):
    """bot_policy = mark: pageviews, events and sessions stored with is_bot = 1 (the headless one by its
    handshake) and broadcast flagged; bots are live apart, out of the snapshot's and /api/live's count."""
    async with running_daemon(enriched(redis_url, clickhouse_url, bot_policy="mark")) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, _ = await open_dashboard(daemon.port, read)
        crawler = await visitor(daemon.port, key, session="crawler")
        await acked(crawler, sdk_pageview("p1", session="crawler", key=key, userAgent=GOOGLEBOT))
        assert (await dash.next_of("pageview"))["data"]["isBot"] is True
        await acked(crawler, sdk_event("p1", session="crawler", key=key))
        headless = await visitor(daemon.port, key, session="headless", user_agent=HEADLESS_CHROMIUM_156)
        await acked(headless, sdk_pageview("p1", session="headless", key=key))
        person = await visitor(daemon.port, key, session="person")
        await acked(person, sdk_pageview("p1", session="person", key=key))
        rows = await eventually(lambda: len(stored(clickhouse_url)) == 3 and stored(clickhouse_url), timeout=5)
        assert sorted(row[-5:] for row in rows) == sorted([
            ("Googlebot", "", "bot", 0, 1), ("Chrome", "Linux", "desktop", 0, 1), ("Chrome", "Linux", "desktop", 0, 0)])
        events = await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT session_id, is_bot FROM tracked_event"))
        assert events == [("crawler", 1)]
        assert daemon.service.metrics.registry.get_sample_value("bklit_bots_dropped_total", {"type": "pageview"}) \
            in (None, 0)
        assert await http_get(daemon.port, "/api/live?projectId=p1", read) == (
            200, {"projectId": "p1", "live": 1, "bots": 2})
        later, snapshot = await open_dashboard(daemon.port, read)
        assert snapshot["data"]["live"] == 1 and [s["sessionId"] for s in snapshot["data"]["sessions"]] == ["person"]
        await close(crawler, headless, person, dash, later)
        sessions = await eventually(lambda: len(clickhouse_rows(clickhouse_url, (
            "SELECT session_id FROM tracked_session FINAL WHERE ended_at IS NOT NULL"))) == 3 and clickhouse_rows(
            clickhouse_url, "SELECT session_id, is_bot FROM tracked_session FINAL ORDER BY session_id"), timeout=5)
        assert sessions == [("crawler", 1), ("headless", 1), ("person", 0)]
        assert await http_get(daemon.port, "/api/live?projectId=p1", read) == (
            200, {"projectId": "p1", "live": 0, "bots": 0})


@pytest_twisted.ensureDeferred
async def test_sighup_reads_a_replaced_database_for_new_connections(tmp_path, redis_url, clickhouse_url):
    """Open sockets keep the place they got at connect; new ones see the new file."""
    path = write_city_db(tmp_path / "city.mmdb", {"81.2.69.0/24": LONDON})
    async with running_daemon(enriched(redis_url, clickhouse_url, geoip_db=path)) as daemon:
        key = await daemon.token("p1")
        old = await visitor(daemon.port, key, ip="81.2.69.142", session="old")
        write_city_db(tmp_path / "city.mmdb", {"81.2.69.0/24": dict(LONDON, city={"names": {"en": "Westminster"}})})
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: daemon.service.ingest.locator.reloads == 1, timeout=5)
        new = await visitor(daemon.port, key, ip="81.2.69.142", session="new")
        await acked(old, sdk_pageview("p1", session="old", key=key))
        await acked(new, sdk_pageview("p1", session="new", key=key))
        await close(old, new)
        rows = await eventually(lambda: len(stored(clickhouse_url)) == 2 and clickhouse_rows(
            clickhouse_url, "SELECT session_id, city FROM page_view_event ORDER BY session_id"), timeout=5)
        assert rows == [("new", "Westminster"), ("old", "London")]


def test_missing_database_is_a_start_up_error_naming_the_file(tmp_path, monkeypatch):
    """``twistd bklit`` options: one line naming the file, before the reactor runs."""
    missing = tmp_path / "GeoLite2-City.mmdb"
    monkeypatch.setenv("BKLIT_GEOIP_DB", str(missing))
    with pytest.raises(SystemExit) as e:
        Options().parseOptions([])
    assert str(e.value) == f"bklit: GeoIP database error: {missing}: no such file"
    monkeypatch.setenv("BKLIT_ROLE", "writer")  # a writer does not locate anybody
    Options().parseOptions([])


def test_twistd_exits_non_zero_on_a_damaged_database(tmp_path, redis_url, clickhouse_url):
    """A real ``twistd bklit`` with a damaged file stops at once with one line, no traceback."""
    damaged = tmp_path / "city.mmdb"
    damaged.write_bytes(b"PK\x03\x04 this is a zip, not a database" * 10)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, BKLIT_GEOIP_DB=str(damaged), BKLIT_REDIS=redis_url, BKLIT_CLICKHOUSE=clickhouse_url)
    done = subprocess.run([twistd, "-n", "--pidfile=", "bklit", "--listen", "tcp:0:interface=127.0.0.1"],
                          env=env, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"bklit: GeoIP database error: {damaged}: not a MaxMind-format database" in output
    assert "Traceback" not in output


CAMPAIGN_URL = ("https://Shop.Example.com/Landing/Spring%20Sale?UTM_Source=Google%20Ads&utm_source=second"
                "&utm_medium=CPC&utm_campaign=spring%2Bsale+2025%20%F0%9F%8C%B8&utm_term=caf%C3%A9+cr%C3%A8me"
                "&utm_content=hero%26banner&utm_id=42&GCLID=EAIaIQobChMI8-3Dm_2D%3D%3D&fbclid=IwAR0abc_DEF"
                "&MsClkId=9f1c2b&ttclid=E.C.P.Cs0BABC&li_fat_id=5c1d2e3f-aaaa-bbbb&twclid=2-7xyz"
                "#utm_source=fragment")

CAMPAIGNS = [
    (CAMPAIGN_URL, {
        "utm_source": "Google Ads", "utm_medium": "CPC", "utm_campaign": "spring+sale 2025 \U0001F338",
        "utm_term": "café crème", "utm_content": "hero&banner", "utm_id": "42",
        "gclid": "EAIaIQobChMI8-3Dm_2D==", "fbclid": "IwAR0abc_DEF", "msclkid": "9f1c2b",
        "ttclid": "E.C.P.Cs0BABC", "li_fat_id": "5c1d2e3f-aaaa-bbbb", "twclid": "2-7xyz"}),
    # Facebook appends its click id to links that already carry UTM parameters
    ("https://example.com/?utm_source=facebook&utm_medium=paid_social&fbclid=IwZXh0bgNhZW0BMABhZGlkAasTEh",
     {"utm_source": "facebook", "utm_medium": "paid_social", "fbclid": "IwZXh0bgNhZW0BMABhZGlkAasTEh"}),
    # an HTML-escaped "&amp;" copied from an email: read as browsers' URLSearchParams read it
    ("https://example.com/?utm_source=newsletter&amp;utm_medium=email", {"utm_source": "newsletter"}),
    # the name percent-encoded, the value with an invalid escape kept as it is
    ("https://example.com/?utm%5Fcampaign=%ZZ-launch", {"utm_campaign": "%ZZ-launch"}),
    # control characters dropped, surrounding blanks trimmed
    ("https://example.com/?utm_source=%20%0Anews%09letter%00%20", {"utm_source": "newsletter"}),
    ("https://example.com/#/route?utm_source=spa-hash", {}),
]


@pytest.mark.parametrize("url,expected", CAMPAIGNS)
def test_campaign_parameters_of_real_urls(url, expected):
    """Encodings, duplicates (first wins), odd casing, fragments."""
    fields = url_fields(url)
    assert {name: value for name, value in fields.items() if value} == expected


@pytest.mark.parametrize("referrer,expected", [
    ("https://www.Google.com/search?q=bklit&oq=bklit", ("www.google.com", "/search")),
    ("https://L.Facebook.com/l.php?u=https%3A%2F%2Fexample.com%2F&h=AT0", ("l.facebook.com", "/l.php")),
    ("https://t.co/AbCdE12345", ("t.co", "/AbCdE12345")),
    ("https://de.wikipedia.org/wiki/K%C3%B6ln", ("de.wikipedia.org", "/wiki/K%C3%B6ln")),
    ("https://news.ycombinator.com", ("news.ycombinator.com", "/")),
    ("android-app://com.google.android.gm/", ("com.google.android.gm", "/")),
    ("https://user:secret@Example.COM.:8443/a/b?c#d", ("example.com", "/a/b")),
    ("", ("", "")),
])
def test_referrer_host_and_path_of_real_referrers(referrer, expected):
    """Hostname lower-case without its trailing dot, path as the browser sent it, query dropped."""
    assert referrer_parts(referrer) == expected


@pytest_twisted.ensureDeferred
async def test_campaign_url_is_stored_with_its_parameters(redis_url, clickhouse_url):
    """The same parsing on the way into ClickHouse."""
    async with running_daemon(enriched(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        client = await visitor(daemon.port, key)
        await acked(client, sdk_pageview("p1", session="s1", key=key, url=CAMPAIGN_URL,
                                         referrer="https://L.Facebook.com/l.php?u=x", referrerHostname=None))
        await close(client)
        names = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "utm_id",
                 "gclid", "fbclid", "msclkid", "ttclid", "li_fat_id", "twclid")
        [row] = await eventually(lambda: clickhouse_rows(clickhouse_url, (
            f"SELECT {', '.join(names)}, referrer_hostname, referrer_path FROM page_view_event")), timeout=5)
        assert row == tuple(CAMPAIGNS[0][1][name] for name in names) + ("l.facebook.com", "/l.php")
