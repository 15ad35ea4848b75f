"""ClickHouse URLs: checked, and written as clickhouse-driver reads them.

``clickhouse_hosts`` and ``clickhouse_database`` check a ``clickhouse://``
URL (several hosts allowed, the replicas of one shard; a bad one is a
``ValueError`` saying what is wrong, which ``bklit.config`` names the key
of); ``driver_url``, ``server_url`` and ``with_timeouts`` derive the URLs
the pools connect with.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def clickhouse_hosts(value: str) -> list[str]:
    """The ``host[:port]`` of each host a ``clickhouse://`` URL names, in order.

    Several hosts are comma-separated, as in
    ``clickhouse://default:@10.0.0.1:9000,10.0.0.2:9000/bklit`` (the
    replicas of one shard); ``ValueError`` says what is wrong.
    """
    parts = urlsplit(value)
    if parts.scheme not in ("clickhouse", "clickhouses"):
        raise ValueError("must start with clickhouse:// or clickhouses://")
    hosts = parts.netloc.rpartition("@")[2].split(",")
    for host in hosts:
        item = urlsplit("//" + host.strip())
        if not item.hostname:
            raise ValueError("needs a host, as in clickhouse://default:@127.0.0.1:9000/bklit"
                             " (several: host:port,host:port)")
        try:
            item.port
        except ValueError:
            raise ValueError(f"has an invalid port in {host.strip()!r}") from None
    if len(hosts) > 1 and "alt_hosts" in dict(parse_qsl(parts.query)):
        raise ValueError("names several hosts and alt_hosts too: list them in one place")
    return [host.strip() for host in hosts]


def clickhouse_database(value: str) -> str:
    """The database named by a ``clickhouse://`` URL (default ``bklit``)."""
    clickhouse_hosts(value)
    database = urlsplit(value).path.strip("/") or "bklit"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", database):
        raise ValueError(f"database name {database!r} is not a plain identifier")
    return database


def driver_url(url: str) -> str:
    """``url`` as clickhouse-driver reads it: of several hosts, the first, the others as ``alt_hosts``."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    hosts = clickhouse_hosts(url)
    if len(hosts) == 1:
        return url
    query = parse_qsl(parts.query) + [("alt_hosts", ",".join(hosts[1:]))]
    return urlunsplit(parts._replace(netloc=userinfo + at + hosts[0], query=urlencode(query)))


def server_url(url: str, database: str = "default") -> str:
    """``url`` pointing at another database (to create ours before using it)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def with_timeouts(url: str, connect: float, receive: float) -> str:
    """``url`` with these connect and receive timeouts (seconds), unless it sets its own.

    clickhouse-driver waits 10 s to connect and 300 s for a reply by
    default: too long to notice a host that stopped answering.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("connect_timeout", str(connect))
    query.setdefault("send_receive_timeout", str(receive))
    return urlunsplit(parts._replace(query=urlencode(query)))
