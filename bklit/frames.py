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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bklit.limits import TokenBucket

CLOSE_POLICY = 1008
CONTINUATION = 0
FIRST_CONTROL_OPCODE = 8


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
        self.data = b""
        self.current_frame = None
        self.over_frame_budget(reason)
        if self.state not in (self.STATE_CLOSING, self.STATE_CLOSED):
            self.sendCloseFrame(code=CLOSE_POLICY, reasonUtf8=reason.encode(), isReply=False)
        self.dropConnection(abort=False)

    def over_frame_budget(self, reason: str) -> None:
        """A socket went over its budget and is being closed (for metrics)."""

    def _dataReceived(self, data: bytes) -> None:
        if not self.over_budget:
            super()._dataReceived(data)  # type: ignore[misc]
