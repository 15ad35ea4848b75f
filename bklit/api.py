"""The JSON API the live page reads, on the daemon's port under ``/api/``.

Every endpoint takes ``projectId`` and a read key as ``Authorization:
Bearer``, answers JSON, and is never cached:

- ``GET /api/stats?projectId=P&range=30m|24h|7d``: pageviews, sessions,
  custom events, bounce rate, median session length and the top pages,
  referrers, campaigns, countries, browsers and devices of the range, from
  ClickHouse (added up from hours: see ``bklit.rollup``);
- ``GET /api/timeseries?projectId=P``: pageviews per minute of the last 60
  minutes (the current one included), from ClickHouse;
- ``GET /api/sessions?projectId=P[&limit=N]``: the live sessions of people,
  most recently active first, with their current page, country, browser and
  device, from Redis (``/api/live``, the count alone, is ``bklit.web``'s).

Errors are JSON too, ``{"error": code, "message": text}``: 400
``bad_request`` for a bad parameter, 401 ``unauthorized`` for a missing,
unknown, revoked or expired key, 403 ``forbidden`` for a key that may not
read this project (an ingest key, or a key of other projects: as
``/api/live`` answers), 503 ``unavailable`` when Redis or ClickHouse does
not answer.

ClickHouse is asked with parameterised queries only (clickhouse-driver's
``%(name)s``), through a ``ClickHousePool`` of the API's own (``reader_url``:
short timeouts; the writer's pool belongs to the writer role and to
inserts), one client per thread, moving to the next of several hosts when
one does not answer.
Counts are exact and of people: rows with ``is_bot = 1`` are left out
(``bklit.rollup`` says how each number is counted).  The queries use only
functions of ClickHouse 18.16.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from bklit import agents, compat, keys, rollup, wire
from bklit.clickhouse import ClickHousePool
from bklit.clickhouse_urls import with_timeouts
from bklit.dashboard import bearer
from bklit.lifecycle import Periodic
from bklit.web import _json

RANGES = {"30m": 30 * 60, "24h": 24 * 3600, "7d": 7 * 86400}
MINUTES = 60
MAX_SESSIONS = 1000
THREADS = 2
# Seconds: a ClickHouse that does not answer makes a 503 soon, not a hung request.
CONNECT_TIMEOUT = 3
QUERY_TIMEOUT = 10

TIMESERIES_QUERY = ("SELECT intDiv(toUInt32(timestamp), 60) * 60 AS minute, uniqExact(id) FROM page_view_event"
                    " WHERE project_id = %(project)s AND timestamp >= toDateTime(%(since)s) AND is_bot = 0"
                    " GROUP BY minute ORDER BY minute")


def timeseries_answer(rows: list[tuple], start: int, minutes: int = MINUTES) -> list[dict]:
    """One ``{"minute": epoch seconds, "pageviews": n}`` per minute from ``start``, zeros included."""
    counts = dict(rows)
    return [{"minute": start + 60 * i, "pageviews": counts.get(start + 60 * i, 0)} for i in range(minutes)]


def reader_url(url: str) -> str:
    """``url`` with short connect and receive timeouts, unless it sets its own."""
    return with_timeouts(url, CONNECT_TIMEOUT, QUERY_TIMEOUT)


def thd_select(client: Any, query: str, params: dict) -> list[tuple]:
    """The rows of one read query, cut off after ``QUERY_TIMEOUT`` seconds on the server."""
    return client.execute(query, params, settings={"max_execution_time": QUERY_TIMEOUT})


class Unavailable(Exception):
    """Redis or ClickHouse did not answer; the message says which, for people."""


class Api(Service):
    """The API's state: the key verifier, Redis, and ClickHouse through ``clickhouse`` (see ``reader_url``)."""

    log = Logger()

    def __init__(self, clickhouse: ClickHousePool, verifier: Any, redis_call: Callable[..., defer.Deferred],
                 reactor: Any, lockout: Any = None):
        self.verifier = verifier
        self.lockout = lockout  # refused keys count toward the sockets' lockout (bklit.web.Lockout)
        self.redis_call = redis_call
        self.reactor = reactor
        self.clickhouse = clickhouse
        self.agents = agents.shared()
        self._clickhouse_failing = False
        self.hours = rollup.HourCache(self.select, reactor)
        self.checking = Periodic(rollup.CHECK_EVERY, self._check, reactor, now=False, name="API: checking the kept hours")

    def startService(self) -> None:
        super().startService()
        self.checking.startService()

    def _check(self) -> defer.Deferred:
        d = defer.ensureDeferred(self.hours.check())
        return d.addErrback(lambda f: f.trap(Unavailable))  # said once by select; the next round tries again

    def stopService(self) -> defer.Deferred:
        """Fires once a check in progress is over (it reads through the ClickHouse pool)."""
        super().stopService()
        return self.checking.stopService()

    def mount(self, api: Resource) -> None:
        """Put the endpoints under ``api`` (the ``/api/`` resource)."""
        api.putChild(b"stats", StatsPage(self))
        api.putChild(b"timeseries", TimeseriesPage(self))
        api.putChild(b"sessions", SessionsPage(self))

    async def access(self, key: str, project: str) -> tuple[int, str] | None:
        """None when ``key`` may read ``project``, else (401 or 403, why)."""
        if len(key) > 256:
            return 401, "invalid API key"
        token = await self.verifier.lookup(key)
        verdict = self.verifier.judge(token, project, "read", None)
        if verdict.ok:
            return None
        known = token is not None and not token.revoked and not token.expired(self.verifier.clock.seconds())
        return (403 if known else 401), verdict.reason

    async def select(self, queries: dict[str, str], params: dict) -> dict[str, list[tuple]]:
        """Run named queries at once in the pool; ``Unavailable`` when ClickHouse fails."""
        names = list(queries)
        waiting = [self.clickhouse.do(thd_select, queries[name], params) for name in names]
        outcomes = await defer.DeferredList(waiting, consumeErrors=True)
        failed = next((value for ok, value in outcomes if not ok), None)
        if failed is not None:
            if not self._clickhouse_failing:  # once per outage, not per request
                self.log.warn("API: ClickHouse query failed: {error}", error=_first_line(failed.value))
            self._clickhouse_failing = True
            raise Unavailable("ClickHouse is not answering; the live parts still work")
        if self._clickhouse_failing:
            self.log.info("API: ClickHouse answers again")
            self._clickhouse_failing = False
        return {name: value for name, (_, value) in zip(names, outcomes)}

    async def stats(self, project: str, range_name: str) -> dict:
        """The numbers since ``range_name`` ago: 30m to the second, 24h and 7d from the start of that hour.

        The hours before the current one are kept (``rollup.HourCache``),
        the rest is read now.
        """
        now = int(self.reactor.seconds())
        current = now - now % rollup.HOUR
        if range_name == "30m":
            since = start = now - RANGES[range_name]
            kept = defer.succeed(rollup.Partial())
        else:
            since, start = current - RANGES[range_name], current
            kept = defer.ensureDeferred(self.hours.span(project, since, current))
        fresh = defer.ensureDeferred(self.select(rollup.PARTIAL_QUERIES, rollup.params(project, start, rollup.FOREVER)))
        try:
            total, rows = await defer.gatherResults([kept, fresh], consumeErrors=True)
        except defer.FirstError as e:
            e.subFailure.raiseException()
        for part in rollup.partials(rows).values():
            total.add(part)
        return {"projectId": project, "range": range_name, "since": since, "until": now,
                **rollup.answer(total, self.agents.describe)}

    async def timeseries(self, project: str) -> dict:
        now = int(self.reactor.seconds())
        start = now - now % 60 - 60 * (MINUTES - 1)
        results = await self.select({"minutes": TIMESERIES_QUERY}, {"project": project, "since": start})
        return {"projectId": project, "start": start, "step": 60, "until": now,
                "points": timeseries_answer(results["minutes"], start)}

    async def live_sessions(self, project: str, limit: int) -> dict:
        """The project's live sessions of people from Redis, most recently active first."""
        call = self.redis_call
        read_at = int(self.reactor.seconds() * 1000)
        live = int(await call("ZCARD", keys.live_sessions(project)))
        flat = await call("ZREVRANGE", keys.live_sessions(project), "0", str(limit - 1), "WITHSCORES")
        ids, scores = flat[::2], flat[1::2]
        states = await defer.gatherResults([
            call("HMGET", keys.session_state(project, session), "started_at", "pageviews", "entry_page",
                 "exit_page", "user_agent", "country", "country_code", "city", "last_seen")
            for session in ids], consumeErrors=True)
        sessions = []
        for session, score, state in zip(ids, scores, states):
            started, pageviews, entry, current, agent, country, code, city, last_seen = state
            if started is None:  # ended and expired since the ZREVRANGE
                continue
            described = self.agents.describe(agent or "")
            sessions.append({
                "sessionId": session, "startedAt": int(started), "lastSeen": int(last_seen or float(score)),
                "pageviews": int(pageviews or 0), "entryPage": entry or "", "currentPage": current or "",
                "country": country or "", "countryCode": code or "", "city": city or "",
                "browser": described.browser, "os": described.os, "deviceType": described.device_type,
            })
        return {"projectId": project, "live": live, "readAt": read_at, "sessions": sessions}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


