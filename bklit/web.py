"""The one HTTP site on the listening port.

Named paths (``/healthz`` and the like) are plain twisted.web resources; any
other path is the SDK WebSocket endpoint, since the SDK only appends a query
string to the ``wsHost`` its site configured.  Connections are
``bklit.httpd.Channel``s: deadlines, keep-alive and limits are theirs.
"""

from __future__ import annotations

import json
from typing import Any

import txaio
from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.web import pages
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from bklit import compat, enrich, wire
from bklit.dashboard import bearer
from bklit.httpd import Channel, HttpLimits, Page, Refusals
from bklit.sdk import SdkFactory
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


class LiveCount(Page):
    """``GET /api/live?projectId=P`` with a read key: how many sessions are live."""

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
        if compat.request_gone(request):
            return
        request.write(_json(request, status, body))
        request.finish()


class QuietSite(Site):
    """A ``Site`` without an access log (client addresses are not logged)
    whose connections are ``bklit.httpd.Channel``s sharing ``limits``:
    deadlines for slow requests, keep-alive, a per-client cap and plain
    4xx answers.  twisted.web's own idle timeout is off (the channel's
    deadlines replace it, and it logs the peer of every connection it ends).
    """

    protocol = Channel

    def __init__(self, resource: Resource, limits: HttpLimits, **kwargs: Any):
        super().__init__(resource, timeout=None, **kwargs)
        self.limits = limits

    def log(self, request: object) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        return channel

    def stopFactory(self) -> None:
        super().stopFactory()
        self.limits.refusals.flush()


class UpgradeResource(WebSocketResource):
    """Autobahn's ``WebSocketResource``, releasing the HTTP channel on upgrade.

    The channel is the transport's producer until then; it lets go first, so
    a WebSocket protocol that registers itself (dashboards do) keeps that
    place, and takes it back when the request was no upgrade after all.

    A failed upgrade (no ``Upgrade`` header, a bad key or version, a denied
    address) is counted as ``<name>_upgrade`` in ``refusals`` instead of
    being logged by Autobahn, twice, with the peer's address.
    """

    def __init__(self, factory: Any, name: str, refusals: Refusals):
        factory.protocol = _quiet_handshakes(factory.protocol, name, refusals)
        super().__init__(factory)

    def render(self, request: Any) -> Any:
        channel = request.channel
        transport = channel.transport  # (None: nothing left to hand over; Autobahn answers 426)
        if transport is None:
            return super().render(request)
        transport.unregisterProducer()
        result = super().render(request)
        if channel.transport is None:  # Autobahn took the connection over
            channel.upgraded()
        else:
            transport.registerProducer(channel, True)
        return result


_QUIET = txaio.make_logger(level="none")


def _quiet_handshakes(protocol: type, name: str, refusals: Refusals) -> type:
    """A subclass of ``protocol`` whose failed opening handshakes are counted, not logged."""
    reason = f"{name}_upgrade"

    def failHandshake(self: Any, why: str, code: int = 400, responseHeaders: Any = None) -> None:
        refusals.note(reason)
        self.log = _QUIET  # for the rest of this connection: it is being dropped
        protocol.failHandshake(self, why, code, responseHeaders)

    return type(protocol.__name__, (protocol,), {"failHandshake": failHandshake, "__doc__": protocol.__doc__})


def make_site(sdk_factory: SdkFactory, limits: HttpLimits,
              children: dict[bytes, Resource] | None = None) -> Site:
    """The site serving the SDK endpoint and the named resources."""
    return _quiet(QuietSite(Root(UpgradeResource(sdk_factory, "sdk", limits.refusals), children or {}), limits))


def make_status_site(children: dict[bytes, Resource], limits: HttpLimits) -> Site:
    """The site of ``status_listen``: the named resources alone, 404 for any other path."""
    return _quiet(QuietSite(Root(pages.notFound(), children), limits))


def _quiet(site: Site) -> Site:
    site.displayTracebacks = False
    site.noisy = False
    return site
