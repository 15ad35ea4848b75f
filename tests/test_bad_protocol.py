"""The bad-input catalogue, part 2: keys, frames, connections and headers.

Written with a raw client that builds its own frames, so it can send what no
WebSocket library would: unmasked or lying frames, reserved opcodes and
close codes, floods of pings.  It answers a close frame as a browser does,
records the close code the server sent (or that it sent none) and any
pongs.  As in part 1 (tests/test_bad_input.py, whose scenario and good
client this part uses), a well-behaved client on another socket must go on
getting acks throughout, and nothing of the bad input may be stored.
"""

import base64
import json
import os
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher

from bklit import keys
from bklit.tokens import TokenStore, key_digest
from catalogue import (AFTER_URL, BAD_ADDRESS, BAD_SESSION, acked, close, frame, pageview, scenario,
                       text_frames)
from harness import clickhouse_rows, connect, eventually, running_daemon, sdk_pageview, settings

PATH = f"/?projectId=p1&sessionId={BAD_SESSION}"


class RawSocket(protocol.Protocol):
    """A WebSocket client that writes bytes as given and parses what the server sends."""

    def __init__(self, path=PATH, headers=None, request=None):
        self.path = path
        self.headers = BAD_ADDRESS if headers is None else headers
        self.request = request
        self.buffer = b""
        self.status_line = None
        self.inbox = defer.DeferredQueue()
        self.close_frame = None  # (code, reason) the server sent
        self.pongs = 0
        self.answer_close = True
        self.received = b""  # everything, for connections that never upgrade
        self.answered = defer.Deferred()  # fires with the HTTP status line
        self.lost = defer.Deferred()  # fires with close_frame when the TCP connection is gone

    def connectionMade(self):
        if self.request is None:
            lines = [f"GET {self.path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
                     "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                     "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
                     *(f"{name}: {value}" for name, value in self.headers.items())]
            self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data
        self.buffer += data
        if self.status_line is None:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.status_line, self.buffer = head.split(b"\r\n")[0].decode("latin-1"), rest
            self.answered.callback(self.status_line)
        while self._frame():
            pass

    def _frame(self):
        """Take one server frame off the buffer; False when it is incomplete."""
        if len(self.buffer) < 2:
            return False
        size, start = self.buffer[1] & 0x7F, 2
        if size >= 126:
            start += 2 if size == 126 else 8
            if len(self.buffer) < start:
                return False
            size = int.from_bytes(self.buffer[2:start], "big")
        if len(self.buffer) < start + size:
            return False
        opcode, payload = self.buffer[0] & 0x0F, self.buffer[start:start + size]
        self.buffer = self.buffer[start + size:]
        if opcode == 1:
            self.inbox.put(json.loads(payload))
        elif opcode == 8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.close_frame = (code, payload[2:].decode("utf-8"))
            if self.answer_close:  # as browsers do
                self.transport.write(frame(8, payload[:2]))
        elif opcode == 10:
            self.pongs += 1
        return True

    def connectionLost(self, reason):
        self.lost.callback(self.close_frame)

    def send(self, *messages):
        """Write JSON messages as text frames, in one write."""
        self.transport.write(text_frames(*messages))

    async def next(self, timeout=10.0):
        """The next text message."""
        return await self.inbox.get().addTimeout(timeout, reactor)

    async def closed(self, timeout=10.0):
        """The close frame the server sent before the connection went (None: it sent none)."""
        return await self.lost.addTimeout(timeout, reactor)


async def raw_socket(port, path=PATH, headers=None, request=None, upgraded=True):
    """A connected RawSocket; unless told otherwise, upgraded and past ``connected``."""
    factory = protocol.Factory.forProtocol(lambda: RawSocket(path, headers, request))
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    if upgraded:
        assert await client.answered.addTimeout(10, reactor) == "HTTP/1.1 101 Switching Protocols"
        assert (await client.next())["type"] == "connected"
    return client


async def revoked(daemon, key):
    """Revoke a key in the daemon's Redis."""
    store = TokenStore(daemon.service.redis.call)
    for token in await store.find(key):
        await store.revoke(token)
    return key


async def bad_key(s, kind):
    """A key that must be refused for project p1, and the Origin to present it from."""
    if kind == "unknown":
        return "bk_" + "0" * 43, None
    if kind == "revoked":
        return await revoked(s.daemon, await s.daemon.token("p1")), None
    if kind == "expired":
        return await s.daemon.token("p1", expires_at=time.time() - 1), None
    if kind == "read_scope":
        return await s.daemon.token("p1", scope="read"), None
    if kind == "other_project":
        return await s.daemon.token("p2"), None
    if kind in ORIGINS:
        domains, origin = ORIGINS[kind]
        return await s.daemon.token("p1", domains=domains), origin
    raise AssertionError(kind)