class BadRequest(Exception):
    """A parameter is missing or wrong; the message says which."""


class ApiPage(Resource):
    """One endpoint: checks the project, the parameters and the key, then answers with ``answer``."""

    isLeaf = True

    def __init__(self, api: Api):
        super().__init__()
        self.api = api

    def parameters(self, request: Any) -> dict:
        """This endpoint's parameters (``BadRequest`` when one is wrong)."""
        return {}

    async def answer(self, project: str, **parameters: Any) -> dict:
        raise NotImplementedError

    def render(self, request: Any) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _json(request, 405, {"error": "method_not_allowed", "message": "only GET (and HEAD) here"})
        return super().render(request)

    def render_GET(self, request: Any) -> Any:
        project = _argument(request, "projectId")
        try:
            if not wire.valid_project_id(project or ""):
                raise BadRequest("projectId is missing or invalid (1-64 of A-Z a-z 0-9 _ -)")
            parameters = self.parameters(request)
        except BadRequest as e:
            return _json(request, 400, {"error": "bad_request", "message": str(e)})
        lockout = self.api.lockout
        client = lockout.client(request) if lockout is not None else ""
        if lockout is not None and lockout.admission.locked_out(client):
            return _json(request, 429, {"error": "locked_out", "message": "too many refused keys; try again later"})
        key = bearer({"authorization": (request.getHeader(b"authorization") or b"").decode("latin-1")})
        if not key:
            return _unauthorized(request, "a read key is required (Authorization: Bearer)")
        d = defer.ensureDeferred(self._respond(request, project, key, parameters, client))
        d.addErrback(lambda f: self.api.log.failure("API: {path} failed", f, path=request.path)
                     or _finish(request, 503, {"error": "unavailable", "message": "cannot answer now"}))
        return NOT_DONE_YET

    async def _respond(self, request: Any, project: str, key: str, parameters: dict, client: str = "") -> None:
        try:
            refused = await self.api.access(key, project)
        except Exception:
            _finish(request, 503, {"error": "unavailable", "message": "cannot check the key now"})
            return
        if refused is not None:
            status, reason = refused
            if self.api.lockout is not None:
                self.api.lockout.admission.auth_failed(client)
            if status == 401:
                request.setHeader(b"www-authenticate", b"Bearer")
            _finish(request, status, {"error": "unauthorized" if status == 401 else "forbidden", "message": reason})
            return
        try:
            body = await self.answer(project, **parameters)
        except Unavailable as e:
            _finish(request, 503, {"error": "unavailable", "message": str(e)})
            return
        _finish(request, 200, body)


