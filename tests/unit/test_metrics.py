"""broker/metrics.py: a stats snapshot as Prometheus metrics, read back through the text exposition
format (prometheus_client renders it, its own parser reads it back) and compared with the names the
README's "Stats" section promises and Prometheus' conventions: counters end in `_total`, times are in
seconds (the snapshot's latencies are microseconds), a missing number is 0 and a missing latency NaN.
The endpoint itself is served in this process on a loopback port."""

from __future__ import annotations

import errno
import math
import os
import socket
import sys
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker import metrics
from broker.metrics import MetricsServer, MissingExtra, families

pytestmark = pytest.mark.unit

# Each field a distinct number, so a metric reading the wrong field shows.
STATS: dict[str, Any] = {
    "requests_by_op": {"set": 7, "get": 101, "delete": 3},
    "ok": 11, "miss": 12, "errors": 13, "timeouts": 14,
    "errors_by_kind": {"server_down": 5, "overloaded": 8},
    "frames": 21, "overloaded": 22, "replies": 23, "replies_dropped": 24, "bad_frames": 25,
    "internal_errors": 26, "backend_writes": 27, "gets_upstream": 28, "gets_coalesced": 29,
    "clients_refused": 30,
    "inflight": 41, "buffered_bytes": 42, "connected_workers": 43, "max_clients": 44,
    "requests_per_write": 4.5, "draining": True,
    "servers": {
        "10.0.0.2:11211": {
            "state": "up", "connections": 2, "depth": 3, "requests": 400, "errors": 1, "timeouts": 2,
            "resets": 3, "writes": 90, "latency_p50_us": 80.0, "latency_p99_us": 1500.0, "latency_p999_us": 2_000_000.0,
        },
        "10.0.0.1:11211": {
            "state": "down", "connections": 0, "depth": 0, "requests": 7, "errors": 6, "timeouts": 5,
            "resets": 4, "writes": 3, "latency_p50_us": None, "latency_p99_us": None, "latency_p999_us": None,
        },
        "10.0.0.3:11211": {"state": "probing"},
    },
}


class _Snapshot:
    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Any:
        return families(self.stats)


