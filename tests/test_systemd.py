"""The systemd units and the certbot deploy hook, checked as they will run.

The units under ``systemd/`` pass ``systemd-analyze verify`` without a word
and score a low exposure in ``systemd-analyze security``; their ExecStart
lines are real twistd command lines naming the role of their unit; and the
socket unit's address family matches the endpoint string the docs give for
socket activation.  The deploy hook installs a renewed pair atomically with
the right modes, reloads, and refuses to run without certbot's variables.

systemd-analyze is needed: without it these tests fail, never skip.
"""

import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bklit.startup import EXIT_CONFIG, EXIT_LISTEN
from servers import free_port
from tlscerts import CertificateAuthority

REPO = Path(__file__).resolve().parent.parent
UNITS = ["bklit.service", "bklit-ingest.service", "bklit-ingest@.service", "bklit-writer.service", "bklit.socket"]
ROLES = {"bklit.service": "all", "bklit-ingest.service": "ingest", "bklit-ingest@.service": "ingest",
         "bklit-writer.service": "writer"}
HOOK = REPO / "etc" / "certbot-deploy-hook"
INSTALLED_BIN = "/opt/bklit/bin"
#: The venv running these tests: it has twistd and bklit, as /opt/bklit/bin will.
BIN = os.path.dirname(sys.executable)
#: Highest overall exposure accepted from ``systemd-analyze security`` (0 to 10).
MAX_EXPOSURE = 2.0


def systemd_analyze():
    """The path of systemd-analyze; the test fails when it is missing."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install the Debian package systemd", pytrace=False)
    return path


def analyze(*args, cwd):
    """Run ``systemd-analyze ARGS`` in ``cwd``; the CompletedProcess."""
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="cat")
    return subprocess.run([systemd_analyze(), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def unit_dir(tmp_path):
    """The units copied to a folder, with /opt/bklit/bin replaced by this venv's bin.

    ``verify`` checks that ExecStart's program exists, so the copies point at
    the twistd these tests run with.
    """
    assert os.access(os.path.join(BIN, "twistd"), os.X_OK), f"no twistd in {BIN}"
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_BIN, BIN))
    return tmp_path


def directives(name):
    """``(key, value)`` for each setting line of a unit file, in order."""
    pairs = []
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def setting(name, key):
    """The last value of ``key`` in a unit file (as systemd reads single values)."""
    values = [value for k, value in directives(name) if k == key]
    assert values, f"{name} has no {key}="
    return values[-1]


class TestUnits:
    """The unit files as systemd itself reads them."""

    @pytest.mark.parametrize("name", UNITS)
    def test_verify_is_clean(self, unit_dir, name):
        """``systemd-analyze verify`` exits 0 and prints nothing: no unknown
        key, no unparsable value, no missing program or service."""
        done = analyze("verify", f"./{name}", cwd=unit_dir)
        assert (done.returncode, done.stderr, done.stdout) == (0, "", "")

    @pytest.mark.parametrize("name", UNITS)
    def test_sections_once_each(self, name):
        """[Unit], then [Service] or [Socket], then [Install]; none twice
        (systemd would merge a repeated one without a word)."""
        kind = "[Socket]" if name.endswith(".socket") else "[Service]"
        lines = (REPO / "systemd" / name).read_text().splitlines()
        assert [line for line in lines if line.startswith("[")] == ["[Unit]", kind, "[Install]"]

    @pytest.mark.parametrize("name", [name for name in UNITS if name.endswith(".service")])
    def test_security_exposure_is_low(self, unit_dir, name):
        """The overall exposure of each service stays at most MAX_EXPOSURE."""
        done = analyze("security", "--offline=true", f"./{name}", cwd=unit_dir)
        assert done.returncode == 0, done.stderr
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert found, done.stdout
        exposure = float(found.group(1))
        print(f"{name}: exposure {exposure}")
        assert exposure <= MAX_EXPOSURE, done.stdout

    @pytest.mark.parametrize("name,role", ROLES.items())
    def test_exec_start_runs_the_role_of_the_unit(self, tmp_path, name, role):
        """ExecStart is twistd in the foreground, without pid file, with the
        config file and the unit's role: run with a bad ini file it reaches
        bklit's config check, which names only the bad key."""
        argv = setting(name, "ExecStart").split()
        assert argv[:4] == [f"{INSTALLED_BIN}/twistd", "--nodaemon", "--pidfile=", "bklit"]
        assert argv[4:] == ["--config", "/etc/bklit/bklit.ini", "--role", role]
        ini = tmp_path / "bklit.ini"
        ini.write_text("[bklit]\nbatch_size = lots\n")
        argv = [os.path.join(BIN, "twistd"), *argv[1:5], str(ini), *argv[6:]]
        env = {key: value for key, value in os.environ.items() if not key.startswith("BKLIT_")}
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        errors = [line for line in done.stdout.splitlines() + done.stderr.splitlines()
                  if line.startswith("bklit: config error: ")]
        assert done.returncode == EXIT_CONFIG
        assert [line.split(":")[2].strip() for line in errors] == ["batch_size"], done

    @pytest.mark.parametrize("name", list(ROLES))
    def test_a_config_error_is_not_restarted(self, name):
        """The exit status of a config error is in RestartPreventExitStatus= (a broken ini would
        otherwise restart every RestartSec= forever); a busy port's is not (it may free up)."""
        assert setting(name, "Restart") == "on-failure"
        assert setting(name, "RestartPreventExitStatus").split() == [str(EXIT_CONFIG)]
        assert EXIT_LISTEN != EXIT_CONFIG

    def test_instances_are_named_for_status_listen(self):
        """Each bklit-ingest@ instance gets BKLIT_INSTANCE (for %i in status_listen), its own spool
        and its own runtime folder (where a unix status socket can go); the port comes from the ini."""
        environment = [value for key, value in directives("bklit-ingest@.service") if key == "Environment"]
        assert "BKLIT_INSTANCE=%i" in environment
        assert "BKLIT_SPOOL_DIR=/var/lib/bklit/spool-%i" in environment
        assert setting("bklit-ingest@.service", "RuntimeDirectory") == "bklit-ingest-%i"
        assert "--listen" not in setting("bklit-ingest@.service", "ExecStart")

    @pytest.mark.parametrize("name", ["bklit.service", "bklit-ingest.service", "bklit-ingest@.service"])
    def test_reload_sends_sighup(self, name):
        """``systemctl reload`` (and the deploy hook's try-reload-or-restart)
        sends SIGHUP, which reloads the certificate without dropping sockets."""
        assert setting(name, "ExecReload") == "/bin/kill -HUP $MAINPID"

    def test_socket_binds_ipv4_for_domain_inet(self):
        """The socket is IPv4, matching ``systemd:domain=INET``: a bare port
        would make an IPv6 socket whose peer addresses INET misreads."""
        assert setting("bklit.socket", "ListenStream") == "0.0.0.0:8080"
        assert setting("bklit.socket", "Service") == "bklit.service"


