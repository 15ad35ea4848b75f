"""Idle authenticated sockets for bench/compare.py (run as its own process).

    python bench/_idle.py PORT KEY COUNT

Opens COUNT SDK sockets (raw frames, bench/_rawws.py; at most 200 opening
at a time), authenticates each, prints "ready N errors E" (N sockets that
got auth_success, E that failed to connect, upgrade or authenticate) on
stdout, then holds them open and silent, answering pings, until terminated.
Beyond 20,000 sockets the client side is spread over source addresses
127.0.0.2, 127.0.0.3, ... so ephemeral ports do not run out.
"""

from __future__ import annotations

import json
import os
import resource
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory

from _rawws import RawClient

PORT, KEY, COUNT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
PER_SOURCE = 20_000
IN_FLIGHT = 200


class Idle(RawClient):
    """Authenticates, then says nothing more."""

    def on_open(self) -> None:
        self.send_text(json.dumps({"type": "auth", "apiKey": KEY}).encode())

    def on_refused(self, status: str) -> None:
        if not self.factory.authed.called:
            self.factory.authed.errback(RuntimeError(status))

    def on_text(self, payload: bytes) -> None:
        if json.loads(payload)["type"] == "auth_success" and not self.factory.authed.called:
            self.factory.authed.callback(self)

    def connectionLost(self, reason: object) -> None:
        if not self.factory.authed.called:
            self.factory.authed.errback(RuntimeError("closed before auth_success"))


async def open_one(number: int) -> Idle:
    factory = Factory.forProtocol(Idle)
    factory.path = f"/?projectId=bench&sessionId=idle{os.getpid()}-{number}"
    factory.authed = defer.Deferred().addTimeout(60, reactor)
    source = None if COUNT <= PER_SOURCE else (f"127.0.0.{2 + number % 250}", 0)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", PORT, timeout=30, bindAddress=source).connect(factory)
    return await factory.authed


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ready = errors = 0
    holders = []
    for start in range(0, COUNT, IN_FLIGHT):
        batch = [defer.ensureDeferred(open_one(n)) for n in range(start, min(start + IN_FLIGHT, COUNT))]
        for ok, value in await defer.DeferredList(batch, consumeErrors=True):
            if ok:
                ready += 1
                holders.append(value)
            else:
                errors += 1
    print(f"ready {ready} errors {errors}", flush=True)
    await defer.Deferred()  # hold the sockets until SIGTERM stops the reactor


task.react(lambda _: defer.ensureDeferred(main()))
