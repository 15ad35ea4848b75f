"""A throwaway deployment for benchmarks: Redis, ClickHouse, the daemon, keys.

    with Stack() as stack:
        stack.port, stack.key, stack.read_key, stack.daemon.pid, stack.clickhouse_url

``roles="split"`` (the default) runs bklit as it is deployed for throughput:
one ``--role ingest`` process (``stack.daemon``, the listener) and one
``--role writer`` process (``stack.writer``).  ``roles="all"`` runs one
process doing both (``stack.writer`` is then ``stack.daemon``).
``stack.add_listeners(N, name)`` starts N more ingest processes on a port of
their own against the same Redis, writer and ClickHouse.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers import ClickHouseServer, RedisServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def raise_file_limit() -> None:
    """Allow as many sockets as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stack:
    """Starts everything on enter, stops it on exit."""

    def __init__(self, project: str = "bench", roles: str = "split", ingest: int = 1, replicas: int = 0,
                 **settings: str):
        if roles not in ("split", "all"):
            raise ValueError(f"roles must be split or all, not {roles!r}")
        if ingest > 1 and roles != "split":
            raise ValueError("several ingest processes need roles split")
        self.project = project
        self.roles = roles
        self.ingest = ingest
        self.replica_count = replicas
        # Load generators send faster than a browser tab, and every socket comes from one address:
        # lift the per-socket rate limits and the per-address (dashboards too), per-network and per-project caps.
        self.settings = {"rate_limit": "1000000", "rate_burst": "1000000", "max_connections_per_ip": "1000000",
                         "max_connections_per_network": "1000000", "max_http_connections_per_ip": "1000000",
                         "max_sockets_per_project": "1000000", "max_new_sessions_per_minute": "1000000",
                         "dashboard_connects_per_minute": "1000000",
                         "frame_rate": "1000000", "frame_burst": "1000000", **settings}

    def __enter__(self) -> "Stack":
        raise_file_limit()
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        self.redis = RedisServer(tmp / "redis").start()
        self.replicas = [RedisServer(tmp / f"replica{n}", replica_of=self.redis).start()
                         for n in range(self.replica_count)]
        self.clickhouse = ClickHouseServer(tmp / "clickhouse").start()
        self.clickhouse_url = self.clickhouse.url_for("bklit_bench")
        self.env = dict(os.environ, BKLIT_REDIS=self.redis.url, BKLIT_CLICKHOUSE=self.clickhouse_url,
                        **{f"BKLIT_{k.upper()}": v for k, v in self.settings.items()})
        subprocess.run([BIN / "bklit", "schema", "migrate"], env=self.env, check=True, capture_output=True)
        self.key = self._token("ingest")
        self.read_key = self._token("read")
        self.groups: list[Listeners] = []
        self.listeners = Listeners(self, self.ingest, "daemon")
        self.port = self.listeners.port
        self.restart_daemon()
        self.writer = self.daemon
        if self.roles == "split":
            self.writer = subprocess.Popen(
                [BIN / "twistd", "-n", "--pidfile=", "--logfile", str(tmp / "writer.log"), "bklit",
                 "--role", "writer"], env=self.env)
        return self

    @property
    def daemon(self) -> subprocess.Popen:
        """The (first) listening process."""
        return self.daemons[0]

    @property
    def daemons(self) -> list[subprocess.Popen]:
        """The listening processes."""
        return self.listeners.processes

    def restart_daemon(self) -> subprocess.Popen:
        """(Re)start the listening processes on the same port; returns once it accepts connections.

        With ``ingest`` > 1 they share the port (``reuseport:``), each with a spool of its own.
        """
        self.listeners.restart()
        if self.roles == "all":
            self.writer = self.daemon
        return self.daemon

    def add_listeners(self, count: int, name: str) -> "Listeners":
        """``count`` more ``--role ingest`` processes on a port of their own, fed to the same
        Redis, writer and ClickHouse (roles split); started, stopped on exit."""
        if self.roles != "split":
            raise ValueError("more listeners need roles split")
        group = Listeners(self, count, name)
        group.restart()
        self.groups.append(group)
        return group

    def _token(self, scope: str) -> str:
        return subprocess.run([BIN / "bklit", "token", "create", "--project", self.project, "--scope", scope],
                              env=self.env, check=True, capture_output=True, text=True).stdout.strip()

    def count_rows(self, table: str = "page_view_event") -> int:
        """Rows stored so far (0 while the table does not exist)."""
        from clickhouse_driver import Client

        client = Client.from_url(self.clickhouse_url)
        try:
            return client.execute(f"SELECT count() FROM {table}")[0][0]
        except Exception:
            return 0
        finally:
            client.disconnect()

    @property
    def pids(self) -> dict[str, int]:
        """The bklit processes by role: ``{"all": pid}`` or ``{"ingest": pid, "writer": pid}``."""
        if self.roles == "all":
            return {"all": self.daemon.pid}
        if self.ingest == 1:
            return {"ingest": self.daemon.pid, "writer": self.writer.pid}
        return {**{f"ingest{n + 1}": d.pid for n, d in enumerate(self.daemons)}, "writer": self.writer.pid}

    def __exit__(self, *exc: object) -> None:
        separate_writer = self.roles == "split"
        for group in (self.listeners, *self.groups):
            group.stop()
        if separate_writer:
            stop_process(self.writer, 20)
        self.clickhouse.stop()
        for replica in self.replicas:
            replica.stop()
        self.redis.stop()
        self._tmp.cleanup()


class Listeners:
    """``count`` bklit listening processes of a stack on one port (``reuseport:`` when more than one).

    Each has a log and a spool of its own (``NAME0.log``, ``spoolNAME0``, ...).
    """

    def __init__(self, stack: Stack, count: int, name: str):
        self.stack = stack
        self.count = count
        self.name = name
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def restart(self) -> list[int]:
        """(Re)start the processes; returns their pids once the port accepts connections."""
        self.stop()
        stack = self.stack
        role = ["--role", "ingest"] if stack.roles == "split" else []
        scheme = "reuseport" if self.count > 1 else "tcp"
        tmp = Path(stack._tmp.name)
        self.processes = [
            subprocess.Popen(
                [BIN / "twistd", "-n", "--pidfile=", "--logfile", str(tmp / f"{self.name}{n}.log"), "bklit",
                 "--listen", f"{scheme}:{self.port}:interface=127.0.0.1", *role],
                env=dict(stack.env, BKLIT_SPOOL_DIR=str(tmp / f"spool{self.name}{n}")))
            for n in range(self.count)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        return self.pids

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, 20)
        self.processes = []
