"""Live events to local dashboards: one Redis pub/sub connection per node.

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

from typing import TYPE_CHECKING, Any

import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.application.service import Service
from twisted.internet import defer

from bklit.addresses import RedisAddress
from bklit.keys import REVOKED_CHANNEL, channel_project, live_channel
from bklit.revocation import OpenKeys

if TYPE_CHECKING:
    from bklit.dashboard import DashboardProtocol


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
        self.redis_handler: Any = None

    def startService(self) -> None:
        """Connect (and keep reconnecting, to the primary of the day) to Redis for pub/sub."""
        from bklit.redis_client import subscriber

        super().startService()
        self.redis_handler = subscriber(self.address, _Subscriber, timeout=5, broadcaster=self)

    def stopService(self) -> defer.Deferred:
        """Disconnect from Redis."""
        from bklit.redis_client import disconnect

        super().stopService()
        if self.redis_handler is None:
            return defer.succeed(None)
        return disconnect(self.redis_handler)

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
