"""``bklit probe`` against a real wss server."""

import json
import os
import sys
import time
from contextlib import asynccontextmanager

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import protocol, reactor, ssl, utils

from harness import clickhouse_rows, eventually, running_daemon, settings
from tlscerts import CertificateAuthority, leaf_fingerprint

from bklit import probe

BKLIT = os.path.join(os.path.dirname(sys.executable), "bklit")


async def run_probe(*args):
    """Run ``bklit probe`` without blocking the reactor serving it."""
    out, err, code = await utils.getProcessOutputAndValue(BKLIT, ["probe", *args], env=dict(os.environ))
    return out.decode(), err.decode(), code


@pytest_twisted.ensureDeferred
async def test_probe_passes_and_fails_with_a_wrong_key(tmp_path, redis_url, clickhouse_url):
    """A good key: exit 0, certificate and timed steps; a wrong one: exit 1 naming the error."""
    ca = CertificateAuthority()
    cert, key_file = ca.server(tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem())
    config = settings(redis_url, clickhouse_url, tls_cert=cert, tls_key=key_file)
    async with running_daemon(config) as daemon:
        key = await daemon.token("p1")
        url = f"wss://localhost:{daemon.port}"
        out, err, code = await run_probe(url, "--project", "p1", "--key", key, "--ca", str(ca_file))
        assert code == 0, err
        assert "TLS certificate: CN=localhost (server)" in out
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        assert f"  serial {leaf.serial_number:X}, sha256 {leaf_fingerprint(cert)}" in out
        for step in ("handshake", "connected", "auth_success", "ack"):
            assert f"  {step}" in out
        assert out.rstrip().endswith("OK")

        out, err, code = await run_probe(url, "--project", "p1", "--key", key, "--ca", str(ca_file), "--json")
        report = json.loads(out)
        assert code == 0 and report["ok"] is True
        assert [s["step"] for s in report["steps"]] == ["handshake", "connected", "auth_success", "ack"]
        assert 89 < report["certificate"]["days_left"] <= 90 and report["warnings"] == []
        assert report["certificate"]["sha256"] == leaf_fingerprint(cert)

        out, err, code = await run_probe(url, "--project", "p1", "--key", "bk_wrong", "--ca", str(ca_file))
        assert code == 1
        assert "probe failed: expected auth_success, got error unauthorized" in err

        out, err, code = await run_probe(url, "--project", "p1", "--key", key)  # system trust: our CA is unknown
        assert code == 1, err
        assert err.startswith("bklit: probe failed: TLS verification failed: untrusted issuer OU=bklit test CA,")
        assert f"(not in the system's CAs): unable to get local issuer certificate (serial {leaf.serial_number:X}, " \
               f"sha256 {leaf_fingerprint(cert)})" in err and len(err.splitlines()) == 1

        # the two probes' pageviews may be stored in two batches: wait for both
        rows = await eventually(lambda: len(stored := clickhouse_rows(
            clickhouse_url, "SELECT url FROM page_view_event")) >= 2 and stored)
        assert rows == [("https://bklit-probe.invalid/probe",)] * 2


@pytest_twisted.ensureDeferred
async def test_probe_warns_when_the_certificate_expires_soon(tmp_path, redis_url, clickhouse_url):
    """Under 14 days left: still exit 0, with a warning."""
    ca = CertificateAuthority()
    cert, key_file = ca.server(tmp_path, days=5)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem())
    async with running_daemon(settings(redis_url, clickhouse_url, tls_cert=cert, tls_key=key_file)) as daemon:
        key = await daemon.token("p1")
        out, err, code = await run_probe(f"wss://localhost:{daemon.port}", "--project", "p1",
                                         "--key", key, "--ca", str(ca_file))
        assert code == 0
        assert "WARNING: certificate expires in 5.0 days" in out or "WARNING: certificate expires in 4.9 days" in out


@pytest_twisted.ensureDeferred
async def test_probe_usage_errors_exit_2():
    """A bad URL or a missing key is a usage error."""
    out, err, code = await run_probe("http://localhost:1", "--project", "p1", "--key", "k")
    assert code == 2 and "URL must be ws://" in err
    env_free = {k: v for k, v in os.environ.items() if k != "BKLIT_PROBE_KEY"}
    out, err, code = await utils.getProcessOutputAndValue(BKLIT, ["probe", "ws://localhost:1", "--project", "p1"], env=env_free)
    assert code == 2 and b"--key" in err


