"""batch.lua against a real Redis: key spaces that cannot overlap, and one bad operation failing alone.

The script runs here exactly as the producer runs it (``ops.script_args``
with the operations ``queue.*_op`` build), through a plain blocking
connection.  Each check is differential: a batch with some keys of the wrong
type planted by hand is compared with the same batch, less the operations
aimed at those keys, on a clean Redis.  Every other operation must have had
its full effect (same replies, same keys, same stream records, in order),
and the ones aimed at a planted key must be refused alone, leaving nothing.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bklit import keys
from bklit.entries import Visitor
from bklit.geo import NOWHERE
from bklit.ops import BATCH_SCRIPT, end_op, event_op, heartbeat_op, pageview_op, script_args, unpack
from bklit.wire import valid_project_id, valid_session_id

NOW = 4102444800000  # 2100-01-01: later than Redis's clock, so scores are the ones given
PROJECT_CHARS = "abcXYZ019_-"
SESSION_CHARS = "abcXYZ019_-.:"


def run(redis_server, ops):
    """One call of the batch script; its reply with bytes decoded."""
    reply = redis_server.execute("EVAL", BATCH_SCRIPT, len(keys.SCRIPT_KEYS), *keys.SCRIPT_KEYS,
                                 *script_args(1800000, ops))
    return _decoded(reply)


def _decoded(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def contents(redis_server, leave_out=()):
    """Every key's type and contents (stream records without their ids), but ``leave_out``."""
    names = sorted(k.decode() for k in redis_server.execute("KEYS", "*"))
    dump = {}
    for name in names:
        if name in leave_out:
            continue
        kind = redis_server.execute("TYPE", name)
        if kind == "hash":
            flat = _decoded(redis_server.execute("HGETALL", name))
            value = sorted(zip(flat[::2], flat[1::2]))
        elif kind == "set":
            value = sorted(_decoded(redis_server.execute("SMEMBERS", name)))
        elif kind == "zset":
            value = _decoded(redis_server.execute("ZRANGE", name, "0", "-1", "WITHSCORES"))
        elif kind == "stream":
            value = [fields for _, fields in _decoded(redis_server.execute("XRANGE", name, "-", "+"))]
        else:
            value = _decoded(redis_server.execute("GET", name))
        dump[name] = (kind, value)
    return dump


def without_ids(reply):
    """A reply with stream ids replaced, so two runs compare equal."""
    if isinstance(reply, list):
        return [without_ids(r) for r in reply]
    if isinstance(reply, str) and reply[:1].isdigit() and "-" in reply:
        return "<stream id>"
    return reply


def pageview(project, session, socket="n:1", url="https://example.com/"):
    entry = json.dumps({"table": "page_view_event", "row": {"session_id": session, "url": url}})
    return pageview_op(entry, Visitor.of(project, session, socket, "", NOWHERE), NOW, url, '{"isNewSession":', "}")


def event(project, session):
    return event_op(json.dumps({"table": "tracked_event", "row": {"session_id": session}}),
                    keys.live_channel(project), "{}")


def end(project, session, socket="n:1"):
    return end_op(project, session, socket, NOW + 1000, NOW + 1000, "disconnect", "{}")


def beat(project, session):
    return heartbeat_op(project, session, NOW + 500)


def typed_keys(op):
    """The keys an operation checks the type of (besides the stream and the projects set)."""
    op = unpack(op)
    code = op[0]
    if code in ("P", "X"):
        project, session = (op[5], op[6]) if code == "P" else (op[1], op[2])
        return {keys.session_state(project, session), keys.session_sockets(project, session),
                keys.live_sessions(project), keys.live_bots(project)}
    if code == "H":
        return {keys.live_sessions(op[1]), keys.live_bots(op[1])}
    return set()


def plant(redis_server, key, kind):
    """A key of ``kind`` put there by hand (instead of what was there)."""
    redis_server.execute("DEL", key)
    if kind == "string":
        redis_server.execute("SET", key, "planted")
    elif kind == "list":
        redis_server.execute("RPUSH", key, "planted")
    elif kind == "hash":
        redis_server.execute("HSET", key, "planted", "1")
    elif kind == "zset":
        redis_server.execute("ZADD", key, "1", "planted")


