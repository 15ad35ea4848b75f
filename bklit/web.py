"""The one HTTP site on the listening port.

Named paths (``/healthz`` and the like) are plain twisted.web resources; any
other path is the SDK WebSocket endpoint, since the SDK only appends a query
string to the ``wsHost`` its site configured.
"""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Site

from bklit.ingest import SdkFactory


class Root(Resource):
    """Routes ``/<name>`` to a named child, everything else to the SDK socket."""

    def __init__(self, sdk: Resource, children: dict[bytes, Resource]):
        super().__init__()
        self.sdk = sdk
        self.named = children

    def getChild(self, path: bytes, request: object) -> Resource:
        return self.named.get(path, self.sdk)


class QuietSite(Site):
    """A ``Site`` without an access log: client addresses are not logged."""

    def log(self, request: object) -> None:
        pass


def make_site(sdk_factory: SdkFactory, children: dict[bytes, Resource] | None = None) -> Site:
    """The site serving the SDK endpoint and the named resources."""
    root = Root(WebSocketResource(sdk_factory), children or {})
    site = QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
