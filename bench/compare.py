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
by a separate process, and the growth of its resident memory is divided by N:
once with ``--idle`` sockets, once with ``--many`` (10,000 by default; the
count of sockets that failed is reported too).

bklit runs as deployed for throughput (``--roles split``): an ingest process
and a writer process, each one's CPU reported.  For bklit the table also
has the pageview rows the writer stored per second during the load, how long
it needed after the load to store every acked event, and the delay from ack
to row visible in ClickHouse (every ``--sample``-th ack, polled every 0.1 s).

    python bench/compare.py [--connections 500] [--seconds 8] [--runs 3] [--idle 1000]
                            [--many 10000] [--roles split|all] [--sample 50]

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
import threading
import time
from pathlib import Path
from typing import Callable

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
        self.process = None
        self.restart()
        return self

    def restart(self) -> None:
        """(Re)start the Node process, on the same port."""
        if self.process is not None:
            stop_process(self.process, 10)
        self.process = subprocess.Popen(
            [shutil.which("node") or "node", str(PEER), str(self.port)],
            env=dict(os.environ, REDIS_URL=self.redis.url), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline()
        if not line.startswith("listening"):
            self.__exit__()
            sys.exit(f"the peer did not start: {line!r}")
        self.pid = self.process.pid

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process, 10)
        self.redis.stop()
        self._tmp.cleanup()


