"""``reuseport:PORT``: several ingest processes share one port, the kernel spreads the connections."""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from bklit.endpoints import ReusePortEndpoint
from harness import connect, free_port, running_daemon, settings


def test_the_endpoint_string_parses_with_its_options():
    """``reuseport:PORT:interface=...:backlog=...`` is found through the plugin."""
    endpoint = endpoints.serverFromString(reactor, r"reuseport:8080:interface=\:\:1:backlog=512")
    assert isinstance(endpoint, ReusePortEndpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (8080, "::1", 512)


@pytest_twisted.ensureDeferred
async def test_a_port_taken_without_reuseport_is_refused():
    """The option does not steal a port someone bound without it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CannotListenError):
            await endpoints.serverFromString(reactor, f"reuseport:{port}:interface=127.0.0.1").listen(
                Factory.forProtocol(Protocol))


@pytest_twisted.ensureDeferred
async def test_two_daemons_share_one_port(redis_url, clickhouse_url):
    """Two ingest daemons listen on one reuseport port; 40 SDK sockets land on both, each served."""
    port = free_port()
    listen = f"reuseport:{port}:interface=127.0.0.1"

    def config():
        return settings(redis_url, clickhouse_url, role="ingest").replace(listen=listen)

    async with running_daemon(config()) as first, running_daemon(config()) as second:
        assert first.port == second.port == port
        key = await first.token("p1")
        clients = []
        for n in range(40):
            client = await connect(port, path=f"/?projectId=p1&sessionId=s{n}")
            await client.next_of("connected")
            client.send({"type": "auth", "apiKey": key})
            await client.next_of("auth_success")
            clients.append(client)
        counts = [len(first.service.ingest.connections), len(second.service.ingest.connections)]
        assert sum(counts) == 40 and min(counts) > 0, counts
        for client in clients:
            client.sendClose()
        await defer.gatherResults([defer.ensureDeferred(c.wait_closed()) for c in clients])
