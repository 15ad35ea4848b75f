"""What waiting for a Redis replica costs: acked/s and p99 with redis_min_replicas 0 and 1.

One throwaway stack (Redis with one replica, ClickHouse, an ingest and a
writer process); the ingest process runs alternately with
``redis_min_replicas = 0`` (acked once the primary has a batch) and ``= 1``
(acked once WAIT says the replica has it too), the replica running in both,
under the same closed-loop load as bench/load.py.  Prints each run, then
the medians side by side with their ratio.

    python bench/replicas.py [--connections 200] [--seconds 10] [--runs 3]
"""

from __future__ import annotations

import statistics
import time

from _stack import Stack
from load import load_options, run_load

SETTINGS = (0, 1)


def main() -> None:
    args = load_options(__doc__)

    results: dict[int, list[dict]] = {n: [] for n in SETTINGS}
    with Stack(replicas=1) as stack:
        for run in range(args.runs):
            for replicas in SETTINGS:
                stack.env["BKLIT_REDIS_MIN_REPLICAS"] = str(replicas)
                stack.restart_daemon()
                time.sleep(1.0)
                load = run_load(stack.port, stack.key, args.connections, args.seconds)
                results[replicas].append(load)
                print(f"run {run + 1}, redis_min_replicas = {replicas}: {load['rate']:8.0f} acked/s"
                      f"  p50 {load['p50']:6.1f} ms  p99 {load['p99']:6.1f} ms  errors {load.get('errors', 0)}")

    def median(replicas: int, name: str) -> float:
        return statistics.median(r[name] for r in results[replicas])

    print()
    print(f"{'median of ' + str(args.runs) + ' runs':24} {'min_replicas 0':>15} {'min_replicas 1':>15} {'1 / 0':>8}")
    for label, name, form in (("acked events/s", "rate", ".0f"), ("ack latency p50 (ms)", "p50", ".1f"),
                              ("ack latency p99 (ms)", "p99", ".1f")):
        zero, one = median(0, name), median(1, name)
        print(f"{label:24} {zero:15{form}} {one:15{form}} {one / zero if zero else float('nan'):8.2f}")
    print(f"{'connections':24} {args.connections:15d} {args.connections:15d}")


if __name__ == "__main__":
    main()
