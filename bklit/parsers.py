"""The parsers of setting values: text in, a checked value out, ``ValueError`` saying why not.

``bklit.config`` names each key's parser; a parser's message is reported
after the key's name.
"""

from __future__ import annotations

import re
from typing import Callable

from bklit.addresses import parse_redis_url
from bklit.clickhouse_urls import clickhouse_database

def text(value: str) -> str:
    return value.strip()


def choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return parse


def flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, not {value!r}")


def within(number: int, low: int, high: int, unit: str = "") -> int:
    if not low <= number <= high:
        raise ValueError(f"must be between {low} and {high}{unit}, not {number}")
    return number


def integer(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, not {value!r}") from None
        return within(number, low, high)

    return parse


UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(low: int, high: int) -> Callable[[str], int]:
    """A size in bytes, with an optional K, M, G or T suffix (powers of 1024)."""
    def parse(value: str) -> int:
        text = value.strip().lower().removesuffix("b").removesuffix("i")
        unit = text[-1:] if text[-1:] in UNITS else ""
        try:
            number = int(text[:len(text) - len(unit)].strip()) * UNITS[unit]
        except ValueError:
            raise ValueError(f"must be a size in bytes (like 1073741824 or 1G), not {value!r}") from None
        return within(number, low, high, " bytes")

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"must be a number of seconds, not {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, not {number:g}")
        return number

    return parse


def instance(value: str) -> str:
    value = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]{0,64}", value) or value.startswith("."):
        raise ValueError(f"must be up to 64 of A-Z a-z 0-9 _ . - (not starting with a dot), not {value!r}")
    return value


def listed(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def project_origins(value: str) -> tuple[tuple[str, str], ...]:
    """``project=origin`` pairs, comma-separated (an Origin may be listed for several projects)."""
    from bklit.wire import valid_project_id

    pairs = []
    for item in listed(value):
        project, sep, origin = item.partition("=")
        project, origin = project.strip(), origin.strip().rstrip("/")
        if not sep or not valid_project_id(project):
            raise ValueError(f"each entry is project=origin (as shop=https://app.example.com), not {item!r}")
        scheme, _, host = origin.partition("://")
        if scheme not in ("http", "https") or not host or "/" in host:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        pairs.append((project, origin))
    return tuple(pairs)


def redis_url(value: str) -> str:
    parse_redis_url(value.strip())
    return value.strip()


def clickhouse_url(value: str) -> str:
    clickhouse_database(value.strip())
    return value.strip()


def identifier(value: str) -> str:
    value = value.strip()
    if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
        raise ValueError(f"{value!r} is not a plain identifier (letters, digits, _)")
    return value


def proxies(value: str) -> tuple[str, ...]:
    from bklit.enrich import parse_proxies

    items = listed(value)
    parse_proxies(items)
    return items
