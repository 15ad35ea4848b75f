"""Every use of a library's private parts, behind one door.

txredisapi, twisted.web, Twisted's endpoint service and Autobahn keep some
of what bklit needs in private attributes.  Each use is a function here,
and ``tests/test_compat.py`` checks each against the installed library, so
an upgrade that changes one fails there by name instead of somewhere in a
shutdown or a reconnect.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer


# txredisapi ------------------------------------------------------------------

def set_reconnect_delay(connection: Any, seconds: float) -> None:
    """Cap the wait between reconnection attempts of a lazy connection.

    txredisapi keeps its factory (a ``ReconnectingClientFactory``) private;
    its default cap is 10 s.
    """
    connection._factory.maxDelay = seconds


def redis_protocols(connection: Any) -> list:
    """The protocols (one per connection) of a txredisapi connection handler."""
    return connection._factory.pool


def redis_connected(connection: Any) -> bool:
    """Whether a txredisapi connection handler has a live connection now."""
    return any(conn.connected for conn in redis_protocols(connection))


def first_connection(connection: Any) -> defer.Deferred:
    """Fires once a lazy connection handler first connected."""
    return connection._connected


# twisted.web -----------------------------------------------------------------

def request_gone(request: Any) -> bool:
    """Whether the client of a ``twisted.web`` request went away (or it was answered)."""
    return bool(request._disconnected or request.finished)


# twisted.application ---------------------------------------------------------

def raise_bind_errors(service: Any) -> None:
    """Make a ``StreamServerEndpointService`` raise a failed bind from ``privilegedStartService``.

    As ``strports.service`` does; otherwise the failure is only logged and
    the daemon runs without its port.
    """
    service._raiseSynchronously = True


def listening_port(service: Any) -> defer.Deferred:
    """Fires with the ``IListeningPort`` of a started ``StreamServerEndpointService``."""
    return service._waitingForPort


# Autobahn ----------------------------------------------------------------------

def with_options(protocol: type, factory: Any) -> type:
    """A subclass of ``protocol`` holding ``factory``'s Autobahn options as class attributes.

    Autobahn copies every option (``CONFIG_ATTRS``) it finds missing on a
    new protocol instance into that instance, and pretty-prints the list
    for a debug line whatever the log level: about a millisecond per
    connection and some forty attributes more in each socket's
    ``__dict__``.  On this subclass none is missing, so nothing is copied
    or formatted.
    """
    options = {name: getattr(factory, name) for name in protocol.CONFIG_ATTRS}
    # A function option (perMessageCompressionAccept) must not become a method of the class.
    options = {name: staticmethod(value) if callable(value) else value for name, value in options.items()}
    return type(protocol.__name__, (protocol,), {**options, "CONFIG_ATTRS": (), "__doc__": protocol.__doc__})


def cancel_close_timeout(protocol: Any) -> None:
    """Cancel the closing-handshake timer Autobahn leaves running once the connection is gone.

    Autobahn cancels it only when the peer's close frame answers ours; a
    connection lost first (bklit closes without waiting for the answer)
    keeps it, and it fires seconds later on a dead protocol.
    """
    call, protocol.closeHandshakeTimeoutCall = getattr(protocol, "closeHandshakeTimeoutCall", None), None
    if call is not None:
        call.cancel()


def discard_input(protocol: Any) -> None:
    """Drop what an Autobahn protocol has buffered and not parsed yet (its ``data``)."""
    protocol.data = b""
