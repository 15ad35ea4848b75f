"""What every ``bklit`` command shares: its errors, its output, its Redis connection.

A command is ``async def command(args, config)``: it prints its result on
stdout (text, or JSON with ``--json``), details for people on stderr
(``say``), and raises ``UsageProblem`` (exit 2) for a bad argument or
``Failed`` (exit 1) when it cannot do its job.  ``run`` turns an error reply
from Redis into ``Failed``.  Also shared: ``from_stdin`` (a key kept out of
argv), ``gather``, ``first_line`` and ``utc``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Awaitable, Callable

from twisted.internet import defer

from bklit.config import Config


class Failed(Exception):
    """The command could not do its job (exit 1); the message says why."""


class UsageProblem(Exception):
    """A bad argument value (exit 2)."""


def say(*parts: object) -> None:
    """Details for people: on stderr, so stdout stays parseable."""
    print(*parts, file=sys.stderr)


async def run(command: Callable[[argparse.Namespace, Config], Awaitable[None]], args: argparse.Namespace,
              config: Config) -> None:
    """Run ``command``; an error reply from Redis fails it in one line."""
    import txredisapi

    try:
        await command(args, config)
    except txredisapi.ResponseError as e:
        raise Failed(f"Redis refused a command: {e}") from None


async def redis_call(config: Config) -> Any:
    """A ``call(command, *args)`` bound to a fresh Redis connection."""
    return (await redis_connection(config)).execute_command


async def redis_connection(config: Config) -> Any:
    """A fresh txredisapi connection (``execute_command``, ``eval``), closed at exit.

    The connection does not retry: when Redis cannot be reached the command
    fails at once (within ``redis_timeout``) instead of waiting for it.  A
    ``redis+sentinel://`` URL connects to the primary the Sentinels name.
    """
    from twisted.internet import reactor

    from bklit.redis_client import connect_once

    address = config.redis_address
    try:
        connection = await connect_once(address, config.redis_timeout)
    except Exception as e:
        where = f"the primary of {address.service!r}" if address.sentinels else f"Redis at {address.host}:{address.port}"
        raise Failed(f"cannot reach {where}: {e}") from None
    reactor.addSystemEventTrigger("before", "shutdown", connection.disconnect)
    return connection


class Connection:
    """The command's Redis connection; a lost connection becomes ``Failed``.

    Redis's own error replies pass through, for callers that expect some.
    """

    def __init__(self, connection: Any):
        self.connection = connection

    def call(self, command: str, *args: Any) -> defer.Deferred:
        """Run one command; fires with the reply."""
        return self.connection.execute_command(command, *args).addErrback(self._lost)

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred:
        """Run a Lua script (as ``StreamProducer`` expects of its ``redis``)."""
        return self.connection.eval(script, keys, args).addErrback(self._lost)

    @staticmethod
    def _lost(failure: Any) -> None:
        import txredisapi

        if failure.check(txredisapi.ResponseError, Failed):
            failure.raiseException()
        raise Failed(f"Redis: {failure.type.__name__}: {failure.getErrorMessage()}")


async def connect(config: Config) -> Connection:
    """A ``Connection`` to the configured server (``Failed`` when unreachable)."""
    return Connection(await redis_connection(config))

def from_stdin(value: str | None) -> str | None:
    """``value``, or the first line of standard input when it is ``-`` (keeps a key out of argv)."""
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise UsageProblem("expected the key on standard input")
    return line


async def gather(waiting: list[defer.Deferred]) -> list:
    """The results of Deferreds already running, in order; the first failure raises."""
    outcomes = await defer.DeferredList(waiting, consumeErrors=True)
    for ok, value in outcomes:
        if not ok:
            value.raiseException()
    return [value for _, value in outcomes]


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (server errors carry stack traces)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def utc(epoch_seconds: float) -> str:
    """``2024-11-26 08:00:00`` (UTC) for listings."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch_seconds))
