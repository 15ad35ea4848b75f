"""What an accepted event becomes: its stream entry and its broadcast, each encoded once.

Pure code, no I/O.  A socket's constant columns (project, session,
anonymised address, place) are encoded once, when it opens (``Visitor``),
and its user agent's once per agent (``agent_parts``); an event encodes
only its own fields and is joined to those parts.  The stream entry is
``{"table": <table>, "row": {column: value}}`` (see ``bklit.rows``), the
broadcast is the dashboard message of ``bklit.live``.

Encoding is orjson's (C, the same JSON as the standard library's for these
values: strings, finite floats, small integers, booleans, null).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import orjson

from bklit import live, rows
from bklit.agents import Agent
from bklit.geo import Place
from bklit.wire import Event, PageView, iso_timestamp

PAGEVIEW_ENTRY = b'{"table":"page_view_event","row":'
EVENT_ENTRY = b'{"table":"tracked_event","row":'


def _members(value: dict) -> bytes:
    """The JSON of an object without its braces, to be joined into another object."""
    return orjson.dumps(value)[1:-1]


@dataclass(frozen=True, slots=True)
class Visitor:
    """Who sends on one SDK socket, as its events carry it; fixed when the socket opens.

    ``ip`` is already anonymised (the full address is not kept).
    """

    project: str
    session: str
    socket: str
    ip: str
    place: Place
    row_part: bytes  # the constant columns of its pageview rows
    live_part: bytes  # the constant fields of its pageview broadcasts

    @classmethod
    def of(cls, project: str, session: str, socket: str, ip: str, place: Place) -> "Visitor":
        row = {"project_id": project, "session_id": session, "ip": ip, **place.columns()}
        return cls(project, session, socket, ip, place, _members(row), _members(live.place_fields(row)))


@lru_cache(maxsize=4096)
def agent_parts(agent: Agent) -> tuple[bytes, bytes]:
    """A user agent's columns of a pageview row and its fields of the broadcast (``is_bot`` apart)."""
    row = {"browser": agent.browser, "os": agent.os, "device_type": agent.device_type, "mobile": int(agent.mobile)}
    return _members(row), _members(live.agent_fields(row))


def pageview(pv: PageView, visitor: Visitor, agent: Agent, bot: bool, event_id: str,
             received_at: float) -> tuple[str, str, str]:
    """A pageview's stream entry and its broadcast split around ``isNewSession`` (see
    ``live.pageview_parts``): ``(entry, head, tail)``."""
    columns = rows.pageview_columns(pv, event_id=event_id, received_at=received_at)
    columns["timezone"] = columns["timezone"] or visitor.place.timezone
    columns["is_bot"] = int(bot)
    agent_row, agent_live = agent_parts(agent)
    entry = b"".join((PAGEVIEW_ENTRY, orjson.dumps(columns)[:-1], b",", visitor.row_part, b",", agent_row, b"}}"))
    data = orjson.dumps(live.pageview_fields(columns))[:-1]
    head = b"".join((b'{"type":"pageview","data":', data, b",", visitor.live_part, b",", agent_live,
                     b',"isNewSession":'))
    tail = b'},"timestamp":"' + iso_timestamp(received_at).encode() + b'"}'
    return entry.decode(), head.decode(), tail.decode()


def event(ev: Event, visitor: Visitor, bot: bool, event_id: str, received_at: float) -> tuple[str, str]:
    """A custom event's stream entry and its broadcast."""
    row = rows.event_row(ev, event_id=event_id, project_id=visitor.project, session_id=visitor.session,
                         received_at=received_at, is_bot=bot)
    return (EVENT_ENTRY + orjson.dumps(row) + b"}").decode(), live.event_message(row, received_at)