@pytest_twisted.ensureDeferred
async def test_a_whole_bundle_is_trusted(tmp_path, redis_url, clickhouse_url):
    """--ca with another CA first and the server's root second: the second counts too."""
    ca = CertificateAuthority()
    cert, key_file = ca.server(tmp_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(CertificateAuthority("some other CA").pem() + ca.pem())
    async with running_daemon(settings(redis_url, clickhouse_url, tls_cert=cert, tls_key=key_file)) as daemon:
        key = await daemon.token("p1")
        out, err, code = await run_probe(f"wss://localhost:{daemon.port}", "--project", "p1", "--key", key,
                                         "--ca", str(bundle))
        assert code == 0, err
        assert out.rstrip().endswith("OK")


@asynccontextmanager
async def tls_listener(chain, key_file):
    """A TLS server on 127.0.0.1 serving ``chain`` with ``key_file`` (and nothing after the handshake)."""
    certs = x509.load_pem_x509_certificates(chain.read_bytes())
    pems = [c.public_bytes(Encoding.PEM) for c in certs]
    served = ssl.PrivateCertificate.loadPEM(key_file.read_bytes() + pems[0])
    options = ssl.CertificateOptions(privateKey=served.privateKey.original, certificate=served.original,
                                     extraCertChain=[ssl.Certificate.loadPEM(p).original for p in pems[1:]])
    port = reactor.listenSSL(0, protocol.Factory.forProtocol(protocol.Protocol), options, interface="127.0.0.1")
    try:
        yield port.getHost().port
    finally:
        await port.stopListening()


async def probe_failure(tmp_path, **certificate):
    """Run the probe against a TLS listener serving a pair of ``certificate``; (stderr, the leaf)."""
    ca = CertificateAuthority()
    chain, key_file = ca.server(tmp_path, **certificate)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem())
    async with tls_listener(chain, key_file) as port:
        out, err, code = await run_probe(f"wss://localhost:{port}", "--project", "p1", "--key", "k",
                                         "--ca", str(ca_file), "--timeout", "5")
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err, x509.load_pem_x509_certificates(chain.read_bytes())[0]


@pytest_twisted.ensureDeferred
async def test_a_hostname_mismatch_is_named(tmp_path):
    """A certificate for another name: said so, not a dropped WebSocket handshake."""
    err, leaf = await probe_failure(tmp_path, host="analytics.example.com")
    assert err.startswith("bklit: probe failed: TLS verification failed: hostname mismatch: "
                          "the certificate is for analytics.example.com, not localhost (serial ")
    assert f"{leaf.serial_number:X}, sha256 " in err and "WebSocket" not in err


@pytest_twisted.ensureDeferred
async def test_an_expired_certificate_is_named(tmp_path):
    err, leaf = await probe_failure(tmp_path, days=-2, not_before_days=-30)
    expired = time.strftime("%Y-%m-%d", time.gmtime(leaf.not_valid_after_utc.timestamp()))
    assert err.startswith(f"bklit: probe failed: TLS verification failed: certificate expired on {expired}T")


@pytest_twisted.ensureDeferred
async def test_a_certificate_not_yet_valid_is_named(tmp_path):
    err, _ = await probe_failure(tmp_path, not_before_days=2, days=90)
    assert err.startswith("bklit: probe failed: TLS verification failed: certificate is not valid before ")


@pytest_twisted.ensureDeferred
async def test_a_bad_ca_file_is_one_line_exit_2(tmp_path):
    """No certificate in it, a broken one, or no such file: a usage error naming the file."""
    garbage, broken = tmp_path / "garbage.pem", tmp_path / "broken.pem"
    garbage.write_text("not a certificate\n")
    broken.write_bytes(CertificateAuthority().pem()[:-80] + b"\n-----END CERTIFICATE-----\n")
    for path, reason in [(garbage, "no PEM certificate in it"), (broken, "not a valid PEM certificate bundle"),
                         (tmp_path / "missing.pem", "cannot read")]:
        out, err, code = await run_probe("wss://localhost:1", "--project", "p1", "--key", "k", "--ca", str(path))
        assert code == 2 and reason in err and str(path) in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_diagnose_accepts_what_verifies():
    """The diagnosis says nothing of a chain a client trusting the root accepts."""
    import trustme

    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("localhost")
    chain = [x509.load_pem_x509_certificate(blob.bytes()) for blob in leaf.cert_chain_pems]
    assert probe.diagnose(chain, "localhost", probe.load_ca(root.cert_pem.bytes()), time.time()) is None
    assert probe.diagnose([], "localhost", None, time.time()) == "the server sent no certificate"
