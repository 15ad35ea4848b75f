"""Tests for bklit.revocation (OpenKeys) and the Broadcaster's revocation channel.

Pure: the ``FakeRedis`` of fakes.py behind a real ``TokenVerifier``, a
``Clock``, and sockets that record what they were refused with.  The same
behaviour on real daemons and Redis is in test_revocation_live.py and the
catalogue (test_bad_protocol.py).
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bklit.broadcast import Broadcaster
from bklit.keys import REVOKED_CHANNEL, live_channel
from bklit.revocation import OpenKeys
from bklit.tokens import TokenStore, TokenVerifier, token_key
from fakes import FakeRedis


class FakeSocket:
    """What OpenKeys needs of a socket: ``writable`` and ``refuse``."""

    def __init__(self):
        self.writable = True
        self.refused = []

    def refuse(self, reason):
        self.refused.append(reason)
        self.writable = False  # closing, as the real sockets are


class OpenKeysTests(SynchronousTestCase):
    """The index of open sockets by key digest, the expiry timers, the re-check."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.redis = FakeRedis(self.clock)
        self.store = TokenStore(self.redis.call)
        self.verifier = TokenVerifier(self.store, self.clock, ttl=5)
        self.open_keys = OpenKeys(self.verifier, self.clock)

    def token(self, **kwargs):
        """A stored ingest key for p1 and its token."""
        d = defer.ensureDeferred(self.store.create(("p1",), "ingest", **kwargs))
        self.clock.advance(0)
        return self.successResultOf(d)

    def opened(self, token, count=1):
        """``count`` sockets authenticated with ``token``."""
        sockets = [FakeSocket() for _ in range(count)]
        for sock in sockets:
            self.open_keys.add(sock, token)
        return sockets

    def revoke_unheard(self, token):
        """Store a revocation without publishing it (a message the node missed)."""
        self.redis.hashes[token_key(token.digest)]["revoked"] = "1"

    def lookups(self):
        return self.redis.count("HGETALL")

    def test_revoked_refuses_every_socket_of_the_key_and_no_other(self):
        """Every socket of the revoked key is refused "API key revoked"; other keys' sockets are left alone."""
        _, revoked = self.token()
        _, kept = self.token()
        first, second = self.opened(revoked, 2)
        [other] = self.opened(kept)
        self.open_keys.revoked(revoked.digest)
        assert first.refused == second.refused == ["API key revoked"]
        assert other.refused == []
        assert self.open_keys.holds(first, revoked.digest) and not self.open_keys.holds(first, kept.digest)

    def test_revoked_key_is_refused_at_once_to_new_sockets(self):
        """The verifier forgets the digest: a check within the cache ttl reads Redis and sees the revocation."""
        key, token = self.token()
        check = lambda: self.successResultOf(self.verifier.verify(key, "p1", "ingest"))  # noqa: E731
        d = self.verifier.verify(key, "p1", "ingest")
        self.clock.advance(0)
        assert self.successResultOf(d).ok
        self.revoke_unheard(token)
        assert check().ok  # cached
        self.open_keys.revoked(token.digest)
        d = self.verifier.verify(key, "p1", "ingest")
        self.clock.advance(0)
        assert self.successResultOf(d).reason == "API key revoked"
        assert self.lookups() == 2

    def test_a_socket_with_two_keys_is_refused_when_either_is_revoked(self):
        """A socket that presented a second good key closes on the revocation of either."""
        _, first = self.token()
        _, second = self.token()
        both, only_first = FakeSocket(), FakeSocket()
        self.open_keys.add(both, first)
        self.open_keys.add(both, second)
        self.open_keys.add(only_first, first)
        self.open_keys.revoked(second.digest)
        assert both.refused == ["API key revoked"] and only_first.refused == []
        self.open_keys.revoked(first.digest)
        assert both.refused == ["API key revoked"]  # closing already: not refused twice
        assert only_first.refused == ["API key revoked"]

    def test_removed_sockets_are_forgotten(self):
        """A closed socket leaves the index under each of its keys."""
        _, first = self.token()
        _, second = self.token()
        sock = FakeSocket()
        self.open_keys.add(sock, first)
        self.open_keys.add(sock, second)
        [stays] = self.opened(first)
        assert len(self.open_keys) == 2
        self.open_keys.remove(sock)
        self.open_keys.remove(sock)  # twice is harmless
        assert len(self.open_keys) == 1 and not self.open_keys.holds(sock, first.digest)
        self.open_keys.revoked(first.digest)
        assert sock.refused == [] and stays.refused == ["API key revoked"]

    def test_expiry_refuses_the_sockets_at_its_time(self):
        """A key expiring at t closes its sockets at t on the clock, "API key expired", with one timer for all."""
        _, token = self.token(expires_at=1002.5)
        sockets = self.opened(token, 3)
        assert len(self.clock.getDelayedCalls()) == 1
        self.clock.advance(2.49)
        assert [s.refused for s in sockets] == [[], [], []]
        self.clock.advance(0.01)
        assert [s.refused for s in sockets] == [["API key expired"]] * 3
        assert self.clock.getDelayedCalls() == []

    def test_expiry_timer_goes_with_the_last_socket(self):
        """The timer of a key is cancelled when the last socket holding it closes."""
        _, token = self.token(expires_at=1060.0)
        first, second = self.opened(token, 2)
        self.open_keys.remove(first)
        assert len(self.clock.getDelayedCalls()) == 1
        self.open_keys.remove(second)
        assert self.clock.getDelayedCalls() == []
        [again] = self.opened(token)  # a new socket gets a new timer
        self.clock.advance(60)
        assert again.refused == ["API key expired"]

    def test_keys_without_expiry_have_no_timer(self):
        """A key that never expires costs no delayed call."""
        _, token = self.token()
        self.opened(token, 2)
        assert self.clock.getDelayedCalls() == []

    def test_recheck_looks_each_key_up_once_and_refuses_those_now_refused(self):
        """After a resubscribe: one lookup per distinct key; sockets of keys revoked meanwhile are refused."""
        _, missed = self.token()
        _, kept = self.token()
        _, gone = self.token()
        missed_sockets = self.opened(missed, 3)
        kept_sockets = self.opened(kept, 2)
        [gone_socket] = self.opened(gone)
        self.revoke_unheard(missed)
        del self.redis.hashes[token_key(gone.digest)]
        before = self.lookups()
        d = self.open_keys.recheck()
        self.clock.advance(0)
        self.successResultOf(d)
        assert self.lookups() - before == 3
        assert [s.refused for s in missed_sockets] == [["API key revoked"]] * 3
        assert [s.refused for s in kept_sockets] == [[], []]
        assert gone_socket.refused == ["invalid API key"]

    def test_recheck_drops_the_whole_cache(self):
        """Keys held by no socket are read again too: a revocation missed for them is seen by the next check."""
        key, token = self.token()
        d = self.verifier.verify(key, "p1", "ingest")
        self.clock.advance(0)
        assert self.successResultOf(d).ok
        self.revoke_unheard(token)
        self.open_keys.recheck()
        d = self.verifier.verify(key, "p1", "ingest")
        self.clock.advance(0)
        assert self.successResultOf(d).reason == "API key revoked"

    def test_recheck_that_cannot_ask_redis_closes_nothing(self):
        """A re-check that fails (Redis unavailable) leaves the sockets open and fires anyway."""
        _, token = self.token()
        [sock] = self.opened(token)
        self.redis.down = True
        self.successResultOf(self.open_keys.recheck())
        self.flushLoggedErrors()
        assert sock.refused == []


