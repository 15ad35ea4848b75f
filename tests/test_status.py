"""Each process's own /healthz and /metrics (``status_listen``), process metrics, and IPv6 listeners.

Ingest instances sharing a ``reuseport:`` port answer /metrics on the
shared port from whichever process the kernel picks; on their status
addresses each answers for itself, and so does a writer, which has no
other port.
"""

import json
import socket

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.threads import deferToThread

import bklit
from bklit.config import load_config
from harness import connect, free_port, running_daemon, sdk_pageview, settings


def http_get(address, path):
    """``(status, body)`` of ``GET path`` over HTTP/1.0 to a unix socket path or a ``(host, port)`` (blocking)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: status\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def get(address, path):
    return await deferToThread(http_get, address, path)


async def until(address, path, check, timeout=15.0):
    """The body of ``GET path`` once ``check(body)`` holds (polled off the reactor thread)."""
    for _ in range(int(timeout / 0.1)):
        body = (await get(address, path))[1]
        if check(body):
            return body
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"{path} never passed the check: {body!r}")


def samples(text):
    """``{(name, labels): value}`` of a text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(parsed, name, **labels):
    return parsed[(name, tuple(sorted(labels.items())))]


@pytest_twisted.ensureDeferred
async def test_instances_and_a_writer_each_answer_on_their_own_address(tmp_path, redis_url, clickhouse_url):
    """Two ingest instances on one reuseport port, each with a unix status socket named by its
    instance (``%i``), and a writer with a TCP one: each reports its own sockets and role."""
    port, writer_port = free_port(), free_port()

    def instance(name):
        return settings(redis_url, clickhouse_url, role="ingest", instance=name, health_interval="0.1",
                        status_listen=f"unix:{tmp_path}/status-%i.sock").replace(
            listen=f"reuseport:{port}:interface=127.0.0.1")

    writer = settings(redis_url, clickhouse_url, role="writer", health_interval="0.1",
                      status_listen=f"tcp:{writer_port}:interface=127.0.0.1")
    async with running_daemon(instance("1")) as first, running_daemon(instance("2")) as second, \
            running_daemon(writer) as stores:
        key = await first.token("p1")
        clients = []
        for n in range(12):
            client = await connect(port, path=f"/?projectId=p1&sessionId=s{n}")
            await client.next_of("connected")
            client.send(sdk_pageview("p1", session=f"s{n}", key=key))
            await client.next_of("ack")
            clients.append(client)
        counts = []
        for name, daemon in (("1", first), ("2", second)):
            code, body = await get(str(tmp_path / f"status-{name}.sock"), "/metrics")
            assert code == 200
            parsed = samples(body.decode())
            counts.append(sample(parsed, "bklit_connections", kind="sdk"))
            assert counts[-1] == len(daemon.service.ingest.connections)
            assert sample(parsed, "bklit_messages_total", type="pageview", outcome="acked") == counts[-1]
            report = await until(str(tmp_path / f"status-{name}.sock"), "/healthz",
                                 lambda body: json.loads(body)["connections"]["sdk"] == counts[-1])
            assert json.loads(report)["status"] in ("ok", "degraded") and "spool" in json.loads(report)
        assert sum(counts) == 12 and min(counts) > 0, counts
        await until(("127.0.0.1", writer_port), "/metrics",  # pageviews and session rows, stored
                    lambda body: samples(body.decode()).get(("bklit_writer_batch_rows_sum", ()), 0) >= 12)
        code, body = await get(("127.0.0.1", writer_port), "/healthz")
        report = json.loads(body)
        assert code == 200 and report["clickhouse"]["up"] is True and "spool" not in report
        assert (await get(("127.0.0.1", writer_port), "/"))[0] == 404  # nothing but the two pages
        assert stores.service.listener is None
        for client in clients:
            client.sendClose()
        await defer.gatherResults([defer.ensureDeferred(c.wait_closed()) for c in clients])
    assert not (tmp_path / "status-1.sock").exists()  # stopped with its daemon


@pytest_twisted.ensureDeferred
async def test_status_over_tcp_keeps_to_metrics_networks(redis_url, clickhouse_url):
    """On a TCP status address /metrics is refused outside metrics_networks and /healthz is its status alone."""
    port = free_port()
    config = settings(redis_url, clickhouse_url, role="writer", metrics_networks="192.0.2.0/24",
                      status_listen=f"tcp:{port}:interface=127.0.0.1")
    async with running_daemon(config):
        assert (await get(("127.0.0.1", port), "/metrics"))[0] == 403
        code, body = await get(("127.0.0.1", port), "/healthz")
        assert set(json.loads(body)) == {"status"}


@pytest_twisted.ensureDeferred
async def test_metrics_have_process_and_build_info_and_no_created_series(redis_url, clickhouse_url):
    """File descriptors against their limit, memory, CPU, GC, the version; no ``_created``; durations named so."""
    async with running_daemon(settings(redis_url, clickhouse_url)) as daemon:
        text = daemon.service.metrics.render().decode()
    parsed = samples(text)
    assert 0 < sample(parsed, "process_open_fds") <= sample(parsed, "process_max_fds")
    assert sample(parsed, "process_resident_memory_bytes") > 1 << 20
    assert sample(parsed, "process_cpu_seconds_total") > 0
    assert sample(parsed, "python_gc_collections_total", generation="0") >= 0
    build = [labels for (name, labels) in parsed if name == "bklit_build_info"]
    assert len(build) == 1 and dict(build[0])["version"] == bklit.__version__
    assert sample(parsed, "bklit_build_info", **dict(build[0])) == 1
    assert [name for name, _ in parsed if name.endswith("_created")] == []
    histograms = {family.name for family in text_string_to_metric_families(text) if family.type == "histogram"}
    assert {"bklit_ack_duration_seconds", "bklit_insert_duration_seconds"} <= histograms
    assert all(name.endswith(("_duration_seconds", "_rows")) for name in histograms), histograms


def test_the_default_listener_takes_ipv6_and_ipv4():
    """``listen`` is ``tcp6:8080:interface=\\:\\:`` unless set: IPv6 and, dual-stack, IPv4."""
    endpoint = endpoints.serverFromString(reactor, load_config(None, {}).listen)
    assert isinstance(endpoint, endpoints.TCP6ServerEndpoint)
    assert (endpoint._port, endpoint._interface) == (8080, "::")


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("kind", ["tcp6", "reuseport"])
@pytest_twisted.ensureDeferred
async def test_a_dual_stack_listener_serves_ipv6_and_ipv4_clients(kind, redis_url, clickhouse_url):
    """On ``interface=\\:\\:`` a client over ::1 and one over 127.0.0.1 are both served, and the
    IPv4 one counts as 127.0.0.1 (metrics_networks lets it read /metrics)."""
    port = free_port()
    config = settings(redis_url, clickhouse_url, listen=rf"{kind}:{port}:interface=\:\:")
    async with running_daemon(config) as daemon:
        key = await daemon.token("p1")
        for address in ("::1", "127.0.0.1"):
            client = await connect(port, path=f"/?projectId=p1&sessionId=s-{address}", address=address)
            await client.next_of("connected")
            client.send(sdk_pageview("p1", session=f"s-{address}", key=key))
            assert (await client.next_of("ack"))["messageType"] == "pageview"
            client.sendClose()
            await client.wait_closed()
        code, _ = await get(("127.0.0.1", port), "/metrics")
        assert code == 200
