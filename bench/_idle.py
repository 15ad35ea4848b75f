"""Idle authenticated sockets for bench/compare.py (run as its own process).

    python bench/_idle.py PORT KEY COUNT

Opens COUNT SDK sockets, authenticates each, prints "ready N" (N sockets
that got auth_success) on stdout, then holds them open and silent until
terminated.
"""

from __future__ import annotations

import json
import os
import sys

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

PORT, KEY, COUNT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])


class Idle(WebSocketClientProtocol):
    """Authenticates, then says nothing more."""

    def onOpen(self) -> None:
        self.sendMessage(json.dumps({"type": "auth", "apiKey": KEY}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if json.loads(payload)["type"] == "auth_success" and not self.factory.authed.called:
            self.factory.authed.callback(True)


async def main() -> None:
    waits = []
    for number in range(COUNT):
        session = f"idle{os.getpid()}-{number}"
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{PORT}/?projectId=bench&sessionId={session}")
        factory.protocol = Idle
        factory.authed = defer.Deferred().addTimeout(60, reactor)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", PORT).connect(factory)
        waits.append(factory.authed)
    results = await defer.DeferredList(waits, consumeErrors=True)
    print(f"ready {sum(1 for ok, _ in results if ok)}", flush=True)
    await defer.Deferred()  # hold the sockets until SIGTERM stops the reactor


task.react(lambda _: defer.ensureDeferred(main()))
