"""The live page's JSON API: /api/stats, /api/timeseries, /api/sessions on a test daemon.

Numbers are checked against rows put into the test's ClickHouse (the
fixtures' Debian 18.16, or whatever ``clickhouse-server`` is installed) with
clickhouse-driver and ``bklit.schema.to_insert_row``, as the writer stores
them; live sessions come from real SDK traffic through the daemon.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import asynccontextmanager

import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from harness import connect, free_port, insert, running_daemon, sdk_pageview, settings
from samples import visit_rows

from bklit import api, rollup
from bklit.tokens import TokenStore

SITE = "https://example.com"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/18.1 Mobile/15E148 Safari/604.1")
ENDPOINTS = ["/api/stats?projectId=p1&range=24h", "/api/timeseries?projectId=p1", "/api/sessions?projectId=p1"]


async def request(port: int, path: str, key: str | None = None, method: bytes = b"GET") -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a request, with a Bearer key when given."""
    headers = Headers({b"authorization": [f"Bearer {key}".encode()]} if key else {})
    response = await Agent(reactor).request(method, f"http://127.0.0.1:{port}{path}".encode(), headers)
    body = await readBody(response)
    named = {name.decode().lower(): values[0].decode() for name, values in response.headers.getAllRawHeaders()}
    return response.code, json.loads(body) if body else None, named


def store_visit(clickhouse_url: str, project: str, session: str, views: list[tuple], ends: list[tuple],
                user_agent: str, stored: list | None = None, **columns) -> None:
    """Store ``visit_rows``; the pageview rows are also added to ``stored``."""
    pageview_rows, session_rows = visit_rows(project, session, views, ends, user_agent, **columns)
    insert(clickhouse_url, "page_view_event", pageview_rows)
    insert(clickhouse_url, "tracked_session", session_rows)
    if stored is not None:
        stored.extend(pageview_rows)


CHROME_COLUMNS = {"browser": "Chrome", "os": "Linux", "device_type": "desktop", "country": "Germany",
                  "country_code": "DE"}
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile "
           "Safari/537.36")
GOOGLE = "https://www.google.com/"


def store_history(clickhouse_url: str, now: int) -> None:
    """Visits of p1 in the last 30 minutes, 24 hours, 7 days and before; a bot's; another project's."""
    safari = {"browser": "Safari", "os": "iOS", "device_type": "mobile", "mobile": 1, "country": "United States",
              "country_code": "US"}
    firefox = {"browser": "Firefox", "os": "Linux", "device_type": "desktop", "country": "France", "country_code": "FR"}
    android = {"browser": "Chrome", "os": "Android", "device_type": "mobile", "country": "United States",
               "country_code": "US"}
    campaign = {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "spring"}
    a, b, c, h, d, e = now - 600, now - 300, now - 7200, now - 10800, now - 3 * 86400, now - 8 * 86400
    first: list[dict] = []
    # A, 10 min ago: from a search and a campaign, pushState, then a full page load; ended after 120 s
    store_visit(clickhouse_url, "p1", "A", [
        (a, f"{SITE}/pricing?utm_source=newsletter&utm_medium=email&utm_campaign=spring", GOOGLE, "organic", campaign),
        (a + 30, f"{SITE}/docs", GOOGLE, "organic"),
        (a + 60, f"{SITE}/pricing#faq", f"{SITE}/docs", "internal")], [(a + 120, 3)], CHROME, first, **CHROME_COLUMNS)
    store_visit(clickhouse_url, "p1", "B", [(b, f"{SITE}/", "", "direct")], [], IPHONE, **safari)  # 5 min ago, live
    # C, 2 h ago: a bounce that came back (resumed) for a second page
    store_visit(clickhouse_url, "p1", "C", [
        (c, f"{SITE}/blog/post?ref=hn", "https://news.ycombinator.com/item?id=1", "referral"),
        (c + 90, f"{SITE}/blog", f"{SITE}/blog/post?ref=hn", "internal")],
        [(c + 30, 1), (None, 1), (c + 90, 2)], FIREFOX, **firefox)
    store_visit(clickhouse_url, "p1", "H", [(h, f"{SITE}/", "https://t.co/x", "social")], [(h + 10, 1)], CHROME,
                **CHROME_COLUMNS)  # 3 h ago: a bounce
    store_visit(clickhouse_url, "p1", "D", [(d, f"{SITE}/", "https://duckduckgo.com/", "organic"),
                                            (d + 300, f"{SITE}/pricing", f"{SITE}/", "internal")],
                [(d + 300, 2)], ANDROID, **android)  # 3 days ago
    store_visit(clickhouse_url, "p1", "E", [(e, f"{SITE}/old", "", "direct")], [(e + 5, 1)], CHROME,
                **CHROME_COLUMNS)  # 8 days ago: in no range
    store_visit(clickhouse_url, "p1", "bot", [(a, f"{SITE}/", GOOGLE, "organic")], [(a + 1, 1)], CHROME,
                is_bot=1, **CHROME_COLUMNS)
    store_visit(clickhouse_url, "p2", "other", [(a, f"{SITE}/", GOOGLE, "organic")], [(a + 1, 1)], CHROME,
                **CHROME_COLUMNS)
    # A's first pageview stored twice (a retried insert): one pageview
    insert(clickhouse_url, "page_view_event", first[:1])
    insert(clickhouse_url, "tracked_event", [
        {"id": "ev1", "project_id": "p1", "session_id": "A", "timestamp": a + 40, "tracking_id": "cta", "event_type": "click"},
        {"id": "ev2", "project_id": "p1", "session_id": "D", "timestamp": d + 10, "tracking_id": "cta", "event_type": "click"},
        {"id": "ev3", "project_id": "p1", "session_id": "bot", "timestamp": a, "tracking_id": "cta", "event_type": "click",
         "is_bot": 1},
        {"id": "ev4", "project_id": "p2", "session_id": "other", "timestamp": a, "tracking_id": "cta",
         "event_type": "click"},
    ])