def exposition(stats: dict[str, Any]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    return generate_latest(registry).decode()


def scrape(text: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """{(sample name, sorted labels): value} and {family name: type}, through prometheus_client's parser."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        assert fam.documentation, fam.name  # every family says what it counts
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, key
            samples[key] = s.value
    return samples, types


def test_broker_wide_counters_and_gauges():
    samples, types = scrape(exposition(STATS))
    counters = {
        "mcbroker_frames_total": 21, "mcbroker_overloaded_total": 22, "mcbroker_replies_total": 23,
        "mcbroker_replies_dropped_total": 24, "mcbroker_bad_frames_total": 25,
        "mcbroker_internal_errors_total": 26, "mcbroker_backend_writes_total": 27,
        "mcbroker_gets_upstream_total": 28, "mcbroker_gets_coalesced_total": 29,
        "mcbroker_clients_refused_total": 30,
    }
    gauges = {
        "mcbroker_inflight_requests": 41, "mcbroker_buffered_bytes": 42, "mcbroker_connected_workers": 43,
        "mcbroker_max_clients": 44, "mcbroker_requests_per_write": 4.5, "mcbroker_draining": 1,
    }
    for name, value in counters.items():
        assert samples[(name, ())] == value, name
        assert types[name.removesuffix("_total")] == "counter", name
    for name, value in gauges.items():
        assert samples[(name, ())] == value, name
        assert types[name] == "gauge", name


def test_labelled_broker_counters():
    samples, types = scrape(exposition(STATS))
    assert {k[1]: v for k, v in samples.items() if k[0] == "mcbroker_requests_total"} == {
        (("op", "get"),): 101, (("op", "set"),): 7, (("op", "delete"),): 3,
    }
    assert {k[1]: v for k, v in samples.items() if k[0] == "mcbroker_results_total"} == {
        (("result", "ok"),): 11, (("result", "miss"),): 12, (("result", "error"),): 13, (("result", "timeout"),): 14,
    }
    assert {k[1]: v for k, v in samples.items() if k[0] == "mcbroker_errors_total"} == {
        (("kind", "server_down"),): 5, (("kind", "overloaded"),): 8,
    }
    assert types["mcbroker_requests"] == types["mcbroker_results"] == types["mcbroker_errors"] == "counter"


def test_labelled_series_come_in_name_order():
    text = exposition(STATS)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    ops = [ln.split('"')[1] for ln in lines if ln.startswith("mcbroker_requests_total{")]
    kinds = [ln.split('"')[1] for ln in lines if ln.startswith("mcbroker_errors_total{")]
    servers = [ln.split('"')[1] for ln in lines if ln.startswith("mcbroker_server_up{")]
    assert ops == ["delete", "get", "set"]
    assert kinds == ["overloaded", "server_down"]
    assert servers == ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]


def test_per_server_metrics():
    samples, types = scrape(exposition(STATS))

    def per_server(name: str) -> dict[str, float]:
        return {dict(k[1])["server"]: v for k, v in samples.items() if k[0] == name}

    assert per_server("mcbroker_server_up") == {"10.0.0.1:11211": 0, "10.0.0.2:11211": 1, "10.0.0.3:11211": 0}
    expected = {
        "mcbroker_server_connections": (0, 2, 0), "mcbroker_server_inflight_requests": (0, 3, 0),
        "mcbroker_server_requests_total": (7, 400, 0), "mcbroker_server_errors_total": (6, 1, 0),
        "mcbroker_server_timeouts_total": (5, 2, 0), "mcbroker_server_resets_total": (4, 3, 0),
        "mcbroker_server_writes_total": (3, 90, 0),
    }
    for name, (one, two, three) in expected.items():
        assert per_server(name) == {"10.0.0.1:11211": one, "10.0.0.2:11211": two, "10.0.0.3:11211": three}, name
    for fam in ("mcbroker_server_up", "mcbroker_server_connections", "mcbroker_server_inflight_requests",
                "mcbroker_server_latency_seconds"):
        assert types[fam] == "gauge", fam
    for fam in ("requests", "errors", "timeouts", "resets", "writes"):
        assert types[f"mcbroker_server_{fam}"] == "counter", fam


def test_latency_quantiles_in_seconds_and_nan_without_samples():
    samples, _ = scrape(exposition(STATS))
    lat = {
        (dict(k[1])["server"], dict(k[1])["quantile"]): v
        for k, v in samples.items() if k[0] == "mcbroker_server_latency_seconds"
    }
    assert lat[("10.0.0.2:11211", "0.5")] == pytest.approx(80e-6, rel=1e-12)
    assert lat[("10.0.0.2:11211", "0.99")] == pytest.approx(1.5e-3, rel=1e-12)
    assert lat[("10.0.0.2:11211", "0.999")] == pytest.approx(2.0, rel=1e-12)
    for q in ("0.5", "0.99", "0.999"):
        assert math.isnan(lat[("10.0.0.1:11211", q)])
        assert math.isnan(lat[("10.0.0.3:11211", q)])
    assert len(lat) == 9


def test_an_empty_snapshot_is_every_broker_metric_at_zero():
    # Before the loop's first publish a scrape sees {}: the fixed series exist, all 0; nothing per server.
    samples, _ = scrape(exposition({}))
    for (name, labels), value in samples.items():
        assert value == 0, (name, labels)
    assert samples[("mcbroker_draining", ())] == 0
    assert {dict(k[1])["result"] for k in samples if k[0] == "mcbroker_results_total"} == {"ok", "miss", "error", "timeout"}
    assert not [k for k in samples if k[0].startswith("mcbroker_server_")]
    assert not [k for k in samples if k[0] in ("mcbroker_requests_total", "mcbroker_errors_total")]
    assert len(samples) == 4 + 10 + 6


@pytest.mark.parametrize(
    "listen, host, port",
    [("127.0.0.1:9150", "127.0.0.1", 9150), ("[::1]:9150", "::1", 9150), (":9150", "", 9150),
     ("localhost:80", "localhost", 80), ("[::]:1", "::", 1),
     # only a host in brackets loses them (the config check refuses the rest before this)
     ("[::1:9150", "[::1", 9150), ("a]:9150", "a]", 9150), ("[a:1", "[a", 1)],
)
def test_listen_address_split(listen, host, port):
    assert metrics._split(listen) == (host, port)


def test_the_endpoint_serves_the_latest_snapshot():
    server = MetricsServer("127.0.0.1:0")
    try:
        port = server._server.server_port
        assert server.listen == "127.0.0.1:0"

        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                return resp.read().decode()

        samples, _ = scrape(get())
        assert samples[("mcbroker_frames_total", ())] == 0  # nothing published yet
        assert ("process_resident_memory_bytes", ()) in samples  # the process collector is on
        server.publish(lambda: {"frames": 5, "inflight": 2})
        samples, _ = scrape(get())
        assert samples[("mcbroker_frames_total", ())] == 5
        assert samples[("mcbroker_inflight_requests", ())] == 2
        assert list(server.collect())  # what the registry calls on each scrape
    finally:
        server.close()
    with pytest.raises(OSError):  # closed: nothing listens there any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)


def test_the_endpoint_listens_on_the_given_address_only():
    server = MetricsServer("127.0.0.2:0")  # all of 127/8 is loopback on Linux
    try:
        host, port = server._server.socket.getsockname()[:2]
        assert host == "127.0.0.2" and port > 0
    finally:
        server.close()


def test_a_port_in_use_is_an_error_naming_metrics_listen():
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            MetricsServer(f"127.0.0.1:{port}")
        text = str(info.value)
        # the OS's own words (strerror), not the exception's repr with its errno
        assert text == f"metrics_listen 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}"
    finally:
        taken.close()


def test_without_prometheus_client_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MissingExtra) as info:
        MetricsServer("127.0.0.1:0")
    assert "prometheus_client" in str(info.value) and "mcbroker[metrics]" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
