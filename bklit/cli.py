"""The ``bklit`` admin command: parse the command line, read the settings, run one command.

The commands are ``bklit.commands``' (``token create|list|revoke``, ``queue
status|retry-dead``, ``sessions list|end``, ``stats``, ``schema migrate``,
``probe``, ``demo``, ``config check``); the command line is
``bklit.arguments``'.  Settings (``--redis``, ``--clickhouse``,
``--config``) are read like the daemon's: defaults < ini file < ``BKLIT_*``
environment < flags.  Exit codes: 0 done, 1 failed, 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from bklit.arguments import parser
from bklit.command import Failed, UsageProblem, run as run_command, say
from bklit.commands import queue, server, sessions, stats, tokens
from bklit.config import Config, ConfigError, load_config

COMMANDS = {
    ("probe", None): server.probe_server,
    ("demo", None): server.play_demo,
    ("token", "create"): tokens.token_create,
    ("token", "list"): tokens.token_list,
    ("token", "revoke"): tokens.token_revoke,
    ("schema", "migrate"): server.schema_migrate,
    ("queue", "status"): queue.queue_status,
    ("queue", "retry-dead"): queue.queue_retry_dead,
    ("sessions", "list"): sessions.sessions_list,
    ("sessions", "end"): sessions.sessions_end,
    ("stats", None): stats.stats,
}


def settings(args: argparse.Namespace) -> Config:
    """The configuration these arguments select."""
    ini = getattr(args, "config", None) or os.environ.get("BKLIT_CONFIG")
    flags = {"redis": getattr(args, "redis", None), "clickhouse": getattr(args, "clickhouse", None)}
    return load_config(ini, os.environ, flags)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``bklit`` command; returns the exit code."""
    args = parser().parse_args(argv)
    if args.group == "config":
        return server.config_check(args)
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
