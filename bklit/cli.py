"""The ``bklit`` admin command.

``bklit token create|list|revoke`` manages API keys; ``bklit schema
migrate`` creates or upgrades the ClickHouse schema; ``bklit probe`` checks a
running server.  The operating commands (``queue status|retry-dead``,
``sessions list|end``, ``stats``) live in ``bklit.admin``, and what
every command shares (errors, output, Redis) in ``bklit.command``; ``bklit
config check`` validates the daemon's settings (exit 1 when they are bad).  Settings (``--redis``,
``--clickhouse``, ``--config``) are read like the daemon's: defaults < ini
file < ``BKLIT_*`` environment < flags.  Exit codes: 0 done, 1 failed,
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Sequence

from bklit import __version__, admin
from bklit.command import Failed, UsageProblem, redis_call, run as run_command, say
from bklit.config import Config, ConfigError, load_config
from bklit.tokens import SCOPES, TokenStore

PROJECT = re.compile(r"[A-Za-z0-9_-]{1,64}")
DOMAIN = re.compile(r"(\*\.)?([a-z0-9-]+\.)*[a-z0-9-]+")
MAX_EXPIRES_DAYS = 36500
SPAN = re.compile(r"([0-9]{1,7})([mhd])")
SPAN_SECONDS = {"m": 60, "h": 3600, "d": 86400}


def parser() -> argparse.ArgumentParser:
    """The command line of ``bklit``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="ini file (section [bklit]); env BKLIT_CONFIG")
    common.add_argument("--redis", help="Redis URL (default from config)")
    common.add_argument("--clickhouse", help="ClickHouse URL (default from config)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    top = argparse.ArgumentParser(prog="bklit", description="Administer a bklit deployment.")
    top.add_argument("--version", action="version", version=f"bklit {__version__}")
    groups = top.add_subparsers(dest="group", required=True, metavar="COMMAND")

    token = groups.add_parser("token", help="manage API keys").add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token.add_parser("create", parents=[common], help="make a new key; prints it alone on stdout")
    create.add_argument("--project", action="append", required=True, help="project id (repeat or comma-separate for several)")
    create.add_argument("--scope", choices=SCOPES, default="ingest", help="ingest (SDK) or read (dashboards); default ingest")
    create.add_argument("--name", default="", help="a label for listings")
    create.add_argument("--expires-days", type=float, help="days until the key stops working")
    create.add_argument("--domains", default="", help="comma-separated Origin hosts allowed, e.g. a.com,*.b.com")
    token.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    revoke = token.add_parser("revoke", parents=[common], help="revoke a key by its id or the key itself")
    revoke.add_argument("token", help="token id (from list, 6+ hex digits) or the key; - reads it from standard input"
                                      " (a key on the command line is visible to every user of the machine)")

    schema = groups.add_parser("schema", help="ClickHouse schema").add_subparsers(dest="action", required=True, metavar="ACTION")
    schema.add_parser("migrate", parents=[common], help="create or upgrade the database and tables")

    probe = groups.add_parser("probe", help="check a running server: TLS, connected, auth_success, ack",
                              description="Check a running server as an SDK would, with timings. "
                                          "Sends one real pageview (url --url) to the project.")
    probe.add_argument("url", help="ws:// or wss:// address of the server, e.g. wss://analytics.example.com:8080")
    probe.add_argument("--project", required=True, help="project id the key is valid for")
    probe.add_argument("--key", help="ingest key; - reads it from standard input (default: env BKLIT_PROBE_KEY)")
    probe.add_argument("--ca", metavar="FILE",
                       help="PEM file of the CA certificates to trust instead of the system's (every certificate "
                            "of the bundle: a private CA, or its root and intermediates)")
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds per step (default 10)")
    probe.add_argument("--url", dest="page_url", default=None, help="url of the probe pageview")
    probe.add_argument("--json", action="store_true", help="print JSON instead of text")

    queue = groups.add_parser("queue", help="the event stream and its dead letters").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    queue.add_parser("status", parents=[common], help="stream length, pending entries per writer, lag, dead letters",
                     description="Show the stream bklit:events: its length, what the writers' group has read but "
                                 "not stored yet (per consumer, and the oldest entry's age), its lag, and how many "
                                 "dead letters wait in bklit:events:dead.")
    retry = queue.add_parser("retry-dead", parents=[common], help="move dead letters back into the event stream",
                             description="Move the entries of bklit:events:dead back into bklit:events, oldest "
                                         "first, for the writers to store again (fix the cause first).")
    retry.add_argument("--limit", type=positive_int, help="move at most N entries (default: all)")
    retry.add_argument("--dry-run", action="store_true", help="list what would move, move nothing")

    sessions = groups.add_parser("sessions", help="live sessions").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    listing = sessions.add_parser("list", parents=[common], help="a project's live sessions, most recently active first")
    listing.add_argument("--project", type=project_id, required=True, help="project id")
    listing.add_argument("--limit", type=positive_int, default=100, help="show at most N sessions (default 100)")
    end = sessions.add_parser("end", parents=[common], help="end live sessions (stored and broadcast, reason admin)",
                              description="End a project's live sessions as a disconnect would: the end row is "
                                          "stored and dashboards get session_end with reason admin.")
    end.add_argument("--project", type=project_id, required=True, help="project id")
    end.add_argument("--session", help="end only this session (default: all live sessions of the project)")

    demo = groups.add_parser("demo", help="play simulated visitors against a running server, to fill /live",
                             description="Play simulated visitors against a running server through its SDK "
                                         "endpoint, as @bklit/sdk speaks to it: sessions of several pages "
                                         "(pushState and full page loads), referrers, campaigns, custom events, "
                                         "browsers and devices. They are stored like real traffic: use a "
                                         "project of their own.")
    demo.add_argument("--project", type=project_id, required=True, help="project id the key is valid for")
    demo.add_argument("--key", required=True, help="ingest key; - reads it from standard input")
    demo.add_argument("--url", default="ws://localhost:8080", help="the server (default ws://localhost:8080)")
    demo.add_argument("--visitors", type=positive_int, default=10, help="visitors at a time (default 10)")
    demo.add_argument("--minutes", type=positive_number, default=5.0, help="how long to play (default 5)")
    demo.add_argument("--seed", type=int, help="seed of the random choices, to play the same visits again")
    demo.add_argument("--json", action="store_true", help="print JSON instead of text")

    config = groups.add_parser("config", help="the daemon's settings").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    check = config.add_parser(
        "check", help="validate the settings; print those in effect, passwords hidden",
        description="Read the settings as twistd bklit would (defaults < ini file < BKLIT_* environment < "
                    "flags), check every value, the endpoint strings, the TLS pair and the GeoIP database, "
                    "and print the settings in effect with passwords replaced by ***. "
                    "Exit 0 when they are good, 1 when not (each error on a line of its own).")
    check.add_argument("--config", "-c", help="ini file (section [bklit]); env BKLIT_CONFIG")
    for flag in ("listen", "redis", "clickhouse", "role"):
        check.add_argument(f"--{flag}", help=f"as twistd bklit's --{flag}")

    stats = groups.add_parser("stats", parents=[common], help="pageviews, sessions, live count and top pages",
                              description="Counts of a project from ClickHouse (exact, duplicates removed) "
                                          "and its live sessions from Redis.")
    stats.add_argument("--project", type=project_id, required=True, help="project id")
    stats.add_argument("--since", type=span, default=span("24h"), help="period up to now: 30m, 24h, 7d (default 24h)")
    return top


def project_id(text: str) -> str:
    """A project id argument (argparse type)."""
    if not PROJECT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid project id {text!r} (1-64 of A-Z a-z 0-9 _ -)")
    return text


def positive_int(text: str) -> int:
    """A count of 1 or more (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, not {text!r}")
    return value


def positive_number(text: str) -> float:
    """A number above 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, not {text!r}")
    return value


def span(text: str) -> tuple[str, int]:
    """``30m``, ``24h``, ``7d`` -> ``(text, seconds)`` (argparse type)."""
    match = SPAN.fullmatch(text.strip())
    if not match or int(match[1]) == 0 or int(match[1]) * SPAN_SECONDS[match[2]] > MAX_EXPIRES_DAYS * 86400:
        raise argparse.ArgumentTypeError(f"expected minutes, hours or days like 30m, 24h or 7d, not {text!r}")
    return text.strip(), int(match[1]) * SPAN_SECONDS[match[2]]


def settings(args: argparse.Namespace) -> Config:
    """The configuration these arguments select."""
    ini = getattr(args, "config", None) or os.environ.get("BKLIT_CONFIG")
    flags = {"redis": getattr(args, "redis", None), "clickhouse": getattr(args, "clickhouse", None)}
    return load_config(ini, os.environ, flags)


def split_list(values: Sequence[str]) -> tuple[str, ...]:
    """``["a,b", "c"]`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


async def token_create(args: argparse.Namespace, config: Config) -> None:
    projects = split_list(args.project)
    bad = [p for p in projects if not PROJECT.fullmatch(p)]
    if bad or not projects:
        raise UsageProblem(f"--project: invalid project id {bad[0] if bad else ''!r} (1-64 of A-Z a-z 0-9 _ -)")
    domains = tuple(d.lower() for d in split_list([args.domains]))
    bad = [d for d in domains if not DOMAIN.fullmatch(d)]
    if bad:
        raise UsageProblem(f"--domains: {bad[0]!r} is not a host name or *.host pattern")
    if args.expires_days is not None and not 0 < args.expires_days <= MAX_EXPIRES_DAYS:
        raise UsageProblem(f"--expires-days: must be more than 0 and at most {MAX_EXPIRES_DAYS}")
    expires_at = time.time() + args.expires_days * 86400 if args.expires_days else 0
    store = TokenStore(await redis_call(config))
    key, token = await store.create(projects, args.scope, args.name, expires_at, domains)
    if args.json:
        print(json.dumps({"key": key, **token.as_dict()}))
        return
    print(key)
    say(f"created {token.scope} key {token.id} for {', '.join(projects)}"
        + (f", name {token.name!r}" if token.name else "")
        + (f", domains {', '.join(domains)}" if domains else "")
        + (f", expires {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires_at))}" if expires_at else ""))
    say("The key is shown only this once; store it now.")


async def token_list(args: argparse.Namespace, config: Config) -> None:
    tokens = await TokenStore(await redis_call(config)).list()
    if args.json:
        print(json.dumps([t.as_dict() for t in tokens]))
        return
    print(f"{'ID':12}  {'SCOPE':6}  {'STATE':8}  {'EXPIRES':10}  {'PROJECTS':20}  NAME")
    now = time.time()
    for t in tokens:
        state = "revoked" if t.revoked else "expired" if t.expired(now) else "active"
        expires = time.strftime("%Y-%m-%d", time.gmtime(t.expires_at)) if t.expires_at else "never"
        print(f"{t.id:12}  {t.scope:6}  {state:8}  {expires:10}  {','.join(t.projects):20}  {t.name}")


def from_stdin(value: str | None) -> str | None:
    """``value``, or the first line of standard input when it is ``-`` (keeps a key out of argv)."""
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise UsageProblem("expected the key on standard input")
    return line


async def token_revoke(args: argparse.Namespace, config: Config) -> None:
    args.token = from_stdin(args.token)
    store = TokenStore(await redis_call(config))
    found = await store.find(args.token)
    if not found:
        raise Failed(f"no token matches {args.token[:12]!r}" if not args.token.startswith("bk_") else "no token matches that key")
    if len(found) > 1:
        raise Failed(f"{len(found)} tokens match {args.token!r}; give more digits")
    await store.revoke(found[0])
    if args.json:
        print(json.dumps({"revoked": found[0].id}))
    else:
        say(f"revoked {found[0].id}")


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


COMMANDS = {
    ("probe", None): probe_server,
    ("demo", None): play_demo,
    ("token", "create"): token_create,
    ("token", "list"): token_list,
    ("token", "revoke"): token_revoke,
    ("schema", "migrate"): schema_migrate,
    ("queue", "status"): admin.queue_status,
    ("queue", "retry-dead"): admin.queue_retry_dead,
    ("sessions", "list"): admin.sessions_list,
    ("sessions", "end"): admin.sessions_end,
    ("stats", None): admin.stats,
}


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``bklit`` command; returns the exit code."""
    args = parser().parse_args(argv)
    if args.group == "config":
        return config_check(args)
    try:
        config = settings(args)
    except ConfigError as e:
        for line in str(e).splitlines():
            say(f"bklit: config error: {line}")
        return 2
    command = COMMANDS[(args.group, getattr(args, "action", None))]
    outcome: dict[str, int] = {}

    async def run(reactor: Any) -> None:
        try:
            await run_command(command, args, config)
            outcome["code"] = 0
        except UsageProblem as e:
            say(f"bklit: {e}")
            outcome["code"] = 2
        except Failed as e:
            say(f"bklit: {e}")
            outcome["code"] = 1

    from twisted.internet import defer, task

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return outcome.get("code", 1)


if __name__ == "__main__":
    sys.exit(main())
