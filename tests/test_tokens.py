"""Tests for bklit.tokens: domain matching, the token store, and the cached verifier.

Pure: a ``FakeRedis`` (tests/fakes.py; test_redis_contract.py holds it to
what real Redis answers) stands in for Redis, and a ``Clock`` for time.  The fake counts its calls and can hold its
replies, so caching, shared lookups and failures are checked step by step.
"""

import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bklit.keys import REVOKED_CHANNEL
from bklit.redis_client import RedisUnavailable
from bklit.tokens import (INDEX_KEY, TokenStore, TokenVerifier, domain_allows, key_digest,
                          new_key, token_key)
from fakes import FakeRedis


@pytest.mark.parametrize("domains,origin,allowed", [
    # exact host
    (("example.com",), "https://example.com", True),
    (("example.com",), "http://example.com:8080", True),
    (("example.com",), "https://www.example.com", False),
    (("example.com",), "https://evil-example.com", False),
    (("example.com",), "https://example.com.evil.org", False),
    (("example.com",), "https://example.com@evil.org", False),
    # wildcard subdomain
    (("*.example.com",), "https://shop.example.com", True),
    (("*.example.com",), "https://a.b.example.com", True),
    (("*.example.com",), "https://example.com", False),
    (("*.example.com",), "https://evil-example.com", False),
    (("*.example.com",), "https://evilexample.com", False),
    (("*.example.com",), "https://.example.com", False),
    # several domains: any one will do
    (("a.com", "*.b.com"), "https://x.b.com", True),
    (("a.com", "*.b.com"), "https://a.com", True),
    (("a.com", "*.b.com"), "https://b.com", False),
    # case and a trailing dot do not matter
    (("example.com",), "https://EXAMPLE.Com", True),
    (("*.example.com",), "https://Shop.Example.COM", True),
    (("example.com",), "https://example.com.", True),
    (("*.example.com",), "https://shop.example.com.", True),
    # no usable origin
    (("example.com",), None, False),
    (("example.com",), "", False),
    (("example.com",), "null", False),
    (("example.com",), "example.com", False),
    # a null origin (sandboxed iframe, file:// page, hybrid app) matches no domain
    (("*.example.com",), "null", False),
    (("example.com",), "NULL", False),
    (("null",), "null", False),
    (("example.com",), "file://", False),
    (("example.com",), "file:///home/visitor/index.html", False),
    (("example.com",), "file://example.com", False),
    (("*.example.com",), "FILE://shop.example.com", False),
    # no domains: any origin, or none
    ((), "https://anything.example.org", True),
    ((), None, True),
    ((), "null", True),
    ((), "file://", True),
])
def test_domain_allows(domains, origin, allowed):
    """An Origin matches a key's domains exactly or as a subdomain of a ``*.`` pattern."""
    assert domain_allows(domains, origin) is allowed


def test_new_key_shape():
    """Keys are ``bk_`` and 40 URL-safe characters, never repeated."""
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(re.fullmatch(r"bk_[A-Za-z0-9_-]{40}", key) for key in keys)


