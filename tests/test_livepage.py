"""The live page at ``/live``: its files and headers, and a person using it in headless Chromium.

``tests/browser/live.mjs`` (playwright-core driving Debian's chromium, as
``test_browser.py`` does) opens ``/live`` on a test daemon, signs in with a
wrong key and then a read key, and says what the page shows after each step;
between steps this test sends SDK traffic from Python.  The screenshot it
takes is kept as ``.run/live-page.png``.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from browsers import BROWSER, DRIVER_TIMEOUT, browser_tools  # noqa: F401 (a fixture)
from harness import connect, free_port, insert, running_daemon, sdk_event, sdk_pageview, settings
from samples import visit_rows

from bklit.demo import AGENTS, PAGES, PLACES, REFERRERS, Player
from bklit.livepage import LivePage

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / ".run" / "live-page.png"
SESSION = "1732608000000-livepage01"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


async def get(port: int, path: str, headers: dict | None = None, method: bytes = b"GET"):
    """(response, body) of a request to the daemon."""
    response = await Agent(reactor).request(method, f"http://127.0.0.1:{port}{path}".encode(),
                                            Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()}))
    return response, await readBody(response)


def header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


@pytest_twisted.ensureDeferred
async def test_live_page_and_its_files_are_served_with_a_strict_policy(redis_url, clickhouse_url):
    """``/live`` is the page, ``/live/<file>`` its files, each with CSP, no-cache and a correct type."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        response, body = await get(daemon.port, "/live")
        assert response.code == 200
        assert header(response, "content-type") == "text/html; charset=utf-8"
        policy = header(response, "content-security-policy")
        assert policy.startswith("default-src 'self'; connect-src 'self' ws: wss:;")
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "form-action 'none'" in policy
        assert header(response, "cache-control") == "no-cache"
        assert header(response, "x-content-type-options") == "nosniff"
        assert header(response, "referrer-policy") == "no-referrer"
        page = body.decode()
        # Everything it loads is its own, by a relative address; nothing from another site, nothing inline.
        loaded = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert sorted(loaded) == ["#main", "live/app.js", "live/icon.svg", "live/live.css"]
        assert "<style" not in page and "style=" not in page and "<script>" not in page

        for name, kind in [("app.js", "text/javascript; charset=utf-8"), ("state.js", "text/javascript; charset=utf-8"),
                           ("live.css", "text/css; charset=utf-8"), ("icon.svg", "image/svg+xml")]:
            response, body = await get(daemon.port, f"/live/{name}")
            assert (response.code, header(response, "content-type")) == (200, kind), name
            assert header(response, "content-security-policy") == policy
            assert body == (ROOT / "bklit" / "static" / "live" / name).read_bytes()
            modified = header(response, "last-modified")
            again, _ = await get(daemon.port, f"/live/{name}", {"If-Modified-Since": modified})
            assert again.code == 304, name  # no-cache: kept by the browser, asked again cheaply

        for path in ("/live/nope.js", "/live/app.js/more", "/live/index.html", "/live/..%2Fapi.py"):
            response, body = await get(daemon.port, path)
            assert response.code == 404, path
            assert header(response, "content-security-policy") == policy
        response, _ = await get(daemon.port, "/live/")
        assert (response.code, header(response, "location")) == (302, "../live")
        response, body = await get(daemon.port, "/live", method=b"HEAD")
        assert (response.code, body) == (200, b"")


