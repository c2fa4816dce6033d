"""broker/stats.py by its stated rules, each value worked out here and not read from the code:

- buckets: upper bounds 1 us * 1.1**i for i = 0..193 (1 us to ~100 s, each 10% above the last); a
  sample lands in the first bucket whose bound is >= the sample, and anything past the last bound in
  an overflow bucket reported as the last bound;
- a percentile is the nearest-rank one (rank = ceil(q * n), at least 1) reported as its bucket's bound;
- the view is the current window and the previous one: a sample stays in view for WINDOW to
  2 * WINDOW seconds (10 to 20 s), and a whole window without samples forgets everything;
- rss_bytes is the resident set size, the second field of /proc/self/statm times the page size,
  as /proc/self/status reports it in VmRSS (kB); 0 where it cannot be read.
"""

from __future__ import annotations

import io
import math

import pytest

from broker import stats
from broker.stats import CODE_NAMES, OP_NAMES, WINDOW, LatencyWindow
from clientlib.wire import Code, Op

pytestmark = pytest.mark.unit

US = 1e-6


def bound(i: int) -> float:
    """The i-th bucket's upper bound, as the module's docstring states the rule."""
    return US * 1.1**i


def bucket_of(seconds: float) -> float:
    """The reported value of a sample alone: the least bound >= it (the last bound past the end)."""
    for i in range(194):
        if bound(i) >= seconds:
            return bound(i)
    return bound(193)


def p(window: LatencyWindow, q: float, now: float) -> tuple[float | None, int]:
    (v,), n = window.percentiles((q,), now)
    return v, n


def test_the_window_is_ten_seconds_and_bounds_span_1us_to_100s():
    assert WINDOW == 10.0
    assert stats.BOUNDS[0] == pytest.approx(1e-6)
    assert len(stats.BOUNDS) == 194
    assert 95.0 < stats.BOUNDS[-1] < 105.0  # "~100 s"
    for a, b in zip(stats.BOUNDS, stats.BOUNDS[1:]):
        assert b == pytest.approx(a * 1.1)


@pytest.mark.parametrize("i", [0, 1, 5, 50, 120, 193])
def test_a_sample_on_a_bound_is_in_that_bucket_and_just_above_it_in_the_next(i):
    w = LatencyWindow()
    w.record(bound(i), now=100.0)
    assert p(w, 0.5, 100.0) == (pytest.approx(bound(i), rel=1e-12), 1)
    w = LatencyWindow()
    w.record(bound(i) * (1 + 1e-9), now=100.0)
    expected = bound(i + 1) if i < 193 else bound(193)  # past the last bound: reported as the last
    assert p(w, 0.5, 100.0) == (pytest.approx(expected, rel=1e-12), 1)


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 5e-7])
def test_samples_at_or_under_a_microsecond_read_as_one_microsecond(seconds):
    w = LatencyWindow()
    w.record(seconds, now=100.0)
    assert p(w, 0.99, 100.0) == (pytest.approx(1e-6), 1)


@pytest.mark.parametrize("seconds", [200.0, 1e6])
def test_samples_past_the_last_bound_read_as_the_last_bound(seconds):
    w = LatencyWindow()
    w.record(seconds, now=100.0)
    w.record(seconds, now=100.0)
    got, n = p(w, 0.5, 100.0)
    assert n == 2 and got == pytest.approx(bound(193), rel=1e-12)


def test_nearest_rank_over_ten_samples_in_ten_buckets():
    # Sample k (k = 1..10) sits in the middle of bucket 10*k, so its reported value is bound(10*k).
    w = LatencyWindow()
    for k in range(10, 0, -1):  # recorded out of order: ranks come from the buckets, not the order
        w.record(bound(10 * k) * 0.97, now=50.0)
    qs = (0.0, 0.05, 0.1, 0.11, 0.5, 0.51, 0.9, 0.95, 0.999, 1.0)
    got, n = w.percentiles(qs, now=55.0)
    assert n == 10
    for q, v in zip(qs, got):
        rank = max(1, math.ceil(round(q * 10, 9)))  # nearest rank: ceil(q * n), at least 1
        assert v == pytest.approx(bound(10 * rank), rel=1e-12), (q, rank)


def test_percentiles_of_equal_samples_with_several_quantiles():
    w = LatencyWindow()
    for _ in range(3):
        w.record(2e-3, now=7.0)
    w.record(1.0, now=7.0)
    (p50, p75, p99), n = w.percentiles((0.5, 0.75, 0.99), now=7.5)
    assert n == 4
    assert p50 == p75 == pytest.approx(bucket_of(2e-3), rel=1e-12)  # ranks 2 and 3 of 4
    assert p99 == pytest.approx(bucket_of(1.0), rel=1e-12)  # rank 4 of 4


