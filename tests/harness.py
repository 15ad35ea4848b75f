"""Running the daemon in the test's reactor, and talking to it as clients do.

``running_daemon`` starts a real ``BklitService`` (real Redis, real
ClickHouse, a real listening socket on a free loopback port) and stops it
afterwards; ``SocketClient`` is an Autobahn WebSocket client that records
every message and the close code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP6ClientEndpoint, clientFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from bklit import compat, schema
from bklit.clickhouse import connect as connect_clickhouse
from bklit.config import load_config
from bklit.service import BklitService
from bklit.tokens import TokenStore

TIMEOUT = 10.0

SESSION = "1732608000000-k3j4h5"


def sdk_pageview(project: str, session: str = SESSION, key: str | None = None, **changes: Any) -> dict:
    """A pageview shaped exactly as ``@bklit/sdk`` 1.0.1 sends it."""
    data = {
        "url": "https://example.com/pricing?utm_source=news&utm_medium=email&gclid=abc",
        "timestamp": None,
        "referrer": "https://www.google.com/search?q=bklit",
        "referrerHostname": "www.google.com",
        "referrerType": "organic",
        "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        "viewport": {"width": 1280, "height": 720},
        "screen": {"width": 1920, "height": 1080},
        "language": "en-US",
        "timezone": "Europe/Berlin",
        "sessionId": session,
        "projectId": project,
        "isNewVisitor": True,
        "landingPage": "https://example.com/",
    }
    data.update(changes)
    if data["timestamp"] is None:
        import time

        from bklit.wire import iso_timestamp

        data["timestamp"] = iso_timestamp(time.time())
    message = {"type": "pageview", "data": data}
    if key is not None:
        message["apiKey"] = key
    return message


def sdk_event(project: str, session: str = SESSION, key: str | None = None) -> dict:
    """A custom event shaped as ``trackEvent("cta-button", "click", {position: "hero"})`` sends it."""
    import time

    from bklit.wire import iso_timestamp

    message = {"type": "event", "data": {
        "trackingId": "cta-button", "eventType": "click", "timestamp": iso_timestamp(time.time()),
        "metadata": {"position": "hero", "triggerMethod": "manual"},
        "projectId": project, "sessionId": session,
    }}
    if key is not None:
        message["apiKey"] = key
    return message


class SocketClient(WebSocketClientProtocol):
    """Records messages in a queue and the close in ``closed``."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: defer.DeferredQueue = defer.DeferredQueue()
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.close_code: int | None = None

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.inbox.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        self.closed.callback((code, reason))

    def send(self, message: Any) -> None:
        """Send a JSON message (or raw bytes/str as they are)."""
        if isinstance(message, bytes):
            self.sendMessage(message)
        elif isinstance(message, str):
            self.sendMessage(message.encode())
        else:
            self.sendMessage(json.dumps(message).encode())

    async def next(self, timeout: float = TIMEOUT) -> dict:
        """The next message, failing after ``timeout`` seconds."""
        return await self.inbox.get().addTimeout(timeout, reactor)

    async def next_of(self, kind: str, timeout: float = TIMEOUT) -> dict:
        """The next message of ``kind``, skipping others."""
        while True:
            message = await self.next(timeout)
            if message.get("type") == kind:
                return message

    async def wait_closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str | None]:
        """The close code and reason, once the socket closed."""
        return await self.closed.addTimeout(timeout, reactor)


class _ProxyHeader(Protocol):
    """Writes a PROXY protocol line first, then hands the connection to ``inner`` (TLS or plain)."""

    def __init__(self, header: bytes, inner: Any):
        self.header = header
        self.inner = inner

    def makeConnection(self, transport: Any) -> None:
        transport.write(self.header)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self.inner.connectionLost(reason)


