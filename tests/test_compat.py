"""Each private part of a library that ``bklit.compat`` uses, checked against the installed version.

A failure here names the library whose upgrade changed what bklit relies on.
"""

import inspect

import pytest
import pytest_twisted
import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from bklit import compat
from bklit.addresses import parse_redis_url


@pytest_twisted.ensureDeferred
async def test_txredisapi_lazy_connection_factory_and_first_connection(redis_url):
    """The factory's ``maxDelay`` and ``pool``, and the handler's ``_connected``, are where bklit reads them."""
    address = parse_redis_url(redis_url)
    connection = txredisapi.lazyConnection(host=address.host, port=address.port, convertNumbers=False)
    try:
        compat.set_reconnect_delay(connection, 1.5)
        assert connection._factory.maxDelay == 1.5, "txredisapi: the factory no longer reads maxDelay"
        handler = await compat.first_connection(connection).addTimeout(10, reactor)
        assert handler is connection
        assert compat.redis_connected(connection) is True
        assert [conn.connected for conn in compat.redis_protocols(connection)] == [1]
        assert await connection.execute_command("PING") == "PONG"
    finally:
        await connection.disconnect()
    assert compat.redis_connected(connection) is False


def test_txredisapi_disconnected_handler_is_not_connected():
    """A handler whose factory never connected has an empty pool: not connected."""
    connection = txredisapi.lazyConnection(host="127.0.0.1", port=1, reconnect=False)
    try:
        assert compat.redis_connected(connection) is False
        assert not compat.first_connection(connection).called
    finally:
        connection._factory.stopTrying()
        compat.first_connection(connection).addErrback(lambda _: None)


def test_twisted_web_request_gone_after_the_client_left():
    """``Request._disconnected`` turns true when the connection is lost, ``finished`` when answered."""
    request = Request(DummyChannel())
    assert compat.request_gone(request) is False
    request.connectionLost(Failure(ConnectionDone()))
    assert compat.request_gone(request) is True
    answered = Request(DummyChannel())
    answered.finish()
    assert compat.request_gone(answered) is True


class _Refusing:
    def listen(self, factory):
        return defer.fail(CannotListenError("127.0.0.1", 1, OSError("in use")))


def test_endpoint_service_raises_a_failed_bind_synchronously():
    """``_raiseSynchronously`` still makes ``privilegedStartService`` raise."""
    service = StreamServerEndpointService(_Refusing(), Factory())
    compat.raise_bind_errors(service)
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


@pytest_twisted.ensureDeferred
async def test_endpoint_service_gives_its_listening_port():
    """``_waitingForPort`` fires with the bound port."""
    service = StreamServerEndpointService(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), Factory())
    service.startService()
    try:
        port = await compat.listening_port(service)
        assert port.getHost().port > 0
    finally:
        await service.stopService()


def test_autobahn_copies_missing_options_from_config_attrs():
    """Autobahn still copies ``CONFIG_ATTRS`` missing on a new protocol (what ``with_options`` avoids)."""
    assert "maxMessagePayloadSize" in WebSocketServerProtocol.CONFIG_ATTRS
    assert "CONFIG_ATTRS" in inspect.getsource(WebSocketProtocol._connectionMade), \
        "Autobahn: options are no longer copied from CONFIG_ATTRS; with_options may be dropped"


def test_with_options_makes_the_options_class_attributes():
    """The subclass answers every option from the class, and has none left to copy."""
    factory = WebSocketServerFactory(server="bklit")
    factory.setProtocolOptions(maxMessagePayloadSize=1234, perMessageCompressionAccept=lambda offers: None)
    protocol = compat.with_options(WebSocketServerProtocol, factory)
    assert protocol.CONFIG_ATTRS == ()
    assert protocol.maxMessagePayloadSize == 1234
    instance = protocol()
    assert instance.perMessageCompressionAccept([]) is None  # a plain function, not a method
    assert "maxMessagePayloadSize" not in vars(instance)


def test_autobahn_keeps_its_close_handshake_timer_after_the_connection_is_lost():
    """``closeHandshakeTimeoutCall`` is still set by ``sendCloseFrame`` and not cancelled when the connection goes."""
    assert "closeHandshakeTimeoutCall" in inspect.getsource(WebSocketProtocol.sendCloseFrame)
    assert "closeHandshakeTimeoutCall" not in inspect.getsource(WebSocketProtocol._connectionLost), \
        "Autobahn now cancels the close timer itself: cancel_close_timeout may go"
    cancelled = []
    protocol = WebSocketServerProtocol()
    protocol.closeHandshakeTimeoutCall = type("Call", (), {"cancel": lambda self: cancelled.append(1)})()
    compat.cancel_close_timeout(protocol)
    compat.cancel_close_timeout(protocol)
    assert cancelled == [1] and protocol.closeHandshakeTimeoutCall is None


def test_autobahn_buffers_unparsed_input_in_data():
    """Autobahn parses what is in ``self.data``: emptying it drops what is buffered."""
    assert "self.data" in inspect.getsource(WebSocketProtocol._dataReceived)
    assert "self.data" in inspect.getsource(WebSocketProtocol.processData)
    protocol = WebSocketServerProtocol()
    protocol.data = b"\x81\x05hel"
    compat.discard_input(protocol)
    assert protocol.data == b""


def test_autobahn_state_the_frame_shortcut_reads():
    """bklit.frames reads and writes these of Autobahn's protocol state to take whole text frames
    itself; each must still be where Autobahn keeps it (an upgrade that moves one fails here)."""
    protocol = WebSocketServerProtocol()
    protocol.factory = WebSocketServerFactory()
    protocol._connectionMade()
    for name in ("data", "_perMessageCompress", "send_queue", "state", "trafficStats", "autoPingTimeoutCall",
                 "autoPingRestartOnAnyTraffic", "maxFramePayloadSize", "maxMessagePayloadSize", "autoFragmentSize"):
        assert hasattr(protocol, name), f"autobahn: WebSocketProtocol.{name} is gone"
    parser = inspect.getsource(WebSocketProtocol.processData)  # set once the handshake is done
    for name in ("self.current_frame", "self.inside_message", "self.data"):
        assert name in parser, f"autobahn: processData no longer keeps {name}"
    assert protocol.STATE_OPEN == 3  # frames.STATE_OPEN
    for method in ("_cancelAutoPingTimeoutCall", "processData", "sendData", "_dataReceived"):
        assert callable(getattr(WebSocketProtocol, method, None)), f"autobahn: WebSocketProtocol.{method} is gone"
    stats = protocol.trafficStats
    for counter in ("incomingWebSocketFrames", "incomingWebSocketMessages", "incomingOctetsWebSocketLevel",
                    "incomingOctetsAppLevel", "outgoingWebSocketMessages", "outgoingWebSocketFrames",
                    "outgoingOctetsAppLevel", "outgoingOctetsWebSocketLevel", "outgoingOctetsWireLevel",
                    "preopenOutgoingOctetsWireLevel"):
        assert isinstance(getattr(stats, counter), int), f"autobahn: TrafficStats.{counter} is gone"
