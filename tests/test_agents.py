"""bklit.agents: real user agents give the right browser, OS, device and bot verdict."""

import crawleruseragents
import pytest

from bklit import schema
from bklit.agents import MAX_LENGTH, NO_AGENT, Agent, Agents, browser_name, os_name, shared

from samples import HEADLESS_CHROMIUM_156

CHROMIUM_156 = HEADLESS_CHROMIUM_156.replace("HeadlessChrome/", "Chrome/")

# (user agent, browser, os, device type); bots have device type "bot"
PEOPLE = [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/142.0.0.0 "
     "Safari/537.36", "Chrome", "Windows", "desktop"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/142.0.0.0 "
     "Safari/537.36 Edg/142.0.0.0", "Edge", "Windows", "desktop"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
     "Safari/537.36 OPR/115.0.0.0", "Opera", "Windows", "desktop"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
     "Firefox", "Windows", "desktop"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
     "Safari/605.1.15", "Safari", "macOS", "desktop"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:133.0) Gecko/20100101 Firefox/133.0",
     "Firefox", "macOS", "desktop"),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
     "Firefox", "Ubuntu", "desktop"),
    ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
     "Safari/537.36", "Chrome", "Chrome OS", "desktop"),
    (CHROMIUM_156, "Chrome", "Linux", "desktop"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/18.1 Mobile/15E148 Safari/604.1", "Safari", "iOS", "mobile"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1", "Chrome", "iOS", "mobile"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "FxiOS/133.0 Mobile/15E148 Safari/605.1.15", "Firefox", "iOS", "mobile"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
     "Mobile Safari/537.36", "Chrome", "Android", "mobile"),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
     "Mobile Safari/537.36", "Chrome", "Android", "mobile"),  # Chrome's reduced UA
    ("Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36", "Samsung Internet", "Android", "mobile"),
    ("Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0", "Firefox", "Android", "mobile"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/AP2A; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Version/4.0 Chrome/131.0.0.0 Mobile Safari/537.36", "Chrome WebView", "Android", "mobile"),
    ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 "
     "Mobile/15E148 Safari/604.1", "Safari", "iOS", "tablet"),
    ("Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
     "Safari/537.36", "Chrome", "Android", "tablet"),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
     "Safari/537.36", "Chrome", "Android", "tablet"),  # reduced UA without "Mobile"
    ("Mozilla/5.0 (Linux; Android 12; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/120.3.1 "
     "like Chrome/120.0 Safari/537.36", "Amazon Silk", "Android", "tablet"),
    ("Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/4.0 "
     "Chrome/76.0.3809.146 TV Safari/537.36", "Samsung Internet", "Tizen", "tv"),
    ("Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/79.0.3945.79 "
     "Safari/537.36 WebAppManager", "Chrome", "Web0S", "tv"),
]

BOTS = [
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "Googlebot"),
    ("Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.6778.204 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
     "Googlebot"),
    ("Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) "
     "Chrome/116.0.1938.76 Safari/537.36", "bingbot"),
    ("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)", "YandexBot"),
    ("Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
     "GPTBot"),
    ("facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)", None),
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", None),
    ("Twitterbot/1.0", None),
    ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", None),
    ("curl/8.5.0", None),
    ("python-requests/2.32.3", None),
    ("Go-http-client/1.1", None),
    # headless browsers
    (HEADLESS_CHROMIUM_156, "HeadlessChrome"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.28 "
     "Safari/537.36", "HeadlessChrome"),
    ("Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse", None),
    ("Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) PhantomJS/2.1.1 Safari/538.1",
     None),
]


@pytest.fixture(scope="module")
def agents():
    return Agents()


@pytest.mark.parametrize("ua,browser,os,kind", PEOPLE)
def test_people(agents, ua, browser, os, kind):
    """Desktop, phone, tablet and TV browsers: their browser, OS and device; not bots."""
    assert agents.describe(ua) == Agent(browser=browser, os=os, device_type=kind, mobile=kind == "mobile",
                                        is_bot=False)


@pytest.mark.parametrize("ua,browser", BOTS)
def test_bots(agents, ua, browser):
    """Crawlers, link previews, HTTP libraries and headless browsers are bots."""
    agent = agents.describe(ua)
    assert agent.is_bot and agent.device_type == "bot" and not agent.mobile
    if browser is not None:
        assert agent.browser == browser


def test_headless_chromium_is_a_bot_until_its_user_agent_is_overridden(agents):
    """What the browser test's Chromium sends by itself, and with a normal user agent set."""
    assert agents.describe(HEADLESS_CHROMIUM_156).is_bot
    assert not agents.describe(CHROMIUM_156).is_bot


def test_every_pattern_of_the_crawler_list_matches_as_the_list_itself_does(agents):
    """The list's own examples are bots for our matcher exactly when they are for the list's module."""
    examples = [ua for entry in crawleruseragents.CRAWLER_USER_AGENTS_DATA for ua in entry["instances"]]
    assert len(examples) > 1000
    assert [ua for ua in examples if agents.is_crawler(ua) != crawleruseragents.is_crawler(ua)] == []
    assert [ua for ua in examples if not agents.describe(ua).is_bot] == []


def test_no_user_agent_is_unknown_not_a_bot(agents):
    """An empty string says nothing (the SDK always sends one, and the handshake has its own)."""
    assert agents.describe("") == NO_AGENT == Agent()
    assert agents.describe("   ") == NO_AGENT


def test_unknown_software_is_other(agents):
    """Not a browser, not in the crawler list: kept, as device type other."""
    assert agents.describe("AutobahnPython/26.10.2") == Agent(device_type="other")


def test_verdicts_are_cached(agents):
    """The same string is parsed once; long strings are judged (and cached) by their first MAX_LENGTH characters."""
    fresh = Agents(cache_size=4)
    ua = PEOPLE[0][0]
    first = fresh.describe(ua)
    assert fresh.describe(ua) is first
    info = fresh.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    long_ua = ua + " x" * MAX_LENGTH
    assert fresh.describe(long_ua) == fresh.describe(long_ua[:MAX_LENGTH])
    for n in range(10):
        fresh.describe(f"Agent/{n}")
    assert fresh.cache_info().currsize == 4


def test_shared_is_one_instance():
    """Daemons in one process share the compiled rules."""
    assert shared() is shared()


def test_names():
    """Words that only say "on a phone" go; macOS is called macOS."""
    assert browser_name("Mobile Safari") == "Safari"
    assert browser_name("Chrome Mobile iOS") == "Chrome"
    assert browser_name("Mobile Safari UI/WKWebView") == "Safari UI/WKWebView"
    assert browser_name("Samsung Internet") == "Samsung Internet"
    assert browser_name("Other") == browser_name(None) == ""
    assert os_name("Mac OS X") == "macOS" and os_name("iOS") == "iOS" and os_name("Other") == ""


def test_agent_fills_only_page_view_columns():
    """Every column an Agent fills exists in page_view_event, flags as 0/1."""
    columns = {column.name for column in schema.TABLES["page_view_event"]}
    filled = Agent(browser="Chrome", mobile=True, is_bot=False).columns()
    assert set(filled) <= columns
    assert (filled["mobile"], filled["is_bot"]) == (1, 0)
