"""API keys: creation, storage as SHA-256 in Redis, and the cached verifier.

A key is ``bk_`` followed by 240 random bits.  Redis never sees the key, only
its SHA-256: ``bklit:token:<hash>`` is a hash of the token's projects, scope,
allowed domains, expiry, name and revocation, and the set ``bklit:tokens``
indexes them so listing needs no ``KEYS``.  A token is shown by the first 12
hex digits of its hash, its id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.python.failure import Failure

from bklit import keys

SCOPES = ("ingest", "read")
INDEX_KEY = keys.TOKEN_INDEX
token_key = keys.token


def new_key() -> str:
    """A fresh random API key."""
    return "bk_" + secrets.token_urlsafe(30)


def key_digest(key: str) -> str:
    """The SHA-256 (hex) under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def null_origin(origin: str) -> bool:
    """Whether an ``Origin`` header value names no site at all.

    ``null`` is what sandboxed iframes, hybrid apps and some browsers'
    file:// pages send; Chromium sends ``file://`` for a file page, with a
    host if the file came from one.  Such an origin says nothing about the
    page that sent it (Autobahn treats all of them as ``null`` too).
    """
    origin = origin.strip()
    return origin.lower() == "null" or urlsplit(origin).scheme.lower() == "file"


def domain_allows(domains: tuple[str, ...], origin: str | None) -> bool:
    """Whether an ``Origin`` header value is one of a key's domains.

    ``example.com`` matches that host exactly; ``*.example.com`` matches any
    subdomain of it (not the bare domain).  No domains: any origin, a null
    one included.  A null origin (see ``null_origin``) matches no domain.
    """
    if not domains:
        return True
    if not origin or null_origin(origin):
        return False
    host = (urlsplit(origin.strip()).hostname or "").rstrip(".").lower()
    if not host:
        return False
    for domain in domains:
        if domain.startswith("*."):
            if host.endswith(domain[1:]) and len(host) > len(domain) - 1:
                return True
        elif hmac.compare_digest(host.encode(), domain.encode()):
            return True
    return False


