"""How fast the live page's API answers on a project with a million pageviews.

    python bench/api.py [--pageviews 1000000] [--runs 30]

Starts a throwaway Redis, ClickHouse and daemon (``--role all``, see
``_stack.py``), inserts ``--pageviews`` pageview rows of the project
``bench`` spread over the last 7 days (and a fifth as many of another
project, so the queries must pick theirs), with their visits (about four
pageviews each; a start row and, once ended, an end row, as the writer
stores them) and custom events, through clickhouse-driver in batches.
Then it prints two tables, median and p95 over ``--runs`` runs:

1. each query of ``bklit.api`` and ``bklit.rollup`` alone, with
   clickhouse-driver: those an answer waits for (the current hour, or the
   last 30 minutes), and those that compute and check the kept hours of a
   week (once per project, and every 30 s in the background);
2. each endpoint over HTTP, as the page asks (``/api/stats`` runs its
   queries at once in the API's two threads): the first answer, which
   computes the week's hours, then the median and p95.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clickhouse_driver import Client  # noqa: E402

from _stack import Stack  # noqa: E402
from bklit import agents, api, rollup, schema  # noqa: E402
from bklit.demo import AGENTS  # noqa: E402

PROJECT = "bench"
BATCH = 100_000
SITE = "https://www.example.com"
PAGES = ["/", "/pricing", "/docs", "/docs/install", "/docs/api", "/blog", "/blog/privacy", "/about", "/contact",
         "/signup"] + [f"/blog/post-{n}" for n in range(40)]
REFERRERS = [("", "", "direct")] * 5 + [("https://www.google.com/", "www.google.com", "organic")] * 4 + [
    ("https://duckduckgo.com/", "duckduckgo.com", "organic"), ("https://news.ycombinator.com/", "news.ycombinator.com",
                                                               "referral"),
    ("https://www.reddit.com/r/privacy/", "www.reddit.com", "social")]
BROWSERS = [(ua, agents.shared().describe(ua)) for ua, *_ in AGENTS]
COUNTRIES = [("US", "United States"), ("DE", "Germany"), ("GB", "United Kingdom"), ("FR", "France"),
             ("NL", "Netherlands"), ("JP", "Japan"), ("BR", "Brazil"), ("AU", "Australia"), ("", "")]
CAMPAIGNS = [("", "", "")] * 8 + [("newsletter", "email", "spring"), ("twitter", "social", "launch")]


def visits(project: str, pageviews: int, now: float, rng: random.Random):
    """(pageview rows, session rows, event rows) of visits over the last 7 days, in batches."""
    views, sessions, events = [], [], []
    made = 0
    while made < pageviews:
        started = now - rng.uniform(0, 7 * 86400)
        count = 1 if rng.random() < 0.4 else rng.randint(2, 9)
        session = f"{int(started * 1000)}-{uuid.uuid4().hex[:9]}"
        agent, described = rng.choice(BROWSERS)
        code, country = rng.choice(COUNTRIES)
        referrer, host, kind = rng.choice(REFERRERS)
        source, medium, campaign = rng.choice(CAMPAIGNS)
        moment = started
        pages = []
        for n in range(count):
            page = rng.choice(PAGES)
            url = SITE + page + (f"?utm_source={source}&utm_medium={medium}&utm_campaign={campaign}"
                                 if n == 0 and source else "")
            pages.append(url)
            views.append(schema.to_insert_row("page_view_event", {
                "id": str(uuid.uuid4()), "project_id": project, "session_id": session, "timestamp": moment,
                "received_at": moment, "url": url, "referrer": referrer if n == 0 else pages[n - 1],
                "referrer_hostname": host if n == 0 else "www.example.com",
                "referrer_type": kind if n == 0 else "internal",
                "utm_source": source if n == 0 else "", "utm_medium": medium if n == 0 else "",
                "utm_campaign": campaign if n == 0 else "", "user_agent": agent, **described.columns(),
                "country": country, "country_code": code, "landing_page": pages[0],
                "language": "en-US", "screen_width": 1920, "screen_height": 1080}))
            if rng.random() < 0.1:
                events.append(schema.to_insert_row("tracked_event", {
                    "id": str(uuid.uuid4()), "project_id": project, "session_id": session, "timestamp": moment,
                    "received_at": moment, "tracking_id": "cta-button", "event_type": "click"}))
            moment = min(now, moment + rng.uniform(5, 120))
        ended = moment if moment < now - 60 else None
        row = {"id": f"{session}/{int(started * 1000)}", "session_id": session, "project_id": project,
               "started_at": started, "started_ms": int(started * 1000), "pageviews": 1, "did_bounce": 1,
               "entry_page": pages[0], "exit_page": pages[0], "user_agent": agent, "country": country,
               "country_code": code,
               "updated_at": started, "version": int(started * 1000)}
        sessions.append(schema.to_insert_row("tracked_session", row))
        if ended is not None:
            sessions.append(schema.to_insert_row("tracked_session", {
                **row, "ended_at": ended, "duration": int(ended - started), "pageviews": count,
                "did_bounce": int(count == 1), "exit_page": pages[-1], "end_reason": "disconnect",
                "updated_at": ended, "version": int(ended * 1000)}))
        made += count
        if len(views) >= BATCH:
            yield views, sessions, events
            views, sessions, events = [], [], []
    yield views, sessions, events


def fill(client: Client, project: str, pageviews: int, now: float, rng: random.Random) -> dict:
    """Insert the visits; returns how many rows went into each table."""
    counts = dict.fromkeys(schema.TABLES, 0)
    for batch in visits(project, pageviews, now, rng):
        for table, rows in zip(("page_view_event", "tracked_session", "tracked_event"), batch):
            if rows:
                client.execute(f"INSERT INTO {table} ({', '.join(schema.insert_columns(table))}) VALUES", rows)
                counts[table] += len(rows)
    return counts


def settle(client: Client, timeout: float = 300) -> None:
    """Wait for the merges the inserts started (they would be timed too)."""
    deadline = time.monotonic() + timeout
    while client.execute("SELECT count() FROM system.merges")[0][0] and time.monotonic() < deadline:
        time.sleep(1)


def spread(samples: list[float]) -> tuple[float, float]:
    """(median, p95) in ms."""
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000


def timed(client: Client, query: str, params: dict, runs: int) -> tuple[float, float]:
    client.execute(query, params)  # warm
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        client.execute(query, params)
        samples.append(time.perf_counter() - started)
    return spread(samples)


def time_queries(client: Client, runs: int) -> list[tuple[str, float, float]]:
    """Each query an answer waits for, and those that fill and check the kept hours."""
    now = int(time.time())
    current = now - now % rollup.HOUR
    table = []
    for name, query in rollup.PARTIAL_QUERIES.items():  # /api/stats, every range: the current hour
        table.append((f"stats {name} (this hour)", *timed(client, query, rollup.params(PROJECT, current, rollup.FOREVER), runs)))
    for name, query in rollup.PARTIAL_QUERIES.items():  # /api/stats?range=30m
        table.append((f"stats {name} (30m)", *timed(client, query, rollup.params(PROJECT, now - 1800, rollup.FOREVER), runs)))
    table.append(("timeseries (60 min)", *timed(client, api.TIMESERIES_QUERY, {"project": PROJECT, "since": now - 3600},
                                               runs)))
    week = rollup.params(PROJECT, current - 7 * 86400, current)
    table.append(("kept hours: check, 7 days", *timed(client, rollup.SIGNATURE_QUERY, week, runs)))
    for name, query in rollup.PARTIAL_QUERIES.items():  # once per project, then an hour at a time
        table.append((f"kept hours: fill {name}, 7 days", *timed(client, query, week, max(3, runs // 10))))
    return table


def time_endpoints(port: int, key: str, runs: int) -> list[tuple[str, float, float]]:
    """Each endpoint over HTTP: the first answer (the kept hours computed) and then the median and p95."""
    paths = [f"/api/stats?projectId={PROJECT}&range={r}" for r in ("7d", "24h", "30m")]
    paths += [f"/api/timeseries?projectId={PROJECT}", f"/api/sessions?projectId={PROJECT}"]
    table = []
    for path in paths:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            json.load(response)
        first = (time.perf_counter() - started) * 1000
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
            samples.append(time.perf_counter() - started)
        table.append((path, first, *spread(samples)))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pageviews", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(7)
    with Stack(project=PROJECT, roles="all") as stack:
        client = Client.from_url(stack.clickhouse_url)
        started = time.monotonic()
        now = time.time()
        counts = fill(client, PROJECT, args.pageviews, now, rng)
        other = fill(client, "other", args.pageviews // 5, now, rng)
        settle(client)
        version = client.execute("SELECT version()")[0][0]
        print(f"ClickHouse {version}: inserted {counts['page_view_event']:,} pageviews, "
              f"{counts['tracked_session']:,} session rows, {counts['tracked_event']:,} events of {PROJECT} "
              f"(and {other['page_view_event']:,} pageviews of another project) in {time.monotonic() - started:.0f} s")
        print(f"\n{'query (clickhouse-driver)':40} {'median ms':>10} {'p95 ms':>8}")
        for name, median, p95 in time_queries(client, args.runs):
            print(f"{name:40} {median:10.1f} {p95:8.1f}")
        client.disconnect()
        print(f"\n{'endpoint (HTTP, whole answer)':44} {'first ms':>9} {'median ms':>10} {'p95 ms':>8}")
        for name, first, median, p95 in time_endpoints(stack.port, stack.read_key, args.runs):
            print(f"{name:44} {first:9.1f} {median:10.1f} {p95:8.1f}")


if __name__ == "__main__":
    main()
