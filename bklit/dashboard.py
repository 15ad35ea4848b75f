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

``Broadcaster`` holds one Redis pub/sub connection per node, subscribed to
the channels of the projects that have a dashboard here.  Each published
message was serialized once by the node that accepted the event; here it is
framed once (an Autobahn prepared message) and written to every local
dashboard of the project.  A dashboard that does not read is never waited
for: once its socket buffer is full (Twisted pauses it as a producer) further
messages are counted instead of queued, and past ``dashboard_max_skipped`` it
is disconnected.  A dashboard whose snapshot read would leave more than
``dashboard_max_skipped`` events held is disconnected the same way.  The
same connection is subscribed to
``keys.REVOKED_CHANNEL`` and hands its messages to the node's ``OpenKeys``,
which after each (re)subscribe checks the keys of open sockets again.
"""

from __future__ import annotations

import json
import time
from typing import Any

import txaio
import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from autobahn.websocket.types import ConnectionDeny

from bklit import compat, enrich, wire
from bklit.config import RedisAddress
from bklit.frames import FrameBudget, FrameLimits
from bklit.ingest import CLOSE_INTERNAL, close_and_wait, socket_options
from bklit.limits import Admission, ConnectRate, Denied, client_key
from bklit.live import snapshot_message
from bklit.keys import REVOKED_CHANNEL, channel_project, live_channel
from bklit.revocation import OpenKeys
from bklit.sessions import LiveSessions
from bklit.tokens import TokenVerifier, key_digest, null_origin

CLOSE_POLICY = 1008
log = Logger()


def bearer(headers: dict) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class _Subscriber(txredisapi.SubscriberProtocol):
    """Hands published messages to the broadcaster; resubscribes on reconnect."""

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        d.addCallback(lambda _: self.factory.broadcaster.subscribed(self))
        return d

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.broadcaster.deliver(channel, message)

    def connectionLost(self, why: Any) -> None:
        self.factory.broadcaster.connection = None
        super().connectionLost(why)


class Broadcaster(Service):
    """Per-node fan-out of Redis pub/sub messages to local dashboards."""

    name = "broadcaster"

    def __init__(self, address: RedisAddress, factory: WebSocketServerFactory, open_keys: OpenKeys):
        self.address = address
        self.ws_factory = factory
        self.open_keys = open_keys
        self.dashboards: dict[str, set[DashboardProtocol]] = {}
        self.connection: _Subscriber | None = None
        self.redis_factory: Any = None

    def startService(self) -> None:
        """Connect (and keep reconnecting) to Redis for pub/sub."""
        from bklit.redis_client import endpoint

        super().startService()
        factory = txredisapi.SubscriberFactory()
        factory.protocol = _Subscriber
        factory.password = self.address.password
        factory.broadcaster = self
        factory.reconnect = True
        factory.startConnecting(endpoint(self.address, timeout=5))
        self.redis_factory = factory

    def stopService(self) -> defer.Deferred:
        """Disconnect from Redis."""
        super().stopService()
        if self.redis_factory is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self.redis_factory.disconnect).addErrback(lambda _: None)

    def subscribed(self, connection: _Subscriber) -> None:
        """(Re)connected: subscribe; once Redis confirmed, check the open sockets' keys again."""
        self.connection = connection
        d = connection.subscribe([REVOKED_CHANNEL, *(live_channel(p) for p in self.dashboards)])
        # A failed subscribe means the connection is gone: the next one subscribes and checks.
        d.addCallbacks(lambda _: self.open_keys.recheck(), lambda _: None)

    def add(self, dashboard: "DashboardProtocol") -> None:
        """Start sending the project's live events to ``dashboard``."""
        local = self.dashboards.setdefault(dashboard.project_id, set())
        if not local and self.connection is not None:
            self.connection.subscribe(live_channel(dashboard.project_id))
        local.add(dashboard)

    def remove(self, dashboard: "DashboardProtocol") -> None:
        """Stop; unsubscribe when it was the project's last local dashboard."""
        local = self.dashboards.get(dashboard.project_id)
        if not local or dashboard not in local:
            return
        local.discard(dashboard)
        if not local:
            del self.dashboards[dashboard.project_id]
            if self.connection is not None:
                self.connection.unsubscribe(live_channel(dashboard.project_id))

    def deliver(self, name: str, message: str) -> None:
        """Frame a published message once and write it to each local dashboard."""
        if name == REVOKED_CHANNEL:
            self.open_keys.revoked(message)
            return
        local = self.dashboards.get(channel_project(name))
        if not local:
            return
        payload = message.encode("utf-8") if isinstance(message, str) else message
        prepared = self.ws_factory.prepareMessage(payload)
        for dashboard in list(local):
            dashboard.push(prepared)


@implementer(IPushProducer)
class DashboardProtocol(FrameBudget, WebSocketServerProtocol):
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


class DashboardFactory(WebSocketServerFactory):
    """Builds dashboard sockets; read-only, so incoming messages stay small."""

    protocol = DashboardProtocol

    def __init__(self, dash: Dashboards, config: Any):
        super().__init__(server="bklit")
        self.dash = dash
        self.setProtocolOptions(**socket_options(config, 4096))
