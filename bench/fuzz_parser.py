"""Coverage-guided fuzzing of the SDK message parser and the row mapping (atheris, libFuzzer).

    python bench/fuzz_parser.py [-max_total_time=60] [libFuzzer flags] [CORPUS_DIR]

``make fuzz FUZZ_SECONDS=60`` installs atheris and runs this.  Each input is
one frame's payload; ``parse_message`` may refuse it with a ProtocolError
carrying a documented code, and anything it accepts must become a row (by
the steps ``Ingest.queue`` takes), survive the stream's JSON and turn into
ClickHouse insert values.  Any other exception, or a failed assertion, is a
crash: libFuzzer stops and writes the input to ``crash-*`` under the
artifact prefix.  The corpus (default ``.run/fuzz-parser``) starts from the
SDK's own messages and keeps what reached new code, so later runs go
deeper.  Without ``-max_total_time`` the run stops after 60 seconds; inputs
reach 17,000 bytes (past the message limit) unless ``-max_len`` says otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bklit"]):
    from bklit import enrich, live, rows, schema, wire

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_795_682_666.0
SEEDS = [
    {"type": "auth", "apiKey": "bk_" + "x" * 43},
    {"type": "pageview", "apiKey": "bk_x", "data": {
        "url": "https://example.com/pricing?utm_source=news&utm_medium=email&gclid=abc",
        "timestamp": "2026-11-26T08:44:00.000Z", "referrer": "https://www.google.com/search?q=x",
        "referrerHostname": "www.google.com", "referrerType": "organic",
        "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0",
        "viewport": {"width": 1280, "height": 720}, "screen": {"width": 1920, "height": 1080},
        "language": "en-US", "timezone": "Europe/Berlin", "sessionId": "1732608000000-k3j4h5",
        "projectId": "p1", "isNewVisitor": True, "landingPage": "https://example.com/", "title": "Pricing"}},
    {"type": "pageview", "data": {"url": "http://[2001:db8::1]:8080/a?b=%00", "referrer": "android-app://x/"}},
    {"type": "event", "apiKey": "bk_x", "data": {
        "trackingId": "cta-button", "eventType": "click", "timestamp": "2026-11-26T08:44:01+01:00",
        "metadata": {"position": "hero", "triggerMethod": "manual", "n": [1, 2.5, None, True, {"a": "b"}]},
        "projectId": "p1", "sessionId": "1732608000000-k3j4h5"}},
]
TOKENS = ['"type"', '"auth"', '"pageview"', '"event"', '"apiKey"', '"data"', '"url"', '"referrer"',
          '"timestamp"', '"viewport"', '"width"', '"height"', '"metadata"', '"trackingId"', '"eventType"',
          '"isNewVisitor"', '"landingPage"', '"title"', '"userAgent"', '"projectId"', '"sessionId"',
          '"http://', '"https://', '"android-app://', "utm_source=", "gclid=", "%00", "\\u0000", "\\ud800",
          "NaN", "1e999", "Z", "+14:00", "true", "null", "[", "{", "}"]


def check(data: bytes) -> None:
    """One input: a documented refusal, or a record that maps to insertable rows."""
    try:
        record = wire.parse_message(data)
    except wire.ProtocolError as error:
        assert error.code in wire.ERROR_CODES, error.code
        return
    if isinstance(record, wire.PageView):
        row = rows.pageview_row(record, event_id="id", project_id="p1", session_id="s1",
                                received_at=NOW, ip=enrich.anonymise_ip("203.0.113.66"))
        head, tail = live.pageview_parts(row, NOW)
        json.loads(head + "false" + tail)
        table = "page_view_event"
    elif isinstance(record, wire.Event):
        row = rows.event_row(record, event_id="id", project_id="p1", session_id="s1", received_at=NOW)
        json.loads(live.event_message(row, NOW))
        table = "tracked_event"
    else:
        assert isinstance(record, wire.Auth) and record.api_key
        return
    row = json.loads(json.dumps({"table": table, "row": row}))["row"]
    for value in schema.to_insert_row(table, row):
        if isinstance(value, str):
            value.encode("utf-8")  # clickhouse-driver's strict encoding: no lone surrogates


def prepare(corpus: Path) -> list[str]:
    """Seed the corpus and write the token dictionary; the libFuzzer arguments they need."""
    corpus.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(SEEDS):
        (corpus / f"seed-{number}").write_text(json.dumps(seed))
    tokens = corpus.parent / "fuzz-parser.dict"
    tokens.write_text("".join(json.dumps(token) + "\n" for token in TOKENS))
    artifacts = corpus.parent / "fuzz-parser-artifacts"
    artifacts.mkdir(exist_ok=True)
    return [f"-dict={tokens}", f"-artifact_prefix={artifacts}/"]


def main() -> None:
    flags = [arg for arg in sys.argv[1:] if arg.startswith("-")]
    corpora = [arg for arg in sys.argv[1:] if not arg.startswith("-")] or [str(ROOT / ".run" / "fuzz-parser")]
    extra = prepare(Path(corpora[0]))
    if not any(flag.startswith("-max_total_time=") for flag in flags):
        flags.append("-max_total_time=60")
    if not any(flag.startswith("-max_len=") for flag in flags):
        flags.append("-max_len=17000")  # past the 16 KiB message limit
    atheris.Setup([sys.argv[0], *extra, "-print_final_stats=1", *flags, *corpora], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
