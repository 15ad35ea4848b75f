"""``bklit queue status|retry-dead``: the event stream and its dead letters."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bklit.command import Connection, Failed, connect, say
from bklit.config import Config
from bklit.keys import DEAD_STREAM, GROUP, STREAM

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