# Domain-bound keys and the Origin they are presented from.  A null origin passes
# the handshake (a key without domains works from it) but matches no domain.
ORIGINS = {
    "other_origin": (("shop.example.com",), "https://evil.example"),
    "null_origin": (("shop.example.com",), "null"),
    "null_origin_wildcard": (("*.example.com",), "null"),
    "file_origin": (("shop.example.com",), "file://"),
    "file_origin_naming_the_domain": (("shop.example.com",), "file://shop.example.com"),
}


# The key is refused: an unauthorized error with this message, then close 1008.
# name: (what is wrong with the key, how it is presented, message)
REFUSED_KEYS = {
    "unknown_key": ("unknown", "auth", "invalid API key"),
    "unknown_key_on_a_pageview": ("unknown", "pageview", "invalid API key"),
    "revoked_key": ("revoked", "auth", "API key revoked"),
    "expired_key": ("expired", "auth", "API key expired"),
    "read_key_on_the_sdk_endpoint": ("read_scope", "auth", "API key is not valid for ingest"),
    "key_of_another_project": ("other_project", "pageview", "API key is not valid for this project"),
    "key_from_another_origin": ("other_origin", "auth", "origin not allowed for this API key"),
    "key_from_a_sandboxed_iframe": ("null_origin", "auth", "origin not allowed for this API key"),
    "wildcard_key_from_a_sandboxed_iframe": ("null_origin_wildcard", "pageview", "origin not allowed for this API key"),
    "key_from_a_file_page": ("file_origin", "auth", "origin not allowed for this API key"),
    "key_from_a_file_page_naming_its_domain": ("file_origin_naming_the_domain", "auth",
                                               "origin not allowed for this API key"),
}


@pytest.mark.parametrize("later", [False, True], ids=["first_key", "after_a_good_key"])
@pytest.mark.parametrize("case", list(REFUSED_KEYS))
@pytest_twisted.ensureDeferred
async def test_refused_key(case, later, redis_server, redis_url, clickhouse_url):
    """A bad key gets ``unauthorized`` with its reason and the socket closes 1008; nothing is stored.
    Sent after a good key on an open socket it is checked alike and refuses the socket alike."""
    kind, how, reason = REFUSED_KEYS[case]
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        key, origin = await bad_key(s, kind)
        bad = await connect(s.port, path=f"/?projectId=p1&sessionId={BAD_SESSION}", headers=BAD_ADDRESS,
                            origin=origin)
        assert (await bad.next())["type"] == "connected"
        if later:
            bad.send({"type": "auth", "apiKey": s.key})
            assert await bad.next() == {"type": "auth_success"}
            bad.send(pageview(s.key, url=AFTER_URL))
            s.pageviews.append((BAD_SESSION, await acked(bad), AFTER_URL))
        bad.send({"type": "auth", "apiKey": key} if how == "auth" else pageview(key))
        bad.send(pageview(s.key if later else key))  # waits for the verdict, then is dropped with it
        assert await bad.next() == {"type": "error", "code": "unauthorized", "message": reason}
        assert await bad.wait_closed() == (1008, "Unauthorized")
        assert bad.inbox.pending == []


REVOKED = {"type": "error", "code": "unauthorized", "message": "API key revoked"}


@pytest_twisted.ensureDeferred
async def test_key_replayed_after_revocation(redis_server, redis_url, clickhouse_url):
    """Revoking a key closes the socket it opened, at once ("API key revoked", 1008), and refuses it on new
    sockets at once too, though token_cache_ttl (5 s, the default) would have kept its good verdict."""
    async with scenario(redis_server, redis_url, clickhouse_url, token_cache_ttl="5") as s:
        key = await s.daemon.token("p1")
        first = await s.bad(key)
        first.send(pageview(key, url=AFTER_URL))
        s.pageviews.append((BAD_SESSION, await acked(first), AFTER_URL))
        started = time.monotonic()
        await revoked(s.daemon, key)
        assert await first.next() == REVOKED
        assert await first.wait_closed() == (1008, "Unauthorized")
        assert time.monotonic() - started < 0.5
        replay = await s.bad(session="1732608000000-replay", headers={"X-Forwarded-For": "203.0.113.67"})
        replay.send({"type": "auth", "apiKey": key})
        assert await replay.next() == REVOKED
        assert await replay.wait_closed() == (1008, "Unauthorized")


