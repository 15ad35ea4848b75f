"""Plain HTTP on the listening port: connection limits, and no log line per stranger.

``Channel`` is twisted.web's ``HTTPChannel`` with the limits of a port that
faces the internet:

- every request must arrive in full (TLS, request line, headers, body)
  within ``handshake_timeout`` of the connection's accept, or of its first
  byte on a kept-alive connection; a slow or silent one (slowloris) is
  dropped however it trickles;
- between requests a connection may stay idle ``idle_timeout`` seconds,
  then it is closed; one that keeps making requests is kept;
- a request line longer than ``MAX_LENGTH`` is answered 414, a head over
  ``totalHeadersSize`` (or with more than ``maxHeaders`` headers) 431, a
  request the parser refuses 400, each then closed;
- at most ``max_per_client`` connections that are not (yet) WebSockets from
  one client (``bklit.limits.client_key`` of the TCP peer, or of the
  PROXY-protocol address on a ``haproxy:`` listener); more are closed at
  once.  Trusted proxies are not capped: their clients cannot be told apart
  before a request is read.

Once Autobahn took the connection over (``upgraded``) the channel neither
times nor counts it.  ``Refusals`` counts what strangers make the HTTP side
refuse in ``bklit_http_refused`` and logs it at most once a minute, with
the counts since; ``Page`` answers ``HEAD`` as ``GET`` without the body, and
other methods 405, without a log line.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from bklit import enrich
from bklit.limits import client_key

log = Logger()

REFUSALS_LOG_INTERVAL = 60.0


class Refusals:
    """Counts refusals by reason; logs them at most once per ``interval``.

    The first refusal after a quiet interval is logged at once; the ones
    that follow within ``interval`` are counted and logged together when it
    ends.  Reasons are fixed words (never client input or addresses).
    """

    def __init__(self, clock: Any, counter: Any, interval: float = REFUSALS_LOG_INTERVAL):
        self.clock = clock
        self.counter = counter
        self.interval = interval
        self.pending: dict[str, int] = {}
        self.quiet_until = 0.0
        self.timer: Any = None

    def note(self, reason: str) -> None:
        """One more refusal for ``reason``."""
        self.counter.labels(reason).inc()
        self.pending[reason] = self.pending.get(reason, 0) + 1
        now = self.clock.seconds()
        if now >= self.quiet_until:
            self.flush()
        elif self.timer is None:
            self.timer = self.clock.callLater(self.quiet_until - now, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if not self.pending:
            return
        counts = ", ".join(f"{reason} {count}" for reason, count in sorted(self.pending.items()))
        self.pending.clear()
        self.quiet_until = self.clock.seconds() + self.interval
        log.info("HTTP refusals since the last such line: {counts} (bklit_http_refused counts them all;"
                 " logged at most once every {interval:g} s)", counts=counts, interval=self.interval)


class PerClient:
    """Open connections per client key, at most ``limit`` each."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: dict[str, int] = {}

    def add(self, key: str) -> bool:
        """Count one more from ``key``; False (and not counted) past the limit."""
        count = self.open.get(key, 0)
        if count >= self.limit:
            return False
        self.open[key] = count + 1
        return True

    def remove(self, key: str) -> None:
        left = self.open.get(key, 1) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)


class HttpLimits:
    """What every ``Channel`` of a site shares: its timeouts, counts and refusals."""

    def __init__(self, clock: Any, refusals: Refusals, *, handshake_timeout: float = 5.0,
                 idle_timeout: float = 5.0, max_per_client: int = 16, trusted: tuple[str, ...] = (),
                 proxy_protocol: bool = False):
        self.clock = clock
        self.refusals = refusals
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.clients = PerClient(max_per_client)
        self.trusted = enrich.parse_proxies(trusted)
        self.proxy_protocol = proxy_protocol
        self.open = 0  # HTTP connections (not WebSockets), counted or not

    def exempt(self, host: str) -> bool:
        """Whether connections from ``host`` (a trusted proxy) are not capped."""
        return enrich.in_networks(host, self.trusted)


