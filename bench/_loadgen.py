"""The load generator behind bench/load.py and bench/compare.py (run as its own process).

    python bench/_loadgen.py PORT KEY CONNECTIONS SECONDS [SAMPLE_EVERY]

Opens CONNECTIONS SDK sockets, authenticates, then each sends a pageview,
waits for its ack, and sends the next until SECONDS have passed.  It speaks
raw frames (bench/_rawws.py), so it costs less per message than the servers
it measures.

On stdout: ``running WALL`` when the load starts; ``acked EVENT_ID WALL``
for every SAMPLE_EVERY-th ack (0: none), as they come, so a watcher can
time when those rows become visible; last, one JSON object: acked count,
rate, latency percentiles (ms), errors, own CPU share.
"""

from __future__ import annotations

import json
import os
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory

from _rawws import RawClient

PORT, KEY, CONNECTIONS, SECONDS = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
SAMPLE_EVERY = int(sys.argv[5]) if len(sys.argv) > 5 else 0
DATA = {
    "url": "https://example.com/pricing?utm_source=bench", "referrer": "https://www.google.com/",
    "referrerHostname": "www.google.com", "referrerType": "organic",
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "viewport": {"width": 1280, "height": 720}, "screen": {"width": 1920, "height": 1080},
    "language": "en-US", "timezone": "Europe/Berlin", "projectId": "bench",
    "isNewVisitor": False, "landingPage": "https://example.com/",
}
ACK = b'{"type":"ack"'
AUTHED = b'{"type":"auth_success"'
latencies: list[float] = []
samples: list[str] = []
state = {"running": False, "acked": 0, "errors": 0, "refused": 0, "stamp": (0, "")}


def timestamp() -> str:
    """The client time of a pageview, recomputed once a second."""
    second = int(time.time())
    if state["stamp"][0] != second:
        state["stamp"] = (second, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second)))
    return state["stamp"][1]


class Sender(RawClient):
    """Authenticates, then sends a pageview after each ack while running."""

    def on_open(self) -> None:
        self.ready = False
        data = json.dumps(dict(DATA, sessionId=self.factory.session, timestamp="@@"))
        head, tail = json.dumps({"type": "pageview", "data": "@@", "apiKey": KEY}).split('"@@"')
        before, after = data.split("@@")
        self.parts = (f"{head}{before}".encode(), f"{after}{tail}".encode())
        self.send_text(json.dumps({"type": "auth", "apiKey": KEY}).encode())

    def on_refused(self, status: str) -> None:
        state["refused"] += 1
        self.factory.opened.errback(RuntimeError(status))

    def send_one(self) -> None:
        self.sent_at = time.perf_counter()
        self.send_text(self.parts[0] + timestamp().encode() + self.parts[1])

    def on_text(self, payload: bytes) -> None:
        if payload.startswith(ACK):
            latencies.append(time.perf_counter() - self.sent_at)
            state["acked"] += 1
            if SAMPLE_EVERY and state["acked"] % SAMPLE_EVERY == 0:
                samples.append(f"acked {json.loads(payload)['eventId']} {time.time():.4f}")
            if state["running"]:
                self.send_one()
        elif payload.startswith(AUTHED):
            if not self.ready:
                self.ready = True
                self.factory.opened.callback(self)
        elif json.loads(payload)["type"] == "error":
            state["errors"] += 1


def flush_samples() -> None:
    if samples:
        sys.stdout.write("\n".join(samples) + "\n")
        sys.stdout.flush()
        samples.clear()


async def open_one(number: int) -> Sender:
    factory = Factory.forProtocol(Sender)
    factory.session = f"s{os.getpid()}-{number}"
    factory.path = f"/?projectId=bench&sessionId={factory.session}"
    factory.opened = defer.Deferred().addTimeout(60, reactor)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", PORT).connect(factory)
    return await factory.opened


async def main() -> None:
    clients = []
    for start in range(0, CONNECTIONS, 100):
        opened = await defer.gatherResults(
            [defer.ensureDeferred(open_one(n)) for n in range(start, min(start + 100, CONNECTIONS))])
        clients.extend(opened)
    printer = task.LoopingCall(flush_samples)
    printer.start(0.2, now=False)
    cpu0, wall0 = os.times(), time.perf_counter()
    print(f"running {time.time():.4f}", flush=True)
    state["running"] = True
    for client in clients:
        client.send_one()
    await task.deferLater(reactor, SECONDS, lambda: None)
    state["running"] = False
    elapsed = time.perf_counter() - wall0
    acked = state["acked"]
    cpu1 = os.times()
    await task.deferLater(reactor, 1.0, lambda: None)  # let in-flight acks land
    printer.stop()
    flush_samples()
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q / 100 * (len(ms) - 1)))] if ms else float("nan")

    print(json.dumps({
        "acked": state["acked"], "rate": acked / elapsed, "elapsed": elapsed,
        "errors": state["errors"] + state["refused"],
        "p50": pct(50), "p95": pct(95), "p99": pct(99),
        "cpu": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed,
    }), flush=True)
    for client in clients:
        client.close()


task.react(lambda _: defer.ensureDeferred(main()))
