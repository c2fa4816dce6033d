"""Pure parts of issue 11: the latency window, the failure-line rate limit, logfmt quoting, and the
stats table."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import statsview
from broker.logfmt import KeyValueFormatter, RateLimit, _quote
from broker.stats import BOUNDS, WINDOW, LatencyWindow

pytestmark = pytest.mark.unit


def test_percentiles_of_known_samples():
    w = LatencyWindow()
    for us in range(1, 1001):  # 1 us .. 1 ms, evenly
        w.record(us * 1e-6, now=100.0)
    (p50, p99, p999), n = w.percentiles((0.5, 0.99, 0.999), now=100.5)
    assert n == 1000
    # Each is the upper bound of the bucket holding the true value: at most 10% above it.
    for got, true in ((p50, 500e-6), (p99, 990e-6), (p999, 999e-6)):
        assert true <= got <= true * 1.1 + 1e-9, (got, true)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=1e-7, max_value=50.0), min_size=1, max_size=300), st.sampled_from([0.5, 0.9, 0.99, 0.999]))
def test_percentile_is_within_a_bucket_of_the_true_one(samples, q):
    w = LatencyWindow()
    for s in samples:
        w.record(s, now=0.0)
    (got,), n = w.percentiles((q,), now=1.0)
    ordered = sorted(samples)
    rank = max(1, int(q * len(ordered) + 0.999999))  # nearest-rank percentile, as LatencyWindow's
    true = ordered[rank - 1]
    assert n == len(samples)
    assert got is not None and true <= got * (1 + 1e-9) and got <= max(true * 1.1, BOUNDS[0]) * (1 + 1e-9)


def test_window_forgets_old_samples():
    w = LatencyWindow()
    w.record(1.0, now=0.0)  # a slow one, long ago
    w.record(1e-3, now=WINDOW + 1)
    (p99,), n = w.percentiles((0.99,), now=WINDOW + 2)
    assert n == 2  # the previous window is still in view
    w.record(1e-3, now=2 * WINDOW + 2)
    (p99,), n = w.percentiles((0.99,), now=2 * WINDOW + 3)
    assert n == 2 and p99 is not None and p99 < 2e-3  # the 1 s sample has aged out
    assert w.percentiles((0.5,), now=10 * WINDOW) == ([None], 0)  # idle: nothing to report
    assert w.count == 3  # lifetime totals stay


def test_rate_limit_one_line_per_key_per_interval_with_the_count():
    r = RateLimit(10.0)
    assert r.allow("a", 0.0) == 0
    assert [r.allow("a", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert r.allow("b", 5.0) == 0  # per key
    assert r.allow("a", 10.0) == 3  # the next line says how many were held back
    r.reset("a")
    assert r.allow("a", 10.5) == 0  # a new failure after recovery is news at once


@pytest.mark.parametrize(
    "text, quoted",
    [("ready", "ready"), ("a b", '"a b"'), ('say "x"', '"say \\"x\\""'), ("k=v", '"k=v"'), ("", '""'), ("l1\nl2", '"l1\\nl2"')],
)
def test_logfmt_quoting(text, quoted):
    assert _quote(text) == quoted


def test_formatter_line():
    record = logging.LogRecord("mcbroker", logging.WARNING, __file__, 1, "%s down", ("s:1",), None)
    line = KeyValueFormatter().format(record)
    assert line.startswith("ts=") and line.endswith('level=warning logger=mcbroker msg="s:1 down"')


def test_stats_table_shows_every_group():
    stats = {
        "version": "0.1.0", "pid": 7, "uptime": 1.5, "rss_bytes": 3 << 20, "hash": "rendezvous", "draining": False,
        "connected_workers": 2, "frames": 10, "ops": 12, "requests_by_op": {"get": 10, "set": 2}, "ok": 9,
        "miss": 2, "errors": 1, "errors_by_kind": {"server_down": 1}, "timeouts": 0, "overloaded": 0, "inflight": 0,
        "buffered_bytes": 0, "requests_per_write": 3.0, "replies": 10, "replies_dropped": 0, "bad_frames": 0,
        "internal_errors": 0,
        "servers": {"127.0.0.1:11211": {"state": "up", "connections": 2, "depth": 0, "requests": 12, "errors": 0,
                                         "timeouts": 0, "resets": 0, "requests_per_write": 3.0,
                                         "latency_p50_us": 80.0, "latency_p99_us": 150.5, "latency_p999_us": None}},
    }
    out = statsview.table(stats)
    for words in ("pid 7", "rss 3.0 MiB", "get 10, set 2", "server_down 1", "127.0.0.1:11211", "150.5", "p999 us"):
        assert words in out, (words, out)
