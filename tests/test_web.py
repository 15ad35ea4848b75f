"""Plain HTTP on the WebSocket paths: no status page, no redirects, no version banner."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, PartialDownloadError, readBody

from harness import running_daemon, settings


@pytest.mark.parametrize("path", ["/", "/?redirect=https%3A%2F%2Fevil.example%2F", "/dashboard?projectId=p1",
                                  "/any/path?redirect=https%3A%2F%2Fevil.example%2F&after=0"])
@pytest_twisted.ensureDeferred
async def test_get_without_upgrade_is_refused_plainly(path, redis_url, clickhouse_url):
    """426 Upgrade Required: not Autobahn's status page, which would redirect to any ?redirect= URL."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{daemon.port}{path}".encode())
        try:
            body = await readBody(response)
        except PartialDownloadError as e:  # the error page has no length; the connection ends it
            body = e.response
        assert response.code == 426
        assert not response.headers.hasHeader(b"location")
        assert b"evil.example" not in body and b"Autobahn" not in body
        assert b"Autobahn" not in b"".join(response.headers.getRawHeaders(b"server", []))
