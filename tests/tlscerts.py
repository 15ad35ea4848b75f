"""Certificates made for the tests: an own CA and server pairs signed by it."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """A certificate authority, with an intermediate, that signs server certificates."""

    def __init__(self, name: str = "bklit test CA"):
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder()
                     .subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - datetime.timedelta(days=1))
                     .not_valid_after(NOW + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.intermediate_key = _key()
        inter_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name + " intermediate")])
        self.intermediate = (x509.CertificateBuilder()
                             .subject_name(inter_subject).issuer_name(subject)
                             .public_key(self.intermediate_key.public_key())
                             .serial_number(x509.random_serial_number())
                             .not_valid_before(NOW - datetime.timedelta(days=1))
                             .not_valid_after(NOW + datetime.timedelta(days=3650))
                             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                             .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        """The root certificate, to trust."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def server(self, directory: Path, host: str = "localhost", days: float = 90,
               not_before_days: float = -1, name: str = "server") -> tuple[Path, Path]:
        """Write ``<name>-fullchain.pem`` (leaf + intermediate) and ``<name>-privkey.pem``."""
        key = _key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{host} ({name})")]))
                .issuer_name(self.intermediate.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW + datetime.timedelta(days=not_before_days))
                .not_valid_after(NOW + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .sign(self.intermediate_key, hashes.SHA256()))
        chain = directory / f"{name}-fullchain.pem"
        private = directory / f"{name}-privkey.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + self.intermediate.public_bytes(serialization.Encoding.PEM))
        private.write_bytes(_pem_key(key))
        return chain, private


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a DER certificate, hex (what the daemon logs and reports)."""
    import hashlib

    return hashlib.sha256(cert_der).hexdigest()


def leaf_fingerprint(chain: Path) -> str:
    """The fingerprint of the first certificate of a PEM chain file."""
    cert = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))
