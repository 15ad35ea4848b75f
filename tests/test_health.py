"""/healthz follows Redis and ClickHouse; /metrics moves with what happens; logs are JSON without secrets."""

import json
import os
import subprocess
import sys

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, readBody

from harness import (connect, eventually, free_port, port_open, running_daemon, sdk_event, sdk_pageview,
                     settings)
from harness import get, health, open_dashboard, sdk_client
from twisted.internet import reactor

FAST = {"health_interval": "0.1"}


async def until_health(port, wanted, timeout=10.0):
    """Poll /healthz until it answers ``wanted``; return the report."""
    from twisted.internet import task

    waited = 0.0
    while True:
        code, report = await health(port)
        if code == wanted:
            return report
        if waited > timeout:
            raise AssertionError(f"/healthz stayed {code}: {report}")
        await task.deferLater(reactor, 0.1, lambda: None)
        waited += 0.1


async def metrics(port):
    """Samples of /metrics as {(name, frozenset(labels)): value}."""
    code, body = await get(port, "/metrics")
    assert code == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


@pytest_twisted.ensureDeferred
async def test_healthz_follows_redis_and_clickhouse(redis_server, clickhouse_server, redis_url, clickhouse_url):
    """ok while both answer; without a spool 503 while Redis is away; degraded (200, events wait in the
    stream) while ClickHouse is; ok again once each is back."""
    async with running_daemon(settings(redis_url, clickhouse_url, spool_dir="", **FAST)) as daemon:
        report = await until_health(daemon.port, 200)
        assert report["status"] == "ok" and report["redis"]["up"] and report["clickhouse"] == {
            "up": True, "host": f"127.0.0.1:{clickhouse_server.port}"}
        assert report["redis"]["stream_length"] == 0
        assert report["redis_primary"] == f"127.0.0.1:{redis_server.port}"
        samples = _parse(daemon.service.metrics.render().decode())
        assert value(samples, "bklit_redis_primary_info", address=f"127.0.0.1:{redis_server.port}") == 1

        await deferToThread(redis_server.stop)
        try:
            report = await until_health(daemon.port, 503)
            assert report["status"] == "unavailable" and report["redis"]["up"] is False
        finally:
            await deferToThread(redis_server.start)
        await until_health(daemon.port, 200, timeout=20)

        await deferToThread(clickhouse_server.stop)
        try:
            code, report = await until_status(daemon.port, "degraded")
            assert code == 200 and report["clickhouse"]["up"] is False and report["redis"]["up"] is True
            assert report["warnings"] == ["ClickHouse does not answer: events wait in the stream"]
        finally:
            await deferToThread(clickhouse_server.start)
        await until_status(daemon.port, "ok", timeout=20)


async def until_status(port, wanted, timeout=10.0):
    """Poll /healthz until its status is ``wanted``; return the code and report."""
    from twisted.internet import task

    for _ in range(int(timeout / 0.1)):
        code, report = await health(port)
        if report.get("status") == wanted:
            return code, report
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"/healthz never said {wanted}: {report}")


