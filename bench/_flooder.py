"""The abusive clients behind bench/flood.py (run as its own process).

    python bench/_flooder.py PORT KEY SLOTS SECONDS [BEHAVIOURS]

Keeps SLOTS connections to 127.0.0.1:PORT busy doing what a hostile client
would, for SECONDS: every slot reconnects a moment after its connection
ended, and claims its own X-Forwarded-For address from the documentation
ranges (198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32), except the slots
of the ``crowd`` behaviour, which all share one.  Prints one JSON object:
per behaviour, how many upgrades were attempted and how each connection
ended (HTTP status, close code and reason, dropped without a close frame,
or still open at the end), and the flooder's own CPU share.
"""

from __future__ import annotations

import base64
import json
import os
import random
import resource
import struct
import sys
import time
from collections import Counter

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

PORT, KEY, SLOTS, SECONDS = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
CHOSEN = sys.argv[5] if len(sys.argv) > 5 else "all"  # comma-separated names of BEHAVIOURS
PAUSE = (0.2, 1.0)  # seconds between a slot's connections
SHARED_ADDRESS = "203.0.113.254"


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", size)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(message: object) -> bytes:
    return frame(1, message if isinstance(message, bytes) else json.dumps(message).encode())


PAGEVIEW = {"type": "pageview", "data": {"url": "https://example.com/flood", "projectId": "bench"}}
BEHAVIOURS = {
    # name: what the socket sends once upgraded (None: nothing at all)
    "idle": None,  # never authenticates: auth_timeout
    "garbage": lambda: text(b"not json") * 12,
    "bad_key": lambda: text({"type": "auth", "apiKey": "bk_" + os.urandom(24).hex()}),
    "message_flood": "after_auth",  # the public key, then 100 pageviews at once
    "oversize": lambda: text({"type": "auth", "apiKey": KEY, "pad": "x" * 100_000}),
    "ping_flood": lambda: frame(9, b"ping") * 1000,
    "binary": lambda: frame(2, b"\x00" * 64),
    "bad_utf8": lambda: frame(1, b'{"type":"auth","apiKey":"\xff"}'),
    "pong_flood": lambda: frame(10) * 20_000,  # unasked-for empty pongs, 6 bytes each
    "continuation_flood": lambda: frame(1, b"{", fin=False) + frame(0, fin=False) * 20_000,
    "dashboard_auth": "dashboard",  # a dashboard sending auth frames with guessed keys
    "head": "head",  # plain HTTP: HEAD /healthz, pipelined, on keep-alive connections
    "slow_handshake": "slow",  # a header line every 2 s, never finished
    "crowd": None,  # one address for all these slots: past 64 sockets, 429
}
outcomes: dict[str, Counter] = {}
attempts: Counter = Counter()
state = {"running": True}
open_sockets: set = set()


def address(slot: int) -> str:
    """The slot's own documentation address (the good client has 198.51.100.1)."""
    if slot < 253:
        return f"198.51.100.{slot + 2}"
    if slot < 506:
        return f"203.0.113.{slot - 252}"
    return f"2001:db8:0:{slot:x}::1"  # a /64 of its own


