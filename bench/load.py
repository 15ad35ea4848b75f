"""Load a real daemon with SDK-shaped pageviews and print what it sustained.

Starts redis-server and clickhouse-server (throwaway, on free ports), runs
``twistd -n bklit`` as a subprocess, creates a key, then opens C WebSocket
connections (each its own session) that send pageviews closed-loop: the next
one after the previous ack.  Prints acked events/s, ack latency
percentiles, the daemon's CPU, and how fast the writer stored the events
(events/s until ClickHouse held them all).

    python bench/load.py [--connections 200] [--seconds 10] [--runs 3]

The load generator runs on the same machine and is an Autobahn client in one
Python process; its CPU is reported too, since it shares the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _stack import Stack, cpu_seconds


def run_load(port: int, key: str, connections: int, seconds: float) -> dict:
    """Drive the load in a child Python process (its own reactor)."""
    script = Path(__file__).with_name("_loadgen.py")
    out = subprocess.run(
        [sys.executable, str(script), str(port), key, str(connections), str(seconds)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_options(doc: str) -> argparse.Namespace:
    """``--connections``, ``--seconds`` and ``--runs`` of a benchmark whose docstring is ``doc``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = load_options(__doc__)

    results = []
    with Stack() as stack:
        time.sleep(1.0)
        for run in range(args.runs):
            before_rows = stack.count_rows()
            cpu_before = cpu_seconds(stack.daemon.pid)
            load = run_load(stack.port, stack.key, args.connections, args.seconds)
            daemon_cpu = (cpu_seconds(stack.daemon.pid) - cpu_before) / load["elapsed"]
            target = before_rows + load["acked"]
            started = time.monotonic()
            while stack.count_rows() < target and time.monotonic() - started < 60:
                time.sleep(0.05)
            drain = time.monotonic() - started
            stored_rate = load["acked"] / (load["elapsed"] + drain)
            results.append({**load, "daemon_cpu": daemon_cpu, "drain": drain, "stored_rate": stored_rate})
            print(f"run {run + 1}: {load['rate']:8.0f} acked/s  p50 {load['p50']:6.1f} ms"
                  f"  p95 {load['p95']:6.1f} ms  p99 {load['p99']:6.1f} ms  daemon CPU {daemon_cpu:4.0%}"
                  f"  loadgen CPU {load['cpu']:4.0%}  stored {stored_rate:8.0f}/s (drained {drain:.2f} s after)")

    def median(name: str) -> float:
        return statistics.median(r[name] for r in results)

    print()
    print(f"{'metric':32} {'median of ' + str(args.runs):>14}")
    print(f"{'connections':32} {args.connections:14d}")
    print(f"{'acked events/s':32} {median('rate'):14.0f}")
    print(f"{'ack latency p50 (ms)':32} {median('p50'):14.1f}")
    print(f"{'ack latency p95 (ms)':32} {median('p95'):14.1f}")
    print(f"{'ack latency p99 (ms)':32} {median('p99'):14.1f}")
    print(f"{'stored events/s (end to end)':32} {median('stored_rate'):14.0f}")
    print(f"{'drain after load stopped (s)':32} {median('drain'):14.2f}")
    print(f"{'daemon CPU (1.0 = one core)':32} {median('daemon_cpu'):14.2f}")
    print(f"{'load generator CPU':32} {median('cpu'):14.2f}")


if __name__ == "__main__":
    main()
