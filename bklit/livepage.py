"""``GET /live``: the live page, and ``/live/<file>`` its scripts, styles and icon.

The files are plain HTML, CSS and JavaScript modules shipped in the package
(``bklit/static/live/``), with no build step and nothing from any other
site.  Only the files found there at start are served, by exact name: no
listing, no other path.  Every answer carries a strict Content-Security-Policy
(scripts, styles and images from this origin only, connections to it and to
WebSockets) and ``Cache-Control: no-cache``: browsers keep the files but ask
again (``If-Modified-Since``) each time, so an upgraded daemon is never
shown with old scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.web import static
from twisted.web.resource import Resource
from twisted.web.util import redirectTo

STATIC = Path(__file__).parent / "static" / "live"
INDEX = "index.html"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "connect-src 'self' ws: wss:",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",  # the form is the script's: without it, nothing (no key) is sent anywhere
    "frame-ancestors 'none'",
])

HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"cache-control": b"no-cache",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
}

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def _secure(request: Any) -> None:
    for name, value in HEADERS.items():
        request.setHeader(name, value)


class Asset(static.File):
    """One file of the page, with the page's headers (conditional GET, HEAD and ranges as static.File does)."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        _secure(request)
        return super().render(request)


class NotFound(Resource):
    """A plain 404 under ``/live/``."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        _secure(request)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class LivePage(Resource):
    """``/live`` (the page) and ``/live/<name>`` (its files); ``/live/`` redirects to ``/live``.

    ``index.html`` is served only as ``/live``: the page's links are
    relative to that address (``live/app.js``, ``api/stats``, ``dashboard``),
    so it also works behind a proxy that serves it under a path prefix.
    """

    def __init__(self, directory: Path = STATIC):
        super().__init__()
        self.files = {
            path.name.encode(): Asset(str(path), defaultType=TYPES.get(path.suffix, "application/octet-stream"))
            for path in sorted(directory.iterdir())
            if path.is_file() and path.suffix in TYPES and path.name != INDEX
        }
        self.index = Asset(str(directory / INDEX), defaultType=TYPES[".html"])
        for asset in (self.index, *self.files.values()):
            asset.contentTypes = dict(TYPES)

    def getChild(self, name: bytes, request: Any) -> Resource:
        if request.postpath:  # /live/<name>/more: no such file
            return NotFound()
        if name == b"":
            return _Redirect()
        return self.files.get(name, NotFound())

    def render(self, request: Any) -> Any:
        return self.index.render(request)


class _Redirect(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        _secure(request)
        return redirectTo(b"../live", request)
