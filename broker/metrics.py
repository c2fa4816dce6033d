"""Prometheus endpoint (`metrics_listen`): the broker's stats as Prometheus metrics, through
prometheus_client (an optional dependency: `pip install 'mcbroker[metrics]'`).

prometheus_client serves HTTP from its own thread, and ZeroMQ sockets and the loop's objects belong
to the loop's thread; so the loop publishes a stats snapshot (at most once a second, only while the
endpoint is on) and a scrape reads the latest one. Names and units follow Prometheus' conventions
(`_total` counters, `_seconds`, `_bytes`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

PUBLISH_INTERVAL = 1.0


class MissingExtra(RuntimeError):
    pass


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def families(stats: dict[str, Any]) -> Iterator[Any]:
    """Prometheus metric families for one stats snapshot (README "Stats" documents the fields)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    c = CounterMetricFamily("mcbroker_requests", "Requests received, by the operation of their frame's first op", labels=["op"])
    for op, n in sorted(stats.get("requests_by_op", {}).items()):
        c.add_metric([op], n)
    yield c
    c = CounterMetricFamily("mcbroker_results", "Results by outcome", labels=["result"])
    for label, key in (("ok", "ok"), ("miss", "miss"), ("error", "errors"), ("timeout", "timeouts")):
        c.add_metric([label], stats.get(key, 0))
    yield c
    c = CounterMetricFamily("mcbroker_errors", "Failed results by kind", labels=["kind"])
    for kind, n in sorted(stats.get("errors_by_kind", {}).items()):
        c.add_metric([kind], n)
    yield c
    for name, key, text in (
        ("mcbroker_frames", "frames", "Worker frames received"),
        ("mcbroker_overloaded", "overloaded", "Requests refused at once because a bound was hit"),
        ("mcbroker_replies", "replies", "Replies sent to workers"),
        ("mcbroker_replies_dropped", "replies_dropped", "Replies dropped: the worker was gone or not reading"),
        ("mcbroker_bad_frames", "bad_frames", "Malformed frames"),
        ("mcbroker_internal_errors", "internal_errors", "Broker bugs caught by the loop"),
        ("mcbroker_backend_writes", "backend_writes", "Writes to memcached"),
        ("mcbroker_gets_upstream", "gets_upstream", "Plain gets sent to memcached"),
        ("mcbroker_gets_coalesced", "gets_coalesced", "Plain gets answered by joining one in flight (read coalescing)"),
        ("mcbroker_clients_refused", "clients_refused", "Worker connections shut down because max_clients were served"),
    ):
        yield CounterMetricFamily(name, text, value=stats.get(key, 0))
    for name, key, text in (
        ("mcbroker_inflight_requests", "inflight", "Requests sent or queued to memcached, not yet answered"),
        ("mcbroker_buffered_bytes", "buffered_bytes", "Bytes queued toward memcached"),
        ("mcbroker_connected_workers", "connected_workers", "Worker connections to the broker"),
        ("mcbroker_max_clients", "max_clients", "Worker connections served at once at most (max_clients)"),
        ("mcbroker_requests_per_write", "requests_per_write", "Requests per memcached write since start"),
        ("mcbroker_draining", "draining", "1 while draining for shutdown"),
    ):
        yield GaugeMetricFamily(name, text, value=float(stats.get(key, 0)))
    servers = stats.get("servers", {})
    up = GaugeMetricFamily("mcbroker_server_up", "1 when the server is up (not marked down)", labels=["server"])
    conns = GaugeMetricFamily("mcbroker_server_connections", "Open connections to the server", labels=["server"])
    depth = GaugeMetricFamily("mcbroker_server_inflight_requests", "Requests in flight on the server", labels=["server"])
    reqs = CounterMetricFamily("mcbroker_server_requests", "Requests sent to the server", labels=["server"])
    errs = CounterMetricFamily("mcbroker_server_errors", "Failures counted against the server", labels=["server"])
    tos = CounterMetricFamily("mcbroker_server_timeouts", "Deadlines missed on the server", labels=["server"])
    resets = CounterMetricFamily("mcbroker_server_resets", "Connections to the server reset", labels=["server"])
    writes = CounterMetricFamily("mcbroker_server_writes", "Writes to the server", labels=["server"])
    lat = GaugeMetricFamily(
        "mcbroker_server_latency_seconds", "Latency per memcached write over the last 10-20 s", labels=["server", "quantile"]
    )
    for name, s in sorted(servers.items()):
        up.add_metric([name], 1.0 if s.get("state") == "up" else 0.0)
        conns.add_metric([name], s.get("connections", 0))
        depth.add_metric([name], s.get("depth", 0))
        reqs.add_metric([name], s.get("requests", 0))
        errs.add_metric([name], s.get("errors", 0))
        tos.add_metric([name], s.get("timeouts", 0))
        resets.add_metric([name], s.get("resets", 0))
        writes.add_metric([name], s.get("writes", 0))
        for q, key in (("0.5", "latency_p50_us"), ("0.99", "latency_p99_us"), ("0.999", "latency_p999_us")):
            v = s.get(key)
            lat.add_metric([name, q], float("nan") if v is None else v / 1e6)
    yield from (up, conns, depth, reqs, errs, tos, resets, writes, lat)


class MetricsServer:
    """The HTTP endpoint; `publish(snapshot)` from the loop, scrapes read the latest."""

    def __init__(self, listen: str) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.process_collector import ProcessCollector
        except ImportError:
            raise MissingExtra(
                "metrics_listen needs the prometheus_client package: pip install 'mcbroker[metrics]'"
            ) from None
        self.latest: dict[str, Any] = {}
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total
        registry.register(self)
        host, port = _split(listen)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(f"metrics_listen {listen}: {exc.strerror or exc}") from None
        self.listen = listen

    def collect(self) -> Iterator[Any]:
        return families(self.latest)

    def publish(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.latest = snapshot()  # one reference swap: a scrape never sees a half-built dict

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
