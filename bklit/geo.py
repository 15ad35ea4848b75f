"""Where a visitor is, from data on this machine: no address leaves the process.

The country (ISO code, English name) works with no configuration: codes
come from the ``iptocc`` wheel, which embeds the five Regional Internet
Registries' allocation files (refreshed upstream nightly, so a package
upgrade brings new data), and names from CLDR through Babel.  With
``geoip_db`` naming a MaxMind-format database (GeoLite2-City, DB-IP Lite
City, or their Country editions) its answer wins and adds the region, city,
time zone and coordinates.

``Locator.locate`` is called once per connection, with the full address,
which the caller then drops; only ``Place`` (and the anonymised address)
stays.  Addresses that are not globally routable (private, loopback,
link-local, CGNAT, documentation ranges) are never looked up.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import maxminddb
from babel import Locale
from iptocc import country_code as registry_country
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from bklit.enrich import plain_address

log = Logger()

try:
    import maxminddb.extension  # noqa: F401  (the C reader)
    _MAPPED = os.path.isdir("/proc/self/fd")
except ImportError:
    _MAPPED = False

COUNTRY_NAMES: dict[str, str] = {
    code: name for code, name in Locale("en").territories.items()
    if len(code) == 2 and code.isalpha() and code != "ZZ"
}
"""English short names by ISO 3166-1 alpha-2 code ("United States", "South Korea")."""


@dataclass(frozen=True)
class Place:
    """What is known of where an address is; "" and 0.0 when not known.

    ``region`` is the subdivision's ISO code ("BE" for Berlin), ``timezone``
    the IANA zone of the location, not of the browser.
    """

    country: str = ""
    country_code: str = ""
    region: str = ""
    region_name: str = ""
    city: str = ""
    lat: float = 0.0
    lon: float = 0.0
    timezone: str = ""

    def columns(self) -> dict:
        """The page_view_event columns this fills (everything but ``timezone``)."""
        return {"country": self.country, "country_code": self.country_code, "region": self.region,
                "region_name": self.region_name, "city": self.city, "lat": self.lat, "lon": self.lon}


NOWHERE = Place()


class GeoError(Exception):
    """A geo database that cannot be used; the message names the file."""


def _routable(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address to look up, or None when ``ip`` is invalid or not globally routable."""
    address = plain_address(ip)
    return address if address is not None and address.is_global else None


def _private_map(source: Any) -> Any:
    """Copy an open database file to an unlinked temporary file and map that copy (C extension)."""
    with tempfile.TemporaryFile(prefix="bklit-geoip-") as copy:
        shutil.copyfileobj(source, copy, 1 << 20)
        copy.flush()
        return maxminddb.open_database(f"/proc/self/fd/{copy.fileno()}", maxminddb.MODE_MMAP_EXT)


def load_city_db(path: str) -> Any:
    """Open a MaxMind-format database and check it; GeoError naming the file.

    What is read is a private copy: an unlinked temporary file mapped by
    maxminddb's C extension (a lookup costs a few µs), or, without the
    extension or /proc, the file read into memory (pure Python, a hundred
    µs or more).  Either way the file itself may later be rewritten in
    place or truncated without changing or crashing the reader in use, as
    a map of the file itself would.  One test lookup proves the search tree
    and data section decode.  Safe to call from any thread.
    """
    try:
        with open(path, "rb") as source:
            reader = _private_map(source) if _MAPPED else maxminddb.open_database(source, maxminddb.MODE_FD)
    except FileNotFoundError:
        raise GeoError(f"{path}: no such file") from None
    except OSError as e:
        raise GeoError(f"{path}: cannot read it: {e.strerror or e}") from None
    except Exception:  # InvalidDatabaseError, or garbage the metadata decoder chokes on
        raise GeoError(f"{path}: not a MaxMind-format database") from None
    try:
        meta = reader.metadata()
        if meta.ip_version not in (4, 6) or meta.node_count <= 0:
            raise ValueError(f"ip_version {meta.ip_version}, {meta.node_count} nodes")
        reader.get("1.1.1.1")
        if meta.ip_version == 6:
            reader.get("2001:4860:4860::8888")
    except Exception as e:
        reader.close()
        raise GeoError(f"{path}: damaged MaxMind-format database ({e})") from None
    return reader


def describe_db(reader: Any) -> str:
    """One line about a database for the log: type, build date, IP version."""
    meta = reader.metadata()
    built = time.strftime("%Y-%m-%d", time.gmtime(meta.build_epoch))
    return f"{meta.database_type}, built {built}, IPv{meta.ip_version}"