@pytest_twisted.ensureDeferred
async def test_metrics_move_with_their_causes(redis_url, clickhouse_url, tmp_path):
    """Connections, messages by outcome, ack latency, sessions, writer, dashboards, TLS expiry and reloads."""
    from tlscerts import CertificateAuthority

    ca = CertificateAuthority()
    cert, key_file = ca.server(tmp_path)
    config = settings(redis_url, clickhouse_url, tls_cert=str(cert), tls_key=str(key_file), **FAST)
    async with running_daemon(config) as daemon:
        port = daemon.port
        key, read = await daemon.token("p1"), await daemon.token("p1", scope="read")
        before = _parse(daemon.service.metrics.render().decode())
        assert value(before, "bklit_messages_total", type="pageview", outcome="acked") == 0

        async def scrape():
            return {k: v for k, v in _parse(daemon.service.metrics.render().decode()).items()}

        dash, _ = await open_dashboard(port, read, trust=ca.pem())
        client = await connect(port, trust=ca.pem())
        await client.next_of("connected")
        client.send({"type": "auth", "apiKey": key})
        await client.next_of("auth_success")
        s = await scrape()
        assert value(s, "bklit_connections", kind="sdk") == 1
        assert value(s, "bklit_connections", kind="dashboard") == 1

        client.send(sdk_pageview("p1", key=key))
        await client.next_of("ack")
        client.send(sdk_event("p1", key=key))
        await client.next_of("ack")
        client.send("not json")
        await client.next_of("error")
        s = await scrape()
        assert value(s, "bklit_messages_total", type="pageview", outcome="acked") == 1
        assert value(s, "bklit_messages_total", type="event", outcome="acked") == 1
        assert value(s, "bklit_messages_total", type="unknown", outcome="bad_json") == 1
        assert value(s, "bklit_ack_duration_seconds_count") == 2
        assert value(s, "bklit_sessions_started_total", kind="started") == 1
        assert value(s, "bklit_tls_certificate_expiry_timestamp_seconds") > 0

        client.sendClose()
        await client.wait_closed()
        await dash.next_of("session_end")
        s = await eventually(lambda: (lambda x: x if value(x, "bklit_writer_batch_rows_count") >= 1
                                      and value(x, "bklit_sessions_ended_total", reason="disconnect") == 1
                                      else None)(_parse(daemon.service.metrics.render().decode())))
        assert value(s, "bklit_connections", kind="sdk") == 0
        assert value(s, "bklit_insert_duration_seconds_count") >= 1

        os.kill(os.getpid(), __import__("signal").SIGHUP)
        await eventually(lambda: value(_parse(daemon.service.metrics.render().decode()),
                                       "bklit_tls_reloads_total", outcome="unchanged") == 1)

        samples = await _wss_metrics(port, ca)
        assert value(samples, "bklit_up", dependency="redis") == 1
        assert value(samples, "bklit_up", dependency="clickhouse") == 1
        dash.sendClose()
        await dash.wait_closed()


async def _wss_metrics(port, ca):
    """GET /metrics over TLS from loopback."""
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.web.client import BrowserLikePolicyForHTTPS

    class Trusting(BrowserLikePolicyForHTTPS):
        def creatorForNetloc(self, hostname, port):
            return optionsForClientTLS(hostname.decode(), trustRoot=Certificate.loadPEM(ca.pem()))

    response = await Agent(reactor, contextFactory=Trusting()).request(
        b"GET", f"https://localhost:{port}/metrics".encode())
    assert response.code == 200
    return _parse((await readBody(response)).decode())


