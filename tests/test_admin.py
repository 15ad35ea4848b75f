"""``bklit queue``, ``bklit sessions`` and ``bklit stats`` against real servers and daemons.

The command runs as a subprocess, as an operator runs it.  While a daemon
runs in the test's reactor, the command runs through
``getProcessOutputAndValue`` so the reactor keeps serving the daemon.
Exit codes: 0 done, 1 failed, 2 usage error.
"""

import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from bklit.clickhouse import Inserter, thd_once
from bklit.clickhouse_urls import clickhouse_database
from bklit.keys import DEAD_STREAM, GROUP, STREAM
from harness import (SESSION, clickhouse_rows, eventually, redis_connection, running_daemon, sdk_event,
                     sdk_pageview, settings)
from servers import free_port
from harness import BKLIT, bklit
from harness import open_dashboard, sdk_client

OTHER = "1732608000001-other1"


async def run(*args):
    """``bklit ARGS`` without blocking the reactor: ``(exit code, stdout, stderr)``."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("BKLIT_")}
    out, err, code = await getProcessOutputAndValue(BKLIT, args, env=environ).addTimeout(60, reactor)
    return code, out.decode(), err.decode()


async def run_json(*args):
    """``bklit ARGS --json``, which must succeed; its output parsed."""
    code, out, err = await run(*args, "--json")
    assert code == 0, err
    return json.loads(out)



def pageview_record(event_id, url, project="p1", session=SESSION, timestamp=None):
    """The ``e`` field of a page_view_event stream entry."""
    row = {"id": event_id, "project_id": project, "session_id": session, "url": url,
           "timestamp": timestamp or int(time.time()), "received_at": int(time.time())}
    return json.dumps({"table": "page_view_event", "row": row}, separators=(",", ":"))


async def pageview(client, key, url, session=SESSION):
    """Send a pageview on an SDK socket and wait for its ack."""
    client.send(sdk_pageview("p1", session=session, key=key, url=url))
    return (await client.next_of("ack"))["eventId"]


class TestQueueStatus:
    """``bklit queue status``."""

    def test_nothing_there_yet(self, redis_url):
        """No stream, no group: zeros and nulls, exit 0, and the text says the group is not created."""
        done = bklit("queue", "status", "--json", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "stream": STREAM, "length": 0, "group": GROUP, "group_exists": False, "pending": 0,
            "consumers": {}, "lag": None, "oldest_pending_id": None, "oldest_pending_age": None,
            "oldest_pending_idle": None, "dead_stream": DEAD_STREAM, "dead": 0}
        text = bklit("queue", "status", "--redis", redis_url)
        assert text.returncode == 0, text.stderr
        assert "bklit-writers (not created yet" in text.stdout
        assert "dead letters    0" in text.stdout

    def test_group_with_nothing_pending(self, redis_url, redis_server):
        """A group that read everything: no pending entry, lag 0."""
        redis_server.execute("XADD", STREAM, "*", "e", "{}")
        redis_server.execute("XGROUP", "CREATE", STREAM, GROUP, "$")
        status = json.loads(bklit("queue", "status", "--json", "--redis", redis_url).stdout)
        assert (status["group_exists"], status["length"], status["pending"], status["lag"]) == (True, 1, 0, 0)
        assert status["oldest_pending_id"] is None

    @pytest_twisted.ensureDeferred
    async def test_pending_per_consumer_lag_and_dead(self, redis_url):
        """Entries read and not acknowledged count per consumer; the oldest one's age; unread ones are lag."""
        async with redis_connection(redis_url) as redis:
            ids = [await redis.call("XADD", STREAM, "*", "e", "{}") for _ in range(4)]
            await redis.call("XGROUP", "CREATE", STREAM, GROUP, "0")
            await redis.call("XREADGROUP", "GROUP", GROUP, "writer-a", "COUNT", "2", "STREAMS", STREAM, ">")
            await redis.call("XREADGROUP", "GROUP", GROUP, "writer-b", "COUNT", "1", "STREAMS", STREAM, ">")
            for n in range(3):
                await redis.call("XADD", DEAD_STREAM, "*", "e", "{}", "error", f"refused {n}", "id", ids[n])
            await task.deferLater(reactor, 0.5, lambda: None)
            status = await run_json("queue", "status", "--redis", redis_url)
            assert status["length"] == 4 and status["group_exists"]
            assert status["pending"] == 3 and status["consumers"] == {"writer-a": 2, "writer-b": 1}
            assert status["lag"] == 1 and status["dead"] == 3
            assert status["oldest_pending_id"] == ids[0]
            assert 0.4 <= status["oldest_pending_age"] < 30 and 0.4 <= status["oldest_pending_idle"] < 30
            code, out, err = await run("queue", "status", "--redis", redis_url)
            assert code == 0, err
            lines = out.splitlines()
            assert "pending         3" in lines and "  writer-a      2" in lines and "lag             1" in lines
            assert any(line.startswith("oldest pending") and ids[0] in line for line in lines)


