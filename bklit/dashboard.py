"""The dashboard endpoint: live events of one project, from every node.

``GET /dashboard?projectId=P`` upgrades to a WebSocket that is authorized by
a read-scope key (``Authorization: Bearer`` on the upgrade, or a first
``auth`` message within ``dashboard_auth_timeout``) or by an ``Origin`` in
the configured allowlist (a null one, from a sandboxed iframe or a file://
page, never counts as listed).  Until then it gets nothing but ``connected``.
Then a ``snapshot``, then every pageview, event and session end of the
project.  The socket joins the project's stream before the snapshot is read,
and the events that come while it is read are held and sent right after it:
none before the snapshot, none lost, none twice.  An ``auth`` after that is checked like the first: a key that is
not good for reading the project refuses the socket (1008); a good one is
bound to it too, and nothing is sent.  The socket is refused ("API key
revoked" / "API key expired", 1008) when a key it was authorized with is
revoked or expires (``bklit.revocation``).

Live events come from ``bklit.broadcast``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import txaio
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from autobahn.websocket.types import ConnectionDeny

from bklit import compat, enrich, wire
from bklit.frames import FrameBudget, FrameLimits
from bklit.websocket import CLOSE_INTERNAL, CLOSE_POLICY, Closable, ServerFactory, close_and_wait, socket_options
from bklit.limits import Admission, ConnectRate, Denied, client_key
from bklit.live import snapshot_message
from bklit.revocation import OpenKeys
from bklit.sessions import LiveSessions
from bklit.tokens import TokenVerifier, key_digest, null_origin

if TYPE_CHECKING:
    from bklit.broadcast import Broadcaster
log = Logger()


def bearer(headers: dict) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@implementer(IPushProducer)
class DashboardProtocol(FrameBudget, Closable, WebSocketServerProtocol):
    """One dashboard socket: authorization, snapshot, then live events.

    (Autobahn's own ``self.log`` is kept to errors, as on SDK sockets: its
    warnings name the peer's address and come once per misbehaving socket.)
    """

    log = txaio.make_logger(level="error")

    def __init__(self) -> None:
        super().__init__()
        self.project_id = ""
        self.bad_ids = ""
        self.presented_key: str | None = None
        self.allowed_origin = False
        self.authorized = False
        self.checking = False
        self.gone = False
        self.paused = False
        self.skipped = 0
        self.held: list[Any] | None = None  # live events waiting for the snapshot, while it is read
        self.auth_timer: Any = None
        self.client = ""
        self.admitted = False

    def onConnect(self, request: Any) -> None:
        self.dash = self.factory.dash
        self.project_id = (request.params.get("projectId") or [""])[0]
        if not self.project_id:
            self.bad_ids = "Missing projectId"
        elif not wire.valid_project_id(self.project_id):
            self.bad_ids = "Invalid projectId"
        self.presented_key = bearer(request.headers)
        origin = request.headers.get("origin")
        # A null origin (a sandboxed iframe, a file:// page) could be anyone's: it needs a read key.
        self.allowed_origin = (bool(origin) and not null_origin(origin)
                               and (self.project_id, origin.rstrip("/")) in self.dash.origins)
        peer = getattr(self.transport.getPeer(), "host", "")
        self.client = client_key(enrich.client_ip(peer, request.headers, self.dash.trusted_proxies,
                                                  self.dash.client_ip_header))
        if not self.dash.connects.allow(self.client):  # each snapshot costs Redis hundreds of commands
            self.dash.metrics.messages.labels("connect", "dashboard_rate_limited").inc()
            raise ConnectionDeny(429, "Too many dashboard connections from this address; try again later")
        try:
            self.dash.admission.admit(self.client)
        except Denied as e:
            raise ConnectionDeny(e.status, e.reason) from None
        self.admitted = True
        self.meter_frames(self.dash.frame_limits, self.dash.clock)

    def onOpen(self) -> None:
        if self.bad_ids:
            self.close(CLOSE_POLICY, self.bad_ids)
            return
        self.sendMessage(wire.connected(self.project_id, None, time.time()))
        # Our own flow control: written-but-unsent bytes pause us, not reads.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        key, self.presented_key = self.presented_key, None  # only its digest is kept
        if self.allowed_origin:
            self.authorize()
        elif key:
            self.check(key)
        else:
            self.auth_timer = self.dash.clock.callLater(self.dash.auth_timeout, self.refuse, "No auth in time")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.gone:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("type") != "auth" or not isinstance(message.get("apiKey"), str):
            if not self.authorized:  # once authorized, anything but auth is ignored
                self.refuse("Expected auth with a read key")
            return
        if self.checking:  # one key check at a time: each costs a hash and a Redis read
            self.refuse("One auth at a time: wait for the answer")
            return
        if not self.dash.open_keys.holds(self, key_digest(message["apiKey"])):
            self.check(message["apiKey"])

    def over_frame_budget(self, reason: str) -> None:
        self.dash.metrics.frame_budget_closes.labels("dashboard").inc()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.gone = True
        compat.cancel_close_timeout(self)
        if self.admitted:
            self.admitted = False
            self.dash.admission.release(self.client)
        if self.auth_timer is not None and self.auth_timer.active():
            self.auth_timer.cancel()
        self.held = None
        if hasattr(self, "dash"):
            self.dash.open_keys.remove(self)
        if self.authorized:
            self.dash.broadcaster.remove(self)
            self.dash.connected.discard(self)
        self.closed_now()

    def check(self, key: str) -> None:
        """Verify a read key for this project."""
        self.checking = True
        d = self.dash.verifier.verify(key, self.project_id, "read")
        d.addCallbacks(self.verdict, self.check_failed)

    def check_failed(self, failure: Any) -> None:
        self.checking = False
        self.refuse("Cannot check the key now")

    def verdict(self, verdict: Any) -> None:
        self.checking = False
        if self.gone:
            return
        if verdict.ok:
            self.dash.open_keys.add(self, verdict.token)
            self.authorize()
        else:
            self.dash.admission.auth_failed(self.client)
            self.refuse(verdict.reason)

    def authorize(self) -> None:
        """Join the project's live stream, read the snapshot, send it, then the events.

        The live events that come while the snapshot is read are held (see
        ``push``) and sent after it.
        """
        if self.gone or self.authorized:
            return
        if self.auth_timer is not None and self.auth_timer.active():
            self.auth_timer.cancel()
        self.authorized = True
        self.widen_frame_budget()
        self.held = []
        self.dash.connected.add(self)
        self.dash.broadcaster.add(self)
        d = defer.ensureDeferred(self.dash.sessions.snapshot(self.project_id))
        d.addCallbacks(self.send_snapshot, self.snapshot_failed)

    @property
    def writable(self) -> bool:
        """Whether messages can still be sent (not gone, not closing)."""
        return not self.gone and self.state == self.STATE_OPEN

    def send_snapshot(self, snapshot: tuple[int, list[dict]]) -> None:
        """Send the snapshot, then the events held while it was read, in order."""
        held, self.held = self.held, None
        if not self.writable:
            return
        # Autobahn holds what we send to the 4 KiB limit of what a dashboard may send us; a snapshot
        # of 200 sessions is some 30 KB (broadcasts go out prepared, which it does not check).
        limit, self.maxMessagePayloadSize = getattr(self, "maxMessagePayloadSize", 0), 0
        try:
            self.sendMessage(snapshot_message(snapshot[0], snapshot[1], time.time()))
        finally:
            self.maxMessagePayloadSize = limit
        for prepared in held:
            self.sendPreparedMessage(prepared)

    def snapshot_failed(self, failure: Any) -> None:
        """Close with 1011 and drop the held events: live events never come without a snapshot first.

        The dashboard can reconnect for a new snapshot and the events after it.
        """
        self.held = None
        log.warn("snapshot of {project} failed: {e}", project=self.project_id, e=failure.getErrorMessage())
        if self.writable:
            self.close(CLOSE_INTERNAL, "Snapshot unavailable")

    def refuse(self, reason: str) -> None:
        if not self.writable:
            return
        self.sendMessage(wire.error("unauthorized", reason))
        self.close(CLOSE_POLICY, "Unauthorized")

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with any protocol close code."""
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def push(self, prepared: Any) -> None:
        """Send a live event: hold it while the snapshot is read; skip it while the socket is backed up.

        Past ``dashboard_max_skipped`` held or skipped events the dashboard is dropped.
        """
        if not self.writable:
            return
        if self.held is not None:
            if len(self.held) >= self.dash.max_skipped:
                self.drop("whose snapshot took too long")
            else:
                self.held.append(prepared)
            return
        if self.paused:
            self.skipped += 1
            if self.skipped > self.dash.max_skipped:
                self.drop("that stopped reading")
            return
        self.sendPreparedMessage(prepared)

    def drop(self, why: str) -> None:
        """Disconnect at once, counted in ``dashboards_dropped``."""
        log.info("dropping a dashboard of {project} {why}", project=self.project_id, why=why)
        self.dash.dropped += 1
        self.dash.metrics.dashboards_dropped.inc()
        self.gone = True
        self.held = None
        self.transport.abortConnection()

    # IPushProducer: the transport tells us when its buffer is full/drained.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.skipped = 0

    def stopProducing(self) -> None:
        self.paused = True


class Dashboards:
    """What dashboard sockets share: auth, sessions, the broadcaster, limits."""

    def __init__(self, verifier: TokenVerifier, sessions: LiveSessions, clock: Any, *,
                 origins: tuple[tuple[str, str], ...], auth_timeout: float, max_skipped: int, metrics: Any,
                 admission: Admission, trusted_proxies: Any, frame_limits: FrameLimits, open_keys: OpenKeys,
                 connects_per_minute: int = 30, client_ip_header: str = "x-forwarded-for"):
        self.verifier = verifier
        self.open_keys = open_keys
        self.sessions = sessions
        self.clock = clock
        self.origins = frozenset(origins)
        self.auth_timeout = auth_timeout
        self.max_skipped = max_skipped
        self.connected: set[DashboardProtocol] = set()
        self.dropped = 0
        self.metrics = metrics
        self.admission = admission
        self.trusted_proxies = trusted_proxies
        self.frame_limits = frame_limits
        self.connects = ConnectRate(clock, connects_per_minute)
        self.client_ip_header = client_ip_header
        metrics.watch_connections("dashboard", lambda: len(self.connected))
        self.broadcaster: Broadcaster | None = None

    async def close_all(self, timeout: float = 2.0) -> None:
        """Close every dashboard with 1001 and wait (up to ``timeout``) for them."""
        await close_and_wait(self.connected, self.clock, timeout)


class DashboardFactory(ServerFactory):
    """Builds dashboard sockets; read-only, so incoming messages stay small."""

    protocol = DashboardProtocol

    def __init__(self, dash: Dashboards, config: Any):
        super().__init__(server="bklit")
        self.dash = dash
        self.setProtocolOptions(**socket_options(config, 4096))
