"""Lines for journald: each starts with its syslog priority.

Under systemd, standard output is the journal (``JOURNAL_STREAM`` names
it); a line that starts with ``<N>``, ``<4>`` for a warning, has journald
read and strip the priority, so ``journalctl -p warning`` works.  Each line
of a traceback carries it too.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.logger import LogLevel

#: syslog priorities (RFC 5424) of twisted.logger's levels.
PRIORITIES = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}


def is_journal(out: IO[str], environ: Any = None) -> bool:
    """Whether ``out`` is a stream to journald: ``JOURNAL_STREAM`` is its ``device:inode``."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(out.fileno())
    except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO)
        return False
    return bool(stream) and stream == f"{info.st_dev}:{info.st_ino}"


def prefixed(text: str, level: Any) -> str:
    """``text`` with each of its lines started by ``level``'s ``<N>`` (info when unknown)."""
    prefix = f"<{PRIORITIES.get(level, 6)}>"
    return "".join(prefix + line for line in text.splitlines(keepends=True))
