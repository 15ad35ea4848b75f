"""bklit.geo: country from the shipped data, city from a MaxMind-format file, never a private address.

The city databases are written here with ``mmdb_writer`` in the GeoIP2 City
record layout (what GeoLite2-City and DB-IP Lite City hold); nothing is
downloaded.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor

from bklit import geo, schema
from bklit.geo import COUNTRY_NAMES, NOWHERE, GeoError, Locator, Place, load_city_db, place_of_record
from bklit.metrics import Metrics
from samples import LONDON, write_city_db


@pytest.fixture
def city_db(tmp_path):
    return write_city_db(tmp_path / "city.mmdb")


@pytest.fixture(params=["mapped copy", "in memory"])
def reader_kind(request, monkeypatch):
    """Both ways of holding the database: the C extension's map of a private copy, and pure Python."""
    if request.param == "in memory":
        monkeypatch.setattr(geo, "_MAPPED", False)
    return request.param


SHIPPED = [
    # registries' own addresses and big resolvers: stable allocations
    ("8.8.8.8", "US", "United States"),
    ("193.0.6.139", "NL", "Netherlands"),  # RIPE NCC
    ("202.12.29.205", "AU", "Australia"),  # APNIC
    ("200.3.14.10", "UY", "Uruguay"),  # LACNIC
    ("1.0.16.1", "JP", "Japan"),
    ("2001:4860:4860::8888", "US", "United States"),
    ("2001:67c:2e8:22::c100:68b", "NL", "Netherlands"),
    ("2001:dc0:2001:11::194", "AU", "Australia"),
    ("::ffff:193.0.6.139", "NL", "Netherlands"),  # IPv4-mapped IPv6 is IPv4
]

NOT_ROUTABLE = [
    "10.1.2.3", "172.16.5.4", "192.168.1.1", "127.0.0.1", "0.0.0.0", "169.254.1.1", "100.64.0.1",
    "192.0.2.1", "198.51.100.1", "203.0.113.9", "224.0.0.1", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "2001:db8::1", "ff02::1", "::ffff:10.0.0.1",
    "", "not an address", "203.0.113.300", "unix:/run/bklit.sock",
]


@pytest.mark.parametrize("ip,code,name", SHIPPED)
def test_shipped_data_gives_the_country_with_no_configuration(ip, code, name):
    """With no geoip_db, public IPv4 and IPv6 addresses get their country code and English name."""
    assert Locator().locate(ip) == Place(country=name, country_code=code)


@pytest.mark.parametrize("ip", NOT_ROUTABLE)
def test_private_loopback_documentation_and_invalid_addresses_have_no_place(ip, city_db):
    """Not globally routable (or not an address): nothing, even where the city file has a record."""
    assert Locator().locate(ip) is NOWHERE
    assert Locator(city_db).locate(ip) is NOWHERE


def test_city_database_gives_region_city_coordinates_and_time_zone(reader_kind, city_db):
    """A GeoIP2 City record fills every column, names in English."""
    assert Locator(city_db).locate("81.2.69.142") == Place(
        country="United Kingdom", country_code="GB", region="ENG", region_name="England", city="London",
        lat=51.5142, lon=-0.0931, timezone="Europe/London")


def test_city_database_answers_for_ipv6(city_db):
    """IPv6 addresses are looked up in the same file."""
    place = Locator(city_db).locate("2a02:8070:abcd:1234::1")
    assert (place.city, place.region, place.region_name, place.country_code) == ("Berlin", "BE", "Land Berlin", "DE")
    assert (place.lat, place.lon, place.timezone) == (52.5196, 13.4069, "Europe/Berlin")


def test_shipped_data_fills_what_the_city_database_lacks(city_db):
    """A record without a country, or no record at all: the country comes from the shipped data."""
    locator = Locator(city_db)
    assert locator.locate("1.0.16.1") == Place(country="Japan", country_code="JP", city="Tokyo",
                                               lat=35.69, lon=139.69)
    assert locator.locate("8.8.8.8") == Place(country="United States", country_code="US")


def test_ipv4_only_database_and_an_ipv6_address(tmp_path):
    """An IPv4-only file cannot answer for IPv6: the shipped country, no error."""
    path = write_city_db(tmp_path / "v4.mmdb", {"81.2.69.0/24": LONDON}, ip_version=4)
    locator = Locator(path)
    assert locator.locate("81.2.69.142").city == "London"
    assert locator.locate("2001:4860:4860::8888") == Place(country="United States", country_code="US")


