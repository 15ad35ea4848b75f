"""``bklit schema migrate``, ``probe``, ``demo`` and ``config check``: the server and its settings."""

from __future__ import annotations

import argparse
import json
import os

from bklit.arguments import PROJECT
from bklit.command import Failed, UsageProblem, from_stdin, say
from bklit.config import Config, ConfigError


async def schema_migrate(args: argparse.Namespace, config: Config) -> None:
    import logging

    from bklit.clickhouse import thd_migrate_with, using_pool
    from bklit.clickhouse_urls import server_url

    # clickhouse-driver logs every failed connection attempt with a
    # traceback; the failure is reported once, below.
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)
    try:
        applied = await using_pool(server_url(config.clickhouse), thd_migrate_with,
                                   config.clickhouse_database, config.clickhouse_cluster)
    except Exception as e:
        raise Failed(f"migration failed: {type(e).__name__}: {e}") from None
    if args.json:
        print(json.dumps({"database": config.clickhouse_database, "applied": applied}))
    elif applied:
        say(f"{config.clickhouse_database}: applied migrations {', '.join(map(str, applied))}")
    else:
        say(f"{config.clickhouse_database}: schema is up to date")


async def probe_server(args: argparse.Namespace, config: Config) -> None:
    from twisted.internet import reactor

    from bklit import probe

    key = from_stdin(args.key) or os.environ.get("BKLIT_PROBE_KEY")
    if not key:
        raise UsageProblem("--key (or BKLIT_PROBE_KEY) is required")
    if not PROJECT.fullmatch(args.project):
        raise UsageProblem(f"--project: invalid project id {args.project!r}")
    ca = None
    if args.ca:
        try:
            with open(args.ca, "rb") as handle:
                ca = probe.load_ca(handle.read())
        except OSError as e:
            raise UsageProblem(f"--ca: cannot read {args.ca}: {e.strerror}") from None
        except ValueError as e:
            raise UsageProblem(f"--ca: {args.ca}: {e}") from None
    try:
        report = await probe.probe(reactor, args.url, args.project, key, ca, args.timeout,
                                   args.page_url or probe.PROBE_URL)
    except ValueError as e:
        raise UsageProblem(str(e)) from None
    except probe.ProbeFailed as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        raise Failed(f"probe failed: {e}") from None
    print(json.dumps({"ok": True, **report.as_dict()}) if args.json else probe.render(report))


async def play_demo(args: argparse.Namespace, config: Config) -> None:
    from twisted.internet import reactor

    from bklit import demo

    await demo.run(args, reactor, from_stdin(args.key))


def config_check(args: argparse.Namespace) -> int:
    """``bklit config check``: 0 with the settings in effect on stdout, 1 with the errors on stderr."""
    from bklit.config import unknown_variables
    from bklit.geo import GeoError
    from bklit.startup import check_files, checked_config
    from bklit.tls import TLSError

    ini = args.config or os.environ.get("BKLIT_CONFIG")
    flags = {name: getattr(args, name) for name in ("listen", "redis", "clickhouse", "role")}
    try:
        config = checked_config(ini, os.environ, flags)
        check_files(config)
    except (ConfigError, TLSError, GeoError) as e:
        key = "tls_cert" if isinstance(e, TLSError) else "geoip_db" if isinstance(e, GeoError) else ""
        for line in str(e).splitlines():
            say(f"bklit: config error: {key + ': ' if key else ''}{line}")
        return 1
    for name in unknown_variables(os.environ):
        say(f"bklit: warning: {name} is not a bklit setting; ignored")
    print("[bklit]")
    for name, value in config.as_text().items():
        print(f"{name} = {value}".rstrip())
    return 0