class _Wrapping(Factory):
    """Builds the inner factory's protocols behind a PROXY line."""

    def __init__(self, header: bytes, inner: Any):
        self.header = header
        self.inner = inner

    def buildProtocol(self, addr: Any) -> Any:
        built = self.inner.buildProtocol(addr)
        return None if built is None else _ProxyHeader(self.header, built)


class ProxyHeaderEndpoint:
    """A client endpoint that starts each connection with a PROXY protocol v1 line, as a TCP balancer does."""

    def __init__(self, endpoint: Any, client: str, client_port: int = 50000):
        family = "TCP6" if ":" in client else "TCP4"
        server = "::1" if family == "TCP6" else "127.0.0.1"
        self.endpoint = endpoint
        self.header = f"PROXY {family} {client} {server} {client_port} 8080\r\n".encode()

    def connect(self, factory: Any) -> defer.Deferred:
        return self.endpoint.connect(_Wrapping(self.header, factory)).addCallback(lambda wrapper: wrapper.inner)


async def connect(port: int, path: str = "/?projectId=p1&sessionId=" + SESSION,
                  headers: dict | None = None, origin: str | None = None,
                  trust: bytes | None = None, host: str = "localhost",
                  protocol: type[SocketClient] = SocketClient, proxied_from: str | None = None,
                  address: str = "127.0.0.1") -> SocketClient:
    """An open ``SocketClient`` (or subclass ``protocol``) to ``ws://<address>:<port><path>``
    (``address`` 127.0.0.1, or ``::1`` for IPv6).

    With ``trust`` (a PEM CA certificate) it speaks wss and verifies the
    server's certificate against that CA and ``host`` (service-identity).
    """
    scheme = "wss" if trust is not None else "ws"
    factory = WebSocketClientFactory(f"{scheme}://{host}:{port}{path}", headers=headers or {}, origin=origin)
    factory.protocol = protocol
    endpoint = (TCP6ClientEndpoint(reactor, address, port) if ":" in address
                else clientFromString(reactor, f"tcp:{address}:{port}"))
    if proxied_from is not None:  # a PROXY protocol line first (before TLS), as from a TCP balancer
        endpoint = ProxyHeaderEndpoint(endpoint, proxied_from)
    if trust is not None:
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=Certificate.loadPEM(trust)), endpoint)
    client = await endpoint.connect(factory)
    await client.opened.addTimeout(TIMEOUT, reactor)
    return client


async def two_nodes(stack, redis_url, clickhouse_url, **values):
    """Start node A and node B on one Redis and one ClickHouse."""
    a = await stack.enter_async_context(running_daemon(settings(redis_url, clickhouse_url, **values)))
    b = await stack.enter_async_context(running_daemon(settings(redis_url, clickhouse_url, **values)))
    return a, b


async def open_dashboard(port, key, project="p1", trust=None):
    """A dashboard authorized with a Bearer read key, past its snapshot (wss when given a CA)."""
    dash = await connect(port, path=f"/dashboard?projectId={project}", headers={"Authorization": f"Bearer {key}"},
                         trust=trust)
    assert (await dash.next())["type"] == "connected"
    snapshot = await dash.next()
    assert snapshot["type"] == "snapshot"
    return dash, snapshot


async def sdk_client(port, key, session=SESSION, origin=None, trust=None):
    """An SDK socket for project p1, authenticated (from ``origin`` if given; wss when given a CA)."""
    client = await connect(port, path=f"/?projectId=p1&sessionId={session}", origin=origin, trust=trust)
    await client.next_of("connected")
    client.send({"type": "auth", "apiKey": key})
    assert await client.next() == {"type": "auth_success"}
    return client


async def http_get(port, path, key=None, extra=None):
    """Status and JSON body of a GET, with a Bearer key when given (and ``extra`` headers)."""
    headers = Headers({b"authorization": [f"Bearer {key}".encode()]} if key else {})
    for name, value in (extra or {}).items():
        headers.addRawHeader(name.encode(), value.encode())
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode(), headers)
    return response.code, json.loads(await readBody(response))


