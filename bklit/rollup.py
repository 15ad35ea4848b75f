"""Exact numbers of a time range, added up from hours: what ``/api/stats`` answers.

Scanning a week of a busy project (a million pageviews) for distinct ids
and sessions takes seconds on a small ClickHouse, so the API does not: it
keeps, per project, the numbers of each past full hour (a ``Partial``),
computed once from the stored rows with the same exact queries, and reads
only the current hour from ClickHouse for each answer.  Every number is
such that hours add up exactly:

- pageviews and custom events, counted by id (``uniqExact``: a row stored
  twice by a retried insert counts once); an id has one timestamp, so one
  hour;
- visits (``tracked_session`` rows, their latest version under ``FINAL``),
  in the hour they started, with whether they ended, bounced (one page), how
  long they lasted (a count per length in seconds, so the median over any
  hours is exact), their country, user agent (browser and device) and the
  campaign of their landing page (``utm_`` parameters of ``entry_page``);
- referrers by entrances: pageviews of a landing page (``url =
  landing_page``, the SDK's first page of the tab's session) whose referrer
  is another site.

Rows keep coming for past hours: visits end, writers catch up after an
outage, spools are replayed, clients' clocks lag by up to a day, ClickHouse
merges away a duplicate.  So each kept hour remembers a signature of its
rows (count and sums of their receive times and versions, bots and all),
and ``HourCache.check`` (run every ``CHECK_EVERY`` seconds) computes the
hours again whose signature changed.  Kept numbers are thus at most that
old; the current hour is always read fresh.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.internet import defer

HOUR = 3600
TOP = 10
KEPT_HOURS = 7 * 24 + 1
IDLE = 600  # seconds: a project nobody asked about for this long is forgotten
CHECK_EVERY = 30.0
FOREVER = 2**32 - 1  # the last DateTime: the current hour has no end (clients' clocks run up to 5 min ahead)

_HOUR_OF = "intDiv(toUInt32({column}), 3600) * 3600"
_IN_RANGE = ("project_id = %(project)s AND {column} >= toDateTime(%(start)s) AND {column} < toDateTime(%(end)s)"
             " AND ({hour} IN %(hours)s OR %(all)s = 1)")


def _where(column: str) -> str:
    return _IN_RANGE.format(column=column, hour=_HOUR_OF.format(column=column))


_PAGEVIEW_HOUR = _HOUR_OF.format(column="timestamp")
_SESSION_HOUR = _HOUR_OF.format(column="started_at")

# Each row starts with its hour; a Partial per hour is made from them.  Only
# people: bots (is_bot = 1) are left out (a visit's latest row decides).
# (18.16's cutQueryStringAndFragment keeps a fragment when there is no query.)
PARTIAL_QUERIES = {
    # pageviews per page and, for entrances, the other site they came from ('' for none)
    "pageviews": f"SELECT {_PAGEVIEW_HOUR} AS hour, cutFragment(cutQueryString(url)) AS page,"
                 " if(referrer_hostname != '' AND referrer_type != 'internal' AND referrer_hostname != domain(url)"
                 " AND (url = landing_page OR landing_page = ''), referrer_hostname, '') AS entrance, uniqExact(id)"
                 f" FROM page_view_event WHERE {_where('timestamp')} AND is_bot = 0 GROUP BY hour, page, entrance",
    "events": f"SELECT {_PAGEVIEW_HOUR} AS hour, uniqExact(id) FROM tracked_event"
              f" WHERE {_where('timestamp')} AND is_bot = 0 GROUP BY hour",
    # visits by country, user agent and campaign, with the lengths of those that ended
    "visits": f"SELECT {_SESSION_HOUR} AS hour, country_code, any(country), user_agent,"
              " decodeURLComponent(extractURLParameter(entry_page, 'utm_source')) AS source,"
              " decodeURLComponent(extractURLParameter(entry_page, 'utm_medium')) AS medium,"
              " decodeURLComponent(extractURLParameter(entry_page, 'utm_campaign')) AS campaign,"
              " count(), countIf(ended_at IS NOT NULL), sumIf(did_bounce, ended_at IS NOT NULL),"
              " sumMap([duration], [toUInt64(ended_at IS NOT NULL)])"
              f" FROM tracked_session FINAL PREWHERE {_where('started_at')} WHERE is_bot = 0"
              " GROUP BY hour, country_code, user_agent, source, medium, campaign",
}

# What changes when any row of an hour comes, goes or gets a new version.
SIGNATURE_QUERY = (
    f"SELECT 'pageviews', {_PAGEVIEW_HOUR} AS hour, count(), sum(toUInt64(received_at)) FROM page_view_event"
    f" WHERE {_where('timestamp')} GROUP BY hour"
    f" UNION ALL SELECT 'events', {_PAGEVIEW_HOUR} AS hour, count(), sum(toUInt64(received_at)) FROM tracked_event"
    f" WHERE {_where('timestamp')} GROUP BY hour"
    f" UNION ALL SELECT 'visits', {_SESSION_HOUR} AS hour, count(), sum(version) FROM tracked_session"
    f" WHERE {_where('started_at')} GROUP BY hour"
)


def params(project: str, start: int, end: int, hours: list[int] | None = None) -> dict:
    """Query parameters for rows of ``project`` in [start, end), in ``hours`` only if given."""
    return {"project": project, "start": start, "end": end, "hours": tuple(hours or (0,)),
            "all": 0 if hours else 1}


@dataclass
class Partial:
    """The numbers of one hour (or of any span: they add up)."""

    pageviews: int = 0
    events: int = 0
    visits: int = 0
    ended: int = 0
    bounced: int = 0
    pages: Counter = field(default_factory=Counter)
    referrers: Counter = field(default_factory=Counter)
    durations: Counter = field(default_factory=Counter)  # seconds -> ended visits that long
    countries: Counter = field(default_factory=Counter)  # country code -> visits
    country_names: dict = field(default_factory=dict)
    agents: Counter = field(default_factory=Counter)  # user agent -> visits
    campaigns: Counter = field(default_factory=Counter)  # (source, medium, campaign) -> visits

    def add(self, other: "Partial") -> "Partial":
        """Add ``other`` into this one; returns it."""
        for name in ("pageviews", "events", "visits", "ended", "bounced"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("pages", "referrers", "durations", "countries", "agents", "campaigns"):
            getattr(self, name).update(getattr(other, name))
        for code, name in other.country_names.items():
            self.country_names[code] = self.country_names.get(code) or name
        return self

    def copy(self) -> "Partial":
        return Partial().add(self)


def partials(results: dict[str, list[tuple]]) -> dict[int, Partial]:
    """One Partial per hour from the rows of ``PARTIAL_QUERIES``."""
    hours: dict[int, Partial] = {}

    def at(hour: int) -> Partial:
        return hours.setdefault(hour, Partial())

    for hour, page, entrance, n in results["pageviews"]:
        part = at(hour)
        part.pageviews += n
        part.pages[page] += n
        if entrance:
            part.referrers[entrance] += n
    for hour, n in results["events"]:
        at(hour).events += n
    for hour, code, name, agent, source, medium, campaign, n, ended, bounced, (lengths, counts) in results["visits"]:
        part = at(hour)
        part.visits += n
        part.ended += ended
        part.bounced += bounced
        part.countries[code] += n
        part.country_names[code] = part.country_names.get(code) or name
        part.agents[agent] += n
        if source or medium or campaign:
            part.campaigns[(source, medium, campaign)] += n
        part.durations.update({seconds: count for seconds, count in zip(lengths, counts) if count})
    return hours


def signatures(rows: list[tuple]) -> dict[int, tuple]:
    """hour -> what its rows look like (see ``SIGNATURE_QUERY``); an hour without rows is absent."""
    found: dict[int, dict] = {}
    for table, hour, count, total in rows:
        found.setdefault(hour, {})[table] = (count, total)
    return {hour: tuple(sorted(tables.items())) for hour, tables in found.items()}


def median(durations: Counter) -> int | None:
    """The median as ClickHouse's ``quantileExact(0.5)`` gives it: the value at place n // 2 in order."""
    place = sum(durations.values()) // 2
    for seconds in sorted(durations):
        place -= durations[seconds]
        if place < 0:
            return seconds
    return None


