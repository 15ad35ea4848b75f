"""Every frame a client sends costs: the frame budget of a WebSocket.

Autobahn parses frames one by one on the reactor thread and keeps an entry
per fragment of a message until it ends, whatever the frame: a client that
floods six-byte pongs or empty continuation frames would otherwise keep the
reactor busy for everybody and grow the daemon's memory, without sending a
single message that a message limit would count.

``FrameBudget`` is mixed into the SDK and dashboard protocols.  Each frame
(text, binary, continuation, ping, pong, close) takes a token from the
socket's bucket as soon as its header is read; a message may have at most
``max_fragments`` frames.  Past either, the socket is closed with 1008 at
once: the rest of what it sent is thrown away unparsed, and nothing more is
read from it.  A socket starts with a small budget and gets its full one
when it authenticates (``widen_frame_budget``).

The mixin also takes the usual frames off Autobahn's general path, which
builds several objects per frame and formats debug lines nobody reads:
a whole masked text frame of one message, uncompressed, within the size
limits and valid UTF-8, is unmasked and handed to ``onMessage`` at once
(metered like any frame); an uncompressed message we send that fits one
frame is written with its two- or four-byte header.  Every other frame
(control, fragmented, compressed, partial, over a limit, invalid) goes the
general way, which then finds the buffer untouched, so errors and close
codes are Autobahn's own.  Data is written without Autobahn's per-write
debug line (its arguments were formatted whatever the log level).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bklit import compat
from bklit.limits import TokenBucket

CLOSE_POLICY = 1008
CONTINUATION = 0
FIRST_CONTROL_OPCODE = 8
FIN_TEXT = 0x81  # first header byte of a whole text frame, no extension bits
MASKED = 0x80
STATE_OPEN = 3  # WebSocketProtocol.STATE_OPEN


def unmask(payload: bytes, mask: bytes) -> bytes:
    """A client frame's payload XORed with its four-byte mask (RFC 6455, 5.3)."""
    n = len(payload)
    key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def text_frame(payload: bytes) -> bytes:
    """A server's unmasked, unfragmented text frame of ``payload`` (under 64 KiB)."""
    n = len(payload)
    if n < 126:
        return bytes((FIN_TEXT, n)) + payload
    return bytes((FIN_TEXT, 126, n >> 8, n & 0xFF)) + payload


@dataclass(frozen=True)
class FrameLimits:
    """The frame budgets of a socket, before and after it authenticates."""

    rate_before_auth: float
    burst_before_auth: int
    rate: float
    burst: int
    max_fragments: int

    @classmethod
    def from_config(cls, config: Any) -> "FrameLimits":
        return cls(config.frame_rate_before_auth, config.frame_burst_before_auth, config.frame_rate,
                   config.frame_burst, config.max_fragments)


class FrameBudget:
    """Mixin for an Autobahn server protocol: meters frames before Autobahn handles them.

    The protocol calls ``meter_frames`` in ``onConnect`` and may override
    ``over_frame_budget`` to count the closes.
    """

    frame_bucket: TokenBucket | None = None
    max_fragments = 64
    fragments = 0
    over_budget = False

    def meter_frames(self, limits: FrameLimits, clock: Any) -> None:
        """Start metering with the budget of a socket that has not authenticated."""
        self.frame_limits = limits
        self.frame_bucket = TokenBucket(limits.rate_before_auth, limits.burst_before_auth, clock)
        self.max_fragments = limits.max_fragments

    def widen_frame_budget(self) -> None:
        """The budget of an authenticated socket, its burst available at once."""
        bucket = self.frame_bucket
        if bucket is not None:
            bucket.rate, bucket.burst = self.frame_limits.rate, self.frame_limits.burst
            bucket.tokens = bucket.burst

    def onFrameBegin(self) -> None:
        opcode = self.current_frame.opcode
        if self.frame_bucket is not None and not self.frame_bucket.take():
            self._refuse_frames("Too many frames")
            return
        if opcode == CONTINUATION:
            self.fragments += 1
            if self.fragments > self.max_fragments:
                self._refuse_frames("Too many fragments in one message")
                return
        elif opcode < FIRST_CONTROL_OPCODE:
            self.fragments = 1
        super().onFrameBegin()  # type: ignore[misc]

    def _refuse_frames(self, reason: str) -> None:
        """Close 1008 now and drop what is buffered; nothing more is parsed."""
        self.over_budget = True
        compat.discard_input(self)
        self.current_frame = None
        self.over_frame_budget(reason)
        if self.state not in (self.STATE_CLOSING, self.STATE_CLOSED):
            self.sendCloseFrame(code=CLOSE_POLICY, reasonUtf8=reason.encode(), isReply=False)
        self.dropConnection(abort=False)

    def over_frame_budget(self, reason: str) -> None:
        """A socket went over its budget and is being closed (for metrics)."""

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)  # (Autobahn's adapter formats a debug line first, at any log level)

    def _dataReceived(self, data: bytes) -> None:
        if not self.over_budget:
            super()._dataReceived(data)  # type: ignore[misc]

    def processData(self) -> bool:
        """One frame from the buffer: a whole text frame at once, anything else Autobahn's way."""
        data = self.data
        if (len(data) < 6 or data[0] != FIN_TEXT or self.current_frame is not None or self.inside_message
                or self._perMessageCompress is not None or self.state != STATE_OPEN):
            return super().processData()  # type: ignore[misc]
        second = data[1]
        length = second & 0x7F
        if not second & MASKED or length == 127:
            return super().processData()  # type: ignore[misc]
        start = 6
        if length == 126:
            length = (data[2] << 8) | data[3] if len(data) >= 8 else 0
            start = 8
            if length < 126:  # not the shortest encoding (or the header is not all here)
                return super().processData()  # type: ignore[misc]
        end = start + length
        if (end > len(data) or 0 < self.maxFramePayloadSize < length
                or 0 < self.maxMessagePayloadSize < length):
            return super().processData()  # type: ignore[misc]
        payload = unmask(data[start:end], data[start - 4:start])
        if not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return super().processData()  # type: ignore[misc]
        if self.frame_bucket is not None and not self.frame_bucket.take():
            self._refuse_frames("Too many frames")
            return False
        self.fragments = 1
        self.data = data[end:]
        stats = self.trafficStats
        stats.incomingWebSocketFrames += 1
        stats.incomingWebSocketMessages += 1
        stats.incomingOctetsWebSocketLevel += length
        stats.incomingOctetsAppLevel += length
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        self.onMessage(payload, False)
        return len(self.data) > 0

    def sendMessage(self, payload: bytes, isBinary: bool = False, fragmentSize: int | None = None,
                    sync: bool = False, doNotCompress: bool = False) -> None:
        """Send a message; one that fits a frame, uncompressed, is written at once."""
        if (isBinary or fragmentSize is not None or sync or self.send_queue or self.state != STATE_OPEN
                or len(payload) > 0xFFFF or self._perMessageCompress is not None
                or 0 < self.autoFragmentSize < len(payload) or 0 < self.maxMessagePayloadSize < len(payload)):
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)  # type: ignore[misc]
            return
        frame = text_frame(payload)
        self.transport.write(frame)
        stats = self.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingWebSocketFrames += 1
        stats.outgoingOctetsAppLevel += len(payload)
        stats.outgoingOctetsWebSocketLevel += len(payload)
        stats.outgoingOctetsWireLevel += len(frame)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Write ``data`` (prepared broadcasts, close frames); Autobahn's way when queued or chopped."""
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        self.transport.write(data)
        if self.state == STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        else:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
