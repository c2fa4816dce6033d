"""Each of toxiproxy's toxics between the broker and memcached (tests/faultproxy.py), under
self-verifying load from several worker processes (tests/verify.py).

For every toxic: nothing misdelivered; no acknowledged write lost (except across a killed
memcached, which loses everything by design); every call ends with exactly one outcome within its
deadline plus TOLERANCE; every request frame gets exactly one reply; and the broker's counters
reconcile with what the workers sent and received (frames in = replies + dropped + noreply; ops =
ok + miss + errors + timeouts, class by class equal to the status codes the replies carried; a
reply the broker counts as sent was received). Then the toxic is removed and a fresh call works.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from clientlib import Client
from faultproxy import FaultProxy
from harness import Memcached
from timing import LATE
from verify import Tally, delta, reconcile, run_worker, summary

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

PROCS = 3
THREADS = 2
SECONDS = 3.0
TIMEOUT = 1.0
# Stated tolerance over a call's deadline: the client waits 50 ms past it for the broker's
# TIMEOUT answer, and a loaded machine may run anything LATE late (tests/timing.py).
TOLERANCE = LATE


def _schedule(proxy: FaultProxy, mc: Memcached, steps: list[tuple[float, Callable[[], None]]]) -> list[tuple[str, float]]:
    """Run (at-seconds, action) steps against the clock; return when each ran."""
    start = time.monotonic()
    ran = []
    for at, action in steps:
        time.sleep(max(0.0, start + at - time.monotonic()))
        action()
        ran.append((getattr(action, "__name__", "step"), time.monotonic()))
    return ran


def _kill_window(mc: Memcached) -> tuple[Callable[[], None], Callable[[], None], dict[str, float]]:
    window: dict[str, float] = {}

    def kill() -> None:
        window["killed"] = time.monotonic()
        mc.kill()

    def restart() -> None:
        mc.restart()
        window["restarted"] = time.monotonic()

    return kill, restart, window


def run_load(url: str, prefix: str, during: Callable[[], None]) -> Tally:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=run_worker, args=(url, w, THREADS, SECONDS, 100_000, TIMEOUT, TOLERANCE, prefix, 8, out, w))
        for w in range(PROCS)
    ]
    for p in procs:
        p.start()
    tallies = []
    try:
        during()
        deadline = time.monotonic() + SECONDS + TIMEOUT + 60
        while len(tallies) < PROCS and time.monotonic() < deadline:
            try:
                tallies.append(out.get(timeout=0.5))
            except Exception:  # queue.Empty
                pass
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    assert len(tallies) == PROCS, f"{PROCS - len(tallies)} workers did not report"
    total = Tally()
    for t in tallies:
        total = total + t
    return total


TOXICS: dict[str, dict[str, Any]] = {
    # name: toxic parameters, whether it stays on for the whole load, what shows it acted
    "latency": {"set": {"latency_ms": 30, "jitter_ms": 20, "stream": "both"}},
    "bandwidth": {"set": {"rate_kbps": 64}},
    "slicer": {"set": {"size": 1, "stream": "both"}},
    "blackhole": {"set": {}, "window": (0.8, 1.5), "effect": "blackholed_bytes"},
    "reset_peer": {"set": {"timeout_ms": 0}, "pulses": 4, "effect": "resets"},
    "slow_close": {"set": {"delay_ms": 500, "stream": "both"}, "kill": True},
    "truncate": {"set": {"every": 10, "drop": 3}, "effect": "truncated_bytes"},
    "duplicate": {"set": {"every": 10}, "effect": "duplicated_chunks"},
}


@pytest.mark.parametrize("toxic", list(TOXICS))
def test_toxic_nothing_misdelivered_nothing_lost_counters_reconcile(memcached, broker_factory, toxic):
    spec = TOXICS[toxic]
    proxy = FaultProxy(memcached.address).start()
    try:
        broker = broker_factory([proxy.address], io_timeout_ms=1000, timeout_ms=1000)
        prefix = f"{toxic}-{uuid.uuid4().hex[:8]}"
        kill, restart, window = _kill_window(memcached)

        def on() -> None:
            proxy.set(toxic, **spec["set"])

        def off() -> None:
            proxy.clear()

        if "window" in spec:
            start, length = spec["window"]
            steps = [(start, on), (start + length, off)]
        elif "pulses" in spec:
            steps = []
            for n in range(spec["pulses"]):
                steps += [(0.4 + 0.6 * n, on), (0.5 + 0.6 * n, off)]
        elif spec.get("kill"):
            steps = [(0.0, on), (1.0, kill), (1.6, restart)]
        else:
            steps = [(0.0, on)]

        before = broker.stats()
        total = run_load(broker.url, prefix, lambda: _schedule(proxy, memcached, steps))
        after = broker.stats()
        proxy_stats = proxy.stats()
        proxy.clear()
        print(f"\n{toxic}: {summary(total)}\nproxy: {proxy_stats}")

        assert not total.crashed, total.crashed[0]
        assert total.misdelivered == [], total.misdelivered[:5]
        lost = total.lost
        if window:
            # A killed memcached loses what it held: excuse reads of states acknowledged before
            # it came back, seen after it went down.
            lost = [x for x in lost if not (x[1] <= window["restarted"] and x[2] >= window["killed"])]
        assert lost == [], lost[:5]
        assert total.late == [], total.late[:5]
        assert sum(total.outcomes.values()) == total.calls
        problems = reconcile(delta(before, after), total)
        assert problems == [], problems
        # The toxic acted, and did not stop all service.
        if "effect" in spec:
            assert proxy_stats[spec["effect"]] > 0, proxy_stats
        if spec.get("kill"):
            assert window and total.outcomes.get("timeout", 0) + sum(
                v for k, v in total.outcomes.items() if k.startswith("error:")) > 0, total.outcomes
        assert total.outcomes["hit"] + total.outcomes["stored"] > 0, total.outcomes
        if toxic == "blackhole":
            assert total.codes["timeouts"] > 0, total.codes
        if toxic in ("truncate", "duplicate", "reset_peer"):
            assert sum(v for k, v in total.outcomes.items() if k.startswith("error:")) > 0, total.outcomes

        # With the toxic gone, the same broker serves a fresh client correctly.
        c = Client(broker.url, timeout=5.0)
        deadline = time.monotonic() + 15
        while True:
            try:
                c.set(f"{prefix}:after", b"after")
                assert c.get(f"{prefix}:after") == b"after"
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proxy.stop()
