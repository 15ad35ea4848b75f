"""Limits on what strangers can make the daemon do.

``TokenBucket`` meters one connection's messages.  ``Admission`` decides, at
the WebSocket upgrade, whether a client may have another socket: not past
``max_total`` sockets in all, not past ``max_per_client`` from one client,
and not while the client is locked out for failing authentication too often
(``max_auth_failures`` within ``failure_window`` seconds locks it out for
``lockout`` seconds).  A client is its IP address; IPv6 clients are grouped
by /64, the block one subscriber usually gets, so rotating addresses inside
it does not dodge the limits.  Addresses are kept only in memory and only
while needed.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Any


class Denied(Exception):
    """The upgrade is refused: ``status`` is the HTTP status, ``reason`` why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def client_key(ip: str) -> str:
    """What limits count by: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "clock", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, clock: Any):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.stamp = clock.seconds()

    def take(self) -> bool:
        """Spend a token if there is one."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Admission:
    """Counts sockets per client and in all; remembers failed authentications."""

    def __init__(self, clock: Any, *, max_total: int, max_per_client: int,
                 max_auth_failures: int, failure_window: float, lockout: float):
        self.clock = clock
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.max_auth_failures = max_auth_failures
        self.failure_window = failure_window
        self.lockout = lockout
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.failures: dict[str, deque] = {}
        self.locked: dict[str, float] = {}

    def admit(self, key: str) -> None:
        """Count a new socket from ``key``, or raise ``Denied``."""
        until = self.locked.get(key)
        if until is not None:
            if until > self.clock.seconds():
                raise Denied(429, "Too many failed authentications; try again later")
            del self.locked[key]
        if self.total >= self.max_total:
            raise Denied(503, "Server at its connection limit")
        if self.per_client.get(key, 0) >= self.max_per_client:
            raise Denied(429, "Too many connections from this address")
        self.total += 1
        self.per_client[key] = self.per_client.get(key, 0) + 1

    def release(self, key: str) -> None:
        """A socket counted by ``admit`` closed."""
        self.total -= 1
        left = self.per_client.get(key, 1) - 1
        if left > 0:
            self.per_client[key] = left
        else:
            self.per_client.pop(key, None)

    def auth_failed(self, key: str) -> bool:
        """Note a refused key; True when this locks the client out."""
        now = self.clock.seconds()
        recent = self.failures.setdefault(key, deque())
        recent.append(now)
        while recent and recent[0] <= now - self.failure_window:
            recent.popleft()
        if len(self.failures) > 100_000:
            self.forget_stale()
        if len(recent) >= self.max_auth_failures:
            del self.failures[key]
            self.locked[key] = now + self.lockout
            return True
        return False

    def forget_stale(self) -> None:
        """Drop failure records and lockouts that no longer matter."""
        now = self.clock.seconds()
        for key in [k for k, until in self.locked.items() if until <= now]:
            del self.locked[key]
        for key in [k for k, times in self.failures.items() if not times or times[-1] <= now - self.failure_window]:
            del self.failures[key]
