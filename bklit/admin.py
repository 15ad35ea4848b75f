"""Operating commands of ``bklit``: the event queue, live sessions, stats.

Each command takes the parsed arguments and the Config, prints its result
(text, or JSON with ``--json``) and raises ``Failed`` (exit 1) when it
cannot do its job (``bklit.command``); ``bklit.cli`` parses the command
line and calls them.
Sessions are ended with the daemon's own batch script, so an admin end is
stored and broadcast exactly like a disconnect.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from twisted.internet import defer

from bklit import keys
from bklit.command import Connection, Failed, connect, say
from bklit.config import Config
from bklit.keys import DEAD_STREAM, GROUP, STREAM
from bklit.queue import StreamProducer
from bklit.redis_client import RedisUnavailable

RETRY_BATCH = 100

# Moves up to COUNT dead letters back into the events stream, oldest first:
# XADD of the ``e`` field, then XDEL, all in one atomic script call.
RETRY_DEAD = """
-- KEYS[1] dead stream, KEYS[2] events stream
-- ARGV[1] first id (inclusive, or "(id" exclusive), ARGV[2] last id, ARGV[3] count
-- -> {last id looked at or "", {{dead id, new id}...}, {ids without an e field}}
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local moved, skipped, last = {}, {}, ''
for _, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  local e = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then e = fields[i + 1] end
  end
  last = id
  if e then
    moved[#moved + 1] = {id, redis.call('XADD', KEYS[2], '*', 'e', e)}
    redis.call('XDEL', KEYS[1], id)
  else
    skipped[#skipped + 1] = id
  end
end
return {last, moved, skipped}
"""


def fields(flat: list) -> dict:
    """``[k1, v1, k2, v2]`` -> ``{k1: v1, k2: v2}``."""
    return dict(zip(flat[::2], flat[1::2]))


def id_ms(entry_id: str) -> int:
    """The millisecond time part of a stream id."""
    return int(entry_id.split("-", 1)[0])


async def gather(waiting: list[defer.Deferred]) -> list:
    """The results of Deferreds already running, in order; the first failure raises."""
    outcomes = await defer.DeferredList(waiting, consumeErrors=True)
    for ok, value in outcomes:
        if not ok:
            value.raiseException()
    return [value for _, value in outcomes]


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (server errors carry stack traces)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def utc(epoch_seconds: float) -> str:
    """``2024-11-26 08:00:00`` (UTC) for listings."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch_seconds))


# Queue -------------------------------------------------------------------------


async def read_queue_status(redis: Connection) -> dict:
    """Stream length, the group's pending entries and lag, and dead letters.

    A stream or group that does not exist yet reads as empty.  Ages use
    Redis's clock, the one stream ids are made from.
    """
    import txredisapi

    length = int(await redis.call("XLEN", STREAM))
    dead = int(await redis.call("XLEN", DEAD_STREAM))
    seconds, micros = await redis.call("TIME")
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    try:
        groups = [fields(flat) for flat in await redis.call("XINFO", "GROUPS", STREAM)]
    except txredisapi.ResponseError as e:
        if "no such key" not in str(e).lower():
            raise Failed(f"Redis: {e}") from None
        groups = []
    group = next((g for g in groups if g.get("name") == GROUP), None)
    status: dict[str, Any] = {
        "stream": STREAM, "length": length, "group": GROUP, "group_exists": group is not None,
        "pending": 0, "consumers": {}, "lag": None, "oldest_pending_id": None,
        "oldest_pending_age": None, "oldest_pending_idle": None, "dead_stream": DEAD_STREAM, "dead": dead,
    }
    if group is None:
        return status
    status["lag"] = int(group["lag"]) if group.get("lag") is not None else None
    count, _, _, consumers = await redis.call("XPENDING", STREAM, GROUP)
    status["pending"] = int(count)
    status["consumers"] = {name: int(n) for name, n in consumers or ()}
    if int(count):
        [(oldest, _, idle_ms, _)] = await redis.call("XPENDING", STREAM, GROUP, "-", "+", "1")
        status["oldest_pending_id"] = oldest
        status["oldest_pending_age"] = max(0, now_ms - id_ms(oldest)) / 1000
        status["oldest_pending_idle"] = int(idle_ms) / 1000
    return status


async def queue_status(args: argparse.Namespace, config: Config) -> None:
    status = await read_queue_status(await connect(config))
    if args.json:
        print(json.dumps(status))
        return
    rows = [("stream", status["stream"]), ("entries", status["length"])]
    if not status["group_exists"]:
        rows.append(("group", f"{status['group']} (not created yet: no writer has run)"))
    else:
        rows += [("group", status["group"]), ("pending", status["pending"])]
        rows += [(f"  {name}", n) for name, n in sorted(status["consumers"].items())]
        rows.append(("lag", "unknown" if status["lag"] is None else status["lag"]))
        if status["oldest_pending_id"]:
            rows.append(("oldest pending", f"{status['oldest_pending_age']:.1f} s old, idle "
                                           f"{status['oldest_pending_idle']:.1f} s ({status['oldest_pending_id']})"))
    rows.append(("dead letters", f"{status['dead']} ({status['dead_stream']})"))
    for name, value in rows:
        print(f"{name:16}{value}")


def describe_dead(entry_id: str, flat: list) -> dict:
    """A dead letter as listed by ``--dry-run``."""
    entry = fields(flat)
    try:
        table = json.loads(entry["e"])["table"]
    except (KeyError, ValueError, TypeError):
        table = None
    return {"id": entry_id, "original_id": entry.get("id"), "table": table, "error": entry.get("error", "")}


async def queue_retry_dead(args: argparse.Namespace, config: Config) -> None:
    """Move dead letters back (or list them with ``--dry-run``), oldest first.

    Only the entries dead when the command started are looked at, so rows
    the writer refuses again while it runs are not moved twice.
    """
    redis = await connect(config)
    newest = await redis.call("XREVRANGE", DEAD_STREAM, "+", "-", "COUNT", "1")
    end = newest[0][0] if newest else None
    limit = args.limit
    entries: list[dict] = []
    skipped: list[str] = []
    start = "-"
    while end is not None and (limit is None or len(entries) < limit):
        count = RETRY_BATCH if limit is None else min(RETRY_BATCH, limit - len(entries))
        if args.dry_run:
            page = await redis.call("XRANGE", DEAD_STREAM, start, end, "COUNT", str(count))
            last = page[-1][0] if page else ""
            for entry_id, flat in page:
                if "e" in fields(flat):
                    entries.append(describe_dead(entry_id, flat))
                else:
                    skipped.append(entry_id)
        else:
            last, moved, left = await redis.eval(RETRY_DEAD, [DEAD_STREAM, STREAM], [start, end, str(count)])
            entries += [{"id": old, "new_id": new} for old, new in moved or ()]
            skipped += left or []
        if not last or last == end:
            break
        start = "(" + last
    report(args, entries, skipped)


def report(args: argparse.Namespace, entries: list[dict], skipped: list[str]) -> None:
    """Print what ``retry-dead`` moved, or would move."""
    verb = "would move" if args.dry_run else "moved"
    if args.json:
        print(json.dumps({verb.replace(" ", "_"): len(entries), "entries": entries, "skipped": skipped}))
    elif args.dry_run:
        for entry in entries:
            error = entry["error"] if len(entry["error"]) <= 100 else entry["error"][:99] + "…"
            print(f"{entry['id']:20}  {entry['table'] or '?':16}  {error}")
    say(f"{verb} {len(entries)} dead letters from {DEAD_STREAM} to {STREAM}")
    if skipped:
        say(f"left {len(skipped)} entries without an 'e' field in {DEAD_STREAM}: {', '.join(skipped[:5])}"
            + (" …" if len(skipped) > 5 else ""))


# Sessions ----------------------------------------------------------------------


async def sessions_list(args: argparse.Namespace, config: Config) -> None:
    """The project's live sessions, most recently active first."""
    redis = await connect(config)
    live = int(await redis.call("ZCARD", keys.live_sessions(args.project)))
    flat = await redis.call("ZREVRANGE", keys.live_sessions(args.project), "0", str(args.limit - 1), "WITHSCORES")
    ids, scores = flat[::2], [int(float(s)) for s in flat[1::2]]
    states = await gather([
        redis.call("HMGET", keys.session_state(args.project, s), "started_at", "pageviews", "entry_page", "exit_page",
                   "user_agent", "country")
        for s in ids])
    now_ms = time.time() * 1000
    sessions = [{
        "session_id": session, "started_at": int(started) if started else None,
        "pageviews": int(pageviews or 0), "entry_page": entry or "", "exit_page": exit_page or "",
        "last_heartbeat": score, "last_heartbeat_age": round(max(0.0, now_ms - score) / 1000, 1),
        "user_agent": agent or "", "country": country or "",
    } for session, score, (started, pageviews, entry, exit_page, agent, country) in zip(ids, scores, states)]
    if args.json:
        print(json.dumps({"project": args.project, "live": live, "sessions": sessions}))
        return
    print(f"{'SESSION':28}  {'STARTED (UTC)':19}  {'PAGEVIEWS':>9}  {'SEEN':>8}  ENTRY -> EXIT")
    for s in sessions:
        started = utc(s["started_at"] / 1000) if s["started_at"] else "-"
        seen = f"{s['last_heartbeat_age']:.0f} s ago"
        print(f"{s['session_id']:28}  {started:19}  {s['pageviews']:9}  {seen:>8}  {s['entry_page']} -> {s['exit_page']}")
    shown = f", showing the {len(sessions)} most recently active" if live > len(sessions) else ""
    say(f"{live} live sessions in {args.project}{shown}")


async def sessions_end(args: argparse.Namespace, config: Config) -> None:
    """End live sessions as the daemon does: end row stored, ``session_end`` broadcast."""
    from twisted.internet import reactor

    from bklit.live import session_end_message

    redis = await connect(config)
    live = (keys.live_sessions(args.project), keys.live_bots(args.project))
    if args.session is not None:
        if all([await redis.call("ZSCORE", key, args.session) is None for key in live]):
            raise Failed(f"session {args.session!r} is not live in project {args.project!r}")
        sessions = [args.session]
    else:
        sessions = [s for key in live for s in await redis.call("ZRANGE", key, "0", "-1")]
    producer = StreamProducer(redis, reactor, config.resume_window)
    now = time.time()
    now_ms = int(now * 1000)
    ends = [producer.end_session(args.project, s, "", now_ms, now_ms, "admin", session_end_message(s, "admin", now))
            for s in sessions]
    await producer.drain()
    try:
        outcomes = await gather(ends)
    except RedisUnavailable as e:
        raise Failed(f"Redis: {e}") from None
    ended = [s for s, done in zip(sessions, outcomes) if done]
    if args.session is not None and not ended:
        raise Failed(f"session {args.session!r} had already ended or had no stored state")
    if args.json:
        print(json.dumps({"project": args.project, "ended": len(ended), "sessions": ended}))
    elif not sessions:
        say(f"no live sessions in {args.project}")
    else:
        say(f"ended {len(ended)} sessions of {args.project}: stored, and broadcast with reason admin")
    if len(ended) < len(sessions):
        say(f"{len(sessions) - len(ended)} more had already ended or had no stored state;"
            " they left the live set")


# Stats -------------------------------------------------------------------------


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
