"""What a flood of abusive connections does to a well-behaved client's acks.

    python bench/flood.py [--abusers 2000] [--before 10] [--during 20] [--after 5] [--behaviours a,b]
    python bench/flood.py --each [KINDS] [--abusers 8] [--during 8]   # a row per kind of flood

Starts a throwaway stack (bench/_stack.py) whose daemon keeps its default
limits, except that it trusts 127.0.0.1 as a proxy: every client then
claims its own X-Forwarded-For address from the documentation ranges, so
per-address limits and lockouts act as they would in the wild.  One
well-behaved client (one socket, authenticated, a pageview every 50 ms,
each only after the previous ack) runs ``--before`` seconds alone, then
``--during`` seconds while ``bench/_flooder.py``, in its own process, keeps
``--abusers`` hostile connections going (never authenticating, garbage,
guessed keys, message floods with the public key, oversize messages, ping
floods, binary and invalid UTF-8 frames, slow handshakes, a crowd behind one
address; ``--behaviours`` picks some), then ``--after`` seconds alone
again.  Prints the good client's ack latency per phase, the CPU of the
daemon, Redis and ClickHouse, and how the abusive connections ended.
Everything stays on loopback and ends after the phases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from _stack import Stack, cpu_seconds, rss_bytes

DEFAULT_LIMITS = {"rate_limit": "20", "rate_burst": "50", "max_connections_per_ip": "64",
                  "trusted_proxies": "127.0.0.1"}
GOOD_ADDRESS = "198.51.100.1"
INTERVAL = 0.05
ACK_TIMEOUT = 5.0
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"


class GoodClient(WebSocketClientProtocol):
    """Authenticates, then sends a pageview every INTERVAL, never before the last ack arrived."""

    def onOpen(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (sent at, ack latency or None on timeout)
        self.errors: list[dict] = []
        self.sent_at = 0.0
        self.timeout = None
        self.running = True
        self.closed_with = None
        self.sendMessage(json.dumps({"type": "auth", "apiKey": self.factory.key}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        kind = message["type"]
        if kind == "auth_success":
            self.factory.ready.callback(self)
            self.send_one()
        elif kind == "ack":
            now = time.perf_counter()
            self.timeout.cancel()
            self.samples.append((self.sent_at, now - self.sent_at))
            reactor.callLater(max(0.0, self.sent_at + INTERVAL - now), self.send_one)
        elif kind == "error":
            self.errors.append(message)

    def send_one(self) -> None:
        if not self.running:
            return
        self.sent_at = time.perf_counter()
        data = {"url": "https://example.com/pricing", "userAgent": USER_AGENT, "projectId": "bench",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        self.sendMessage(json.dumps({"type": "pageview", "data": data}).encode())
        self.timeout = reactor.callLater(ACK_TIMEOUT, self.timed_out)

    def timed_out(self) -> None:
        self.samples.append((self.sent_at, None))
        self.send_one()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.running = False
        self.closed_with = (code, reason)
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()


async def good_client(port: int, key: str) -> GoodClient:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/?projectId=bench&sessionId=good-client",
                                     headers={"X-Forwarded-For": GOOD_ADDRESS}, useragent=USER_AGENT)
    factory.protocol = GoodClient
    factory.key = key
    factory.ready = defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await factory.ready


def cpu(stack: Stack) -> tuple[float, float, float]:
    """CPU seconds used so far by the daemon, Redis and ClickHouse."""
    return tuple(cpu_seconds(pid) for pid in (stack.daemon.pid, stack.redis.pid, stack.clickhouse.pid))


def summary(client: GoodClient, start: float, end: float) -> dict:
    """Acks, timeouts and latency percentiles (ms) of the pageviews sent in [start, end)."""
    window = [latency for sent, latency in client.samples if start <= sent < end]
    ms = sorted(latency * 1000 for latency in window if latency is not None)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, round(q / 100 * (len(ms) - 1)))] if ms else float("nan")

    return {"acks": len(ms), "timeouts": len(window) - len(ms), "p50": pct(50), "p99": pct(99),
            "max": ms[-1] if ms else float("nan"), "rate": len(ms) / (end - start)}


EACH = "pong_flood,continuation_flood,ping_flood,dashboard_auth,head"


async def each_kind(_: object, args: argparse.Namespace) -> None:
    """One table: the good client's ack latency alone, then during each kind of flood in turn."""
    with Stack(**DEFAULT_LIMITS) as stack:
        await task.deferLater(reactor, 1.0, lambda: None)
        client = await good_client(stack.port, stack.key)
        rows = []
        start = time.perf_counter()
        await task.deferLater(reactor, args.before, lambda: None)
        rows.append(("alone", start, time.perf_counter(), None))
        for kind in args.each.split(","):
            start = time.perf_counter()
            flooder = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("_flooder.py")), str(stack.port), stack.key,
                 str(args.abusers), str(args.during), kind], stdout=subprocess.PIPE, text=True)
            while flooder.poll() is None:
                await task.deferLater(reactor, 0.1, lambda: None)
            rows.append((kind, start, time.perf_counter(), json.loads(flooder.stdout.read())))
            await task.deferLater(reactor, 1.0, lambda: None)  # what is left drains
        client.running = False
        client.sendClose()
    print(f"{args.abusers} flooding connections per kind, {args.during:g} s each; the good client sends a"
          f" pageview every {INTERVAL * 1000:.0f} ms, the next after the ack")
    print(f"{'flood':20} {'acks':>5} {'timeouts':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}   how the flooding ended")
    for kind, begin, end, flood in rows:
        s = summary(client, begin, end)
        ended = "" if flood is None else ", ".join(
            f"{count} {outcome}" for outcome, count in sorted(flood["outcomes"].get(kind, {}).items(),
                                                               key=lambda item: -item[1])[:2])
        print(f"{kind:20} {s['acks']:5d} {s['timeouts']:8d} {s['p50']:7.1f} {s['p99']:7.1f} {s['max']:7.1f}   {ended}")
    errors = {f"{e['code']}: {e['message']}" for e in client.errors}
    print(f"good client: {len(client.errors)} errors {sorted(errors)}, socket "
          f"{'closed early ' + str(client.closed_with) if client.closed_with else 'open throughout'}")