def _english(entry: Any) -> str:
    """``entry["names"]["en"]`` when it is there and text, else ""."""
    names = entry.get("names") if isinstance(entry, dict) else None
    name = names.get("en") if isinstance(names, dict) else None
    return name if isinstance(name, str) else ""


def _text(entry: Any, key: str) -> str:
    value = entry.get(key) if isinstance(entry, dict) else None
    return value if isinstance(value, str) else ""


def _number(entry: Any, key: str) -> float:
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def place_of_record(record: Any) -> Place:
    """A Place from a GeoIP2/GeoLite2/DB-IP record (City or Country schema); NOWHERE for anything else."""
    if not isinstance(record, dict):
        return NOWHERE
    country = record.get("country") or record.get("registered_country") or {}
    code = _text(country, "iso_code").upper()
    subdivisions = record.get("subdivisions")
    first = subdivisions[0] if isinstance(subdivisions, list) and subdivisions else {}
    location = record.get("location") or {}
    return Place(
        country=_english(country) or COUNTRY_NAMES.get(code, ""),
        country_code=code,
        region=_text(first, "iso_code"),
        region_name=_english(first),
        city=_english(record.get("city")),
        lat=_number(location, "latitude"),
        lon=_number(location, "longitude"),
        timezone=_text(location, "time_zone"),
    )


def registry_place(address: str) -> Place:
    """Country code and name from the shipped registry data; NOWHERE when unknown."""
    code = registry_country(address) or ""
    return Place(country=COUNTRY_NAMES.get(code, ""), country_code=code) if code else NOWHERE


class Locator:
    """Looks addresses up in the shipped country data and, if configured, a city database.

    ``reload()`` (SIGHUP) reads the database file again in a thread and
    swaps it in; a file that cannot be used is logged and the one in use
    stays.
    """

    def __init__(self, path: str = "", reactor: Any = None, reader: Any = None, metrics: Any = None):
        self.path = path
        self.reactor = reactor
        self.metrics = metrics
        self.reader = reader if reader is not None or not path else load_city_db(path)
        self.reloads = 0
        if self.reader is not None:
            self._loaded()
        else:
            log.info("geo: country only, from the shipped registry data (no geoip_db)")

    def _loaded(self) -> None:
        log.info("geo: {path} loaded: {what}", path=self.path, what=describe_db(self.reader))
        if self.metrics is not None:
            self.metrics.geoip_build.set(self.reader.metadata().build_epoch)

    def locate(self, ip: str) -> Place:
        """Where ``ip`` is; NOWHERE for an address that is invalid, not routable or unknown.

        The city database answers first; the shipped data fills in the
        country when it has none.  Never raises: a damaged record is logged
        and treated as unknown.
        """
        address = _routable(ip) if isinstance(ip, str) else None
        if address is None:
            return NOWHERE
        place = NOWHERE
        if self.reader is not None:
            try:
                place = place_of_record(self.reader.get(address))
            except ValueError:  # an IPv6 address and an IPv4-only database
                pass
            except Exception:
                log.failure("geo: lookup in {path} failed", path=self.path)
        if place.country_code:
            return place
        registered = registry_place(str(address))
        if place is NOWHERE:
            return registered
        return Place(registered.country, registered.country_code, place.region, place.region_name,
                     place.city, place.lat, place.lon, place.timezone)

    def reload(self) -> defer.Deferred:
        """Read ``path`` again (in the reactor's thread pool) and swap it in.

        Fires with True when the new file is in use, False when there is no
        database or it could not be used (the old one stays).
        """
        if not self.path:
            return defer.succeed(False)
        pool = self.reactor.getThreadPool()
        d = deferToThreadPool(self.reactor, pool, load_city_db, self.path)
        d.addCallbacks(self._swap, self._reload_failed)
        return d

    def _swap(self, reader: Any) -> bool:
        old, self.reader = self.reader, reader
        self.reloads += 1
        self._loaded()
        if self.metrics is not None:
            self.metrics.geoip_reloads.labels("loaded").inc()
        if old is not None:
            old.close()
        return True

    def _reload_failed(self, failure: Any) -> bool:
        if failure.check(GeoError):
            log.error("geo: reload failed, keeping the database in use: {error}", error=failure.getErrorMessage())
        else:
            log.failure("geo: reload failed, keeping the database in use", failure)
        if self.metrics is not None:
            self.metrics.geoip_reloads.labels("failed").inc()
        return False
