"""Log lines: the least level, journald priorities, and the levels of health changes."""

import io

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.logger import LogLevel, Logger

from bklit import health, journal, logs
from bklit.metrics import Metrics


@pytest.fixture(autouse=True)
def default_choice():
    logs.configure("info", "auto")
    yield
    logs.configure("info", "auto")


def emitted(observer, level, text, **fields):
    Logger(namespace="bklit.test", observer=observer).emit(level, text, **fields)


def test_every_line_of_a_traceback_carries_the_priority():
    """journald reads a priority per line: a failure's traceback is all <3>, not info."""
    out = io.StringIO()
    observer = logs.text_file_observer(out, priorities=True)
    try:
        1 / 0
    except ZeroDivisionError:
        Logger(namespace="bklit.test", observer=observer).failure("it broke")
    lines = out.getvalue().splitlines()
    assert len(lines) > 3 and "Traceback" in out.getvalue()
    assert all(line.startswith("<2>") for line in lines), lines  # failure() is critical


@pytest.mark.parametrize("level,priority", [(LogLevel.debug, 7), (LogLevel.info, 6), (LogLevel.warn, 4),
                                            (LogLevel.error, 3), (LogLevel.critical, 2)])
def test_priorities_of_each_level(level, priority):
    out = io.StringIO()
    emitted(logs.text_file_observer(out, priorities=True), level, "x {n}", n=1)
    assert out.getvalue().startswith(f"<{priority}>") and out.getvalue().endswith(f"#{level.name}] x 1\n")


def test_the_least_level_drops_what_is_below_it():
    """log_level warn: debug and info dropped; warn, error, critical kept; events of no level kept."""
    logs.configure("warn", "false")
    seen = []
    observer = logs.filtered(seen.append)
    for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
        emitted(observer, level, level.name)
    observer({"log_format": "no level"})
    assert [event["log_format"] for event in seen] == ["warn", "error", "critical", "no level"]


def test_journal_is_recognised_by_device_and_inode(tmp_path):
    with open(tmp_path / "out", "w") as out:
        import os

        info = os.fstat(out.fileno())
        assert journal.is_journal(out, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not journal.is_journal(out, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
        assert not journal.is_journal(out, {})
    assert not journal.is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


class DownRedis:
    """A Redis that answers (persisting with AOF, fsync always) or fails, as told."""

    up = True
    CONFIG = {"appendonly": "yes", "appendfsync": "always", "save": "", "maxmemory-policy": "noeviction"}

    async def call(self, command, *args):
        if not self.up:
            raise ConnectionError("down")
        if command == "CONFIG":
            return [args[1], self.CONFIG[args[1]]]
        return {"PING": "PONG", "XLEN": 0, "XPENDING": [0]}[command]


@pytest_twisted.ensureDeferred
async def test_health_changes_are_logged_at_their_level():
    """Unavailable is an error, back to ok is info (not a warning)."""
    seen = []
    redis = DownRedis()
    check = health.HealthCheck(redis, task.Clock(), 5, Metrics(), producer=None)
    previous, health.log.observer = health.log.observer, seen.append
    try:
        await check.check()  # starting -> ok: not logged
        redis.up = False
        await check.check()
        redis.up = True
        await check.check()
    finally:
        health.log.observer = previous
    changes = [(event["log_level"], event["status"]) for event in seen if event.get("log_format") == "health: {status}"]
    assert changes == [(LogLevel.error, "unavailable"), (LogLevel.info, "ok")]
