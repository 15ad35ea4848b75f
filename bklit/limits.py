"""Limits on what strangers can make the daemon do.

``TokenBucket`` meters one connection's messages.  ``Admission`` decides, at
the WebSocket upgrade, whether a client may have another socket: not past
``max_total`` sockets in all, not past ``max_per_client`` from one client,
not past ``max_per_network`` from one network, and not while the client is
locked out for failing authentication too often (``max_auth_failures``
within ``failure_window`` seconds locks it out for ``lockout`` seconds).  A
client is its IP address; IPv6 clients are grouped by /64, the block one
subscriber usually gets, so rotating addresses inside it does not dodge the
limits.  A network is an IPv4 /24 or an IPv6 /48 (and its /56 may hold a
quarter of that), so one provider's block cannot take every socket either.
Addresses are kept only in memory and only while needed: failure records
are two numbers a client, at most ``max_records`` of them, and ``purge``
(run on a timer) drops those that no longer matter.
"""

from __future__ import annotations

import ipaddress
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


def networks(client: str) -> tuple[tuple[str, int], ...]:
    """The wider networks of a client key, each with its share of a network's cap (in quarters).

    IPv4: its /24 (the whole cap).  IPv6 /64: its /56 (a quarter) and its /48 (the whole cap).
    """
    try:
        if client.endswith("/64"):
            net = ipaddress.ip_network(client)
            return ((str(net.supernet(new_prefix=56)), 1), (str(net.supernet(new_prefix=48)), 4))
        return ((str(ipaddress.ip_network(f"{client}/24", strict=False)), 4),)
    except ValueError:
        return ()


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


class ConnectRate:
    """Upgrades per client per minute, for endpoints whose every connect costs (a dashboard's snapshot).

    One token bucket per client, at most ``max_records`` of them; ``purge``
    drops the full ones (clients that have not connected for a while).
    """

    max_records = 50_000

    def __init__(self, clock: Any, per_minute: int):
        self.clock = clock
        self.rate = per_minute / 60.0
        self.burst = per_minute
        self.buckets: dict[str, TokenBucket] = {}

    def allow(self, key: str) -> bool:
        """Whether ``key`` may connect now (spends a token)."""
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_records:
                self.purge()
                if len(self.buckets) >= self.max_records:
                    del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return bucket.take()

    def purge(self) -> None:
        """Forget clients whose bucket has filled up again."""
        now = self.clock.seconds()
        for key in [k for k, b in self.buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.burst]:
            del self.buckets[key]


class Admission:
    """Counts sockets per client, per network and in all; remembers failed authentications."""

    max_records = 50_000  # failure records and lockouts kept at most (about 200 bytes each)

    def __init__(self, clock: Any, *, max_total: int, max_per_client: int,
                 max_auth_failures: int, failure_window: float, lockout: float,
                 max_per_network: int | None = None):
        self.clock = clock
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.max_per_network = max_per_network if max_per_network is not None else max_total
        self.max_auth_failures = max_auth_failures
        self.failure_window = failure_window
        self.lockout = lockout
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.per_network: dict[str, int] = {}
        self.failures: dict[str, list[float]] = {}  # client -> [window start, count]
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
        nets = networks(key)
        for net, quarters in nets:
            if self.per_network.get(net, 0) >= max(1, self.max_per_network * quarters // 4):
                raise Denied(429, "Too many connections from this network")
        self.total += 1
        self.per_client[key] = self.per_client.get(key, 0) + 1
        for net, _ in nets:
            self.per_network[net] = self.per_network.get(net, 0) + 1

    def locked_out(self, key: str) -> bool:
        """Whether ``key`` is locked out now (for endpoints that are not sockets)."""
        until = self.locked.get(key)
        return until is not None and until > self.clock.seconds()

    def release(self, key: str) -> None:
        """A socket counted by ``admit`` closed."""
        self.total -= 1
        _decrement(self.per_client, key)
        for net, _ in networks(key):
            _decrement(self.per_network, net)

    def auth_failed(self, key: str) -> bool:
        """Note a refused key; True when this locks the client out.

        Failures are counted in fixed windows of ``failure_window`` seconds
        from a client's first failure.
        """
        now = self.clock.seconds()
        record = self.failures.get(key)
        if record is None or record[0] <= now - self.failure_window:
            if record is None and len(self.failures) >= self.max_records:
                self.purge()
                if len(self.failures) >= self.max_records:  # still full: the oldest go
                    del self.failures[next(iter(self.failures))]
            record = self.failures[key] = [now, 0]
        record[1] += 1
        if record[1] >= self.max_auth_failures:
            del self.failures[key]
            if len(self.locked) >= self.max_records:
                self.purge()
            self.locked[key] = now + self.lockout
            return True
        return False

    def purge(self) -> None:
        """Drop failure records and lockouts that no longer matter (run on a timer)."""
        now = self.clock.seconds()
        for key in [k for k, until in self.locked.items() if until <= now]:
            del self.locked[key]
        for key in [k for k, (start, _) in self.failures.items() if start <= now - self.failure_window]:
            del self.failures[key]



def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class ProjectBudgets:
    """Per project, on this node: open authenticated SDK sockets, and new session ids a minute.

    A public ingest key lets anyone open sockets and sessions for its
    project; these caps keep one project (or whoever holds its key) from
    filling this node's sockets and Redis.  Session ids are counted once per
    minute window (a tab reloading its page keeps its id and is not counted
    again), in a set no larger than the cap.
    """

    def __init__(self, clock: Any, max_sockets: int, sessions_per_minute: int):
        self.clock = clock
        self.max_sockets = max_sockets
        self.sessions_per_minute = sessions_per_minute
        self.sockets: dict[str, int] = {}
        self.sessions: dict[str, tuple[float, set[str]]] = {}  # project -> (window start, ids)

    def open(self, project: str, session: str) -> str | None:
        """Count an authenticated socket of ``session``; or say why it may not open (not counted)."""
        if self.sockets.get(project, 0) >= self.max_sockets:
            return "This project has too many open sockets on this server"
        now = self.clock.seconds()
        start, ids = self.sessions.get(project, (now, set()))
        if now - start >= 60:
            start, ids = now, set()
        if session not in ids:
            if len(ids) >= self.sessions_per_minute:
                return "This project starts too many sessions a minute on this server"
            ids.add(session)
        self.sessions[project] = (start, ids)
        self.sockets[project] = self.sockets.get(project, 0) + 1
        return None

    def close(self, project: str) -> None:
        """A socket counted by ``open`` closed."""
        _decrement(self.sockets, project)

    def purge(self) -> None:
        """Forget the session windows that ended (run on a timer)."""
        now = self.clock.seconds()
        for project in [p for p, (start, _) in self.sessions.items() if now - start >= 60]:
            del self.sessions[project]