def readme_block(marker):
    """The literal block that follows ``marker`` in README.rst, dedented."""
    text = (REPO / "README.rst").read_text()
    assert marker in text, f"README.rst no longer says {marker!r}"
    block = []
    for line in text[text.index(marker):].splitlines()[2:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


class TestSocketActivation:
    """twistd bklit on a socket passed as systemd passes it."""

    def test_readme_drop_ins_are_clean(self, unit_dir):
        """The drop-ins README.rst gives for bklit.service and bklit.socket
        pass ``systemd-analyze verify``, and the endpoint string fits the
        socket's family."""
        service = readme_block("``systemctl edit bklit`` and add::")
        socket_port = readme_block("then ``systemctl restart bklit.socket bklit``::")
        assert "Environment=BKLIT_LISTEN=systemd:domain=INET:index=0" in service
        assert "ListenStream=0.0.0.0:" in socket_port
        for name, text in [("bklit.service", service), ("bklit.socket", socket_port)]:
            (unit_dir / f"{name}.d").mkdir()
            (unit_dir / f"{name}.d" / "override.conf").write_text(text)
        done = analyze("verify", "./bklit.service", "./bklit.socket", cwd=unit_dir)
        assert (done.returncode, done.stderr, done.stdout) == (0, "", "")

    def test_serves_on_the_passed_socket(self, tmp_path, redis_url):
        """With ``listen = systemd:domain=INET:index=0`` and an IPv4 socket
        from systemd-socket-activate (which, like bklit.socket, starts the
        program at the first connection), that first connection is served."""
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            pytest.fail("systemd-socket-activate not found: install the Debian package systemd",
                        pytrace=False)
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("BKLIT_")}
        env.update(BKLIT_LISTEN="systemd:domain=INET:index=0", BKLIT_REDIS=redis_url, BKLIT_ROLE="ingest")
        # systemd names every socket it passes (after its unit by default),
        # and Twisted adopts none unless LISTEN_FDNAMES is set.
        argv = [activate, "--listen", f"127.0.0.1:{port}", "--fdname=bklit.socket",
                "-E", "BKLIT_LISTEN", "-E", "BKLIT_REDIS", "-E", "BKLIT_ROLE",
                os.path.join(BIN, "twistd"), "--nodaemon", "--pidfile=", "bklit"]
        daemon = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            reply = websocket_greeting(port)
        finally:
            daemon.send_signal(signal.SIGTERM)
            output, _ = daemon.communicate(timeout=20)
        assert reply.startswith(b"HTTP/1.1 101 "), (reply, output)
        assert b'"type":"connected"' in reply.replace(b" ", b""), (reply, output)
        assert daemon.returncode in (0, -signal.SIGTERM), output
        assert "Traceback" not in output, output