def compare(redis_server, setup, batch, planted):
    """Run ``batch`` after ``setup`` with ``planted`` keys, and without them (less the operations
    aimed at them) on a clean Redis; return the replies of the planted run."""
    poisoned = {key for key, _ in planted}
    aimed = [bool(typed_keys(op) & poisoned) or (keys.STREAM in poisoned and op[0] in "EPX") for op in batch]
    redis_server.execute("FLUSHALL")
    if setup:
        run(redis_server, setup)
    clean_replies = run(redis_server, [op for op, hit in zip(batch, aimed) if not hit])
    clean = contents(redis_server, leave_out=poisoned)
    redis_server.execute("FLUSHALL")
    if setup:
        run(redis_server, setup)
    for key, kind in planted:
        plant(redis_server, key, kind)
    replies = run(redis_server, batch)
    assert len(replies) == len(batch)
    expected = iter(clean_replies)
    for op, hit, reply in zip(batch, aimed, replies):
        if hit:
            assert isinstance(reply, str) and reply.startswith("!WRONGTYPE"), (op, reply)
        else:
            assert without_ids(reply) == without_ids(next(expected)), op
    assert contents(redis_server, leave_out=poisoned) == clean
    for key, kind in planted:  # untouched
        assert redis_server.execute("TYPE", key) == kind
    return replies


VICTIM = ("pv", "victim")
NEIGHBOURS = [pageview("p1", "n1"), event("p1", "n1"), pageview("p2", "n2", "n:2"), beat("p1", "n1"),
              end("p2", "n2", "n:2")]
SETUP = [pageview("p1", "n1"), pageview(*VICTIM, socket="n:9")]

