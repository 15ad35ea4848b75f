"""The SDK WebSocket endpoint: one socket per browser tab.

``SdkProtocol`` is thin: it parses frames (``bklit.typed``, ``bklit.wire``)
and dispatches to ``handle_<type>``; what an accepted event becomes and
where it goes is ``bklit.ingest``'s business.  The authentication gate
is ``bklit.gate.AuthGate``.

An event is acked (``{"type":"ack"}``) only when Redis has stored it.

Nothing received before the client closed is lost.  A client's close frame that arrives
while acks are due, or while messages wait for the key check, is answered
once they went out, at most ``CLOSE_WAIT`` later; frames after it are not
handled (RFC 6455).  Shutdown's 1001 waits the same way.  Messages whose
socket dropped meanwhile are still stored (their acks are counted as
undelivered), and the socket's session still ends, behind them.  After a
close frame of ours, nothing more is handled.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import txaio
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny

from bklit import compat, enrich, typed, wire
from bklit.entries import Visitor
from bklit.frames import FrameBudget
from bklit.gate import AuthGate
from bklit.ingest import Ingest, Receipt
from bklit.limits import Denied, TokenBucket, client_key
from bklit.ops import OperationRefused
from bklit.websocket import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_UNSUPPORTED, Closable, ServerFactory, socket_options

CLOSE_WAIT = 1.5  # seconds a close waits for the acks and key checks its socket still owes


class SdkProtocol(AuthGate, FrameBudget, Closable, WebSocketServerProtocol):
    """One SDK socket: ids from the query string, the auth gate, acks.

    (Logging goes through the module's ``log``.  Autobahn's ``self.log`` is
    its own and is kept to errors: its warnings name the peer's address,
    which is never logged, and come once per misbehaving connection, which
    would let a flood of them fill the log.)
    """
    ingest: Ingest
    log = txaio.make_logger(level="error")

    def __init__(self) -> None:
        super().__init__()
        self.project_id = ""
        self.session_id = ""
        self.bad_ids = ""
        self.client_origin: str | None = None
        self.ip = ""
        self.gate = "new"
        self.waiting: list[wire.Auth | wire.PageView | wire.Event] = []
        self.errors = 0
        self.closed = False
        self.joined = False
        self.in_project = False
        self.socket_id = ""
        self.auth_timer: Any = None
        self.client = ""  # what limits count by (in memory only)
        self.admitted = False
        self.bucket: TokenBucket | None = None
        self.unanswered = 0  # accepted events not yet acked or refused
        self.ours = False  # we sent a close frame: nothing more is handled
        self.finish: Callable[[], Any] | None = None  # the close that waits for what is owed
        self.finish_timer: Any = None
        self.visitor: Visitor | None = None

    # Autobahn callbacks ---------------------------------------------------

    def onConnect(self, request: Any) -> None:
        self.ingest = self.factory.ingest
        self.trafficStats = self.factory.traffic
        self.socket_id = f"{self.ingest.node}:{next(self.ingest.sockets)}"
        params = request.params
        self.project_id = (params.get("projectId") or [""])[0]
        self.session_id = (params.get("sessionId") or [""])[0]
        if not self.project_id:
            self.bad_ids = "Missing projectId"
        elif not wire.valid_project_id(self.project_id):
            self.bad_ids = "Invalid projectId"
        elif not self.session_id:
            self.bad_ids = "Missing sessionId"
        elif not wire.valid_session_id(self.session_id):
            self.bad_ids = "Invalid sessionId"
        self.client_origin = request.headers.get("origin")
        peer = self.transport.getPeer()
        full_ip = enrich.client_ip(getattr(peer, "host", ""), request.headers, self.ingest.trusted_proxies,
                                   self.ingest.config.client_ip_header)
        self.ip = enrich.anonymise_ip(full_ip)
        self.place = self.ingest.locator.locate(full_ip)  # looked up once; the full address is not kept
        self.bot = self.ingest.agents.describe(request.headers.get("user-agent", "")).is_bot
        self.client = client_key(full_ip)
        try:
            self.ingest.admission.admit(self.client)
        except Denied as e:
            self.ingest.metrics.messages.labels("connect", "denied").inc()
            raise ConnectionDeny(e.status, e.reason) from None
        self.admitted = True
        config = self.ingest.config
        self.bucket = TokenBucket(config.rate_limit, config.rate_burst, self.ingest.clock)
        self.meter_frames(self.ingest.frame_limits, self.ingest.clock)

    def onOpen(self) -> None:
        if self.bad_ids:
            self.close(CLOSE_POLICY, self.bad_ids)
            return
        self.ingest.connections.add(self)
        self.sendMessage(wire.connected(self.project_id, self.session_id, time.time()))
        self.auth_timer = self.ingest.clock.callLater(self.ingest.config.auth_timeout, self.auth_timed_out)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Frames still arriving after a close was sent (too many errors, a
        # binary frame, shutdown) are ignored: they could not be acked.
        if self.bad_ids or self.gate == "refused" or not self.writable:
            return
        if isBinary:
            self.close(CLOSE_UNSUPPORTED, "Binary frames are not accepted")
            return
        if not self.bucket.take():
            self.reject("rate_limited", f"More than {self.ingest.config.rate_limit:g} messages a second; dropped")
            return
        try:
            message = typed.parse_message(payload, self.ingest.limits)
        except wire.ProtocolError as e:
            self.reject(e.code, e.message)
            return
        self.receive(message)

    def over_frame_budget(self, reason: str) -> None:
        self.ingest.metrics.frame_budget_closes.labels("sdk").inc()

    def onPing(self, payload: bytes) -> None:
        # A ping costs a token like a message: answering every one would let
        # a client that floods pings and never reads grow our send buffer.
        if not self.writable:
            return
        if not self.bucket.take():
            self.reject("rate_limited", f"More than {self.ingest.config.rate_limit:g} messages a second; dropped")
            return
        super().onPing(payload)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # Autobahn answers at once; we answer once the acks owed went out.
        return self.when_settled(partial(super().onCloseFrame, code, reasonRaw))

    def consumeData(self) -> None:
        if self.finish is not None:
            compat.discard_input(self)  # frames after the client's close frame (or our going away) are not handled
            return
        super().consumeData()

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        # Ours (close(), or Autobahn failing the connection), not the reply to the client's.
        self.ours = self.ours or not isReply
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Messages waiting for their key check stay: verified() stores them.
        self.closed = True
        self.finish = None
        compat.cancel_close_timeout(self)
        for timer in (self.auth_timer, self.finish_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self.admitted:
            self.admitted = False
            self.ingest.admission.release(self.client)
        if hasattr(self, "ingest"):
            self.ingest.leave(self)
        self.closed_now()

    # Message handlers (connection is open) -------------------------------

    def handle_auth(self, message: wire.Auth) -> None:
        """An ``auth`` whose key was good (checked now or before on this socket)."""
        self.send(wire.auth_success())

    def handle_pageview(self, message: wire.PageView) -> None:
        """Take a pageview (acked once queued)."""
        self.take(message, "pageview")

    def handle_event(self, message: wire.Event) -> None:
        """Take a custom event (acked once queued)."""
        self.take(message, "event")

    def take(self, message: wire.PageView | wire.Event, kind: str) -> None:
        """An event whose ids match the socket's goes to ``Ingest.queue``; others are refused."""
        if message.project_id is not None and message.project_id != self.project_id:
            self.reject("project_mismatch", "data.projectId does not match the connection", kind)
            return
        if message.session_id is not None and message.session_id != self.session_id:
            self.reject("project_mismatch", "data.sessionId does not match the connection", kind)
            return
        self.unanswered += 1
        self.ingest.queue(message, self, kind)

    def first_event(self) -> Visitor:
        """The socket's visitor record, made at its first event (an idle socket keeps none)."""
        self.visitor = Visitor.of(self.project_id, self.session_id, self.socket_id, self.ip, self.place)
        return self.visitor

    def stored(self, receipt: Receipt, reply: Any) -> None:
        """Redis (or the spool) has the event: ack it (``reply`` None: a bot's, dropped)."""
        ingest = self.ingest
        if receipt.kind == "pageview" and reply is not None:
            change = int(reply[1])  # started 1, resumed 2 (0 also when spooled: decided at replay)
            if change:
                ingest.sessions_changed[change].inc()
        ingest.ack_latency.observe(time.monotonic() - receipt.started)
        ingest.acked_count[receipt.kind].inc()
        if self.writable:
            self.sendMessage(wire.ack(receipt.event_id, receipt.kind))
        else:
            ingest.undelivered[receipt.kind].inc()  # accepted, but the client will send it again
        self.answered()

    def not_stored(self, receipt: Receipt, error: Exception) -> None:
        # Counted, not logged: the producer and the spool log an outage once, not per event.
        if isinstance(error, OperationRefused):  # this event alone; its neighbours were stored
            code, message = "not_stored", "The server could not store this event; not acked"
        else:
            code, message = "overloaded", "The server cannot store events right now; not acked"
        self.ingest.metrics.messages.labels(receipt.kind, code).inc()
        if self.writable:
            self.send_error(code, message)
        self.answered()

    def answered(self) -> None:
        self.unanswered -= 1
        self.settle()

    # Errors and closing ----------------------------------------------------

    def owes(self) -> bool:
        """Whether messages received still wait for their ack or their key check."""
        return self.unanswered > 0 or self.gate == "checking"

    def when_settled(self, finish: Callable[[], Any]) -> Any:
        """Call ``finish`` (a close) now, or once nothing is owed, at most ``CLOSE_WAIT`` later.

        Meanwhile no more frames are handled; the acks still go out.
        """
        if self.state != self.STATE_OPEN or not self.owes():
            return finish()
        compat.discard_input(self)
        self.finish = finish
        self.finish_timer = self.ingest.clock.callLater(CLOSE_WAIT, self.settle, True)
        return None

    def settle(self, timed_out: bool = False) -> None:
        """Run the waiting close if nothing is owed any more (or it waited long enough)."""
        if self.finish is None or (self.owes() and not timed_out):
            return
        finish, self.finish = self.finish, None
        if self.finish_timer.active():
            self.finish_timer.cancel()
        if self.state == self.STATE_OPEN:
            finish()

    def go_away(self) -> None:
        """Server shutdown: close with 1001 once the acks owed went out (see ``when_settled``)."""
        if self.finish is None:
            self.when_settled(partial(self.close, CLOSE_GOING_AWAY, "Server shutting down"))

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with any protocol close code, then close the connection.

        (Autobahn's ``sendClose`` only takes 1000 and 3000-4999; the README's Protocol section
        uses 1001, 1003, 1008 and 1011 as RFC 6455 defines them.)  Nothing
        the client sends after our close frame is handled, so the closing
        handshake is not waited for: a client flooding frames would have
        every one of them parsed for as long as it ran.  The close frame is
        flushed before the TCP connection closes.
        """
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        self.dropConnection(abort=False)

    @property
    def writable(self) -> bool:
        """Whether messages can still be sent (not closed, not closing)."""
        return not self.closed and self.state == self.STATE_OPEN

    def send(self, payload: bytes) -> None:
        """Send a message unless the socket is closing (a late ack is dropped)."""
        if self.writable:
            self.sendMessage(payload)

    def send_error(self, code: str, message: str) -> None:
        self.send(wire.error(code, message))

    def reject(self, code: str, message: str, kind: str = "unknown") -> None:
        """Answer a bad message; too many of them close the socket 1008."""
        self.ingest.metrics.messages.labels(kind, code).inc()
        self.send_error(code, message)
        self.errors += 1
        if self.errors >= self.ingest.config.max_errors:
            self.close(CLOSE_POLICY, "Too many errors")


class SdkFactory(ServerFactory):
    """Builds ``SdkProtocol``s sharing one ``Ingest``, with limits from config.

    Its sockets share one ``TrafficStats`` (Autobahn's byte and frame
    counters), so an idle socket does not carry a set of its own.
    """

    protocol = SdkProtocol

    def __init__(self, ingest: Ingest):
        super().__init__(server="bklit")
        self.ingest = ingest
        self.traffic = TrafficStats()
        config = ingest.config
        self.setProtocolOptions(**socket_options(config, config.max_message_size))
