"""``bklit probe``: check a running server the way an SDK would use it.

Connects to the URL, reports the TLS certificate (subject, issuer, days to
expiry, serial and SHA-256 fingerprint; a warning under 14 days), then waits
for ``connected``, sends ``auth`` and one SDK-shaped pageview and waits for
``auth_success`` and its ``ack``, timing each step.  The pageview is real:
it is stored under the given project with the url ``--url`` (default a
``.invalid`` address, easy to filter out).

The certificate is verified against the system's CAs, or against every
certificate of a PEM bundle (``--ca``).  When the TLS connection fails, the
probe fetches the served chain once more without trusting it and says why
it was refused: expired or not yet valid, issued for other names, or signed
by a CA that is not trusted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import select
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL.crypto import X509, X509Store, X509StoreContext, X509StoreContextError
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import defer, threads
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates

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


def load_ca(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; ValueError (for people) when there is none or one is broken."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError("no PEM certificate in it")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"not a valid PEM certificate bundle ({_reason(e)})") from None


def identify(cert: x509.Certificate) -> dict:
    """Serial and SHA-256 fingerprint in hex (``openssl x509 -serial -fingerprint -sha256``, without colons)."""
    return {"serial": f"{cert.serial_number:X}",
            "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()}


def certificate_details(cert: x509.Certificate, now: float) -> dict:
    """Subject, issuer, expiry, serial and fingerprint of the certificate the server presented."""
    not_after = cert.not_valid_after_utc.timestamp()
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": _utc(cert.not_valid_after_utc),
        "days_left": round((not_after - now) / 86400, 1),
        **identify(cert),
    }


def _utc(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _names(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no names"
    return ", ".join([*san.get_values_for_type(x509.DNSName),
                      *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]) or "no names"


def _is_ip(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(host)


def _matches(cert: x509.Certificate, host: str) -> bool:
    try:
        if _is_ip(host):
            verify_certificate_ip_address(cert, host)
        else:
            verify_certificate_hostname(cert, host)
        return True
    except (VerificationError, CertificateError):
        return False


def diagnose(chain: list[x509.Certificate], host: str, roots: list[x509.Certificate] | None,
             now: float) -> str | None:
    """Why a client trusting ``roots`` (None: the system's CAs) refuses ``chain`` (leaf first) for
    ``host`` at ``now``; None if it would not.  The chain is checked by OpenSSL, as the probe's
    connection was."""
    if not chain:
        return "the server sent no certificate"
    leaf, moment = chain[0], datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if leaf.not_valid_after_utc < moment:
        return f"certificate expired on {_utc(leaf.not_valid_after_utc)}"
    if leaf.not_valid_before_utc > moment:
        return f"certificate is not valid before {_utc(leaf.not_valid_before_utc)}"
    if not _matches(leaf, host):
        return f"hostname mismatch: the certificate is for {_names(leaf)}, not {host}"
    store = X509Store()
    if roots is None:  # OpenSSL's default bundle and folder, as platformTrust()
        paths = ssl.get_default_verify_paths()
        store.load_locations(paths.openssl_cafile if os.path.exists(paths.openssl_cafile) else None,
                             paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None)
    for root in roots or ():
        store.add_cert(X509.from_cryptography(root))
    store.set_time(moment.replace(tzinfo=None))
    try:
        X509StoreContext(store, X509.from_cryptography(leaf),
                         [X509.from_cryptography(c) for c in chain[1:]]).verify_certificate()
    except X509StoreContextError as e:
        trusted = "the system's CAs" if roots is None else "the --ca certificates"
        return f"untrusted issuer {chain[-1].issuer.rfc4514_string()} (not in {trusted}): {e}"
    return None


def fetch_chain(host: str, port: int, timeout: float) -> list[x509.Certificate]:
    """The chain a TLS server sends (leaf first), verified against nothing: blocking, for a thread."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        connection = SSL.Connection(context, sock)
        if not _is_ip(host):
            connection.set_tlsext_host_name(host.encode("idna"))
        connection.set_connect_state()
        deadline = time.monotonic() + timeout
        while True:
            try:
                connection.do_handshake()
                break
            except SSL.WantReadError:  # a socket with a timeout does not block in OpenSSL
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    raise TimeoutError("TLS handshake timed out") from None
        return [cert.to_cryptography() for cert in connection.get_peer_cert_chain() or ()]


async def explain_tls_failure(host: str, port: int, roots: list[x509.Certificate] | None,
                              timeout: float) -> str | None:
    """One line on why the served chain is refused, with the leaf's serial and fingerprint; None if unknown."""
    try:
        chain = await threads.deferToThread(fetch_chain, host, port, timeout)
    except Exception:
        return None
    reason = diagnose(chain, host, roots, time.time())
    if reason is None:
        return None
    ids = identify(chain[0]) if chain else None
    return f"TLS verification failed: {reason}" + (f" (serial {ids['serial']}, sha256 {ids['sha256']})" if ids else "")


async def probe(reactor: Any, url: str, project: str, key: str, ca: list[x509.Certificate] | None = None,
                timeout: float = 10.0, page_url: str = PROBE_URL) -> Report:
    """Run the probe; raises ``ProbeFailed`` at the first failed step.

    ``ca``: the certificates to trust instead of the system's (``load_ca``).
    """
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
        trust = trustRootFromCertificates([Certificate(X509.from_cryptography(c)) for c in ca]) if ca else platformTrust()
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
    except Exception as e:
        why = await explain_tls_failure(parts.hostname, port, ca or None, timeout) if secure else None
        if why:
            raise ProbeFailed(why) from None
        if isinstance(e, ProbeFailed):
            raise
        raise ProbeFailed(f"cannot connect to {parts.hostname}:{port}: {_reason(e)}") from None
    step("handshake", "TLS and WebSocket" if secure else "WebSocket")
    try:
        if secure:
            peer = client.transport.getPeerCertificate().to_cryptography()
            report.certificate = certificate_details(peer, time.time())
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
        lines.append(f"  serial {c['serial']}, sha256 {c['sha256']}")
    for name, ms, detail in report.steps:
        lines.append(f"  {name:13} {ms:8.1f} ms  {detail}".rstrip())
    lines.extend(f"  WARNING: {w}" for w in report.warnings)
    lines.append("OK")
    return "\n".join(lines)
