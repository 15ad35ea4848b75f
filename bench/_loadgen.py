"""The load generator behind bench/load.py and bench/compare.py (run as its own process).

    python bench/_loadgen.py PORT KEY CONNECTIONS SECONDS [SAMPLE_EVERY] [--rate R] [--wait]

Opens CONNECTIONS SDK sockets (at most 200 opening at a time; beyond 20,000
the client side is spread over source addresses 127.0.0.2, 127.0.0.3, ...
so ephemeral ports do not run out) and authenticates each.  It speaks raw
frames (bench/_rawws.py), so it costs less per message than the servers it
measures.  Then, for SECONDS:

- closed loop (no ``--rate``): each socket sends a pageview, waits for its
  ack, and sends the next;
- paced (``--rate R``): each socket sends R / CONNECTIONS pageviews a second,
  every gap drawn between half and one and a half of the mean, the first
  at a random point of one gap, whatever the acks do; the latency of each
  message is from its send to its ack (acks come back in order per socket).

On stdout: ``ready N errors E`` once the sockets are open (N authenticated, E
that failed to connect, upgrade or authenticate); with ``--wait`` it then
waits for a line on stdin: ``go`` starts the load, end of input closes the
sockets and exits without load (idle sockets held until then).  Then
``running WALL`` when the load starts; ``acked EVENT_ID WALL`` for every
SAMPLE_EVERY-th ack (0: none), as they come, so a watcher can time when
those rows become visible; last, one JSON object: acked count in the window,
rate, every latency (``ms``), percentiles, errors, own CPU share.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import sys
import time

from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory

from _rawws import RawClient

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("key")
parser.add_argument("connections", type=int)
parser.add_argument("seconds", type=float)
parser.add_argument("sample_every", type=int, nargs="?", default=0)
parser.add_argument("--rate", type=float, default=0, help="pageviews a second over all sockets (0: closed loop)")
parser.add_argument("--wait", action="store_true", help="wait for `go` on stdin before the load")
ARGS = parser.parse_args()
PER_SOURCE = 20_000
IN_FLIGHT = 200
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
state = {"running": False, "sending": False, "acked": 0, "errors": 0, "stamp": (0, "")}


def timestamp() -> str:
    """The client time of a pageview, recomputed once a second."""
    second = int(time.time())
    if state["stamp"][0] != second:
        state["stamp"] = (second, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second)))
    return state["stamp"][1]


class Sender(RawClient):
    """Authenticates, then sends pageviews while running: after each ack, or paced."""

    def on_open(self) -> None:
        self.ready = False
        self.sent_at: collections.deque[float] = collections.deque()
        data = json.dumps(dict(DATA, sessionId=self.factory.session, timestamp="@@"))
        head, tail = json.dumps({"type": "pageview", "data": "@@", "apiKey": ARGS.key}).split('"@@"')
        before, after = data.split("@@")
        self.parts = (f"{head}{before}".encode(), f"{after}{tail}".encode())
        self.send_text(json.dumps({"type": "auth", "apiKey": ARGS.key}).encode())

    def on_refused(self, status: str) -> None:
        self.factory.opened.errback(RuntimeError(status))

    def connectionLost(self, reason: object) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(RuntimeError("closed before auth_success"))

    def send_one(self) -> None:
        self.sent_at.append(time.perf_counter())
        self.send_text(self.parts[0] + timestamp().encode() + self.parts[1])

    def paced(self, gap: float) -> None:
        """Send one, then the next after a jittered ``gap`` while running."""
        if state["sending"]:
            self.send_one()
            reactor.callLater(gap * random.uniform(0.5, 1.5), self.paced, gap)

    def on_text(self, payload: bytes) -> None:
        if payload.startswith(ACK):
            sent = self.sent_at.popleft() if self.sent_at else None
            if not state["running"] or sent is None:
                return
            latencies.append(time.perf_counter() - sent)
            state["acked"] += 1
            if ARGS.sample_every and state["acked"] % ARGS.sample_every == 0:
                samples.append(f"acked {json.loads(payload)['eventId']} {time.time():.4f}")
            if not ARGS.rate and state["sending"]:
                self.send_one()
        elif payload.startswith(AUTHED):
            if not self.ready:
                self.ready = True
                self.factory.opened.callback(self)
        elif json.loads(payload)["type"] == "error":
            if self.sent_at:
                self.sent_at.popleft()
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
    source = None if ARGS.connections <= PER_SOURCE else (f"127.0.0.{2 + number % 250}", 0)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", ARGS.port, timeout=30, bindAddress=source).connect(factory)
    return await factory.opened


async def open_all() -> tuple[list[Sender], int]:
    """The authenticated sockets, and how many failed."""
    clients, errors = [], 0
    for start in range(0, ARGS.connections, IN_FLIGHT):
        batch = [defer.ensureDeferred(open_one(n)) for n in range(start, min(start + IN_FLIGHT, ARGS.connections))]
        for ok, value in await defer.DeferredList(batch, consumeErrors=True):
            if ok:
                clients.append(value)
            else:
                errors += 1
    return clients, errors


def start(clients: list[Sender]) -> None:
    if not ARGS.rate:
        for client in clients:
            client.send_one()
        return
    gap = len(clients) / ARGS.rate
    for client in clients:
        reactor.callLater(random.uniform(0, gap), client.paced, gap)


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clients, failed = await open_all()
    print(f"ready {len(clients)} errors {failed}", flush=True)
    if ARGS.wait and (await threads.deferToThread(sys.stdin.readline)).strip() != "go":
        for client in clients:
            client.close()
        return
    printer = task.LoopingCall(flush_samples)
    printer.start(0.2, now=False)
    cpu0, wall0 = os.times(), time.perf_counter()
    print(f"running {time.time():.4f}", flush=True)
    state["running"] = state["sending"] = True
    start(clients)
    await task.deferLater(reactor, ARGS.seconds, lambda: None)
    elapsed = time.perf_counter() - wall0
    cpu1 = os.times()
    acked = state["acked"]
    # Nothing is sent after the window; acks of what was sent in it still give latencies.
    state["sending"] = False
    await task.deferLater(reactor, 2.0, lambda: None)
    state["running"] = False
    printer.stop()
    flush_samples()
    ms = sorted(round(x * 1000, 3) for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q / 100 * (len(ms) - 1)))] if ms else float("nan")

    print(json.dumps({
        "acked": acked, "rate": acked / elapsed, "elapsed": elapsed, "sockets": len(clients),
        "errors": state["errors"] + failed, "p50": pct(50), "p95": pct(95), "p99": pct(99),
        "cpu": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed, "ms": ms,
    }), flush=True)
    for client in clients:
        client.close()


task.react(lambda _: defer.ensureDeferred(main()))