class FakeSubscription:
    """A pub/sub connection whose SUBSCRIBE Redis confirms when told to."""

    def __init__(self):
        self.subscribed = []
        self.confirm = defer.Deferred()

    def subscribe(self, channels):
        self.subscribed.append(channels)
        return self.confirm


class BroadcasterTests(SynchronousTestCase):
    """The broadcaster's pub/sub connection carries the revocation channel."""

    def setUp(self):
        self.broadcaster = Broadcaster(None, self, self)  # this test case stands in for the factory and OpenKeys
        self.revoked_digests = []
        self.rechecks = 0
        self.framed = []

    def prepareMessage(self, payload):
        self.framed.append(payload)

    def revoked(self, digest):
        self.revoked_digests.append(digest)

    def recheck(self):
        self.rechecks += 1

    def test_each_subscribe_takes_the_revocation_channel_first_then_rechecks(self):
        """On every (re)connect the revocation channel is subscribed; once Redis confirms, keys are re-checked."""
        self.broadcaster.dashboards["p1"] = set()
        connection = FakeSubscription()
        self.broadcaster.subscribed(connection)
        assert connection.subscribed == [[REVOKED_CHANNEL, live_channel("p1")]]
        assert self.rechecks == 0
        connection.confirm.callback(["subscribe", REVOKED_CHANNEL, 1])
        assert self.rechecks == 1
        again = FakeSubscription()
        self.broadcaster.subscribed(again)
        again.confirm.errback(ConnectionError("lost"))  # the next connection will check
        assert self.rechecks == 1

    def test_a_revocation_message_goes_to_the_open_keys(self):
        """A message on the revocation channel names a digest for OpenKeys, and no dashboard gets it."""
        self.broadcaster.deliver(REVOKED_CHANNEL, "ab" * 32)
        assert self.revoked_digests == ["ab" * 32]
        assert self.framed == []
