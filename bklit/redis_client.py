"""The daemon's Redis connections, made with txredisapi.

``RedisService`` owns one lazy, reconnecting connection for commands (the
stream producer, token lookups and the writer all pipeline onto it: txredisapi
writes each command as it is called).  With a ``redis+sentinel://`` address
the connection is txredisapi's Sentinel one: every reconnection asks the
Sentinels for the primary, so all of them follow a failover.  ``call`` never waits for a connection
that is not there: when Redis is down it fails at once with
``RedisUnavailable``, and a reply that does not come within the configured
timeout fails the same way, so callers can refuse work instead of piling it up.
"""

from __future__ import annotations

import weakref
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from bklit import compat
from bklit.addresses import RedisAddress


RECONNECT_MAX_DELAY = 2.0
# txredisapi waits this long for a Sentinel that names a primary in good
# state; it ignores the answers of Sentinels that know the primary is down,
# so the wait is what a failover costs on top of Sentinel's own time.
SENTINEL_DISCOVERY_TIMEOUT = 1.0
_SENTINELS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # handler -> its Sentinel manager


class RedisUnavailable(Exception):
    """Redis is not connected, did not answer in time, or refused a command."""


def endpoint(address: RedisAddress, timeout: float) -> Any:
    """A client endpoint for ``address``, with verified TLS for ``rediss://``."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    plain = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    return wrapClientTLS(optionsForClientTLS(address.host), plain) if address.tls else plain


def connect(address: RedisAddress, timeout: float) -> Any:
    """A lazy txredisapi connection to ``address``, as its user (ACL) if it names one.

    Returns the handler at once and (re)connects in the background.
    ``rediss://`` verifies the server certificate against the system trust
    store and the host name.  A Sentinel address connects to the primary
    the Sentinels name, asked again at every reconnection, so the handler
    follows a failover; close it with ``disconnect``.
    """
    if address.sentinels:
        return _sentinel_primary(address, timeout)
    tls = optionsForClientTLS(address.host) if address.tls else False
    connection = txredisapi.lazyConnection(
        host=address.host,
        port=address.port,
        dbid=address.db,
        password=address.password,
        username=address.username,
        reconnect=True,
        ssl_context_factory=tls,
        connectTimeout=timeout,
        replyTimeout=timeout,
        convertNumbers=False,
    )
    # txredisapi waits up to 10 s between attempts: long for events waiting in the spool
    compat.set_reconnect_delay(connection, RECONNECT_MAX_DELAY)
    return connection


def _sentinels(address: RedisAddress, timeout: float) -> Any:
    """txredisapi's Sentinel manager for the Sentinels of ``address``."""
    sentinel = txredisapi.Sentinel(list(address.sentinels), connectTimeout=timeout, replyTimeout=timeout)
    sentinel.discovery_timeout = min(timeout, SENTINEL_DISCOVERY_TIMEOUT)
    for connection in sentinel.sentinels:
        compat.set_reconnect_delay(connection, RECONNECT_MAX_DELAY)
    return sentinel


def _sentinel_primary(address: RedisAddress, timeout: float, dbid: int | None = -1, **factory: Any) -> Any:
    """A lazy handler on the primary of the address's service (a connection to a replica is dropped)."""
    sentinel = _sentinels(address, timeout)
    handler = sentinel.master_for(
        address.service, dbid=address.db if dbid == -1 else dbid, password=address.password,
        username=address.username, replyTimeout=timeout, convertNumbers=False, **factory)
    compat.set_reconnect_delay(handler, RECONNECT_MAX_DELAY)
    _SENTINELS[handler] = sentinel
    return handler


def disconnect(connection: Any) -> defer.Deferred:
    """Close a handler made here (and the Sentinel connections behind it)."""
    sentinel = _SENTINELS.pop(connection, None)
    closing = [defer.maybeDeferred(connection.disconnect)]
    if sentinel is not None:
        closing.append(defer.maybeDeferred(sentinel.disconnect))
    return defer.gatherResults(closing, consumeErrors=True).addErrback(lambda _: None)


def primary(connection: Any) -> str:
    """``host:port`` of the server a handler is connected to now ("" while it is not)."""
    for conn in compat.redis_protocols(connection):
        if conn.connected:
            peer = conn.transport.getPeer()
            return f"[{peer.host}]:{peer.port}" if ":" in peer.host else f"{peer.host}:{peer.port}"
    return ""


async def connect_once(address: RedisAddress, timeout: float) -> Any:
    """A connected handler that does not reconnect (for one command line run).

    With Sentinels, the primary they name now; Redis not answering fails
    within ``timeout``.
    """
    host, port = address.host, address.port
    if address.sentinels:
        sentinel = _sentinels(address, timeout)
        sentinel.discovery_timeout = timeout
        try:
            host, port = await sentinel.discover_master(address.service)
        finally:
            await sentinel.disconnect()
    return await txredisapi.Connection(
        host=host, port=port, dbid=address.db, password=address.password, username=address.username,
        reconnect=False, ssl_context_factory=optionsForClientTLS(host) if address.tls else False,
        connectTimeout=timeout, replyTimeout=timeout, convertNumbers=False)


class PrimaryOnly:
    """A protocol mixin: drop a connection that reached a replica (Sentinel's answer was old).

    txredisapi's own ``SentinelRedisProtocol`` does this for commands; this
    does it for another protocol (pub/sub), whose own ``connectionMade``
    runs once the server said it is the primary.
    """

    def connectionMade(self) -> Any:
        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(self._role_checked)

    def _role_checked(self, role: Any) -> Any:
        if not role or role[0] != "master":
            self.transport.loseConnection()
            return None
        return super().connectionMade()


class _SentinelSubscriberFactory(txredisapi.SentinelConnectionFactory):
    """txredisapi's Sentinel factory with another protocol and attributes for it."""

    def __init__(self, *args: Any, protocol: Any, attributes: dict, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.protocol = type(f"Primary{protocol.__name__}", (PrimaryOnly, protocol), {})
        vars(self).update(attributes)


def subscriber(address: RedisAddress, protocol: Any, timeout: float, **attributes: Any) -> Any:
    """A reconnecting pub/sub connection of ``protocol`` (a ``SubscriberProtocol``).

    ``attributes`` are set on its factory (the protocol reads them as
    ``self.factory.<name>``).  With Sentinels it connects to the primary
    and follows a failover.  Returns a handler for ``disconnect``.
    """
    if address.sentinels:
        return _sentinel_primary(address, timeout, dbid=None, factory_class=_SentinelSubscriberFactory,
                                 protocol=protocol, attributes=attributes)
    factory = txredisapi.SubscriberFactory()
    factory.protocol = protocol
    factory.password = address.password
    factory.username = address.username
    factory.reconnect = True
    factory.maxDelay = RECONNECT_MAX_DELAY
    vars(factory).update(attributes)
    factory.startConnecting(endpoint(address, timeout))
    return factory.handler


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
        return disconnect(connection)

    @property
    def primary(self) -> str:
        """``host:port`` of the Redis primary in use ("" while not connected)."""
        return primary(self.connection) if self.connection is not None else ""

    @property
    def link(self) -> Any:
        """The connection in use now, a new object after each reconnect (None while not connected)."""
        if self.connection is None:
            return None
        return next((conn for conn in compat.redis_protocols(self.connection) if conn.connected), None)

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
