"""The one HTTP site on the listening port.

Named paths (``/healthz`` and the like) are plain twisted.web resources; any
other path is the SDK WebSocket endpoint, since the SDK only appends a query
string to the ``wsHost`` its site configured.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from bklit import enrich, wire
from bklit.dashboard import bearer

from bklit.ingest import SdkFactory
from bklit.limits import client_key


class Root(Resource):
    """Routes ``/<name>`` to a named child, everything else to the SDK socket."""

    def __init__(self, sdk: Resource, children: dict[bytes, Resource]):
        super().__init__()
        self.sdk = sdk
        self.named = children

    def getChild(self, path: bytes, request: object) -> Resource:
        return self.named.get(path, self.sdk)


def _json(request: Any, status: int, body: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


class Lockout:
    """The WebSocket endpoints' authentication lockout, for plain HTTP read endpoints too.

    A refused key counts toward the client's lockout, and a locked-out
    client gets 429, whichever endpoint it tries keys on.
    """

    def __init__(self, admission: Any, trusted_proxies: Any, header: str):
        self.admission = admission
        self.trusted_proxies = trusted_proxies
        self.header = header

    def client(self, request: Any) -> str:
        """What limits count the request's client by."""
        headers = {name.decode("latin-1").lower(): values[-1].decode("latin-1")
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        peer = getattr(request.getClientAddress(), "host", "")
        return client_key(enrich.client_ip(peer, headers, self.trusted_proxies, self.header))


class LiveCount(Resource):
    """``GET /api/live?projectId=P`` with a read key: how many sessions are live."""

    isLeaf = True

    def __init__(self, verifier: Any, sessions: Any, lockout: "Lockout | None" = None):
        super().__init__()
        self.verifier = verifier
        self.sessions = sessions
        self.lockout = lockout

    def render_GET(self, request: Any) -> Any:
        client = self.lockout.client(request) if self.lockout is not None else ""
        if self.lockout is not None and self.lockout.admission.locked_out(client):
            return _json(request, 429, {"error": "locked_out", "message": "too many refused keys; try again later"})
        project = (request.args.get(b"projectId") or [b""])[0].decode("utf-8", "replace")
        if not wire.valid_project_id(project):
            return _json(request, 400, {"error": "bad_request", "message": "projectId is missing or invalid"})
        authorization = request.getHeader(b"authorization") or b""
        key = bearer({"authorization": authorization.decode("latin-1")})
        if not key:
            request.setHeader(b"www-authenticate", b"Bearer")
            return _json(request, 401, {"error": "unauthorized", "message": "a read key is required (Authorization: Bearer)"})
        d = defer.ensureDeferred(self._answer(request, project, key, client))
        d.addErrback(lambda f: self._finish(request, 503, {"error": "unavailable", "message": "cannot read live sessions now"}))
        return NOT_DONE_YET

    async def _answer(self, request: Any, project: str, key: str, client: str) -> None:
        verdict = await self.verifier.verify(key, project, "read")
        if not verdict.ok:
            if self.lockout is not None:
                self.lockout.admission.auth_failed(client)
            self._finish(request, 403, {"error": "forbidden", "message": verdict.reason})
            return
        live = await self.sessions.live_count(project)
        bots = await self.sessions.bots_count(project)
        self._finish(request, 200, {"projectId": project, "live": live, "bots": bots})

    def _finish(self, request: Any, status: int, body: dict) -> None:
        if request._disconnected or request.finished:
            return
        request.write(_json(request, status, body))
        request.finish()


class QuietSite(Site):
    """A ``Site`` without an access log (client addresses are not logged)
    that gives each connection ``handshake_timeout`` seconds to become a
    WebSocket or finish with HTTP: slow or silent connections (slowloris)
    are dropped instead of held.
    """

    handshake_timeout = 5.0

    def log(self, request: object) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            _inner(channel).handshake_expiry = self.reactor.callLater(self.handshake_timeout, _expire, channel)
        return channel


def _inner(channel: Any) -> Any:
    """The HTTPChannel itself: ``Site.buildProtocol`` wraps it (HTTP/1.1 or
    HTTP/2 is picked later), and the inner channel holds the transport."""
    return getattr(channel, "_channel", channel)


def _expire(channel: Any) -> None:
    """Drop a connection still speaking HTTP after the handshake timeout.

    Autobahn detaches the channel from its transport when it upgrades the
    connection, so an upgraded socket is left alone; its channel is let go.
    """
    inner = _inner(channel)
    transport = getattr(inner, "transport", None)
    if transport is not None:
        transport.abortConnection()
    else:
        release(inner)


def release(channel: Any) -> None:
    """Let go of an HTTP channel whose connection became a WebSocket.

    The channel and its upgrade request stay referenced by two timers: the
    handshake expiry above and twisted.web's idle timeout (12 hours by
    default), which no ``connectionLost`` cancels once Autobahn owns the
    socket.  Cancelling both (and the transport's producer registration,
    see ``UpgradeResource``) frees them, some 4 KB per socket.
    """
    if hasattr(channel, "setTimeout"):
        channel.setTimeout(None)
    expiry = getattr(channel, "handshake_expiry", None)
    if expiry is not None and expiry.active():
        expiry.cancel()
    channel.handshake_expiry = None


class UpgradeResource(WebSocketResource):
    """Autobahn's ``WebSocketResource``, releasing the HTTP channel on upgrade.

    The channel is the transport's producer until then; it lets go first, so
    a WebSocket protocol that registers itself (dashboards do) keeps that
    place, and takes it back when the request was no upgrade after all.
    """

    def render(self, request: Any) -> Any:
        channel = request.channel
        transport = channel.transport  # (None already: HTTP/2, answered 426)
        if transport is None:
            return super().render(request)
        transport.unregisterProducer()
        result = super().render(request)
        if channel.transport is None:  # Autobahn took the connection over
            release(channel)
        else:
            transport.registerProducer(channel, True)
        return result


def make_site(sdk_factory: SdkFactory, handshake_timeout: float = 5.0,
              children: dict[bytes, Resource] | None = None) -> Site:
    """The site serving the SDK endpoint and the named resources."""
    root = Root(UpgradeResource(sdk_factory), children or {})
    site = QuietSite(root)
    site.handshake_timeout = handshake_timeout
    site.displayTracebacks = False
    site.noisy = False
    return site