class TokenStoreTests(SynchronousTestCase):
    """TokenStore on the fake: only the key's hash is stored."""

    def setUp(self):
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.store = TokenStore(self.redis.call)

    def result(self, coroutine):
        """Run a store coroutine to its end and return its result."""
        d = defer.ensureDeferred(coroutine)
        self.clock.advance(0)
        return self.successResultOf(d)

    def create(self, projects=("p1",), scope="ingest", **kwargs):
        return self.result(self.store.create(projects, scope, **kwargs))

    def test_create_stores_the_hash_not_the_key(self):
        """The key appears nowhere in Redis; its SHA-256 names the hash and fills the index."""
        key, token = self.create(("p1", "p2"), "read", name="site", expires_at=99.5,
                                 domains=("Example.COM", "*.b.com"), now=10.0)
        assert token.digest == key_digest(key)
        assert self.redis.sets == {INDEX_KEY: {token.digest}}
        assert set(self.redis.hashes) == {token_key(token.digest)}
        assert key not in repr((self.redis.hashes, self.redis.sets))
        assert token.domains == ("example.com", "*.b.com")
        assert token.id == token.digest[:12]

    def test_get_round_trip(self):
        """get() rebuilds the stored token field for field."""
        key, token = self.create(("p1", "p2"), "read", name="a, b", expires_at=99.5,
                                 domains=("a.com",), now=10.0)
        assert self.result(self.store.get(token.digest)) == token
        assert self.result(self.store.get(key_digest("bk_other"))) is None

    def test_list_oldest_first(self):
        """list() returns every token ordered by creation time."""
        _, late = self.create(now=30.0)
        _, early = self.create(now=10.0)
        _, middle = self.create(now=20.0)
        assert self.result(self.store.list()) == [early, middle, late]

    def test_find_by_key_and_by_id(self):
        """find() takes the key itself or 6+ hex digits of the id."""
        key, token = self.create()
        find = lambda what: self.result(self.store.find(what))
        assert find(key) == [token]
        assert find(token.id) == [token]
        assert find(token.id[:6].upper()) == [token]
        assert find(token.id[:5]) == []
        assert find("bk_" + "x" * 40) == []

    def test_revoke_keeps_the_token(self):
        """A revoked token stays listed, marked revoked."""
        _, token = self.create()
        self.result(self.store.revoke(token))
        [listed] = self.result(self.store.list())
        assert listed.revoked and listed.digest == token.digest

    def test_revoke_publishes_the_hash_after_storing(self):
        """Revoking publishes the token's SHA-256 on the revocation channel, after the revocation is stored."""
        _, token = self.create()
        del self.redis.calls[:]
        self.result(self.store.revoke(token))
        assert self.redis.calls == [("HSET", token_key(token.digest), "revoked", "1"),
                                    ("PUBLISH", REVOKED_CHANNEL, token.digest)]

    def test_as_dict_never_holds_the_key(self):
        """The JSON description shows the id, not the key or its full hash."""
        key, token = self.create(expires_at=0)
        described = token.as_dict()
        assert described["id"] == token.id and described["expires_at"] is None
        assert key not in repr(described) and token.digest not in repr(described)


