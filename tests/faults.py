"""Tools of the fault suite: daemons as ``twistd`` subprocesses, a steady SDK load, the ledger.

A ``FaultCase`` runs one fault end to end.  It starts ``twistd -n bklit``
nodes (``Node``) against the test's real Redis and ClickHouse, opens
``CONNECTIONS`` SDK sockets (``LoadSocket``, one session each) that send
``RATE`` messages a second, each carrying a marker of its own (the url query
``?c=<socket>&n=<seq>`` of a pageview, ``metadata.marker`` of an event), and
lets the test apply its fault.  ``FaultCase.finish`` then waits until the
stream is drained and compares what was acked with what ClickHouse holds:
every acked event id stored exactly once, no marker under two ids.  Each
case leaves a row (``RESULTS``) for the report printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread

from bklit.keys import GROUP, STREAM
from harness import SocketClient, clickhouse_rows, free_port, redis_connection, sdk_event, sdk_pageview

BIN = Path(sys.executable).parent
PROJECT = "p1"
CONNECTIONS = 50
RATE = 10.0  # messages a second per socket
EVENT_EVERY = 5  # every fifth message is a custom event, the others pageviews
LOAD_SECONDS = 12.0  # from the first message to the last
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 90.0  # for recovery, the drain and the session ends, once the load stopped
RECOVERY_LIMIT = 45.0  # a longer recovery fails the case (the writer's backoff is capped at 30 s)
POLL = 0.5

#: Settings every test node gets: a fast writer and health check, and limits
#: that do not apply to 50 sockets from one address sending 10 messages a second.
BASE_SETTINGS = {
    "flush_interval": "0.1",
    "health_interval": "0.5",
    "max_connections_per_ip": "1000",
    "max_http_connections_per_ip": "1000",
    "rate_limit": "100000",
    "rate_burst": "100000",
}


async def pause(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    await task.deferLater(reactor, max(0.0, seconds), lambda: None)


def session_id(number: int) -> str:
    """The session of load socket ``number`` (SDK-shaped)."""
    return f"1732608000000-f{number:02d}"


def marker(number: int, seq: int) -> str:
    """The marker of message ``seq`` of socket ``number``."""
    return f"c={number}&n={seq}"


# The load -----------------------------------------------------------------------


class LoadSocket(SocketClient):
    """An SDK socket of the load: sends on a timer and keeps the ledger of answers.

    Acks and errors go to ``acks``/``errors`` with their arrival time; other
    messages to the inbox, as ``SocketClient`` does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.number = -1
        self.sent = 0
        self.acks: list[tuple[str, str, float]] = []  # (event id, message type, when)
        self.errors: list[tuple[str, float]] = []  # (code, when)
        self.closed_by_us = False
        self.stop_at = float("inf")
        self.loop = task.LoopingCall(self.send_next)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        now = time.monotonic()
        if message.get("type") == "ack":
            self.acks.append((message["eventId"], message["messageType"], now))
        elif message.get("type") == "error":
            self.errors.append((message["code"], now))
        else:
            self.inbox.put(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.stop_sending()
        super().onClose(wasClean, code, reason)

    @property
    def can_send(self) -> bool:
        """Whether the socket can still send."""
        return self.state == self.STATE_OPEN

    @property
    def answered(self) -> int:
        """How many messages got an ack or an error."""
        return len(self.acks) + len(self.errors)

    def start_sending(self, offset: float) -> None:
        """Send ``RATE`` messages a second, the first after ``offset`` seconds."""
        reactor.callLater(offset, self._start_loop)

    def _start_loop(self) -> None:
        if self.can_send and not self.loop.running:
            self.loop.start(1 / RATE, now=True)

    def stop_sending(self) -> None:
        """Send nothing more."""
        if self.loop.running:
            self.loop.stop()

    def send_next(self) -> None:
        """Send the next pageview or event, marked with ``marker(number, seq)``; stop at ``stop_at``."""
        if not self.can_send or time.monotonic() >= self.stop_at:
            self.stop_sending()
            return
        seq, session = self.sent, session_id(self.number)
        if seq % EVENT_EVERY == EVENT_EVERY - 1:
            message = sdk_event(PROJECT, session=session)
            message["data"]["metadata"]["marker"] = marker(self.number, seq)
        else:
            message = sdk_pageview(PROJECT, session=session, url=f"https://example.com/page?{marker(self.number, seq)}")
        self.send(message)
        self.sent += 1


async def open_socket(port: int, number: int, key: str) -> LoadSocket:
    """Load socket ``number``, open and authenticated, not sending yet."""
    url = f"ws://127.0.0.1:{port}/?projectId={PROJECT}&sessionId={session_id(number)}"
    factory = WebSocketClientFactory(url)
    factory.protocol = LoadSocket
    sock = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    sock.number = number
    await sock.opened.addTimeout(START_TIMEOUT, reactor)
    await sock.next_of("connected")
    sock.send({"type": "auth", "apiKey": key})
    await sock.next_of("auth_success")
    return sock


class Load:
    """The load's sockets, and what all of them sent and got back.

    Sockets send for ``seconds`` from the first ``add``, then stop by themselves.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sockets: list[LoadSocket] = []
        self.started_at = 0.0

    async def add(self, port: int, numbers: Iterable[int], key: str) -> None:
        """Open sockets ``numbers`` on ``port`` and start them sending, spread over a tick."""
        opened = await defer.gatherResults(
            [defer.ensureDeferred(open_socket(port, n, key)) for n in numbers], consumeErrors=True)
        if not self.started_at:
            self.started_at = time.monotonic()
        for i, sock in enumerate(opened):
            sock.stop_at = self.started_at + self.seconds
            sock.start_sending(i / (RATE * len(opened)))
        self.sockets.extend(opened)

    async def wait_stopped(self) -> None:
        """Wait until no socket sends any more (time is up, or the server closed it)."""
        while any(sock.loop.running for sock in self.sockets):
            await pause(0.1)

    def still_open(self) -> list[LoadSocket]:
        """The sockets the server has not closed."""
        return [sock for sock in self.sockets if sock.can_send]

    async def wait_answered(self, timeout: float) -> None:
        """Wait until every open socket has an answer for each message it sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(s.answered < s.sent for s in self.still_open()):
            await pause(0.1)

    async def close(self) -> None:
        """Close every open socket normally (1000) and wait until all are closed."""
        for sock in self.still_open():
            sock.closed_by_us = True
            sock.sendClose(1000)
        await self.wait_closed(15)

    def acked(self, numbers: Iterable[int] | None = None, until: float = float("inf"),
              since: float = 0.0) -> set[str]:
        """Event ids acked between ``since`` and ``until`` (to sockets ``numbers``, or all)."""
        chosen = set(numbers) if numbers is not None else None
        return {event_id for sock in self.sockets if chosen is None or sock.number in chosen
                for event_id, _, at in sock.acks if since <= at <= until}

    def sent_markers(self) -> set[str]:
        """The marker of every message sent."""
        return {marker(sock.number, seq) for sock in self.sockets for seq in range(sock.sent)}

    def error_codes(self) -> Counter:
        """How many errors of each code came back."""
        return Counter(code for sock in self.sockets for code, _ in sock.errors)

    def server_closed(self) -> dict[int, int | None]:
        """``{socket number: close code}`` of the sockets the server (or its death) closed."""
        return {sock.number: sock.close_code for sock in self.sockets
                if sock.closed.called and not sock.closed_by_us}

    async def wait_closed(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every socket is closed."""
        waits = [sock.closed for sock in self.sockets if not sock.closed.called]
        if waits:
            await defer.DeferredList(waits).addTimeout(timeout, reactor)

    def sessions_with_pageviews(self) -> dict[int, str]:
        """``{socket number: session id}`` of the sockets that had a pageview acked."""
        return {sock.number: session_id(sock.number) for sock in self.sockets
                if any(kind == "pageview" for _, kind, _ in sock.acks)}


# Daemon processes --------------------------------------------------------------------


class NodeFailed(AssertionError):
    """A node exited or did not become ready."""


class Node:
    """One ``twistd -n bklit`` subprocess; its output goes to ``<name>-<n>.out``."""

    def __init__(self, name: str, role: str, env: dict[str, str], directory: Path):
        self.name = name
        self.role = role
        self.env = env
        self.directory = directory
        self.port = free_port() if role != "writer" else None
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def output(self) -> Path:
        """The current run's stdout and stderr (the log)."""
        return self.directory / f"{self.name}-{self.starts}.out"

    def argv(self) -> list[str]:
        """``twistd -n bklit`` with this node's listen address."""
        argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "bklit"]
        if self.port is not None:
            argv += ["--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        return argv

    async def start(self) -> "Node":
        """Start the process; for an ingest node, wait until /healthz says 200."""
        self.starts += 1
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(self.argv(), cwd=self.directory, env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if self.port is not None:
            await self._wait_healthy()
        return self

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not await deferToThread(self.healthy):
            if self.process.poll() is not None:
                raise NodeFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise NodeFailed(f"{self.name} not healthy within {START_TIMEOUT:g} s:\n{self.log_tail()}")
            await pause(0.2)

    def healthy(self) -> bool:
        """Whether /healthz answers 200 (blocking)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        self.process.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL, as a crash would, and reap the process."""
        if self.running:
            self.process.kill()
        await deferToThread(self.process.wait)

    async def terminate(self, timeout: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM; returns ``(exit status, seconds until exit)`` (status None: still running)."""
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        try:
            code = await deferToThread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the current run's output."""
        try:
            return self.output.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# The report ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """One row of the report: what one fault did to the events."""

    fault: str
    sent: int = 0
    acked: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    unacked: int = 0  # stored, but no ack reached the client
    recovery: float | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        """The row as table cells."""
        recovery = "–" if self.recovery is None else f"{self.recovery:.1f} s"
        verdict = "ok" if not self.problems else "FAILED: " + "; ".join(self.problems)
        return [self.fault, str(self.sent), str(self.acked), str(self.stored), str(self.lost),
                str(self.duplicated), recovery, "; ".join([verdict, *self.notes])]


#: Every case's row, in the order the cases ran.
RESULTS: list[Outcome] = []

HEADER = ["fault", "sent", "acked", "stored", "lost", "duplicated", "recovery", "verdict, notes"]


def markdown_report(rows: Iterable[list[str]] | None = None) -> str:
    """Rows of cells (``Outcome.cells()``; by default those of RESULTS) as a markdown table."""
    if rows is None:
        rows = [outcome.cells() for outcome in RESULTS]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for cells in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# What ClickHouse holds ---------------------------------------------------------------


@dataclass
class Stored:
    """The load's rows in ClickHouse: each row's id under its message's marker."""

    by_marker: dict[str, list[str]]
    reinserted: int

    @property
    def ids(self) -> set[str]:
        """Every stored event id."""
        return {event_id for ids in self.by_marker.values() for event_id in ids}

    def doubled(self) -> set[str]:
        """Markers with more than one row: stored twice, under one id or two."""
        return {m for m, ids in self.by_marker.items() if len(ids) > 1}


def row_marker(table: str, value: str) -> str:
    """The marker of a stored row: from a pageview's url query or an event's metadata."""
    if table == "page_view_event":
        query = parse_qs(urlsplit(value).query)
        return marker(int(query["c"][0]), int(query["n"][0])) if "c" in query else value
    return json.loads(value).get("marker", value)


def thd_stored(clickhouse_url: str, final: bool) -> Stored:
    """The load's rows (FINAL, or every row as it is), blocking."""
    by_marker: dict[str, list[str]] = {}
    reinserted = 0
    for table, column in (("page_view_event", "url"), ("tracked_event", "metadata")):
        rows = clickhouse_rows(clickhouse_url, f"SELECT id, {column} FROM {table}{' FINAL' if final else ''}")
        for event_id, value in rows:
            by_marker.setdefault(row_marker(table, value), []).append(event_id)
        reinserted += len(rows) - len({event_id for event_id, _ in rows})
    return Stored(by_marker, reinserted)


def thd_merge(clickhouse_url: str) -> None:
    """OPTIMIZE ... FINAL both event tables: rows with one id become one row."""
    for table in ("page_view_event", "tracked_event"):
        clickhouse_rows(clickhouse_url, f"OPTIMIZE TABLE {table} FINAL")


def thd_stored_ids(clickhouse_url: str) -> set[str]:
    """Every event id in both event tables (no FINAL: presence is enough)."""
    return {row[0] for row in clickhouse_rows(
        clickhouse_url, "SELECT id FROM page_view_event UNION ALL SELECT id FROM tracked_event")}


def thd_sessions(clickhouse_url: str) -> dict[str, tuple[Any, str, int, int]]:
    """``{session id: (ended_at, end_reason, version FINAL, highest version)}``."""
    final = clickhouse_rows(clickhouse_url, "SELECT session_id, ended_at, end_reason, version FROM tracked_session FINAL")
    highest = dict(clickhouse_rows(clickhouse_url, "SELECT session_id, max(version) FROM tracked_session GROUP BY session_id"))
    return {session: (ended, reason, version, highest.get(session, 0)) for session, ended, reason, version in final}


def sample(items: Iterable[str], count: int = 3) -> str:
    """A few of ``items``, for a message."""
    return ", ".join(sorted(items)[:count])


# One case -----------------------------------------------------------------------------


class FaultCase:
    """One fault under load, from the first node to the row of the report.

    ``allowed_errors`` are the error codes clients may get; ``server_closes``
    whether the server (or its death) may close load sockets; ``lossy``
    that the fault may lose acked events (the row reports how many, and
    recovery is the time until what survived was stored).  Tests add
    their own checks with ``expect``; leaving the ``async with`` block
    records the row, puts Redis and ClickHouse back up, kills the nodes and
    fails the test when anything was wrong.
    """

    def __init__(self, fault: str, tmp_path: Path, redis_server: Any, clickhouse_server: Any,
                 clickhouse_url: str, *, allowed_errors: tuple[str, ...] = (), server_closes: bool = False,
                 load_seconds: float = LOAD_SECONDS, lossy: bool = False):
        self.outcome = Outcome(fault)
        self.redis_url = redis_server.url  # a RedisSet's is the Sentinel URL
        self.lossy = lossy
        self._progress: list[tuple[float, int]] = []  # lossy: (seconds after the fault, acked then and stored)
        self.directory = tmp_path
        self.redis_server = redis_server
        self.clickhouse_server = clickhouse_server
        self.clickhouse_url = clickhouse_url
        self.allowed_errors = allowed_errors
        self.server_closes = server_closes
        self.nodes: list[Node] = []
        self.load = Load(load_seconds)
        self.session_reasons: dict[int, str] = {}
        self.fault_began_at: float | None = None
        self.fault_ended_at: float | None = None
        self._recovery: defer.Deferred | None = None
        self._key = ""

    async def __aenter__(self) -> "FaultCase":
        self._key = await deferToThread(self._create_key)
        return self

    async def __aexit__(self, kind: Any, error: Any, trace: Any) -> None:
        if self._recovery is not None and not self._recovery.called:
            self._recovery.cancel()
        for sock in self.load.still_open():
            sock.dropConnection(abort=True)
        for node in self.nodes:
            await node.kill()
        await deferToThread(self.redis_server.ensure_running)
        await deferToThread(self.clickhouse_server.ensure_running)
        if error is not None:
            self.outcome.problems.append(f"stopped early: {kind.__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        RESULTS.append(self.outcome)
        if error is None and self.outcome.problems:
            raise AssertionError(f"{self.outcome.fault}:\n" + "\n".join(self.outcome.problems))

    def _create_key(self) -> str:
        done = subprocess.run([str(BIN / "bklit"), "token", "create", "--project", PROJECT,
                               "--redis", self.redis_url],
                              env=clean_env({}), check=True, capture_output=True, text=True)
        return done.stdout.strip()

    # Nodes and load --------------------------------------------------------------

    def node(self, name: str, role: str = "all", **settings: str) -> Node:
        """A node (not started) with the test settings, its own spool and ``settings``."""
        spool = self.directory / f"spool-{name}"
        spool.mkdir(exist_ok=True)
        values = dict(BASE_SETTINGS, redis=self.redis_url, clickhouse=self.clickhouse_url, role=role,
                      spool_dir=str(spool))
        values.update(settings)
        node = Node(name, role, clean_env(values), self.directory)
        self.nodes.append(node)
        return node

    async def start_load(self, node: Node, numbers: Iterable[int] = range(CONNECTIONS)) -> None:
        """Sockets ``numbers`` on ``node`` start sending."""
        await self.load.add(node.port, numbers, self._key)

    async def at(self, seconds: float) -> None:
        """Wait until ``seconds`` after the load started."""
        await pause(self.load.started_at + seconds - time.monotonic())

    # The fault's window ----------------------------------------------------------

    def fault_began(self) -> None:
        """The fault is in effect from now."""
        self.fault_began_at = time.monotonic()

    def fault_ended(self) -> None:
        """The fault is over: start timing how long until what was acked so far is stored."""
        self.fault_ended_at = time.monotonic()
        expected = self.load.acked(until=self.fault_ended_at)
        self._recovery = defer.ensureDeferred(self._watch_recovery(expected, self.fault_ended_at))

    async def _watch_recovery(self, expected: set[str], since: float) -> None:
        while True:
            try:
                stored = await deferToThread(thd_stored_ids, self.clickhouse_url)
            except Exception:  # ClickHouse still starting
                stored = set()
            if self.lossy:
                self._progress.append((time.monotonic() - since, len(expected & stored)))
            elif expected <= stored:
                self.outcome.recovery = time.monotonic() - since
                return
            await pause(POLL)

    def acked_during_fault(self, numbers: Iterable[int] | None = None) -> int:
        """Events acked while the fault was in effect."""
        return len(self.load.acked(numbers, since=self.fault_began_at, until=self.fault_ended_at))

    def acked_after_fault(self) -> int:
        """Events acked once the fault was over."""
        return len(self.load.acked(since=self.fault_ended_at))

    def expect(self, condition: bool, problem: str) -> None:
        """Record ``problem`` unless ``condition`` holds."""
        if not condition:
            self.outcome.problems.append(problem)

    def note(self, text: str) -> None:
        """Add a note to the report row."""
        self.outcome.notes.append(text)

    # The end ---------------------------------------------------------------------------

    async def finish(self) -> Outcome:
        """Once the load stopped: wait for recovery and the drain, compare acked with stored.

        Recovery, the drain and the session ends share one deadline,
        ``SETTLE_TIMEOUT`` after the sockets closed.
        """
        await self.load.wait_stopped()
        await self.load.wait_answered(timeout=20)
        unanswered = sum(s.sent - s.answered for s in self.load.still_open())
        await self.load.close()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        await self._wait_recovered(deadline)
        acked = self.load.acked()
        drained = await self._wait_drained(acked, deadline)
        self._check_load(acked, unanswered)
        await self._check_stored(acked)
        await self._check_sessions(deadline)
        self.expect(drained, "stream not drained, or acked events not stored, in time")
        return self.outcome

    async def _wait_recovered(self, deadline: float) -> None:
        if self._recovery is None or self.lossy:  # lossy: timed once the final rows are known
            return
        try:
            await self._recovery.addTimeout(max(0.0, deadline - time.monotonic()), reactor)
        except defer.TimeoutError:
            waited = time.monotonic() - self.fault_ended_at
            self.outcome.problems.append(f"what was acked before the fault ended not stored {waited:.0f} s after its end")
            return
        self.expect(self.outcome.recovery <= RECOVERY_LIMIT,
                    f"recovery took {self.outcome.recovery:.1f} s (limit {RECOVERY_LIMIT:g} s)")

    async def _wait_drained(self, acked: set[str], deadline: float) -> bool:
        """Wait until the stream is empty, nothing pending, every acked event stored."""
        async with redis_connection(self.redis_url) as redis:
            while time.monotonic() < deadline:
                length = int(await redis.call("XLEN", STREAM))
                pending = int((await redis.call("XPENDING", STREAM, GROUP))[0])
                if length == 0 and pending == 0 and (
                        self.lossy or acked <= await deferToThread(thd_stored_ids, self.clickhouse_url)):
                    return True
                await pause(POLL)
        return False

    def _check_load(self, acked: set[str], unanswered: int) -> None:
        outcome, load = self.outcome, self.load
        outcome.sent = sum(sock.sent for sock in load.sockets)
        outcome.acked = len(acked)
        errors = load.error_codes()
        if errors:
            self.note(", ".join(f"{count} {code}" for code, count in sorted(errors.items())))
        self.expect(outcome.acked > 0, "nothing was acked")
        self.expect(set(errors) <= set(self.allowed_errors), f"unexpected errors: {dict(errors)}")
        self.expect(unanswered == 0, f"{unanswered} messages on open sockets got neither ack nor error")
        closes = Counter(load.server_closed().values())
        if closes:
            self.note("server closed " + ", ".join(f"{n} with {code}" for code, n in sorted(closes.items(), key=str)))
        self.expect(self.server_closes or not closes, f"sockets closed by the server: {dict(closes)}")

    async def _check_stored(self, acked: set[str]) -> None:
        outcome = self.outcome
        final = await deferToThread(thd_stored, self.clickhouse_url, True)
        before_merge = await deferToThread(thd_stored, self.clickhouse_url, False)
        await deferToThread(thd_merge, self.clickhouse_url)
        merged = await deferToThread(thd_stored, self.clickhouse_url, False)
        stored = final.ids
        lost = acked - stored
        doubled = final.doubled() | merged.doubled()
        outcome.stored, outcome.lost, outcome.duplicated = len(stored), len(lost), len(doubled)
        if before_merge.reinserted:
            self.note(f"{before_merge.reinserted} rows inserted twice, merged by id")
        outcome.unacked = len(stored - acked)
        if outcome.unacked:
            self.note(f"{outcome.unacked} stored without an ack")
        if self.lossy:
            self._time_lossy_recovery(stored)
            self.note(f"{len(lost)} acked events lost" + (f", e.g. {sample(lost)}" if lost else ""))
            self.expect(len(acked & stored) + len(lost) == len(acked), "acked = stored + lost does not add up")
        else:
            self.expect(not lost, f"{len(lost)} acked events not stored, e.g. {sample(lost)}")
        self.expect(not doubled, f"{len(doubled)} messages stored more than once, e.g. {sample(doubled)}")
        foreign = set(final.by_marker) - self.load.sent_markers()
        self.expect(not foreign, f"rows with markers nobody sent: {sample(foreign)}")

    def _time_lossy_recovery(self, stored: set[str]) -> None:
        """Recovery of a lossy case: until what was acked before the fault's end, and survived, was stored."""
        if self._recovery is None:
            return
        self._recovery.cancel()
        self._recovery.addErrback(lambda failure: failure.trap(defer.CancelledError))
        survived = len(self.load.acked(until=self.fault_ended_at) & stored)
        self.outcome.recovery = next((at for at, count in self._progress if count >= survived), None)

    async def _check_sessions(self, deadline: float) -> None:
        """Every session with an acked pageview ends, its end row winning FINAL, with the reason expected."""
        expected = {session: self.session_reasons.get(n, "disconnect")
                    for n, session in self.load.sessions_with_pageviews().items()}
        wrong = self._wrong_sessions(expected, await deferToThread(thd_sessions, self.clickhouse_url))
        while wrong and time.monotonic() < deadline:
            await pause(POLL)
            wrong = self._wrong_sessions(expected, await deferToThread(thd_sessions, self.clickhouse_url))
        problem = f"{len(wrong)} sessions without their end state: " + "; ".join(
            f"{s}: {why}" for s, why in sorted(wrong.items())[:3])
        if self.lossy and wrong:
            self.note(problem)
        else:
            self.expect(not wrong, problem)

    @staticmethod
    def _wrong_sessions(expected: dict[str, str], stored: dict[str, tuple]) -> dict[str, str]:
        wrong = {}
        for session, reason in expected.items():
            if session not in stored:
                wrong[session] = "no row"
                continue
            ended, got, version, highest = stored[session]
            if ended is None or got != reason:
                wrong[session] = f"ended_at {ended}, end_reason {got!r}, expected {reason!r}"
            elif version != highest:
                wrong[session] = f"version {version} won over {highest}"
        return wrong


def clean_env(settings: dict[str, str]) -> dict[str, str]:
    """This environment without ``BKLIT_*``, plus ``settings`` as ``BKLIT_<KEY>``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BKLIT_")}
    env.update({f"BKLIT_{key.upper()}": str(value) for key, value in settings.items()})
    return env
