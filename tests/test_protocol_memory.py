"""The SDK and dashboard sockets in memory: no server, no Redis, time on a clock.

Real factories and protocols (``SdkFactory``, ``DashboardFactory``) and a
real Autobahn client meet over in-memory transports
(``autobahn.twisted.testing.create_memory_agent``, flushed by hand); the
key verifier, the stream producer and the live sessions are fakes that
record what they were asked and answer when the test says.  What needs
real servers (storage, pub/sub, shutdown) stays in the end-to-end suites.
"""

import json

import txaio
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from bklit.config import load_config
from bklit.dashboard import DashboardFactory, Dashboards
from bklit.ingest import Ingest
from bklit.ops import unpack
from bklit.redis_client import RedisUnavailable
from bklit.gate import MAX_WAITING
from bklit.sdk import SdkFactory
from bklit.limits import Admission
from bklit.metrics import Metrics
from bklit.revocation import OpenKeys
from bklit.tokens import Token, Verdict, key_digest
from harness import SESSION, sdk_pageview

KEY = "bk_" + "k" * 40
OTHER_KEY = "bk_" + "o" * 40


def token(key, scope="ingest"):
    return Token(key_digest(key), ("p1",), scope, (), 0, "", 0, False)


class FakeVerifier:
    """Holds each key check until the test answers it."""

    def __init__(self):
        self.checks = []

    def verify(self, key, project_id, scope, origin=None):
        d = defer.Deferred()
        self.checks.append((key, project_id, scope, d))
        return d

    def answer(self, ok=True, reason="invalid API key"):
        key, _, scope, d = self.checks.pop(0)
        d.callback(Verdict(True, token=token(key, scope)) if ok else Verdict(False, reason))

    def fail(self):
        self.checks.pop(0)[3].errback(ConnectionError("Redis is not connected"))


class FakeProducer:
    """Records what would go to Redis and answers at once (or refuses, when told)."""

    def __init__(self):
        self.entries = []
        self.down = False

    def submit(self, op, receipt):
        """As ``StreamProducer.submit``: the receipt gets the reply Redis would give, or why not."""
        code, entry, *_ = unpack(op)
        self.entries.append(json.loads(entry))
        if self.down:
            receipt.errback(RedisUnavailable("Redis is down"))
        else:
            receipt.callback(["1-0", 0] if code == "P" else "1-0")


class FakeSessions:
    """Live sessions without Redis: joins, leaves, and a fixed snapshot."""

    def __init__(self):
        self.attached, self.detached = [], []

    def attach(self, project, session):
        self.attached.append((project, session))

    def detach(self, project, session, socket):
        self.detached.append((project, session))
        return defer.succeed(True)

    async def snapshot(self, project):
        return 1, [{"sessionId": SESSION}]


class FakeBroadcaster:
    def __init__(self):
        self.dashboards = set()

    def add(self, dashboard):
        self.dashboards.add(dashboard)

    def remove(self, dashboard):
        self.dashboards.discard(dashboard)


class Client(WebSocketClientProtocol):
    """Records every message and the close."""

    def __init__(self):
        super().__init__()
        self.received = []
        self.close_code = None
        self.close_reason = None

    def onMessage(self, payload, isBinary):
        self.received.append(json.loads(payload))

    def onClose(self, wasClean, code, reason):
        self.close_code, self.close_reason = code, reason

    def send(self, message):
        self.sendMessage(json.dumps(message).encode())

    def types(self):
        return [m["type"] for m in self.received]


class Pumps:
    """What ``create_memory_agent`` hands its connections to; ``flush`` moves every byte."""

    def __init__(self):
        self.pumps = []

    def add(self, pump):
        self.pumps.append(pump)

    def flush(self):
        for pump in self.pumps:
            pump.flush()