class VerifierTests(SynchronousTestCase):
    """TokenVerifier: verdicts, caching for ``ttl`` seconds, shared and failed lookups."""

    ttl = 5.0

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.redis = FakeRedis(self.clock)
        self.store = TokenStore(self.redis.call)
        self.verifier = TokenVerifier(self.store, self.clock, self.ttl)

    def settled(self, d):
        """``d`` after the fake's pending replies were delivered."""
        self.clock.advance(0)
        return d

    def create(self, projects=("p1",), scope="ingest", **kwargs):
        return self.successResultOf(self.settled(defer.ensureDeferred(self.store.create(projects, scope, **kwargs))))

    def revoke(self, token):
        self.successResultOf(self.settled(defer.ensureDeferred(self.store.revoke(token))))

    def verdict(self, key, project="p1", scope="ingest", origin=None):
        return self.successResultOf(self.settled(self.verifier.verify(key, project, scope, origin)))

    def lookups(self):
        return self.redis.count("HGETALL")

    # -- verdicts

    def test_ok(self):
        """A good key for its project and scope is accepted, with its token."""
        key, token = self.create()
        verdict = self.verdict(key)
        assert verdict.ok and verdict.reason == "" and verdict.token == token

    def test_unknown(self):
        """A key that was never created is invalid."""
        verdict = self.verdict("bk_" + "x" * 40)
        assert (verdict.ok, verdict.reason) == (False, "invalid API key")

    def test_malformed_key_needs_no_lookup(self):
        """Empty, non-string or oversized keys are refused without asking Redis."""
        for key in ["", None, 42, ["bk_"], "bk_" + "x" * 300]:
            verdict = self.verdict(key)
            assert (verdict.ok, verdict.reason) == (False, "invalid API key")
        assert self.redis.calls == []

    def test_revoked(self):
        """A revoked key is refused as revoked."""
        key, token = self.create()
        self.revoke(token)
        assert self.verdict(key).reason == "API key revoked"

    def test_expired(self):
        """A key is refused from its expiry time on, by the verifier's clock."""
        key, _ = self.create(expires_at=1100.0)
        self.verifier.ttl = 0
        assert self.verdict(key).ok
        self.clock.advance(99.9)
        assert self.verdict(key).ok
        self.clock.advance(0.1)
        assert self.verdict(key).reason == "API key expired"

    def test_wrong_scope(self):
        """A read key cannot ingest and an ingest key cannot read."""
        read_key, _ = self.create(scope="read")
        ingest_key, _ = self.create(scope="ingest")
        assert self.verdict(read_key, scope="ingest").reason == "API key is not valid for ingest"
        assert self.verdict(ingest_key, scope="read").reason == "API key is not valid for read"
        assert self.verdict(read_key, scope="read").ok

    def test_wrong_project(self):
        """A key works only for its projects."""
        key, _ = self.create(("p1", "p2"))
        assert self.verdict(key, project="p2").ok
        assert self.verdict(key, project="p3").reason == "API key is not valid for this project"

    def test_wrong_origin(self):
        """A domain-bound key is refused from other origins and without one."""
        key, _ = self.create(domains=("*.example.com",))
        assert self.verdict(key, origin="https://shop.example.com").ok
        assert self.verdict(key, origin="https://evil.org").reason == "origin not allowed for this API key"
        assert not self.verdict(key, origin=None).ok

    # -- caching

    def test_cache_hit_within_ttl(self):
        """Checks of one key within ``ttl`` cost one Redis read, whatever is asked."""
        key, _ = self.create()
        assert self.verdict(key).ok
        self.clock.advance(self.ttl - 0.01)
        assert not self.verdict(key, project="p2").ok
        assert self.verdict(key).ok
        assert self.lookups() == 1

    def test_cache_expires_after_ttl(self):
        """After ``ttl`` seconds the key is read again, and a revocation is seen."""
        key, token = self.create()
        assert self.verdict(key).ok
        self.revoke(token)
        assert self.verdict(key).ok  # cached verdict, still within ttl
        self.clock.advance(self.ttl)
        assert self.verdict(key).reason == "API key revoked"
        assert self.lookups() == 2

    def test_negative_caching(self):
        """An unknown key is cached too: a flood of it costs one read per ttl."""
        key = "bk_" + "y" * 40
        for _ in range(50):
            assert not self.verdict(key).ok
        assert self.lookups() == 1
        self.clock.advance(self.ttl)
        assert not self.verdict(key).ok
        assert self.lookups() == 2

    def test_each_key_cached_separately(self):
        """Two keys are two lookups."""
        first, _ = self.create()
        second, _ = self.create()
        self.verdict(first), self.verdict(second), self.verdict(first)
        assert self.lookups() == 2

    def test_zero_ttl_never_caches(self):
        """With ``ttl`` 0 every check reads Redis."""
        self.verifier.ttl = 0
        key, _ = self.create()
        for _ in range(3):
            assert self.verdict(key).ok
        assert self.lookups() == 3

    def test_full_cache_is_cleared(self):
        """Past ``max_entries`` the cache starts over instead of growing."""
        self.verifier.max_entries = 2
        keys = ["bk_" + c * 40 for c in "abc"]
        for key in keys:
            self.verdict(key)
        assert self.lookups() == 3
        self.verdict(keys[2])  # cached after the clear
        assert self.lookups() == 3
        self.verdict(keys[0])  # dropped by the clear
        assert self.lookups() == 4

    # -- concurrent and failed lookups

    def test_concurrent_checks_share_one_lookup(self):
        """Checks of a key while its lookup is pending wait for that same lookup."""
        key, _ = self.create()
        self.redis.hold()
        first = self.verifier.verify(key, "p1", "ingest")
        second = self.verifier.verify(key, "p2", "ingest")
        third = self.verifier.verify(key, "p1", "read")
        self.assertNoResult(first)
        self.assertNoResult(second)
        assert self.lookups() == 1
        self.redis.release()
        self.clock.advance(0)
        assert self.successResultOf(first).ok
        assert self.successResultOf(second).reason == "API key is not valid for this project"
        assert self.successResultOf(third).reason == "API key is not valid for read"
        assert self.verdict(key).ok
        assert self.lookups() == 1

    def test_failed_lookup_fails_every_waiter_and_is_not_cached(self):
        """A Redis error errbacks all checks waiting on it; the next check asks again."""
        key, _ = self.create()
        self.redis.hold()
        waiting = [self.verifier.verify(key, "p1", "ingest") for _ in range(3)]
        assert self.lookups() == 1
        self.redis.fail(RedisUnavailable("Redis is not connected"))
        for d in waiting:
            self.failureResultOf(d, RedisUnavailable)
        assert self.verdict(key).ok
        assert self.lookups() == 2

    def test_a_known_key_is_judged_as_last_seen_while_redis_is_down(self):
        """Within ``stale`` seconds of its last lookup a good key still passes with Redis down; others fail."""
        self.verifier = TokenVerifier(self.store, self.clock, self.ttl, stale=60)
        key, token = self.create()
        other, _ = self.create()
        revoked, revoked_token = self.create()
        self.revoke(revoked_token)
        assert self.verdict(key).ok and not self.verdict(revoked).ok
        self.redis.down = True
        self.clock.advance(30)  # past the cache ttl: Redis is asked, and fails
        assert self.verdict(key).token == token
        assert self.verdict(revoked).reason == "API key revoked"
        self.failureResultOf(self.verifier.verify(other, "p1", "ingest"), RedisUnavailable)  # never seen
        self.clock.advance(31)
        self.failureResultOf(self.verifier.verify(key, "p1", "ingest"), RedisUnavailable)

    def test_without_stale_a_known_key_fails_while_redis_is_down(self):
        """``stale=0`` (the default here): an outage refuses every check once the cache expired."""
        key, _ = self.create()
        assert self.verdict(key).ok
        self.redis.down = True
        self.clock.advance(self.ttl + 1)
        self.failureResultOf(self.verifier.verify(key, "p1", "ingest"), RedisUnavailable)

    # -- forgetting

    def test_forget_drops_the_cached_and_the_last_seen_lookup(self):
        """After ``forget`` the next check reads Redis, and an outage no longer passes the key as last seen."""
        self.verifier = TokenVerifier(self.store, self.clock, self.ttl, stale=60)
        key, token = self.create()
        assert self.verdict(key).ok
        self.revoke(token)
        self.verifier.forget(token.digest)
        assert self.verdict(key).reason == "API key revoked"
        assert self.lookups() == 2
        self.verifier.forget(token.digest)
        self.redis.down = True
        self.failureResultOf(self.verifier.verify(key, "p1", "ingest"), RedisUnavailable)

    def test_a_lookup_in_flight_when_forgotten_is_read_again(self):
        """A revocation heard while the key's lookup is under way: the waiters get the second read."""
        key, token = self.create()
        self.redis.hold()
        pending = self.verifier.verify(key, "p1", "ingest")  # its reply, read now, says good
        self.redis.hashes[token_key(token.digest)]["revoked"] = "1"
        self.verifier.forget(token.digest)
        self.redis.release()
        self.clock.advance(0)
        assert self.successResultOf(pending).reason == "API key revoked"
        assert self.lookups() == 2

    def test_reset_drops_every_cached_lookup_and_rereads_those_in_flight(self):
        """``reset``: every key is read again, a lookup under way too; what was last seen stays."""
        self.verifier = TokenVerifier(self.store, self.clock, self.ttl, stale=60)
        first, _ = self.create()
        second, token = self.create()
        assert self.verdict(first).ok
        self.redis.hold()
        pending = self.verifier.verify(second, "p1", "ingest")
        self.redis.hashes[token_key(token.digest)]["revoked"] = "1"
        self.verifier.reset()
        self.redis.release()
        self.clock.advance(0)
        assert self.successResultOf(pending).reason == "API key revoked"
        assert self.verdict(first).ok
        assert self.lookups() == 4
        self.redis.down = True
        self.clock.advance(self.ttl)
        assert self.verdict(first).ok  # judged as last seen

    def test_standing(self):
        """``standing`` says why a token is no good for anything, or "" when it may be."""
        _, token = self.create(expires_at=1010.0)
        assert self.verifier.standing(token) == ""
        assert self.verifier.standing(None) == "invalid API key"
        self.clock.advance(10)
        assert self.verifier.standing(token) == "API key expired"
        self.revoke(token)
        assert self.verifier.standing(self.successResultOf(self.settled(
            defer.ensureDeferred(self.store.get(token.digest))))) == "API key revoked"

    def test_lookup_failing_at_once_fails_the_check(self):
        """With Redis down, ``call`` fails at once: the check fails too, it does not hang."""
        key, _ = self.create()
        self.redis.down = True
        d = self.verifier.verify(key, "p1", "ingest")
        self.failureResultOf(d, RedisUnavailable)
        self.redis.down = False
        assert self.verdict(key).ok
