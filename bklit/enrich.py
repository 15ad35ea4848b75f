"""Client address and URL-derived fields of stored events; pure functions.

``client_ip`` believes forwarding headers only from trusted proxies,
``anonymise_ip`` truncates an address before it is stored, ``url_fields``
extracts UTM parameters and ad click ids from a page URL, and
``referrer_parts`` splits a referrer into hostname and path.
"""

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import unquote_plus, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

URL_PARAMETERS = (
    "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "utm_id",
    "gclid", "fbclid", "msclkid", "ttclid", "li_fat_id", "twclid",
)
MAX_PARAMETER_LENGTH = 512

_MAPPED_V4 = ipaddress.ip_network("::ffff:0:0/96")
_CONTROL_CHARACTERS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)])


def plain_address(text: str) -> Address | None:
    """Parse an IP address; IPv4-mapped IPv6 becomes IPv4; None when invalid."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _header_address(text: str) -> Address | None:
    """Parse an address from a forwarding header, tolerating ``[v6]:port`` and ``v4:port``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return plain_address(text)


def _as_network(value) -> Network:
    """Parse one trusted proxy entry; IPv4-mapped IPv6 networks become IPv4 networks."""
    network = value if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)) \
        else ipaddress.ip_network(value.strip(), strict=False)
    if network.version == 6 and network.subnet_of(_MAPPED_V4):
        mapped = network.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def parse_proxies(values: Iterable[str]) -> tuple[Network, ...]:
    """Parse trusted proxy addresses and networks ("10.0.0.1", "10.0.0.0/8", "::1").

    A single comma- or space-separated string is accepted too; blank entries
    are skipped. Raises ValueError naming the first bad value.
    """
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"invalid trusted proxy {value!r}: not a string")
        if not value.strip():
            continue
        try:
            networks.append(_as_network(value))
        except ValueError:
            raise ValueError(
                f"invalid trusted proxy {value!r}: not an IP address or network") from None
    return tuple(networks)


def _trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    """True when address lies in one of the networks (versions never mix)."""
    return any(address in network for network in networks)


def in_networks(host: str, networks: tuple[Network, ...]) -> bool:
    """True when ``host`` is an IP address inside one of ``networks`` (parsed by parse_proxies)."""
    address = plain_address(host) if isinstance(host, str) else None
    return address is not None and _trusted(address, networks)


def _forwarded_client(value, networks: tuple[Network, ...]) -> Address | None:
    """The rightmost X-Forwarded-For hop that is not a trusted proxy (leftmost if all are).

    None when the header is absent or a hop that must be read is not an address.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    hops = [_header_address(part) for part in value.split(",")]
    for hop in reversed(hops):
        if hop is None:
            return None
        if not _trusted(hop, networks):
            return hop
    return hops[0]


FORWARDING_HEADERS = ("x-forwarded-for", "x-real-ip")


def client_ip(peer_host: str, headers: Mapping[str, str], trusted_proxies,
              header: str = "x-forwarded-for") -> str:
    """The client's address: the peer, or what a trusted proxy peer forwarded.

    Only when the peer is in a trusted network is ``header`` believed, and
    no other: ``x-forwarded-for`` (its rightmost hop that is not itself a
    trusted proxy) or ``x-real-ip``; an invalid value is ignored.  Which one
    a proxy sets is configured (``client_ip_header``), never guessed: a
    proxy that sets one passes the other on from the client as it came.
    ``headers`` has lower-case keys; ``trusted_proxies`` holds networks (or
    strings, parsed as by parse_proxies).  A peer that is not an IP address
    (e.g. a UNIX socket) is returned as given.
    """
    peer = plain_address(peer_host) if isinstance(peer_host, str) else None
    if peer is None:
        return peer_host if isinstance(peer_host, str) else ""
    networks = tuple(_as_network(value) for value in trusted_proxies)
    if not _trusted(peer, networks):
        return str(peer)
    value = headers.get(header)
    if header == "x-forwarded-for":
        forwarded = _forwarded_client(value, networks)
    else:
        forwarded = _header_address(value) if isinstance(value, str) else None
    return str(forwarded if forwarded is not None else peer)


def anonymise_ip(ip: str) -> str:
    """Truncate an address for storage: IPv4 to /24, IPv6 to /48; "" when invalid.

    IPv4-mapped IPv6 addresses are treated as IPv4.
    """
    address = plain_address(ip) if isinstance(ip, str) else None
    if address is None:
        return ""
    if address.version == 4:
        return str(ipaddress.IPv4Address(int(address) & 0xFFFFFF00))
    return str(ipaddress.IPv6Address(int(address) >> 80 << 80))


def _clean_value(value: str) -> str:
    """Drop control characters and surrounding blanks, cap at MAX_PARAMETER_LENGTH."""
    return value.translate(_CONTROL_CHARACTERS).strip()[:MAX_PARAMETER_LENGTH]


def _query(url: str) -> str:
    """The query string of a URL, also for URLs urlsplit refuses."""
    try:
        return urlsplit(url).query
    except ValueError:
        return url.partition("#")[0].partition("?")[2]


def url_fields(url: str) -> dict:
    """UTM parameters and click ids of a URL's query, each "" when missing.

    Names match case-insensitively, the first occurrence wins, values are
    percent-decoded ("+" is a space), stripped of control characters and
    surrounding blanks, and capped at 512 characters.
    """
    fields = dict.fromkeys(URL_PARAMETERS, "")
    if not isinstance(url, str) or "?" not in url:
        return fields
    seen = set()
    # As parse_qsl(query, keep_blank_values=True), decoding only the pairs looked at.
    for pair in _query(url).split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        key = _unquote(name).lower()
        if key in fields and key not in seen:
            seen.add(key)
            fields[key] = _clean_value(_unquote(value))
    return fields


def _unquote(text: str) -> str:
    """Percent-decoded, "+" a space (unquote_plus, as parse_qsl decodes)."""
    return unquote_plus(text) if "%" in text or "+" in text else text


def referrer_parts(referrer: str | None) -> tuple[str, str]:
    """(hostname, path) of a referrer URL; hostname lower-case, path "/" when empty.

    ("", "") when the referrer is absent, unparseable or has no host.
    """
    if not isinstance(referrer, str) or not referrer.strip():
        return "", ""
    try:
        parts = urlsplit(referrer.strip())
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return "", ""
    if not host:
        return "", ""
    return host, parts.path or "/"