class MemoryCase(SynchronousTestCase):
    """A node's parts around fakes, on a ``MemoryReactorClock``."""

    settings: dict = {}

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1_000_000)
        # Autobahn's timers (handshake, close, pings) run on txaio's loop: the clock too.
        loop, txaio.config.loop = txaio.config.loop, self.clock
        self.addCleanup(setattr, txaio.config, "loop", loop)
        self.config = load_config(None, {f"BKLIT_{k.upper()}": v for k, v in self.settings.items()}, {})
        self.metrics = Metrics()
        self.verifier = FakeVerifier()
        self.producer = FakeProducer()
        self.sessions = FakeSessions()
        self.admission = Admission(self.clock, max_total=100, max_per_client=100, max_auth_failures=3,
                                   failure_window=60, lockout=60)
        self.open_keys = OpenKeys(self.verifier, self.clock)
        self.pumps = Pumps()
        self.agent = create_memory_agent(self.clock, self.pumps, self.server_protocol)

    def server_protocol(self):
        raise NotImplementedError

    def connect(self, path, headers=None):
        """A client on ``path``: its protocol once open, or the failure of the handshake."""
        d = self.agent.open(f"ws://localhost:8080{path}", {"headers": headers or {}}, protocol_class=Client)
        self.pumps.flush()
        return d

    def open(self, path, headers=None):
        client = self.successResultOf(self.connect(path, headers))
        assert client.received[0]["type"] == "connected"
        return client

    def send(self, client, *messages):
        for message in messages:
            client.send(message)
        self.pumps.flush()

    def later(self, seconds):
        self.clock.advance(seconds)
        self.pumps.flush()


