"""The bad-input catalogue's scenario: a daemon, a well-behaved client beside the bad input, and the checks after.

Used by test_bad_input.py (messages, fields, floods), test_bad_protocol.py
(keys, frames, connections, headers) and test_revocation_live.py.
"""

import json
import os
import struct
import time
from collections import Counter
from contextlib import asynccontextmanager

from twisted.internet import defer, reactor, task

from harness import clickhouse_rows, connect, eventually, running_daemon, sdk_pageview, settings


GOOD_SESSION = "1732608000000-good01"


BAD_SESSION = "1732608000000-bad001"


GOOD_URL = "https://example.com/good"


AFTER_URL = "https://example.com/after-the-error"


GOOD_ADDRESS = {"X-Forwarded-For": "198.51.100.10"}  # documentation ranges only


BAD_ADDRESS = {"X-Forwarded-For": "203.0.113.66"}


PACE = 0.1


MAX_ACK_SECONDS = 1.0


def sleep(seconds):
    """A Deferred that fires after ``seconds``."""
    return task.deferLater(reactor, seconds, lambda: None)


def frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length=None):
    """One client-to-server frame, masked unless ``mask`` is False; ``length`` overrides its length field."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


def text_frames(*messages):
    """Masked text frames of JSON messages (or raw strings), to be written in one go."""
    return b"".join(frame(1, m if isinstance(m, str) else json.dumps(m)) for m in messages)


class GoodClient:
    """A well-behaved SDK socket: a pageview every PACE seconds, the next only after the ack."""

    def __init__(self, client, key):
        self.client = client
        self.key = key
        self.acked = []  # (event id, seconds until its ack)
        self.running = True
        self.loop = defer.ensureDeferred(self._run())

    async def _run(self):
        while self.running:
            started = time.monotonic()
            self.client.send(sdk_pageview("p1", GOOD_SESSION, key=self.key, url=GOOD_URL))
            ack = await self.client.next(timeout=5)
            assert ack["type"] == "ack" and ack["messageType"] == "pageview", ack
            self.acked.append((ack["eventId"], time.monotonic() - started))
            await sleep(PACE)

    async def more_acks(self, count=2, timeout=10.0):
        """Wait until ``count`` more acks than now arrived (fails if the loop failed)."""
        target = len(self.acked) + count
        await eventually(lambda: len(self.acked) >= target or self.loop.called, timeout=timeout, interval=0.02)
        if self.loop.called:
            await self.loop  # raises what stopped it

    async def stop(self):
        """Stop after the ack in flight; every ack must have come within MAX_ACK_SECONDS."""
        self.running = False
        await self.loop
        slowest = max(seconds for _, seconds in self.acked)
        assert slowest < MAX_ACK_SECONDS, f"the good client waited {slowest:.2f} s for an ack"

    def rows(self):
        """The rows its acks promise."""
        return [(GOOD_SESSION, event_id, GOOD_URL) for event_id, _ in self.acked]


async def open_client(port, session=BAD_SESSION, key=None, headers=BAD_ADDRESS, project="p1"):
    """A socket for ``session``, past ``connected`` (and ``auth`` when given a key)."""
    client = await connect(port, path=f"/?projectId={project}&sessionId={session}", headers=headers)
    assert (await client.next())["type"] == "connected"
    if key is not None:
        client.send({"type": "auth", "apiKey": key})
        assert await client.next() == {"type": "auth_success"}
    return client


async def acked(client, kind="pageview"):
    """The next message, which must be an ack of ``kind``; returns its event id."""
    ack = await client.next()
    assert ack["type"] == "ack" and ack["messageType"] == kind, ack
    assert set(ack) == {"type", "eventId", "messageType"}
    return ack["eventId"]


def _same(rows, expected):
    """Whether stored (session, id, x) rows are the expected ones; an expected id of None matches any id."""
    by_id = {row[1]: (row[0], row[2]) for row in rows}
    return (len(rows) == len(expected)
            and Counter((r[0], r[2]) for r in rows) == Counter((e[0], e[2]) for e in expected)
            and all(by_id.get(e[1]) == (e[0], e[2]) for e in expected if e[1] is not None))


class Scenario:
    """What a case works with: the daemon, a key for p1, the good client, the bad pageviews it expects stored."""

    def __init__(self, daemon, key, good):
        self.daemon = daemon
        self.port = daemon.port
        self.key = key
        self.good = good
        self.pageviews = []  # (session, event id, or None when stored without an ack, url)

    async def bad(self, key=None, **kwargs):
        """A socket from the bad address (see open_client)."""
        return await open_client(self.port, key=key, **kwargs)


@asynccontextmanager
async def scenario(redis_server, redis_url, clickhouse_url, **config):
    """A daemon (trusting loopback as a proxy unless told otherwise) with a good client running.

    On a clean exit: the good client got two more acks after the case and
    was never slow, every bad socket gave back its place, and ClickHouse
    holds exactly the good client's pageviews and ``pageviews``, no event,
    no dead letter.
    """
    config.setdefault("trusted_proxies", "127.0.0.1")
    async with running_daemon(settings(redis_url, clickhouse_url, **config)) as daemon:
        key = await daemon.token("p1")
        good = GoodClient(await open_client(daemon.port, GOOD_SESSION, key, headers=GOOD_ADDRESS), key)
        here = Scenario(daemon, key, good)
        try:
            await good.more_acks(1)
            yield here
            await good.more_acks(2)
            await eventually(lambda: daemon.service.admission.total == 1)
        except BaseException:
            good.running = False
            good.loop.addErrback(lambda failure: None)  # the case's failure is the one to report
            raise
        await good.stop()
        await close(good.client)
        expected = good.rows() + here.pageviews

        def stored():
            return clickhouse_rows(clickhouse_url, "SELECT session_id, id, url FROM page_view_event")

        try:
            await eventually(lambda: redis_server.execute("XLEN", "bklit:events") == 0
                             and _same(stored(), expected))
        except AssertionError:
            pass  # the assertion below shows the difference
        assert _same(stored(), expected), (sorted(stored()), sorted(expected))
        assert clickhouse_rows(clickhouse_url, "SELECT id FROM tracked_event") == []
        assert redis_server.execute("XLEN", "bklit:events:dead") == 0


async def close(*clients):
    """Close the sockets still open and wait until each is closed."""
    for client in clients:
        if client.close_code is None:
            client.sendClose()
        await client.wait_closed()


def pageview(key, **changes):
    """A valid pageview of the bad socket's session, with ``changes`` to its data."""
    return sdk_pageview("p1", BAD_SESSION, key=key, **changes)