def test_lifetime_count_and_total():
    w = LatencyWindow()
    assert (w.count, w.total) == (0, 0.0)
    for s, t in ((0.5, 1.0), (0.25, 30.0), (1.5, 100.0)):
        w.record(s, now=t)
    assert w.count == 3
    assert w.total == pytest.approx(2.25)


def test_a_new_window_with_nothing_recorded_has_nothing_to_report():
    w = LatencyWindow()
    assert w.percentiles((0.5, 0.99, 0.999), now=0.0) == ([None, None, None], 0)
    assert w.percentiles((0.5, 0.99), now=5.0) == ([None, None], 0)
    assert w.percentiles((0.5,), now=1e6) == ([None], 0)


def test_a_sample_stays_in_view_from_10_to_20_seconds():
    w = LatencyWindow()
    w.record(1e-3, now=100.0)
    for now, seen in ((100.0, 1), (109.999, 1), (110.0, 1), (119.999, 1), (120.0, 0), (125.0, 0)):
        assert p(w, 0.5, now)[1] == seen, now


def test_a_window_boundary_moves_the_older_samples_out_of_view():
    # One sample at 100 s opens the window [100, 110); one at exactly 110 s opens the next.
    w = LatencyWindow()
    w.record(1.0, now=100.0)
    w.record(1e-3, now=110.0)
    assert w.percentiles((0.5, 1.0), now=115.0) == (
        [pytest.approx(bucket_of(1e-3)), pytest.approx(bucket_of(1.0))], 2
    )  # both in view: the older one is 15 s old
    # From 120 s the sample of 100 s (20 s old) is out; the one of 110 s stays until 130 s.
    assert p(w, 1.0, 120.0) == (pytest.approx(bucket_of(1e-3)), 1)
    assert p(w, 1.0, 129.999) == (pytest.approx(bucket_of(1e-3)), 1)
    assert p(w, 1.0, 130.0) == (None, 0)


def test_a_sample_after_a_whole_idle_window_does_not_bring_back_older_ones():
    w = LatencyWindow()
    w.record(1.0, now=100.0)  # window [100, 110)
    w.record(1e-3, now=120.0)  # 20 s later: the window [110, 120) had nothing
    assert p(w, 1.0, 125.0) == (pytest.approx(bucket_of(1e-3)), 1)  # the 1 s sample is 25 s old


def test_a_sample_in_the_next_window_keeps_the_previous_one_in_view():
    w = LatencyWindow()
    w.record(1.0, now=100.0)  # window [100, 110)
    w.record(1e-3, now=119.0)  # the next window, not a whole one later
    assert p(w, 1.0, 119.5) == (pytest.approx(bucket_of(1.0)), 2)  # the 1 s sample is 19.5 s old
    assert p(w, 0.5, 119.5) == (pytest.approx(bucket_of(1e-3)), 2)


def test_names_are_the_wire_names_in_lower_case():
    assert OP_NAMES[int(Op.GET)] == "get"
    assert CODE_NAMES[int(Code.OK)] == "ok"
    assert len(OP_NAMES) == len(Op) and len(CODE_NAMES) == len(Code)


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                assert unit == "kB"
                return int(value) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_rss_bytes_is_the_resident_set_size():
    before = _vm_rss_bytes()
    got = stats.rss_bytes()
    after = _vm_rss_bytes()
    # The two readings of the kernel's counter bracket the one under test, give or take 4 MiB of
    # allocation in between (the virtual size or the shared pages are far from it).
    assert min(before, after) - (4 << 20) <= got <= max(before, after) + (4 << 20)
    assert got % 4096 == 0 and got > 0


@pytest.mark.parametrize("content", [b"", b"12", b"12 x 3", b"\xff\xfe"])
def test_rss_bytes_is_0_for_an_unreadable_statm(monkeypatch, content):
    monkeypatch.setattr(stats, "open", lambda *a, **k: io.BytesIO(content), raising=False)
    assert stats.rss_bytes() == 0


def test_rss_bytes_is_0_without_proc(monkeypatch):
    def no_proc(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/statm")

    monkeypatch.setattr(stats, "open", no_proc, raising=False)
    assert stats.rss_bytes() == 0


def test_rss_bytes_reads_the_resident_field_of_statm(monkeypatch):
    import os

    monkeypatch.setattr(stats, "open", lambda *a, **k: io.BytesIO(b"1000 37 5 1 0 20 0\n"), raising=False)
    assert stats.rss_bytes() == 37 * os.sysconf("SC_PAGE_SIZE")