@pytest_twisted.ensureDeferred
async def test_auth_repeated_on_an_open_socket(redis_server, redis_url, clickhouse_url):
    """The same key again is answered ``auth_success`` without a lookup; a second good ingest key of the
    project is looked up once and answered ``auth_success``, what follows it waiting in order; the socket
    then closes when either key is revoked."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        first, second = await s.daemon.token("p1"), await s.daemon.token("p1")
        bad = await s.bad(first)
        store = s.daemon.service.ingest.verifier.store
        reads, read = [], store.get
        store.get = lambda digest: reads.append(digest) or read(digest)
        for _ in range(3):
            bad.send({"type": "auth", "apiKey": first})
            assert await bad.next() == {"type": "auth_success"}
        bad.send(pageview(first, url=AFTER_URL))
        s.pageviews.append((BAD_SESSION, await acked(bad), AFTER_URL))
        assert reads == []
        urls = [f"{AFTER_URL}/{n}" for n in range(3)]
        bad.send({"type": "auth", "apiKey": second})
        bad.send(pageview(None, url=urls[0]))
        bad.send(pageview(second, url=urls[1]))
        bad.send(pageview(first, url=urls[2]))
        assert await bad.next() == {"type": "auth_success"}
        for url in urls:
            s.pageviews.append((BAD_SESSION, await acked(bad), url))
        assert reads == [key_digest(second)]
        await revoked(s.daemon, second)
        assert await bad.next() == REVOKED
        assert await bad.wait_closed() == (1008, "Unauthorized")


@pytest_twisted.ensureDeferred
async def test_key_expiring_on_an_open_socket(redis_server, redis_url, clickhouse_url):
    """A key that expires while its socket is open closes it at the expiry: "API key expired", 1008."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        expires_at = time.time() + 1.5
        key = await s.daemon.token("p1", expires_at=expires_at)
        bad = await s.bad(key)
        bad.send(pageview(key, url=AFTER_URL))
        s.pageviews.append((BAD_SESSION, await acked(bad), AFTER_URL))
        assert await bad.next() == {"type": "error", "code": "unauthorized", "message": "API key expired"}
        late = time.time() - expires_at
        assert await bad.wait_closed() == (1008, "Unauthorized")
        assert -0.01 < late < 0.5, late


def close_frame(code, reason=b""):
    """A close frame with a status code (and raw reason bytes)."""
    return frame(8, struct.pack("!H", code) + reason)


# The server closes with this code, its reason containing the text.
# name: (frames to send, close code, words of the reason)
FRAMES = {
    "binary_frame": ([frame(2, b'{"type":"auth","apiKey":"k"}')], 1003, "Binary frames are not accepted"),
    "invalid_utf8": ([frame(1, b'{"type":"auth","apiKey":"\xff\xfe"}')], 1007, "invalid UTF-8"),
    "utf8_cut_at_the_last_fragment": ([frame(1, b'{"type":"auth","apiKey":"\xc3', fin=False), frame(0, b"")],
                                      1007, "ended within Unicode code point"),
    "fragments_over_the_limit_in_sum": ([frame(1, b"a" * 8000, fin=False), frame(0, b"a" * 8000, fin=False),
                                         frame(0, b"a" * 8000)], 1009, "exceeds payload limit of 16384"),
    "length_field_of_2_62_bytes": ([frame(1, b"", length=2 ** 62)], 1009, "exceeds payload limit of 16384"),
    "unmasked_frame": ([frame(1, b'{"type":"auth","apiKey":"k"}', mask=False)], 1002, "unmasked"),
    "reserved_bits": ([frame(1, b"{}", rsv=4)], 1002, "RSV = 4"),
    "reserved_data_opcode": ([frame(3, b"{}")], 1002, "reserved opcode 3"),
    "reserved_control_opcode": ([frame(11)], 1002, "reserved opcode 11"),
    "continuation_without_a_start": ([frame(0, b"{}")], 1002, "continuation data frame outside"),
    "new_message_inside_a_fragmented_one": ([frame(1, b"{", fin=False), frame(1, b"}")], 1002,
                                            "non-continuation data frame while inside"),
    "fragmented_ping": ([frame(9, b"x", fin=False)], 1002, "fragmented control frame"),
    "ping_over_125_bytes": ([frame(9, b"x" * 126)], 1002, "payload length > 125"),
    "non_minimal_length": ([b"\x81\xfe\x00\x02" + b"\0\0\0\0" + b"{}"], 1002, "minimal length encoding"),
}