async def main(_: object, args: argparse.Namespace) -> None:
    with Stack(**DEFAULT_LIMITS) as stack:
        await task.deferLater(reactor, 1.0, lambda: None)
        client = await good_client(stack.port, stack.key)
        peak = {"rss": 0}
        sampler = task.LoopingCall(lambda: peak.update(rss=max(peak["rss"], rss_bytes(stack.daemon.pid))))
        sampler.start(0.5)
        marks = {"before": (time.perf_counter(), cpu(stack))}
        await task.deferLater(reactor, args.before, lambda: None)

        marks["during"] = (time.perf_counter(), cpu(stack))
        rows_before = stack.count_rows()
        flooder = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_flooder.py")), str(stack.port), stack.key,
             str(args.abusers), str(args.during), args.behaviours], stdout=subprocess.PIPE, text=True)
        while flooder.poll() is None:
            await task.deferLater(reactor, 0.1, lambda: None)
        flood = json.loads(flooder.stdout.read())
        marks["after"] = (time.perf_counter(), cpu(stack))
        await task.deferLater(reactor, args.after, lambda: None)
        marks["end"] = (time.perf_counter(), cpu(stack))
        client.running = False
        closed_early = client.closed_with
        sampler.stop()
        await task.deferLater(reactor, 2.0, lambda: None)  # the writer catches up
        flood_rows = stack.count_rows() - rows_before - sum(
            1 for sent, latency in client.samples if sent >= marks["during"][0] and latency is not None)
        client.sendClose()

    phases = ["before", "during", "after", "end"]
    print(f"{'phase':8} {'seconds':>7} {'acks':>6} {'acks/s':>7} {'timeouts':>8} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'max ms':>8}   CPU: daemon  redis  clickhouse")
    for phase, following in zip(phases, phases[1:]):
        (start, cpu0), (end, cpu1) = marks[phase], marks[following]
        s = summary(client, start, end)
        shares = [(after - before) / (end - start) for before, after in zip(cpu0, cpu1)]
        print(f"{phase:8} {end - start:7.1f} {s['acks']:6d} {s['rate']:7.1f} {s['timeouts']:8d} {s['p50']:8.1f}"
              f" {s['p99']:8.1f} {s['max']:8.1f}        {shares[0]:6.0%} {shares[1]:6.0%} {shares[2]:11.0%}")
    errors = {f"{e['code']}: {e['message']}" for e in client.errors}
    print(f"good client: {len(client.errors)} errors {sorted(errors)}, socket "
          f"{'closed early ' + str(closed_early) if closed_early else 'open throughout'}")
    print(f"daemon peak RSS {peak['rss'] / 2**20:.0f} MiB; flooder CPU {flood['cpu']:.0%} of a core;"
          f" rows stored from the message floods: {flood_rows}")
    print()
    totals: dict[str, int] = {}
    for ended in flood["outcomes"].values():
        for outcome, count in ended.items():
            kind = " ".join(outcome.split()[:2]) if outcome.startswith(("HTTP", "closed")) else outcome
            totals[kind] = totals.get(kind, 0) + count
    print(f"abusive connections ({args.abusers} slots, each reconnecting 0.2-1 s after its connection ended):"
          f" {sum(flood['attempts'].values())} attempts")
    for kind, count in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {count:6d}  {kind}")
    print("by behaviour:")
    for behaviour, ended in flood["outcomes"].items():
        print(f"  {behaviour:15} {flood['attempts'].get(behaviour, 0):6d} attempts")
        for outcome, count in sorted(ended.items(), key=lambda item: -item[1]):
            print(f"  {'':15} {count:6d}  {outcome}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abusers", type=int, default=2000)
    parser.add_argument("--before", type=float, default=10)
    parser.add_argument("--during", type=float, default=20)
    parser.add_argument("--after", type=float, default=5)
    parser.add_argument("--behaviours", default="all", help="comma-separated, from bench/_flooder.py (default: all)")
    parser.add_argument("--each", nargs="?", const=EACH, default=None,
                        help="instead: one flood kind after the other, a row each (default kinds: %s)" % EACH)
    arguments = parser.parse_args()
    run = main if arguments.each is None else each_kind
    task.react(lambda r: defer.ensureDeferred(run(r, arguments)))
