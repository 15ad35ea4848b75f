"""Print what enrichment costs: µs per geo lookup and user agent verdict, per connection and per event.

No servers: it times bklit.geo and bklit.agents in this process.  The city
database is written first (--networks /24s with GeoLite2-City-sized
records, names in eight languages) in the same layout as the real files;
a lookup's cost depends on the depth of the search tree (the prefix length)
and the record's size, not on how many networks the file holds.

    python bench/enrich.py [--networks 20000] [--repeat 20000]

Per connection (SdkProtocol.onConnect): one geo lookup of the full address
and one verdict on the handshake's User-Agent.  Per pageview
(Ingest.queue): one verdict on data.userAgent (the cache hits: same
string) and merging the columns into the row.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bklit import agents, geo  # noqa: E402

NAMES = ("de", "en", "es", "fr", "ja", "pt-BR", "ru", "zh-CN")
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{}.0.{}.{} Safari/537.36"
PHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_{} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/18.{} Mobile/15E{} Safari/604.1")


def names(text: str) -> dict:
    return {language: f"{text} ({language})" for language in NAMES}


def city_record(n: int) -> dict:
    """A record shaped and sized as GeoLite2-City's."""
    return {
        "city": {"geoname_id": 2_800_000 + n, "names": names(f"City {n}")},
        "continent": {"code": "EU", "geoname_id": 6255148, "names": names("Europe")},
        "country": {"geoname_id": 2921044, "is_in_european_union": True, "iso_code": "DE", "names": names("Germany")},
        "location": {"accuracy_radius": 20, "latitude": 52.0 + n % 100 / 100, "longitude": 13.0 + n % 50 / 50,
                     "time_zone": "Europe/Berlin"},
        "postal": {"code": f"{10000 + n % 90000}"},
        "registered_country": {"geoname_id": 2921044, "is_in_european_union": True, "iso_code": "DE",
                               "names": names("Germany")},
        "subdivisions": [{"geoname_id": 2950157, "iso_code": "BE", "names": names("Land Berlin")}],
    }


def write_db(path: str, networks: int) -> list[str]:
    """Write the city database; return one address inside each network."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-City",
                        languages=list(NAMES), description="bklit bench")
    rng = random.Random(1)
    inside = []
    for n in range(networks):
        first = rng.choice([2, 5, 31, 37, 46, 62, 77, 78, 79, 80, 81, 82, 83, 84, 85, 87, 88, 89, 90, 91, 92, 93, 94, 95])
        prefix = f"{first}.{rng.randrange(256)}.{rng.randrange(256)}"
        writer.insert_network(IPSet([f"{prefix}.0/24"]), city_record(n))
        inside.append(f"{prefix}.{rng.randrange(1, 255)}")
    writer.insert_network(IPSet(["2a02:8070::/32"]), city_record(networks))
    writer.to_db_file(path)
    return inside


def per_call(function, arguments: list, repeat: int) -> float:
    """Mean µs of ``function(argument)`` over ``repeat`` calls cycling through ``arguments``."""
    count = len(arguments)
    started = time.perf_counter()
    for n in range(repeat):
        function(arguments[n % count])
    return (time.perf_counter() - started) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(2)
    public = [f"{rng.choice([8, 23, 45, 64, 98, 104, 142, 151, 172, 185, 193, 212])}.{rng.randrange(256)}."
              f"{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(1000)]
    public6 = [f"2a02:8070:{rng.randrange(65536):x}:{rng.randrange(65536):x}::1" for _ in range(1000)]

    print("geo, per connection")
    country = geo.Locator()
    print(f"  country only (shipped data), IPv4      {per_call(country.locate, public, args.repeat):7.2f} µs")
    print(f"  country only (shipped data), IPv6      {per_call(country.locate, public6, args.repeat):7.2f} µs")
    print(f"  private address (not looked up)        {per_call(country.locate, ['192.168.1.20'], args.repeat):7.2f} µs")
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "city.mmdb")
        started = time.perf_counter()
        inside = write_db(path, args.networks)
        size = Path(path).stat().st_size
        print(f"  (wrote a {size / 1e6:.1f} MB city database of {args.networks} networks "
              f"in {time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
        city = geo.Locator(path)
        print(f"  loading it (start-up, SIGHUP)          {(time.perf_counter() - started) * 1e3:7.1f} ms")
        print(f"  city database, IPv4 hit                {per_call(city.locate, inside, args.repeat):7.2f} µs")
        print(f"  city database, IPv6 hit                {per_call(city.locate, public6, args.repeat):7.2f} µs")
        print(f"  city database miss, country shipped    {per_call(city.locate, public, args.repeat):7.2f} µs")
        geo._MAPPED, mapped = False, geo._MAPPED
        slow = geo.Locator(path)
        geo._MAPPED = mapped
        print(f"  (without the C extension: IPv4 hit     {per_call(slow.locate, inside, args.repeat // 10):7.2f} µs)")

    print("user agents")
    started = time.perf_counter()
    parser_ = agents.Agents()
    print(f"  compiling the rules (once per process) {(time.perf_counter() - started) * 1e3:7.1f} ms")
    fresh = [DESKTOP.format(rng.randrange(100, 200), rng.randrange(9999), rng.randrange(999)) for _ in range(3000)]
    fresh += [PHONE.format(rng.randrange(9), rng.randrange(9), rng.randrange(99999)) for _ in range(3000)]
    rng.shuffle(fresh)
    print(f"  verdict, cold (never seen)             {per_call(parser_.describe, fresh, len(fresh)):7.2f} µs")
    print(f"    of which the crawler patterns        {per_call(parser_.is_crawler, fresh, len(fresh)):7.2f} µs")
    print(f"  verdict, cached                        {per_call(parser_.describe, fresh[:1000], args.repeat):7.2f} µs")

    print("per event (Ingest.queue, pageview)")
    place = geo.Locator().locate("193.0.6.139")
    ua = fresh[0]
    parser_.describe(ua)

    def enrich_row(user_agent: str) -> dict:
        row = {"timezone": "", "user_agent": user_agent}
        agent = parser_.describe(user_agent)
        row.update(agent.columns(), is_bot=int(agent.is_bot), **place.columns())
        row["timezone"] = row["timezone"] or place.timezone
        return row

    # the JSON string is new for every message: time with a fresh copy of the same text
    copies = ["".join(list(ua)) for _ in range(1000)]
    print(f"  cached verdict + columns into the row  {per_call(enrich_row, copies, args.repeat):7.2f} µs")


if __name__ == "__main__":
    main()
