"""The daemon's log lines: their least level, journald priorities, and JSON.

``log_level`` drops lines less severe than it.  Under systemd, or with
``log_journal = true``, every line starts with its syslog priority
(``bklit.journal``).  The text is twistd's own
(``time [namespace#level] message``).  ``makeService`` picks the observer:
this one on standard output (``twistd --nodaemon`` without ``--logfile``),
or ``json_observer`` when twistd is run with ``--logger
bklit.logs.json_observer``; a ``--logfile`` or ``--syslog`` is left to twistd.

JSON lines have ``time`` (ISO 8601 UTC), ``level``, ``namespace``,
``message`` (the formatted text) and the event's own fields (those a format
names and any other plain value), so log pipelines can filter on ``count``
or ``subject`` without parsing prose.  Failures add ``traceback``.  The
daemon never logs API keys or client addresses, so neither can appear here.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, PredicateResult,
                            formatEvent, formatEventAsClassicLogText)
from zope.interface import provider

from bklit.journal import PRIORITIES, is_journal, prefixed

PLAIN = (str, int, float, bool, type(None))

ORDER = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]


class Choice:
    """What ``configure`` chose: the least level, and whether to write priorities (``auto``: for journald)."""

    level = LogLevel.info
    journal = "auto"


def configure(level: str, journal: str) -> None:
    """Take ``log_level`` and ``log_journal``; the observers made from now on follow them."""
    Choice.level = LogLevel.levelWithName(level)
    Choice.journal = journal


def with_priorities(out: IO[str]) -> bool:
    """Whether lines written to ``out`` start with their priority, as ``log_journal`` says."""
    return Choice.journal == "true" or (Choice.journal == "auto" and is_journal(out))


def least(level: Any) -> Callable[[dict], Any]:
    """A predicate passing events of ``level`` or worse (and those of no known level)."""
    rank = ORDER.index(level)

    def predicate(event: dict) -> Any:
        event_level = event.get("log_level")
        if event_level in PRIORITIES and ORDER.index(event_level) < rank:
            return PredicateResult.no
        return PredicateResult.maybe

    return predicate


def filtered(observer: Any) -> Any:
    """``observer`` without the events below the chosen level."""
    return FilteringLogObserver(observer, [least(Choice.level)])


def text_file_observer(out: IO[str], priorities: bool) -> Any:
    """twistd's text lines on ``out``, each started by its priority when ``priorities``."""

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        text = formatEventAsClassicLogText(event)
        if text is None:
            return
        out.write(prefixed(text, event.get("log_level")) if priorities else text)
        out.flush()

    return observe


def stdout_observer() -> Any:
    """Text lines on standard output, as configured."""
    return filtered(text_file_observer(sys.stdout, with_priorities(sys.stdout)))


def twistd_observer(options: Any) -> Any:
    """The observer for twistd's ``options`` (its ServerOptions), or None to leave it to twistd.

    Only the log twistd would write to standard output is taken over:
    ``--logger`` (``json_observer`` follows the choice itself), ``--syslog``
    and ``--logfile`` keep twistd's own.
    """
    if options is None or options.get("logger") or options.get("syslog"):
        return None
    logfile = options.get("logfile") or ""
    if logfile == "-" or (not logfile and options.get("nodaemon")):
        return stdout_observer()
    return None


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


def json_file_observer(out: IO[str], priorities: bool = False) -> Any:
    """An observer writing JSON lines to ``out`` (each after its priority when ``priorities``)."""

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        line = event_as_json(event) + "\n"
        out.write(prefixed(line, event.get("log_level")) if priorities else line)
        out.flush()

    return observe


def json_observer() -> Any:
    """The observer factory ``twistd --logger`` takes: JSON lines on stdout, as configured."""
    return filtered(json_file_observer(sys.stdout, with_priorities(sys.stdout)))
