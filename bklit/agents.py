"""Browser, OS, device and bot verdict of a user agent string; cached.

Browser and OS families come from ua-parser (the uap-core rules, updated
monthly as ``ua-parser-builtins``) with its Rust matcher; bots are what
uap-core calls a spider plus every pattern of crawler-user-agents (search
engines, AI crawlers, link previews, monitors, HTTP libraries, headless
browsers such as HeadlessChrome, Playwright, Puppeteer, Selenium).  Both
pattern sets run in ua-parser-rs's multi-pattern matcher: a cold verdict
costs microseconds, and the same strings repeat, so verdicts are kept in an
LRU cache keyed by the string.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import crawleruseragents
import ua_parser_rs
from ua_parser import BestAvailableResolver, Parser, load_lazy_builtins

CACHE_SIZE = 8192
MAX_LENGTH = 1024  # longer strings are judged by their start (a cache key is at most this long)

MOBILE_SYSTEMS = frozenset({
    "iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "Firefox OS", "HarmonyOS", "Symbian OS",
    "Windows Mobile", "webOS", "Sailfish", "Ubuntu Touch",
})
DESKTOP_SYSTEMS = frozenset({
    "Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "Debian", "Red Hat", "SUSE", "openSUSE",
    "Linux Mint", "Arch Linux", "Gentoo", "Mandriva", "CentOS", "FreeBSD", "OpenBSD", "NetBSD", "Solaris",
})
_MOBILE_WORDS = re.compile(r"\b(?:Mobile|iOS)\b")
_CONSOLE = re.compile(r"PlayStation|Xbox|Nintendo")


@dataclass(frozen=True)
class Agent:
    """What a user agent string says about the visitor's software.

    ``device_type`` is ``desktop``, ``mobile`` (a phone), ``tablet``,
    ``tv``, ``console``, ``bot``, ``other`` (not recognised) or "" (no
    user agent); ``mobile`` is true for phones only, as the browser's own
    ``Sec-CH-UA-Mobile`` hint is.
    """

    browser: str = ""
    os: str = ""
    device_type: str = ""
    mobile: bool = False
    is_bot: bool = False

    def columns(self) -> dict:
        """The page_view_event columns this fills."""
        return {"browser": self.browser, "os": self.os, "device_type": self.device_type,
                "mobile": int(self.mobile), "is_bot": int(self.is_bot)}


NO_AGENT = Agent()


def browser_name(family: str | None) -> str:
    """uap's browser family without the words that only say "on a phone".

    "Mobile Safari" and "Safari", "Chrome Mobile iOS" and "Chrome" are one
    browser each in reports; the device type says where it ran.
    """
    if not family or family == "Other":
        return ""
    return " ".join(_MOBILE_WORDS.sub(" ", family).split()) or family


def os_name(family: str | None) -> str:
    """uap's OS family, "Mac OS X" called macOS as Apple has since 2016."""
    if not family or family == "Other":
        return ""
    return "macOS" if family == "Mac OS X" else family


def device_type(ua: str, os_family: str, device_family: str, brand: str) -> str:
    """desktop, mobile, tablet, tv, console or other, from uap's device and OS and the string."""
    if "TV" in device_family or os_family in ("tvOS", "Web0S"):
        return "tv"
    if _CONSOLE.search(device_family):
        return "console"
    if (device_family in ("iPad", "Kindle") or "Tablet" in brand or "Tablet" in device_family
            or (os_family == "Android" and "Mobile" not in ua)):
        return "tablet"
    if os_family in MOBILE_SYSTEMS or device_family in ("iPhone", "iPod") or brand == "Generic":
        return "mobile"
    if os_family in DESKTOP_SYSTEMS or device_family == "Mac":
        return "desktop"
    return "other"


class Agents:
    """Parses user agents; ``describe`` is cached (CACHE_SIZE strings, least recently used go)."""

    def __init__(self, cache_size: int = CACHE_SIZE):
        self.parser = Parser(BestAvailableResolver(load_lazy_builtins()))
        self.crawlers = ua_parser_rs.UserAgentExtractor(
            (entry["pattern"], "bot", None, None, None, None)
            for entry in crawleruseragents.CRAWLER_USER_AGENTS_DATA)
        self._cached = functools.lru_cache(maxsize=cache_size)(self.parse)
        self.parse("Mozilla/5.0 (Windows NT 10.0)")  # compile the matchers now, not for the first visitor

    def describe(self, ua: str) -> Agent:
        """The Agent of ``ua`` (its first MAX_LENGTH characters), from the cache when seen lately."""
        return self._cached(ua[:MAX_LENGTH])

    def cache_info(self) -> Any:
        """Hits, misses and size of the cache (functools' CacheInfo)."""
        return self._cached.cache_info()

    def is_crawler(self, ua: str) -> bool:
        """Whether ``ua`` matches a crawler-user-agents pattern (case-sensitive, as the list is written)."""
        return self.crawlers.extract(ua) is not None

    def parse(self, ua: str) -> Agent:
        """The Agent of one user agent string, uncached (``describe`` is the cached one)."""
        if not ua or not ua.strip():
            return NO_AGENT
        result = self.parser.parse(ua)
        device = result.device
        device_family = device.family if device else ""
        brand = (device.brand or "") if device else ""
        os_family = result.os.family if result.os else ""
        is_bot = brand == "Spider" or device_family == "Spider" or self.is_crawler(ua)
        kind = "bot" if is_bot else device_type(ua, os_family, device_family, brand)
        return Agent(
            browser=browser_name(result.user_agent.family if result.user_agent else None),
            os=os_name(os_family),
            device_type=kind,
            mobile=kind == "mobile",
            is_bot=is_bot,
        )


@functools.cache
def shared() -> Agents:
    """The process's Agents: compiling the rules takes a fifth of a second, so it is done once."""
    return Agents()