@pytest.mark.parametrize("case", list(FRAMES))
@pytest_twisted.ensureDeferred
async def test_bad_frame_closes_with_its_code(case, redis_server, redis_url, clickhouse_url):
    """Broken or forbidden frames close the socket with their RFC 6455 code; nothing is stored."""
    frames, code, words = FRAMES[case]
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        bad.send({"type": "auth", "apiKey": s.key})
        assert await bad.next() == {"type": "auth_success"}
        bad.transport.write(b"".join(frames) + text_frames(pageview(s.key, url=AFTER_URL)))
        closed_with, reason = await bad.closed()
        assert closed_with == code and words in reason, (closed_with, reason)
        assert bad.inbox.pending == []


# Close frames the RFC forbids: Autobahn fails the connection (it writes a 1002 or 1007
# close frame) and, as it has just read the peer's close, aborts the TCP connection at
# once, which discards that frame: the client sees the connection drop without one.
BAD_CLOSES = {
    "reserved_close_codes": [close_frame(code) for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)],
    "close_body_of_one_byte": [frame(8, b"\x03")],
    "close_reason_not_utf8": [close_frame(1000, b"\xff\xfe")],
}


@pytest.mark.parametrize("case", list(BAD_CLOSES))
@pytest_twisted.ensureDeferred
async def test_forbidden_close_frame_drops_the_connection(case, redis_server, redis_url, clickhouse_url):
    """Each forbidden close frame drops its connection at once, without a close frame, and frees its place."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        for forbidden in BAD_CLOSES[case]:
            bad = await raw_socket(s.port)
            started = time.monotonic()
            bad.transport.write(forbidden)
            assert await bad.closed() is None
            assert time.monotonic() - started < 1


@pytest_twisted.ensureDeferred
async def test_application_close_code_is_answered_1000(redis_server, redis_url, clickhouse_url):
    """A client closing with a private code (4000) and a long reason is answered with a plain 1000."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        bad.transport.write(close_frame(4000, "é".encode() * 61))
        assert await bad.closed() == (1000, "")


IGNORED_URL = "https://example.com/after-the-close-frame"


def ended_session(clickhouse_url):
    """Whether the bad socket's session is stored as ended, on disconnect."""
    return clickhouse_rows(clickhouse_url, "SELECT ended_at IS NOT NULL, end_reason FROM tracked_session FINAL "
                                           f"WHERE session_id = '{BAD_SESSION}'") == [(1, "disconnect")]


def undelivered_acks(s):
    """How many acks the daemon could not send (their socket was gone), pageviews and events."""
    sample = s.daemon.service.metrics.registry.get_sample_value
    return sum(sample("bklit_acks_undelivered_total", {"type": kind}) or 0 for kind in ("pageview", "event"))


# What the client writes, in one TCP write, to end its connection right behind its messages.
ENDINGS = {
    "close frame": close_frame(1000),
    "close frame, then a pageview": close_frame(1000) + text_frames(pageview(None, url=IGNORED_URL)),
    "dropped connection": b"",  # then a TCP close without a close frame, as a killed tab's
}


def pageview_after(key):
    """The pageview the case expects stored."""
    return [pageview(key, url=AFTER_URL)]


def auth_then_pageview(key):
    """``auth`` and the pageview, for a socket not authenticated yet (its key check goes to Redis)."""
    return [{"type": "auth", "apiKey": key}, pageview(key, url=AFTER_URL)]


# The connection ends right behind messages sent in the same write: each message is stored once,
# acked while the socket can still carry the ack (a close frame waits for it), frames after the
# close frame are not handled, and the socket's session ends.
# name: (authenticated before, messages built from the key, the ending,
#        what comes before the close frame; None: the connection dropped, nothing can come)
ENDED_RIGHT_BEHIND = {
    "pageview_then_close_frame": (True, pageview_after, "close frame", ["ack"]),
    "auth_pageview_then_close_frame": (False, auth_then_pageview, "close frame", ["auth_success", "ack"]),
    "pageview_key_checked_then_close_frame": (False, pageview_after, "close frame", ["ack"]),
    "frames_after_the_close_frame": (True, pageview_after, "close frame, then a pageview", ["ack"]),
    "pageview_then_dropped_connection": (True, pageview_after, "dropped connection", None),
    "auth_pageview_then_dropped_connection": (False, auth_then_pageview, "dropped connection", None),
}


