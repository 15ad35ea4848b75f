"""The operations of ``batch.lua``, packed: one script argument each.

Pure code.  An operation travels as one string, its code and fields joined
by ``SEP`` (``pack``), so a batch of any size is a short command.  No field
can hold ``SEP``: ids, URLs and text from clients are checked free of
control characters, and JSON escapes them.  The spool keeps operations as
lists of fields (``unpack``).  The script's head documents each code.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from bklit import keys

SEP = "\x1f"  # between the fields of an operation
BATCH_SCRIPT = resources.files("bklit").joinpath("batch.lua").read_text(encoding="utf-8")
SCRIPT_KEYS = list(keys.SCRIPT_KEYS)
OPERATIONS = {"E": "event", "P": "pageview", "X": "session_end", "H": "heartbeat"}  # metric labels
REFUSED = "!"  # an operation's reply that starts with it: Redis refused that operation alone


class OperationRefused(Exception):
    """Redis refused this one operation (the others of its batch were applied)."""


# The operations of batch.lua (see the script's head), packed.

def pack(*fields: str) -> str:
    """An operation as the script reads it: its code and fields joined by ``SEP``."""
    op = SEP.join(fields)
    if op.count(SEP) != len(fields) - 1:
        raise ValueError("a field of a batch operation holds the field separator")
    return op


def unpack(op: str) -> list[str]:
    """The code and fields of a packed operation (as the spool keeps it)."""
    return op.split(SEP)


def event_op(entry: str, channel: str = "", message: str = "") -> str:
    """Append ``entry`` to the stream and publish ``message`` on ``channel`` ("" for none)."""
    return pack("E", entry, channel, message)


def pageview_op(entry: str, visitor: Any, now_ms: int, url: str, head: str, tail: str,
                user_agent: str = "", bot: bool = False) -> str:
    """Append a pageview and start, continue or resume its session.

    ``visitor`` (a ``bklit.entries.Visitor``) names the project, session and
    socket, and the place a new session keeps.  The broadcast is ``head +
    "true"|"false" + tail``: whether this pageview started the session is
    only known inside Redis.  A ``bot`` session is live apart from people's.
    The reply is ``[stream id, change]``, change 1 when the session
    started, 2 when it resumed, else 0 (also when spooled: it is decided at
    replay).
    """
    place = visitor.place
    return pack("P", entry, keys.live_channel(visitor.project), head, tail, visitor.project, visitor.session,
                visitor.socket, str(now_ms), url, user_agent, place.country, place.country_code, place.city,
                "1" if bot else "0")


def end_op(project: str, session: str, socket: str, now_ms: int, ended_ms: int, reason: str,
           message: str) -> str:
    """Detach ``socket`` from a session; end it (stored, ``message`` broadcast) when none is left."""
    return pack("X", project, session, socket, str(now_ms), str(ended_ms), reason, keys.live_channel(project),
                message)


def heartbeat_op(project: str, session: str, now_ms: int) -> str:
    """Refresh a live session's score and its keys' expiry."""
    return pack("H", project, session, str(now_ms))


def script_args(resume_ms: int, ops: Any) -> list[str]:
    """The batch script's arguments: the resume window, the key prefixes, then the packed operations."""
    return [str(resume_ms), *keys.SCRIPT_PREFIXES, *ops]
