"""Fakes of the daemon's dependencies, for pure tests (one place; no test module imports another).

``FakeRedis`` answers the commands the token store uses as Redis does;
``test_redis_contract.py`` runs the same tests against it and a real Redis.
"""

from twisted.internet import defer

from bklit.redis_client import RedisUnavailable


class FakeRedis:
    """In-memory HSET/HGETALL/SADD/SMEMBERS (and PUBLISH, to nobody) with a call log, answering as Redis does.

    Like ``RedisService.call``, a reply comes on a later turn of the reactor
    (here ``clock.advance(0)``), and when Redis is ``down`` the call fails at
    once.  After ``hold()``, replies wait in ``held`` until ``release()`` or
    ``fail()``.
    """

    def __init__(self, clock):
        self.clock = clock
        self.hashes: dict[str, dict[str, str]] = {}
        self.sets: dict[str, set[str]] = {}
        self.calls: list[tuple] = []
        self.held: list[tuple[defer.Deferred, object]] | None = None
        self.down = False

    def call(self, command, *args):
        """Run one command; a Deferred firing with its reply, as RedisService.call."""
        self.calls.append((command, *args))
        if self.down:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        reply = getattr(self, "_" + command.lower())(*args)
        d = defer.Deferred()
        if self.held is None:
            self.clock.callLater(0, d.callback, reply)
        else:
            self.held.append((d, reply))
        return d

    def count(self, command):
        """How many times ``command`` was called."""
        return sum(1 for call in self.calls if call[0] == command)

    def hold(self):
        """From now on, keep replies until release() or fail()."""
        self.held = []

    def release(self):
        """Deliver the held replies and answer normally again."""
        held, self.held = self.held, None
        for d, reply in held:
            d.callback(reply)

    def fail(self, error):
        """Fail the held calls with ``error`` and answer normally again."""
        held, self.held = self.held, None
        for d, _ in held:
            d.errback(error)

    def _hset(self, key, *pairs):
        fields = self.hashes.setdefault(key, {})
        added = sum(1 for name in pairs[::2] if name not in fields)
        fields.update(zip(pairs[::2], pairs[1::2]))
        return added

    def _hgetall(self, key):
        # Redis answers with a flat list of field, value, field, value...
        return [item for pair in self.hashes.get(key, {}).items() for item in pair]

    def _sadd(self, key, *members):
        members_now = self.sets.setdefault(key, set())
        added = len(set(members) - members_now)
        members_now.update(members)
        return added

    def _smembers(self, key):
        return list(self.sets.get(key, set()))

    def _publish(self, channel, message):
        return 0  # subscribers receive nothing here