class SdkSocketTests(MemoryCase):
    """The SDK socket's auth gate, waiting messages, timeout, limits and ids."""

    settings = {"rate_limit": "1", "rate_burst": "20", "frame_rate_before_auth": "1",
                "frame_burst_before_auth": "10", "auth_timeout": "10"}

    def setUp(self):
        super().setUp()
        self.ingest = Ingest(self.config, self.verifier, self.producer, self.sessions, self.clock, "node-1",
                             self.metrics, self.admission, self.open_keys)
        self.factory = SdkFactory(self.ingest)

    def server_protocol(self):
        return self.factory.buildProtocol(None)

    def sdk(self, session=SESSION):
        return self.open(f"/?projectId=p1&sessionId={session}")

    def server(self):
        [server] = self.ingest.connections
        return server

    def test_the_gate_goes_new_checking_open(self):
        client = self.sdk()
        assert client.received[0] == {"type": "connected", "projectId": "p1", "sessionId": SESSION,
                                      "timestamp": client.received[0]["timestamp"]}
        assert self.server().gate == "new"
        self.send(client, {"type": "auth", "apiKey": KEY})
        assert self.server().gate == "checking" and client.types() == ["connected"]
        assert [(k, p, s) for k, p, s, _ in self.verifier.checks] == [(KEY, "p1", "ingest")]
        self.verifier.answer()
        self.pumps.flush()
        assert self.server().gate == "open"
        assert client.types() == ["connected", "auth_success"]
        self.send(client, {"type": "auth", "apiKey": KEY})  # the same key again: not looked up
        assert self.verifier.checks == [] and client.types()[-1] == "auth_success"

    def test_messages_sent_while_the_key_is_checked_wait_and_go_in_order(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY}, sdk_pageview("p1"), sdk_pageview("p1", url="https://example.com/2"))
        assert client.types() == ["connected"] and self.producer.entries == []
        assert len(self.server().waiting) == 3
        self.verifier.answer()
        self.pumps.flush()
        assert client.types() == ["connected", "auth_success", "ack", "ack"]
        assert [e["row"]["url"] for e in self.producer.entries] == [sdk_pageview("p1")["data"]["url"],
                                                                     "https://example.com/2"]
        assert self.sessions.attached == [("p1", SESSION)]

    def test_too_many_waiting_messages_are_refused(self):
        client = self.sdk()
        for bucket in (self.server().bucket, self.server().frame_bucket):  # the count alone is tested here
            bucket.burst = bucket.tokens = MAX_WAITING + 10
        self.send(client, {"type": "auth", "apiKey": KEY}, *[sdk_pageview("p1")] * MAX_WAITING)
        assert client.received[-1]["code"] == "rate_limited"
        assert len(self.server().waiting) == MAX_WAITING

    def test_a_message_before_any_key_is_refused_with_1008(self):
        client = self.sdk()
        self.send(client, sdk_pageview("p1"))
        assert client.received[-1] == {"type": "error", "code": "unauthorized",
                                       "message": "An API key is required: send auth first"}
        assert client.close_code == 1008
        assert self.ingest.connections == set()

    def test_a_bad_key_is_refused_and_counted_toward_the_lockout(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY}, sdk_pageview("p1"))
        self.verifier.answer(ok=False, reason="API key revoked")
        self.pumps.flush()
        assert client.received[-1] == {"type": "error", "code": "unauthorized", "message": "API key revoked"}
        assert client.close_code == 1008
        assert self.producer.entries == []  # what waited behind the bad key is dropped
        for _ in range(2):  # max_auth_failures 3: the third locks the address out
            self.send(self.sdk(), {"type": "auth", "apiKey": OTHER_KEY})
            self.verifier.answer(ok=False)
        self.pumps.flush()
        self.connect(f"/?projectId=p1&sessionId={SESSION}")  # denied in the handshake (429)
        assert self.pumps.pumps[-1].serverIO.disconnected
        assert self.metrics.messages.labels("connect", "denied")._value.get() == 1
        assert self.ingest.connections == set()

    def test_a_key_that_cannot_be_checked_closes_1001_to_try_again(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY})
        self.verifier.fail()
        self.pumps.flush()
        self.flushLoggedErrors()
        assert client.received[-1]["code"] == "overloaded"
        assert client.close_code == 1001

    def test_no_key_within_auth_timeout_closes_1008(self):
        client = self.sdk()
        self.later(9.9)
        assert client.close_code is None
        self.later(0.1)
        assert client.received[-1] == {"type": "error", "code": "unauthorized", "message": "No API key within 10 s"}
        assert client.close_code == 1008

    def test_an_open_socket_has_no_auth_timeout(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY})
        self.verifier.answer()
        self.later(60)
        assert client.close_code is None

    def test_messages_over_the_rate_are_dropped_with_rate_limited(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY})
        self.verifier.answer()
        self.pumps.flush()
        self.server().bucket.tokens = 2
        self.send(client, *[sdk_pageview("p1")] * 3)
        assert client.types()[-3:] == ["ack", "ack", "error"]
        assert client.received[-1]["code"] == "rate_limited"
        assert len(self.producer.entries) == 2
        self.later(1)  # one more a second
        self.send(client, sdk_pageview("p1"))
        assert client.types()[-1] == "ack"

    def test_frames_over_the_budget_before_auth_close_1008(self):
        client = self.sdk()
        for _ in range(11):  # burst 10
            client.sendPing()
        self.pumps.flush()
        assert client.close_code == 1008
        assert self.metrics.frame_budget_closes.labels("sdk")._value.get() == 1

    def test_the_budget_widens_once_authenticated(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY})
        self.verifier.answer()
        for _ in range(15):  # more than the 10 before auth, within the 20 messages of rate_burst
            client.sendPing()
        self.pumps.flush()
        assert client.close_code is None

    def test_bad_ids_close_1008_with_the_reason(self):
        for path, reason in [("/?sessionId=" + SESSION, "Missing projectId"),
                             ("/?projectId=p%201&sessionId=" + SESSION, "Invalid projectId"),
                             ("/?projectId=p1", "Missing sessionId"),
                             ("/?projectId=p1&sessionId=not%20an%20id", "Invalid sessionId")]:
            client = self.successResultOf(self.connect(path))
            assert client.close_code == 1008, path
            assert client.close_reason == reason
            assert client.received == []
        assert self.ingest.connections == set() and self.verifier.checks == []

    def test_a_socket_that_closes_leaves_its_session(self):
        client = self.sdk()
        self.send(client, {"type": "auth", "apiKey": KEY}, sdk_pageview("p1"))
        self.verifier.answer()
        self.pumps.flush()
        client.sendClose()
        self.pumps.flush()
        assert client.close_code == 1000
        assert self.sessions.detached == [("p1", SESSION)]
        assert self.ingest.connections == set()


