"""Real redis-server, redis-sentinel and clickhouse-server processes for tests and development.

Each server runs from its own directory on a loopback port, with a generated
configuration, and can be stopped, killed and restarted on the same port and
data directory (fault tests do that mid-test). Only the standard library is
used, so ``scripts/dev-services`` can import this module from any Python 3.

Tests normally use the fixtures in ``conftest.py`` instead of these classes.
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

LOOPBACK = "127.0.0.1"

#: Where Debian keeps daemons that are not on a normal user's PATH.
EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

#: Every server started without ``detach``, so none outlives the interpreter.
_children = set()


class ServerError(RuntimeError):
    """A server binary is missing, or the server did not start or stop."""


def free_port(host=LOOPBACK):
    """Return a TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_binary(*names):
    """Return the path of the first of ``names`` found on PATH or in sbin."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_BIN_DIRS])
    for name in names:
        path = shutil.which(name, path=search)
        if path:
            return path
    return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Server:
    """One server process with start, stop, kill and restart.

    ``base_dir`` holds the configuration, the data and ``server.log`` (the
    process' stdout and stderr). Without ``base_dir`` a temporary directory
    is made and removed by ``cleanup()``. A ``detach``-ed server runs in its
    own session, is not stopped when this interpreter exits, and records
    its pid in ``server.pid`` so a later process can ``adopt()`` it.
    """

    name = "server"
    host = LOOPBACK
    start_timeout = 30.0
    stop_timeout = 30.0
    #: Seconds between SIGTERMs while the server has not exited (None: one SIGTERM).
    term_again = None

    def __init__(self, base_dir=None, port=None, detach=False):
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix="bklit-%s-" % (self.name,))
        self.base_dir = Path(base_dir).resolve()
        self.port = port or free_port()
        self.detach = detach
        self.process = None
        self.pid = None

    @property
    def log_path(self):
        """The file that receives the server's stdout and stderr."""
        return self.base_dir / "server.log"

    @property
    def pid_path(self):
        """The pid file written for every start."""
        return self.base_dir / "server.pid"

    @property
    def running(self):
        """Whether the process started or adopted by this object is alive."""
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    def ports(self):
        """Every port the server listens on."""
        return [self.port]

    def command(self):
        """Write the configuration and return the argv that runs the server."""
        raise NotImplementedError

    def ping(self):
        """Return True when the server answers a trivial request."""
        raise NotImplementedError

    def start(self):
        """Start the server and wait until it answers; raise ServerError if not."""
        if self.running:
            raise ServerError("%s is already running (pid %d)" % (self.name, self.pid))
        busy = [port for port in self.ports() if _port_open(self.host, port)]
        if busy:
            raise ServerError(
                "%s cannot start: something already listens on %s:%s"
                % (self.name, self.host, ",".join(map(str, busy)))
            )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        argv = self.command()
        with open(self.log_path, "ab") as log:
            log.write(b"--- starting: %s\n" % " ".join(argv).encode())
            log.flush()
            self.process = subprocess.Popen(
                argv,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )
        self.pid = self.process.pid
        self.pid_path.write_text("%d\n" % self.pid)
        if not self.detach:
            _children.add(self)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self):
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while True:
            if not self.running:
                code = self.process.returncode if self.process else None
                self._forget()
                raise ServerError(self._failure("exited with status %s" % (code,)))
            if self.ping():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(
                    self._failure("did not answer within %.0f s" % self.start_timeout)
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _failure(self, what):
        return "%s on %s:%d %s; see %s\n%s" % (
            self.name, self.host, self.port, what, self.base_dir, self.log_tail(),
        )

    def log_tail(self, lines=40):
        """Return the last ``lines`` lines of the server's logs."""
        tail = []
        for path in self.log_files():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            tail.append("==> %s <==" % (path,))
            tail.extend(text)
        return "\n".join(tail)

    def log_files(self):
        """The files worth showing when the server fails."""
        return [self.log_path]

    def stop(self):
        """SIGTERM the server (again every ``term_again`` s when set) and wait for it to exit.

        SIGKILL once ``stop_timeout`` has passed.
        """
        if self.running:
            deadline = time.monotonic() + self.stop_timeout
            while not self._signal_and_wait(signal.SIGTERM, self.term_again or self.stop_timeout):
                if time.monotonic() > deadline or not self.term_again:
                    self._signal_and_wait(signal.SIGKILL, self.stop_timeout)
                    break
        self._forget()

    def kill(self):
        """SIGKILL the server, as a crash would, and wait for it to be gone."""
        if self.running:
            self._signal_and_wait(signal.SIGKILL, self.stop_timeout)
        self._forget()

    def restart(self):
        """Stop the server and start it again on the same port and data."""
        self.stop()
        return self.start()

    def ensure_running(self):
        """Start the server again if a test left it stopped or killed."""
        if not self.running:
            self.start()
        return self

    def adopt(self):
        """Take over the detached server named by the pid file, if still alive.

        The process counts only if its working directory is in ``base_dir``
        (where ``start()`` runs it), so a pid reused by another program after
        a reboot is left alone. Return whether a server was adopted;
        ``ping()`` tells whether it answers.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return False
        if not _pid_alive(pid):
            return False
        if os.path.isdir("/proc/self"):
            try:
                cwd = Path(os.readlink("/proc/%d/cwd" % pid))
            except OSError:
                return False
            if cwd != self.base_dir and self.base_dir not in cwd.parents:
                return False
        self.pid = pid
        return True

    def cleanup(self):
        """Stop the server and remove its directory if this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _signal_and_wait(self, sig, timeout):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return True
        if self.process is not None:
            try:
                self.process.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _forget(self):
        self.process = None
        self.pid = None
        _children.discard(self)
        try:
            self.pid_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.cleanup()

    def __repr__(self):
        return "<%s %s:%d %s>" % (type(self).__name__, self.host, self.port, self.base_dir)


class _Resp:
    """Commands over fresh connections, for redis-server and redis-sentinel alike."""

    def ping(self):
        try:
            return self.pipeline([("PING",)], timeout=1) == ["PONG"]
        except (OSError, ServerError):
            return False

    def execute(self, *args):
        """Send one command over a fresh connection and return its reply.

        Handles every reply kind (arrays as lists, bulk strings as bytes);
        an error reply raises ServerError.
        """
        return self.pipeline([args])[0]

    def pipeline(self, commands, timeout=10):
        """Send ``commands`` over one fresh connection; their replies in order.

        An error reply nested in an array comes back as a ServerError in its
        place; a top-level one raises.
        """
        auth = getattr(self, "auth", None)
        if auth:
            commands = [("AUTH", *auth), *commands]
        parts = []
        for args in commands:
            parts.append(b"*%d\r\n" % len(args))
            for arg in args:
                data = arg if isinstance(arg, bytes) else str(arg).encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(b"".join(parts))
            reply = sock.makefile("rb")
            replies = [_read_reply(reply) for _ in commands]
        for value in replies:
            if isinstance(value, ServerError):
                raise value
        return replies[1:] if auth else replies


class RedisServer(_Resp, Server):
    """``redis-server`` with an append-only file fsynced on every write.

    ``url`` is ``redis://127.0.0.1:PORT/0``. Data survives ``stop()``,
    ``kill()`` and ``restart()``.  ``replica_of`` (a RedisServer) makes it
    start as that server's replica; ``settings`` are more lines of
    ``redis.conf`` (ACL users, say), and ``auth`` the ``(user, password)``
    this object's own commands authenticate with.
    """

    name = "redis-server"
    #: Right after a sync a replica writes its first append-only file and
    #: drops a SIGTERM meanwhile ("Writing initial AOF, can't exit.").
    term_again = 0.5

    def __init__(self, base_dir=None, port=None, detach=False, replica_of=None, settings=(), auth=None):
        super().__init__(base_dir, port, detach)
        self.replica_of = replica_of
        self.settings = list(settings)
        self.auth = auth

    @property
    def url(self):
        """The Redis URL of database 0."""
        return "redis://%s:%d/0" % (self.host, self.port)

    def command(self):
        binary = find_binary("redis-server")
        if binary is None:
            raise ServerError(
                "redis-server not found on PATH: install the Debian package "
                "redis-server (`make packages`)"
            )
        data = self.base_dir / "data"
        data.mkdir(exist_ok=True)
        config = self.base_dir / "redis.conf"
        replica = ["replicaof %s %d" % (self.replica_of.host, self.replica_of.port)] if self.replica_of else []
        config.write_text(
            "\n".join(
                [
                    "port %d" % self.port,
                    "bind %s" % self.host,
                    "dir %s" % data,
                    "daemonize no",
                    'logfile ""',
                    "appendonly yes",
                    "appendfsync always",
                    'save ""',
                    "repl-diskless-sync-delay 0",
                    *replica,
                    *self.settings,
                    "",
                ]
            )
        )
        return [binary, str(config)]

    def role(self):
        """``master`` or ``slave``, as ROLE says."""
        return self.execute("ROLE")[0].decode()

    def info(self, section):
        """``INFO section`` as a dict of strings."""
        text = self.execute("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisSentinel(_Resp, Server):
    """``redis-sentinel`` (Debian's package) watching one primary as ``service``, quorum 1.

    A primary not answering for ``down_after_ms`` is failed over at once.
    The configuration is written at the first start only: Sentinel rewrites
    it with what it learnt (the current primary, its replicas), and a
    restarted Sentinel goes on from there.
    """

    name = "redis-sentinel"

    def __init__(self, primary, base_dir=None, port=None, service="bklit", down_after_ms=1000,
                 failover_timeout_ms=10000):
        super().__init__(base_dir, port)
        self.primary = primary
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def command(self):
        binary = find_binary("redis-sentinel")
        if binary is None:
            raise ServerError(
                "redis-sentinel not found on PATH: install the Debian package "
                "redis-sentinel (`make test-packages`)"
            )
        config = self.base_dir / "sentinel.conf"
        if not config.exists():
            config.write_text("\n".join([
                "port %d" % self.port,
                "bind %s" % self.host,
                "dir %s" % self.base_dir,
                "daemonize no",
                'logfile ""',
                "sentinel monitor %s %s %d 1" % (self.service, self.primary.host, self.primary.port),
                "sentinel down-after-milliseconds %s %d" % (self.service, self.down_after_ms),
                "sentinel failover-timeout %s %d" % (self.service, self.failover_timeout_ms),
                "sentinel parallel-syncs %s 1" % self.service,
                "",
            ]))
        return [binary, str(config)]

    def primary_port(self):
        """The port of the primary this Sentinel names now."""
        return int(self.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])

    def replicas(self):
        """How many replicas of the primary this Sentinel knows and sees up."""
        flat = self.execute("SENTINEL", "REPLICAS", self.service)
        states = [dict(zip(entry[::2], entry[1::2])) for entry in flat]
        return sum(b"s_down" not in state.get(b"flags", b"") for state in states)


class RedisSet:
    """A primary, ``replicas`` replicas and one Sentinel, for failover tests.

    ``url`` is the ``redis+sentinel://`` URL of database 0; ``primary()``
    the server the Sentinel names now.  ``start`` returns once the
    replicas are in sync and the Sentinel knows them.
    """

    def __init__(self, base_dir, replicas=1, service="bklit"):
        base = Path(base_dir)
        first = RedisServer(base / "redis-0")
        self.servers = [first] + [RedisServer(base / ("redis-%d" % n), replica_of=first)
                                  for n in range(1, replicas + 1)]
        self.sentinel = RedisSentinel(first, base / "sentinel", service=service)
        self.service = service

    @property
    def url(self):
        """The Sentinel URL of database 0."""
        return "redis+sentinel://%s:%d/%s/0" % (self.sentinel.host, self.sentinel.port, self.service)

    def start(self, timeout=30.0):
        """Start every server, then the Sentinel; wait until replication and the Sentinel are up."""
        for server in self.servers:
            server.ensure_running()
        self.wait(lambda: self.in_sync(self.servers[0]), timeout, "replicas in sync")
        self.sentinel.ensure_running()
        self.wait(lambda: self.sentinel.replicas() == len(self.servers) - 1, timeout, "the Sentinel sees the replicas")
        return self

    def in_sync(self, primary):
        """Whether every other server is a replica of ``primary`` with its link up."""
        others = [server for server in self.servers if server is not primary]
        return (primary.role() == "master"
                and int(primary.info("replication").get("connected_slaves", 0)) == len(others)
                and all(r.info("replication").get("master_link_status") == "up" for r in others))

    def wait_healed(self, timeout):
        """Wait until the primary the Sentinel names has every other server as a replica in sync; return it.

        Whichever that is: on a loaded machine the Sentinel may fail over
        again, back to a restarted old primary.
        """
        self.wait(lambda: self.in_sync(self.primary()), timeout, "every server a replica of the primary")
        return self.primary()

    def ensure_running(self):
        """Start whatever a test left stopped (after a failover, the old primary comes back as a replica)."""
        for server in [*self.servers, self.sentinel]:
            server.ensure_running()
        return self

    def primary(self):
        """The RedisServer the Sentinel names as primary now."""
        port = self.sentinel.primary_port()
        return next(server for server in self.servers if server.port == port)

    def wait_failover(self, old, timeout=30.0):
        """Wait until the Sentinel names a primary other than ``old`` and it says it is one; return it."""
        self.wait(lambda: self.sentinel.primary_port() != old.port and self.primary().role() == "master",
                  timeout, "a failover away from %s" % old)
        return self.primary()

    @staticmethod
    def wait(condition, timeout, what):
        """Poll ``condition`` until true; ServerError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except (OSError, ServerError):
                pass
            if time.monotonic() > deadline:
                raise ServerError("not within %.0f s: %s" % (timeout, what))
            time.sleep(0.1)

    def cleanup(self):
        """Stop everything."""
        for server in [self.sentinel, *self.servers]:
            server.stop()


def _read_reply(reply):
    """One RESP2 reply from a file: str, int, bytes, None, a list, or a ServerError."""
    line = reply.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reply.read(size + 2)[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(reply) for _ in range(size)]
    if kind == b"-":
        return ServerError("redis: %s" % rest.decode(errors="replace"))
    raise ServerError("unexpected redis reply %r" % (line,))


class ClickHouseServer(Server):
    """``clickhouse-server`` (Debian's 18.16 or newer) on loopback only.

    The configuration is the system ``config.xml`` (or a minimal one) with
    ports, paths and logs moved into ``base_dir`` and every other listener,
    cluster and system-log section removed; ``users.xml`` is copied beside
    it. ``port`` is the native TCP port; ``http_port`` answers ``/ping``.
    The server time zone is UTC, whatever the machine's.
    """

    name = "clickhouse-server"
    system_config_dir = Path("/etc/clickhouse-server")

    #: Elements dropped from the system config: listeners on other ports,
    #: replication and cluster settings, and background system-log tables.
    DROPPED = (
        "listen_host", "https_port", "tcp_port_secure", "interserver_http_port",
        "interserver_https_port", "interserver_http_host", "mysql_port",
        "postgresql_port", "grpc_port", "tcp_with_proxy_port", "prometheus",
        "keeper_server", "remote_servers", "zookeeper", "macros",
        "include_from", "distributed_ddl", "graphite", "query_log",
        "query_thread_log", "query_views_log", "part_log", "trace_log",
        "metric_log", "asynchronous_metric_log", "text_log", "crash_log",
        "opentelemetry_span_log", "session_log", "processors_profile_log",
        "asynchronous_insert_log", "backup_log", "s3queue_log",
        "blob_storage_log", "error_log", "latency_log", "query_metric_log",
        "user_directories", "timezone", "http_port", "tcp_port", "path",
        "tmp_path", "user_files_path", "format_schema_path", "users_config",
        "logger",
    )

    def __init__(self, base_dir=None, port=None, http_port=None, detach=False,
                 database="bklit", replication=None):
        super().__init__(base_dir, port, detach)
        self.http_port = http_port or free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        self.database = database
        #: A ``Replication`` this server takes part in (None: a lone server).
        self.replication = replication
        self.interserver_port = free_port() if replication else None

    @property
    def url(self):
        """The clickhouse-driver URL of the ``bklit`` database."""
        return self.url_for(self.database)

    def url_for(self, database):
        """The clickhouse-driver URL of ``database`` on this server."""
        return "clickhouse://default:@%s:%d/%s" % (self.host, self.port, database)

    def ports(self):
        return [self.port, self.http_port] + ([self.interserver_port] if self.replication else [])

    def log_files(self):
        log_dir = self.base_dir / "log"
        return [self.log_path, log_dir / "clickhouse-server.err.log"]

    def command(self):
        binary = find_binary("clickhouse-server")
        argv = [binary] if binary else None
        if argv is None:
            binary = find_binary("clickhouse")
            argv = [binary, "server"] if binary else None
        if argv is None:
            raise ServerError(
                "clickhouse-server not found on PATH or in /usr/sbin: install "
                "the Debian package clickhouse-server (`make packages`)"
            )
        config = self.write_config()
        return argv + ["--config-file=%s" % config]

    def write_config(self):
        """Write ``config.xml`` and ``users.xml`` into ``base_dir``."""
        for sub in ("data", "data/tmp", "data/user_files", "data/format_schemas", "log"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        root = self._system_xml("config.xml", "<yandex/>")
        for name in self.DROPPED:
            for element in root.findall(name):
                root.remove(element)
        data = self.base_dir / "data"
        log_dir = self.base_dir / "log"
        logger = ET.SubElement(root, "logger")
        for key, value in [
            ("level", "information"),
            ("log", log_dir / "clickhouse-server.log"),
            ("errorlog", log_dir / "clickhouse-server.err.log"),
            ("size", "100M"),
            ("count", "2"),
            ("console", "0"),
        ]:
            ET.SubElement(logger, key).text = str(value)
        users = self.base_dir / "users.xml"
        ET.ElementTree(self._system_xml("users.xml", _MINIMAL_USERS)).write(users)
        for key, value in [
            ("listen_host", self.host),
            ("tcp_port", self.port),
            ("http_port", self.http_port),
            ("path", "%s/" % data),
            ("tmp_path", "%s/tmp/" % data),
            ("user_files_path", "%s/user_files/" % data),
            ("format_schema_path", "%s/format_schemas/" % data),
            ("users_config", users),
            ("timezone", "UTC"),
        ]:
            ET.SubElement(root, key).text = str(value)
        for key, value in [("mlock_executable", "false"), ("default_profile", "default"),
                           ("default_database", "default")]:
            if root.find(key) is None:
                ET.SubElement(root, key).text = value
        if self.replication is not None:
            self.replication.configure(root, self)
        config = self.base_dir / "config.xml"
        ET.ElementTree(root).write(config)
        return config

    def _system_xml(self, name, fallback):
        """Parse the system's ``name`` without its ``incl`` substitutions."""
        try:
            root = ET.parse(self.system_config_dir / name).getroot()
        except (OSError, ET.ParseError):
            root = ET.fromstring(fallback)
        for element in root.iter():
            element.attrib.pop("incl", None)
        return root

    def ping(self):
        url = "http://%s:%d/ping" % (self.host, self.http_port)
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                answered = response.status == 200
        except (OSError, urllib.error.URLError):
            return False
        return answered and _port_open(self.host, self.port)

    def query(self, sql):
        """Run ``sql`` over HTTP and return the response body as text."""
        request = urllib.request.Request(
            "http://%s:%d/" % (self.host, self.http_port), data=sql.encode()
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read().decode()
        except urllib.error.HTTPError as e:
            raise ServerError("clickhouse: %s" % e.read().decode(errors="replace"))


def _xml(parent, tag, children=(), text=None):
    """Append ``<tag>`` with ``text`` or ``(tag, text-or-children)`` children to ``parent``."""
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    for child, value in children:
        if isinstance(value, (list, tuple)):
            _xml(element, child, value)
        else:
            _xml(element, child, text=value)
    return element


class Replication:
    """Several ClickHouseServers as replicas of one shard of ``cluster``, kept by one ZooKeeper.

    Each server's config gets ``<zookeeper>``, the cluster under
    ``<remote_servers>`` (every server one replica, ``internal_replication``
    on), ``<macros>`` (``shard`` 01, ``replica`` r1, r2, ...),
    ``<distributed_ddl>`` for ``ON CLUSTER`` statements, and an interserver
    port of its own on loopback for replicas to fetch parts from each other.
    """

    def __init__(self, zookeeper, count=2, cluster="bklit_cluster", base_dir=None):
        self.zookeeper = zookeeper
        self.cluster = cluster
        root = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="bklit-replicas-"))
        self.servers = [ClickHouseServer(root / ("replica%d" % n), replication=self) for n in range(1, count + 1)]

    def url(self, database):
        """One ``clickhouse://`` URL naming every replica, first to last."""
        hosts = ",".join("%s:%d" % (server.host, server.port) for server in self.servers)
        return "clickhouse://default:@%s/%s" % (hosts, database)

    def configure(self, root, server):
        """Add the replication sections to ``server``'s config ``root``."""
        number = self.servers.index(server) + 1
        _xml(root, "zookeeper", [("node", [("host", self.zookeeper.host), ("port", self.zookeeper.port)])])
        clusters = _xml(root, "remote_servers")
        shard = _xml(_xml(clusters, self.cluster), "shard", [("internal_replication", "true")])
        for replica in self.servers:
            _xml(shard, "replica", [("host", replica.host), ("port", replica.port)])
        _xml(root, "macros", [("shard", "01"), ("replica", "r%d" % number)])
        _xml(root, "distributed_ddl", [("path", "/clickhouse/task_queue/ddl")])
        _xml(root, "interserver_http_host", text=server.host)
        _xml(root, "interserver_http_port", text=server.interserver_port)

    def start(self):
        for server in self.servers:
            server.ensure_running()
        return self

    def stop(self):
        for server in self.servers:
            server.stop()


class ZooKeeperServer(Server):
    """Debian's ``zookeeper`` (its jars and Java) as a standalone server on loopback.

    Runs ``ZooKeeperServerMain`` with a generated ``zoo.cfg``; ready when the
    ``srvr`` four-letter word gets its report (``ruok`` says ``imok`` before
    the server takes sessions).
    """

    name = "zookeeper"
    jar = Path("/usr/share/java/zookeeper.jar")
    config_dir = Path("/etc/zookeeper/conf")
    #: An slf4j binding of the same package's dependencies, so the log says something.
    logger_jar = Path("/usr/share/java/slf4j-simple.jar")

    def command(self):
        java = find_binary("java")
        if java is None or not self.jar.exists():
            raise ServerError(
                "ZooKeeper not found (%s and java): install the Debian package "
                "zookeeper (`make test-packages`)" % (self.jar,)
            )
        data = self.base_dir / "data"
        data.mkdir(exist_ok=True)
        config = self.base_dir / "zoo.cfg"
        config.write_text("\n".join([
            "tickTime=500",
            "dataDir=%s" % data,
            "clientPort=%d" % self.port,
            "clientPortAddress=%s" % self.host,
            "maxClientCnxns=0",
            "forceSync=no",  # a test server: no fsync per write, less disk for Redis's fsyncs to wait behind
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr",
            "",
        ]))
        return [java, "-Xmx256m", "-Dzookeeper.log.dir=%s" % self.base_dir,
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
                "-cp", "%s:%s:%s" % (self.config_dir, self.jar, self.logger_jar),
                "org.apache.zookeeper.server.ZooKeeperServerMain", str(config)]

    def ping(self):
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"srvr")
                return sock.recv(64).startswith(b"Zookeeper version")
        except OSError:
            return False


_MINIMAL_USERS = """<yandex>
  <profiles><default/></profiles>
  <users><default><password/><networks><ip>::/0</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default/></quotas>
</yandex>"""


@atexit.register
def stop_all():
    """Kill every server started here without ``detach`` that still runs."""
    for server in list(_children):
        server.kill()