@asynccontextmanager
async def daemon_with_history(redis_url: str, clickhouse_url: str):
    """(daemon, read key of p1, the time ``store_history`` was given) of a running daemon."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        read = await daemon.token("p1", scope="read")
        now = int(time.time())
        store_history(clickhouse_url, now)
        yield daemon, read, now


@pytest_twisted.ensureDeferred
async def test_stats_of_each_range_count_the_projects_people(redis_url, clickhouse_url):
    """Pageviews (each id once), visits (latest version), bounce rate, median and top lists per range."""
    async with daemon_with_history(redis_url, clickhouse_url) as (daemon, read, now):
        answers = {}
        for range_name in ("30m", "24h", "7d"):
            status, answers[range_name], headers = await request(
                daemon.port, f"/api/stats?projectId=p1&range={range_name}", read)
            assert status == 200, answers[range_name]
            assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
        status, default, _ = await request(daemon.port, "/api/stats?projectId=p1", read)
        assert status == 200 and default["range"] == "24h"

    recent, day, week = answers["30m"], answers["24h"], answers["7d"]
    assert recent["projectId"] == "p1" and recent["range"] == "30m"
    assert 0 <= recent["until"] - now <= 5 and recent["until"] - recent["since"] == 1800
    # 24 hours and 7 days start at the start of an hour: the hours before this one are kept
    assert week["since"] % 3600 == 0 and 0 <= week["until"] - week["since"] - 7 * 86400 < 3600
    assert day["since"] % 3600 == 0 and 0 <= day["until"] - day["since"] - 86400 < 3600
    assert {r: (a["pageviews"], a["sessions"], a["endedSessions"], a["events"]) for r, a in answers.items()} == {
        "30m": (4, 2, 1, 1), "24h": (7, 4, 3, 1), "7d": (9, 5, 4, 2)}
    assert (recent["bounceRate"], recent["medianSessionSeconds"]) == (0.0, 120)
    assert (day["bounceRate"], day["medianSessionSeconds"]) == (0.3333, 90)
    assert (week["bounceRate"], week["medianSessionSeconds"]) == (0.25, 120)

    # Pages without their query and fragment; referrers and campaigns by visits, internal ones left out.
    assert recent["topPages"] == [{"url": f"{SITE}/pricing", "pageviews": 2}, {"url": f"{SITE}/", "pageviews": 1},
                                  {"url": f"{SITE}/docs", "pageviews": 1}]
    assert recent["referrers"] == [{"hostname": "www.google.com", "sessions": 1}]
    assert day["referrers"] == [{"hostname": "news.ycombinator.com", "sessions": 1}, {"hostname": "t.co", "sessions": 1},
                                {"hostname": "www.google.com", "sessions": 1}]
    assert recent["campaigns"] == [{"source": "newsletter", "medium": "email", "campaign": "spring", "sessions": 1}]
    assert recent["countries"] == [{"countryCode": "DE", "country": "Germany", "sessions": 1},
                                   {"countryCode": "US", "country": "United States", "sessions": 1}]
    assert week["countries"] == [{"countryCode": "DE", "country": "Germany", "sessions": 2},
                                 {"countryCode": "US", "country": "United States", "sessions": 2},
                                 {"countryCode": "FR", "country": "France", "sessions": 1}]
    assert week["browsers"] == [{"browser": "Chrome", "sessions": 3}, {"browser": "Firefox", "sessions": 1},
                                {"browser": "Safari", "sessions": 1}]
    assert week["devices"] == [{"deviceType": "desktop", "sessions": 3}, {"deviceType": "mobile", "sessions": 2}]
    assert week["topPages"][0] == {"url": f"{SITE}/", "pageviews": 3}


@pytest_twisted.ensureDeferred
async def test_stats_of_a_project_without_rows_are_zero(redis_url, clickhouse_url):
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        read = await daemon.token("empty", scope="read")
        status, body, _ = await request(daemon.port, "/api/stats?projectId=empty&range=7d", read)
    assert status == 200
    assert {k: v for k, v in body.items() if k not in ("since", "until")} == {
        "projectId": "empty", "range": "7d", "pageviews": 0, "events": 0, "sessions": 0, "endedSessions": 0,
        "bounceRate": None, "medianSessionSeconds": None, "topPages": [], "referrers": [], "campaigns": [],
        "countries": [], "browsers": [], "devices": []}


@pytest_twisted.ensureDeferred
async def test_timeseries_has_a_count_for_each_of_the_last_60_minutes(redis_url, clickhouse_url):
    async with daemon_with_history(redis_url, clickhouse_url) as (daemon, read, now):
        status, body, _ = await request(daemon.port, "/api/timeseries?projectId=p1", read)
    assert status == 200
    points = body["points"]
    assert len(points) == 60 and body["step"] == 60
    assert points[0]["minute"] == body["start"] and body["start"] % 60 == 0
    assert [p["minute"] for p in points] == list(range(body["start"], body["start"] + 3600, 60))
    assert points[-1]["minute"] <= body["until"] < points[-1]["minute"] + 60  # the current minute is the last
    # A's three pageviews and B's one (not the bot's, not C's two hours ago, not p2's), each in its minute.
    expected: dict[int, int] = {}
    for at in (now - 600, now - 570, now - 540, now - 300):
        expected[at - at % 60] = expected.get(at - at % 60, 0) + 1
    assert {p["minute"]: p["pageviews"] for p in points if p["pageviews"]} == expected


@pytest_twisted.ensureDeferred
async def test_sessions_lists_live_visitors_with_page_country_and_browser(redis_url, clickhouse_url):
    """From real SDK traffic: most recently active first, their browser and device from the user agent."""
    async with running_daemon(settings(redis_url, clickhouse_url, trusted_proxies="127.0.0.1")) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        first = await sdk(daemon.port, key, "s-first", {"X-Forwarded-For": "85.214.132.117"})
        first.send(sdk_pageview("p1", "s-first", key=key, url=f"{SITE}/a", userAgent=CHROME))
        await first.next_of("ack")
        second = await sdk(daemon.port, key, "s-second")
        second.send(sdk_pageview("p1", "s-second", key=key, url=f"{SITE}/", userAgent=IPHONE))
        await second.next_of("ack")
        first.send(sdk_pageview("p1", "s-first", key=key, url=f"{SITE}/b?x=1", userAgent=CHROME))
        await first.next_of("ack")

        status, body, _ = await request(daemon.port, "/api/sessions?projectId=p1", read)
        assert status == 200 and body["projectId"] == "p1" and body["live"] == 2
        assert abs(body["readAt"] - time.time() * 1000) < 5000
        newest, older = body["sessions"]
        assert {k: v for k, v in newest.items() if k not in ("startedAt", "lastSeen")} == {
            "sessionId": "s-first", "pageviews": 2, "entryPage": f"{SITE}/a", "currentPage": f"{SITE}/b?x=1",
            "country": "Germany", "countryCode": "DE", "city": "", "browser": "Chrome", "os": "Linux",
            "deviceType": "desktop"}
        assert newest["startedAt"] <= newest["lastSeen"] and newest["lastSeen"] >= older["lastSeen"]
        assert (older["sessionId"], older["browser"], older["os"], older["deviceType"], older["country"]) == (
            "s-second", "Safari", "iOS", "mobile", "")

        status, body, _ = await request(daemon.port, "/api/sessions?projectId=p1&limit=1", read)
        assert (body["live"], [s["sessionId"] for s in body["sessions"]]) == (2, ["s-first"])

        second.sendClose()
        await second.wait_closed()
        ended = await wait_for_sessions(daemon.port, read, 1)
        assert [s["sessionId"] for s in ended["sessions"]] == ["s-first"]
        first.sendClose()
        await first.wait_closed()


async def wait_for_sessions(port: int, read: str, live: int) -> dict:
    deadline = time.monotonic() + 5
    while True:
        _, body, _ = await request(port, "/api/sessions?projectId=p1", read)
        if body["live"] == live or time.monotonic() > deadline:
            assert body["live"] == live, body
            return body


async def sdk(port: int, key: str, session: str, headers: dict | None = None):
    client = await connect(port, path=f"/?projectId=p1&sessionId={session}", headers=headers)
    await client.next_of("connected")
    client.send({"type": "auth", "apiKey": key})
    await client.next_of("auth_success")
    return client


@pytest_twisted.ensureDeferred
async def test_keys_that_may_not_read_are_refused_as_by_api_live(redis_url, clickhouse_url):
    """No key or a bad one: 401; an ingest key or another project's read key: 403, as /api/live answers.
    (The lockout is raised here: these are many refused keys from one address; test_live has the lockout.)"""
    async with running_daemon(settings(redis_url, clickhouse_url, auth_failures_max="1000")) as daemon:
        store = TokenStore(daemon.service.redis.call)
        ingest = await daemon.token("p1")
        other = await daemon.token("p2", scope="read")
        expired = await daemon.token("p1", scope="read", expires_at=time.time() - 1)
        revoked = await daemon.token("p1", scope="read")
        await store.revoke((await store.find(revoked))[0])
        read = await daemon.token("p1", scope="read")
        for path in ENDPOINTS:
            status, body, headers = await request(daemon.port, path)
            assert (status, body["error"], headers.get("www-authenticate")) == (401, "unauthorized", "Bearer"), path
            assert "read key" in body["message"]
            for key, message in [("bk_nothing", "invalid API key"), (expired, "API key expired"),
                                 (revoked, "API key revoked"), ("x" * 300, "invalid API key")]:
                status, body, headers = await request(daemon.port, path, key)
                assert (status, body) == (401, {"error": "unauthorized", "message": message}), (path, message)
                assert headers.get("www-authenticate") == "Bearer"
            for key, message in [(ingest, "API key is not valid for read"),
                                 (other, "API key is not valid for this project")]:
                status, body, _ = await request(daemon.port, path, key)
                assert (status, body) == (403, {"error": "forbidden", "message": message}), (path, message)
            status, _, _ = await request(daemon.port, path, read)
            assert status == 200, path
        status, body, _ = await request(daemon.port, "/api/live?projectId=p1", ingest)
        assert (status, body["error"]) == (403, "forbidden")


@pytest_twisted.ensureDeferred
async def test_bad_parameters_are_400_with_a_json_error(redis_url, clickhouse_url):
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        read = await daemon.token("p1", scope="read")
        for path in ("/api/stats", "/api/stats?projectId=", "/api/stats?projectId=a:b", "/api/timeseries?projectId="
                     + "x" * 65, "/api/stats?projectId=p1&range=1y", "/api/stats?projectId=p1&range=",
                     "/api/sessions?projectId=p1&limit=0", "/api/sessions?projectId=p1&limit=1001",
                     "/api/sessions?projectId=p1&limit=ten", "/api/sessions?projectId=p1&limit=-1"):
            status, body, headers = await request(daemon.port, path, read)
            assert (status, body["error"], headers["content-type"]) == (400, "bad_request", "application/json"), path
            assert body["message"]
        status, body, headers = await request(daemon.port, "/api/stats?projectId=p1", read, method=b"POST")
        assert (status, body["error"], headers["allow"]) == (405, "method_not_allowed", "GET, HEAD")


@pytest_twisted.ensureDeferred
async def test_clickhouse_down_is_503_and_the_live_parts_still_answer(redis_url):
    """An ingest node whose ClickHouse is unreachable: numbers 503, live sessions and the page still there."""
    nowhere = f"clickhouse://default:@127.0.0.1:{free_port()}/bklit"
    async with running_daemon(settings(redis_url, nowhere, role="ingest")) as daemon:
        assert daemon.service.writer is None and daemon.service.api is not None
        read = await daemon.token("p1", scope="read")
        for path in ENDPOINTS[:2]:
            started = time.monotonic()
            status, body, _ = await request(daemon.port, path, read)
            assert (status, body["error"]) == (503, "unavailable"), path
            assert "ClickHouse" in body["message"] and time.monotonic() - started < 5
        status, body, _ = await request(daemon.port, ENDPOINTS[2], read)
        assert (status, body["live"]) == (200, 0)
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{daemon.port}/live".encode())
        await readBody(response)
        assert response.code == 200
        pool = daemon.service.api.clickhouse.pool
    assert not pool.started and not any(t.is_alive() for t in pool.threads)  # the service stopped its threads


def test_queries_take_their_values_only_as_parameters():
    """Every query names the project and times as clickhouse-driver parameters, never as text put in."""
    queries = {**rollup.PARTIAL_QUERIES, "signature": rollup.SIGNATURE_QUERY, "timeseries": api.TIMESERIES_QUERY}
    for name, query in queries.items():
        assert "project_id = %(project)s" in query and ("toDateTime(%(start)s)" in query
                                                        or "toDateTime(%(since)s)" in query), name
        assert "{" not in query and "'" not in query.replace("''", "").replace("'internal'", "").replace(
            "'utm_source'", "").replace("'utm_medium'", "").replace("'utm_campaign'", "").replace(
            "'pageviews'", "").replace("'events'", "").replace("'visits'", ""), name


@pytest_twisted.ensureDeferred
async def test_past_hours_are_kept_and_computed_again_when_their_rows_change(redis_url, clickhouse_url):
    """The current hour is read for every answer; a kept hour follows late rows once checked."""
    async with daemon_with_history(redis_url, clickhouse_url) as (daemon, read, now):
        current = now - now % 3600
        _, before, _ = await request(daemon.port, "/api/stats?projectId=p1&range=24h", read)
        kept = daemon.service.api.hours.projects["p1"].hours
        assert sorted(kept) == list(range(current - 86400, current, 3600))

        # A visit this hour is counted at once.
        store_visit(clickhouse_url, "p1", "now", [(current, f"{SITE}/new", "", "direct")], [], CHROME,
                    **CHROME_COLUMNS)
        _, fresh, _ = await request(daemon.port, "/api/stats?projectId=p1&range=24h", read)
        assert (fresh["pageviews"], fresh["sessions"]) == (before["pageviews"] + 1, before["sessions"] + 1)

        # Rows that come late for a kept hour (a replayed spool, say), and the end of a visit that started then.
        late = now - 7200
        store_visit(clickhouse_url, "p1", "late", [(late, f"{SITE}/late", GOOGLE, "organic")], [(late + 40, 1)],
                    FIREFOX, **CHROME_COLUMNS)
        _, stale, _ = await request(daemon.port, "/api/stats?projectId=p1&range=24h", read)
        assert stale["pageviews"] == fresh["pageviews"]  # kept as it was...
        assert await daemon.service.api.hours.check() == 1  # ...until the check (every 30 s) sees the hour changed
        _, after, _ = await request(daemon.port, "/api/stats?projectId=p1&range=24h", read)
        assert (after["pageviews"], after["sessions"], after["endedSessions"]) == (
            fresh["pageviews"] + 1, fresh["sessions"] + 1, fresh["endedSessions"] + 1)
        assert {"hostname": "www.google.com", "sessions": 2} in after["referrers"]
        assert await daemon.service.api.hours.check() == 0


def test_partials_add_up_and_the_median_is_clickhouses():
    first = rollup.Partial(pageviews=2, visits=1, ended=1, durations=Counter({10: 1}), pages=Counter({"/": 2}),
                           countries=Counter({"DE": 1}), country_names={"DE": "Germany"})
    second = rollup.Partial(pageviews=1, visits=2, ended=2, bounced=1, durations=Counter({90: 1, 120: 1}),
                            pages=Counter({"/": 1, "/a": 1}), countries=Counter({"DE": 2}), country_names={"DE": ""})
    total = rollup.Partial().add(first).add(second)
    assert (total.pageviews, total.visits, total.ended, total.bounced) == (3, 3, 3, 1)
    assert total.pages == Counter({"/": 3, "/a": 1}) and total.country_names == {"DE": "Germany"}
    # quantileExact(0.5): the value at place n // 2 of the sorted values
    assert rollup.median(total.durations) == 90
    assert rollup.median(Counter({10: 1, 90: 1, 120: 1, 300: 1})) == 120
    assert rollup.median(Counter({5: 3})) == 5 and rollup.median(Counter()) is None