class TestRetryDead:
    """``bklit queue retry-dead``."""

    @pytest_twisted.ensureDeferred
    async def test_moved_back_then_stored_by_a_writer(self, redis_url, clickhouse_url):
        """Dead letters go back in order, a writer stores them; one without ``e`` stays, and is named."""
        async with redis_connection(redis_url) as redis:
            records = [pageview_record(f"ev-{n}", f"https://example.com/{n}") for n in range(3)]
            dead = [await redis.call("XADD", DEAD_STREAM, "*", "e", r, "error", "refused", "id", f"{n}-1")
                    for n, r in enumerate(records)]
            broken = await redis.call("XADD", DEAD_STREAM, "*", "error", "no entry")

            listed = await run_json("queue", "retry-dead", "--dry-run", "--redis", redis_url)
            assert listed == {"would_move": 3, "skipped": [broken], "entries": [
                {"id": d, "original_id": f"{n}-1", "table": "page_view_event", "error": "refused"}
                for n, d in enumerate(dead)]}
            assert int(await redis.call("XLEN", DEAD_STREAM)) == 4
            assert int(await redis.call("XLEN", STREAM)) == 0

            moved = await run_json("queue", "retry-dead", "--redis", redis_url)
            assert moved["moved"] == 3 and moved["skipped"] == [broken]
            assert [e["id"] for e in moved["entries"]] == dead
            stream = await redis.call("XRANGE", STREAM, "-", "+")
            assert [entry_id for entry_id, _ in stream] == [e["new_id"] for e in moved["entries"]]
            assert [fields[1] for _, fields in stream] == records
            assert [entry_id for entry_id, _ in await redis.call("XRANGE", DEAD_STREAM, "-", "+")] == [broken]

        async with running_daemon(settings(redis_url, clickhouse_url, role="writer")):
            stored = await eventually(lambda: clickhouse_rows(
                clickhouse_url, "SELECT id, url FROM page_view_event FINAL ORDER BY id"), timeout=10)
        assert stored == [(f"ev-{n}", f"https://example.com/{n}") for n in range(3)]

    @pytest_twisted.ensureDeferred
    async def test_limit_moves_the_oldest(self, redis_url):
        """--limit N moves the N oldest and leaves the rest; text mode says how many on stderr."""
        async with redis_connection(redis_url) as redis:
            records = [pageview_record(f"ev-{n}", "https://example.com/") for n in range(5)]
            dead = [await redis.call("XADD", DEAD_STREAM, "*", "e", r, "error", "refused") for r in records]
            code, out, err = await run("queue", "retry-dead", "--limit", "2", "--redis", redis_url)
            assert code == 0, err
            assert out == "" and f"moved 2 dead letters from {DEAD_STREAM} to {STREAM}" in err
            assert [fields[1] for _, fields in await redis.call("XRANGE", STREAM, "-", "+")] == records[:2]
            assert [i for i, _ in await redis.call("XRANGE", DEAD_STREAM, "-", "+")] == dead[2:]

    def test_dry_run_text_and_empty(self, redis_url, redis_server):
        """--dry-run lists id, table and error per line; an empty dead stream moves nothing."""
        entry = redis_server.execute("XADD", DEAD_STREAM, "*", "e", pageview_record("x", "u"),
                                     "error", "ServerException: Code: 53").decode()
        done = bklit("queue", "retry-dead", "--dry-run", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [entry, "page_view_event", "ServerException:", "Code:", "53"]
        assert "would move 1 dead letters" in done.stderr
        assert redis_server.execute("XLEN", DEAD_STREAM) == 1
        redis_server.execute("DEL", DEAD_STREAM)
        empty = bklit("queue", "retry-dead", "--json", "--redis", redis_url)
        assert empty.returncode == 0, empty.stderr
        assert json.loads(empty.stdout) == {"moved": 0, "entries": [], "skipped": []}


class TestSessions:
    """``bklit sessions list`` and ``bklit sessions end`` with a real daemon."""

    @pytest_twisted.ensureDeferred
    async def test_list_shows_daemon_sessions_most_recent_first(self, redis_url, clickhouse_url):
        """Sessions made by real pageviews are listed with their state; --limit keeps the most recent."""
        async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
            key = await daemon.token("p1")
            first = await sdk_client(daemon.port, key)
            second = await sdk_client(daemon.port, key, session=OTHER)
            started = time.time()
            await pageview(first, key, "https://example.com/a")
            await pageview(first, key, "https://example.com/b")
            await task.deferLater(reactor, 0.05, lambda: None)
            await pageview(second, key, "https://example.com/c", session=OTHER)

            listed = await run_json("sessions", "list", "--project", "p1", "--redis", redis_url)
            assert listed["project"] == "p1" and listed["live"] == 2
            assert [s["session_id"] for s in listed["sessions"]] == [OTHER, SESSION]
            mine = listed["sessions"][1]
            assert (mine["pageviews"], mine["entry_page"], mine["exit_page"]) == (
                2, "https://example.com/a", "https://example.com/b")
            assert mine["started_at"] / 1000 == pytest.approx(started, abs=5)
            assert 0 <= mine["last_heartbeat_age"] < 5 and mine["user_agent"].startswith("Mozilla/5.0")

            code, out, err = await run("sessions", "list", "--project", "p1", "--limit", "1", "--redis", redis_url)
            assert code == 0, err
            header, *rows = out.splitlines()
            assert header.split()[:2] == ["SESSION", "STARTED"]
            assert len(rows) == 1 and rows[0].startswith(OTHER)
            assert rows[0].endswith("https://example.com/c -> https://example.com/c")
            assert "2 live sessions in p1, showing the 1 most recently active" in err

            empty = await run_json("sessions", "list", "--project", "p2", "--redis", redis_url)
            assert empty == {"project": "p2", "live": 0, "sessions": []}
            for client in (first, second):
                client.sendClose()
                await client.wait_closed()

    @pytest_twisted.ensureDeferred
    async def test_end_all_is_stored_and_broadcast(self, redis_url, clickhouse_url):
        """Every live session ends: end rows with reason admin, session_end on the dashboard, none live."""
        async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
            key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
            dash, _ = await open_dashboard(daemon.port, read)
            clients = [await sdk_client(daemon.port, key, session=s) for s in (SESSION, OTHER)]
            for client, session in zip(clients, (SESSION, OTHER)):
                await pageview(client, key, "https://example.com/", session=session)
                await dash.next_of("pageview")

            code, out, err = await run("sessions", "end", "--project", "p1", "--json", "--redis", redis_url)
            assert code == 0, err
            ended = json.loads(out)
            assert ended["ended"] == 2 and sorted(ended["sessions"]) == sorted([SESSION, OTHER])
            ends = [await dash.next_of("session_end") for _ in range(2)]
            assert sorted(e["data"]["sessionId"] for e in ends) == sorted([SESSION, OTHER])
            assert {e["data"]["reason"] for e in ends} == {"admin"}
            assert int(await daemon.service.redis.call("ZCARD", "live:sessions:p1")) == 0

            query = ("SELECT session_id, end_reason, ended_at IS NOT NULL, pageviews"
                     " FROM tracked_session FINAL ORDER BY session_id")
            expected = sorted([(SESSION, "admin", 1, 1), (OTHER, "admin", 1, 1)])
            assert await eventually(lambda: clickhouse_rows(clickhouse_url, query) == expected, timeout=10)

            # The sockets closing later end nothing more.
            for client in clients:
                client.sendClose()
                await client.wait_closed()
            await task.deferLater(reactor, 0.5, lambda: None)
            assert clickhouse_rows(clickhouse_url, query) == expected
            dash.sendClose()
            await dash.wait_closed()

    @pytest_twisted.ensureDeferred
    async def test_end_one_session(self, redis_url, clickhouse_url):
        """--session ends that one only; ending it again, or an unknown one, exits 1 naming it."""
        async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
            key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
            dash, _ = await open_dashboard(daemon.port, read)
            clients = [await sdk_client(daemon.port, key, session=s) for s in (SESSION, OTHER)]
            for client, session in zip(clients, (SESSION, OTHER)):
                await pageview(client, key, "https://example.com/", session=session)

            code, out, err = await run("sessions", "end", "--project", "p1", "--session", OTHER,
                                       "--redis", redis_url)
            assert code == 0, err
            assert out == "" and "ended 1 sessions of p1" in err
            assert (await dash.next_of("session_end"))["data"] == {"sessionId": OTHER, "reason": "admin"}
            assert await daemon.service.redis.call("ZRANGE", "live:sessions:p1", "0", "-1") == [SESSION]

            for session in (OTHER, "no-such-session"):
                code, out, err = await run("sessions", "end", "--project", "p1", "--session", session,
                                           "--redis", redis_url)
                assert code == 1
                assert f"bklit: session '{session}' is not live in project 'p1'" in err
            assert await daemon.service.redis.call("ZRANGE", "live:sessions:p1", "0", "-1") == [SESSION]
            for client in clients + [dash]:
                client.sendClose()
                await client.wait_closed()

    def test_end_with_nothing_live(self, redis_url):
        """No live session in the project: nothing to do, exit 0."""
        done = bklit("sessions", "end", "--project", "p1", "--json", "--redis", redis_url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"project": "p1", "ended": 0, "sessions": []}


class TestStats:
    """``bklit stats``."""

    @pytest_twisted.ensureDeferred
    async def test_numbers_equal_what_was_sent(self, redis_url, clickhouse_url):
        """Pageviews, sessions, events, live and top pages of the period; other projects and older rows left out."""
        async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
            key = await daemon.token("p1")
            first = await sdk_client(daemon.port, key)
            second = await sdk_client(daemon.port, key, session=OTHER)
            for url in ("https://example.com/a", "https://example.com/b", "https://example.com/a"):
                await pageview(first, key, url)
            await pageview(second, key, "https://example.com/a", session=OTHER)
            first.send(sdk_event("p1", key=key))
            await first.next_of("ack")
            second.sendClose()
            await second.wait_closed()
            # A row three days old, stored twice (a retried insert), and another project's row.
            old = {"id": "old-1", "project_id": "p1", "session_id": "s-old", "url": "https://example.com/old",
                   "timestamp": int(time.time()) - 3 * 86400}
            other = {"id": "p2-1", "project_id": "p2", "session_id": "s-p2", "url": "https://example.com/a",
                     "timestamp": int(time.time())}
            inserter = Inserter(clickhouse_database(clickhouse_url))
            for rows in ([old], [old, other]):
                await deferToThread(thd_once, clickhouse_url, inserter.thd_insert, "page_view_event", rows)
            await eventually(lambda: clickhouse_rows(clickhouse_url, (
                "SELECT uniqExact(id) FROM page_view_event WHERE project_id = 'p1'"))[0][0] == 5
                and clickhouse_rows(clickhouse_url, "SELECT count() FROM tracked_session FINAL"
                                                    " WHERE ended_at IS NOT NULL")[0][0] == 1
                and clickhouse_rows(clickhouse_url, "SELECT count() FROM tracked_event")[0][0] == 1, timeout=10)

            stats = await run_json("stats", "--project", "p1", "--redis", redis_url, "--clickhouse", clickhouse_url)
            assert stats["since_epoch"] == pytest.approx(time.time() - 86400, abs=60)
            assert {k: v for k, v in stats.items() if k not in ("since", "since_epoch")} == {
                "project": "p1", "pageviews": 4, "sessions": 2, "events": 1, "live": 1,
                "top_pages": [{"url": "https://example.com/a", "pageviews": 3},
                              {"url": "https://example.com/b", "pageviews": 1}],
                "bots": {"pageviews": 0, "sessions": 0, "events": 0, "live": 0}}

            week = await run_json("stats", "--project", "p1", "--since", "7d",
                                  "--redis", redis_url, "--clickhouse", clickhouse_url)
            assert week["pageviews"] == 5 and week["top_pages"][-1] == {"url": "https://example.com/old", "pageviews": 1}
            recent = await run_json("stats", "--project", "p2", "--since", "30m",
                                    "--redis", redis_url, "--clickhouse", clickhouse_url)
            assert (recent["pageviews"], recent["sessions"], recent["live"]) == (1, 0, 0)

            code, out, err = await run("stats", "--project", "p1", "--redis", redis_url, "--clickhouse", clickhouse_url)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].startswith("project p1, last 24h (since ")
            assert "pageviews   4" in lines and "live now    1" in lines
            assert lines[-2:] == ["         3  https://example.com/a", "         1  https://example.com/b"]
            first.sendClose()
            await first.wait_closed()

    def test_clickhouse_unreachable_exits_1(self, redis_url):
        """Nothing listens on the ClickHouse port: exit 1 with one line naming ClickHouse."""
        done = bklit("stats", "--project", "p1", "--redis", redis_url,
                     "--clickhouse", f"clickhouse://default:@127.0.0.1:{free_port()}/bklit")
        assert done.returncode == 1
        assert done.stderr.startswith("bklit: ClickHouse: ") and len(done.stderr.splitlines()) == 1

    def test_no_tables_exits_1(self, redis_url, clickhouse_url):
        """A database nobody migrated: exit 1 with ClickHouse's one-line reason."""
        done = bklit("stats", "--project", "p1", "--redis", redis_url, "--clickhouse", clickhouse_url)
        assert done.returncode == 1
        assert done.stderr.startswith("bklit: ClickHouse: ") and "Traceback" not in done.stderr


