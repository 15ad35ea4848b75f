"""Logs as JSON, one object per line: ``twistd --logger bklit.logs.json_observer``.

Each line has ``time`` (ISO 8601 UTC), ``level``, ``namespace``, ``message``
(the formatted text) and the event's own fields (those a format names and
any other plain value), so log pipelines can filter on ``count`` or
``subject`` without parsing prose.  Failures add ``traceback``.  The daemon
never logs API keys or client addresses, so neither can appear here.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

PLAIN = (str, int, float, bool, type(None))


def event_as_json(event: dict) -> str:
    """One log event as a JSON line (without the newline)."""
    moment = datetime.fromtimestamp(event.get("log_time") or time.time(), timezone.utc)
    record: dict[str, Any] = {
        "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and isinstance(value, PLAIN):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str)


def json_file_observer(out: IO[str]) -> Any:
    """An observer writing JSON lines to ``out``."""

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        out.write(event_as_json(event) + "\n")
        out.flush()

    return observe


def json_observer() -> Any:
    """The observer factory ``twistd --logger`` takes: JSON lines on stdout."""
    return json_file_observer(sys.stdout)
