"""The load generator behind bench/load.py (run as its own process).

    python bench/_loadgen.py PORT KEY CONNECTIONS SECONDS

Opens CONNECTIONS SDK sockets, authenticates, then each sends a pageview,
waits for its ack, and sends the next until SECONDS have passed.  Prints one
JSON object: acked count, rate, latency percentiles (ms), own CPU share.
"""

from __future__ import annotations

import json
import os
import sys
import time

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

PORT, KEY, CONNECTIONS, SECONDS = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
DATA = {
    "url": "https://example.com/pricing?utm_source=bench", "referrer": "https://www.google.com/",
    "referrerHostname": "www.google.com", "referrerType": "organic",
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "viewport": {"width": 1280, "height": 720}, "screen": {"width": 1920, "height": 1080},
    "language": "en-US", "timezone": "Europe/Berlin", "projectId": "bench",
    "isNewVisitor": False, "landingPage": "https://example.com/",
}
latencies: list[float] = []
state = {"running": False, "acked": 0, "errors": 0}


class Sender(WebSocketClientProtocol):
    """Authenticates, then sends a pageview after each ack while running."""

    def onOpen(self) -> None:
        self.ready = False
        self.sessionId = self.factory.session
        self.sendMessage(json.dumps({"type": "auth", "apiKey": KEY}).encode())
        self.factory.opened.callback(self)

    def send_one(self) -> None:
        data = dict(DATA, sessionId=self.sessionId,
                    timestamp=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        self.sent_at = time.perf_counter()
        self.sendMessage(json.dumps({"type": "pageview", "data": data, "apiKey": KEY}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        kind = json.loads(payload)["type"]
        if kind == "auth_success":
            self.ready = True
        elif kind == "ack":
            latencies.append(time.perf_counter() - self.sent_at)
            state["acked"] += 1
            if state["running"]:
                self.send_one()
        elif kind == "error":
            state["errors"] += 1


async def main() -> None:
    clients = []
    for number in range(CONNECTIONS):
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{PORT}/?projectId=bench&sessionId=s{os.getpid()}-{number}")
        factory.protocol = Sender
        factory.session = f"s{os.getpid()}-{number}"
        factory.opened = defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", PORT).connect(factory)
        clients.append(await factory.opened)
    while not all(c.ready for c in clients):
        await task.deferLater(reactor, 0.05, lambda: None)
    cpu0, wall0 = os.times(), time.perf_counter()
    state["running"] = True
    for client in clients:
        client.send_one()
    await task.deferLater(reactor, SECONDS, lambda: None)
    state["running"] = False
    elapsed = time.perf_counter() - wall0
    acked = state["acked"]
    cpu1 = os.times()
    await task.deferLater(reactor, 1.0, lambda: None)  # let in-flight acks land
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q / 100 * (len(ms) - 1)))] if ms else float("nan")

    print(json.dumps({
        "acked": state["acked"], "rate": acked / elapsed, "elapsed": elapsed, "errors": state["errors"],
        "p50": pct(50), "p95": pct(95), "p99": pct(99),
        "cpu": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed,
    }))
    for client in clients:
        client.sendClose()


task.react(lambda _: defer.ensureDeferred(main()))
