"""The daemon's configuration: one frozen object built from four layers.

Defaults < the ini file (section ``[bklit]``) < environment variables
``BKLIT_<KEY>`` < command-line flags.  Every key is declared once in
``KEYS`` with its parser and the one line of help ``etc/bklit.ini`` repeats;
unknown keys in the file are refused, and so are ``BKLIT_`` variables that
look like a misspelt setting (others are only warned about:
``unknown_variables``), and every bad value is reported at once, each error
naming its key.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urlsplit

from bklit import parsers as p
from bklit.addresses import RedisAddress, hide_password, parse_redis_url
from bklit.clickhouse_urls import clickhouse_database

ROLES = ("all", "ingest", "writer")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


class ConfigError(Exception):
    """One or more configuration values are wrong.

    ``errors`` is a list of ``(key, message)``; ``str()`` gives one line per
    error, each naming its key.
    """

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{key}: {message}" for key, message in errors))


@dataclass(frozen=True)
class Key:
    """One configuration key: its default (as text), parser and help line."""

    default: str
    parse: Callable[[str], object]
    help: str


KEYS: dict[str, Key] = {
    "listen": Key(r"tcp6:8080:interface=\:\:", p.text, r"Twisted endpoint string to listen on (tcp6:8080:interface=\:\: takes IPv6 and IPv4 clients; tcp:8080 IPv4 only; reuseport:8080:interface=\:\: shared by several processes; systemd:domain=INET:index=0)."),
    "status_listen": Key("", p.text, "Endpoint string of this process's own /healthz and /metrics (tcp:9100:interface=127.0.0.1, unix:/run/bklit/status.sock); %i stands for instance. Empty: none."),
    "instance": Key("", p.instance, "Name of this process among several of one host (bklit-ingest@.service sets BKLIT_INSTANCE to its instance name); %i in status_listen is replaced by it."),
    "redis": Key("redis://127.0.0.1:6379/0", p.redis_url, "Redis URL: redis://[user:password@]host:port/db, rediss:// for TLS, redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db] to follow a Sentinel-managed primary."),
    "clickhouse": Key("clickhouse://default:@127.0.0.1:9000/bklit", p.clickhouse_url, "ClickHouse URL as clickhouse-driver's Client.from_url reads it; several hosts (replicas) comma-separated, host:port,host:port, tried in turn."),
    "clickhouse_cluster": Key("", p.identifier, "ClickHouse cluster (remote_servers) whose replicas of one shard hold the tables: bklit schema migrate makes them ON CLUSTER as ReplicatedReplacingMergeTree. Empty: plain tables on one server."),
    "tls_cert": Key("", p.text, "TLS certificate chain (Let's Encrypt fullchain.pem). Empty with tls_key empty: plain ws."),
    "tls_key": Key("", p.text, "TLS private key (Let's Encrypt privkey.pem), readable by the service user."),
    "tls_check_interval": Key("60", p.seconds(0, 86400), "Seconds between checks for renewed certificate files (0: only on SIGHUP)."),
    "role": Key("all", p.choice(*ROLES), "Which parts run here: all, ingest (WebSocket endpoints) or writer (stream to ClickHouse)."),
    "auto_migrate": Key("true", p.flag, "Create or upgrade the ClickHouse schema at start."),
    "redis_timeout": Key("5", p.seconds(0.1, 300), "Seconds to wait for a Redis reply before events go to the spool (or, without one, are refused as overloaded)."),
    "redis_min_replicas": Key("0", p.integer(0, 100), "Replicas that must confirm a batch (Redis WAIT) before its events are acked; an unconfirmed batch goes to the spool. 0: ack once the primary has it."),
    "redis_replica_timeout": Key("1", p.seconds(0.01, 60), "Seconds WAIT gives the replicas to confirm a batch (below redis_timeout)."),
    "spool_dir": Key("/var/lib/bklit/spool", p.text, "Directory of the local spool that keeps acked events while Redis cannot take them. Empty: no spool."),
    "spool_max_bytes": Key("1G", p.size(1 << 16, 1 << 50), "Size cap of the spool (K, M, G suffixes); past it events are refused as overloaded."),
    "stream_max_length": Key("1000000", p.integer(1, 1 << 62), "Stream length (events not yet in ClickHouse) past which /healthz and bklit_backpressure report a backlog."),
    "batch_size": Key("5000", p.integer(1, 1_000_000), "Most rows the writer inserts in one ClickHouse INSERT."),
    "flush_interval": Key("1", p.seconds(0.01, 3600), "Seconds between writer runs when the stream has no full batch waiting."),
    "claim_idle": Key("60", p.seconds(1, 86400), "Seconds an entry may stay pending at a consumer before another writer reclaims it."),
    "writer_threads": Key("2", p.integer(1, 64), "Threads (each with its own ClickHouse connection) that run inserts."),
    "max_message_size": Key("16384", p.integer(256, 1 << 24), "Largest SDK message in bytes; a larger one closes the socket with 1009."),
    "max_url_length": Key("2048", p.integer(16, 65536), "Longest url, referrer or landingPage in characters."),
    "max_metadata_size": Key("4096", p.integer(2, 1 << 20), "Largest event metadata, serialized as JSON, in bytes."),
    "rate_limit": Key("20", p.seconds(0.1, 1_000_000), "Messages a second one SDK socket may send on average (token bucket)."),
    "rate_burst": Key("50", p.integer(1, 1_000_000), "Messages one SDK socket may send at once above the average rate."),
    "frame_rate": Key("100", p.seconds(1, 1_000_000), "Frames of every kind (pings, pongs, fragments too) one authenticated socket may send a second on average; past the burst it is closed with 1008."),
    "frame_burst": Key("400", p.integer(10, 1_000_000), "Frames one authenticated socket may send at once above frame_rate."),
    "frame_rate_before_auth": Key("10", p.seconds(1, 1_000_000), "Frames a second a socket may send before it authenticates."),
    "frame_burst_before_auth": Key("100", p.integer(10, 1_000_000), "Frames a socket may send at once before it authenticates."),
    "max_fragments": Key("64", p.integer(1, 100_000), "Frames one message may be split into; more close the socket with 1008."),
    "max_sockets_per_project": Key("20000", p.integer(1, 10_000_000), "Open authenticated SDK sockets one project may have on this node; further ones get project_limit and 1008."),
    "max_new_sessions_per_minute": Key("3000", p.integer(1, 10_000_000), "Session ids one project may start a minute on this node; further sockets get project_limit and 1008."),
    "max_connections": Key("50000", p.integer(1, 10_000_000), "Open WebSocket sockets in all; further upgrades get HTTP 503."),
    "max_connections_per_ip": Key("64", p.integer(1, 10_000_000), "Open sockets from one client address (IPv6: one /64); further upgrades get HTTP 429."),
    "max_connections_per_network": Key("1024", p.integer(1, 10_000_000), "Open sockets from one network (an IPv4 /24 or an IPv6 /48; an IPv6 /56 gets a quarter); further upgrades get HTTP 429."),
    "auth_failures_max": Key("10", p.integer(1, 1_000_000), "Refused keys from one client within auth_failure_window that lock it out."),
    "auth_failure_window": Key("60", p.seconds(1, 86400), "Seconds over which refused keys are counted."),
    "auth_lockout": Key("300", p.seconds(0, 86400), "Seconds a locked-out client's upgrades get HTTP 429."),
    "handshake_timeout": Key("5", p.seconds(0.1, 300), "Seconds a new connection has for TLS and its first request (the WebSocket upgrade), and a kept-alive one for each further request, from its first byte; slower ones are dropped."),
    "http_idle_timeout": Key("5", p.seconds(0.1, 3600), "Seconds a plain HTTP connection may stay idle between requests (keep-alive) before it is closed."),
    "max_http_connections_per_ip": Key("16", p.integer(1, 1_000_000), "Plain HTTP connections (not yet WebSockets) open at once from one client address (IPv6: one /64); more are closed at once."),
    "ping_interval": Key("25", p.seconds(0, 3600), "Seconds between pings to each socket (0: none)."),
    "ping_timeout": Key("10", p.seconds(0, 3600), "Seconds a socket has to answer a ping before it is dropped."),
    "compression": Key("false", p.flag, "Accept per-message-deflate (messages are bounded after decompression too)."),
    "max_errors": Key("10", p.integer(1, 10000), "Errors one connection may cause before it is closed with 1008."),
    "auth_timeout": Key("10", p.seconds(0.1, 3600), "Seconds an SDK socket may stay open without presenting a valid API key."),
    "token_cache_ttl": Key("5", p.seconds(0, 3600), "Seconds an API key verdict (good or bad) is cached."),
    "token_stale_ttl": Key("3600", p.seconds(0, 7 * 86400), "Seconds a key that was good stays usable while Redis cannot be asked (0: refuse then)."),
    "heartbeat_interval": Key("15", p.seconds(0.05, 3600), "Seconds between refreshes of this node's live sessions in Redis."),
    "session_timeout": Key("90", p.seconds(0.1, 86400), "Seconds without a refresh after which the sweeper ends a session (its node died)."),
    "sweep_interval": Key("15", p.seconds(0.05, 3600), "Seconds between sweeps for sessions whose node died (one node sweeps at a time)."),
    "resume_window": Key("1800", p.seconds(1, 86400), "Seconds after its end during which a session can be resumed by a new socket."),
    "dashboard_origins": Key("", p.project_origins, "Comma-separated project=origin pairs (shop=https://app.example.com): dashboards of that project from that Origin need no read key. Empty: none."),
    "dashboard_auth_timeout": Key("5", p.seconds(0.1, 300), "Seconds a dashboard socket has to send its auth message."),
    "dashboard_connects_per_minute": Key("30", p.integer(1, 1_000_000), "Dashboard upgrades one client address may make a minute (each reads a snapshot from Redis); further ones get HTTP 429."),
    "dashboard_max_skipped": Key("100", p.integer(0, 1_000_000), "Live events a dashboard may miss (it stopped reading) or have held (its snapshot is being read) before it is disconnected."),
    "metrics_networks": Key("127.0.0.0/8,::1", p.proxies, "Comma-separated networks allowed to read /metrics (the port faces the internet)."),
    "health_interval": Key("5", p.seconds(0.05, 3600), "Seconds between the health checks /healthz reports (Redis, ClickHouse, the stream)."),
    "trusted_proxies": Key("", p.proxies, "Comma-separated addresses or networks of HTTP proxies whose client_ip_header is believed."),
    "client_ip_header": Key("x-forwarded-for", p.choice("x-forwarded-for", "x-real-ip"), "The header a trusted proxy puts the client address in (the only one believed): x-forwarded-for or x-real-ip."),
    "geoip_db": Key("", p.text, "MaxMind-format database (GeoLite2-City, DB-IP Lite City .mmdb) for region, city and coordinates. Empty: country only."),
    "log_level": Key("info", p.choice(*LOG_LEVELS), "Least severe log lines written: debug, info, warn, error or critical."),
    "log_journal": Key("auto", p.choice("auto", "true", "false"), "Start each log line with its priority (<4>) for journald: auto (when standard output is the journal, as under systemd), true or false."),
    "bot_policy": Key("drop", p.choice("drop", "mark"), "Events from crawlers and headless browsers: drop (acked, not stored) or mark (stored with is_bot = 1, live apart from people)."),
}


@dataclass(frozen=True)
class Config:
    """The daemon's settings, validated.  Build it with ``load_config``."""

    listen: str
    status_listen: str
    instance: str
    tls_cert: str
    tls_key: str
    tls_check_interval: float
    redis: str
    clickhouse: str
    clickhouse_cluster: str
    role: str
    auto_migrate: bool
    redis_timeout: float
    redis_min_replicas: int
    redis_replica_timeout: float
    spool_dir: str
    spool_max_bytes: int
    stream_max_length: int
    batch_size: int
    flush_interval: float
    claim_idle: float
    writer_threads: int
    max_message_size: int
    max_url_length: int
    max_metadata_size: int
    rate_limit: float
    rate_burst: int
    frame_rate: float
    frame_burst: int
    frame_rate_before_auth: float
    frame_burst_before_auth: int
    max_fragments: int
    max_sockets_per_project: int
    max_new_sessions_per_minute: int
    max_connections: int
    max_connections_per_ip: int
    max_connections_per_network: int
    auth_failures_max: int
    auth_failure_window: float
    auth_lockout: float
    handshake_timeout: float
    http_idle_timeout: float
    max_http_connections_per_ip: int
    ping_interval: float
    ping_timeout: float
    compression: bool
    max_errors: int
    auth_timeout: float
    token_cache_ttl: float
    token_stale_ttl: float
    heartbeat_interval: float
    session_timeout: float
    sweep_interval: float
    resume_window: float
    dashboard_origins: tuple[tuple[str, str], ...]
    dashboard_auth_timeout: float
    dashboard_max_skipped: int
    dashboard_connects_per_minute: int
    metrics_networks: tuple[str, ...]
    health_interval: float
    trusted_proxies: tuple[str, ...]
    client_ip_header: str
    geoip_db: str
    log_level: str
    log_journal: str
    bot_policy: str

    @property
    def redis_address(self) -> RedisAddress:
        """The parsed Redis URL."""
        return parse_redis_url(self.redis)

    @property
    def clickhouse_database(self) -> str:
        """The ClickHouse database events are stored in."""
        return clickhouse_database(self.clickhouse)

    @property
    def status_endpoint(self) -> str:
        """``status_listen`` with ``%i`` replaced by ``instance`` (empty: no status listener)."""
        return self.status_listen.replace("%i", self.instance)

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS (wss)."""
        return bool(self.tls_cert)

    @property
    def runs_ingest(self) -> bool:
        """Whether this process serves the WebSocket endpoints."""
        return self.role in ("all", "ingest")

    @property
    def runs_writer(self) -> bool:
        """Whether this process moves the stream into ClickHouse."""
        return self.role in ("all", "writer")

    def __repr__(self) -> str:
        """All values, with the passwords in the URLs replaced by ``***``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["redis"] = hide_password(self.redis)
        values["clickhouse"] = hide_password(self.clickhouse)
        return f"Config({', '.join(f'{name}={value!r}' for name, value in values.items())})"

    def as_text(self) -> dict[str, str]:
        """Every setting as an ini file would write it, passwords replaced by ``***``."""
        return {f.name: _as_text(getattr(self, f.name)) for f in dataclasses.fields(self)} | {
            "redis": hide_password(self.redis), "clickhouse": hide_password(self.clickhouse)}

    def replace(self, **changes: object) -> "Config":
        """A copy with some values changed (already parsed values)."""
        return dataclasses.replace(self, **changes)