CASES = {
    "pageview, state of the wrong type": ([pageview(*VICTIM)], [(keys.session_state(*VICTIM), "string")]),
    "pageview, socket set of the wrong type": ([pageview(*VICTIM)], [(keys.session_sockets(*VICTIM), "list")]),
    "pageview, live set of the wrong type": ([pageview(*VICTIM)], [(keys.live_sessions("pv"), "hash")]),
    "pageview, bots' live set of the wrong type": ([pageview(*VICTIM)], [(keys.live_bots("pv"), "string")]),
    "session end, state of the wrong type": ([end(*VICTIM, socket="n:9")], [(keys.session_state(*VICTIM), "list")]),
    "session end, socket set of the wrong type": ([end(*VICTIM, socket="n:9")],
                                                  [(keys.session_sockets(*VICTIM), "string")]),
    "heartbeat, live set of the wrong type": ([beat(*VICTIM)], [(keys.live_sessions("pv"), "string")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_operation_next_to_a_key_of_the_wrong_type_fails_alone(redis_server, redis_url, case):
    """The victim is refused with WRONGTYPE and changes nothing; each neighbour before and after it has
    its full effect."""
    victims, planted = CASES[case]
    batch = NEIGHBOURS[:2] + victims + NEIGHBOURS[2:]
    compare(redis_server, SETUP, batch, planted)


def test_events_fail_alone_when_the_stream_is_of_the_wrong_type(redis_server, redis_url):
    """With the stream itself planted, every operation writing to it is refused and heartbeats still apply."""
    replies = compare(redis_server, SETUP, [event("p1", "n1"), beat("p1", "n1"), pageview("p1", "n1")],
                      [(keys.STREAM, "string")])
    assert replies[1] == 0


def test_the_overlap_of_layout_1_cannot_happen(redis_server, redis_url):
    """Sessions ``S`` and ``S:sockets`` (once one key) each have their own state and sockets."""
    redis_server.execute("FLUSHALL")
    replies = run(redis_server, [pageview("p1", "S"), pageview("p1", "S:sockets", "n:2"), pageview("p1", "S")])
    assert [r[1] for r in replies] == [1, 1, 0]
    assert redis_server.execute("HGET", keys.session_state("p1", "S"), "pageviews") == b"2"
    assert redis_server.execute("HGET", keys.session_state("p1", "S:sockets"), "pageviews") == b"1"
    assert redis_server.execute("SMEMBERS", keys.session_sockets("p1", "S")) == [b"n:1"]


def test_a_session_live_at_the_upgrade_is_carried_over(redis_server, redis_url):
    """Layout 1's state hash becomes the new one on the first touch: the visit goes on, in its old row."""
    redis_server.execute("FLUSHALL")
    redis_server.execute("HSET", "bklit:session:p1:s1", "started_at", str(NOW - 60000), "pageviews", "3",
                         "entry_page", "https://example.com/a", "version", str(NOW - 60000))
    redis_server.execute("PEXPIRE", "bklit:session:p1:s1", "1800000")
    assert run(redis_server, [pageview("p1", "s1")])[0][1] == 0  # continued, not started
    assert redis_server.execute("EXISTS", "bklit:session:p1:s1") == 0
    assert redis_server.execute("HGET", keys.session_state("p1", "s1"), "pageviews") == b"4"
    run(redis_server, [end("p1", "s1")])
    records = [json.loads(fields[1]) for _, fields in _decoded(redis_server.execute("XRANGE", keys.STREAM, "-", "+"))]
    ended = [r["row"] for r in records if r["table"] == "tracked_session"]
    assert [(row["id"], row["started_ms"], row["pageviews"]) for row in ended] == [("s1", 0, 4)]


def test_a_session_that_comes_back_after_its_state_expired_is_a_new_visit(redis_server, redis_url):
    """Its rows get an id of their own (session and start), so the first visit's row is kept."""
    redis_server.execute("FLUSHALL")
    run(redis_server, [pageview("p1", "s1"), pageview("p1", "s1"), end("p1", "s1")])
    redis_server.execute("DEL", keys.session_state("p1", "s1"))  # as when it expires
    later = pageview_op("{}", Visitor.of("p1", "s1", "n:1", "", NOWHERE), NOW + 3_600_000, "https://example.com/b", "", "")
    run(redis_server, [later])
    records = [json.loads(fields[1]) for _, fields in _decoded(redis_server.execute("XRANGE", keys.STREAM, "-", "+"))]
    rows = [r["row"] for r in records if r.get("table") == "tracked_session"]
    assert [(row["id"], row["started_ms"], row["pageviews"]) for row in rows] == [
        (f"s1/{NOW}", NOW, 1), (f"s1/{NOW}", NOW, 2), (f"s1/{NOW + 3_600_000}", NOW + 3_600_000, 1)]


# Properties -------------------------------------------------------------------------------------

project_ids = st.text(PROJECT_CHARS, min_size=1, max_size=8) | st.sampled_from(["p", "p-1", "live", "bklit"])
session_ids = st.text(SESSION_CHARS, min_size=1, max_size=12) | st.sampled_from(
    ["S", "S:sockets", "sockets", ":", "a:b", "a.b", "p:S", "-"])


def test_a_project_whose_last_session_ended_is_listed_again_by_a_later_pageview_of_the_call(redis_server):
    """The projects set is written once per project and call: an end that empties it in between
    does not leave the project out while a session of it is live."""
    redis_server.execute("FLUSHALL")
    run(redis_server, [pageview("p1", "s1"), end("p1", "s1"), pageview("p1", "s2")])
    assert redis_server.execute("SMEMBERS", keys.LIVE_PROJECTS) == [b"p1"]
    assert redis_server.execute("ZRANGE", keys.live_sessions("p1"), "0", "-1") == [b"s2"]
    run(redis_server, [end("p1", "s2")])
    assert redis_server.execute("SMEMBERS", keys.LIVE_PROJECTS) == []


@given(st.lists(st.tuples(project_ids, session_ids), min_size=2, max_size=6, unique=True))
def test_no_two_ids_make_the_same_key(ids):
    """Over every kind of key of every (project, session), each key belongs to one kind and one id pair."""
    assert all(valid_project_id(p) and valid_session_id(s) for p, s in ids)
    owners = {}
    for p, s in ids:
        for kind, key in [("state", keys.session_state(p, s)), ("sockets", keys.session_sockets(p, s)),
                          ("live", keys.live_sessions(p)), ("bots", keys.live_bots(p)),
                          ("legacy", keys.LEGACY_STATE_PREFIX + p + ":" + s)]:
            owner = (kind, p) if kind in ("live", "bots") else (kind, p, s)
            assert owners.setdefault(key, owner) == owner, key
    fixed = {keys.STREAM, keys.DEAD_STREAM, keys.LIVE_PROJECTS, keys.SWEEP_LOCK, keys.TOKEN_INDEX}
    assert not fixed & set(owners)


def operations(sessions):
    """Random operations of a few sockets on ``sessions``."""
    def build(choice):
        kind, index, socket = choice
        project, session = sessions[index % len(sessions)]
        sock = f"n:{socket}"
        return {"P": lambda: pageview(project, session, sock), "E": lambda: event(project, session),
                "X": lambda: end(project, session, sock), "H": lambda: beat(project, session)}[kind]()
    return st.lists(st.tuples(st.sampled_from("PPPEXH"), st.integers(0, 5), st.integers(1, 3)).map(build),
                    min_size=1, max_size=25)


@st.composite
def poisoned_batches(draw):
    sessions = draw(st.lists(st.tuples(project_ids, session_ids), min_size=1, max_size=4, unique=True))
    batch = draw(operations(sessions))
    targets = sorted({key for op in batch for key in typed_keys(op)})
    planted = draw(st.lists(st.tuples(st.sampled_from(targets), st.sampled_from(["string", "list", "hash"])),
                            max_size=3, unique_by=lambda t: t[0])) if targets else []
    planted = [(key, kind) for key, kind in planted
               if not (kind == "hash" and key.startswith(keys.STATE_PREFIX))]  # a hash there is right
    return batch, planted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(poisoned_batches())
def test_every_operation_not_aimed_at_a_planted_key_has_its_full_effect(redis_server, redis_url, case):
    """Random mixes of pageviews, events, ends and heartbeats of several sockets with hostile ids."""
    batch, planted = case
    compare(redis_server, [], batch, planted)
