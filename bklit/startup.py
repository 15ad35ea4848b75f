"""What the daemon checks and sets up before its service tree runs.

A setting that is wrong exits ``EXIT_CONFIG`` (78) with one line per bad
key; a port that cannot be bound ``EXIT_LISTEN`` (75) with one log line
(``listen_reason``).  ``checked_config`` and ``check_files`` are what
``twistd bklit`` and ``bklit config check`` both run: the endpoint strings
parsed, the TLS pair loaded, the GeoIP database opened once.
"""

from __future__ import annotations

import errno
import gc
from typing import Any

from twisted.internet.error import CannotListenError

from bklit.config import ConfigError, load_config
from bklit.geo import load_city_db
from bklit.spool import Spool
from bklit.tls import LoadedPair, load_pair

#: Exit statuses (sysexits.h): a setting is wrong (the units do not restart
#: on it), or a port cannot be bound (busy: they try again).
EXIT_CONFIG = 78
EXIT_LISTEN = 75


def open_spool(config: Any) -> Spool:
    """The ingest node's spool, locked and checked (``SpoolError`` otherwise)."""
    from twisted.internet import reactor

    spool = Spool(config.spool_dir, config.spool_max_bytes, reactor)
    spool.open()
    return spool


def checked_config(ini: str | None, environ: Any, flags: dict) -> Any:
    """``load_config``, and the endpoint strings it would listen on parsed (``ConfigError`` otherwise)."""
    config = load_config(ini, environ, flags)
    if config.runs_ingest:
        check_endpoint(config.listen)
    if config.status_endpoint:
        check_endpoint(config.status_endpoint, "status_listen")
    return config


def check_files(config: Any) -> LoadedPair | None:
    """Load the TLS pair (None without TLS) and open the GeoIP database once,
    for a one-line error (``TLSError``, ``GeoError``) at start; Ingest reads it again."""
    pair = load_pair(config.tls_cert, config.tls_key) if config.runs_ingest and config.tls else None
    if config.runs_ingest and config.geoip_db:
        load_city_db(config.geoip_db).close()
    return pair


def check_endpoint(description: str, key: str = "listen") -> None:
    """Raise ``ConfigError`` on ``key`` unless Twisted can parse ``description``.

    Parsing makes the endpoint without listening on it, so a typo is one
    config error line at start-up rather than a traceback from makeService.
    """
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except IndexError:  # systemd: no socket passed at that index
        raise ConfigError([(key, f"{description!r}: no socket was passed at that index")]) from None
    except Exception as e:
        raise ConfigError([(key, f"{description!r} is not a usable endpoint string: {e}")]) from None


def listen_reason(error: CannotListenError) -> str:
    """Why a port could not be bound, in a few words."""
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    if getattr(error.socketError, "errno", None) == errno.EADDRINUSE:
        reason += " (another process has it; processes sharing a port listen with reuseport:)"
    return reason


GC_THRESHOLDS = (50_000, 50, 1_000)


def tune_gc() -> None:
    """Collect cyclic garbage less often, and never look at what start-up made again.

    Per event the daemon makes short-lived objects that reference counting
    frees; the collector's default thresholds (700, 10, 10) still walk every
    tracked object of the process now and then, and with 10,000 sockets
    such a full collection held every ack for a noticeable time (at 1,500
    pageviews/s over 10,000 sockets, ack p50 203 ms and p99 2.2 s before,
    31 ms and 0.56 s after).  ``gc.freeze`` moves what exists at start
    (modules, parsers, the geo data) out of the collector's sight.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