def test_country_edition_records_work_too(tmp_path):
    """A Country database (no city, no location) still gives the country it knows."""
    path = write_city_db(tmp_path / "country.mmdb", {"8.8.8.0/24": {"country": {"iso_code": "DE"}}},
                         database_type="DBIP-Country-Lite")
    assert Locator(path).locate("8.8.8.8") == Place(country="Germany", country_code="DE")


@pytest.mark.parametrize("record", [None, "text", [], {"country": "GB"}, {"location": {"latitude": "north"}},
                                    {"subdivisions": "ENG"}, {"city": {"names": {"en": 7}}}])
def test_odd_records_give_nothing_rather_than_an_error(record):
    """Records of another layout are read defensively."""
    assert place_of_record(record) == NOWHERE


def test_country_names_are_the_short_english_ones():
    """CLDR's names, as dashboards show them (not ISO's formal ones)."""
    assert COUNTRY_NAMES["US"] == "United States"
    assert COUNTRY_NAMES["GB"] == "United Kingdom"
    assert COUNTRY_NAMES["KR"] == "South Korea"
    assert COUNTRY_NAMES["RU"] == "Russia"
    assert "ZZ" not in COUNTRY_NAMES and "001" not in COUNTRY_NAMES


def test_place_fills_only_page_view_columns():
    """Every column a Place fills exists in page_view_event (the time zone is not one of them)."""
    columns = {column.name for column in schema.TABLES["page_view_event"]}
    assert set(Place().columns()) <= columns
    assert "timezone" not in Place().columns()


@pytest.mark.parametrize("case,reason", [
    ("missing", "no such file"),
    ("directory", "cannot read it"),
    ("empty", "not a MaxMind-format database"),
    ("garbage", "not a MaxMind-format database"),
    ("truncated", "not a MaxMind-format database"),
    ("damaged_tree", "damaged MaxMind-format database"),
])
def test_unusable_files_are_refused_naming_the_file(case, reason, reader_kind, tmp_path, city_db):
    """What ``twistd bklit`` checks before start: each error names the file and the reason."""
    path = tmp_path / "bad.mmdb"
    good = open(city_db, "rb").read()
    if case == "directory":
        path = tmp_path
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 20)
    elif case == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif case == "damaged_tree":
        path.write_bytes(b"\xff" * 400 + good[400:])
    with pytest.raises(GeoError) as e:
        load_city_db(str(path))
    assert str(e.value).startswith(f"{path}: ") and reason in str(e.value)
    with pytest.raises(GeoError):
        Locator(str(path))


def test_file_rewritten_in_place_does_not_affect_the_database_in_use(reader_kind, tmp_path, city_db):
    """A private copy is read: overwriting or truncating the file leaves lookups intact until a reload."""
    locator = Locator(city_db)
    assert type(locator.reader).__module__ == ("maxminddb.extension" if reader_kind == "mapped copy"
                                               else "maxminddb.reader")
    with open(city_db, "r+b") as handle:
        handle.write(b"\xff" * 2000)
        handle.truncate(3000)
    assert locator.locate("81.2.69.142").city == "London"
    assert locator.locate("2a02:8070::1").city == "Berlin"
    with pytest.raises(GeoError):
        load_city_db(city_db)


@pytest_twisted.ensureDeferred
async def test_reload_picks_up_a_replaced_file(tmp_path):
    """SIGHUP's reload reads the new file; the build time is exported."""
    path = write_city_db(tmp_path / "city.mmdb", {"81.2.69.0/24": LONDON})
    metrics = Metrics()
    locator = Locator(path, reactor, metrics=metrics)
    renamed = dict(LONDON, city={"names": {"en": "City of London"}})
    write_city_db(tmp_path / "city.mmdb", {"81.2.69.0/24": renamed})
    assert locator.locate("81.2.69.142").city == "London"
    assert await locator.reload() is True
    assert locator.locate("81.2.69.142").city == "City of London"
    assert metrics.registry.get_sample_value("bklit_geoip_reloads_total", {"outcome": "loaded"}) == 1
    assert metrics.registry.get_sample_value("bklit_geoip_database_build_timestamp_seconds") > 1.7e9


@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_the_database_in_use(tmp_path, city_db):
    """A damaged or missing new file is logged and counted; lookups go on with the old data."""
    metrics = Metrics()
    locator = Locator(city_db, reactor, metrics=metrics)
    with open(city_db, "wb") as handle:
        handle.write(b"not a database")
    assert await locator.reload() is False
    assert locator.locate("81.2.69.142").city == "London"
    assert metrics.registry.get_sample_value("bklit_geoip_reloads_total", {"outcome": "failed"}) == 1


@pytest_twisted.ensureDeferred
async def test_reload_without_a_database_does_nothing():
    """Country only: nothing to read again."""
    assert await Locator("", reactor).reload() is False