def _top(counts: Counter, limit: int = TOP) -> list[tuple[Any, int]]:
    """The largest counts, ties in key order."""
    return sorted(((key, n) for key, n in counts.items() if n), key=lambda kv: (-kv[1], kv[0]))[:limit]


def answer(total: Partial, describe: Callable[[str], Any]) -> dict:
    """The ``/api/stats`` numbers of a span; ``describe(user_agent)`` gives browser and device_type."""
    browsers: Counter = Counter()
    devices: Counter = Counter()
    for agent, n in total.agents.items():
        described = describe(agent)
        browsers[described.browser] += n
        devices[described.device_type] += n
    return {
        "pageviews": total.pageviews,
        "events": total.events,
        "sessions": total.visits,
        "endedSessions": total.ended,
        "bounceRate": round(total.bounced / total.ended, 4) if total.ended else None,
        "medianSessionSeconds": median(total.durations),
        "topPages": [{"url": url, "pageviews": n} for url, n in _top(total.pages)],
        "referrers": [{"hostname": host, "sessions": n} for host, n in _top(total.referrers)],
        "campaigns": [{"source": s, "medium": m, "campaign": c, "sessions": n} for (s, m, c), n in _top(total.campaigns)],
        "countries": [{"countryCode": code, "country": total.country_names.get(code, ""), "sessions": n}
                      for code, n in _top(total.countries)],
        "browsers": [{"browser": name, "sessions": n} for name, n in _top(browsers)],
        "devices": [{"deviceType": name, "sessions": n} for name, n in _top(devices)],
    }


