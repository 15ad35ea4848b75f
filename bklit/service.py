"""The daemon's service tree: ``BklitService``, a ``bklit.lifecycle.OrderedService``.

Every long-lived part is a child:

1. ``RedisService`` — the connection everything else uses, started first;
2. pub/sub, the API, the writer (role ``all`` or ``writer``: the stream
   into ClickHouse, which first brings the schema up to date when
   ``auto_migrate`` is on), the stream producer; the writer, the migration
   and the health check use one ``ClickHousePool``, the API one of its own
   (short timeouts), started before them;
3. the timers: live sessions' heartbeat and sweeper, health checks,
   certificate checks, purges of the rate-limit tables;
4. the SDK and dashboard sockets, and last the listener (role ``all`` or
   ``ingest``) on the configured endpoint string;
5. with ``status_listen``, every role: this process's own /healthz and
   /metrics on an address of its own (started first, stopped last).

They stop one at a time in reverse: stop listening and close the sockets
with 1001, stop the timers, write what was accepted (to Redis, or to the
local spool while Redis cannot take it), the writer's last batch, then
the ClickHouse pools and Redis.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.web.resource import Resource

from bklit import compat
from bklit.api import THREADS as API_THREADS, Api, reader_url
from bklit.broadcast import Broadcaster
from bklit.clickhouse import ClickHousePool, Inserter, thd_migrate_with
from bklit.clickhouse_urls import server_url, with_timeouts
from bklit.dashboard import DashboardFactory, Dashboards
from bklit.health import HealthCheck
from bklit.httpd import HttpLimits, Refusals
from bklit.ingest import Ingest
from bklit.lifecycle import OrderedService, Part, Periodic
from bklit.limits import Admission
from bklit.livepage import LivePage
from bklit.metrics import Metrics
from bklit.notify import notify, reloading
from bklit.queue import StreamProducer
from bklit.redis_client import RedisService
from bklit.revocation import OpenKeys
from bklit.sdk import SdkFactory
from bklit.sessions import LiveSessions
from bklit.spool import Spool
from bklit.startup import EXIT_LISTEN, listen_reason, open_spool, tune_gc
from bklit.status import Networks, status_pages
from bklit.tls import CertificateWatch, LoadedPair, ReloadableTLS, TLSServerEndpoint, load_pair
from bklit.tokens import TokenStore, TokenVerifier
from bklit.web import LiveCount, Lockout, UpgradeResource, make_site, make_status_site
from bklit.writer import WriterService, consumer_name


# Seconds: a ClickHouse host that stops answering is given up for the next soon.
WRITER_CONNECT_TIMEOUT = 3
WRITER_RECEIVE_TIMEOUT = 30


class BklitService(OrderedService):
    """The daemon: its parts are child services, stopped one at a time as ``stop_order`` says.

    Stopped: stop listening; close the sockets with 1001 (their session
    ends are queued); stop the timers (health, certificates, purges), then
    the session heartbeat and sweeper, each after its run in progress;
    drain the producer's Redis operations (or spool them); the writer's
    final flush; the API; the ClickHouse pools (their threads joined, their
    clients closed); pub/sub; Redis; the status listener.  They start in
    the reverse order, the listener last.
    """

    log = Logger()
    log_observer: Any = None  # makeService's choice of log observer, for twistd's application
    tune_gc = False  # makeService's daemon tunes the collector of its process (see tune_gc)
    stop_order = ("listener", "sdk sockets", "dashboard sockets", "timers", "sessions", "producer",
                  "writer", "api", "clickhouse", "api clickhouse", "broadcaster", "redis", "status")

    def __init__(self, config: Any, reactor: Any, tls_pair: LoadedPair | None = None,
                 spool: Spool | None = None):
        super().__init__()
        self._parts: dict[str, Any] = {}
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.tls: ReloadableTLS | None = None
        if config.runs_ingest and config.tls:
            pair = tls_pair or load_pair(config.tls_cert, config.tls_key)
            self.tls = ReloadableTLS(config.tls_cert, config.tls_key, pair, self.metrics)
        self.node = consumer_name()
        self.redis = RedisService(config.redis_address, config.redis_timeout)
        self._add("redis", self.redis)
        if spool is None and config.runs_ingest and config.spool_dir:
            spool = open_spool(config)
        self.spool = spool
        self.producer = StreamProducer(self.redis, reactor, config.resume_window, spool=spool,
                                       metrics=self.metrics, min_replicas=config.redis_min_replicas,
                                       replica_timeout=config.redis_replica_timeout)
        if spool is not None:
            self.metrics.watch_spool(spool, self.producer)
        elif config.runs_ingest and config.redis_min_replicas:
            self.log.warn("redis_min_replicas is {n} but there is no spool_dir: events are refused as overloaded "
                          "while fewer replicas confirm them", n=config.redis_min_replicas)
        self.ingest: Ingest | None = None
        self.dashboards: Dashboards | None = None
        self.sessions: LiveSessions | None = None
        self.api: Api | None = None
        self.listener: Any = None
        self.site: Any = None
        self.writer: WriterService | None = None
        self.timers = OrderedService()
        self.api_clickhouse: ClickHousePool | None = None
        self.clickhouse: ClickHousePool | None = None
        if config.runs_ingest:
            self._build_endpoints()
        self._add("producer", Part("producer", self.producer.start, self.producer.drain))
        if config.runs_writer:
            # Connected to the default database: the migration may have to create ours.
            self.clickhouse = ClickHousePool(
                with_timeouts(server_url(config.clickhouse), WRITER_CONNECT_TIMEOUT, WRITER_RECEIVE_TIMEOUT),
                reactor, threads=config.writer_threads, name="bklit-clickhouse")
            self._add("clickhouse", self.clickhouse)
            self.writer = WriterService(
                self.redis, Inserter(config.clickhouse_database), reactor, clickhouse=self.clickhouse,
                consumer=self.node, batch_size=config.batch_size, flush_interval=config.flush_interval,
                claim_idle=config.claim_idle, prepare=self.migrate if config.auto_migrate else None,
                metrics=self.metrics)
            self._add("writer", self.writer)
        self.health = HealthCheck(self.redis, reactor, config.health_interval, self.metrics,
                                  clickhouse=self.clickhouse, connections=self._connection_counts,
                                  producer=self.producer if config.runs_ingest else None,
                                  stream_max_length=config.stream_max_length)
        self.health.setServiceParent(self.timers)
        if self.site is not None:
            pages = status_pages(self.health, self.metrics, Networks(config.metrics_networks))
            self.site.resource.named.update(pages)
        self.status: Any = None
        if config.status_endpoint:
            self._build_status()
        self._start_in_order()

    def _build_status(self) -> None:
        """This process's own /healthz and /metrics on ``status_listen`` (every role)."""
        config = self.config
        limits = HttpLimits(self.reactor, Refusals(self.reactor, self.metrics.http_refused),
                            handshake_timeout=config.handshake_timeout, idle_timeout=config.http_idle_timeout,
                            max_per_client=config.max_http_connections_per_ip)
        pages = status_pages(self.health, self.metrics, Networks(config.metrics_networks, unix=True))
        site = make_status_site(pages, limits)
        self.status = StreamServerEndpointService(
            endpoints.serverFromString(self.reactor, config.status_endpoint), site)
        compat.raise_bind_errors(self.status)
        self._add("status", self.status)

    def _add(self, name: str, service: Any) -> None:
        """Keep ``service`` to be started in the place ``_start_in_order`` gives it."""
        service.setName(name)
        self._parts[name] = service

    def _start_in_order(self) -> None:
        """Make the kept parts children, in start order (the reverse of ``stop_order``)."""
        self._add("timers", self.timers)
        for name in reversed(self.stop_order):
            if name in self._parts:
                self._parts.pop(name).setServiceParent(self)
        assert not self._parts, f"parts without a place in stop_order: {sorted(self._parts)}"

    def _connection_counts(self) -> dict[str, int]:
        return {"sdk": len(self.ingest.connections) if self.ingest else 0,
                "dashboards": len(self.dashboards.connected) if self.dashboards else 0}

    def _build_endpoints(self) -> None:
        """The SDK and dashboard endpoints, /api/live, and their listener."""
        config, reactor = self.config, self.reactor
        verifier = TokenVerifier(TokenStore(self.redis.call), reactor, config.token_cache_ttl,
                                 config.token_stale_ttl)
        self.sessions = LiveSessions(
            self.redis, self.producer, reactor, self.node,
            heartbeat_interval=config.heartbeat_interval, session_timeout=config.session_timeout,
            sweep_interval=config.sweep_interval, metrics=self.metrics)
        self._add("sessions", self.sessions)
        self.admission = Admission(
            reactor, max_total=config.max_connections, max_per_client=config.max_connections_per_ip,
            max_auth_failures=config.auth_failures_max, failure_window=config.auth_failure_window,
            lockout=config.auth_lockout, max_per_network=config.max_connections_per_network)
        self._every(config.auth_failure_window, self.admission.purge)
        open_keys = OpenKeys(verifier, reactor)  # the SDK's and the dashboards' sockets alike
        self.ingest = Ingest(config, verifier, self.producer, self.sessions, reactor, self.node, self.metrics,
                             self.admission, open_keys)
        self._add("sdk sockets", Part("sdk sockets", stop=self.ingest.close_all))
        self.metrics.watch_connections("sdk", lambda: len(self.ingest.connections))
        self._every(60, self.ingest.projects.purge)
        self.dashboards = Dashboards(
            verifier, self.sessions, reactor, origins=config.dashboard_origins,
            auth_timeout=config.dashboard_auth_timeout, max_skipped=config.dashboard_max_skipped,
            metrics=self.metrics, admission=self.admission, trusted_proxies=self.ingest.trusted_proxies,
            frame_limits=self.ingest.frame_limits, connects_per_minute=config.dashboard_connects_per_minute,
            client_ip_header=config.client_ip_header, open_keys=open_keys)
        self._add("dashboard sockets", Part("dashboard sockets", stop=self.dashboards.close_all))
        self._every(60, self.dashboards.connects.purge)
        if config.dashboard_origins:
            self.log.warn("dashboard_origins: the live streams of {projects} are readable by anyone who sends "
                          "the Origin listed for them (any client outside a browser can)",
                          projects=", ".join(sorted({p for p, _ in config.dashboard_origins})))
        dashboard_factory = DashboardFactory(self.dashboards, config)
        self.dashboards.broadcaster = Broadcaster(config.redis_address, dashboard_factory, open_keys)
        self._add("broadcaster", self.dashboards.broadcaster)
        api = Resource()
        lockout = Lockout(self.admission, self.ingest.trusted_proxies, config.client_ip_header)
        api.putChild(b"live", LiveCount(verifier, self.sessions, lockout))
        self.api_clickhouse = ClickHousePool(reader_url(config.clickhouse), reactor,
                                             threads=API_THREADS, name="bklit-api")
        self._add("api clickhouse", self.api_clickhouse)
        self.api = Api(self.api_clickhouse, verifier, self.redis.call, reactor, lockout=lockout)  # /api/stats, ...
        self._add("api", self.api)
        self.api.mount(api)
        refusals = Refusals(reactor, self.metrics.http_refused)
        self.http_limits = HttpLimits(
            reactor, refusals, handshake_timeout=config.handshake_timeout, idle_timeout=config.http_idle_timeout,
            max_per_client=config.max_http_connections_per_ip, trusted=config.trusted_proxies,
            proxy_protocol=config.listen.startswith("haproxy:"))
        self.metrics.http_connections.set_function(lambda: self.http_limits.open)
        site = self.site = make_site(SdkFactory(self.ingest), self.http_limits, {
            b"dashboard": UpgradeResource(dashboard_factory, "dashboard", refusals),
            b"api": api,
            b"live": LivePage(),
        })
        endpoint = endpoints.serverFromString(reactor, config.listen)
        if self.tls is not None:
            endpoint = TLSServerEndpoint(endpoint, self.tls)
            CertificateWatch(self.tls, reactor, config.tls_check_interval).setServiceParent(self.timers)
        else:
            self.log.warn("no tls_cert configured: serving plain ws:// on {listen}", listen=config.listen)
        self.listener = StreamServerEndpointService(endpoint, site)
        compat.raise_bind_errors(self.listener)  # a failed bind stops start-up, as strports does
        self._add("listener", self.listener)

    def _every(self, seconds: float, step: Any) -> None:
        """Run ``step`` every ``seconds`` while the daemon runs (a timer, first run at start)."""
        Periodic(seconds, step, self.reactor).setServiceParent(self.timers)

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks its application for an ILogObserver component before it
        # makes its own; this is how log_level and journald priorities apply.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd binds the port here, before the reactor runs startService: a
        # SIGHUP (systemctl reload) must not meet the default action, exit.
        self._handle_sighup()
        try:
            super().privilegedStartService()
        except CannotListenError as e:  # one line, not twistd's traceback
            # The status listener starts first: when the main one tried, the main one failed.
            tried = self.listener is not None and compat.listening_port(self.listener) is not None
            failed = "listen" if tried else "status_listen"
            self.log.critical("cannot listen on {endpoint} ({key}): {reason}", key=failed, reason=listen_reason(e),
                              endpoint=self.config.status_endpoint if failed == "status_listen" else self.config.listen)
            raise SystemExit(EXIT_LISTEN) from None

    def _handle_sighup(self) -> None:
        if getattr(self, "_previous_sighup", None) is None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)

    def startService(self) -> None:
        self._handle_sighup()
        super().startService()
        if self.tune_gc:
            tune_gc()
        # The listener is bound by now (a failed bind raised); ready once Redis answers.
        self.redis.ready().addCallback(lambda _: notify("READY=1", f"STATUS=role {self.config.role}"))

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # Only schedule: the reload runs in the reactor, not in the handler.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """What SIGHUP (``systemctl reload``) does, told to systemd around it."""
        reloading()
        try:
            self._reload_files()
        finally:
            notify("READY=1")

    def _reload_files(self) -> None:
        """Pick up renewed certificate and GeoIP files."""
        locator = self.ingest.locator if self.ingest is not None and self.ingest.locator.path else None
        if self.tls is None and locator is None:
            self.log.info("SIGHUP: nothing to reload (no TLS certificate or GeoIP database configured)")
            return
        if self.tls is not None:
            self.log.info("SIGHUP: reloading the TLS certificate")
            self.tls.reload()
        if locator is not None:
            self.log.info("SIGHUP: reloading the GeoIP database {path}", path=locator.path)
            locator.reload()

    async def migrate(self) -> None:
        """Bring the ClickHouse schema up to date (in the writer's ClickHouse pool)."""
        applied = await self.clickhouse.do(thd_migrate_with, self.config.clickhouse_database,
                                           self.config.clickhouse_cluster)
        if applied:
            self.log.info("schema migrated to version {version}", version=applied[-1])

    def stopService(self) -> defer.Deferred:
        """Tell systemd, give SIGHUP back, then stop the parts (see the class)."""
        notify("STOPPING=1")
        if getattr(self, "_previous_sighup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        return super().stopService()