@dataclass(frozen=True)
class Token:
    """A stored token (never the key itself)."""

    digest: str
    projects: tuple[str, ...]
    scope: str
    domains: tuple[str, ...]
    expires_at: float  # epoch seconds; 0 = never
    name: str
    created_at: float
    revoked: bool

    @property
    def id(self) -> str:
        """Short public handle: the first 12 hex digits of the hash."""
        return self.digest[:12]

    def expired(self, now: float) -> bool:
        """Whether the token's expiry has passed at ``now``."""
        return bool(self.expires_at) and now >= self.expires_at

    def to_fields(self) -> list[str]:
        """The flat field/value list stored in the Redis hash."""
        return [
            "projects", ",".join(self.projects),
            "scope", self.scope,
            "domains", ",".join(self.domains),
            "expires_at", repr(self.expires_at),
            "name", self.name,
            "created_at", repr(self.created_at),
            "revoked", "1" if self.revoked else "0",
        ]

    @classmethod
    def from_fields(cls, digest: str, fields: dict[str, str]) -> "Token":
        """Rebuild a token from its Redis hash."""
        def items(name: str) -> tuple[str, ...]:
            return tuple(x for x in fields.get(name, "").split(",") if x)

        return cls(
            digest=digest,
            projects=items("projects"),
            scope=fields.get("scope", ""),
            domains=items("domains"),
            expires_at=float(fields.get("expires_at") or 0),
            name=fields.get("name", ""),
            created_at=float(fields.get("created_at") or 0),
            revoked=fields.get("revoked") == "1",
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (for ``bklit token list --json``)."""
        return {
            "id": self.id,
            "name": self.name,
            "projects": list(self.projects),
            "scope": self.scope,
            "domains": list(self.domains),
            "created_at": self.created_at,
            "expires_at": self.expires_at or None,
            "revoked": self.revoked,
        }


def _pairs(reply: Any) -> dict[str, str]:
    """An HGETALL reply (dict or flat list) as a dict."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2]))


class TokenStore:
    """Tokens in Redis.  ``call(command, *args)`` runs one Redis command."""

    def __init__(self, call: Callable[..., defer.Deferred]):
        self.call = call

    async def create(
        self,
        projects: tuple[str, ...],
        scope: str,
        name: str = "",
        expires_at: float = 0,
        domains: tuple[str, ...] = (),
        now: float | None = None,
    ) -> tuple[str, Token]:
        """Make, store and return a new key with its token record."""
        key = new_key()
        token = Token(
            digest=key_digest(key),
            projects=projects,
            scope=scope,
            domains=tuple(d.lower() for d in domains),
            expires_at=expires_at,
            name=name,
            created_at=time.time() if now is None else now,
            revoked=False,
        )
        await self.call("HSET", token_key(token.digest), *token.to_fields())
        await self.call("SADD", INDEX_KEY, token.digest)
        return key, token

    async def get(self, digest: str) -> Token | None:
        """The token stored under ``digest``, or None."""
        fields = _pairs(await self.call("HGETALL", token_key(digest)))
        return Token.from_fields(digest, fields) if fields else None

    async def list(self) -> list[Token]:
        """Every stored token, oldest first."""
        digests = await self.call("SMEMBERS", INDEX_KEY)
        tokens = [t for t in [await self.get(d) for d in sorted(digests)] if t]
        return sorted(tokens, key=lambda t: t.created_at)

    async def find(self, id_or_key: str) -> list[Token]:
        """Tokens matching a full key or an id prefix (at least 6 hex digits)."""
        if id_or_key.startswith("bk_"):
            token = await self.get(key_digest(id_or_key))
            return [token] if token else []
        prefix = id_or_key.lower()
        if len(prefix) < 6:
            return []
        return [t for t in await self.list() if t.digest.startswith(prefix)]

    async def revoke(self, token: Token) -> None:
        """Mark a token revoked (kept, so listings show it), then tell every node.

        The SHA-256 is published on ``keys.REVOKED_CHANNEL`` after the
        revocation is stored, so a node that hears it and looks the token up
        again reads it revoked (``bklit.revocation``).
        """
        await self.call("HSET", token_key(token.digest), "revoked", "1")
        await self.call("PUBLISH", keys.REVOKED_CHANNEL, token.digest)


@dataclass(frozen=True)
class Verdict:
    """The answer to "may this key do this?": ``reason`` says why not."""

    ok: bool
    reason: str = ""
    token: Token | None = None


class TokenVerifier:
    """Checks keys against the store, caching each lookup for ``ttl`` seconds.

    Lookups, found or not, are cached, so a flood of bad keys costs Redis one
    read per key per ``ttl``; concurrent checks of one key share one lookup.
    While Redis cannot be asked, a key found within the last ``stale``
    seconds is judged as it was then (so new tabs keep working through an
    outage, their events going to the spool); an unknown key is refused.
    The caches are bounded: when full they are cleared.

    ``forget`` (a revocation was heard) and ``reset`` (revocations may have
    been missed) drop cached lookups; a lookup in flight at that moment may
    have read the token before the change, so it is read once more before
    its waiters get an answer.
    """

    max_entries = 100_000

    def __init__(self, store: TokenStore, clock: Any, ttl: float, stale: float = 0.0):
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.stale = stale
        self._cache: dict[str, tuple[float, Token | None]] = {}
        self._known: dict[str, tuple[float, Token]] = {}
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self._reread: set[str] = set()

    def lookup(self, key: str) -> defer.Deferred:
        """The stored token for ``key`` (or None), from cache when fresh."""
        return self.lookup_digest(key_digest(key))

    def lookup_digest(self, digest: str) -> defer.Deferred:
        """The stored token whose SHA-256 is ``digest`` (or None), from cache when fresh."""
        now = self.clock.seconds()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return defer.succeed(cached[1])
        result: defer.Deferred = defer.Deferred()
        waiters = self._inflight.get(digest)
        if waiters is not None:
            waiters.append(result)
            return result
        self._inflight[digest] = [result]
        self._read(digest)
        return result

    def _read(self, digest: str) -> None:
        # May settle at once (Redis down): the waiter is registered first.
        defer.ensureDeferred(self.store.get(digest)).addBoth(self._settle, digest)

    def forget(self, digest: str) -> None:
        """Drop all that is known of ``digest`` (it was revoked): the next check reads Redis."""
        self._cache.pop(digest, None)
        self._known.pop(digest, None)
        if digest in self._inflight:
            self._reread.add(digest)

    def reset(self) -> None:
        """Drop every cached lookup (what was last seen while Redis answered stays)."""
        self._cache.clear()
        self._reread.update(self._inflight)

    def _settle(self, outcome: Any, digest: str) -> None:
        if digest in self._reread:
            self._reread.discard(digest)
            self._read(digest)
            return
        waiters = self._inflight.pop(digest)
        failed = isinstance(outcome, Failure)
        if failed:
            known = self._known.get(digest)
            if known is not None and self.clock.seconds() - known[0] <= self.stale:
                failed, outcome = False, known[1]
        elif outcome is None:
            self._known.pop(digest, None)
        elif self.stale > 0:
            if len(self._known) >= self.max_entries:
                self._known.clear()
            self._known[digest] = (self.clock.seconds(), outcome)
        if not failed and self.ttl > 0:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[digest] = (self.clock.seconds() + self.ttl, outcome)
        for waiter in waiters:
            if failed:
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def verify(self, key: Any, project_id: str, scope: str, origin: str | None = None) -> defer.Deferred:
        """Fires with a ``Verdict`` for using ``key`` on ``project_id``."""
        if not isinstance(key, str) or not key or len(key) > 256:
            return defer.succeed(Verdict(False, "invalid API key"))
        d = self.lookup(key)
        d.addCallback(self.judge, project_id, scope, origin)
        return d

    def standing(self, token: Token | None) -> str:
        """Why a looked-up token is no good for anything now ("" when it may be)."""
        if token is None:
            return "invalid API key"
        if token.revoked:
            return "API key revoked"
        if token.expired(self.clock.seconds()):
            return "API key expired"
        return ""

    def judge(self, token: Token | None, project_id: str, scope: str, origin: str | None) -> Verdict:
        """The verdict for a looked-up token (pure)."""
        reason = self.standing(token)
        if reason:
            return Verdict(False, reason)
        if token.scope != scope:
            return Verdict(False, f"API key is not valid for {scope}")
        if project_id not in token.projects:
            return Verdict(False, "API key is not valid for this project")
        if not domain_allows(token.domains, origin):
            return Verdict(False, "origin not allowed for this API key")
        return Verdict(True, token=token)

