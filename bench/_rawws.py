"""A minimal WebSocket client for the load generators, cheaper per message than the servers.

It speaks just enough RFC 6455 for benchmarks: the upgrade request (the
``101`` is not checked beyond its status), unfragmented text frames out with
an all-zero masking key (so the payload goes out as it is, no XOR), and
unmasked frames in, answering pings.  What a message means is the
subclass's business (``on_text``).
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

KEY_HEADER = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
ZERO_MASK = b"\0\0\0\0"


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """A final client frame carrying ``payload`` (masked with key 0)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + ZERO_MASK + payload


class RawClient(Protocol):
    """Upgrades to WebSocket on its factory's ``path``, then hands each text message to ``on_text``."""

    host = "127.0.0.1"

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.buffer = b""
        self.upgraded = False
        self.transport.write(
            f"GET {self.factory.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".encode() + KEY_HEADER + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.on_refused(buf[:end].split(b"\r\n", 1)[0].decode("latin-1"))
                self.transport.loseConnection()
                return
            self.upgraded = True
            buf = buf[end + 4:]
            self.on_open()
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            start = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, start = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, start = int.from_bytes(buf[2:10], "big"), 10
            end = start + length
            if len(buf) < end:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[start:end], buf[end:]
            if opcode == 1:
                self.on_text(payload)
            elif opcode == 9:
                self.transport.write(frame(payload, 10))
            elif opcode == 8:
                self.transport.loseConnection()
        self.buffer = buf

    def send_text(self, payload: bytes) -> None:
        self.transport.write(frame(payload))

    def close(self) -> None:
        """Send a 1000 close frame and drop the connection."""
        self.transport.write(frame(b"\x03\xe8", 8))
        self.transport.loseConnection()

    def on_open(self) -> None:
        """The upgrade succeeded."""

    def on_refused(self, status: str) -> None:
        """The server answered the upgrade with something else than 101."""

    def on_text(self, payload: bytes) -> None:
        """One text message arrived."""
