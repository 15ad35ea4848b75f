"""``bklit probe`` against a real wss server."""

import json
import os
import sys

import pytest_twisted
from twisted.internet import utils

from harness import clickhouse_rows, eventually, running_daemon, settings
from tlscerts import CertificateAuthority

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
        for step in ("handshake", "connected", "auth_success", "ack"):
            assert f"  {step}" in out
        assert out.rstrip().endswith("OK")

        out, err, code = await run_probe(url, "--project", "p1", "--key", key, "--ca", str(ca_file), "--json")
        report = json.loads(out)
        assert code == 0 and report["ok"] is True
        assert [s["step"] for s in report["steps"]] == ["handshake", "connected", "auth_success", "ack"]
        assert 89 < report["certificate"]["days_left"] <= 90 and report["warnings"] == []

        out, err, code = await run_probe(url, "--project", "p1", "--key", "bk_wrong", "--ca", str(ca_file))
        assert code == 1
        assert "probe failed: expected auth_success, got error unauthorized" in err

        out, err, code = await run_probe(url, "--project", "p1", "--key", key)  # system trust: our CA is unknown
        assert code == 1 and "TLS handshake failed" in err and "certificate verify failed" in err

        rows = await eventually(lambda: clickhouse_rows(clickhouse_url, "SELECT url FROM page_view_event"))
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