class TestUsage:
    """Help, bad arguments and an unreachable Redis."""

    @pytest.mark.parametrize("command", [
        ["queue", "status"], ["queue", "retry-dead"], ["sessions", "list"], ["sessions", "end"], ["stats"]])
    def test_help(self, command):
        """Every command has --help."""
        done = bklit(*command, "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: bklit {' '.join(command)}")

    @pytest.mark.parametrize("args,message", [
        (["stats", "--project", "p1", f"--since={since}"], "argument --since: expected minutes, hours or days")
        for since in ("3x", "24", "0h", "-1d", "1w", "99999999d", "")
    ] + [
        (["sessions", "list"], "the following arguments are required: --project"),
        (["sessions", "end"], "the following arguments are required: --project"),
        (["stats"], "the following arguments are required: --project"),
        (["stats", "--project", "p 1"], "argument --project: invalid project id 'p 1'"),
        (["sessions", "end", "--project", "p1'--"], "argument --project: invalid project id"),
        (["sessions", "list", "--project", "p1", "--limit", "0"], "argument --limit: expected a whole number"),
        (["queue", "retry-dead", "--limit", "many"], "argument --limit: expected a whole number"),
        (["queue"], "usage: bklit queue"),
    ])
    def test_bad_arguments_exit_2(self, args, message):
        """Missing or bad options exit 2 naming the option, before anything is touched."""
        done = bklit(*args, "--redis", f"redis://127.0.0.1:{free_port()}/0")
        assert done.returncode == 2
        assert message in done.stderr and done.stdout == ""

    @pytest.mark.parametrize("command", [
        ["queue", "status"], ["queue", "retry-dead"], ["queue", "retry-dead", "--dry-run"],
        ["sessions", "list", "--project", "p1"], ["sessions", "end", "--project", "p1"],
        ["stats", "--project", "p1"]])
    def test_redis_down_exits_1(self, command):
        """Nothing listens on the Redis port: exit 1 with "cannot reach Redis", no traceback."""
        port = free_port()
        done = bklit(*command, "--redis", f"redis://127.0.0.1:{port}/0", timeout=20)
        assert done.returncode == 1
        assert f"cannot reach Redis at 127.0.0.1:{port}" in done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr
