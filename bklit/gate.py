"""The SDK socket's authentication gate, per connection.

- ``new``: no key seen yet.  The first message carrying a key (``auth`` or
  the ``apiKey`` of a pageview/event) starts a check;
- ``checking``: messages that arrive meanwhile wait, in order, and are
  handled once the verdict is in;
- ``open``: the key was good; events are accepted.  A message carrying a
  key the socket has not presented before (compared by SHA-256) is checked
  like the first, back in ``checking``; the same key again is not looked up;
- ``refused``: an ``unauthorized`` error was sent and the socket closes 1008.

The digests of the socket's good keys are indexed in the node's
``OpenKeys`` (``bklit.revocation``): when any of them is revoked or
expires, the socket is refused.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from bklit import wire
from bklit.tokens import key_digest
from bklit.websocket import CLOSE_GOING_AWAY, CLOSE_POLICY

MAX_WAITING = 100  # messages held while a key is being checked

log = Logger()


class AuthGate:
    """The gate of ``bklit.sdk.SdkProtocol``: ``receive`` lets a parsed message through or holds it.

    The socket provides the attributes ``gate`` (the state, ``new`` at
    first), ``waiting`` (a list), ``ingest``, ``project_id``,
    ``client_origin``, ``client``, ``closed``, ``ours``, ``in_project`` and
    ``auth_timer``, and the methods ``handle_<type>`` for each message
    type, ``reject``, ``send_error``, ``close``, ``settle`` and
    ``widen_frame_budget``.
    """

    def receive(self, message: wire.Auth | wire.PageView | wire.Event) -> None:
        """Handle a parsed message now, or hold it while a key is checked."""
        if self.gate == "checking":
            if len(self.waiting) >= MAX_WAITING:
                self.reject("rate_limited", "Too many messages before authentication finished")
                return
            self.waiting.append(message)
            return
        key = message.api_key
        if self.gate == "new" and not key:
            self.refuse("An API key is required: send auth first")
            return
        if key and not self.ingest.open_keys.holds(self, key_digest(key)):
            self.gate = "checking"
            self.waiting.append(message)
            d = self.ingest.verifier.verify(key, self.project_id, "ingest", self.client_origin)
            d.addCallbacks(self.verified, self.verify_failed)
            return
        getattr(self, "handle_" + type(message).__name__.lower())(message)

    def verified(self, verdict: Any) -> None:
        """The key's verdict is in: open the gate and handle what waited, or refuse the connection.

        A good key's waiting messages are handled even when the connection
        dropped meanwhile (their acks cannot be sent, but they are stored),
        and then the session they joined ends, after them.
        """
        if self.closed and not verdict.ok:
            return
        if not verdict.ok:
            if self.ingest.admission.auth_failed(self.client):
                log.info("locked out a client after repeated authentication failures")
            self.refuse(verdict.reason)
            return
        refusal = None if self.in_project else self.ingest.open_in_project(self)  # at the first key
        if refusal:
            self.ingest.metrics.messages.labels("auth", "project_limit").inc()
            self.gate = "refused"
            self.waiting = []
            if not self.closed:
                self.send_error("project_limit", refusal)
                self.close(CLOSE_POLICY, "Project limit")
            return
        self.gate = "open"
        self.widen_frame_budget()
        self.ingest.open_keys.add(self, verdict.token)
        if self.auth_timer is not None and self.auth_timer.active():
            self.auth_timer.cancel()
        waiting, self.waiting = self.waiting, []
        for message in waiting:  # one with yet another key starts its check; the rest wait again
            if self.ours or self.gate == "refused":
                break
            self.receive(message)
        if self.closed:
            self.ingest.leave(self)
        self.settle()

    def verify_failed(self, failure: Any) -> None:
        """The key could not be checked (Redis down): try again later."""
        log.warn("API key check failed: {error}", error=failure.getErrorMessage())
        if self.closed:
            return
        self.gate = "new"
        self.waiting = []
        self.send_error("overloaded", "Cannot check the API key now; try again later")
        self.close(CLOSE_GOING_AWAY, "Try again later")

    def auth_timed_out(self) -> None:
        """No valid key in time: such sockets would otherwise idle forever."""
        if not self.closed and self.gate != "open":
            self.refuse(f"No API key within {self.ingest.config.auth_timeout:g} s")

    def refuse(self, reason: str) -> None:
        """Send ``unauthorized`` and close 1008."""
        self.ingest.metrics.messages.labels("auth", "unauthorized").inc()
        self.gate = "refused"
        self.waiting = []
        self.send_error("unauthorized", reason)
        self.close(CLOSE_POLICY, "Unauthorized")
