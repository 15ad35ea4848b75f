"""Session-end latency and the cost of broadcasting to many dashboards.

    python bench/live.py [--closes 100] [--dashboards 100] [--events 500]

1. Session end: one dashboard watches; ``--closes`` times an SDK socket
   connects, authenticates, sends a pageview, gets its ack and closes.  The
   latency is from the client's close to the dashboard's ``session_end``.
2. Broadcast: ``--dashboards`` dashboards watch one project; one SDK socket
   sends ``--events`` pageviews closed-loop.  Reports the daemon's CPU per
   event compared with the same run without dashboards, and how long after
   the ack the last dashboard had the pageview (p50/p99).

With ``--port``, ``--key``, ``--read-key`` and ``--pid`` it measures a
daemon already running (bench/compare.py runs it so, against its stack)
instead of starting a stack of its own; ``--json`` prints one JSON object
instead of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from types import SimpleNamespace

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from _stack import Stack, cpu_seconds


class Client(WebSocketClientProtocol):
    """Puts every message, with its arrival time, in a queue."""

    def onOpen(self) -> None:
        self.inbox = defer.DeferredQueue()
        self.factory.opened.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:  # refused upgrade: say so rather than wait forever
            self.factory.opened.errback(RuntimeError(f"{self.factory.url}: closed before open ({reason})"))

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
    factory.opened = defer.Deferred().addTimeout(30, reactor)
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


def summary(args: argparse.Namespace, ends: list[float], base_cpu: float, fan_cpu: float,
            delays: list[float]) -> dict:
    """The numbers of both measurements (ms, us); NaN where no event reached every dashboard."""
    nan = float("nan")
    return {
        "end_p50": statistics.median(ends), "end_p99": pct(ends, 99), "end_worst": max(ends),
        "cpu_0": base_cpu / args.events * 1e6, "cpu_n": fan_cpu / args.events * 1e6,
        "per_dashboard": (fan_cpu - base_cpu) / args.events / max(1, args.dashboards) * 1e6,
        "fan_p50": statistics.median(delays) if delays else nan, "fan_p99": pct(delays, 99) if delays else nan,
        "seen": len(delays), "dashboards": args.dashboards, "events": args.events,
    }


def stack_for(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """A stack of its own, or the running daemon that the options name."""
    if args.port is None:
        return Stack()
    daemon = SimpleNamespace(pid=args.pid)
    return contextlib.nullcontext(SimpleNamespace(port=args.port, key=args.key, read_key=args.read_key,
                                                  project=args.project, daemon=daemon))


async def main(reactor_: object, args: argparse.Namespace) -> None:
    with stack_for(args) as stack:
        ends = await session_ends(stack, args.closes)
        base_cpu, _ = await broadcast(stack, 0, args.events)
        fan_cpu, delays = await broadcast(stack, args.dashboards, args.events)
    result = summary(args, ends, base_cpu, fan_cpu, delays)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'metric':48} {'value':>10}")
    print(f"{'session end at dashboard, median (ms)':48} {result['end_p50']:10.2f}")
    print(f"{'session end at dashboard, p99 (ms)':48} {result['end_p99']:10.2f}")
    print(f"{'session end at dashboard, worst (ms)':48} {result['end_worst']:10.2f}")
    print(f"{'daemon CPU per pageview, 0 dashboards (us)':48} {result['cpu_0']:10.0f}")
    print(f"{f'daemon CPU per pageview, {args.dashboards} dashboards (us)':48} {result['cpu_n']:10.0f}")
    print(f"{'broadcast cost per dashboard per event (us)':48} {result['per_dashboard']:10.1f}")
    if delays:
        print(f"{f'ack to last of {args.dashboards} dashboards, p50 (ms)':48} {result['fan_p50']:10.2f}")
        print(f"{f'ack to last of {args.dashboards} dashboards, p99 (ms)':48} {result['fan_p99']:10.2f}")
    print(f"{'events seen by every dashboard':48} {len(delays):10d} of {args.events}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--closes", type=int, default=100)
    parser.add_argument("--dashboards", type=int, default=100)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--port", type=int, help="a running daemon's port (else a stack of its own)")
    parser.add_argument("--key", help="its ingest key (with --port)")
    parser.add_argument("--read-key", help="its read key (with --port)")
    parser.add_argument("--project", default="bench", help="the keys' project (with --port)")
    parser.add_argument("--pid", type=int, help="the pid of its listening process (with --port)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    arguments = parser.parse_args()
    if arguments.port is not None and None in (arguments.key, arguments.read_key, arguments.pid):
        parser.error("--port needs --key, --read-key and --pid")
    task.react(lambda r: defer.ensureDeferred(main(r, arguments)))
