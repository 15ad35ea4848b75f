"""``reuseport:PORT``: a TCP listener that other processes may share.

Several ``--role ingest`` processes on one host, each listening with
``reuseport:8080``, get the port's connections spread over them by the
kernel (``SO_REUSEPORT``, Linux 3.9 and later; only processes of the same
user may join).  One CPython process uses one core; this is how an ingest
host uses all of them.  Options as for ``tcp:``: ``interface`` and
``backlog``; an IPv6 interface (``interface=\\:\\:``) takes IPv4 clients
too.  Twisted finds the parser through the plugin in
``twisted/plugins/bklit_endpoints.py``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """Listens on ``interface:port`` with ``SO_REUSEPORT`` set."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50):
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, factory: Any) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory: Any) -> Any:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # interface=\:\: takes IPv4 clients too, whatever bindv6only says
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # The reactor works on its own duplicate of the descriptor.
            return self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from None
        finally:
            sock.close()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """Parses ``reuseport:PORT[:interface=ADDRESS][:backlog=N]``."""

    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, port: str, interface: str = "", backlog: str = "50") -> ReusePortEndpoint:
        return ReusePortEndpoint(reactor, int(port), interface, int(backlog))