assert set(KEYS) == {f.name for f in dataclasses.fields(Config)}


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join("=".join(item) if isinstance(item, tuple) else str(item) for item in value)
    return str(value)


def read_ini(path: str) -> dict[str, str]:
    """The ``[bklit]`` section of an ini file as raw strings.

    Raises ``ConfigError`` (key ``config``) when the file cannot be read or
    parsed.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as e:
        raise ConfigError([("config", f"cannot read {path}: {e.strerror}")]) from None
    except configparser.Error as e:
        raise ConfigError([("config", f"{path} is not a valid ini file: {e.message.splitlines()[0]}")]) from None
    if not parser.has_section("bklit"):
        raise ConfigError([("config", f"{path} has no [bklit] section")])
    return dict(parser.items("bklit"))


#: ``BKLIT_`` variables that are not settings: the ini file's path, and those
#: of ``bklit probe`` and the certbot deploy hook.
OTHER_VARIABLES = frozenset({"config", "probe_key", "tls_dir", "group", "reload_command"})
#: How alike (difflib's ratio) an unknown name and a setting must be for the
#: name to count as a misspelling of it.
MISSPELT = 0.8


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``BKLIT_`` variables that are neither settings nor misspelt ones (those are errors): to warn about."""
    found = []
    for env_name in environ:
        name = env_name[len("BKLIT_"):].lower()
        if (env_name.startswith("BKLIT_") and name not in KEYS and name not in OTHER_VARIABLES
                and not difflib.get_close_matches(name, KEYS, n=1, cutoff=MISSPELT)):
            found.append(env_name)
    return sorted(found)


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url.strip()).password)
    except ValueError:  # not a URL: its own check says so
        return False


