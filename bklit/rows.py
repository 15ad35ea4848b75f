"""Turn validated wire records into row dicts for the ClickHouse tables; pure functions.

Rows are plain dicts keyed by column name (see bklit.schema.TABLES), with
times as epoch seconds, so they travel through the Redis stream as JSON and
become insert tuples with ``schema.to_insert_row``. Columns filled by other
enrichment (geo, browser) are left out here.
"""

import json
from datetime import datetime

from bklit import enrich
from bklit.wire import Event, PageView

MAX_PAST = 24 * 3600
MAX_FUTURE = 300
MAX_TIMESTAMP_LENGTH = 64


def parse_client_time(value: str | None) -> float | None:
    """Epoch seconds of an ISO 8601 time with ``Z`` or an offset; None if absent or unparseable.

    Times without a zone are refused (None): they name no instant.
    """
    if not isinstance(value, str) or not value.isascii() or len(value) > MAX_TIMESTAMP_LENGTH:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
        if moment.tzinfo is None or moment.utcoffset() is None:
            return None
        return moment.timestamp()
    except (ValueError, OverflowError):
        return None


def event_time(client_ts: str | None, received_at: float) -> float:
    """The client's time when within [received_at - MAX_PAST, received_at + MAX_FUTURE], else received_at."""
    moment = parse_client_time(client_ts)
    if moment is not None and received_at - MAX_PAST <= moment <= received_at + MAX_FUTURE:
        return moment
    return received_at


def _flag(value: bool | None) -> int:
    """A boolean as the 0/1 of a UInt8 column (None is 0)."""
    return 1 if value else 0


def pageview_row(pv: PageView, *, event_id: str, project_id: str, session_id: str,
                 received_at: float, ip: str) -> dict:
    """The page_view_event row of a pageview, without geo and browser columns.

    ``ip`` must already be anonymised.
    """
    return {"project_id": project_id, "session_id": session_id, "ip": ip,
            **pageview_columns(pv, event_id=event_id, received_at=received_at)}


def pageview_columns(pv: PageView, *, event_id: str, received_at: float) -> dict:
    """The columns of a pageview's row that come from the pageview itself.

    The referrer hostname is the client's when it sent one, else parsed from
    the referrer; UTM parameters and click ids come from the page URL.
    """
    parsed_host, referrer_path = enrich.referrer_parts(pv.referrer)
    row = {
        "id": event_id,
        "timestamp": event_time(pv.timestamp, received_at),
        "received_at": received_at,
        "url": pv.url,
        "title": pv.title or "",
        "referrer": pv.referrer or "",
        "referrer_hostname": pv.referrer_hostname or parsed_host,
        "referrer_path": referrer_path,
        "referrer_type": pv.referrer_type or "",
        "user_agent": pv.user_agent or "",
        "language": pv.language or "",
        "timezone": pv.timezone or "",
        "screen_width": pv.screen_width or 0,
        "screen_height": pv.screen_height or 0,
        "viewport_width": pv.viewport_width or 0,
        "viewport_height": pv.viewport_height or 0,
        "is_new_visitor": _flag(pv.is_new_visitor),
        "landing_page": pv.landing_page or "",
    }
    row.update(enrich.url_fields(pv.url))
    return row


def event_row(ev: Event, *, event_id: str, project_id: str, session_id: str,
              received_at: float, is_bot: bool = False) -> dict:
    """The tracked_event row of a custom event (``is_bot``: its socket is a bot's, bot_policy mark).

    event_definition_id is the tracking id, metadata is stored as compact JSON
    with sorted keys, and trigger_method is metadata's ``triggerMethod`` when
    that is a string.
    """
    trigger = ev.metadata.get("triggerMethod")
    return {
        "id": event_id,
        "project_id": project_id,
        "session_id": session_id,
        "timestamp": event_time(ev.timestamp, received_at),
        "received_at": received_at,
        "tracking_id": ev.tracking_id,
        "event_type": ev.event_type,
        "event_definition_id": ev.tracking_id,
        "metadata": json.dumps(ev.metadata, separators=(",", ":"), sort_keys=True,
                               ensure_ascii=False),
        "trigger_method": trigger if isinstance(trigger, str) else "",
        "is_bot": int(is_bot),
    }