class Watcher:
    """Times sampled acks until their rows are visible in ClickHouse.

    Runs in a thread beside the load generator: every ``interval`` seconds
    one query asks which of the sampled event ids ClickHouse has; a row's
    delay is from its ack (the load generator's clock, the same machine's)
    to the end of the query that first saw it.
    """

    def __init__(self, url: str, interval: float = 0.1):
        self.url = url
        self.interval = interval
        self.pending: dict[str, float] = {}
        self.delays: list[float] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="visible", daemon=True)

    def count(self) -> int:
        """Pageview rows stored so far (its own connection: callable from any thread)."""
        from clickhouse_driver import Client

        client = Client.from_url(self.url)
        try:
            return client.execute("SELECT count() FROM page_view_event")[0][0]
        finally:
            client.disconnect()

    def add(self, event_id: str, acked_at: float) -> None:
        with self.lock:
            self.pending[event_id] = acked_at

    def _poll(self) -> None:
        from clickhouse_driver import Client

        client = Client.from_url(self.url)
        while True:
            with self.lock:
                ids = list(self.pending)
            if not ids and self.done.is_set():
                break
            if ids:
                found = client.execute("SELECT id FROM page_view_event WHERE id IN %(ids)s", {"ids": tuple(ids)})
                seen = time.time()
                with self.lock:
                    for (event_id,) in found:
                        self.delays.append((seen - self.pending.pop(event_id)) * 1000)
            time.sleep(self.interval)
        client.disconnect()

    def finish(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the sampled rows; returns how many never showed."""
        self.done.set()
        self.thread.join(timeout)
        with self.lock:
            missing = len(self.pending)
            self.pending.clear()
        self.thread.join()
        return missing


def load(port: int, key: str, pids: dict[str, int], connections: int, seconds: float,
         clickhouse: str | None, sample_every: int) -> dict:
    """One closed-loop run; adds each server process's CPU share over the load window.

    With ``clickhouse`` (bklit), also the pageview rows stored per second
    over the window, how long the writer took after it to store every acked
    event, and the ack-to-row-visible delays of every ``sample_every``-th ack.
    """
    watcher = Watcher(clickhouse) if clickhouse else None
    marks: list[tuple[float, dict[str, float], int]] = []

    def mark() -> None:
        marks.append((time.monotonic(), {role: cpu_seconds(pid) for role, pid in pids.items()},
                      watcher.count() if watcher else 0))

    def window() -> None:
        mark()
        time.sleep(seconds - (time.monotonic() - marks[0][0]))
        mark()

    timer = threading.Thread(target=window, name="window")
    loadgen = subprocess.Popen(
        [sys.executable, str(HERE / "_loadgen.py"), str(port), key, str(connections), str(seconds),
         str(sample_every if watcher else 0)], stdout=subprocess.PIPE, text=True)
    result = None
    for line in loadgen.stdout:
        if line.startswith("running"):
            timer.start()
            if watcher:
                watcher.thread.start()
        elif line.startswith("acked") and watcher:
            _, event_id, at = line.split()
            watcher.add(event_id, float(at))
        elif line.startswith("{"):
            result = json.loads(line)
    if loadgen.wait() != 0 or result is None:
        raise RuntimeError("the load generator failed")
    timer.join()
    (t0, cpu0, rows0), (t1, cpu1, rows1) = marks
    for role in pids:
        result[f"cpu_{role}"] = (cpu1[role] - cpu0[role]) / (t1 - t0)
    result["server_cpu"] = sum(result[f"cpu_{role}"] for role in pids)
    result["cpu_per_event"] = result["server_cpu"] / result["rate"] * 1e6 if result["rate"] else float("nan")
    if watcher:
        result["stored_rate"] = (rows1 - rows0) / (t1 - t0)
        started = time.monotonic()
        while watcher.count() < rows0 + result["acked"] and time.monotonic() - started < 60:
            time.sleep(0.05)
        result["drain"] = time.monotonic() - started
        result["missing"] = watcher.finish(30)
        delays = sorted(watcher.delays)
        result["visible_p50"] = percentile(delays, 50)
        result["visible_p99"] = percentile(delays, 99)
    return result


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def idle_rss(port: int, key: str, restart: Callable[[], list[int]], count: int) -> tuple[float, int, int]:
    """KB of server RSS per idle authenticated socket, how many got authenticated, how many failed.

    ``restart`` starts fresh server processes and returns their pids, so
    memory that earlier runs freed but a process kept does not hide the
    growth; the RSS of all of them counts.
    """
    pids = restart()
    time.sleep(1.0)
    before = sum(rss_bytes(pid) for pid in pids)
    holder = subprocess.Popen([sys.executable, str(HERE / "_idle.py"), str(port), key, str(count)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"idle sockets failed: {line!r}")
        _, ready, _, errors = line.split()
        time.sleep(2.0)
        after = sum(rss_bytes(pid) for pid in pids)
    finally:
        stop_process(holder, 30)
    return (after - before) / 1024 / max(int(ready), 1), int(ready), int(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000, help="idle authenticated sockets for the RSS measurement")
    parser.add_argument("--many", type=int, default=10000, help="idle sockets for the many-connections run (0: skip)")
    parser.add_argument("--roles", choices=("split", "all"), default="split",
                        help="bklit as separate ingest and writer processes (split) or one process (all)")
    parser.add_argument("--sample", type=int, default=50, help="time every N-th ack until its row is visible")
    parser.add_argument("--ingest", type=int, default=1,
                        help="bklit ingest processes sharing the port (reuseport:, roles split)")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"bklit": [], "peer": []}
    idle: dict[str, tuple[float, int, int]] = {}
    many: dict[str, tuple[float, int, int]] = {}
    with Stack(roles=args.roles, ingest=args.ingest) as stack, Peer() as peer:
        pids = stack.pids
        servers = {"bklit": (stack.port, stack.key, pids, stack.clickhouse_url),
                   "peer": (peer.port, "any", {"peer": peer.pid}, None)}
        restarts = {"bklit": lambda: (stack.restart_daemon(), [d.pid for d in stack.daemons])[1],
                    "peer": lambda: (peer.restart(), [peer.pid])[1]}
        for name, (port, key, procs, _) in servers.items():
            idle[name] = idle_rss(port, key, restarts[name], args.idle)
            print(f"{name:5} idle: {idle[name][0]:.1f} KB per socket ({idle[name][1]} authenticated,"
                  f" {idle[name][2]} errors)", flush=True)
        servers["bklit"] = (stack.port, stack.key, stack.pids, stack.clickhouse_url)
        servers["peer"] = (peer.port, "any", {"peer": peer.pid}, None)
        time.sleep(1.0)
        for run in range(args.runs):
            for name, (port, key, procs, clickhouse) in servers.items():
                r = load(port, key, procs, args.connections, args.seconds, clickhouse, args.sample)
                results[name].append(r)
                cpus = "  ".join(f"{role} CPU {r['cpu_' + role]:4.2f}" for role in procs)
                stored = (f"  stored {r['stored_rate']:6.0f}/s  visible p50 {r['visible_p50']:5.0f}"
                          f" p99 {r['visible_p99']:5.0f} ms" if clickhouse else "")
                print(f"run {run + 1} {name:5}: {r['rate']:8.0f} acked/s  p50 {r['p50']:6.1f} ms"
                      f"  p95 {r['p95']:6.1f} ms  p99 {r['p99']:6.1f} ms  {cpus}"
                      f"  loadgen CPU {r['cpu']:4.2f}  errors {r['errors']}{stored}", flush=True)
        if args.many:
            for name, (port, key, procs, _) in servers.items():
                many[name] = idle_rss(port, key, restarts[name], args.many)
                print(f"{name:5} {args.many} idle: {many[name][0]:.1f} KB per socket ({many[name][1]} authenticated,"
                      f" {many[name][2]} errors)", flush=True)

    def median(name: str, field: str) -> float:
        values = [r[field] for r in results[name] if field in r]
        return statistics.median(values) if values else float("nan")

    rows = [("acked events/s", "rate", "{:.0f}"), ("ack latency p50 (ms)", "p50", "{:.1f}"),
            ("ack latency p95 (ms)", "p95", "{:.1f}"), ("ack latency p99 (ms)", "p99", "{:.1f}"),
            ("server CPU, all processes (1.0 = one core)", "server_cpu", "{:.2f}")]
    rows += [(f"  bklit {role} process CPU", f"cpu_{role}", "{:.2f}") for role in pids]
    rows += [("server CPU per acked event (us)", "cpu_per_event", "{:.0f}")]
    rows += [("load generator CPU", "cpu", "{:.2f}"), ("load errors", "errors", "{:.0f}"),
             ("stored events/s by the writer (load window)", "stored_rate", "{:.0f}"),
             ("writer drain after the load (s)", "drain", "{:.2f}"),
             ("ack to row visible p50 (ms)", "visible_p50", "{:.0f}"),
             ("ack to row visible p99 (ms)", "visible_p99", "{:.0f}")]
    print()
    processes = f", {args.ingest} ingest processes on one port" if args.ingest > 1 else ""
    print(f"{args.connections} connections, {args.seconds:g} s, median of {args.runs}, bklit roles {args.roles}"
          f"{processes}; ratio = bklit / peer")
    print(f"{'metric':44} {'bklit':>10} {'peer':>10} {'ratio':>8}")
    table = [(label, median("bklit", field), median("peer", field), fmt) for label, field, fmt in rows]
    table.append((f"RSS per idle auth. socket (KB, N={args.idle})", idle["bklit"][0], idle["peer"][0], "{:.1f}"))
    if args.many:
        table.append((f"RSS per idle auth. socket (KB, N={args.many})", many["bklit"][0], many["peer"][0], "{:.1f}"))
        table.append((f"idle sockets authenticated of {args.many}", many["bklit"][1], many["peer"][1], "{:.0f}"))
        table.append((f"idle socket errors of {args.many}", many["bklit"][2], many["peer"][2], "{:.0f}"))
    for label, ours, theirs, fmt in table:
        show = [fmt.format(v) if v == v else "-" for v in (ours, theirs)]
        ratio = f"{ours / theirs:8.2f}" if theirs and theirs == theirs and ours == ours else f"{'-':>8}"
        print(f"{label:44} {show[0]:>10} {show[1]:>10} {ratio}")


if __name__ == "__main__":
    main()
