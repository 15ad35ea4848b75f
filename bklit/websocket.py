"""What the SDK and dashboard sockets share: close codes, Autobahn options, closing.

``ServerFactory`` gives its protocol the Autobahn options as class
attributes (``compat.with_options``); ``socket_options`` are those options from
config.  ``Closable`` lets shutdown wait for each socket's own close
(``close_and_wait``) instead of polling.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import defer

from bklit import compat
from bklit.config import Config

# Close codes as RFC 6455 defines them (the README's Protocol section lists when each is sent).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011


class Closable:
    """Mixin for a protocol: ``when_closed()`` fires once its ``onClose`` called ``closed_now()``."""

    _ended = False
    _close_waiters: list[defer.Deferred] | None = None  # made only when someone waits

    def closed_now(self) -> None:
        self._ended = True
        waiters, self._close_waiters = self._close_waiters, None
        for d in waiters or ():
            d.callback(None)

    def when_closed(self) -> defer.Deferred:
        if self._ended:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        if self._close_waiters is None:
            self._close_waiters = []
        self._close_waiters.append(d)
        return d


def going_away(sock: Any) -> None:
    """Close a socket with 1001 (server shutdown)."""
    sock.close(CLOSE_GOING_AWAY, "Server shutting down")


async def close_and_wait(sockets: Iterable[Closable], clock: Any, timeout: float,
                         close: Callable[[Any], None] = going_away) -> None:
    """``close`` each socket (1001 by default), then wait until each one's ``onClose`` ran, or
    ``timeout`` passed (shutdown must not hang)."""
    sockets = list(sockets)
    closed = defer.DeferredList([sock.when_closed() for sock in sockets], consumeErrors=True)
    for sock in sockets:
        close(sock)
    try:
        await closed.addTimeout(timeout, clock)
    except defer.TimeoutError:
        pass


class ServerFactory(WebSocketServerFactory):
    """A server factory whose protocol holds its Autobahn options (see ``compat.with_options``)."""

    def setProtocolOptions(self, **options: Any) -> None:
        super().setProtocolOptions(**options)
        self.protocol = compat.with_options(type(self).protocol, self)


def socket_options(config: Config, max_message: int) -> dict:
    """Autobahn options from config: its own defaults allow anything.

    Sizes bound what one frame or message may make us buffer (an over-size
    one closes with 1009); pings find dead peers; per-message-deflate is
    off unless ``compression`` is on, and then a message is bounded after
    decompression too, so a small compressed bomb still closes with 1009.

    ``Origin: null`` (and ``file://``) passes the handshake: what may come
    from it is the key's business (a key with domains refuses it) or, on
    the dashboard, the read key's.  It must be given on every call, as
    Autobahn resets it to False whenever it is left out.
    """
    options: dict[str, Any] = dict(
        allowNullOrigin=True,
        maxMessagePayloadSize=max_message,
        maxFramePayloadSize=max_message,
        openHandshakeTimeout=config.handshake_timeout,
        closeHandshakeTimeout=2,
        autoPingInterval=config.ping_interval,
        autoPingTimeout=config.ping_timeout,
        failByDrop=False,
        # A GET without upgrade would render Autobahn's status page, which
        # also redirects to any ?redirect= URL: an open redirect on our name.
        webStatus=False,
    )
    if config.compression:
        from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

        def accept(offers: list) -> Any:
            for offer in offers:
                if isinstance(offer, PerMessageDeflateOffer):
                    return PerMessageDeflateOfferAccept(offer)
            return None

        options["perMessageCompressionAccept"] = accept
    return options
