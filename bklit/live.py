"""Messages for dashboards: built once by the node that accepted the event.

Each is serialized here exactly once, published to Redis as it is, and sent
unchanged to every dashboard of the project on every node.  Pageview data
uses the SDK's field names, enriched; it never carries the client address.
"""

from __future__ import annotations

import json

from bklit.wire import iso_timestamp

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def pageview_parts(row: dict, now: float) -> tuple[str, str]:
    """The pageview broadcast of a whole row, split around its ``isNewSession`` value.

    Whether a pageview starts its session is decided in Redis; the message is
    ``head + "true"|"false" + tail``.  (The SDK endpoint joins the same
    fields, encoded in parts: ``bklit.entries``.)
    """
    data = {**pageview_fields(row), **place_fields(row), **agent_fields(row)}
    head = '{"type":"pageview","data":' + _dumps(data)[:-1] + ',"isNewSession":'
    tail = '},"timestamp":' + _dumps(iso_timestamp(now)) + "}"
    return head, tail


def pageview_fields(row: dict) -> dict:
    """The broadcast fields of a pageview's own columns (SDK names)."""
    return {
        "eventId": row["id"],
        "url": row["url"],
        "title": row.get("title", ""),
        "timestamp": iso_timestamp(row["timestamp"]),
        "referrer": row.get("referrer") or None,
        "referrerHostname": row.get("referrer_hostname") or None,
        "referrerPath": row.get("referrer_path") or None,
        "referrerType": row.get("referrer_type") or None,
        "utmSource": row.get("utm_source", ""),
        "utmMedium": row.get("utm_medium", ""),
        "utmCampaign": row.get("utm_campaign", ""),
        "userAgent": row.get("user_agent", ""),
        "viewport": {"width": row.get("viewport_width", 0), "height": row.get("viewport_height", 0)},
        "screen": {"width": row.get("screen_width", 0), "height": row.get("screen_height", 0)},
        "language": row.get("language", ""),
        "timezone": row.get("timezone", ""),
        "isBot": bool(row.get("is_bot")),
        "isNewVisitor": bool(row.get("is_new_visitor")),
        "landingPage": row.get("landing_page", ""),
    }


def place_fields(row: dict) -> dict:
    """The broadcast fields of a row's project, session and place columns."""
    located = bool(row.get("lat") or row.get("lon"))
    return {
        "projectId": row["project_id"],
        "sessionId": row["session_id"],
        "country": row.get("country", ""),
        "countryCode": row.get("country_code", ""),
        "city": row.get("city", ""),
        "region": row.get("region", ""),
        "regionName": row.get("region_name", ""),
        "lat": row.get("lat") if located else None,
        "lon": row.get("lon") if located else None,
    }


def agent_fields(row: dict) -> dict:
    """The broadcast fields of a row's browser, OS and device columns."""
    return {
        "browser": row.get("browser", ""),
        "os": row.get("os", ""),
        "deviceType": row.get("device_type", ""),
        "mobile": bool(row.get("mobile")),
    }


def event_message(row: dict, now: float) -> str:
    """The broadcast of a custom event."""
    return _dumps({"type": "event", "data": {
        "eventId": row["id"],
        "projectId": row["project_id"],
        "sessionId": row["session_id"],
        "trackingId": row["tracking_id"],
        "eventType": row["event_type"],
        "metadata": json.loads(row.get("metadata") or "{}"),
        "timestamp": iso_timestamp(row["timestamp"]),
    }, "timestamp": iso_timestamp(now)})


def session_end_message(session_id: str, reason: str, now: float) -> str:
    """The broadcast of a session's end (``disconnect`` or ``timeout``)."""
    return _dumps({"type": "session_end", "data": {"sessionId": session_id, "reason": reason},
                   "timestamp": iso_timestamp(now)})


def snapshot_message(live: int, sessions: list[dict], now: float) -> bytes:
    """What a dashboard gets right after authorization."""
    return _dumps({"type": "snapshot", "data": {"live": live, "sessions": sessions},
                   "timestamp": iso_timestamp(now)}).encode("utf-8")
