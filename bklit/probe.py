"""``bklit probe``: check a running server the way an SDK would use it.

Connects to the URL, reports the TLS certificate (subject, issuer, days to
expiry; a warning under 14 days), then waits for ``connected``, sends
``auth`` and one SDK-shaped pageview and waits for ``auth_success`` and its
``ack``, timing each step.  The pageview is real: it is stored under the
given project with the url ``--url`` (default a ``.invalid`` address, easy to
filter out).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

WARN_DAYS = 14
PROBE_URL = "https://bklit-probe.invalid/probe"


class ProbeFailed(Exception):
    """A step of the probe failed; the message says which and why."""


@dataclass
class Report:
    """What the probe saw, step by step."""

    url: str
    steps: list[tuple[str, float, str]] = field(default_factory=list)  # (step, ms, detail)
    certificate: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"url": self.url, "certificate": self.certificate, "warnings": self.warnings,
                "steps": [{"step": s, "ms": round(ms, 1), "detail": d} for s, ms, d in self.steps]}


class _ProbeClient(WebSocketClientProtocol):
    """Collects incoming messages in a queue; remembers the close."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: defer.DeferredQueue = defer.DeferredQueue()
        self.opened: defer.Deferred = defer.Deferred()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            self.inbox.put(json.loads(payload))
        except ValueError:
            self.inbox.put({"type": "unparseable", "raw": payload[:200].decode("utf-8", "replace")})

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.opened.called:
            what = "TLS" if "SSL error" in str(reason) else "WebSocket"
            self.opened.errback(ProbeFailed(f"{what} handshake failed ({code} {reason})"))
        self.inbox.put({"type": "closed", "code": code, "reason": reason})


def certificate_details(client: Any, now: float) -> dict:
    """Subject, issuer and expiry of the certificate the server presented."""
    cert = client.transport.getPeerCertificate().to_cryptography()
    not_after = cert.not_valid_after_utc.timestamp()
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after)),
        "days_left": round((not_after - now) / 86400, 1),
    }


async def probe(reactor: Any, url: str, project: str, key: str, ca: bytes | None = None,
                timeout: float = 10.0, page_url: str = PROBE_URL) -> Report:
    """Run the probe; raises ``ProbeFailed`` at the first failed step."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("URL must be ws://host:port or wss://host:port")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    session = f"{int(time.time() * 1000)}-probe{uuid.uuid4().hex[:6]}"
    full = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}?" + urlencode({"projectId": project, "sessionId": session})
    report = Report(url=full)
    factory = WebSocketClientFactory(full)
    factory.protocol = _ProbeClient
    endpoint: Any = HostnameEndpoint(reactor, parts.hostname, port, timeout=timeout)
    if secure:
        trust = Certificate.loadPEM(ca) if ca else platformTrust()
        endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname, trustRoot=trust), endpoint)
    else:
        report.warnings.append("plain ws://: no TLS")

    started = time.monotonic()

    def step(name: str, detail: str = "") -> None:
        report.steps.append((name, (time.monotonic() - started) * 1000, detail))

    try:
        client = await endpoint.connect(factory).addTimeout(timeout, reactor)
        await client.opened.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        raise ProbeFailed(f"no connection to {parts.hostname}:{port} within {timeout:g} s") from None
    except ProbeFailed:
        raise
    except Exception as e:
        raise ProbeFailed(f"cannot connect to {parts.hostname}:{port}: {_reason(e)}") from None
    step("handshake", "TLS and WebSocket" if secure else "WebSocket")
    try:
        if secure:
            report.certificate = certificate_details(client, time.time())
            if report.certificate["days_left"] < WARN_DAYS:
                report.warnings.append(f"certificate expires in {report.certificate['days_left']} days")
        await _expect(client, "connected", timeout, reactor)
        step("connected")
        client.sendMessage(json.dumps({"type": "auth", "apiKey": key}).encode())
        await _expect(client, "auth_success", timeout, reactor)
        step("auth_success")
        client.sendMessage(json.dumps({"type": "pageview", "apiKey": key, "data": _pageview(page_url, project, session)}).encode())
        ack = await _expect(client, "ack", timeout, reactor)
        step("ack", f"event {ack.get('eventId')}")
    finally:
        client.sendClose(1000)
    return report


async def _expect(client: _ProbeClient, kind: str, timeout: float, reactor: Any) -> dict:
    try:
        message = await client.inbox.get().addTimeout(timeout, reactor)
    except defer.TimeoutError:
        raise ProbeFailed(f"no {kind} within {timeout:g} s") from None
    if message.get("type") == kind:
        return message
    if message.get("type") == "error":
        raise ProbeFailed(f"expected {kind}, got error {message.get('code')}: {message.get('message')}")
    if message.get("type") == "closed":
        raise ProbeFailed(f"expected {kind}, the server closed the socket ({message.get('code')} {message.get('reason')})")
    raise ProbeFailed(f"expected {kind}, got {message.get('type')!r}")


def _pageview(url: str, project: str, session: str) -> dict:
    from bklit.wire import iso_timestamp

    return {"url": url, "timestamp": iso_timestamp(time.time()), "referrer": None, "referrerHostname": None,
            "referrerType": "direct", "userAgent": "bklit-probe", "viewport": {"width": 0, "height": 0},
            "screen": {"width": 0, "height": 0}, "language": "", "timezone": "UTC",
            "sessionId": session, "projectId": project, "isNewVisitor": False, "landingPage": url}


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]


def render(report: Report) -> str:
    """The report for people, one line per step."""
    lines = [f"probe {report.url}"]
    if report.certificate:
        c = report.certificate
        lines.append(f"  TLS certificate: {c['subject']}, issuer {c['issuer']}, "
                     f"expires {c['not_after']} ({c['days_left']} days)")
    for name, ms, detail in report.steps:
        lines.append(f"  {name:13} {ms:8.1f} ms  {detail}".rstrip())
    lines.extend(f"  WARNING: {w}" for w in report.warnings)
    lines.append("OK")
    return "\n".join(lines)