@pytest.mark.parametrize("case", list(ENDED_RIGHT_BEHIND))
@pytest_twisted.ensureDeferred
async def test_messages_right_before_the_end_are_not_lost(case, redis_server, redis_url, clickhouse_url):
    """Closing or dropping a socket right behind a pageview still stores it, acks it when it can, ends the session."""
    authenticate, build, ending, answers = ENDED_RIGHT_BEHIND[case]
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        if authenticate:
            bad.send({"type": "auth", "apiKey": s.key})
            assert await bad.next() == {"type": "auth_success"}
        bad.transport.write(text_frames(*build(s.key)) + ENDINGS[ending])
        if answers is None:
            bad.transport.loseConnection()
            assert await bad.closed() is None
            s.pageviews.append((BAD_SESSION, None, AFTER_URL))  # stored, though its ack had nowhere to go
            await eventually(lambda: undelivered_acks(s) == 1)
        else:
            received = [await bad.next() for _ in answers]
            assert [message["type"] for message in received] == answers
            assert await bad.closed() == (1000, "")
            s.pageviews.append((BAD_SESSION, received[-1]["eventId"], AFTER_URL))
            assert undelivered_acks(s) == 0
        assert bad.inbox.pending == []
        await eventually(lambda: redis_server.execute("ZSCORE", "live:sessions:p1", BAD_SESSION) is None
                         and ended_session(clickhouse_url))
    assert redis_server.execute("ZCARD", "live:sessions:p1") == 0  # nor the good client's, once it closed


@pytest_twisted.ensureDeferred
async def test_close_frame_waits_a_bounded_time_for_acks(redis_server, redis_url, clickhouse_url):
    """While Redis holds a pageview's ack back, the client's close frame is answered after CLOSE_WAIT, not later."""
    from bklit.sdk import CLOSE_WAIT

    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        key = await daemon.token("p1")
        bad = await raw_socket(daemon.port)
        bad.send({"type": "auth", "apiKey": key})
        assert await bad.next() == {"type": "auth_success"}
        redis_server.execute("CLIENT", "PAUSE", "3000", "WRITE")  # batches wait; the reply comes in 3 s
        try:
            started = time.monotonic()
            bad.transport.write(text_frames(pageview(key, url=AFTER_URL)) + close_frame(1000))
            assert await bad.closed() == (1000, "")
            assert CLOSE_WAIT - 0.1 < time.monotonic() - started < CLOSE_WAIT + 1
            assert bad.inbox.pending == []
        finally:
            redis_server.execute("CLIENT", "UNPAUSE")
        sample = daemon.service.metrics.registry.get_sample_value
        await eventually(lambda: sample("bklit_acks_undelivered_total", {"type": "pageview"}) == 1)
        await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT url FROM page_view_event") == [(AFTER_URL,)])
        await eventually(lambda: redis_server.execute("ZCARD", "live:sessions:p1") == 0)


@pytest_twisted.ensureDeferred
async def test_ping_flood_is_rate_limited(redis_server, redis_url, clickhouse_url):
    """Pings spend message tokens: a burst of 50 is answered, the next 10 get rate_limited, then 1008."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        bad.transport.write(frame(9, b"ping") * 20_000)
        assert await bad.closed() == (1008, "Too many errors")
        assert bad.pongs == 50
        assert bad.inbox.pending == [
            {"type": "error", "code": "rate_limited", "message": "More than 20 messages a second; dropped"}] * 10


@pytest_twisted.ensureDeferred
async def test_pong_flood_closes_the_socket(redis_server, redis_url, clickhouse_url):
    """Unasked-for pongs cost frames like anything else: a flood of them closes the socket 1008 at its
    frame budget (100 before authentication), and the rest is not parsed."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        bad.transport.write(frame(10, b"pong") * 20_000)
        assert await bad.closed() == (1008, "Too many frames")
        assert bad.inbox.pending == []
        samples = s.daemon.service.metrics.registry.get_sample_value
        assert samples("bklit_frame_budget_closes_total", {"endpoint": "sdk"}) == 1


