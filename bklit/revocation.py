"""Open sockets by the keys they were opened with, so revocation and expiry reach them.

Every SDK and dashboard socket that a key authenticated is indexed here
under the key's SHA-256, never the key itself.  A socket may be under
several digests (an SDK socket that later sent another good key) and is
refused when any of them is revoked or expires.  A node has one
``OpenKeys``, shared by both endpoints and fed by the ``Broadcaster``'s
pub/sub connection:

- ``revoked(digest)``, for each message on ``keys.REVOKED_CHANNEL``
  (``TokenStore.revoke`` publishes the digest after storing the
  revocation): the verifier forgets the digest, so new sockets with that
  key are refused at once, and every local socket under it is refused:
  ``unauthorized`` "API key revoked", close 1008.
- ``recheck()``, after each (re)subscribe, since what was published while
  the subscriber was away is lost: the verifier's cache is dropped and each
  digest of an open socket is looked up once; the sockets of a token now
  revoked, expired or gone are refused with that reason.  A lookup that
  fails (Redis unavailable) closes nothing.
- A key with an expiry has one timer, on the injected clock, for all its
  sockets; it is cancelled when the last of them closes.  At the expiry
  they are refused with "API key expired".

A socket offers ``writable`` and ``refuse(reason)`` (send ``unauthorized``,
close 1008) and is ``remove``d when it closes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from bklit.tokens import Token, TokenVerifier

log = Logger()


class OpenKeys:
    """Which keys (by digest) each open socket was authenticated with, and the reverse."""

    def __init__(self, verifier: TokenVerifier, clock: Any):
        self.verifier = verifier
        self.clock = clock
        self._sockets: dict[str, set[Any]] = {}  # digest -> sockets
        self._digests: dict[Any, set[str]] = {}  # socket -> digests
        self._expiry: dict[str, Any] = {}  # digest -> its delayed call

    def __len__(self) -> int:
        """How many distinct keys open sockets hold."""
        return len(self._sockets)

    def holds(self, sock: Any, digest: str) -> bool:
        """Whether ``sock`` was authenticated with the key whose SHA-256 is ``digest``."""
        return digest in self._digests.get(sock, ())

    def add(self, sock: Any, token: Token) -> None:
        """``sock`` was authenticated with ``token``'s key."""
        digest = token.digest
        self._digests.setdefault(sock, set()).add(digest)
        self._sockets.setdefault(digest, set()).add(sock)
        if token.expires_at and digest not in self._expiry:
            delay = max(0.0, token.expires_at - self.clock.seconds())
            self._expiry[digest] = self.clock.callLater(delay, self._expired, digest)

    def remove(self, sock: Any) -> None:
        """``sock`` closed: forget it, and the timers of keys no socket holds now."""
        for digest in self._digests.pop(sock, ()):
            sockets = self._sockets[digest]
            sockets.discard(sock)
            if not sockets:
                del self._sockets[digest]
                timer = self._expiry.pop(digest, None)
                if timer is not None and timer.active():
                    timer.cancel()

    def revoked(self, digest: str) -> None:
        """The key of ``digest`` was revoked: refuse it from now on, and close its sockets."""
        self.verifier.forget(digest)
        self._refuse(digest, "API key revoked")

    def recheck(self) -> defer.Deferred:
        """Look every held key up again (one lookup each); close the sockets of those now refused."""
        self.verifier.reset()
        checks = [self.verifier.lookup_digest(digest).addCallback(self._rechecked, digest)
                  for digest in list(self._sockets)]
        return defer.DeferredList(checks, consumeErrors=True).addCallback(self._not_rechecked)

    def _rechecked(self, token: Token | None, digest: str) -> None:
        reason = self.verifier.standing(token)
        if reason:
            self._refuse(digest, reason)

    def _not_rechecked(self, results: list) -> None:
        failed = [outcome for ok, outcome in results if not ok]
        if failed:
            log.warn("{count} keys of open sockets not checked again: {error}",
                     count=len(failed), error=failed[0].getErrorMessage())

    def _expired(self, digest: str) -> None:
        del self._expiry[digest]
        self._refuse(digest, "API key expired")

    def _refuse(self, digest: str, reason: str) -> None:
        for sock in list(self._sockets.get(digest, ())):
            if sock.writable:
                sock.refuse(reason)
