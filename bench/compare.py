"""bklit against a peer: the original product's hot path, reproduced in Node.

The peer (bench/peers/server.mjs, Node ``ws`` + ``ioredis``) does per
message what the original server did: JSON parse, ZADD the session, LPUSH
the event, PUBLISH a debug line, broadcast to the project's dashboards, ack,
awaiting each Redis command in turn.  It accepts any key and stores nothing
in ClickHouse, so it does less than bklit; this compares the socket path.

Each server gets the same closed-loop load (bench/_loadgen.py: C SDK
connections, each sending the next pageview after the previous ack) for the
same seconds, the measurements alternating bklit, peer, bklit, ...; the
table shows medians.  Then each holds N idle authenticated sockets opened
by a separate process, and the growth of its resident memory is divided by N.

    python bench/compare.py [--connections 500] [--seconds 8] [--runs 3] [--idle 1000]

Needs node and ``npm ci`` in bench/peers (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _stack import ROOT, RedisServer, Stack, cpu_seconds, free_port, rss_bytes, stop_process

HERE = Path(__file__).resolve().parent
PEER = HERE / "peers" / "server.mjs"


class Peer:
    """A throwaway Redis and the Node peer server in front of it."""

    def __enter__(self) -> "Peer":
        if not (HERE / "peers" / "node_modules").is_dir():
            sys.exit("bench/peers/node_modules is missing: run `npm ci` in bench/peers (or `make bench`)")
        self._tmp = tempfile.TemporaryDirectory()
        self.redis = RedisServer(Path(self._tmp.name) / "redis").start()
        self.port = free_port()
        self.process = subprocess.Popen(
            [shutil.which("node") or "node", str(PEER), str(self.port)],
            env=dict(os.environ, REDIS_URL=self.redis.url), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline()
        if not line.startswith("listening"):
            self.__exit__()
            sys.exit(f"the peer did not start: {line!r}")
        self.pid = self.process.pid
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process, 10)
        self.redis.stop()
        self._tmp.cleanup()


def load(port: int, key: str, pid: int, connections: int, seconds: float) -> dict:
    """One closed-loop run; adds the server's CPU share over the same window."""
    before = cpu_seconds(pid)
    out = subprocess.run([sys.executable, str(HERE / "_loadgen.py"), str(port), key, str(connections), str(seconds)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    # The load generator's 1 s grace for in-flight acks falls into this window too;
    # the server is idle then, so this slightly understates its share.
    result["server_cpu"] = (cpu_seconds(pid) - before) / result["elapsed"]
    return result


def idle_rss(port: int, key: str, pid: int, count: int) -> tuple[float, int]:
    """KB of server RSS per idle authenticated socket, and how many got authenticated."""
    time.sleep(0.5)
    before = rss_bytes(pid)
    holder = subprocess.Popen([sys.executable, str(HERE / "_idle.py"), str(port), key, str(count)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"idle sockets failed: {line!r}")
        ready = int(line.split()[1])
        time.sleep(2.0)
        after = rss_bytes(pid)
    finally:
        holder.terminate()
        holder.wait(30)
    return (after - before) / 1024 / max(ready, 1), ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000, help="idle authenticated sockets for the RSS measurement")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"bklit": [], "peer": []}
    idle: dict[str, tuple[float, int]] = {}
    with Stack() as stack, Peer() as peer:
        servers = {"bklit": (stack.port, stack.key, stack.daemon.pid), "peer": (peer.port, "any", peer.pid)}
        time.sleep(1.0)
        for name, (port, key, pid) in servers.items():
            idle[name] = idle_rss(port, key, pid, args.idle)
            print(f"{name:5} idle: {idle[name][0]:.1f} KB per socket ({idle[name][1]} authenticated)", flush=True)
        for run in range(args.runs):
            for name, (port, key, pid) in servers.items():
                r = load(port, key, pid, args.connections, args.seconds)
                results[name].append(r)
                print(f"run {run + 1} {name:5}: {r['rate']:8.0f} acked/s  p50 {r['p50']:6.1f} ms"
                      f"  p95 {r['p95']:6.1f} ms  p99 {r['p99']:6.1f} ms  server CPU {r['server_cpu']:4.2f}"
                      f"  loadgen CPU {r['cpu']:4.2f}  errors {r['errors']}", flush=True)

    def median(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name])

    rows = [("acked events/s", "rate", "{:.0f}"), ("ack latency p50 (ms)", "p50", "{:.1f}"),
            ("ack latency p95 (ms)", "p95", "{:.1f}"), ("ack latency p99 (ms)", "p99", "{:.1f}"),
            ("server CPU (1.0 = one core)", "server_cpu", "{:.2f}"), ("load generator CPU", "cpu", "{:.2f}")]
    print()
    print(f"{args.connections} connections, {args.seconds:g} s, median of {args.runs}; ratio = bklit / peer")
    print(f"{'metric':36} {'bklit':>10} {'peer':>10} {'ratio':>8}")
    table = [(label, median("bklit", field), median("peer", field), fmt) for label, field, fmt in rows]
    table.append((f"RSS per idle auth. socket (KB, N={args.idle})", idle["bklit"][0], idle["peer"][0], "{:.1f}"))
    for label, ours, theirs, fmt in table:
        ratio = f"{ours / theirs:8.2f}" if theirs else f"{'-':>8}"
        print(f"{label:36} {fmt.format(ours):>10} {fmt.format(theirs):>10} {ratio}")


if __name__ == "__main__":
    main()
