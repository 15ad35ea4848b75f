"""``twistd bklit`` as operators run it: a subprocess with real Redis and ClickHouse.

A bad setting stops twistd at once with one line per bad key and no
traceback.  A good start serves the SDK endpoint; SIGTERM closes the
sockets with 1001, stores what was accepted and shuts down cleanly.

After a clean shutdown caused by a signal, twistd ends itself with that
same signal (``twisted.application.app._exitWithSignal``), so the exit
status is "killed by SIGTERM", which systemd counts as a clean stop.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from bklit.startup import EXIT_CONFIG, EXIT_LISTEN
from harness import clickhouse_rows, connect, eventually, port_open, sdk_pageview
from servers import free_port

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
BKLIT = os.path.join(BIN, "bklit")


def clean_env(**settings):
    """The environment without BKLIT_* variables (but the test's own spool), plus ``settings``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("BKLIT_") or name == "BKLIT_SPOOL_DIR"}
    env.update(settings)
    return env


def twistd_argv(*args, twistd_options=()):
    """``twistd -n --pidfile= [TWISTD_OPTIONS] bklit ARGS``: in the foreground, no pid file."""
    return [TWISTD, "--nodaemon", "--pidfile=", *twistd_options, "bklit", *args]


def run_twistd(tmp_path, *args, env=None, timeout=20, until_listening=None, twistd_options=()):
    """Run twistd until it exits; the CompletedProcess (stderr merged into stdout).

    With ``until_listening`` (a port), stop it with SIGTERM once it listens
    there, and return its output alone (its stdout is a file, as the journal's is).
    """
    if until_listening is None:
        return subprocess.run(twistd_argv(*args), cwd=tmp_path, env=clean_env(**(env or {})),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    out = tmp_path / "twistd.out"
    with open(out, "wb") as handle:
        environ = clean_env(**(env or {}))
        for name, value in list(environ.items()):  # the file's device:inode, for JOURNAL_STREAM=stdout
            if value == "stdout":
                info = os.fstat(handle.fileno())
                environ[name] = f"{info.st_dev}:{info.st_ino}"
        process = subprocess.Popen(twistd_argv(*args, twistd_options=twistd_options), cwd=tmp_path, env=environ, stdin=subprocess.DEVNULL,
                                   stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not port_open(until_listening):
            assert process.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout)
    return out.read_text()


def error_lines(output):
    """The ``bklit: config error:`` lines of twistd's output, without the prefix."""
    prefix = "bklit: config error: "
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


class TestBadConfiguration:
    """A bad setting stops twistd before the reactor runs, naming the key."""

    def test_bad_ini_value_and_bad_flag(self, tmp_path):
        """Both errors are reported, one line each, naming batch_size and role."""
        ini = tmp_path / "bklit.ini"
        ini.write_text("[bklit]\nbatch_size = lots\n")
        started = time.monotonic()
        done = run_twistd(tmp_path, "--config", str(ini), "--role", "bogus")
        assert done.returncode == EXIT_CONFIG
        assert time.monotonic() - started < 15
        lines = error_lines(done.stdout)
        assert sorted(line.split(":")[0] for line in lines) == ["batch_size", "role"]
        assert any("'lots'" in line and str(ini) in line for line in lines)
        assert any("'bogus'" in line for line in lines)
        assert "Traceback" not in done.stdout
        assert not any(path.name.startswith("twistd") for path in tmp_path.iterdir())

    @pytest.mark.parametrize("args,env,key", [
        (["--config", "missing.ini"], {}, "config"),
        ([], {"BKLIT_CONFIG": "missing.ini"}, "config"),
        ([], {"BKLIT_FLUSH_INTERVALL": "1"}, "BKLIT_FLUSH_INTERVALL"),
        ([], {"BKLIT_AUTO_MIGRATE": "perhaps"}, "auto_migrate"),
        (["--redis", "localhost:6379"], {}, "redis"),
        (["--clickhouse", "clickhouse://127.0.0.1:9000/no-such-name"], {}, "clickhouse"),
        (["--listen", "tcp:eighty"], {}, "listen"),
        (["--listen", "nosuchtype:80"], {}, "listen"),
        ([], {"BKLIT_STATUS_LISTEN": "nosuchtype:80"}, "status_listen"),
        ([], {"BKLIT_STATUS_LISTEN": "unix:/run/bklit-ingest-%i/status.sock"}, "status_listen"),
        ([], {"BKLIT_LOG_LEVEL": "loud"}, "log_level"),
    ])
    def test_each_kind_of_error_names_its_key(self, tmp_path, args, env, key):
        """A missing file, an unknown variable, a bad value or endpoint: one line, its key."""
        done = run_twistd(tmp_path, *args, env=env)
        assert done.returncode == EXIT_CONFIG
        [line] = error_lines(done.stdout)
        assert line.startswith(f"{key}: ")
        assert "Traceback" not in done.stdout

    def test_unknown_variable_is_warned_about_once(self, tmp_path, redis_url):
        """A BKLIT_ variable that is no setting and looks like none: one warning, and the daemon runs on."""
        port = free_port()
        done = run_twistd(tmp_path, "--listen", f"tcp:{port}:interface=127.0.0.1", "--role", "ingest",
                          "--redis", redis_url, env={"BKLIT_DEPLOY_COLOUR": "blue"}, until_listening=port)
        warned = [line for line in done.splitlines() if "BKLIT_DEPLOY_COLOUR" in line]
        assert len(warned) == 1 and "#warn] BKLIT_DEPLOY_COLOUR is not a bklit setting; ignored" in warned[0]

    @pytest.mark.parametrize("which", ["listen", "status_listen"])
    def test_busy_port_is_one_line_and_its_own_exit_status(self, tmp_path, redis_url, clickhouse_url, which):
        """A port already taken stops the daemon with one critical line naming the setting and
        the reason, exit 75 (the units try again), and no traceback."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
            listen = busy if which == "listen" else f"tcp:{free_port()}:interface=127.0.0.1"
            done = run_twistd(tmp_path, "--listen", listen, "--redis", redis_url, "--clickhouse", clickhouse_url,
                              env={"BKLIT_STATUS_LISTEN": busy} if which == "status_listen" else {})
        assert done.returncode == EXIT_LISTEN, done.stdout
        [line] = [line for line in done.stdout.splitlines() if "#critical]" in line or "Error" in line]
        assert line.endswith(f"cannot listen on {busy} ({which}): Address already in use (another process "
                             "has it; processes sharing a port listen with reuseport:)"), line
        assert "Traceback" not in done.stdout and len(done.stdout.splitlines()) <= 6, done.stdout


class TestLogLines:
    """Log levels and journald priorities, as twistd under systemd writes them."""

    def start(self, tmp_path, redis_url, **env):
        port = free_port()
        return run_twistd(tmp_path, "--listen", f"tcp:{port}:interface=127.0.0.1", "--role", "ingest",
                          "--redis", redis_url, env=env, until_listening=port)

    def test_priorities_when_stdout_is_the_journal(self, tmp_path, redis_url):
        """With JOURNAL_STREAM naming stdout, every line starts with its syslog priority:
        info <6>, the plain-ws warning <4>."""
        lines = self.start(tmp_path, redis_url, JOURNAL_STREAM="stdout").splitlines()
        assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
        assert any(line.startswith("<4>") and "#warn] no tls_cert configured" in line for line in lines)
        assert any(line.startswith("<6>") and "#info] twistd" in line for line in lines)

    def test_no_priorities_elsewhere(self, tmp_path, redis_url):
        """A JOURNAL_STREAM of another file (a child of a journald service writing to a file) adds none."""
        output = self.start(tmp_path, redis_url, JOURNAL_STREAM="1:2")
        assert "no tls_cert configured" in output and not re.search(r"^<\d>", output, re.M)
        assert re.search(r"^<\d>", self.start(tmp_path, redis_url, BKLIT_LOG_JOURNAL="true"), re.M)

    def test_log_level_drops_less_severe_lines(self, tmp_path, redis_url):
        """log_level = warn: the warning stays, no info line is written."""
        output = self.start(tmp_path, redis_url, BKLIT_LOG_LEVEL="warn")
        assert "#warn] no tls_cert configured" in output
        assert "#info]" not in output and "Server Shut Down" not in output, output

    def test_json_lines_follow_the_same_settings(self, tmp_path, redis_url):
        """--logger bklit.logs.json_observer: priorities under the journal, and the level."""
        port = free_port()
        output = run_twistd(tmp_path, "--listen", f"tcp:{port}:interface=127.0.0.1", "--role", "ingest",
                            "--redis", redis_url, env={"JOURNAL_STREAM": "stdout", "BKLIT_LOG_LEVEL": "warn"},
                            until_listening=port, twistd_options=("--logger", "bklit.logs.json_observer"))
        lines = output.splitlines()
        assert lines and all(line.startswith(("<4>{", "<3>{", "<2>{")) for line in lines), lines
        assert any(json.loads(line[3:])["message"].startswith("no tls_cert configured") for line in lines)


@pytest.fixture
def daemon(tmp_path):
    """Start ``twistd bklit`` in the background; returns (process, log path). Killed afterwards."""
    started = []

    def start(*args, env=None):
        log = tmp_path / "twistd.out"
        with open(log, "wb") as out:
            process = subprocess.Popen(twistd_argv(*args), cwd=tmp_path, env=clean_env(**(env or {})),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        started.append(process)
        return process, log

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


async def sleep(seconds):
    """Let the reactor run for ``seconds``."""
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for_port(port, process, log, timeout=30.0):
    """Wait until something accepts connections on ``port``; fail if the daemon died."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"twistd exited with {process.returncode}:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"twistd did not listen within {timeout} s:\n{log.read_text()}"
        await sleep(0.1)


async def wait_for_exit(process, timeout):
    """The exit code of ``process``, waiting (reactor running) up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            return None
        await sleep(0.05)
    return process.returncode


@pytest_twisted.ensureDeferred
async def test_serves_stores_and_stops_cleanly_on_sigterm(daemon, redis_url, clickhouse_url):
    """Start, take a pageview with a key made by ``bklit token create``, store it; stop on SIGTERM.

    The socket still open at SIGTERM is closed with 1001, a pageview acked
    just before it is stored too, and the process is gone within 10 s.
    """
    port = free_port()
    process, log = daemon("--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--redis", redis_url, "--clickhouse", clickhouse_url,
                          env={"BKLIT_FLUSH_INTERVAL": "0.2"})
    await wait_for_port(port, process, log)

    created = subprocess.run([BKLIT, "token", "create", "--project", "p1", "--redis", redis_url],
                             capture_output=True, text=True, timeout=30, env=clean_env())
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()

    client = await connect(port)
    assert (await client.next_of("connected"))["projectId"] == "p1"
    client.send(sdk_pageview("p1", key=key, url="https://example.com/first"))
    first = await client.next_of("ack")
    rows = await eventually(lambda: clickhouse_rows(
        clickhouse_url, "SELECT id, project_id, url FROM page_view_event"), timeout=15)
    assert rows == [(first["eventId"], "p1", "https://example.com/first")]

    client.send(sdk_pageview("p1", key=key, url="https://example.com/last"))
    last = await client.next_of("ack")
    process.send_signal(signal.SIGTERM)
    code, _ = await client.wait_closed()
    assert code == 1001
    assert await wait_for_exit(process, 10) == -signal.SIGTERM, log.read_text()

    stored = clickhouse_rows(clickhouse_url, "SELECT id FROM page_view_event ORDER BY id")
    assert sorted(stored) == sorted([(first["eventId"],), (last["eventId"],)])
    output = log.read_text()
    assert output.rstrip().endswith("Server Shut Down."), output
    assert "Traceback" not in output and "Unhandled" not in output, output


def test_the_daemon_tunes_its_collector_once_started():
    """twistd's daemon freezes what start-up made and collects less often (startup.tune_gc); a
    BklitService made in a test process leaves that process's collector alone."""
    import gc

    from bklit import startup
    from bklit.service import BklitService

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert BklitService.tune_gc is False
    try:
        startup.tune_gc()
        assert gc.get_threshold() == startup.GC_THRESHOLDS
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