@pytest_twisted.ensureDeferred
async def test_pongs_within_the_budget_are_ignored(redis_server, redis_url, clickhouse_url):
    """A few unasked-for pongs are ignored and the socket is served."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        bad.transport.write(frame(10, b"pong") * 50)
        bad.send({"type": "auth", "apiKey": s.key}, pageview(s.key, url=AFTER_URL))
        assert await bad.next() == {"type": "auth_success"}
        ack = await bad.next()
        assert ack["type"] == "ack"
        s.pageviews.append((BAD_SESSION, ack["eventId"], AFTER_URL))
        bad.transport.write(close_frame(1000))
        assert await bad.closed() == (1000, "")


@pytest_twisted.ensureDeferred
async def test_endless_empty_fragments_close_at_the_fragment_limit(redis_server, redis_url, clickhouse_url):
    """A message that never ends (empty continuation frames) is closed 1008 at max_fragments."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port)
        bad.transport.write(frame(1, b"{", fin=False) + frame(0, b"", fin=False) * 70)
        assert await bad.closed() == (1008, "Too many fragments in one message")


@pytest_twisted.ensureDeferred
async def test_frame_floods_from_many_sockets_leave_the_good_client_served(redis_server, redis_url, clickhouse_url):
    """Eight sockets flooding pongs and eight flooding empty continuation frames, without a key and with
    the public key: each is closed 1008 and the good client's acks keep coming (bench/flood.py prints the
    latencies)."""
    async with scenario(redis_server, redis_url, clickhouse_url, max_connections_per_ip="64") as s:
        floods = []
        for n in range(16):
            bad = await raw_socket(s.port, headers={"X-Forwarded-For": f"203.0.113.{100 + n}"})
            if n % 4 == 3:  # authenticated: the larger budget, still finite
                bad.send({"type": "auth", "apiKey": s.key})
                assert await bad.next() == {"type": "auth_success"}
            floods.append(bad)
        for round_ in range(20):
            for n, bad in enumerate(floods):
                if not bad.lost.called:
                    start = frame(1, b"{", fin=False) if round_ == 0 and n >= 8 else b""
                    bad.transport.write(start + (frame(10) if n < 8 else frame(0, b"", fin=False)) * 2000)
            await s.good.more_acks(1)
        for n, bad in enumerate(floods):
            expected = "Too many frames" if n < 8 else "Too many fragments in one message"
            assert await bad.closed() == (1008, expected)
