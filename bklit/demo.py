"""``bklit demo``: simulated visitors, to fill a project's live page.

Plays ``--visitors`` visitors at a time for ``--minutes`` against a running
server, through its SDK endpoint and in the SDK's own wire protocol: each
visit opens ``/?projectId=P&sessionId=<ms>-<base36>``, sends ``auth`` and a
``pageview`` shaped as ``@bklit/sdk`` 1.0.1 sends it, then browses for a
while: more pageviews on the same socket (``history.pushState``), full page
loads (the socket closes and a new one opens with the same session id, the
previous page as its referrer), custom events (``trackEvent``); then the
visitor leaves (the socket closes, the session ends).

Visitors come from search engines, social sites, links and campaigns
(``utm_`` parameters in the landing page's URL), with the user agents and
screens of common desktop, phone and tablet browsers.  Each socket's upgrade
says ``X-Forwarded-For`` with a public address of one of several countries:
a server believes that only from its ``trusted_proxies`` (``make run``
trusts loopback), so there the visitors get countries; elsewhere the header
is ignored and they have the connection's own address.
"""

from __future__ import annotations

import json
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS

from bklit.probe import ProbeFailed, _expect, _ProbeClient
from bklit.wire import iso_timestamp

SITE = "https://www.example.com"
TIMEOUT = 10.0
REPORT_EVERY = 10.0

# (path, weight): where visits land and go next
PAGES = [("/", 30), ("/pricing", 14), ("/features", 10), ("/docs", 10), ("/docs/getting-started", 8),
         ("/docs/api", 5), ("/blog", 8), ("/blog/privacy-first-analytics", 6), ("/blog/websockets-at-scale", 4),
         ("/about", 3), ("/contact", 2), ("/signup", 5)]

# (referrer, the SDK's referrerType, weight); None: typed in or bookmarked
REFERRERS = [(None, "direct", 30), ("https://www.google.com/", "organic", 30), ("https://duckduckgo.com/", "organic", 6),
             ("https://www.bing.com/", "organic", 4), ("https://news.ycombinator.com/item?id=41", "referral", 6),
             ("https://www.reddit.com/r/privacy/", "social", 6), ("https://www.linkedin.com/feed/", "social", 4),
             ("https://github.com/bklit", "referral", 4)]

# (utm_source, utm_medium, utm_campaign, weight) of the landing page; None: no campaign
CAMPAIGNS = [(None, None, None, 80), ("newsletter", "email", "spring-launch", 8), ("twitter", "social", "launch-week", 6),
             ("google", "cpc", "analytics-privacy", 6)]

# (user agent, screen, viewport, weight)
AGENTS = [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
     (1920, 1080), (1903, 961), 30),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
     (1512, 982), (1512, 862), 12),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", (2560, 1440), (2543, 1289), 8),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 "
     "Edg/131.0.0.0", (1366, 768), (1349, 649), 8),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
     "Mobile/15E148 Safari/604.1", (393, 852), (393, 659), 20),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile "
     "Safari/537.36", (412, 915), (412, 791), 16),
    ("Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 "
     "Mobile/15E148 Safari/604.1", (820, 1180), (820, 1106), 6),
]

# (a public address the shipped registry data places in the country, language, time zone, weight)
PLACES = [("8.8.8.8", "en-US", "America/New_York", 30), ("85.214.132.117", "de-DE", "Europe/Berlin", 14),
          ("81.2.69.142", "en-GB", "Europe/London", 12), ("95.142.160.1", "fr-FR", "Europe/Paris", 10),
          ("193.0.6.139", "nl-NL", "Europe/Amsterdam", 8), ("133.242.0.3", "ja-JP", "Asia/Tokyo", 8),
          ("177.67.80.1", "pt-BR", "America/Sao_Paulo", 7), ("202.12.29.205", "en-AU", "Australia/Sydney", 6),
          ("196.216.2.1", "en-ZA", "Africa/Johannesburg", 3), ("200.3.14.10", "es-UY", "America/Montevideo", 2)]

# (trackingId, eventType, metadata, the page it happens on or None for any)
EVENTS = [("cta-button", "click", {"position": "hero"}, "/"), ("signup-form", "submit", {"plan": "team"}, "/signup"),
          ("pricing-toggle", "click", {"period": "yearly"}, "/pricing"),
          ("video", "play", {"video": "product-tour"}, "/features"), ("copy-snippet", "click", {"lang": "js"}, None)]


def pick(rng: random.Random, options: list[tuple]) -> tuple:
    """One option, by the weight in its last place (the weight dropped)."""
    chosen = rng.choices(options, weights=[option[-1] for option in options])[0]
    return chosen[:-1]


def session_id(rng: random.Random, now: float) -> str:
    """An id as the SDK makes them: ``<ms>-<base36>``."""
    alphabet = string.digits + string.ascii_lowercase
    return f"{int(now * 1000)}-{''.join(rng.choice(alphabet) for _ in range(11))}"


@dataclass
class Tally:
    """What the demo did: pageviews and events count those the server acked."""

    visits: int = 0
    pageviews: int = 0
    events: int = 0
    page_loads: int = 0
    sockets: int = 0
    failures: int = 0