SPOOLS = tempfile.TemporaryDirectory(prefix="bklit-test-spools-")


def settings(redis_url: str, clickhouse_url: str, **values: str) -> Any:
    """A Config for a test daemon: loopback port 0, fast writer."""
    flags = {"listen": values.pop("listen", "tcp:0:interface=127.0.0.1"), "redis": redis_url,
             "clickhouse": clickhouse_url}
    env = {"BKLIT_FLUSH_INTERVAL": "0.1", "BKLIT_TOKEN_CACHE_TTL": "0",
           "BKLIT_SPOOL_DIR": tempfile.mkdtemp(dir=SPOOLS.name)}
    env.update({f"BKLIT_{k.upper()}": str(v) for k, v in values.items()})
    return load_config(None, env, flags)


class Daemon:
    """A started ``BklitService`` and what tests need from it."""

    def __init__(self, service: BklitService, port: int | None):
        self.service = service
        self.port = port

    async def token(self, project: str = "p1", scope: str = "ingest", **kwargs: Any) -> str:
        """A new key stored in this daemon's Redis."""
        key, _ = await TokenStore(self.service.redis.call).create((project,), scope, **kwargs)
        return key


@asynccontextmanager
async def running_daemon(config: Any):
    """Start the daemon in this reactor; stop it on exit."""
    service = BklitService(config, reactor)
    service.startService()
    port = None
    if service.listener is not None:
        listening = await compat.listening_port(service.listener)
        port = listening.getHost().port
    await service.redis.ready().addTimeout(TIMEOUT, reactor)
    if service.writer is not None:
        await eventually(lambda: service.writer.prepare is None, timeout=TIMEOUT)
    try:
        yield Daemon(service, port)
    finally:
        await service.stopService()


def clickhouse_rows(clickhouse_url: str, query: str) -> list[tuple]:
    """Run a query against the test database, of one host or several (blocking; fine in tests)."""
    client = connect_clickhouse(clickhouse_url)
    try:
        return client.execute(query)
    finally:
        client.disconnect()


@asynccontextmanager
async def redis_connection(redis_url: str, reply_timeout: float = 5.0):
    """A started ``RedisService`` on the test's Redis, stopped afterwards."""
    from bklit.addresses import parse_redis_url
    from bklit.redis_client import RedisService

    redis = RedisService(parse_redis_url(redis_url), reply_timeout)
    redis.startService()
    try:
        await redis.ready().addTimeout(10, reactor)
        yield redis
    finally:
        await redis.stopService()


def free_port() -> int:
    """A loopback port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on the loopback port."""
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def eventually(check, timeout: float = 5.0, interval: float = 0.1) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout``."""
    waited = 0.0
    while True:
        try:
            value = check()
        except Exception as e:  # e.g. a table the writer has not created yet
            value = e
        else:
            if value:
                return value
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


BKLIT = os.path.join(os.path.dirname(sys.executable), "bklit")


def bklit(*args, env=None, timeout=30, stdin=None, cwd=None):
    """Run ``bklit ARGS`` with no BKLIT_* settings from the outside; the CompletedProcess."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("BKLIT_")}
    environ.update(env or {})
    return subprocess.run([BKLIT, *args], capture_output=True, text=True, timeout=timeout, env=environ,
                          input=stdin, cwd=cwd)


def insert(clickhouse_url: str, table: str, rows: list[dict]) -> None:
    """Store row dicts as the writer does (``to_insert_row``)."""
    client = connect_clickhouse(clickhouse_url)
    try:
        columns = ", ".join(schema.insert_columns(table))
        client.execute(f"INSERT INTO {table} ({columns}) VALUES", [schema.to_insert_row(table, r) for r in rows])
    finally:
        client.disconnect()


async def get(port, path):
    """Status and body of a GET to the daemon."""
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    return response.code, await readBody(response)


async def health(port):
    code, body = await get(port, "/healthz")
    return code, json.loads(body)
