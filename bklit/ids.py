"""Server-made event ids: unique, time-ordered, and the row id in ClickHouse.

An id is a UUID version 7 in its usual text form: 48 bits of Unix time in
milliseconds, then a 12-bit sequence that keeps ids made in the same
millisecond in order, then 62 random bits (from a generator seeded by the system's: ids need
to be unique, not unguessable).
"""

from __future__ import annotations

import os
import random
import time


class EventIds:
    """Makes ids that sort in the order this process made them."""

    def __init__(self, now_ms=lambda: time.time_ns() // 1_000_000):
        self.now_ms = now_ms
        self.last_ms = 0
        self.sequence = 0
        self._random = random.Random(os.urandom(32))  # for uniqueness, not secrecy

    def new(self) -> str:
        """The next id."""
        ms = self.now_ms()
        if ms <= self.last_ms:
            ms = self.last_ms
            self.sequence += 1
            if self.sequence > 0xFFF:
                ms += 1
                self.sequence = 0
        else:
            self.sequence = 0
        self.last_ms = ms
        rand = self._random.getrandbits(62)
        value = (ms << 80) | (0x7 << 76) | (self.sequence << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