@dataclass
class _Project:
    hours: dict[int, tuple[tuple, Partial]] = field(default_factory=dict)  # hour -> (signature, numbers)
    used: float = 0.0
    lock: defer.DeferredLock = field(default_factory=defer.DeferredLock)
    computed: int = 0  # bumped whenever hours are computed: the sums below are then out of date
    sums: dict[tuple[int, int], tuple[int, Partial]] = field(default_factory=dict)  # (first, end) -> (computed, sum)


Select = Callable[[dict[str, str], dict], Awaitable[dict[str, list[tuple]]]]


class HourCache:
    """The Partials of past full hours, per project, kept while someone asks and checked for changes.

    ``select(queries, params)`` runs named queries (``Api.select``).
    """

    def __init__(self, select: Select, clock: Any):
        self.select = select
        self.clock = clock
        self.projects: dict[str, _Project] = {}

    async def span(self, project: str, first: int, end: int) -> Partial:
        """The numbers of the full hours [first, end) added up (a copy), computing the hours not kept yet."""
        state = self.projects.setdefault(project, _Project())
        state.used = self.clock.seconds()
        await state.lock.acquire()
        try:
            missing = [hour for hour in range(first, end, HOUR) if hour not in state.hours]
            if missing:
                await self._compute(project, state, missing)
            computed, total = state.sums.get((first, end), (None, None))
            if computed != state.computed:  # added up again only after a change (168 hours take a while)
                total = Partial()
                for hour in range(first, end, HOUR):
                    total.add(state.hours[hour][1])
                state.sums = {key: value for key, value in state.sums.items() if key[1] == end}
                state.sums[(first, end)] = (state.computed, total)
            return total.copy()
        finally:
            state.lock.release()

    async def _compute(self, project: str, state: _Project, hours: list[int]) -> None:
        """Compute ``hours`` from the rows, the signature first (a row that comes meanwhile changes it again)."""
        query = params(project, min(hours), max(hours) + HOUR, hours)
        marks = signatures((await self.select({"signature": SIGNATURE_QUERY}, query))["signature"])
        found = partials(await self.select(PARTIAL_QUERIES, query))
        for hour in hours:
            state.hours[hour] = (marks.get(hour, ()), found.get(hour, Partial()))
        state.computed += 1

    async def check(self) -> int:
        """Forget idle projects and old hours; compute again the hours whose rows changed. Returns how many."""
        now = self.clock.seconds()
        newest = int(now) - int(now) % HOUR
        changed = 0
        for project, state in list(self.projects.items()):
            if now - state.used > IDLE:
                del self.projects[project]
                continue
            await state.lock.acquire()
            try:
                for hour in [h for h in state.hours if h < newest - KEPT_HOURS * HOUR]:
                    del state.hours[hour]
                if not state.hours:
                    continue
                query = params(project, min(state.hours), newest)
                marks = signatures((await self.select({"signature": SIGNATURE_QUERY}, query))["signature"])
                stale = [hour for hour, (mark, _) in state.hours.items() if marks.get(hour, ()) != mark]
                if stale:
                    await self._compute(project, state, stale)
                    changed += len(stale)
            finally:
                state.lock.release()
        return changed
