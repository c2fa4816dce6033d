"""broker/health.py: backoff with jitter, mark-down, probe scheduling, flapping. No clocks: every
call gets an explicit `now`, as the broker's loop gives it."""

from __future__ import annotations

import random

import pytest

from broker.health import Health, State, backoff

pytestmark = pytest.mark.unit

BASE = 0.2
CAP = 3.0
# The rule (README "Many servers"; exponential backoff with equal jitter), written out rather than
# computed as health.py computes it: the probe step for attempt n is BASE doubled n times, capped
# at CAP; a delay lies in [step / 2, step].
STEPS = [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 3.0]


def step_of(attempt: int) -> float:
    return STEPS[attempt] if attempt < len(STEPS) else CAP


class _Fixed(random.Random):
    """An rng whose random() always returns the same number, to pin the jitter's ends."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def _health(limit: int = 3, fast_window: float = 0.0) -> Health:
    # fast_window 0: the exponential backoff from the first failed probe (tested on its own below).
    return Health(failure_limit=limit, probe_interval=BASE, probe_max_interval=CAP, fast_window=fast_window)


def _down(h: Health, now: float) -> None:
    for _ in range(h.failure_limit):
        h.record_failure(now, "boom")
    assert h.state is State.DOWN


# --- backoff -----------------------------------------------------------------------------------


def test_backoff_stays_within_half_to_full_step() -> None:
    rng = random.Random(3)
    for attempt in range(40):
        step = step_of(attempt)
        for _ in range(200):
            d = backoff(attempt, BASE, CAP, rng)
            assert step / 2 <= d <= step <= CAP


def test_backoff_ends_of_the_jitter() -> None:
    assert backoff(0, BASE, CAP, _Fixed(0.0)) == pytest.approx(BASE / 2)
    assert backoff(0, BASE, CAP, _Fixed(0.999999)) == pytest.approx(BASE, rel=1e-5)
    assert backoff(2, BASE, CAP, _Fixed(0.0)) == pytest.approx(BASE * 4 / 2)
    assert backoff(100, BASE, CAP, _Fixed(0.999999)) == pytest.approx(CAP, rel=1e-5)


def test_backoff_doubles_until_the_cap() -> None:
    lows = [backoff(a, BASE, CAP, _Fixed(0.0)) for a in range(8)]
    assert lows[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert lows[5:] == pytest.approx([CAP / 2] * 3)


def test_backoff_jitter_spreads_retries() -> None:
    rng = random.Random(7)
    values = [backoff(3, BASE, CAP, rng) for _ in range(500)]
    # equal jitter over [0.8, 1.6]: retries of many brokers never line up on one instant
    assert len(set(values)) == 500
    assert min(values) < 0.9 and max(values) > 1.5


def test_backoff_huge_attempt_does_not_overflow() -> None:
    assert CAP / 2 <= backoff(10**9, BASE, CAP) <= CAP


# --- failure counting and mark-down ------------------------------------------------------------


def test_marked_down_after_failure_limit_consecutive_failures() -> None:
    h = _health(limit=3)
    assert h.is_up and h.ejections == 0
    assert h.record_failure(1.0, "a") is False
    assert h.record_failure(1.1, "b") is False
    assert h.state is State.UP
    assert h.record_failure(1.2, "c") is True
    assert h.state is State.DOWN and not h.is_up
    assert h.ejections == 1
    assert h.last_error == "c"


def test_mark_down_is_reported_once() -> None:
    h = _health(limit=2)
    results = [h.record_failure(1.0 + i / 10, f"e{i}") for i in range(6)]
    assert results == [False, True, False, False, False, False]
    assert h.ejections == 1


def test_failure_limit_one_ejects_at_once() -> None:
    h = _health(limit=1)
    assert h.record_failure(5.0, "x") is True
    assert h.state is State.DOWN


def test_success_resets_the_count() -> None:
    h = _health(limit=3)
    for i in range(50):
        # two failures, a success: never three in a row
        assert h.record_failure(i, "f") is False
        assert h.record_failure(i, "f") is False
        h.record_success()
        assert h.failures == 0
    assert h.state is State.UP and h.ejections == 0


# --- probes ------------------------------------------------------------------------------------


def test_first_probe_is_due_after_the_probe_interval() -> None:
    h = _health()
    _down(h, 10.0)
    assert 10.0 + BASE / 2 <= h.probe_at <= 10.0 + BASE
    assert not h.probe_due(10.0)
    assert not h.probe_due(h.probe_at - 1e-6)
    assert h.probe_due(h.probe_at)
    assert h.probe_due(h.probe_at + 100)


def test_no_probe_while_up_or_probing() -> None:
    h = _health()
    assert not h.probe_due(1e9)
    _down(h, 0.0)
    h.start_probe()
    assert h.state is State.PROBING
    assert not h.probe_due(1e9)  # one probe at a time


def test_failed_probes_back_off_up_to_the_cap() -> None:
    h = _health()
    now = 0.0
    _down(h, now)
    delays = []
    for _ in range(12):
        now = h.probe_at
        assert h.probe_due(now)
        h.start_probe()
        h.probe_failed(now, "refused")
        assert h.state is State.DOWN
        assert h.last_error == "refused"
        delays.append(h.probe_at - now)
    for attempt, d in enumerate(delays, start=1):
        step = step_of(attempt)
        assert step / 2 <= d <= step
    assert max(delays) <= CAP
    assert h.ejections == 1  # failed probes are not new ejections


def test_successful_probe_brings_it_back() -> None:
    h = _health()
    _down(h, 0.0)
    now = h.probe_at
    h.start_probe()
    h.probe_succeeded(now)
    assert h.state is State.UP and h.is_up
    assert h.failures == 0
    assert not h.probe_due(now + 100)
    # the failure count starts over: it takes failure_limit new failures to eject again
    assert h.record_failure(now + 100, "x") is False
    assert h.record_failure(now + 100, "x") is False
    assert h.record_failure(now + 100, "x") is True
    assert h.ejections == 2


def test_failures_while_down_do_not_eject_again() -> None:
    h = _health(limit=2)
    _down(h, 0.0)
    probe_at = h.probe_at
    for _ in range(10):
        assert h.record_failure(0.01, "late") is False
    assert h.ejections == 1
    assert h.probe_at == probe_at  # stragglers do not push the probe back


# --- flapping ----------------------------------------------------------------------------------


def _cycle(h: Health, down_at: float, failed_probes: int) -> tuple[float, float]:
    """Eject at `down_at`, fail `failed_probes` probes, then succeed. Returns (first probe delay,
    time it came back)."""
    _down(h, down_at)
    first = h.probe_at - down_at
    now = down_at
    for _ in range(failed_probes):
        now = h.probe_at
        h.start_probe()
        h.probe_failed(now, "refused")
    now = h.probe_at
    h.start_probe()
    h.probe_succeeded(now)
    return first, now


def test_flapping_server_backs_off_longer_each_time() -> None:
    h = _health()
    lows = []
    t = 0.0
    for _ in range(6):
        # ejected again right after each recovery: a flapping server
        _, back = _cycle(h, t, failed_probes=0)
        lows.append(h.probe_attempt)
        t = back + 0.01
    assert lows == [0, 1, 2, 3, 4, 5]
    _down(h, t)
    # attempt 6 is past the cap: the delay is in [CAP/2, CAP], far above the first probe's
    assert CAP / 2 <= h.probe_at - t <= CAP


def test_flapping_continues_from_the_last_outage() -> None:
    h = _health()
    _, back = _cycle(h, 0.0, failed_probes=3)  # came back on the 4th probe: attempt 3
    assert h.probe_attempt == 3
    _down(h, back + 0.5)
    assert h.probe_attempt == 4
    step = step_of(4)
    assert step / 2 <= h.probe_at - (back + 0.5) <= step


def test_server_stable_for_the_max_interval_starts_over() -> None:
    h = _health()
    _, back = _cycle(h, 0.0, failed_probes=4)
    assert h.probe_attempt == 4
    later = back + CAP + 1.0  # stayed up longer than the longest probe interval
    _down(h, later)
    assert h.probe_attempt == 0
    assert later + BASE / 2 <= h.probe_at <= later + BASE


def test_first_ejection_uses_the_base_interval_even_late_in_life() -> None:
    h = _health()
    _down(h, 1e6)
    assert h.probe_attempt == 0
    assert 1e6 + BASE / 2 <= h.probe_at <= 1e6 + BASE


def test_probes_stay_at_the_base_interval_during_a_short_outage() -> None:
    # A restart takes a second or so: probing every BASE (with jitter) brings the server back
    # within one BASE of answering, instead of after an ever longer backoff.
    h = _health(fast_window=10.0)
    _down(h, 100.0)
    now = h.probe_at
    while now < 110.0:
        h.start_probe()
        h.probe_failed(now, "refused")
        assert BASE / 2 <= h.probe_at - now <= BASE
        now = h.probe_at
    # Past the window the backoff grows: one doubling per failed probe, up to the cap.
    delays = []
    for _ in range(6):
        h.start_probe()
        h.probe_failed(now, "refused")
        delays.append(h.probe_at - now)
        now = h.probe_at
    for attempt, d in enumerate(delays, start=1):
        step = step_of(attempt)
        assert step / 2 <= d <= step


def test_a_restart_loop_is_probed_at_the_base_interval_each_time() -> None:
    # memcached restarted every few seconds: each outage is short, so each is probed every BASE
    # (with jitter) however often it happened before; the flapping backoff applies only to an
    # outage that outlasts the fast window.
    h = _health(fast_window=10.0)
    now = 0.0
    for _ in range(6):
        _down(h, now)
        assert BASE / 2 <= h.probe_at - now <= BASE
        now = h.probe_at
        h.start_probe()
        h.probe_failed(now, "refused")
        assert BASE / 2 <= h.probe_at - now <= BASE
        now = h.probe_at
        h.start_probe()
        h.probe_succeeded(now)
        now += 3.0  # up for 3 s, then restarted again
    assert h.ejections == 6


# --- edges found by mutation testing ----------------------------------------------------------


def test_a_new_server_is_up_with_no_error_to_report() -> None:
    # The router says "connecting" for a server without a last error: that needs it empty.
    h = _health()
    assert h.is_up and h.state is State.UP
    assert (h.failures, h.ejections, h.last_error) == (0, 0, "")


@pytest.mark.parametrize("probing", [False, True], ids=["down", "probing"])
def test_a_success_brings_a_server_that_is_not_up_back_up(probing: bool) -> None:
    h = _health()
    _down(h, 5.0)
    if probing:
        h.start_probe()
    h.record_success()
    assert h.state is State.UP and h.is_up
    assert h.failures == 0


def test_a_flapping_server_is_probed_at_the_base_interval_within_the_fast_window() -> None:
    # Late in the process's life (a monotonic clock at 1000 s): ejected again 1 s after it came
    # back, it is flapping, yet the first fast_window of this outage still probes every BASE.
    h = _health(fast_window=10.0)
    _down(h, 1000.0)
    h.start_probe()
    h.probe_succeeded(1000.5)
    _down(h, 1001.5)
    assert h.probe_attempt == 1  # the flapping is remembered for after the window
    assert BASE / 2 <= h.probe_at - 1001.5 <= BASE


def test_up_for_exactly_the_longest_probe_interval_is_not_flapping() -> None:
    # "Ejected again before it stayed up for the longest probe interval": at exactly CAP it did stay.
    h = _health()
    _cycle(h, 0.0, failed_probes=2)
    h.probe_succeeded(20.0)
    _down(h, 20.0 + CAP)
    assert h.probe_attempt == 0
    h2 = _health()
    _cycle(h2, 0.0, failed_probes=2)
    h2.probe_succeeded(20.0)
    _down(h2, 20.0 + CAP - 0.25)
    assert h2.probe_attempt == 3


def test_the_fast_window_ends_exactly_fast_window_seconds_after_the_mark_down() -> None:
    # The window is [down_since, down_since + fast_window): a probe failing at its end backs off.
    h = _health(fast_window=10.0)
    _down(h, 100.0)
    h.start_probe()
    h.probe_failed(109.5, "refused")
    assert h.probe_attempt == 0
    assert BASE / 2 <= h.probe_at - 109.5 <= BASE
    h.start_probe()
    h.probe_failed(110.0, "refused")
    assert h.probe_attempt == 1
    assert step_of(1) / 2 <= h.probe_at - 110.0 <= step_of(1)


def test_configure_changes_the_settings_and_keeps_the_history() -> None:
    h = _health(limit=3)
    _down(h, 0.0)
    h.start_probe()
    h.probe_succeeded(1.0)
    h.configure(failure_limit=1, probe_interval=0.5, probe_max_interval=8.0)
    assert (h.failure_limit, h.ejections, h.state) == (1, 1, State.UP)
    assert h.record_failure(100.0, "reset") is True  # one failure is the new limit
    assert 100.0 + 0.25 <= h.probe_at <= 100.0 + 0.5  # the new base interval (attempt 0)
    now = h.probe_at
    for _ in range(7):
        h.start_probe()
        h.probe_failed(now, "refused")  # fast_window 0: each failed probe doubles the step
        delay, now = h.probe_at - now, h.probe_at
    # attempt 7: 0.5 s * 2**7 = 64 s, capped at the new maximum of 8 s: a delay in [4, 8]
    assert h.probe_attempt == 7
    assert 4.0 <= delay <= 8.0
