"""``bklit demo`` against a test daemon: simulated visits arrive as real traffic, and end."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from harness import clickhouse_rows, eventually, running_daemon, settings

from bklit.demo import Player

BKLIT = Path(sys.executable).parent / "bklit"


def run_demo(port: int, key: str, *args: str) -> subprocess.CompletedProcess:
    """``bklit demo`` as a person runs it, the key on standard input (blocking: call it in a thread)."""
    return subprocess.run([str(BKLIT), "demo", "--project", "p1", "--key", "-", "--url", f"ws://127.0.0.1:{port}",
                           *args], input=key + "\n", capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, BKLIT_CONFIG=""))


@pytest_twisted.ensureDeferred
async def test_demo_command_stores_visits_that_end(redis_url, clickhouse_url):
    """A few seconds of the command: pageviews stored, sessions of the demo ended with its sockets."""
    async with running_daemon(settings(redis_url, clickhouse_url, trusted_proxies="127.0.0.1")) as daemon:
        key = await daemon.token("p1")
        done = await deferToThread(run_demo, daemon.port, key, "--visitors", "6", "--minutes", "0.1", "--seed", "5")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("played ") and " pageviews " in done.stdout, done.stdout
        assert "6 visitors at a time for 0.1 min" in done.stderr
        played = int(done.stdout.split(": ")[1].split(" pageviews")[0])
        assert played >= 6
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT count() FROM page_view_event FINAL")
                         == [(played,)], timeout=10)
        # Every visit has ended: the demo closed its sockets.
        query = "SELECT session_id, ended_at IS NOT NULL, pageviews FROM tracked_session FINAL"
        sessions = await eventually(lambda: (rows := clickhouse_rows(clickhouse_url, query))
                                    and all(ended for _, ended, _ in rows) and rows, timeout=10)
        assert len(sessions) >= 6
        assert await daemon.service.sessions.live_count("p1") == 0
        ids = [s for s, _, _ in sessions]
        assert all(s.split("-")[0].isdigit() and len(s.split("-")[1]) == 11 for s in ids)  # the SDK's <ms>-<base36>


@pytest_twisted.ensureDeferred
async def test_demo_plays_what_the_sdk_sends(redis_url, clickhouse_url):
    """Played faster: pushState and full page loads in one session, campaigns, events, browsers, countries."""
    async with running_daemon(settings(redis_url, clickhouse_url, trusted_proxies="127.0.0.1")) as daemon:
        key = await daemon.token("p1")
        out = io.StringIO()
        player = Player(reactor, f"ws://127.0.0.1:{daemon.port}", "p1", key, visitors=8, seconds=6,
                        rng=random.Random(11), out=out, speed=8)
        tally = await player.play()
        assert tally.page_loads >= 1 and tally.events >= 1 and tally.failures == 0
        assert tally.sockets == tally.visits + tally.page_loads
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT count() FROM page_view_event FINAL")
                         == [(tally.pageviews,)], timeout=10)
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT count() FROM tracked_event FINAL")
                         == [(tally.events,)], timeout=10)
        rows = clickhouse_rows(clickhouse_url, (
            "SELECT session_id, url, referrer_type, utm_source, browser, device_type, country_code, landing_page"
            " FROM page_view_event FINAL ORDER BY id"))
    by_session: dict[str, list] = {}
    for row in rows:
        by_session.setdefault(row[0], []).append(row)
    assert len(by_session) == tally.visits
    # a full page load: a new socket of the same session, the page before as its referrer
    assert any(r[2] == "internal" for r in rows)
    # pushState: a later page of the session keeps the landing page's referrer type
    assert any(len(views) > 1 and any(v[2] != "internal" for v in views[1:]) for views in by_session.values())
    assert all(len({v[7] for v in views}) == 1 and views[0][1] == views[0][7] for views in by_session.values())
    assert {r[3] for r in rows} - {""}, "no campaign"
    assert len({r[4] for r in rows}) >= 3 and {"desktop", "mobile"} <= {r[5] for r in rows}
    assert len({r[6] for r in rows} - {""}) >= 3  # X-Forwarded-For from trusted loopback: countries


@pytest_twisted.ensureDeferred
async def test_demo_with_a_read_key_stops_at_once(redis_url, clickhouse_url):
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        read = await daemon.token("p1", scope="read")
        done = await deferToThread(run_demo, daemon.port, read, "--visitors", "3", "--minutes", "1")
    assert done.returncode == 1
    assert "the server refused the key: API key is not valid for ingest" in done.stderr


def test_demo_usage_errors():
    for args, message in [(["--url", "http://localhost:8080"], "--url must be ws://"),
                          (["--minutes", "0"], "expected a number above 0"),
                          (["--visitors", "0"], "expected a whole number of 1 or more")]:
        done = run_demo(1, "bk_x", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
