"""Session-end latency and the cost of broadcasting to many dashboards.

    python bench/live.py [--closes 100] [--dashboards 100] [--events 500]

1. Session end: one dashboard watches; ``--closes`` times an SDK socket
   connects, authenticates, sends a pageview, gets its ack and closes.  The
   latency is from the client's close to the dashboard's ``session_end``.
2. Broadcast: ``--dashboards`` dashboards watch one project; one SDK socket
   sends ``--events`` pageviews closed-loop.  Reports the daemon's CPU per
   event compared with the same run without dashboards, and how long after
   the ack the last dashboard had the pageview (p50/p99).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from _stack import Stack, cpu_seconds


class Client(WebSocketClientProtocol):
    """Puts every message, with its arrival time, in a queue."""

    def onOpen(self) -> None:
        self.inbox = defer.DeferredQueue()
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        message["_at"] = time.perf_counter()
        if hasattr(self, "on_message"):
            self.on_message(message)
        else:
            self.inbox.put(message)

    async def next_of(self, kind: str) -> dict:
        while True:
            message = await self.inbox.get()
            if message["type"] == kind:
                return message


async def connect(port: int, path: str, headers: dict | None = None) -> Client:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", headers=headers or {})
    factory.protocol = Client
    factory.opened = defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await factory.opened


def pageview(project: str, session: str, key: str) -> bytes:
    return json.dumps({"type": "pageview", "apiKey": key, "data": {
        "url": "https://example.com/bench", "referrer": None, "userAgent": "bench",
        "viewport": {"width": 1280, "height": 720}, "screen": {"width": 1920, "height": 1080},
        "language": "en", "timezone": "UTC", "projectId": project, "sessionId": session,
        "isNewVisitor": False, "landingPage": "https://example.com/"}}).encode()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * (len(ordered) - 1)))]


async def session_ends(stack: Stack, closes: int) -> list[float]:
    dash = await connect(stack.port, f"/dashboard?projectId={stack.project}",
                         {"Authorization": f"Bearer {stack.read_key}"})
    await dash.next_of("snapshot")
    latencies = []
    for number in range(closes):
        session = f"end-{number}"
        sdk = await connect(stack.port, f"/?projectId={stack.project}&sessionId={session}")
        sdk.sendMessage(json.dumps({"type": "auth", "apiKey": stack.key}).encode())
        sdk.sendMessage(pageview(stack.project, session, stack.key))
        await sdk.next_of("ack")
        closed = time.perf_counter()
        sdk.sendClose()
        end = await dash.next_of("session_end")
        latencies.append((end["_at"] - closed) * 1000)
    dash.sendClose()
    return latencies


async def broadcast(stack: Stack, dashboards: int, events: int) -> tuple[float, list[float]]:
    """CPU seconds of the daemon for ``events`` pageviews, and fan-out delays (ms)."""
    watchers = []
    arrivals: dict[str, list[float]] = {}
    for _ in range(dashboards):
        dash = await connect(stack.port, f"/dashboard?projectId={stack.project}",
                             {"Authorization": f"Bearer {stack.read_key}"})
        await dash.next_of("snapshot")
        dash.on_message = lambda m: arrivals.setdefault(m["data"].get("eventId", ""), []).append(m["_at"])
        watchers.append(dash)
    session = f"fan-{dashboards}"
    sdk = await connect(stack.port, f"/?projectId={stack.project}&sessionId={session}")
    sdk.sendMessage(json.dumps({"type": "auth", "apiKey": stack.key}).encode())
    await sdk.next_of("auth_success")
    acked_at = {}
    cpu0 = cpu_seconds(stack.daemon.pid)
    for _ in range(events):
        sdk.sendMessage(pageview(stack.project, session, stack.key))
        ack = await sdk.next_of("ack")
        acked_at[ack["eventId"]] = ack["_at"]
    await task.deferLater(reactor, 0.5, lambda: None)
    cpu = cpu_seconds(stack.daemon.pid) - cpu0
    delays = [(max(arrivals[e]) - at) * 1000 for e, at in acked_at.items()
              if dashboards and len(arrivals.get(e, [])) == dashboards]
    for dash in watchers:
        dash.sendClose()
    sdk.sendClose()
    await task.deferLater(reactor, 0.5, lambda: None)
    return cpu, delays


async def main(reactor_: object, args: argparse.Namespace) -> None:
    with Stack() as stack:
        ends = await session_ends(stack, args.closes)
        base_cpu, _ = await broadcast(stack, 0, args.events)
        fan_cpu, delays = await broadcast(stack, args.dashboards, args.events)
    print(f"{'metric':48} {'value':>10}")
    print(f"{'session end at dashboard, median (ms)':48} {statistics.median(ends):10.2f}")
    print(f"{'session end at dashboard, p99 (ms)':48} {pct(ends, 99):10.2f}")
    print(f"{'session end at dashboard, worst (ms)':48} {max(ends):10.2f}")
    print(f"{'daemon CPU per pageview, 0 dashboards (us)':48} {base_cpu / args.events * 1e6:10.0f}")
    print(f"{f'daemon CPU per pageview, {args.dashboards} dashboards (us)':48} {fan_cpu / args.events * 1e6:10.0f}")
    per = (fan_cpu - base_cpu) / args.events / max(1, args.dashboards) * 1e6
    print(f"{'broadcast cost per dashboard per event (us)':48} {per:10.1f}")
    if delays:
        print(f"{f'ack to last of {args.dashboards} dashboards, p50 (ms)':48} {statistics.median(delays):10.2f}")
        print(f"{f'ack to last of {args.dashboards} dashboards, p99 (ms)':48} {pct(delays, 99):10.2f}")
    print(f"{'events seen by every dashboard':48} {len(delays):10d} of {args.events}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--closes", type=int, default=100)
    parser.add_argument("--dashboards", type=int, default=100)
    parser.add_argument("--events", type=int, default=500)
    arguments = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(main(r, arguments)))