def test_the_pages_model_in_node(browser_tools):  # noqa: F811
    """state.js (live count, sessions, feed, minutes) on its own: tests/browser/state.test.mjs."""
    import subprocess

    done = subprocess.run([browser_tools["node"], "--test", "state.test.mjs"], cwd=BROWSER, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout


def test_every_file_of_the_page_is_package_data():
    """setup.cfg ships the page's folder, and the page uses only files that are in it."""
    folder = ROOT / "bklit" / "static" / "live"
    assert "static/live/*" in (ROOT / "setup.cfg").read_text()
    names = {p.name for p in folder.iterdir()}
    assert {"index.html", "app.js", "state.js", "chart.js", "format.js", "live.css", "icon.svg"} <= names
    imports = set()
    for script in folder.glob("*.js"):
        imports |= set(re.findall(r'from "\./([^"]+)"', script.read_text()))
        assert "http://" not in script.read_text().replace("http://www.w3.org/2000/svg", ""), script.name
        assert "https://" not in script.read_text(), script.name
    assert imports <= names
    assert set(LivePage(folder).files) == {n.encode() for n in names if n != "index.html"}


class _LiveDriver(protocol.ProcessProtocol):
    """live.mjs as it runs: its JSON records, and a Deferred per step it waits at."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.err: list[bytes] = []
        self.buffer = b""
        self.asked: dict[str, defer.Deferred] = {}
        self.ended: defer.Deferred = defer.Deferred()
        self.code: int | None = None

    def step(self, name: str) -> defer.Deferred:
        return self.asked.setdefault(name, defer.Deferred())

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"{"):
                continue
            record = json.loads(line)
            self.records.append(record)
            if record["event"] == "waiting":
                self.step(record["for"]).callback(record)
            elif record["event"] == "failed":
                for waiting in self.asked.values():
                    if not waiting.called:
                        waiting.errback(AssertionError(record["message"]))

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        for name, waiting in self.asked.items():
            if not waiting.called:
                waiting.errback(AssertionError(f"live.mjs ended before step {name}: {self.transcript()}"))
        self.code = reason.value.exitCode
        self.ended.callback(self.code)

    def go_on(self) -> None:
        self.transport.write(b"go\n")

    def page(self, name: str) -> dict:
        return next(r for r in self.records if r["event"] == "page" and r["name"] == name)

    def transcript(self) -> str:
        lines = [json.dumps({k: v for k, v in r.items() if k != "at"})[:400] for r in self.records]
        return "\n".join(lines)[-8000:] + "\nstderr:\n" + b"".join(self.err).decode()[-3000:]


def _stop(process, signal: str) -> None:
    try:
        process.signalProcess(signal)
    except error.ProcessExitedAlready:
        pass


@asynccontextmanager
async def live_driver(tools: dict, options: dict):
    """live.mjs running with ``options``; stopped after DRIVER_TIMEOUT if still running, checked at the end."""
    driver = _LiveDriver()
    process = reactor.spawnProcess(driver, tools["node"], [tools["node"], "live.mjs", json.dumps(options)],
                                   path=str(BROWSER))
    timers = [reactor.callLater(DRIVER_TIMEOUT, _stop, process, "TERM"),
              reactor.callLater(DRIVER_TIMEOUT + 10, _stop, process, "KILL")]
    try:
        yield driver
        if driver.code is None:
            await driver.ended
    finally:
        for timer in timers:
            if timer.active():
                timer.cancel()
    assert driver.code == 0 and any(r["event"] == "done" for r in driver.records), driver.transcript()


async def visit_pricing(port: int, key: str):
    """An SDK socket from Germany with a pageview of /pricing?plan=team and a custom event, both acked."""
    client = await connect(port, path=f"/?projectId=p1&sessionId={SESSION}",
                           headers={"X-Forwarded-For": "85.214.132.117"})  # an address in Germany
    await client.next_of("connected")
    client.send(sdk_pageview("p1", SESSION, key=key, url="https://example.com/pricing?plan=team", userAgent=CHROME))
    await client.next_of("ack")
    client.send(sdk_event("p1", SESSION, key=key))
    await client.next_of("ack")
    return client


@pytest.mark.browser
@pytest_twisted.ensureDeferred
async def test_a_person_watches_the_live_page(browser_tools, redis_url, clickhouse_url, tmp_path):  # noqa: F811
    """Wrong key refused and forgotten; then the live count, sessions, feed and chart follow SDK traffic."""
    async with running_daemon(settings(redis_url, clickhouse_url, trusted_proxies="127.0.0.1")) as daemon:
        ingest, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        wrong = "bk_" + "x" * 40  # no such key
        stored = store_last_hour(clickhouse_url, random.Random(5))
        options = {"site": f"http://127.0.0.1:{daemon.port}", "chromium": browser_tools["chromium"],
                   "profile": str(tmp_path / "profile"), "project": "p1", "key": read, "wrongKey": wrong,
                   "screenshot": str(tmp_path / "live.png")}
        async with live_driver(browser_tools, options) as driver:
            await driver.step("pageview")
            client = await visit_pricing(daemon.port, ingest)
            driver.go_on()

            await driver.step("end")
            client.sendClose()
            await client.wait_closed()
            driver.go_on()

            await driver.step("screenshot")
            player = Player(reactor, f"ws://127.0.0.1:{daemon.port}", "p1", ingest, visitors=14, seconds=12,
                            rng=random.Random(3), out=io.StringIO())
            visits = defer.ensureDeferred(player.play())
            await _later(9)  # a screenshot while visitors are on the site
            driver.go_on()
            await driver.ended
            await visits

    records = driver.records
    opened, refused, signed_in = driver.page("opened"), driver.page("refused"), driver.page("signed-in")
    pageview, ended, busy = driver.page("pageview"), driver.page("ended"), driver.page("busy")

    assert opened["signInShown"] and not opened["boardShown"] and opened["focused"] == "project"
    # A wrong key: refused, said so, forgotten; the form is back, the key field focused and empty.
    assert refused["signInShown"] and not refused["boardShown"]
    assert "refused the key" in refused["signInError"] and "invalid API key" in refused["signInError"]
    assert refused["storedKey"] is None and refused["storedProject"] == "p1"
    assert refused["focused"] == "key" and refused["state"] == "refused"

    assert signed_in["state"] == "live" and signed_in["status"] == "Live" and not signed_in["signInShown"]
    assert signed_in["live"] == "0" and signed_in["sessions"] == [] and signed_in["feed"] == []
    # The chart: the last hour's pageviews from ClickHouse, minute by minute.
    assert signed_in["bars"] == 60 and chart_total(signed_in) == stored
    assert sum(h > 0 for h in signed_in["barHeights"]) > 20
    assert signed_in["storedKey"] == read  # kept in sessionStorage, for this tab

    assert pageview["live"] == "1"
    [row] = pageview["sessions"]
    assert row[0] == "/pricing?plan=team" and row[2] == "1"
    assert row[3] == "Germany" and row[4] == "Chrome on Linux · desktop"
    assert any("/pricing?plan=team" in item and "(new session)" in item for item in pageview["feed"])
    assert any("cta-button click" in item for item in pageview["feed"])
    assert chart_total(pageview) == stored + 1  # the live pageview, counted at once
    assert pageview["barHeights"][-1] > signed_in["barHeights"][-1] or pageview["barHeights"][-2] > 0

    assert ended["live"] == "0" and ended["sessions"] == []
    assert "ended (disconnect, 1 page," in ended["feed"][0]

    assert busy["state"] == "live" and int(busy["live"]) > 0 and busy["sessions"]
    assert int(busy["figures"]["Pageviews"].replace(",", "")) > 1 and busy["topPages"] and not busy["summaryError"]

    # Nothing went to another site, the key never into a URL, no console error (a CSP violation would be one).
    requests = [r for r in records if r["event"] == "request"]
    assert requests and all(r["url"].startswith(options["site"]) or r["url"].startswith("ws://127.0.0.1")
                            for r in requests), requests
    assert not [r for r in requests if read in r["url"] or wrong in r["url"]]
    assert all(r["authorization"] for r in requests if "/api/" in r["url"])
    # (Chromium logs each refused request of the wrong key's short attempt as an error.)
    refused_at = records.index(refused)
    errors = [r["text"] for i, r in enumerate(records) if r["event"] == "console" and r["level"] in ("error", "pageerror")
              and not (i < refused_at and "status of 401 (Unauthorized)" in r["text"])]
    assert not errors, [r for r in records if r["event"] == "console"]
    for page in (opened, refused, signed_in, pageview, ended, busy):
        assert read not in page["url"] and wrong not in page["url"]

    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "live.png", SCREENSHOT)


def store_last_hour(clickhouse_url: str, rng: random.Random) -> int:
    """Visits of p1 over the last hour (ended, 1 to 4 pages each) stored directly; returns their pageviews."""
    now = int(time.time())
    from iptocc import country_code

    from bklit.geo import COUNTRY_NAMES

    views, visits = [], []
    for n in range(120):
        at = now - int(3300 * (1 - rng.random() ** 1.5)) - 60  # busier lately
        agent = rng.choice(AGENTS)[0]
        code = country_code(rng.choices([p[0] for p in PLACES], weights=[p[-1] for p in PLACES])[0])
        country = COUNTRY_NAMES.get(code, "")
        referrer, kind = rng.choices([r[:2] for r in REFERRERS], weights=[r[2] for r in REFERRERS])[0]
        pages = [(at + 40 * i, "https://www.example.com" + rng.choice(PAGES)[0], referrer or "", kind if i == 0 else
                  "organic" if referrer else "direct") for i in range(rng.randint(1, 4))]
        pages = [p for p in pages if p[0] < now - 30]
        more, ended = visit_rows("p1", f"{at * 1000}-hist{n:04d}", pages, [(pages[-1][0] + 20, len(pages))], agent,
                                 country=country, country_code=code)
        views += more
        visits += ended
    insert(clickhouse_url, "page_view_event", views)
    insert(clickhouse_url, "tracked_session", visits)
    return len(views)


def chart_total(facts: dict) -> int:
    """The pageviews the chart's description counts."""
    match = re.match(r"([\d,]+) pageviews? in the last 60 minutes", facts["chartLabel"])
    return int(match[1].replace(",", "")) if match else 0


def _later(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest.mark.browser
@pytest_twisted.ensureDeferred
async def test_without_clickhouse_the_page_still_shows_the_live_parts(browser_tools, redis_url, tmp_path):  # noqa: F811
    """An ingest node whose ClickHouse does not answer: the summary says so, the live count still moves."""
    nowhere = f"clickhouse://default:@127.0.0.1:{free_port()}/bklit"
    async with running_daemon(settings(redis_url, nowhere, role="ingest", trusted_proxies="127.0.0.1")) as daemon:
        ingest, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        options = {"scenario": "degraded", "site": f"http://127.0.0.1:{daemon.port}", "project": "p1", "key": read,
                   "chromium": browser_tools["chromium"], "profile": str(tmp_path / "profile")}
        async with live_driver(browser_tools, options) as driver:
            await driver.step("pageview")
            client = await visit_pricing(daemon.port, ingest)
            driver.go_on()
            await driver.ended
        client.sendClose()
        await client.wait_closed()
    seen = driver.page("degraded")
    assert seen["state"] == "live" and seen["live"] == "1" and seen["sessions"][0][3] == "Germany"
    assert "summary is unavailable: ClickHouse is not answering" in seen["summaryError"]
    assert "Stored pageviews are unavailable" in seen["chartError"]
    assert seen["storedKey"] == read  # a 503 is not the key's fault
    assert seen["barHeights"][-1] > 0 or seen["barHeights"][-2] > 0  # the live pageview, on the chart all the same


@pytest_twisted.ensureDeferred
async def test_the_page_gets_snapshots_of_many_live_sessions(redis_url, clickhouse_url):
    """60 live sessions make a snapshot of some 9 KB, over the 4 KiB a dashboard may send: it still arrives."""
    from harness import open_dashboard

    async with running_daemon(settings(redis_url, clickhouse_url, max_connections_per_ip="1000")) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        clients = []
        for n in range(60):
            session = f"1732608000000-many{n:04d}"
            client = await connect(daemon.port, path=f"/?projectId=p1&sessionId={session}")
            await client.next_of("connected")
            client.send(sdk_pageview("p1", session, key=key, url=f"https://example.com/a-long-page-name/{n}"))
            await client.next_of("ack")
            clients.append(client)
        dash, snapshot = await open_dashboard(daemon.port, read)
        assert snapshot["data"]["live"] == 60 and len(snapshot["data"]["sessions"]) == 60
        assert len(json.dumps(snapshot)) > 4096
        dash.sendClose()
        for client in clients:
            client.sendClose()


@pytest.mark.browser
@pytest_twisted.ensureDeferred
async def test_a_thousand_live_sessions(browser_tools, redis_url, clickhouse_url, tmp_path):  # noqa: F811
    """1,000 live sessions and 30 pageviews a second: the count is right, the table shows the 100 most recently
    active, and the page keeps up (its longest tasks are printed; one over a second fails)."""
    count = 1000
    settings_ = settings(redis_url, clickhouse_url, trusted_proxies="127.0.0.1", max_connections_per_ip="100000",
                         max_connections_per_network="100000")
    async with running_daemon(settings_) as daemon:
        ingest, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        options = {"scenario": "crowd", "sessions": count, "site": f"http://127.0.0.1:{daemon.port}", "project": "p1",
                   "key": read, "chromium": browser_tools["chromium"], "profile": str(tmp_path / "profile")}
        async with live_driver(browser_tools, options) as driver:
            await driver.step("crowd")
            clients = []
            for first in range(0, count, 10):  # ten at a time (plain HTTP connections per address are capped)
                clients += await defer.gatherResults([defer.ensureDeferred(_crowd_visit(daemon.port, ingest, n))
                                                      for n in range(first, first + 10)])
            driver.go_on()
            await driver.step("browse")
            for k in range(300):
                n = (k * 37) % count
                clients[n].send(sdk_pageview("p1", _crowd_session(n), key=ingest, userAgent=CHROME,
                                             url=f"https://example.com/next/{k % 30}"))
                await _later(1 / 30)
            driver.go_on()
            await driver.step("leave")
            for client in clients:
                client.sendClose()
            driver.go_on()
    crowd, left = driver.page("crowd"), driver.page("left")
    assert crowd["live"] == "1,000" and len(crowd["sessions"]) == 100 and len(crowd["feed"]) == 100
    assert crowd["sessionsNote"] == "The 100 most recently active of 1,000 live sessions."
    assert left["live"] == "0" and left["sessions"] == []
    tasks = {r["name"]: r["durations"] for r in driver.records if r["event"] == "longtasks"}
    print(f"long tasks (over 50 ms) with 1,000 live sessions: {len(tasks['crowd'])} while browsing, "
          f"longest {max(tasks['crowd'], default=0):.0f} ms; {len(tasks['leave'])} while they left")
    assert max(tasks["crowd"] + tasks["leave"], default=0) < 1000


def _crowd_session(n: int) -> str:
    return f"1732608000000-crowd{n:05d}"


async def _crowd_visit(port: int, key: str, n: int):
    client = await connect(port, path=f"/?projectId=p1&sessionId={_crowd_session(n)}",  # from many networks
                           headers={"X-Forwarded-For": f"81.2.{n % 250}.{n // 250 + 1}"})
    await client.next_of("connected")
    client.send(sdk_pageview("p1", _crowd_session(n), key=key, url=f"https://example.com/p{n % 40}", userAgent=CHROME))
    await client.next_of("ack")
    return client
