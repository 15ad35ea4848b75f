"""Prometheus metrics of one daemon, in a registry of its own.

Counters and histograms are updated where things happen; gauges that are
cheaper to read than to track (connections, dashboards, the stream) are
read when ``/metrics`` is scraped, and so are the process's own
(``process_open_fds`` against ``process_max_fds``, resident memory, CPU
seconds, ``python_gc_*``) and ``bklit_build_info``.  No counter or
histogram has a ``_created`` series (they would double what is scraped and
stored, for a time Prometheus does not need).  ``bklit.status.MetricsPage``
serves the text format.
"""

from __future__ import annotations

import platform
from typing import Any, Callable

import prometheus_client
from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram,
                               ProcessCollector, generate_latest)

from bklit import __version__

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000)


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        Gauge("bklit_build_info", "Always 1: the version of bklit and of Python this process runs.",
              ["version", "python"], registry=r).labels(__version__, platform.python_version()).set(1)
        self.connections = Gauge("bklit_connections", "Open WebSocket connections by kind.", ["kind"], registry=r)
        self.messages = Counter("bklit_messages", "SDK messages by type and outcome (acked or an error code).",
                                ["type", "outcome"], registry=r)
        self.acks_undelivered = Counter("bklit_acks_undelivered",
                                        "Accepted events whose ack could not be sent: their socket had gone.",
                                        ["type"], registry=r)
        self.ack_latency = Histogram("bklit_ack_duration_seconds", "From an event's arrival to its ack.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.stream_length = Gauge("bklit_stream_length", "Entries in the events stream (not yet stored).", registry=r)
        self.stream_pending = Gauge("bklit_stream_pending", "Entries read by writers but not yet acknowledged.",
                                    registry=r)
        self.batch_rows = Histogram("bklit_writer_batch_rows", "Rows per writer batch.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.insert_latency = Histogram("bklit_insert_duration_seconds", "Duration of one ClickHouse insert.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.insert_failures = Counter("bklit_insert_failures", "ClickHouse inserts that failed (retried).",
                                       registry=r)
        self.dead_letters = Counter("bklit_dead_letters", "Entries moved to the dead-letter stream.", registry=r)
        self.sessions_started = Counter("bklit_sessions_started", "Sessions started or resumed here.", ["kind"],
                                        registry=r)
        self.sessions_ended = Counter("bklit_sessions_ended", "Sessions ended by this node, by reason.", ["reason"],
                                      registry=r)
        self.frame_budget_closes = Counter(
            "bklit_frame_budget_closes", "Sockets closed 1008 for sending too many frames or fragments, by endpoint.",
            ["endpoint"], registry=r)
        self.dashboards_dropped = Counter("bklit_dashboards_dropped",
                                          "Dashboards disconnected for not reading, or for too many events"
                                          " held while their snapshot was read.", registry=r)
        self.tls_expiry = Gauge("bklit_tls_certificate_expiry_timestamp_seconds",
                                "When the served certificate expires (Unix time).", registry=r)
        self.tls_reloads = Counter("bklit_tls_reloads", "Certificate reload attempts by outcome.", ["outcome"],
                                   registry=r)
        self.bots_dropped = Counter("bklit_bots_dropped", "Events from bots acked but not stored (bot_policy drop).",
                                    ["type"], registry=r)
        self.geoip_build = Gauge("bklit_geoip_database_build_timestamp_seconds",
                                 "When the GeoIP database in use was built (Unix time).", registry=r)
        self.geoip_reloads = Counter("bklit_geoip_reloads", "GeoIP database reload attempts by outcome.", ["outcome"],
                                     registry=r)
        self.spool_operations = Counter("bklit_spool_operations", "Operations written to or replayed from the spool.",
                                        ["direction"], registry=r)
        self.operations_refused = Counter(
            "bklit_redis_operations_refused", "Operations Redis refused alone (a key of the wrong type), by kind;"
            " the rest of their batches was applied.", ["kind"], registry=r)
        self.spool_bytes = Gauge("bklit_spool_bytes", "Bytes waiting in the local spool.", registry=r)
        self.spooling = Gauge("bklit_spooling", "1 while accepted events go to the local spool, not Redis.",
                              registry=r)
        self.backpressure = Gauge("bklit_backpressure",
                                  "1 while the stream is longer than stream_max_length (ClickHouse behind).",
                                  registry=r)
        self.http_refused = Counter(
            "bklit_http_refused", "Plain HTTP requests and connections refused, by reason: failed WebSocket"
            " upgrades (sdk_upgrade, dashboard_upgrade), bad_request, uri_too_long, headers_too_large,"
            " bad_method, slow_request, too_many_connections.", ["reason"], registry=r)
        self.http_connections = Gauge("bklit_http_connections",
                                      "Open plain HTTP connections (not WebSockets).", registry=r)
        self.redis_primary = Gauge("bklit_redis_primary_info",
                                   "1 for the Redis server (host:port) that takes this node's commands now;"
                                   " with Sentinel it changes at a failover.", ["address"], registry=r)
        self.up = Gauge("bklit_up", "Whether a dependency answered the last health check.", ["dependency"],
                        registry=r)

    def watch_connections(self, kind: str, count: Callable[[], int]) -> None:
        """Report ``count()`` as the number of open ``kind`` connections."""
        self.connections.labels(kind).set_function(count)

    def watch_spool(self, spool: Any, producer: Any) -> None:
        """Report the spool's size and whether events go there."""
        self.spool_bytes.set_function(lambda: spool.size)
        self.spooling.set_function(lambda: int(producer.spooling))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
