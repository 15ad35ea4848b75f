"""Sample inputs that several test modules use: SDK messages as sent, user agents, GeoIP records.

(One place for them: no test module imports another.)
"""


SDK_PAGEVIEW = (
    '{"type":"pageview","apiKey":"bk_x","data":{"url":"https://example.com/pricing?utm_source=news'
    '&utm_medium=email&gclid=abc","timestamp":"2026-11-26T08:00:00.000Z","referrer":'
    '"https://www.google.com/search?q=x","referrerHostname":"www.google.com","referrerType":'
    '"organic","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)'
    ' Chrome/131.0 Safari/537.36","viewport":{"width":1280,"height":720},"screen":{"width":1920,'
    '"height":1080},"language":"en-US","timezone":"Europe/Berlin","sessionId":'
    '"1732608000000-k3j4h5","projectId":"proj_1","isNewVisitor":true,"landingPage":'
    '"https://example.com/"}}'
)


SDK_EVENT = (
    '{"type":"event","apiKey":"bk_x","data":{"trackingId":"cta-button","eventType":"click",'
    '"timestamp":"2026-11-26T08:00:01.000Z","metadata":{"position":"hero","triggerMethod":'
    '"manual"},"projectId":"proj_1","sessionId":"1732608000000-k3j4h5"}}'
)


HEADLESS_CHROMIUM_156 = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                         "HeadlessChrome/156.0.0.0 Safari/537.36")


LONDON = {
    "city": {"geoname_id": 2643743, "names": {"en": "London", "de": "London", "ja": "ロンドン"}},
    "continent": {"code": "EU", "names": {"en": "Europe"}},
    "country": {"iso_code": "GB", "names": {"en": "United Kingdom", "de": "Vereinigtes Königreich"}},
    "registered_country": {"iso_code": "GB", "names": {"en": "United Kingdom"}},
    "location": {"accuracy_radius": 100, "latitude": 51.5142, "longitude": -0.0931, "time_zone": "Europe/London"},
    "postal": {"code": "EC2V"},
    "subdivisions": [{"iso_code": "ENG", "names": {"en": "England"}}],
}


BERLIN = {
    "city": {"names": {"en": "Berlin"}},
    "country": {"iso_code": "DE", "names": {"en": "Germany"}},
    "location": {"latitude": 52.5196, "longitude": 13.4069, "time_zone": "Europe/Berlin"},
    "subdivisions": [{"iso_code": "BE", "names": {"en": "Land Berlin"}}],
}


TOKYO_WITHOUT_COUNTRY = {"city": {"names": {"en": "Tokyo"}}, "location": {"latitude": 35.69, "longitude": 139.69}}


NEVER = {"city": {"names": {"en": "Must never be looked up"}}, "country": {"iso_code": "AQ"}}


RECORDS = {
    "81.2.69.0/24": LONDON,
    "2a02:8070::/32": BERLIN,
    "1.0.16.0/24": TOKYO_WITHOUT_COUNTRY,
    # records for addresses that are not globally routable: a real database has
    # none, and the locator must not even ask
    "10.0.0.0/8": NEVER, "192.0.2.0/24": NEVER, "127.0.0.0/8": NEVER, "2001:db8::/32": NEVER,
    "fe80::/10": NEVER, "100.64.0.0/10": NEVER,
}


def write_city_db(path, records=RECORDS, ip_version=6, database_type="GeoLite2-City"):
    """Write a MaxMind-format database mapping networks to records; returns the path as str."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=ip_version, ipv4_compatible=ip_version == 6, database_type=database_type,
                        languages=["en"], description="bklit test database")
    for network, record in records.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return str(path)


def visit_rows(project: str, session: str, views: list[tuple], ends: list[tuple], user_agent: str,
               **columns) -> tuple[list[dict], list[dict]]:
    """One visit as the writer stores it: a pageview row per (time, url, referrer, referrer type[, columns]),
    and a tracked_session row per version: its start, then one per (ended or None, pageviews so far)."""
    started, landing = views[0][0], views[0][1]
    pageview_rows = []
    for n, (at, url, referrer, kind, *extra) in enumerate(views):
        pageview_rows.append({
            "id": f"{session}-pv{n}", "project_id": project, "session_id": session, "timestamp": at,
            "received_at": at, "url": url, "referrer": referrer,
            "referrer_hostname": referrer.split("/")[2] if referrer else "", "referrer_type": kind,
            "landing_page": landing, "user_agent": user_agent, **columns, **(extra[0] if extra else {})})
    visit_columns = {k: v for k, v in columns.items() if k in ("country", "country_code", "is_bot")}
    session_rows = [
        {"id": f"{session}/{started * 1000}", "session_id": session, "project_id": project, "started_at": started,
         "started_ms": started * 1000, "ended_at": ended, "duration": ended - started if ended else 0,
         "pageviews": count, "did_bounce": int(count <= 1), "entry_page": landing, "user_agent": user_agent,
         "end_reason": "disconnect" if ended else "", "updated_at": ended or started, "version": version,
         **visit_columns}
        for version, (ended, count) in enumerate([(None, 1), *ends], 1)]
    return pageview_rows, session_rows
