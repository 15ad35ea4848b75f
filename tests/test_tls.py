"""wss with certificates made here: verification, rotation without restart, refusals at start."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.logger import globalLogPublisher

from harness import clickhouse_rows, connect, eventually, running_daemon, sdk_pageview, settings
from tlscerts import CertificateAuthority, fingerprint, leaf_fingerprint

from bklit.tap import Options
from bklit.tls import TLSError, load_pair


@pytest.fixture
def ca():
    """A fresh CA (with an intermediate) for the test."""
    return CertificateAuthority()


@pytest.fixture
def pair(ca, tmp_path):
    """The served files: a first pair, copied to the paths the config names."""
    chain, key = ca.server(tmp_path, name="first")
    served_chain, served_key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    shutil.copy(chain, served_chain)
    shutil.copy(key, served_key)
    return served_chain, served_key


def replace(served, new):
    """Swap in new files atomically, as the certbot hook does."""
    for target, source in zip(served, new):
        tmp = target.with_suffix(".tmp")
        shutil.copy(source, tmp)
        os.replace(tmp, target)


def peer_fingerprint(client):
    """The fingerprint of the certificate the server showed this client."""
    der = client.transport.getPeerCertificate().to_cryptography().public_bytes(Encoding.DER)
    return fingerprint(der)


async def auth_and_ack(client, key):
    """Authenticate a fresh SDK socket and get one pageview acked."""
    await client.next_of("connected")
    client.send({"type": "auth", "apiKey": key})
    assert await client.next() == {"type": "auth_success"}
    client.send(sdk_pageview("p1", key=key))
    return await client.next_of("ack")


@pytest_twisted.ensureDeferred
async def test_verified_wss_client_gets_acks(ca, pair, redis_url, clickhouse_url):
    """An Autobahn client verifying the chain against the CA and the host name talks wss."""
    config = settings(redis_url, clickhouse_url, tls_cert=pair[0], tls_key=pair[1])
    async with running_daemon(config) as daemon:
        key = await daemon.token("p1")
        client = await connect(daemon.port, trust=ca.pem())
        assert (await auth_and_ack(client, key))["type"] == "ack"
        assert peer_fingerprint(client) == leaf_fingerprint(pair[0])
        client.sendClose()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_wrong_host_name_or_unknown_ca_is_refused(ca, pair, redis_url, clickhouse_url):
    """The certificate is for localhost, from our CA: another name or CA fails the handshake."""
    config = settings(redis_url, clickhouse_url, tls_cert=pair[0], tls_key=pair[1])
    async with running_daemon(config) as daemon:
        with pytest.raises(Exception):
            await connect(daemon.port, trust=ca.pem(), host="bklit.example.com")
        with pytest.raises(Exception):
            await connect(daemon.port, trust=CertificateAuthority("other CA").pem())


@pytest.mark.parametrize("trigger", ["sighup", "periodic"])
@pytest_twisted.ensureDeferred
async def test_rotation_new_connections_new_certificate_old_ones_stay(trigger, ca, pair, tmp_path, redis_url, clickhouse_url):
    """Replaced files are served to new connections (SIGHUP or the periodic check); open sockets stay open."""
    interval = "0" if trigger == "sighup" else "0.2"
    config = settings(redis_url, clickhouse_url, tls_cert=pair[0], tls_key=pair[1], tls_check_interval=interval)
    async with running_daemon(config) as daemon:
        key = await daemon.token("p1")
        old = await connect(daemon.port, trust=ca.pem())
        await auth_and_ack(old, key)
        second = ca.server(tmp_path, name="second")
        replace(pair, second)
        if trigger == "sighup":
            os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: daemon.service.tls.reloads == 1, timeout=5)
        new = await connect(daemon.port, trust=ca.pem())
        await auth_and_ack(new, key)
        assert peer_fingerprint(new) == leaf_fingerprint(second[0])
        assert peer_fingerprint(old) != peer_fingerprint(new)
        old.send(sdk_pageview("p1", key=key, url="https://example.com/still-open"))
        assert (await old.next_of("ack"))["type"] == "ack"
        for client in (old, new):
            client.sendClose()
            await client.wait_closed()


@pytest.mark.parametrize("broken", ["mismatched_key", "expired", "garbage"])
@pytest_twisted.ensureDeferred
async def test_a_bad_new_pair_keeps_the_old_one_and_says_why(broken, ca, pair, tmp_path, redis_url, clickhouse_url):
    """A broken renewal is logged; new connections still get the old certificate."""
    config = settings(redis_url, clickhouse_url, tls_cert=pair[0], tls_key=pair[1], tls_check_interval="0")
    logged = []
    observer = logged.append
    globalLogPublisher.addObserver(observer)
    try:
        async with running_daemon(config) as daemon:
            first = leaf_fingerprint(pair[0])
            if broken == "mismatched_key":
                _, other_key = ca.server(tmp_path, name="other")
                shutil.copy(other_key, pair[1])
            elif broken == "expired":
                replace(pair, ca.server(tmp_path, name="old", days=-1, not_before_days=-30))
            else:
                pair[0].write_text("not a certificate\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await eventually(lambda: daemon.service.tls.failures == 1, timeout=5)
            client = await connect(daemon.port, trust=ca.pem())
            assert peer_fingerprint(client) == first
            client.sendClose()
            await client.wait_closed()
    finally:
        globalLogPublisher.removeObserver(observer)
    errors = [e for e in logged if "TLS reload failed" in e.get("log_format", "")]
    assert len(errors) == 1
    reason = {"mismatched_key": "does not match", "expired": "expired", "garbage": "not a PEM"}[broken]
    assert reason in errors[0]["error"]


@pytest.mark.parametrize("case,reason", [
    ("missing_key", "cannot read it"),
    ("directory_key", "cannot read it"),
    ("expired", "expired on"),
    ("mismatched", "does not match"),
    ("not_yet_pem", "not a PEM certificate chain"),
])
def test_bad_pairs_refused_at_start_with_file_and_reason(case, reason, ca, pair, tmp_path):
    """load_pair (what twistd bklit runs before start) names the file and the reason."""
    cert, key = pair
    if case == "missing_key":
        key = tmp_path / "nope.pem"
    elif case == "directory_key":
        key = tmp_path
    elif case == "expired":
        cert, key = ca.server(tmp_path, name="expired", days=-1, not_before_days=-10)
    elif case == "mismatched":
        _, key = ca.server(tmp_path, name="stranger")
    else:
        cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSError) as e:
        load_pair(str(cert), str(key))
    assert reason in str(e.value)
    named = key if case in ("missing_key", "directory_key", "mismatched") else cert
    assert str(named) in str(e.value)


def test_twistd_exits_non_zero_naming_the_file(ca, tmp_path, redis_url, clickhouse_url):
    """A real ``twistd bklit`` with an expired certificate stops at once with one line."""
    cert, key = ca.server(tmp_path, name="expired", days=-1, not_before_days=-10)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, BKLIT_TLS_CERT=str(cert), BKLIT_TLS_KEY=str(key),
               BKLIT_REDIS=redis_url, BKLIT_CLICKHOUSE=clickhouse_url)
    done = subprocess.run([twistd, "-n", "--pidfile=", "bklit", "--listen", "tcp:0:interface=127.0.0.1"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"bklit: TLS error: certificate {cert}: expired on" in output
    assert "Traceback" not in output


def test_cert_without_key_is_a_config_error(pair, capsys):
    """tls_cert without tls_key names the missing key; a config error's exit status."""
    from bklit.startup import EXIT_CONFIG

    options = Options()
    with pytest.raises(SystemExit) as e:
        os.environ["BKLIT_TLS_CERT"] = str(pair[0])
        try:
            options.parseOptions([])
        finally:
            del os.environ["BKLIT_TLS_CERT"]
    assert e.value.code == EXIT_CONFIG
    assert "bklit: config error: tls_key: must be set together with tls_cert" in capsys.readouterr().err


