"""Tests for bklit.enrich: trusted proxies, client address, anonymisation, URL fields."""

import ipaddress
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bklit import enrich
from bklit.enrich import anonymise_ip, client_ip, parse_proxies, referrer_parts, url_fields

PROXIES = parse_proxies(["10.0.0.0/8", "192.0.2.1", "::1", "fd00::/8"])


class TestParseProxies:
    """parse_proxies."""

    def test_addresses_and_networks(self):
        """Single addresses become host networks; CIDR stays; IPv6 works."""
        assert parse_proxies(["10.0.0.1", "10.0.0.0/8", "::1"]) == (
            ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1/128"))

    def test_host_bits_tolerated(self):
        """10.1.2.3/8 means 10.0.0.0/8."""
        assert parse_proxies(["10.1.2.3/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)

    def test_blanks_skipped_and_whitespace_stripped(self):
        """Blank entries are skipped and entries are stripped."""
        assert parse_proxies([" 10.0.0.1 ", "", "  "]) == (ipaddress.ip_network("10.0.0.1/32"),)
        assert parse_proxies([]) == ()

    def test_single_string(self):
        """One comma/space separated string is split, not iterated per character."""
        assert parse_proxies("10.0.0.1, 127.0.0.1 ::1") == parse_proxies(
            ["10.0.0.1", "127.0.0.1", "::1"])

    def test_mapped_network_becomes_ipv4(self):
        """An IPv4-mapped IPv6 network is stored as the IPv4 network."""
        assert parse_proxies(["::ffff:10.0.0.0/104"]) == (ipaddress.ip_network("10.0.0.0/8"),)

    @pytest.mark.parametrize("bad", ["10.0.0.256", "proxy.local", "10.0.0.0/33", "1.2.3", "::g"])
    def test_bad_value_named(self, bad):
        """ValueError names the bad value."""
        with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
            parse_proxies(["10.0.0.1", bad])

    def test_non_string(self):
        """Non-string entries are refused."""
        with pytest.raises(ValueError):
            parse_proxies([10])


class TestClientIp:
    """client_ip believes forwarding headers only from trusted proxies."""

    def test_untrusted_peer_ignores_headers(self):
        """A direct client cannot spoof its address with headers."""
        headers = {"x-forwarded-for": "1.2.3.4", "x-real-ip": "5.6.7.8"}
        assert client_ip("203.0.113.9", headers, PROXIES) == "203.0.113.9"

    def test_no_proxies_configured(self):
        """With no trusted proxies, headers are never read."""
        assert client_ip("10.0.0.5", {"x-forwarded-for": "1.2.3.4"}, ()) == "10.0.0.5"

    def test_trusted_peer_forwarded_for(self):
        """From a trusted proxy, X-Forwarded-For's client is used."""
        assert client_ip("10.0.0.5", {"x-forwarded-for": "203.0.113.7"}, PROXIES) == "203.0.113.7"

    def test_rightmost_untrusted_hop(self):
        """Spoofed hops on the left are skipped: the rightmost untrusted hop wins."""
        headers = {"x-forwarded-for": "6.6.6.6, 203.0.113.7, 10.0.0.3, 192.0.2.1"}
        assert client_ip("10.0.0.5", headers, PROXIES) == "203.0.113.7"

    def test_all_hops_trusted(self):
        """When every hop is a trusted proxy, the leftmost is the client."""
        headers = {"x-forwarded-for": "10.9.9.9, 10.0.0.3"}
        assert client_ip("10.0.0.5", headers, PROXIES) == "10.9.9.9"

    def test_garbage_left_of_client_ignored(self):
        """Junk that a client prepended does not matter once a real hop is found."""
        headers = {"x-forwarded-for": "<script>, unknown, 203.0.113.7"}
        assert client_ip("10.0.0.5", headers, PROXIES) == "203.0.113.7"

    @pytest.mark.parametrize("value", ["", "unknown", "203.0.113.7, garbage", "1.2.3.4.5", ",", " "])
    def test_invalid_forwarded_for_falls_back_to_peer(self, value):
        """An invalid X-Forwarded-For is ignored."""
        assert client_ip("10.0.0.5", {"x-forwarded-for": value}, PROXIES) == "10.0.0.5"

    def test_only_the_configured_header_is_believed(self):
        """With x-real-ip configured, X-Real-IP is used and X-Forwarded-For (passed on from the client)
        is not; with the default, the other way round."""
        headers = {"x-forwarded-for": "203.0.113.7", "x-real-ip": "203.0.113.8"}
        assert client_ip("10.0.0.5", headers, PROXIES, header="x-real-ip") == "203.0.113.8"
        assert client_ip("10.0.0.5", headers, PROXIES) == "203.0.113.7"
        assert client_ip("10.0.0.5", {"x-real-ip": "203.0.113.8"}, PROXIES) == "10.0.0.5"
        assert client_ip("10.0.0.5", {"x-forwarded-for": "203.0.113.7"}, PROXIES, header="x-real-ip") == "10.0.0.5"

    def test_invalid_real_ip(self):
        """An invalid X-Real-IP falls back to the peer."""
        assert client_ip("10.0.0.5", {"x-real-ip": "localhost"}, PROXIES, header="x-real-ip") == "10.0.0.5"

    def test_ipv6(self):
        """IPv6 peers, proxies and clients."""
        headers = {"x-forwarded-for": "2001:db8::1, fd00::2"}
        assert client_ip("::1", headers, PROXIES) == "2001:db8::1"
        assert client_ip("2001:db8::5", headers, PROXIES) == "2001:db8::5"

    def test_ports_and_brackets(self):
        """Hops written with ports are understood."""
        assert client_ip("10.0.0.5", {"x-forwarded-for": "203.0.113.7:5555"}, PROXIES) == "203.0.113.7"
        assert client_ip("10.0.0.5", {"x-forwarded-for": "[2001:db8::1]:443"}, PROXIES) == "2001:db8::1"

    def test_mapped_peer(self):
        """An IPv4-mapped peer (dual-stack listener) matches IPv4 proxies and is reported as IPv4."""
        assert client_ip("::ffff:10.0.0.5", {"x-real-ip": "203.0.113.8"}, PROXIES, header="x-real-ip") == "203.0.113.8"
        assert client_ip("::ffff:203.0.113.9", {}, PROXIES) == "203.0.113.9"

    def test_string_proxies_accepted(self):
        """Trusted proxies given as strings work too."""
        assert client_ip("10.0.0.5", {"x-forwarded-for": "203.0.113.8"}, ["10.0.0.0/8"]) == "203.0.113.8"

    def test_non_ip_peer_returned_as_is(self):
        """A peer that is not an address (UNIX socket) is returned unchanged."""
        assert client_ip("/run/bklit.sock", {"x-forwarded-for": "1.2.3.4"}, PROXIES) == "/run/bklit.sock"


class TestAnonymiseIp:
    """anonymise_ip truncates addresses."""

    @pytest.mark.parametrize("ip,expected", [
        ("203.0.113.77", "203.0.113.0"),
        ("10.0.0.255", "10.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("2001:db8:1234:5678::1", "2001:db8:1234::"),
        ("2001:db8:1234:ffff:ffff:ffff:ffff:ffff", "2001:db8:1234::"),
        ("::1", "::"),
        ("fe80::1%eth0", "fe80::"),
        ("::ffff:203.0.113.77", "203.0.113.0"),
        (" 203.0.113.77 ", "203.0.113.0"),
    ])
    def test_truncation(self, ip, expected):
        """IPv4 to /24, IPv6 to /48, mapped IPv6 as IPv4."""
        assert anonymise_ip(ip) == expected

    @pytest.mark.parametrize("ip", ["", "x", "256.1.1.1", "1.2.3", "2001:db8::g", None, 17])
    def test_invalid(self, ip):
        """Anything that is not an address gives ""."""
        assert anonymise_ip(ip) == ""


class TestUrlFields:
    """url_fields extracts UTM parameters and click ids."""

    def test_all_keys_present(self):
        """Every parameter key is there, "" when missing."""
        fields = url_fields("https://example.com/")
        assert set(fields) == set(enrich.URL_PARAMETERS)
        assert set(fields.values()) == {""}

    def test_sdk_url(self):
        """The SDK example URL."""
        fields = url_fields("https://example.com/pricing?utm_source=news&utm_medium=email&gclid=abc")
        assert (fields["utm_source"], fields["utm_medium"], fields["gclid"]) == ("news", "email", "abc")
        assert fields["utm_campaign"] == ""

    def test_every_parameter(self):
        """Each of the twelve parameters is read."""
        query = "&".join(f"{name}=v{i}" for i, name in enumerate(enrich.URL_PARAMETERS))
        fields = url_fields("https://a.b/?" + query)
        assert fields == {name: f"v{i}" for i, name in enumerate(enrich.URL_PARAMETERS)}

    def test_percent_decoding(self):
        """Values are percent-decoded, + is a space, UTF-8 decodes."""
        fields = url_fields("https://a.b/?utm_campaign=black%20friday+sale&utm_term=%C3%A9t%C3%A9"
                            "&utm_content=a%26b%3Dc")
        assert fields["utm_campaign"] == "black friday sale"
        assert fields["utm_term"] == "été"
        assert fields["utm_content"] == "a&b=c"

    def test_names_case_insensitive(self):
        """Parameter names match in any case (also when percent-encoded)."""
        fields = url_fields("https://a.b/?UTM_Source=News&GCLID=X&utm%5Fmedium=cpc")
        assert (fields["utm_source"], fields["gclid"], fields["utm_medium"]) == ("News", "X", "cpc")

    def test_first_occurrence_wins(self):
        """Duplicates: the first one counts, whatever its case, even when empty."""
        assert url_fields("https://a.b/?utm_source=a&UTM_SOURCE=b&utm_source=c")["utm_source"] == "a"
        assert url_fields("https://a.b/?utm_source=&utm_source=b")["utm_source"] == ""

    def test_fragment_and_blank(self):
        """The fragment is not the query; a bare name gives ""."""
        fields = url_fields("https://a.b/?utm_medium#utm_source=x")
        assert fields["utm_source"] == "" and fields["utm_medium"] == ""

    def test_value_cap_and_cleaning(self):
        """Values are capped at 512 characters and stripped of control characters."""
        assert url_fields("https://a.b/?gclid=" + "x" * 600)["gclid"] == "x" * 512
        assert url_fields("https://a.b/?utm_source=a%00b%0A%1Bc+")["utm_source"] == "abc"

    def test_bad_percent_escapes(self):
        """Invalid escapes and invalid UTF-8 do not raise."""
        fields = url_fields("https://a.b/?utm_source=%zz&utm_medium=%ff")
        assert fields["utm_source"] == "%zz" and fields["utm_medium"] == "\ufffd"

    @pytest.mark.parametrize("url", ["", "not a url", "https://[::1/?utm_source=x", None, 5])
    def test_odd_urls(self, url):
        """Unparseable input gives defaults or a best effort, never an error."""
        fields = url_fields(url)
        assert set(fields) == set(enrich.URL_PARAMETERS)

    def test_unparseable_url_still_reads_query(self):
        """A URL urlsplit refuses still yields its query parameters."""
        assert url_fields("https://[::1/?utm_source=x#f")["utm_source"] == "x"


class TestReferrerParts:
    """referrer_parts splits a referrer URL."""

    @pytest.mark.parametrize("referrer,expected", [
        ("https://www.google.com/search?q=x", ("www.google.com", "/search")),
        ("https://WWW.Example.COM", ("www.example.com", "/")),
        ("http://news.example.:8080/a/b/?c#d", ("news.example", "/a/b/")),
        ("https://user:pw@t.co/x", ("t.co", "/x")),
        ("http://[2001:db8::1]/p", ("2001:db8::1", "/p")),
    ])
    def test_parts(self, referrer, expected):
        """Hostname lower-case without port or credentials; the path alone."""
        assert referrer_parts(referrer) == expected

    @pytest.mark.parametrize("referrer", [None, "", "   ", "nonsense", "/relative", "https://[::1/", 3])
    def test_absent_or_unparseable(self, referrer):
        """("", "") when there is nothing to split."""
        assert referrer_parts(referrer) == ("", "")


QUERY_PARTS = ["utm_source", "UTM_Medium", "utm%5Fcampaign", "gclid", "x", "", "=", "&", "+", "%20", "%zz", "%",
               "a b", "é", "%C3%A9", "utm_source=", "#", "?", ";"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(QUERY_PARTS), max_size=14))
def test_url_fields_read_a_query_as_parse_qsl_does(parts):
    """url_fields' own query loop gives what parse_qsl(keep_blank_values=True) gave."""
    url = "https://example.com/p?" + "".join(parts)
    expected = dict.fromkeys(enrich.URL_PARAMETERS, "")
    seen = set()
    for name, value in parse_qsl(enrich._query(url), keep_blank_values=True):
        if name.lower() in expected and name.lower() not in seen:
            seen.add(name.lower())
            expected[name.lower()] = enrich._clean_value(value)
    assert enrich.url_fields(url) == expected