class KeyRefused(Exception):
    """The server refused the key: nothing would be stored."""


@dataclass
class Visit:
    """One simulated visitor's tab: the browser it is and where it came from."""

    session: str
    agent: str
    screen: tuple[int, int]
    viewport: tuple[int, int]
    address: str
    language: str
    timezone: str
    referrer: str | None
    referrer_type: str
    landing: str
    new_visitor: bool


class Player:
    """Plays visits, ``visitors`` at a time, until ``seconds`` have passed.

    ``speed`` divides the time visitors spend on a page (tests play faster).
    """

    def __init__(self, reactor: Any, url: str, project: str, key: str, visitors: int, seconds: float,
                 rng: random.Random | None = None, out: Any = None, speed: float = 1.0):
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("--url must be ws://host:port or wss://host:port")
        self.reactor = reactor
        self.parts = parts
        self.project = project
        self.key = key
        self.visitors = visitors
        self.seconds = seconds
        self.rng = rng or random.Random()
        self.speed = speed
        self.out = out if out is not None else sys.stderr
        self.tally = Tally()
        self.live = 0
        self.deadline = 0.0
        self.refused: str | None = None
        self.problems: set[str] = set()

    def ending(self) -> bool:
        return self.refused is not None or self.reactor.seconds() >= self.deadline

    async def play(self) -> Tally:
        """Run every visitor until the time is up (``KeyRefused`` at once if the key is)."""
        self.deadline = self.reactor.seconds() + self.seconds
        reporter = task.LoopingCall(self.report)
        reporter.clock = self.reactor
        reporter.start(REPORT_EVERY, now=False)
        try:
            await defer.gatherResults([defer.ensureDeferred(self.visitor(n)) for n in range(self.visitors)],
                                      consumeErrors=True)
        finally:
            reporter.stop()
        if self.refused is not None:
            raise KeyRefused(self.refused)
        return self.tally

    def report(self) -> None:
        t = self.tally
        print(f"demo: {self.live} visitors on the site; so far {t.visits} visits, {t.pageviews} pageviews, "
              f"{t.events} events acked", file=self.out, flush=True)

    async def sleep(self, seconds: float) -> None:
        """Wait (``speed`` times less), but not past the deadline."""
        seconds = min(seconds / self.speed, max(0.0, self.deadline - self.reactor.seconds()))
        await task.deferLater(self.reactor, seconds, lambda: None)

    async def visitor(self, n: int) -> None:
        """One visitor after another in this slot, with pauses between them."""
        await self.sleep(self.rng.uniform(0, min(3.0, self.seconds / 4)))
        while not self.ending():
            try:
                await self.visit(self.new_visit())
            except KeyRefused as e:
                self.refused = str(e)
            except Exception as e:
                self.tally.failures += 1
                problem = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                if problem not in self.problems:  # each kind of trouble once
                    self.problems.add(problem)
                    print(f"demo: a visit failed: {problem}", file=self.out, flush=True)
                await self.sleep(2.0)
            await self.sleep(self.rng.uniform(0.5, 3.0))

    def new_visit(self) -> Visit:
        rng = self.rng
        agent, screen, viewport = pick(rng, AGENTS)
        address, language, timezone = pick(rng, PLACES)
        referrer, referrer_type = pick(rng, REFERRERS)
        source, medium, campaign = pick(rng, CAMPAIGNS)
        landing = SITE + pick(rng, PAGES)[0]
        if source:
            landing += "?" + urlencode({"utm_source": source, "utm_medium": medium, "utm_campaign": campaign})
        return Visit(session_id(rng, time.time()), agent, screen, viewport, address, language, timezone, referrer,
                     referrer_type, landing, rng.random() < 0.7)

    async def visit(self, visit: Visit) -> None:
        """Land, browse, leave: the session ends with the last socket's close."""
        rng = self.rng
        self.tally.visits += 1
        self.live += 1
        socket = None
        try:
            socket = await self.open(visit)
            url, referrer, referrer_type = visit.landing, visit.referrer, visit.referrer_type
            await self.pageview(socket, visit, url, referrer, referrer_type)
            for _ in range(rng.choices([0, 1, 2, 3, 5, 8], weights=[35, 20, 15, 12, 10, 8])[0]):
                await self.sleep(rng.lognormvariate(1.3, 0.6))  # about 4 s on a page, sometimes 10
                if self.ending():
                    break
                path = pick(rng, PAGES)[0]
                action = rng.choices(["push", "load", "event"], weights=[50, 30, 20])[0]
                if action == "event":
                    await self.event(socket, visit, url)
                elif action == "push":  # history.pushState: the document's referrer stays
                    url = SITE + path
                    await self.pageview(socket, visit, url, referrer, referrer_type)
                else:  # a link to another page: a new document, a new socket, the same session
                    await self.close(socket)
                    socket = None
                    self.tally.page_loads += 1
                    await self.sleep(rng.uniform(0.1, 0.6))
                    referrer, referrer_type, url = url, "internal", SITE + path
                    socket = await self.open(visit)
                    await self.pageview(socket, visit, url, referrer, referrer_type)
            await self.sleep(rng.lognormvariate(1.0, 0.6))
        finally:
            self.live -= 1
            if socket is not None:
                await self.close(socket)

    async def open(self, visit: Visit) -> Any:
        """A socket of the visit's tab, past ``auth_success``."""
        parts = self.parts
        secure = parts.scheme == "wss"
        query = urlencode({"projectId": self.project, "sessionId": visit.session})
        factory = WebSocketClientFactory(f"{parts.scheme}://{parts.netloc}{parts.path or '/'}?{query}",
                                         origin=SITE, useragent=visit.agent,
                                         headers={"X-Forwarded-For": visit.address})
        factory.protocol = _ProbeClient
        endpoint: Any = HostnameEndpoint(self.reactor, parts.hostname, parts.port or (443 if secure else 80),
                                         timeout=TIMEOUT)
        if secure:
            endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
        client = await endpoint.connect(factory).addTimeout(TIMEOUT, self.reactor)
        await client.opened.addTimeout(TIMEOUT, self.reactor)
        self.tally.sockets += 1
        await self.expect(client, "connected")
        self.send(client, {"type": "auth", "apiKey": self.key})
        await self.expect(client, "auth_success")
        return client

    async def expect(self, client: Any, kind: str) -> dict:
        try:
            return await _expect(client, kind, TIMEOUT, self.reactor)
        except ProbeFailed as e:
            if "unauthorized" in str(e):
                raise KeyRefused(str(e).split(": ", 1)[-1]) from None
            raise

    def send(self, client: Any, message: dict) -> None:
        client.sendMessage(json.dumps(message, separators=(",", ":")).encode())

    async def pageview(self, client: Any, visit: Visit, url: str, referrer: str | None, referrer_type: str) -> None:
        """What the SDK's trackPageView sends (the api key on the message too), then its ack."""
        host = urlsplit(referrer).hostname if referrer else None
        self.send(client, {"type": "pageview", "apiKey": self.key, "data": {
            "url": url, "timestamp": iso_timestamp(time.time()), "referrer": referrer, "referrerHostname": host,
            "referrerType": referrer_type, "userAgent": visit.agent,
            "viewport": {"width": visit.viewport[0], "height": visit.viewport[1]},
            "screen": {"width": visit.screen[0], "height": visit.screen[1]},
            "language": visit.language, "timezone": visit.timezone, "sessionId": visit.session,
            "projectId": self.project, "isNewVisitor": visit.new_visitor, "landingPage": visit.landing,
        }})
        visit.new_visitor = False
        await self.expect(client, "ack")
        self.tally.pageviews += 1

    async def event(self, client: Any, visit: Visit, url: str) -> None:
        """What ``window.bklit.trackEvent(trackingId, eventType, metadata)`` sends, then its ack."""
        path = urlsplit(url).path
        choices = [e for e in EVENTS if e[3] in (None, path)]
        tracking_id, event_type, metadata, _ = self.rng.choice(choices)
        self.send(client, {"type": "event", "apiKey": self.key, "data": {
            "trackingId": tracking_id, "eventType": event_type, "timestamp": iso_timestamp(time.time()),
            "metadata": {**metadata, "triggerMethod": "manual"}, "projectId": self.project,
            "sessionId": visit.session,
        }})
        await self.expect(client, "ack")
        self.tally.events += 1

    async def close(self, client: Any) -> None:
        """Close as a tab does, and wait for the server's close (or give up after the timeout)."""
        if client.state == client.STATE_CLOSED:
            return
        client.sendClose(1000)
        try:
            while (await client.inbox.get().addTimeout(TIMEOUT, self.reactor)).get("type") != "closed":
                pass
        except defer.TimeoutError:
            if client.transport is not None:
                client.transport.abortConnection()


def summary(tally: Tally, seconds: float) -> str:
    return (f"played {tally.visits} visits in {seconds:.0f} s: {tally.pageviews} pageviews "
            f"({tally.page_loads} of them full page loads) and {tally.events} events acked"
            + (f"; {tally.failures} visits failed" if tally.failures else ""))


async def run(args: Any, reactor: Any, key: str) -> None:
    """``bklit demo``: play, then print what was played (``Failed`` if nothing could be)."""
    from bklit.command import Failed, UsageProblem, say

    try:
        player = Player(reactor, args.url, args.project, key, args.visitors, args.minutes * 60,
                        random.Random(args.seed))
    except ValueError as e:
        raise UsageProblem(str(e)) from None
    say(f"demo: {args.visitors} visitors at a time for {args.minutes:g} min against {args.url}, project "
        f"{args.project}; open /live on that server to watch")
    started = reactor.seconds()
    try:
        tally = await player.play()
    except KeyRefused as e:
        raise Failed(f"the server refused the key: {e}") from None
    if args.json:
        print(json.dumps(asdict(tally)))
    else:
        print(summary(tally, reactor.seconds() - started))
    if tally.pageviews == 0:
        raise Failed("no pageview was acked: is the server running at " + args.url + "?")
