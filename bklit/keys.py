"""Every Redis key and pub/sub channel name bklit uses, and nothing else.

Client-chosen ids (project, session) may only ever come last in a name, and
every kind of key has a prefix of its own, so no id a client picks can make
a key of one kind equal a key of another kind.  Project ids cannot contain
``:`` (``wire.valid_project_id``), so in ``<prefix><project>:<session>`` the
first ``:`` after the prefix ends the project id; session ids may contain
``:`` and ``.``, and as the last part they cannot reach past their key.

``batch.lua`` gets its prefixes from here too (``SCRIPT_KEYS`` and
``SCRIPT_PREFIXES``, in the order the script reads them), so Python and Lua
cannot drift apart.

Layout 2 (this one) replaced ``bklit:session:<p>:<s>`` and
``bklit:session:<p>:<s>:sockets``, which overlapped (session ``S:sockets``'s
state was session ``S``'s socket set).  ``LEGACY_STATE_PREFIX`` names the old
state hash so that the script can carry a session that was live at the
upgrade over to the new layout on its first touch; the old keys expire by
themselves within the resume window.
"""

from __future__ import annotations

STREAM = "bklit:events"  # every accepted event, field e = JSON record
DEAD_STREAM = "bklit:events:dead"  # records ClickHouse (or a spool replay) refused, with the error
GROUP = "bklit-writers"  # the writers' consumer group on STREAM
LIVE_PROJECTS = "bklit:projects:live"  # set: projects that have live sessions (the sweeper reads it)
SWEEP_LOCK = "bklit:sweeper"  # string: the node that sweeps now
TOKEN_INDEX = "bklit:tokens"  # set: the SHA-256 of every stored token

# The original product's name: its tools read ZCARD of it.
LIVE_SESSIONS_PREFIX = "live:sessions:"  # zset per project: live sessions of people, score = last heartbeat (ms)
LIVE_BOTS_PREFIX = "bklit:live-bots:"  # zset per project: live sessions of bots (bot_policy = mark)
STATE_PREFIX = "bklit:session-state:"  # hash per session: its state, kept for resuming
SOCKETS_PREFIX = "bklit:session-sockets:"  # set per session: the sockets that joined it
LEGACY_STATE_PREFIX = "bklit:session:"  # layout 1's state hash, read once to carry a session over
TOKEN_PREFIX = "bklit:token:"  # hash per token, by SHA-256
APPLIED_PREFIX = "bklit:applied:"  # string per spool: the number of the last batch Redis applied

LIVE_CHANNEL_PREFIX = "bklit:live:"  # pub/sub per project: live events for dashboards
REVOKED_CHANNEL = "bklit:tokens:revoked"  # pub/sub: SHA-256 of a key just revoked

# batch.lua's KEYS and the prefixes after its first argument, in the order it reads them.
SCRIPT_KEYS = (STREAM, LIVE_PROJECTS)
SCRIPT_PREFIXES = (STATE_PREFIX, SOCKETS_PREFIX, LIVE_SESSIONS_PREFIX, LIVE_BOTS_PREFIX,
                   LEGACY_STATE_PREFIX)


def live_sessions(project: str) -> str:
    """The zset of a project's live sessions of people (score: last heartbeat, ms)."""
    return LIVE_SESSIONS_PREFIX + project


def live_bots(project: str) -> str:
    """The zset of a project's live sessions of bots."""
    return LIVE_BOTS_PREFIX + project


def session_state(project: str, session: str) -> str:
    """The hash holding a session's state, kept for resuming."""
    return f"{STATE_PREFIX}{project}:{session}"


def session_sockets(project: str, session: str) -> str:
    """The set of sockets (``node:n``) that joined a session."""
    return f"{SOCKETS_PREFIX}{project}:{session}"


def token(digest: str) -> str:
    """The hash of the token whose SHA-256 (hex) is ``digest``."""
    return TOKEN_PREFIX + digest


def applied(spool_id: str) -> str:
    """The number of the last batch from a spool's node that Redis applied."""
    return APPLIED_PREFIX + spool_id


def live_channel(project: str) -> str:
    """The pub/sub channel of a project's live events."""
    return LIVE_CHANNEL_PREFIX + project


def channel_project(channel: str) -> str | None:
    """The project whose live channel ``channel`` is, or None for any other channel."""
    if channel.startswith(LIVE_CHANNEL_PREFIX):
        return channel[len(LIVE_CHANNEL_PREFIX):]
    return None