def _argument(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _unauthorized(request: Any, message: str) -> bytes:
    request.setHeader(b"www-authenticate", b"Bearer")
    return _json(request, 401, {"error": "unauthorized", "message": message})


def _finish(request: Any, status: int, body: dict) -> None:
    if compat.request_gone(request):
        return
    request.write(_json(request, status, body))
    request.finish()


class StatsPage(ApiPage):
    """``GET /api/stats?projectId=P&range=30m|24h|7d`` (range defaults to 24h)."""

    def parameters(self, request: Any) -> dict:
        range_name = _argument(request, "range")
        if range_name is None:
            range_name = "24h"
        if range_name not in RANGES:
            raise BadRequest(f"range must be one of {', '.join(RANGES)}")
        return {"range_name": range_name}

    async def answer(self, project: str, range_name: str) -> dict:
        return await self.api.stats(project, range_name)


class TimeseriesPage(ApiPage):
    """``GET /api/timeseries?projectId=P``: pageviews per minute, last 60 minutes."""

    async def answer(self, project: str) -> dict:
        return await self.api.timeseries(project)


class SessionsPage(ApiPage):
    """``GET /api/sessions?projectId=P&limit=N`` (1 to 1000, default 1000): live sessions, from Redis."""

    def parameters(self, request: Any) -> dict:
        text = _argument(request, "limit")
        if text is None:
            return {"limit": MAX_SESSIONS}
        if not text.isdigit() or not 1 <= int(text) <= MAX_SESSIONS:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_SESSIONS}")
        return {"limit": int(text)}

    async def answer(self, project: str, limit: int) -> dict:
        try:
            return await self.api.live_sessions(project, limit)
        except Exception as e:  # (a FirstError from the HMGETs too)
            raise Unavailable("Redis is not answering") from e