def websocket_greeting(port, timeout=30):
    """Open a WebSocket to the SDK endpoint; the bytes received until the
    server's ``connected`` message, the end of the connection or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.sendall(
            f"GET /?projectId=p1&sessionId=1732608000000-k3j4h5 HTTP/1.1\r\n"
            f"Host: localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        received = b""
        while b"connected" not in received and time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except OSError:  # reset: the daemon died; its output tells why
                break
            if not chunk:
                break
            received += chunk
        return received


class TestDeployHook:
    """etc/certbot-deploy-hook, run as certbot runs it, with test paths."""

    @pytest.fixture
    def lineage(self, tmp_path):
        """A /etc/letsencrypt/live/NAME of the test: a current chain and its key."""
        return self.make_lineage(tmp_path)

    @staticmethod
    def make_lineage(tmp_path, days=90, name="live", other_key=False):
        live = tmp_path / name / "analytics.example.com"
        live.mkdir(parents=True)
        ca = CertificateAuthority()
        chain, key = ca.server(tmp_path, days=days, not_before_days=min(-1, days - 1), name=name)
        shutil.copy(chain, live / "fullchain.pem")
        shutil.copy(ca.server(tmp_path, name=name + "-other")[1] if other_key else key, live / "privkey.pem")
        return live

    def run_hook(self, tmp_path, **env):
        """Run the hook with ``env`` (None removes a variable); the CompletedProcess."""
        base = {key: value for key, value in os.environ.items()
                if not key.startswith("BKLIT_") and key != "RENEWED_LINEAGE"}
        base.update(BKLIT_TLS_DIR=str(tmp_path / "tls"),
                    BKLIT_GROUP=grp.getgrgid(os.getgid()).gr_name,
                    BKLIT_RELOAD_COMMAND=f"touch {tmp_path / 'reloaded'}")
        base.update({key: value for key, value in env.items() if value is not None})
        for key in [key for key, value in env.items() if value is None]:
            base.pop(key, None)
        return subprocess.run([str(HOOK)], env=base, capture_output=True, text=True, timeout=30)

    def test_installs_the_pair_and_reloads(self, tmp_path, lineage):
        """The chain (0644) and key (0640, the service's group) land in the
        TLS folder (created 0750), no temporary file stays, and the reload
        command ran."""
        done = self.run_hook(tmp_path, RENEWED_LINEAGE=str(lineage))
        assert done.returncode == 0, done.stderr
        tls = tmp_path / "tls"
        assert sorted(path.name for path in tls.iterdir()) == ["fullchain.pem", "privkey.pem"]
        for name, mode in [("fullchain.pem", 0o644), ("privkey.pem", 0o640)]:
            installed = tls / name
            assert installed.read_text() == (lineage / name).read_text()
            assert oct(installed.stat().st_mode & 0o7777) == oct(mode)
            assert installed.stat().st_gid == os.getgid()
        assert oct(tls.stat().st_mode & 0o7777) == oct(0o750)
        assert (tmp_path / "reloaded").exists()

    def test_replaces_an_older_pair(self, tmp_path, lineage):
        """A renewal replaces files already there (a new inode, so a reader
        that opened the old file still reads the old one whole)."""
        tls = tmp_path / "tls"
        tls.mkdir()
        (tls / "privkey.pem").write_text("old key")
        (tls / "fullchain.pem").write_text("old chain")
        old_inode = (tls / "privkey.pem").stat().st_ino
        with open(tls / "privkey.pem") as still_open:
            done = self.run_hook(tmp_path, RENEWED_LINEAGE=str(lineage))
            assert still_open.read() == "old key"
        assert done.returncode == 0, done.stderr
        assert (tls / "privkey.pem").read_text() == (lineage / "privkey.pem").read_text()
        assert (tls / "privkey.pem").stat().st_ino != old_inode
        assert (tls / "fullchain.pem").read_text() == (lineage / "fullchain.pem").read_text()

    def test_without_renewed_lineage(self, tmp_path):
        """Without certbot's RENEWED_LINEAGE: exit 1 with a message, nothing done."""
        done = self.run_hook(tmp_path, RENEWED_LINEAGE=None)
        assert done.returncode == 1
        assert "RENEWED_LINEAGE is not set" in done.stderr
        assert not (tmp_path / "tls").exists()
        assert not (tmp_path / "reloaded").exists()

    def test_missing_key(self, tmp_path, lineage):
        """A lineage without privkey.pem: exit 1 naming the file, nothing done."""
        (lineage / "privkey.pem").unlink()
        done = self.run_hook(tmp_path, RENEWED_LINEAGE=str(lineage))
        assert done.returncode == 1
        assert f"{lineage}/privkey.pem is missing" in done.stderr
        assert not (tmp_path / "tls").exists()
        assert not (tmp_path / "reloaded").exists()

    def test_unknown_group(self, tmp_path, lineage):
        """A group that does not exist: exit 1 naming it, nothing installed."""
        done = self.run_hook(tmp_path, RENEWED_LINEAGE=str(lineage), BKLIT_GROUP="no-such-group-bklit")
        assert done.returncode == 1
        assert "group no-such-group-bklit does not exist" in done.stderr
        assert not (tmp_path / "tls").exists()
        assert not (tmp_path / "reloaded").exists()

    @pytest.mark.parametrize("problem,message", [
        ("expired", "has expired; kept the installed pair"),
        ("other_key", "does not match"),
        ("not_pem", "is not a PEM certificate; kept the installed pair"),
    ])
    def test_a_bad_pair_is_not_installed(self, tmp_path, problem, message):
        """An expired chain, a key of another certificate or a broken file: exit 1 saying why, the installed
        pair kept, no reload."""
        live = self.make_lineage(tmp_path, days=-1 if problem == "expired" else 90, other_key=problem == "other_key")
        if problem == "not_pem":
            (live / "fullchain.pem").write_text("not a certificate")
        tls = tmp_path / "tls"
        tls.mkdir(mode=0o750)
        (tls / "fullchain.pem").write_text("old chain")
        (tls / "privkey.pem").write_text("old key")
        done = self.run_hook(tmp_path, RENEWED_LINEAGE=str(live))
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert [(tls / n).read_text() for n in ("fullchain.pem", "privkey.pem")] == ["old chain", "old key"]
        assert sorted(p.name for p in tls.iterdir()) == ["fullchain.pem", "privkey.pem"]
        assert not (tmp_path / "reloaded").exists()

    @pytest.mark.parametrize("problem", ["symlink", "group_writable", "others_writable"])
    def test_an_unsafe_tls_folder_is_refused(self, tmp_path, lineage, problem):
        """A TLS folder that is a symlink or writable by group or others: exit 1, nothing installed."""
        real = tmp_path / "real-tls"
        real.mkdir(mode=0o750)
        tls = tmp_path / "tls"
        if problem == "symlink":
            tls.symlink_to(real)
        else:
            tls.mkdir()
            tls.chmod(0o770 if problem == "group_writable" else 0o757)
        done = self.run_hook(tmp_path, RENEWED_LINEAGE=str(lineage))
        assert done.returncode == 1
        expected = "is a symbolic link" if problem == "symlink" else "is writable by group or others"
        assert expected in done.stderr, done.stderr
        assert list(real.iterdir()) == [] and not (tmp_path / "reloaded").exists()
        if problem != "symlink":
            assert list(tls.iterdir()) == []

    def test_is_posix_sh(self):
        """The hook is executable and starts with #!/bin/sh (dash on Debian)."""
        assert os.access(HOOK, os.X_OK)
        assert HOOK.read_text().startswith("#!/bin/sh\n")
