"""The daemon's Redis connections, made with txredisapi.

``RedisService`` owns one lazy, reconnecting connection for commands (the
stream producer, token lookups and the writer all pipeline onto it: txredisapi
writes each command as it is called).  ``call`` never waits for a connection
that is not there: when Redis is down it fails at once with
``RedisUnavailable``, and a reply that does not come within the configured
timeout fails the same way, so callers can refuse work instead of piling it up.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from bklit import compat
from bklit.config import RedisAddress


RECONNECT_MAX_DELAY = 2.0


class RedisUnavailable(Exception):
    """Redis is not connected, did not answer in time, or refused a command."""


def endpoint(address: RedisAddress, timeout: float) -> Any:
    """A client endpoint for ``address``, with verified TLS for ``rediss://``."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    plain = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    return wrapClientTLS(optionsForClientTLS(address.host), plain) if address.tls else plain


def connect(address: RedisAddress, timeout: float) -> Any:
    """A lazy txredisapi connection to ``address``.

    Returns the handler at once and (re)connects in the background.
    ``rediss://`` verifies the server certificate against the system trust
    store and the host name.
    """
    tls = optionsForClientTLS(address.host) if address.tls else False
    connection = txredisapi.lazyConnection(
        host=address.host,
        port=address.port,
        dbid=address.db,
        password=address.password,
        reconnect=True,
        ssl_context_factory=tls,
        connectTimeout=timeout,
        replyTimeout=timeout,
        convertNumbers=False,
    )
    # txredisapi waits up to 10 s between attempts: long for events waiting in the spool
    compat.set_reconnect_delay(connection, RECONNECT_MAX_DELAY)
    return connection


class RedisService(Service):
    """One Redis connection for the process, opened on start, closed on stop."""

    log = Logger()

    def __init__(self, address: RedisAddress, timeout: float):
        self.address = address
        self.timeout = timeout
        self.connection: Any = None

    def startService(self) -> None:
        super().startService()
        self.connection = connect(self.address, self.timeout)
        self.log.info("connecting to Redis at {address!r}", address=self.address)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        connection, self.connection = self.connection, None
        if connection is None:
            return defer.succeed(None)
        return defer.maybeDeferred(connection.disconnect).addErrback(lambda _: None)

    @property
    def connected(self) -> bool:
        """Whether a live connection to Redis is open right now."""
        return self.connection is not None and compat.redis_connected(self.connection)

    def ready(self) -> defer.Deferred:
        """Fires once the first connection is made (for start-up ordering)."""
        return compat.first_connection(self.connection)

    def call(self, command: str, *args: Any) -> defer.Deferred:
        """Run one Redis command; fails with ``RedisUnavailable`` when down.

        The reply comes back as txredisapi parses it (bytes decoded as UTF-8,
        numbers not converted).
        """
        if not self.connected:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        d = self.connection.execute_command(command, *args)
        return d.addErrback(_unavailable)

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred:
        """Run a Lua script (by SHA once Redis knows it)."""
        if not self.connected:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        return self.connection.eval(script, keys, args).addErrback(_unavailable)


def _unavailable(failure: Any) -> None:
    """Turn connection loss and timeouts into ``RedisUnavailable``.

    Redis's own error replies (``ResponseError``) pass through unchanged.
    """
    if failure.check(RedisUnavailable, txredisapi.ResponseError):
        failure.raiseException()
    raise RedisUnavailable(f"{failure.type.__name__}: {failure.getErrorMessage()}")