def _parse(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


@pytest_twisted.ensureDeferred
async def test_dead_letters_and_insert_failures_are_counted(clickhouse_server, redis_url, clickhouse_url):
    """A refused row counts as a dead letter; a failed insert while ClickHouse is down counts too."""
    async with running_daemon(settings(redis_url, clickhouse_url, **FAST)) as daemon:
        await daemon.service.redis.call("XADD", "bklit:events", "*", "e", "not json")
        await eventually(lambda: value(_parse(daemon.service.metrics.render().decode()), "bklit_dead_letters_total") == 1)
        await deferToThread(clickhouse_server.stop)
        try:
            key = await daemon.token("p1")
            client = await sdk_client(daemon.port, key)
            client.send(sdk_pageview("p1", key=key))
            await client.next_of("ack")
            await eventually(lambda: value(_parse(daemon.service.metrics.render().decode()),
                                           "bklit_insert_failures_total") >= 1, timeout=10)
        finally:
            await deferToThread(clickhouse_server.start)


@pytest_twisted.ensureDeferred
async def test_stream_gauges_follow_the_stream(clickhouse_server, redis_url, clickhouse_url):
    """Stream length and pending are read by the health check: events waiting while ClickHouse is down show."""
    async with running_daemon(settings(redis_url, clickhouse_url, **FAST)) as daemon:
        key = await daemon.token("p1")
        await deferToThread(clickhouse_server.stop)
        try:
            client = await sdk_client(daemon.port, key)
            for _ in range(3):
                client.send(sdk_pageview("p1", key=key))
                await client.next_of("ack")
            # three pageviews and the session's start row wait in the stream
            await eventually(lambda: value(_parse(daemon.service.metrics.render().decode()),
                                           "bklit_stream_length") == 4, timeout=10)
        finally:
            await deferToThread(clickhouse_server.start)
        await eventually(lambda: value(_parse(daemon.service.metrics.render().decode()),
                                       "bklit_stream_length") == 0, timeout=30)


@pytest_twisted.ensureDeferred
async def test_metrics_refused_outside_metrics_networks(redis_url, clickhouse_url):
    """The port faces the internet: /metrics answers 403 to networks not listed."""
    async with running_daemon(settings(redis_url, clickhouse_url, metrics_networks="10.0.0.0/8")) as daemon:
        code, body = await get(daemon.port, "/metrics")
        assert code == 403 and b"bklit_" not in body


@pytest_twisted.ensureDeferred
async def test_json_logs_one_object_per_line_without_keys_or_client_addresses(redis_url, clickhouse_url, tmp_path):
    """``twistd --logger bklit.logs.json_observer``: JSON lines; no API key, no client IP anywhere."""
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, BKLIT_REDIS=redis_url, BKLIT_CLICKHOUSE=clickhouse_url, BKLIT_TRUSTED_PROXIES="127.0.0.1")
    daemon = subprocess.Popen([os.path.join(bindir, "twistd"), "-n", "--pidfile=", "--logger", "bklit.logs.json_observer",
                               "bklit", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await eventually(lambda: port_open(port), timeout=15)
        key = subprocess.run([os.path.join(bindir, "bklit"), "token", "create", "--project", "p1"], env=env,
                             check=True, capture_output=True, text=True).stdout.strip()
        spoofed = {"X-Forwarded-For": "203.0.113.77"}
        bad = await connect(port, headers=spoofed)
        await bad.next_of("connected")
        bad.send({"type": "auth", "apiKey": key + "x"})
        await bad.wait_closed()
        good = await connect(port, headers=spoofed)
        await good.next_of("connected")
        good.send(sdk_pageview("p1", key=key))
        await good.next_of("ack")
        good.sendClose()
        await good.wait_closed()
    finally:
        daemon.terminate()
        output, _ = await deferToThread(daemon.communicate, timeout=20)
    lines = output.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    assert any("Server Shut Down" in r["message"] or "shut" in r["message"].lower() for r in records)
    text = output.decode()
    assert key not in text and key[3:20] not in text
    assert "203.0.113" not in text


def test_persistence_names_what_each_redis_setting_risks():
    """Each combination of Redis settings gets a name, and a warning unless it is AOF fsynced always."""
    from bklit.health import persistence

    assert persistence("yes", "always", "", "noeviction") == ("aof-always", "")
    assert persistence("yes", "everysec", "")[0] == "aof-everysec"
    assert "last second" in persistence("yes", "everysec", "")[1]
    assert persistence("yes", "no", "3600 1")[0] == "aof-no"
    assert persistence("no", "everysec", "3600 1 300 100")[0] == "rdb"
    assert "restart loses every" in persistence("no", "everysec", "")[1]
    assert persistence("yes", "always", "", "allkeys-lru") == (
        "evicting (allkeys-lru)", "Redis may evict queued events and keys when full: use noeviction")


@pytest_twisted.ensureDeferred
async def test_weaker_redis_persistence_is_reported_degraded(redis_server, redis_url, clickhouse_url):
    """The test Redis fsyncs always (ok); switched to everysec, /healthz says degraded and why."""
    async with running_daemon(settings(redis_url, clickhouse_url, **FAST)) as daemon:
        code, report = await until_status(daemon.port, "ok")
        assert report["redis"]["persistence"] == "aof-always"
        redis_server.execute("CONFIG", "SET", "appendfsync", "everysec")
        try:
            code, report = await until_status(daemon.port, "degraded")
        finally:
            redis_server.execute("CONFIG", "SET", "appendfsync", "always")
        assert code == 200 and report["redis"]["persistence"] == "aof-everysec"
        assert report["warnings"] == [report["redis"]["persistence_warning"]]
        await until_status(daemon.port, "ok")
