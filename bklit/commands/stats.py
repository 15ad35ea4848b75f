"""``bklit stats``: a project's pageviews, sessions, events and top pages."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bklit import keys
from bklit.command import Failed, connect, first_line, utc
from bklit.config import Config


# Bots (bot_policy = mark) are counted apart from people; a session is a
# visit (one row per session id and start, see batch.lua).
STATS_QUERIES = {
    "pageviews": "SELECT is_bot, uniqExact(id) FROM page_view_event"
                 " WHERE project_id = %(project)s AND timestamp >= toDateTime(%(since)s) GROUP BY is_bot",
    "events": "SELECT is_bot, uniqExact(id) FROM tracked_event"
              " WHERE project_id = %(project)s AND timestamp >= toDateTime(%(since)s) GROUP BY is_bot",
    "sessions": "SELECT is_bot, count() FROM tracked_session FINAL"
                " WHERE project_id = %(project)s AND started_at >= toDateTime(%(since)s) GROUP BY is_bot",
    "top_pages": "SELECT url, uniqExact(id) AS views FROM page_view_event"
                 " WHERE project_id = %(project)s AND timestamp >= toDateTime(%(since)s) AND is_bot = 0"
                 " GROUP BY url ORDER BY views DESC, url LIMIT 10",
}


def thd_stats(client: Any, project: str, since: int) -> dict:
    """Counts (people, and bots apart) and top pages of ``project`` since ``since`` (epoch seconds)."""
    params = {"project": project, "since": since}
    result = {name: client.execute(query, params) for name, query in STATS_QUERIES.items()}
    numbers = {}
    for name in ("pageviews", "events", "sessions"):
        by_bot = dict(result[name])
        numbers[name], numbers["bot_" + name] = by_bot.get(0, 0), by_bot.get(1, 0)
    numbers["top_pages"] = [{"url": url, "pageviews": views} for url, views in result["top_pages"]]
    return numbers


async def stats(args: argparse.Namespace, config: Config) -> None:
    """Pageviews, sessions, events and top pages from ClickHouse; live from Redis."""
    import logging

    from bklit.clickhouse import using_pool

    span_label, span = args.since
    since = max(0, int(time.time()) - span)
    redis = await connect(config)
    live = int(await redis.call("ZCARD", keys.live_sessions(args.project)))
    bots_live = int(await redis.call("ZCARD", keys.live_bots(args.project)))
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)
    try:
        numbers = await using_pool(config.clickhouse, thd_stats, args.project, since)
    except Exception as e:
        raise Failed(f"ClickHouse: {first_line(e)}") from None
    result = {"project": args.project, "since": utc(since) + " UTC", "since_epoch": since,
              "pageviews": numbers["pageviews"], "sessions": numbers["sessions"], "events": numbers["events"],
              "live": live, "top_pages": numbers["top_pages"],
              "bots": {"pageviews": numbers["bot_pageviews"], "sessions": numbers["bot_sessions"],
                       "events": numbers["bot_events"], "live": bots_live}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"project {args.project}, last {span_label} (since {result['since']})")
    for name in ("pageviews", "sessions", "events", "live"):
        print(f"{'live now' if name == 'live' else name:10}  {result[name]}")
    bots = result["bots"]
    if any(bots.values()):
        print("bots (not counted above): " + ", ".join(f"{bots[name]} {name}" for name in bots))
    print("top pages")
    for page in result["top_pages"]:
        print(f"{page['pageviews']:10}  {page['url']}")
