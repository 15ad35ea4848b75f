"""``twistd bklit``: command-line options and the service tree.

``Options.postOptions`` builds the frozen ``Config`` (so a bad value stops
twistd before the reactor runs, with one line per bad key), and
``makeService`` wires the services in the order they must start:

1. ``RedisService`` — the connection everything else uses;
2. the listener (role ``all`` or ``ingest``) — the SDK WebSocket endpoint
   and the HTTP resources, on the configured endpoint string;
3. ``WriterService`` (role ``all`` or ``writer``) — the stream into
   ClickHouse, which first brings the schema up to date when
   ``auto_migrate`` is on; it, the migration and the health check use one
   ``ClickHousePool`` (the API has one of its own, with short timeouts).

They stop in reverse: stop listening and close the sockets, write the last
batch (to Redis, or to the local spool while Redis cannot take it), close
the ClickHouse pools, then close Redis.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import endpoints
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from bklit.api import THREADS as API_THREADS, Api, reader_url
from bklit.clickhouse import ClickHousePool, Inserter, server_url, thd_migrate_with, with_timeouts
from bklit.config import ConfigError, load_config
from bklit.dashboard import Broadcaster, DashboardFactory, Dashboards
from bklit.geo import GeoError, load_city_db
from bklit.health import HealthCheck, HealthPage
from bklit.httpd import HttpLimits, Refusals
from bklit.ingest import Ingest, SdkFactory
from bklit.limits import Admission
from bklit.livepage import LivePage
from bklit.metrics import Metrics, MetricsPage, Networks
from bklit.notify import notify, reloading
from bklit.sessions import LiveSessions
from bklit.queue import StreamProducer
from bklit.redis_client import RedisService
from bklit.revocation import OpenKeys
from bklit.spool import Spool, SpoolError
from bklit.tls import CertificateWatch, LoadedPair, ReloadableTLS, TLSError, TLSServerEndpoint, load_pair
from bklit.tokens import TokenStore, TokenVerifier
from bklit.web import LiveCount, Lockout, UpgradeResource, make_site
from bklit.writer import WriterService, consumer_name


# Seconds: a ClickHouse host that stops answering is given up for the next soon.
WRITER_CONNECT_TIMEOUT = 3
WRITER_RECEIVE_TIMEOUT = 30


class Options(usage.Options):
    """Flags of ``twistd bklit``; every other setting comes from the ini file or env."""

    optParameters = [
        ["config", "c", None, "Path of the ini file (section [bklit]); env BKLIT_CONFIG."],
        ["listen", None, None, "Twisted endpoint string to listen on (default tcp:8080)."],
        ["redis", None, None, "Redis URL, redis://[user:password@]host:port/db (rediss:// for TLS,"
                              " redis+sentinel://host:port[,host:port...]/SERVICE[/db] under Sentinel)."],
        ["clickhouse", None, None, "ClickHouse URL, clickhouse://user:password@host:port[,host:port...]/database."],
        ["role", None, None, "all, ingest or writer (default all)."],
    ]

    def postOptions(self) -> None:
        """Build the configuration; exit with one line per bad key."""
        import os

        ini = self["config"] or os.environ.get("BKLIT_CONFIG")
        flags = {name: self[name] for name in ("listen", "redis", "clickhouse", "role")}
        try:
            self.config = load_config(ini, os.environ, flags)
            if self.config.runs_ingest:
                check_endpoint(self.config.listen)
        except ConfigError as e:
            raise SystemExit("\n".join(f"bklit: config error: {line}" for line in str(e).splitlines()))
        self.tls_pair = None
        if self.config.runs_ingest and self.config.tls:
            try:
                self.tls_pair = load_pair(self.config.tls_cert, self.config.tls_key)
            except TLSError as e:
                raise SystemExit(f"bklit: TLS error: {e}")
        if self.config.runs_ingest and self.config.geoip_db:
            try:  # checked here for a one-line error; Ingest reads it again
                load_city_db(self.config.geoip_db).close()
            except GeoError as e:
                raise SystemExit(f"bklit: GeoIP database error: {e}")
        self.spool = None
        if self.config.runs_ingest and self.config.spool_dir:
            try:
                self.spool = open_spool(self.config)
            except SpoolError as e:
                raise SystemExit(f"bklit: spool error: {e}")


def open_spool(config: Any) -> Spool:
    """The ingest node's spool, locked and checked (``SpoolError`` otherwise)."""
    from twisted.internet import reactor

    spool = Spool(config.spool_dir, config.spool_max_bytes, reactor)
    spool.open()
    return spool


