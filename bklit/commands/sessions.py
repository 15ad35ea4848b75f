"""``bklit sessions list|end``: a project's live sessions.

Sessions are ended with the daemon's own batch script, so an admin end is
stored and broadcast exactly like a disconnect.
"""

from __future__ import annotations

import argparse
import json
import time

from bklit import keys
from bklit.command import Failed, connect, gather, say, utc
from bklit.config import Config
from bklit.queue import StreamProducer
from bklit.redis_client import RedisUnavailable


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