@pytest_twisted.ensureDeferred
async def test_flood_of_garbage_sockets(redis_server, redis_url, clickhouse_url):
    """Two hundred sockets from as many addresses, ten bad frames each: every one closed 1008 after ten errors."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        addresses = [f"203.0.113.{n + 1}" if n % 2 else f"2001:db8:{n:x}::1" for n in range(200)]
        sockets = await defer.gatherResults([defer.ensureDeferred(raw_socket(
            s.port, headers={"X-Forwarded-For": address})) for address in addresses])
        for bad in sockets:
            bad.transport.write(text_frames(*["[1]"] * 10))
        closes = await defer.gatherResults([bad.lost for bad in sockets])
        assert closes == [(1008, "Too many errors")] * 200
        assert all(len(bad.inbox.pending) == 10 for bad in sockets)


async def fill_per_address(s):
    """Hold three sockets from the bad address."""
    return [await raw_socket(s.port) for _ in range(3)]


async def fill_server(s):
    """Hold two sockets from two other addresses (the good client holds the third place)."""
    return [await raw_socket(s.port, headers={"X-Forwarded-For": f"203.0.113.{n}"}) for n in (1, 2)]


async def fail_keys(s):
    """Have three guessed keys refused from the bad address."""
    for _ in range(3):
        bad = await raw_socket(s.port)
        bad.send({"type": "auth", "apiKey": "bk_guess"})
        assert (await bad.next())["code"] == "unauthorized"
        assert await bad.closed() == (1008, "Unauthorized")
    return []


# Upgrades refused before any WebSocket exists: the exact HTTP status line.
# name: (config, what the bad address does first (returns the sockets it holds), status line)
REFUSED_UPGRADES = {
    "connections_from_one_address": ({"max_connections_per_ip": "3"}, fill_per_address,
                                     "HTTP/1.1 429 Too many connections from this address"),
    "connections_in_all": ({"max_connections": "3"}, fill_server, "HTTP/1.1 503 Server at its connection limit"),
    "guessing_keys": ({"auth_failures_max": "3"}, fail_keys,
                      "HTTP/1.1 429 Too many failed authentications; try again later"),
}


@pytest.mark.parametrize("case", list(REFUSED_UPGRADES))
@pytest_twisted.ensureDeferred
async def test_refused_upgrade(case, redis_server, redis_url, clickhouse_url):
    """Past the connection limits, or locked out, an address's upgrades get 429 or 503; the good client's do not."""
    config, before, status = REFUSED_UPGRADES[case]
    async with scenario(redis_server, redis_url, clickhouse_url, **config) as s:
        held = await before(s)
        refused = await raw_socket(s.port, upgraded=False)
        assert await refused.answered == status
        await refused.closed()
        for bad in held:
            bad.transport.write(close_frame(1000))
            await bad.closed()


HANDSHAKE = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Version: 13\r\n")

# Connections that never become WebSockets. name: (bytes sent, what comes back before the close)
NOT_UPGRADED = {
    "silent_connection": (b"", b""),
    "slow_handshake": (HANDSHAKE.encode(), b""),
    "upgrade_without_a_key": ((HANDSHAKE + "\r\n").encode(),
                              b"HTTP/1.1 400 HTTP Sec-WebSocket-Key header missing\r\n\r\n"),
    "six_hundred_headers": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % n for n in range(600)) + b"\r\n",
                            b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                            b"Content-Length: 0\r\n\r\n"),
    "tls_on_the_plain_port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), b""),
}


@pytest.mark.parametrize("case", list(NOT_UPGRADED))
@pytest_twisted.ensureDeferred
async def test_connection_that_never_upgrades(case, redis_server, redis_url, clickhouse_url):
    """Silent, slow or malformed handshakes get their answer (or none) and are gone within handshake_timeout."""
    sent, answer = NOT_UPGRADED[case]
    async with scenario(redis_server, redis_url, clickhouse_url, handshake_timeout="0.5") as s:
        started = time.monotonic()
        bad = await raw_socket(s.port, request=sent, upgraded=False)
        await bad.closed()
        assert bad.received == answer
        assert time.monotonic() - started < 1.5


def stored_ip(clickhouse_url, event_id):
    """The stored (anonymised) address of a pageview."""
    return clickhouse_rows(clickhouse_url, f"SELECT ip FROM page_view_event WHERE id = '{event_id}'")[0][0]


# Forwarding headers. name: (trusted proxies, headers, stored address)
SPOOFED = {
    "forwarded_for_from_an_untrusted_peer": ("", {"X-Forwarded-For": "203.0.113.9"}, "127.0.0.0"),
    "real_ip_from_an_untrusted_peer": ("", {"X-Real-IP": "203.0.113.9"}, "127.0.0.0"),
    "fake_hop_before_the_proxy's": ("127.0.0.1", {"X-Forwarded-For": "192.0.2.200, 203.0.113.9"}, "203.0.113.0"),
    "real_ip_from_a_proxy_that_sets_forwarded_for": ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, "127.0.0.0"),
    "garbage_last_hop": ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9, <script>", "X-Real-IP": "nope"},
                         "127.0.0.0"),
}


@pytest.mark.parametrize("case", list(SPOOFED))
@pytest_twisted.ensureDeferred
async def test_spoofed_forwarding_headers(case, redis_server, redis_url, clickhouse_url):
    """Forwarding headers are believed only from trusted proxies, and only the hop the proxy added."""
    proxies, headers, address = SPOOFED[case]
    async with scenario(redis_server, redis_url, clickhouse_url, trusted_proxies=proxies) as s:
        bad = await raw_socket(s.port, headers=headers)
        bad.send({"type": "auth", "apiKey": s.key}, pageview(s.key, url=AFTER_URL))
        assert await bad.next() == {"type": "auth_success"}
        event_id = (await bad.next())["eventId"]
        s.pageviews.append((BAD_SESSION, event_id, AFTER_URL))
        bad.transport.write(close_frame(1000))
        await bad.closed()
        assert await eventually(lambda: stored_ip(clickhouse_url, event_id)) == address


@pytest_twisted.ensureDeferred
async def test_crawler_user_agent_is_acked_not_stored(redis_server, redis_url, clickhouse_url):
    """A socket whose upgrade names a crawler gets its acks (bot_policy drop), and nothing is stored."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        bad = await raw_socket(s.port, headers={
            **BAD_ADDRESS, "User-Agent": "Googlebot/2.1 (+http://www.google.com/bot.html)"})
        bad.send({"type": "auth", "apiKey": s.key}, pageview(s.key, url=AFTER_URL))
        assert await bad.next() == {"type": "auth_success"}
        assert (await bad.next())["type"] == "ack"
        bad.transport.write(close_frame(1000))
        await bad.closed()


