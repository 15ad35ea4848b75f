"""TLS with Let's Encrypt files, reloadable without dropping connections.

``load_pair`` reads ``fullchain.pem`` (the leaf, then its intermediates) and
``privkey.pem`` and checks everything a server would otherwise find out too
late: readable, parseable, not expired, key matching the certificate.
``ReloadableTLS`` is what the listening endpoint asks for every new
connection: it hands out the current pair's context, and ``reload`` swaps in
a new pair only once it passed the same checks, so a broken renewal keeps
the old certificate serving.  Existing connections keep the context they
started with.

The context comes from Twisted's ``CertificateOptions``: TLS 1.2 and newer,
its curated cipher list, no compression, no session tickets.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from bklit.lifecycle import Periodic

log = Logger()


class TLSError(Exception):
    """A certificate or key cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class CertificateInfo:
    """What operators want to know about the served certificate."""

    subject: str
    issuer: str
    not_after: float  # epoch seconds
    fingerprint: str  # SHA-256 of the leaf, hex

    def days_left(self, now: float) -> float:
        """Days until the certificate expires (negative once it has)."""
        return (self.not_after - now) / 86400


@dataclass(frozen=True)
class LoadedPair:
    """A checked certificate chain and key, ready to serve."""

    options: CertificateOptions
    info: CertificateInfo
    digest: str  # of both files' bytes: tells a renewed pair from the same one


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as e:
        raise TLSError(f"{what} {path}: cannot read it ({e.strerror})") from None


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty)"


def load_pair(cert_path: str, key_path: str, now: float | None = None) -> LoadedPair:
    """Load and check a certificate chain and its key; ``TLSError`` says what is wrong."""
    now = time.time() if now is None else now
    cert_bytes = _read(cert_path, "certificate")
    key_bytes = _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_bytes)
    except ValueError as e:
        raise TLSError(f"certificate {cert_path}: not a PEM certificate chain ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as e:
        raise TLSError(f"key {key_path}: not an unencrypted PEM private key ({e})") from None
    leaf = chain[0]
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise TLSError(f"certificate {cert_path}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise TLSError(f"key {key_path}: does not match the certificate {cert_path}")
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        enableSessionTickets=False,
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSError(f"certificate {cert_path} / key {key_path}: OpenSSL refused them ({e})") from None
    info = CertificateInfo(
        subject=_name(leaf.subject),
        issuer=_name(leaf.issuer),
        not_after=not_after,
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )
    return LoadedPair(options, info, hashlib.sha256(cert_bytes + b"\0" + key_bytes).hexdigest())


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """Gives each new connection the current pair's context."""

    def __init__(self, cert_path: str, key_path: str, pair: LoadedPair, metrics: Any = None):
        self.cert_path = cert_path
        self.key_path = key_path
        self.pair = pair
        self.reloads = 0
        self.failures = 0
        self.metrics = metrics
        self._report(None)

    def _report(self, outcome: str | None) -> None:
        if self.metrics is None:
            return
        self.metrics.tls_expiry.set(self.pair.info.not_after)
        if outcome:
            self.metrics.tls_reloads.labels(outcome).inc()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.pair.options.getContext(), None)

    def reload(self, now: float | None = None) -> bool:
        """Load the files again; swap when they changed and are good.

        Returns True when a new pair is now served.  A bad pair is logged
        and the old one stays.
        """
        try:
            pair = load_pair(self.cert_path, self.key_path, now)
        except TLSError as e:
            self.failures += 1
            self._report("failed")
            log.error("TLS reload failed, still serving {subject} (expires {expires}): {error}",
                      subject=self.pair.info.subject, expires=_when(self.pair.info.not_after), error=str(e))
            return False
        if pair.digest == self.pair.digest:
            self._report("unchanged")
            return False
        self.pair = pair
        self.reloads += 1
        self._report("loaded")
        log.info("TLS certificate loaded: {subject}, issuer {issuer}, expires {expires}",
                 subject=pair.info.subject, issuer=pair.info.issuer, expires=_when(pair.info.not_after))
        return True


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Any server endpoint (tcp, systemd) with TLS on top."""

    def __init__(self, wrapped: Any, creator: ReloadableTLS):
        self.wrapped = wrapped
        self.creator = creator

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(TLSMemoryBIOFactory(self.creator, False, factory))


class CertificateWatch(Periodic):
    """Reloads the certificate every ``interval`` seconds, 0: never (SIGHUP: ``BklitService.reload``)."""

    def __init__(self, tls: ReloadableTLS, reactor: Any, interval: float):
        super().__init__(interval, tls.reload, reactor, now=False, name="certificates")
        self.tls = tls

    def startService(self) -> None:
        info = self.tls.pair.info
        log.info("TLS certificate loaded: {subject}, issuer {issuer}, expires {expires}",
                 subject=info.subject, issuer=info.issuer, expires=_when(info.not_after))
        super().startService()