class Abuser(protocol.Protocol):
    """One connection of one slot."""

    def __init__(self, slot: int, behaviour: str):
        self.slot = slot
        self.behaviour = behaviour
        self.buffer = b""
        self.status: bytes | None = None
        self.close: tuple | None = None
        self.timer = None

    def connectionMade(self) -> None:
        open_sockets.add(self)
        forwarded = SHARED_ADDRESS if self.behaviour == "crowd" else address(self.slot)
        if BEHAVIOURS[self.behaviour] == "head":
            self.transport.write(b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 200)
            return
        path = "/dashboard?projectId=bench" if BEHAVIOURS[self.behaviour] == "dashboard" else \
            f"/?projectId=bench&sessionId=abuse-{self.slot}"
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                   f"X-Forwarded-For: {forwarded}\r\n")
        if BEHAVIOURS[self.behaviour] == "slow":
            self.transport.write(request.encode())
            self.timer = reactor.callLater(2, self.trickle)
        else:
            self.transport.write(request.encode() + b"\r\n")

    def trickle(self) -> None:
        self.transport.write(b"X-Slow: 1\r\n")
        self.timer = reactor.callLater(2, self.trickle)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if BEHAVIOURS[self.behaviour] == "head":  # responses without bodies: count, and ask again
            answers = self.buffer.count(b"HTTP/1.1 ")
            if answers:
                self.status = self.status or self.buffer.split(b" ", 2)[1]
                self.buffer = b""
                self.transport.write(b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * answers)
            return
        if self.status is None:
            head, found, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if not found:
                self.buffer = head
                return
            self.status = head.split(b" ", 2)[1]
            if self.status == b"101":
                action = BEHAVIOURS[self.behaviour]
                if callable(action):
                    self.transport.write(action())
                elif action == "after_auth":
                    self.transport.write(text({"type": "auth", "apiKey": KEY}))
                elif action == "dashboard":
                    self.transport.write(b"".join(text({"type": "auth", "apiKey": "bk_" + os.urandom(24).hex()})
                                                  for _ in range(200)))
        while len(self.buffer) >= 2:
            size, start = self.buffer[1] & 0x7F, 2
            if size >= 126:
                start += 2 if size == 126 else 8
                if len(self.buffer) < start:
                    return
                size = int.from_bytes(self.buffer[2:start], "big")
            if len(self.buffer) < start + size:
                return
            opcode, payload = self.buffer[0] & 0x0F, self.buffer[start:start + size]
            self.buffer = self.buffer[start + size:]
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.close = (code, payload[2:].decode("utf-8", "replace"))
                self.transport.write(frame(8, payload[:2]))
            elif opcode == 1 and b'"auth_success"' in payload and self.behaviour == "message_flood":
                self.transport.write(b"".join(text(PAGEVIEW) for _ in range(100)))

    def connectionLost(self, reason: object) -> None:
        open_sockets.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not state["running"]:  # aborted by finish()
            if self.close is None:
                outcome = "open at the end" if self.status else "handshaking at the end"
                outcomes.setdefault(self.behaviour, Counter())[outcome] += 1
            return
        if self.status is None:
            outcome = "dropped before any answer"
        elif self.status != b"101":
            outcome = f"HTTP {self.status.decode()}"
        elif self.close is None:
            outcome = "dropped without a close frame"
        else:
            outcome = f"closed {self.close[0]} {self.close[1][:40]}".rstrip()
        outcomes.setdefault(self.behaviour, Counter())[outcome] += 1
        if state["running"]:
            reactor.callLater(random.uniform(*PAUSE), start, self.slot, self.behaviour)


def start(slot: int, behaviour: str) -> None:
    """Open the slot's next connection."""
    if not state["running"]:
        return
    attempts[behaviour] += 1
    factory = protocol.Factory.forProtocol(lambda: Abuser(slot, behaviour))
    d = TCP4ClientEndpoint(reactor, "127.0.0.1", PORT, timeout=10).connect(factory)

    def failed(failure: object) -> None:
        outcomes.setdefault(behaviour, Counter())["connect failed"] += 1
        if state["running"]:
            reactor.callLater(random.uniform(*PAUSE), start, slot, behaviour)

    d.addErrback(failed)


def finish(cpu0: object, wall0: float) -> None:
    state["running"] = False
    for sock in list(open_sockets):
        sock.transport.abortConnection()
    cpu1, elapsed = os.times(), time.perf_counter() - wall0
    reactor.callLater(0.5, report, ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed, elapsed)


def report(cpu: float, elapsed: float) -> None:
    print(json.dumps({"elapsed": elapsed, "cpu": cpu, "attempts": dict(attempts),
                      "outcomes": {name: dict(found) for name, found in outcomes.items()}}))
    reactor.stop()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = list(BEHAVIOURS) if CHOSEN == "all" else CHOSEN.split(",")
    assert set(names) <= set(BEHAVIOURS), f"behaviours are {', '.join(BEHAVIOURS)}"
    for slot in range(SLOTS):
        reactor.callLater(slot * 0.001, start, slot, names[slot % len(names)])  # all within 2 s
    reactor.callLater(SECONDS, finish, os.times(), time.perf_counter())
    reactor.run()


if __name__ == "__main__":
    main()
