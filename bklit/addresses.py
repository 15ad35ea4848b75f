"""Where Redis is: its URLs, parsed and checked.

``parse_redis_url`` reads ``redis://``, ``rediss://`` and
``redis+sentinel://`` URLs into a ``RedisAddress`` (ClickHouse's URLs are
``bklit.clickhouse_urls``'); ``hide_password`` masks a URL's password for
logs, whichever server it names.  A bad URL is a
``ValueError`` saying what is wrong (``bklit.config`` names its key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: parsed from ``redis://[user:password@]host:port/db``.

    With ``sentinels`` (from ``redis+sentinel://``), ``host`` and ``port``
    are the first Sentinel's, and the primary of ``service`` is asked of the
    Sentinels at every (re)connection.
    """

    host: str
    port: int
    db: int
    password: str | None
    tls: bool
    username: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""

    def __repr__(self) -> str:
        if self.sentinels:
            hosts = ",".join(_host_port(host, port) for host, port in self.sentinels)
            return f"RedisAddress(redis+sentinel://{hosts}/{self.service}/{self.db})"
        scheme = "rediss" if self.tls else "redis"
        return f"RedisAddress({scheme}://{self.host}:{self.port}/{self.db})"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    """``(user, password)`` of a URL's ``user:password`` part (``None`` where absent)."""
    if not userinfo:
        return None, None
    user, sep, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if sep and password else None


def _database(path: str, example: str) -> int:
    if path and not path.isdigit():
        raise ValueError(f"database must be a number, as in {example}")
    return int(path or 0)


def parse_redis_url(value: str) -> RedisAddress:
    """Parse a Redis URL; ``ValueError`` says what is wrong with it."""
    if value.startswith("redis+sentinel://"):
        return _parse_sentinel_url(value)
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("must start with redis://, rediss:// or redis+sentinel://")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("has an invalid port") from None
    username, password = _credentials(parts.netloc.rpartition("@")[0])
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=_database(parts.path.lstrip("/"), "redis://host:6379/0"),
        password=password,
        tls=parts.scheme == "rediss",
        username=username,
    )


def _parse_sentinel_url(value: str) -> RedisAddress:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]``."""
    parts = urlsplit(value)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_sentinel(item) for item in hosts.split(","))
    service, _, db = parts.path.strip("/").partition("/")
    if not service:
        raise ValueError("names no service, as in redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/bklit/0")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", service):
        raise ValueError(f"service name {service!r} is not a Sentinel master name")
    username, password = _credentials(userinfo)
    return RedisAddress(host=sentinels[0][0], port=sentinels[0][1],
                        db=_database(db, "redis+sentinel://host:26379/bklit/0"), password=password,
                        tls=False, username=username, sentinels=sentinels, service=service)


def _sentinel(item: str) -> tuple[str, int]:
    """One ``host[:port]`` of a Sentinel URL (port 26379 by default)."""
    item = item.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]/]+)(?::(\d+))?", item)
    if not match:
        raise ValueError(f"{item!r} is not a Sentinel's host:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or SENTINEL_PORT)
    if not 0 < port < 65536:
        raise ValueError(f"{item!r} has an invalid port")
    return host, port


def hide_password(url: str) -> str:
    """``url`` with its password, if it has one, replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