class Channel(HTTPChannel):
    """An HTTP/1.1 channel with deadlines, keep-alive, a per-client cap and plain 4xx answers."""

    limits: HttpLimits  # the site's, set by ``QuietSite.buildProtocol``

    def __init__(self) -> None:
        super().__init__()
        self.deadline: Any = None
        self.idle = False  # between requests of a kept-alive connection
        self.client: str | None = None  # the key counted in limits.clients; "" once decided not to
        self.gone = False  # lost, or taken over by a WebSocket

    # Deadlines ------------------------------------------------------------

    def _arm(self, seconds: float, then: Any) -> None:
        self._disarm()
        if self.gone:
            return
        self.deadline = self.limits.clock.callLater(seconds, then)

    def _disarm(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _going(self) -> bool:
        """Whether the connection is lost or was handed over to a WebSocket."""
        return self.gone or self.transport is None

    def _too_slow(self) -> None:
        """A request did not arrive in full in time: drop the connection."""
        self.deadline = None
        if self._going():
            return
        self.limits.refusals.note("slow_request")
        self.transport.abortConnection()

    def _idle_expired(self) -> None:
        """Idle too long between requests: close, and abort if that does not end it."""
        self.deadline = None
        if self._going():
            return
        self.loseConnection()
        self._arm(self.limits.handshake_timeout, self._abort)

    def _abort(self) -> None:
        self.deadline = None
        if not self._going():
            self.transport.abortConnection()

    # The connection -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.limits.open += 1
        self._arm(self.limits.handshake_timeout, self._too_slow)
        if not self.limits.proxy_protocol:
            self._count()

    def _count(self) -> bool:
        """Count this connection by its client; close it at once past the cap."""
        host = getattr(self.transport.getPeer(), "host", "")
        if self.limits.exempt(host):
            self.client = ""
            return True
        key = client_key(host)
        if not self.limits.clients.add(key):
            self.client = ""
            self.limits.refusals.note("too_many_connections")
            self.transport.abortConnection()
            return False
        self.client = key
        return True

    def _uncount(self) -> None:
        if self.client:
            self.limits.clients.remove(self.client)
        self.client = ""

    def _forget(self) -> None:
        """Stop timing and counting: the connection is gone or not HTTP any more."""
        if self.gone:
            return
        self.gone = True
        self._disarm()
        self._uncount()
        self.limits.open -= 1

    def upgraded(self) -> None:
        """The connection became a WebSocket (Autobahn owns it now): stop timing and counting it.

        No ``connectionLost`` reaches the channel any more, and its timers
        (the deadline, and twisted.web's idle timeout were it on) would hold
        it and its upgrade request, some 4 KB per socket.
        """
        self.setTimeout(None)
        self._forget()

    def connectionLost(self, reason: Any) -> None:
        self._forget()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        # Behind haproxy: the client's address is known once the PROXY header was read.
        if self.client is None and not self._count():
            return
        if self.idle:  # the first bytes of the next request on a kept-alive connection
            self.idle = False
            self._arm(self.limits.handshake_timeout, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()  # the request is in: answering it is ours to time
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Armed first: a pipelined request played back by requestDone arms its own deadline.
        if self.persistent:
            self.idle = True
            self._arm(self.limits.idle_timeout, self._idle_expired)
        else:
            self._arm(self.limits.handshake_timeout, self._abort)
        super().requestDone(request)

    # Requests too large or malformed: answered plainly, then closed -------

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_large()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large()

    def _too_large(self) -> None:
        if self._receivedHeaderSize == 0:  # still the request line
            self._refuse(414, b"URI Too Long", "uri_too_long")
        else:
            self._refuse(431, b"Request Header Fields Too Large", "headers_too_large")

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, b"Request Header Fields Too Large", "headers_too_large")
            return False
        return super().headerReceived(line)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, b"Bad Request", "bad_request")

    def _refuse(self, code: int, phrase: bytes, reason: str) -> None:
        if self._going() or self.transport.disconnecting:
            return
        self.limits.refusals.note(reason)
        self.transport.write(b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n" % (code, phrase))
        self.loseConnection()


class Page(Resource):
    """A leaf resource answering ``GET``, ``HEAD`` as ``GET`` without the body, and 405 otherwise.

    twisted.web would log a line for every ``HEAD`` whose render returns a
    body, and render an HTML page for other methods.
    """

    isLeaf = True

    def render(self, request: Any) -> Any:
        if request.method == b"GET":
            return self.render_GET(request)
        if request.method == b"HEAD":
            body = self.render_GET(request)
            if body is NOT_DONE_YET:  # twisted.web writes no body for a HEAD
                return body
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        limits = getattr(request.channel, "limits", None)
        if limits is not None:
            limits.refusals.note("bad_method")
        request.setResponseCode(405)
        request.setHeader(b"allow", b"GET, HEAD")
        return b""

    def render_GET(self, request: Any) -> Any:
        raise NotImplementedError