def load_config(
    ini_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Config:
    """Merge the four layers and validate every value.

    ``flags`` maps key names to the raw flag values (``None`` = not given).
    Raises ``ConfigError`` listing every bad or unknown key.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[str, str]] = {name: (key.default, "default") for name, key in KEYS.items()}
    errors: list[tuple[str, str]] = []
    if ini_path:
        try:
            ini = read_ini(ini_path)
        except ConfigError as e:
            errors.extend(e.errors)
            ini = {}
        for name, value in ini.items():
            if name not in KEYS:
                errors.append((name, f"unknown key in {ini_path}"))
            else:
                raw[name] = (value, ini_path)
    for env_name, value in environ.items():
        if not env_name.startswith("BKLIT_"):
            continue
        name = env_name[len("BKLIT_"):].lower()
        if name in KEYS:
            raw[name] = (value, env_name)
        elif name not in OTHER_VARIABLES:
            close = difflib.get_close_matches(name, KEYS, n=1, cutoff=MISSPELT)
            if close:
                errors.append((env_name, f"unknown setting; did you mean BKLIT_{close[0].upper()}?"))
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name in ("redis", "clickhouse") and _has_password(value):
            errors.append((name, f"--{name} carries a password, which every user of this machine can read"
                                 f" (ps, /proc); put the URL in BKLIT_{name.upper()} or the ini file instead"))
            continue
        raw[name] = (value, f"--{name}")
    values: dict[str, object] = {}
    for name, (value, source) in raw.items():
        try:
            values[name] = KEYS[name].parse(value)
        except ValueError as e:
            where = "" if source in ("default", f"--{name}") else f" (from {source})"
            errors.append((name, f"{e}{where}"))
    if "%i" in str(values.get("status_listen", "")) and not values.get("instance"):
        errors.append(("status_listen", "has %i but instance is empty (bklit-ingest@.service sets BKLIT_INSTANCE)"))
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        missing = "tls_key" if values.get("tls_cert") else "tls_cert"
        errors.append((missing, "must be set together with " + ("tls_cert" if missing == "tls_key" else "tls_key")))
    if values.get("redis_min_replicas") and values.get("redis_replica_timeout", 0) >= values.get("redis_timeout", 0):
        errors.append(("redis_replica_timeout", f"must be below redis_timeout ({values['redis_timeout']:g} s): "
                                                "a WAIT that outlasts it would count as a lost reply"))
    if errors:
        raise ConfigError(errors)
    return Config(**values)  # type: ignore[arg-type]