def check_endpoint(description: str) -> None:
    """Raise ``ConfigError`` on ``listen`` unless Twisted can parse ``description``.

    Parsing makes the endpoint without listening on it, so a typo is one
    config error line at start-up rather than a traceback from makeService.
    """
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except IndexError:  # systemd: no socket passed at that index
        raise ConfigError([("listen", f"{description!r}: no socket was passed at that index")]) from None
    except Exception as e:
        raise ConfigError([("listen", f"{description!r} is not a usable endpoint string: {e}")]) from None


class BklitService(MultiService):
    """The daemon: starts its parts in order, stops them in reverse."""

    log = Logger()

    def __init__(self, config: Any, reactor: Any, tls_pair: LoadedPair | None = None,
                 spool: Spool | None = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.tls: ReloadableTLS | None = None
        if config.runs_ingest and config.tls:
            pair = tls_pair or load_pair(config.tls_cert, config.tls_key)
            self.tls = ReloadableTLS(config.tls_cert, config.tls_key, pair, self.metrics)
        self.node = consumer_name()
        self.redis = RedisService(config.redis_address, config.redis_timeout, reactor)
        self.redis.setServiceParent(self)
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
        self.api_clickhouse: ClickHousePool | None = None
        if config.runs_ingest:
            self._build_endpoints()
        self.clickhouse: ClickHousePool | None = None
        if config.runs_writer:
            # Connected to the default database: the migration may have to create ours.
            self.clickhouse = ClickHousePool(
                with_timeouts(server_url(config.clickhouse), WRITER_CONNECT_TIMEOUT, WRITER_RECEIVE_TIMEOUT),
                reactor, threads=config.writer_threads, name="bklit-clickhouse")
            self.clickhouse.setServiceParent(self)
            self.writer = WriterService(
                self.redis, Inserter(config.clickhouse_database), reactor, clickhouse=self.clickhouse,
                consumer=self.node, batch_size=config.batch_size, flush_interval=config.flush_interval,
                claim_idle=config.claim_idle, prepare=self.migrate if config.auto_migrate else None,
                metrics=self.metrics)
            self.writer.setServiceParent(self)
        self.health = HealthCheck(self.redis, reactor, config.health_interval, self.metrics,
                                  clickhouse=self.clickhouse, connections=self._connection_counts,
                                  producer=self.producer if config.runs_ingest else None,
                                  stream_max_length=config.stream_max_length)
        self.health.setServiceParent(self)
        if self.site is not None:
            networks = Networks(config.metrics_networks)
            self.site.resource.named[b"healthz"] = HealthPage(self.health, networks)
            self.site.resource.named[b"metrics"] = MetricsPage(self.metrics, networks)

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
        self.sessions.setServiceParent(self)
        self.admission = Admission(
            reactor, max_total=config.max_connections, max_per_client=config.max_connections_per_ip,
            max_auth_failures=config.auth_failures_max, failure_window=config.auth_failure_window,
            lockout=config.auth_lockout, max_per_network=config.max_connections_per_network)
        self._every(config.auth_failure_window, self.admission.purge)
        open_keys = OpenKeys(verifier, reactor)  # the SDK's and the dashboards' sockets alike
        self.ingest = Ingest(config, verifier, self.producer, self.sessions, reactor, self.node, self.metrics,
                             self.admission, open_keys)
        self.metrics.watch_connections("sdk", lambda: len(self.ingest.connections))
        self._every(60, self.ingest.projects.purge)
        self.dashboards = Dashboards(
            verifier, self.sessions, reactor, origins=config.dashboard_origins,
            auth_timeout=config.dashboard_auth_timeout, max_skipped=config.dashboard_max_skipped,
            metrics=self.metrics, admission=self.admission, trusted_proxies=self.ingest.trusted_proxies,
            frame_limits=self.ingest.frame_limits, connects_per_minute=config.dashboard_connects_per_minute,
            client_ip_header=config.client_ip_header, open_keys=open_keys)
        self._every(60, self.dashboards.connects.purge)
        if config.dashboard_origins:
            self.log.warn("dashboard_origins: the live streams of {projects} are readable by anyone who sends "
                          "the Origin listed for them (any client outside a browser can)",
                          projects=", ".join(sorted({p for p, _ in config.dashboard_origins})))
        dashboard_factory = DashboardFactory(self.dashboards, config)
        self.dashboards.broadcaster = Broadcaster(config.redis_address, dashboard_factory, open_keys)
        api = Resource()
        lockout = Lockout(self.admission, self.ingest.trusted_proxies, config.client_ip_header)
        api.putChild(b"live", LiveCount(verifier, self.sessions, lockout))
        self.api_clickhouse = ClickHousePool(reader_url(config.clickhouse), reactor,
                                             threads=API_THREADS, name="bklit-api")
        self.api_clickhouse.setServiceParent(self)
        self.api = Api(self.api_clickhouse, verifier, self.redis.call, reactor, lockout=lockout)  # /api/stats, ...
        self.api.setServiceParent(self)
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
            CertificateWatch(self.tls, reactor, config.tls_check_interval).setServiceParent(self)
        else:
            self.log.warn("no tls_cert configured: serving plain ws:// on {listen}", listen=config.listen)
        self.listener = StreamServerEndpointService(endpoint, site)
        self.listener._raiseSynchronously = True  # a failed bind stops start-up, as strports does
        self.listener.setServiceParent(self)

    def _every(self, seconds: float, step: Any) -> None:
        """Run ``step`` every ``seconds`` while the daemon runs (a child TimerService)."""
        timer = TimerService(seconds, step)
        timer.clock = self.reactor
        timer.setServiceParent(self)

    def privilegedStartService(self) -> None:
        # twistd binds the port here, before the reactor runs startService: a
        # SIGHUP (systemctl reload) must not meet the default action, exit.
        self._handle_sighup()
        super().privilegedStartService()

    def _handle_sighup(self) -> None:
        if getattr(self, "_previous_sighup", None) is None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)

    def startService(self) -> None:
        self._handle_sighup()
        super().startService()
        self.producer.start()
        if self.dashboards is not None:
            self.dashboards.broadcaster.start()
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
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.running = 0
        notify("STOPPING=1")
        if getattr(self, "_previous_sighup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        steps = [
            ("stop listening", self.listener and self.listener.stopService),
            ("close SDK sockets", self.ingest and self.ingest.close_all),
            ("close dashboards", self.dashboards and self.dashboards.close_all),
            ("stop the API", self.api and self.api.stopService),
            ("stop the session loops", self.sessions and self.sessions.stopService),
            ("store or spool what was accepted", self.producer.drain),
            ("stop the writer", self.writer and self.writer.stopService),
            ("close the ClickHouse pools", self._close_clickhouse),
            ("stop pub/sub", self.dashboards and self.dashboards.broadcaster.stop),
            ("close Redis", self.redis.stopService),
        ]
        for what, step in steps:
            if not step:
                continue
            try:
                await defer.maybeDeferred(step)
            except Exception:
                self.log.failure("shutdown: {what} failed", what=what)

    def _close_clickhouse(self) -> defer.Deferred:
        """Join the ClickHouse pools' threads (the writer's last batch is in) and close their clients."""
        pools = [pool for pool in (self.api_clickhouse, self.clickhouse) if pool is not None and pool.running]
        return defer.gatherResults([pool.stopService() for pool in pools])


def makeService(options: Options, reactor: Any = None) -> BklitService:
    """The service tree for ``twistd bklit``."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    return BklitService(options.config, reactor, options.tls_pair, options.spool)
