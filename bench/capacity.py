"""The figures behind the README's capacity model ("Scaling"), measured on this machine.

    python bench/capacity.py [--connections 200] [--seconds 8]

Runs the benchmark stack (bench/_stack.py: Redis, ClickHouse, one ingest
process) with the writer stopped, puts the closed-loop SDK load of
bench/_loadgen.py on it for ``--seconds``, and reads Redis's ``INFO
commandstats`` and ``INFO stats`` before and after: the Redis commands and
bytes (in and out) per acked pageview on the ingest side, and the ingest
process's and Redis's CPU per acked pageview.  Then it starts one writer on the backlog
and reads the same once the stream is empty: the writer's Redis cost per
event, and how many rows a second one writer stores into ClickHouse while
it has a full batch waiting (its ceiling, not the rate of the load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _stack import BIN, Stack, cpu_seconds, stop_process  # noqa: I001 (puts tests/ on the path)

HERE = Path(__file__).resolve().parent


def redis_info(stack: Stack) -> tuple[dict[str, int], dict[str, int]]:
    """``({command: calls}, {stat: value})`` from INFO commandstats and INFO stats."""
    calls: dict[str, int] = {}
    for line in stack.redis.execute("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_"):].partition(":")
            calls[name] = int(dict(f.split("=") for f in fields.split(","))["calls"])
    stats = {}
    for line in stack.redis.execute("INFO", "stats").decode().splitlines():
        name, _, value = line.partition(":")
        if value.strip().isdigit():
            stats[name] = int(value)
    return calls, stats


def difference(before: tuple, after: tuple, events: int) -> dict:
    """Per-event commands (by name) and bytes between two ``redis_info`` readings."""
    (calls0, stats0), (calls1, stats1) = before, after
    per_command = {name: (calls1[name] - calls0.get(name, 0)) / events
                   for name in calls1 if calls1[name] != calls0.get(name, 0) and name != "info"}
    return {"commands": round(sum(per_command.values()), 4),
            "by_command": {name: round(n, 4) for name, n in sorted(per_command.items(), key=lambda kv: -kv[1])
                           if n >= 0.0005},
            "bytes_in": round((stats1["total_net_input_bytes"] - stats0["total_net_input_bytes"]) / events, 1),
            "bytes_out": round((stats1["total_net_output_bytes"] - stats0["total_net_output_bytes"]) / events, 1)}


def wait_for(condition, timeout: float = 300) -> float:
    """Poll ``condition`` every 20 ms until it holds; returns the time it did."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with Stack(roles="split") as stack:
        stop_process(stack.writer, 20)  # the stream keeps what ingest puts there
        time.sleep(1.0)
        before, cpu0, redis0 = redis_info(stack), cpu_seconds(stack.daemon.pid), cpu_seconds(stack.redis.pid)
        loadgen = subprocess.run(
            [sys.executable, str(HERE / "_loadgen.py"), str(stack.port), stack.key, str(args.connections),
             str(args.seconds)], capture_output=True, text=True, check=True)
        result = json.loads(loadgen.stdout.strip().splitlines()[-1])
        time.sleep(1.0)
        after, cpu1, redis1 = redis_info(stack), cpu_seconds(stack.daemon.pid), cpu_seconds(stack.redis.pid)
        events, acked = int(stack.redis.execute("XLEN", "bklit:events")), result["acked"]
        ingest = difference(before, after, acked)  # per acked pageview (the stream has session rows too)
        ingest.update(acked=acked, in_stream=events, acked_per_second=round(result["rate"]),
                      ingest_cpu_per_event_us=round((cpu1 - cpu0) / acked * 1e6, 1),
                      acked_per_ingest_core=round(acked / (cpu1 - cpu0)),
                      redis_cpu_per_event_us=round((redis1 - redis0) / acked * 1e6, 1))
        before, rows0 = after, stack.count_rows()
        stack.writer = subprocess.Popen([BIN / "twistd", "-n", "--pidfile=", "--logfile", "/dev/null", "bklit",
                                         "--role", "writer"], env=stack.env)
        first = wait_for(lambda: stack.count_rows() > rows0)  # the process started, its first batch is in
        first_rows = stack.count_rows()
        wait_for(lambda: int(stack.redis.execute("XLEN", "bklit:events")) == 0)
        drained, rows = time.monotonic() - first, stack.count_rows()
        writer = difference(before, redis_info(stack), events)
        writer.update(rows=rows - rows0, seconds=round(drained, 2),
                      rows_per_second=round((rows - first_rows) / drained))
        print(json.dumps({"ingest": ingest, "writer": writer}, indent=1))


if __name__ == "__main__":
    main()
