"""What accepted SDK events become, shared by every SDK socket of the node.

``Ingest.queue`` turns a validated pageview or event into its stream entry
and broadcast (``bklit.entries``) and the batch operation that stores it
(``bklit.ops``), and hands it to the ``StreamProducer`` with a ``Receipt``:
Redis's reply (or the spool's) acks the event on its socket
(``bklit.sdk.SdkProtocol``).  A pageview also starts, continues or resumes
its session.  ``leave`` is a closed socket's way out of its project's
budgets and its session.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from bklit import agents, enrich, entries, geo, keys, wire
from bklit.config import Config
from bklit.frames import FrameLimits
from bklit.ids import EventIds
from bklit.limits import Admission, ProjectBudgets
from bklit.metrics import Metrics
from bklit.ops import event_op, pageview_op
from bklit.queue import StreamProducer
from bklit.revocation import OpenKeys
from bklit.sessions import LiveSessions
from bklit.tokens import TokenVerifier
from bklit.websocket import close_and_wait

if TYPE_CHECKING:
    from bklit.sdk import SdkProtocol

log = Logger()


class Ingest:
    """What happens to accepted events, shared by all SDK connections."""

    def __init__(self, config: Config, verifier: TokenVerifier, producer: StreamProducer,
                 sessions: LiveSessions, clock: Any, node: str, metrics: Metrics, admission: Admission,
                 open_keys: OpenKeys):
        self.config = config
        self.admission = admission
        self.metrics = metrics
        self.verifier = verifier
        self.open_keys = open_keys
        self.producer = producer
        self.sessions = sessions
        self.clock = clock
        self.node = node
        self.sockets = itertools.count(1)
        self.ids = EventIds()
        self.limits = wire.Limits(
            max_message_bytes=config.max_message_size,
            max_url_length=config.max_url_length,
            max_metadata_bytes=config.max_metadata_size,
        )
        self.trusted_proxies = enrich.parse_proxies(config.trusted_proxies)
        self.frame_limits = FrameLimits.from_config(config)
        self.projects = ProjectBudgets(clock, config.max_sockets_per_project, config.max_new_sessions_per_minute)
        self.connections: set[SdkProtocol] = set()
        self.locator = geo.Locator(config.geoip_db, clock, metrics=metrics)
        self.agents = agents.shared()
        self.drop_bots = config.bot_policy == "drop"
        # Looked up once: a metric's labels() costs more than its inc().
        self.ack_latency = metrics.ack_latency
        self.acked_count = {kind: metrics.messages.labels(kind, "acked") for kind in ("pageview", "event")}
        self.undelivered = {kind: metrics.acks_undelivered.labels(kind) for kind in ("pageview", "event")}
        self.bots_dropped = {kind: metrics.bots_dropped.labels(kind) for kind in ("pageview", "event")}
        self.sessions_changed = {1: metrics.sessions_started.labels("started"),
                                 2: metrics.sessions_started.labels("resumed")}

    async def close_all(self, timeout: float = 3.0) -> None:
        """Close every SDK socket with 1001 once the acks it owes went out (up to
        ``CLOSE_WAIT``), and wait (up to ``timeout``) for them."""
        await close_and_wait(self.connections, self.clock, timeout, close=lambda sock: sock.go_away())

    def queue(self, message: wire.PageView | wire.Event, conn: "SdkProtocol", kind: str) -> None:
        """Queue an accepted event and its broadcast; its socket is answered through a ``Receipt``.

        A pageview also starts, continues or resumes the connection's session,
        and carries the connection's place and its user agent's browser, OS
        and device.  Once the handshake or a pageview showed a bot, the
        socket's events are acked but neither stored nor broadcast when
        ``bot_policy`` is drop; when it is mark, its pageviews, events and
        session are stored with ``is_bot = 1`` and the session is live apart
        from people's (not in the live counts).
        """
        receipt = Receipt(conn, kind, self.ids.new(), time.monotonic())
        received_at = time.time()
        visitor = conn.visitor or conn.first_event()
        if kind == "pageview":
            agent = self.agents.describe(message.user_agent or "")
            conn.bot = conn.bot or agent.is_bot
        if conn.bot and self.drop_bots:
            self.bots_dropped[kind].inc()
            receipt.callback(None)
            return
        if kind == "pageview":
            entry, head, tail = entries.pageview(message, visitor, agent, conn.bot, receipt.event_id, received_at)
            if not conn.joined:
                conn.joined = True
                self.sessions.attach(visitor.project, visitor.session)
            op = pageview_op(entry, visitor, int(received_at * 1000), message.url, head, tail,
                             message.user_agent or "", bot=conn.bot)
        else:
            entry, broadcast = entries.event(message, visitor, conn.bot, receipt.event_id, received_at)
            op = event_op(entry, keys.live_channel(visitor.project), broadcast)
        self.producer.submit(op, receipt)

    def open_in_project(self, conn: "SdkProtocol") -> str | None:
        """Count an authenticated socket in its project's budgets, or say why it may not open."""
        refusal = self.projects.open(conn.project_id, conn.session_id)
        conn.in_project = refusal is None
        return refusal

    def leave(self, conn: "SdkProtocol") -> None:
        """A socket closed: it leaves its project's budgets and its session, which ends if it was the last."""
        self.connections.discard(conn)
        if conn.in_project:
            conn.in_project = False
            self.projects.close(conn.project_id)
        self.open_keys.remove(conn)
        if conn.joined:
            conn.joined = False
            d = self.sessions.detach(conn.project_id, conn.session_id, conn.socket_id)
            d.addErrback(lambda f: log.warn("session end not stored: {error}", error=f.getErrorMessage()))


class Receipt:
    """An accepted event waiting for Redis (or the spool): answers its socket with an ack or an error.

    The producer calls ``callback`` with the operation's reply or ``errback``
    with why it was not stored (see ``StreamProducer.submit``).
    """

    __slots__ = ("conn", "kind", "event_id", "started")

    def __init__(self, conn: "SdkProtocol", kind: str, event_id: str, started: float):
        self.conn = conn
        self.kind = kind
        self.event_id = event_id
        self.started = started

    def callback(self, reply: Any) -> None:
        self.conn.stored(self, reply)

    def errback(self, error: Exception) -> None:
        self.conn.not_stored(self, error)