def test_sighup_without_tls_keeps_the_daemon_running(tmp_path, redis_url, clickhouse_url):
    """``systemctl reload`` of a writer or a plain-ws node must not kill it."""
    import time

    from harness import free_port, port_open

    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, BKLIT_REDIS=redis_url, BKLIT_CLICKHOUSE=clickhouse_url)
    log = tmp_path / "d.log"
    daemon = subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile", str(log), "bklit",
                               "--listen", f"tcp:{port}:interface=127.0.0.1"], env=env)
    try:
        deadline = time.monotonic() + 15
        while not port_open(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "nothing to reload" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "SIGHUP: nothing to reload" in log.read_text()
        assert daemon.poll() is None and port_open(port)
    finally:
        daemon.terminate()
        daemon.wait(15)


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_then_tls_gives_the_visitor_address_to_storage_and_limits(
        ca, pair, redis_url, clickhouse_url):
    """``--listen haproxy:tcp:PORT`` with TLS: the PROXY line comes first, then the handshake; the
    visitor's address is stored (anonymised) and per-client limits count by it, not by the balancer."""
    config = settings(redis_url, clickhouse_url, tls_cert=pair[0], tls_key=pair[1],
                      listen="haproxy:tcp:0:interface=127.0.0.1", max_connections_per_ip="1")
    async with running_daemon(config) as daemon:
        key = await daemon.token("p1")
        client = await connect(daemon.port, trust=ca.pem(), proxied_from="203.0.113.50")
        ack = await auth_and_ack(client, key)
        with pytest.raises(Exception, match="429"):  # the same visitor again: over its limit of 1
            await connect(daemon.port, trust=ca.pem(), proxied_from="203.0.113.50")
        other = await connect(daemon.port, trust=ca.pem(), proxied_from="2001:db8:5::7")
        other_ack = await auth_and_ack(other, key)
        stored = await eventually(lambda: len(clickhouse_rows(clickhouse_url, "SELECT id, ip FROM page_view_event")) == 2
                                  and dict(clickhouse_rows(clickhouse_url, "SELECT id, ip FROM page_view_event")))
        assert stored == {ack["eventId"]: "203.0.113.0", other_ack["eventId"]: "2001:db8:5::"}
        for c in (client, other):
            c.sendClose()
            await c.wait_closed()
