"""Certificates made for the tests by ``trustme``: a CA with an intermediate, and server pairs.

trustme makes everything the tests need: chains through an intermediate
(as Let's Encrypt serves them), any validity window (expired and not yet
valid leaves come from ``not_before``/``not_after`` in the past or future),
and a key that does not match a certificate is simply another pair's key.
So no certificate is built by hand here; this module only writes trustme's
pairs to files under the names the tests use, and reads fingerprints.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class CertificateAuthority:
    """A trustme root CA (named ``name``) with an intermediate that signs server certificates."""

    def __init__(self, name: str = "bklit test CA"):
        self.root = trustme.CA(organization_unit_name=name)
        self.intermediate = self.root.create_child_ca()

    def pem(self) -> bytes:
        """The root certificate, to trust."""
        return self.root.cert_pem.bytes()

    def server(self, directory: Path, host: str = "localhost", days: float = 90,
               not_before_days: float = -1, name: str = "server") -> tuple[Path, Path]:
        """Write ``<name>-fullchain.pem`` (leaf + intermediate) and ``<name>-privkey.pem``.

        The leaf is for ``host`` (CN ``host (name)``), valid from ``not_before_days`` to
        ``days`` from now (negative: in the past).
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        leaf = self.intermediate.issue_cert(host, common_name=f"{host} ({name})",
                                            not_before=now + datetime.timedelta(days=not_before_days),
                                            not_after=now + datetime.timedelta(days=days))
        chain = directory / f"{name}-fullchain.pem"
        private = directory / f"{name}-privkey.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        private.write_bytes(leaf.private_key_pem.bytes())
        return chain, private


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a DER certificate, hex (what the daemon logs and reports)."""
    return hashlib.sha256(cert_der).hexdigest()


def leaf_fingerprint(chain: Path) -> str:
    """The fingerprint of the first certificate of a PEM chain file."""
    cert = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))
