"""The command line of ``bklit``: its commands, their arguments, and the argument types."""

from __future__ import annotations

import argparse
import re
from typing import Sequence

from bklit import __version__
from bklit.tokens import SCOPES

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


def split_list(values: Sequence[str]) -> tuple[str, ...]:
    """``["a,b", "c"]`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())
