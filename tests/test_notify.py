"""sd_notify: a real twistd tells a NOTIFY_SOCKET it is ready, reloading and stopping."""

import os
import signal
import socket
import subprocess
import sys
import time

from harness import free_port, port_open


def _receive(sock, wanted, timeout=15.0):
    """Datagrams until one contains ``wanted``; all of them."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            seen.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if wanted in seen[-1]:
            return seen
    raise AssertionError(f"no {wanted!r} among {seen}")


def test_ready_reloading_stopping(tmp_path, redis_url, clickhouse_url):
    """READY=1 after the port is bound and Redis answered; RELOADING=1 then READY=1 on SIGHUP; STOPPING=1."""
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    port = free_port()
    env = dict(os.environ, NOTIFY_SOCKET=path, BKLIT_REDIS=redis_url, BKLIT_CLICKHOUSE=clickhouse_url)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    daemon = subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile", str(tmp_path / "d.log"), "bklit",
                               "--listen", f"tcp:{port}:interface=127.0.0.1"], env=env)
    try:
        ready = _receive(listener, "READY=1")
        assert port_open(port)
        assert "STATUS=role all" in ready[-1]
        daemon.send_signal(signal.SIGHUP)
        reload = _receive(listener, "READY=1")
        assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        daemon.send_signal(signal.SIGTERM)
        assert _receive(listener, "STOPPING=1")
        daemon.wait(15)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        listener.close()


def test_notify_without_systemd_does_nothing(monkeypatch):
    """Not under systemd: no socket, no error."""
    from bklit.notify import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