class DashboardSocketTests(MemoryCase):
    """The dashboard socket's auth: Bearer, first message, origin, timeout, bad ids."""

    settings = {"dashboard_auth_timeout": "5"}

    def setUp(self):
        super().setUp()
        self.dash = Dashboards(self.verifier, self.sessions, self.clock, origins=(("p1", "https://ok.example"),),
                               auth_timeout=5, max_skipped=10, metrics=self.metrics, admission=self.admission,
                               trusted_proxies=(), frame_limits=Ingest(
                                   self.config, self.verifier, self.producer, self.sessions, self.clock, "n",
                                   self.metrics, self.admission, self.open_keys).frame_limits,
                               open_keys=self.open_keys)
        self.dash.broadcaster = FakeBroadcaster()
        self.factory = DashboardFactory(self.dash, self.config)

    def server_protocol(self):
        return self.factory.buildProtocol(None)

    def test_a_bearer_read_key_gets_the_snapshot(self):
        client = self.open("/dashboard?projectId=p1", {"Authorization": f"Bearer {KEY}"})
        assert [(k, s) for k, _, s, _ in self.verifier.checks] == [(KEY, "read")]
        self.verifier.answer()
        self.pumps.flush()
        assert client.types() == ["connected", "snapshot"]
        assert client.received[1]["data"] == {"live": 1, "sessions": [{"sessionId": SESSION}]}
        assert len(self.dash.broadcaster.dashboards) == 1

    def test_an_auth_message_authorizes(self):
        client = self.open("/dashboard?projectId=p1")
        self.send(client, {"type": "auth", "apiKey": KEY})
        self.verifier.answer()
        self.pumps.flush()
        assert client.types() == ["connected", "snapshot"]

    def test_a_listed_origin_needs_no_key(self):
        client = self.open("/dashboard?projectId=p1", {"Origin": "https://ok.example"})
        assert self.verifier.checks == []
        assert client.types() == ["connected", "snapshot"]

    def test_anything_but_auth_first_is_refused(self):
        client = self.open("/dashboard?projectId=p1")
        self.send(client, {"type": "hello"})
        assert client.received[-1] == {"type": "error", "code": "unauthorized", "message": "Expected auth with a read key"}
        assert client.close_code == 1008

    def test_a_bad_key_is_refused(self):
        client = self.open("/dashboard?projectId=p1", {"Authorization": f"Bearer {KEY}"})
        self.verifier.answer(ok=False, reason="API key expired")
        self.pumps.flush()
        assert client.received[-1]["message"] == "API key expired"
        assert client.close_code == 1008
        assert self.dash.broadcaster.dashboards == set()

    def test_no_auth_in_time_closes_1008(self):
        client = self.open("/dashboard?projectId=p1")
        self.later(4.9)
        assert client.close_code is None
        self.later(0.1)
        assert client.received[-1]["message"] == "No auth in time"
        assert client.close_code == 1008

    def test_bad_project_ids_close_1008(self):
        for path, reason in [("/dashboard", "Missing projectId"), ("/dashboard?projectId=p%201", "Invalid projectId")]:
            client = self.successResultOf(self.connect(path))
            self.pumps.flush()
            assert (client.close_code, client.close_reason) == (1008, reason)