@pytest_twisted.ensureDeferred
async def test_misbehaving_clients_leave_no_address_in_the_log(redis_server, redis_url, clickhouse_url):
    """Closes for errors, protocol violations, frame floods and unanswered closing handshakes log no client
    address, on SDK and dashboard sockets alike."""
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        async with scenario(redis_server, redis_url, clickhouse_url) as s:
            clients = []
            abuses = (text_frames(*["{"] * 10), frame(1, b"{}", mask=False), frame(1, b"\xff"),
                      frame(10) * 500)
            for path in (PATH, "/dashboard?projectId=p1"):
                for abuse in abuses:
                    bad = await raw_socket(s.port, path=path)
                    bad.answer_close = False  # the server's closing handshake times out
                    bad.transport.write(abuse)
                    clients.append((bad, f"127.0.0.1:{bad.transport.getHost().port}"))
            for bad, _ in clients:
                assert (await bad.closed())[0] in (1008, 1002, 1007)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert lines
    for _, address in clients:
        assert [line for line in lines if address in line] == []


@pytest_twisted.ensureDeferred
async def test_session_ids_that_once_shared_keys_disturb_nobody(redis_server, redis_url, clickhouse_url):
    """Sessions ``S`` and ``S:sockets`` (one Redis key in layout 1) are two sessions: each pageview acked and
    stored, the good client's too."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        sockets = []
        for session in (BAD_SESSION, BAD_SESSION + ":sockets", BAD_SESSION + ":sockets:sockets"):
            bad = await s.bad(s.key, session=session)
            for n in range(3):
                url = f"{AFTER_URL}/{n}"
                bad.send(sdk_pageview("p1", session, key=s.key, url=url))
                s.pageviews.append((session, await acked(bad), url))
            sockets.append(bad)
        await close(*sockets)
        for session in (BAD_SESSION, BAD_SESSION + ":sockets"):
            assert redis_server.execute("HGET", keys.session_state("p1", session), "pageviews") == b"3"


@pytest_twisted.ensureDeferred
async def test_an_event_redis_refuses_is_answered_not_stored_alone(redis_server, redis_url, clickhouse_url):
    """A session key of the wrong type left in Redis: that socket's pageview gets ``not_stored`` (not
    ``overloaded``), the socket stays open, its neighbours are stored; once the key is gone it works."""
    async with scenario(redis_server, redis_url, clickhouse_url) as s:
        redis_server.execute("SET", keys.session_state("p1", BAD_SESSION), "left by hand")
        bad = await s.bad(s.key)
        for _ in range(12):  # more than max_errors: not the client's fault, not counted
            bad.send(pageview(s.key, url=AFTER_URL))
            assert await bad.next() == {"type": "error", "code": "not_stored",
                                        "message": "The server could not store this event; not acked"}
        redis_server.execute("DEL", keys.session_state("p1", BAD_SESSION))
        bad.send(pageview(s.key, url=AFTER_URL))
        s.pageviews.append((BAD_SESSION, await acked(bad), AFTER_URL))
        await close(bad)
        samples = s.daemon.service.metrics.registry.get_sample_value
        assert samples("bklit_redis_operations_refused_total", {"kind": "pageview"}) == 12
        assert samples("bklit_messages_total", {"type": "pageview", "outcome": "not_stored"}) == 12


@pytest_twisted.ensureDeferred
async def test_a_project_over_its_budgets_is_refused_project_limit(redis_server, redis_url, clickhouse_url):
    """Past max_new_sessions_per_minute new session ids (the same tab again is free), and past
    max_sockets_per_project open sockets, a socket gets ``project_limit`` and 1008; the good client goes on."""
    async with scenario(redis_server, redis_url, clickhouse_url, max_new_sessions_per_minute="2",
                        max_sockets_per_project="4") as s:
        first = await s.bad(s.key)  # the good client's session counts too: 2 of 2
        again = await s.bad(s.key)  # the same session id: free
        bad = await s.bad(session="1732608000000-third", headers={"X-Forwarded-For": "203.0.113.67"})
        bad.send({"type": "auth", "apiKey": s.key})
        assert await bad.next() == {"type": "error", "code": "project_limit",
                                    "message": "This project starts too many sessions a minute on this server"}
        assert await bad.wait_closed() == (1008, "Project limit")
        fourth = await s.bad(s.key)  # 4 sockets now: the good one, first, again, fourth
        full = await s.bad()
        full.send({"type": "auth", "apiKey": s.key})
        assert await full.next() == {"type": "error", "code": "project_limit",
                                     "message": "This project has too many open sockets on this server"}
        assert await full.wait_closed() == (1008, "Project limit")
        await close(first, again, fourth)
        assert s.daemon.service.ingest.projects.sockets == {"p1": 1}
