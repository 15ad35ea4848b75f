"""This process's status pages: ``/healthz`` and ``/metrics``.

Both are served on the SDK endpoint's port and, with ``status_listen``, on
an address of their own.  The port faces the internet, so the metrics and
the whole health report go only to the networks of ``metrics_networks``
(``Networks``, loopback by default); anyone else gets 403 from
``/metrics`` and the health ``status`` alone, with the same code.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import UNIXAddress

from bklit import enrich
from bklit.health import HealthCheck
from bklit.httpd import Page
from bklit.metrics import Metrics


def status_pages(health: HealthCheck, metrics: Metrics, networks: Networks) -> dict[bytes, Any]:
    """The pages by name, as a site's root holds them."""
    return {b"healthz": HealthPage(health, networks), b"metrics": MetricsPage(metrics, networks)}


class Networks:
    """The networks of ``metrics_networks``: who may read /metrics and all of /healthz.

    With ``unix``, a peer on a unix socket is let in too: the socket's
    folder decides who may connect (``status_listen``).
    """

    def __init__(self, networks: tuple[str, ...], unix: bool = False):
        self.networks = enrich.parse_proxies(networks)
        self.unix = unix

    def allow(self, request: Any) -> bool:
        """Whether the request's peer (the TCP or PROXY-protocol address) is in one."""
        peer = request.getClientAddress()
        if self.unix and isinstance(peer, UNIXAddress):
            return True
        return enrich.in_networks(getattr(peer, "host", ""), self.networks)


class MetricsPage(Page):
    """``GET /metrics``, for allowed networks only (403 otherwise)."""

    def __init__(self, metrics: Metrics, networks: Networks):
        super().__init__()
        self.metrics = metrics
        self.networks = networks

    def render_GET(self, request: Any) -> bytes:
        if not self.networks.allow(request):
            request.setResponseCode(403)
            return b"metrics are only served to metrics_networks\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.render()


class HealthPage(Page):
    """``GET /healthz``: the last report, 200 when healthy, 503 when not.

    Only ``networks`` (``metrics_networks``) get the whole report; anyone
    else gets its ``status`` alone, with the same code.
    """

    def __init__(self, health: HealthCheck, networks: Networks):
        super().__init__()
        self.health = health
        self.networks = networks

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(200 if self.health.healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        state = self.health.state
        if not self.networks.allow(request):
            state = {"status": state["status"]}
        return json.dumps(state, separators=(",", ":")).encode()
