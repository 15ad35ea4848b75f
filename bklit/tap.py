"""``twistd bklit``: command-line options and the service tree's maker.

``Options.postOptions`` builds the frozen ``Config`` (so a bad value stops
twistd before the reactor runs, with one line per bad key, exit status
``EXIT_CONFIG``), checks the TLS pair and the GeoIP database and opens the
spool (``bklit.startup``); ``makeService`` builds the service tree
(``bklit.service.BklitService``) with twistd's log observer.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from bklit import logs
from bklit.config import ConfigError, unknown_variables
from bklit.geo import GeoError
from bklit.service import BklitService
from bklit.spool import SpoolError
from bklit.startup import EXIT_CONFIG, check_files, checked_config, open_spool
from bklit.tls import TLSError


class Options(usage.Options):
    """Flags of ``twistd bklit``; every other setting comes from the ini file or env."""

    optParameters = [
        ["config", "c", None, "Path of the ini file (section [bklit]); env BKLIT_CONFIG."],
        ["listen", None, None, "Twisted endpoint string to listen on (default tcp:8080)."],
        ["redis", None, None, "Redis URL, redis://[user:password@]host:port/db (rediss:// for TLS,"
                              " redis+sentinel://host:port[,host:port...]/SERVICE[/db] under Sentinel)."],
        ["clickhouse", None, None, "ClickHouse URL, clickhouse://user:password@host:port[,host:port...]/database."],
        ["role", None, None, "all, ingest or writer (default all)."],
    ]

    def postOptions(self) -> None:
        """Build the configuration; exit with one line per bad key."""
        ini = self["config"] or os.environ.get("BKLIT_CONFIG")
        flags = {name: self[name] for name in ("listen", "redis", "clickhouse", "role")}
        try:
            self.config = checked_config(ini, os.environ, flags)
        except ConfigError as e:
            for line in str(e).splitlines():
                print(f"bklit: config error: {line}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG)
        self.unknown_variables = unknown_variables(os.environ)
        try:
            self.tls_pair = check_files(self.config)
        except TLSError as e:  # not EXIT_CONFIG: a renewed pair or file may come
            raise SystemExit(f"bklit: TLS error: {e}")
        except GeoError as e:
            raise SystemExit(f"bklit: GeoIP database error: {e}")
        self.spool = None
        if self.config.runs_ingest and self.config.spool_dir:
            try:
                self.spool = open_spool(self.config)
            except SpoolError as e:
                raise SystemExit(f"bklit: spool error: {e}")


def makeService(options: Options, reactor: Any = None) -> BklitService:
    """The service tree for ``twistd bklit``."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    logs.configure(options.config.log_level, options.config.log_journal)
    service = BklitService(options.config, reactor, options.tls_pair, options.spool)
    service.log_observer = logs.twistd_observer(options.parent)
    service.tune_gc = True
    for name in getattr(options, "unknown_variables", ()):  # logged once logging began
        service.log.warn("{name} is not a bklit setting; ignored", name=name)
    return service
