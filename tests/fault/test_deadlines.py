"""Deadlines against a real memcached that stops answering (SIGSTOP).

A call fails with BrokerTimeout at its own deadline, not memcached's; the answers memcached sends
after it resumes are swallowed by the requests that gave up, so later requests get their own
answers; a connection silent past io_timeout_ms is reset; and one stuck server never holds up
requests for keys on other servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from brokerproc import BrokerProcess
from clientlib import Client
from clientlib.errors import BrokerTimeout, MemcacheError, ServerUnavailable
from fakemc import keys_held_by, pause_fully
from pool import connect, wait_for
from timing import FAST, FAST_DEADLINE, LATE

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(90)]

DEADLINE = 0.5
# tests/timing.py: a deadline is checked with LATE (1.5 s) of tolerance for a loaded machine.
SLACK = LATE


def value_of(key: str) -> bytes:
    return b"value-of:" + key.encode()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.monotonic()
    try:
        out: object = fn()
    except MemcacheError as exc:
        out = exc
    return out, time.monotonic() - start


def concurrently(client: Client, calls: dict[str, Callable[[], object]]) -> dict[str, tuple[object, float]]:
    """Run the calls at once, one thread each, each thread's socket to the broker connected first;
    (outcome or exception, seconds) per name."""
    results: dict[str, tuple[object, float]] = {}
    barrier = threading.Barrier(len(calls))

    def run(name: str, fn: Callable[[], object]) -> None:
        connect(client)
        barrier.wait(30)
        results[name] = timed(fn)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a call hung"
    return results


def test_paused_server_calls_time_out_at_their_deadline_and_late_answers_are_swallowed(memcached, broker_factory):
    # Mark-down and io resets off: the late answers must arrive on the very connections the
    # timed-out requests were written to, and be swallowed there.
    broker = broker_factory([memcached.address], failure_limit=1000, io_timeout_ms=60000)
    setup = Client(broker.url, timeout=3.0)
    keys = [f"late{i}" for i in range(16)]
    assert setup.set_many({k: value_of(k) for k in keys}) == []
    quick = Client(broker.url, timeout=DEADLINE)

    pause_fully(memcached)
    try:
        calls: dict[str, Callable[[], object]] = {k: (lambda k=k: quick.get(k)) for k in keys[:8]}
        calls["many"] = lambda: quick.get_many(keys[8:])
        calls["gets"] = lambda: quick.gets(keys[0])
        results = concurrently(quick, calls)
        for name, (outcome, elapsed) in results.items():
            assert isinstance(outcome, BrokerTimeout), f"{name}: {outcome!r}"
            assert DEADLINE - 0.05 <= elapsed <= DEADLINE + SLACK, f"{name} took {elapsed:.3f}s"
        # memcached stays paused until the broker has timed out every request itself: a frame
        # reaches the broker a moment after the client starts its clock, and under load that
        # moment can outlast the client's grace, so without this wait memcached could answer
        # inside the broker's deadline (seen once beside another suite: 0 timeouts counted).
        give_up = time.monotonic() + 30
        while broker.stats()["servers"][memcached.address]["timeouts"] < 8 + 8 + 1:
            assert time.monotonic() < give_up, broker.stats()["servers"][memcached.address]
            time.sleep(0.05)
    finally:
        memcached.resume()

    # Every request written above is answered now, in order, ahead of anything new on the same
    # connections: those answers must die with their requests, not reach the callers below.
    after = concurrently(setup, {k: (lambda k=k: setup.get(k)) for k in reversed(keys)})
    for k, (outcome, _) in after.items():
        assert outcome == value_of(k), f"{k}: {outcome!r}"
    assert setup.get_many(keys) == {k: value_of(k) for k in keys}
    stats = broker.stats()
    server = stats["servers"][memcached.address]
    assert server["resets"] == 0, "late answers were swallowed, not cured by a reset"
    assert server["timeouts"] == 8 + 8 + 1
    assert stats["inflight"] == 0


def test_connection_silent_past_io_timeout_is_reset(memcached, broker_factory):
    broker = broker_factory([memcached.address], io_timeout_ms=700, timeout_ms=5000)
    client = Client(broker.url, timeout=3.0)
    assert client.set("io", b"before") is True
    resets = broker.stats()["servers"][memcached.address]["resets"]

    pause_fully(memcached)
    try:
        outcome, elapsed = timed(lambda: client.get("io"))
    finally:
        memcached.resume()
    # Failed by the io timeout (0.7 s), before the call's own 3 s deadline (0.7 + LATE < 3).
    assert isinstance(outcome, BrokerTimeout), repr(outcome)
    assert 0.6 <= elapsed <= 0.7 + LATE, f"took {elapsed:.3f}s"
    assert broker.stats()["servers"][memcached.address]["resets"] == resets + 1
    assert client.get("io") == b"before"
    assert client.set("io", b"after") is True and client.get("io") == b"after"


def test_paused_server_is_marked_down_fails_fast_and_comes_back(memcached, broker_factory):
    # io resets off: only the three timeouts may mark the server down (each reset of a silent
    # connection counts as a failure too, and would mark it down on its own within the wait below).
    broker = broker_factory(
        [memcached.address], failure_limit=3, probe_interval_ms=100, probe_max_interval_ms=300, io_timeout_ms=60_000
    )
    client = Client(broker.url, timeout=DEADLINE)
    connect(client)
    assert client.set("md", b"v") is True
    pause_fully(memcached)
    try:
        for _ in range(3):
            outcome, elapsed = timed(lambda: client.get("md"))
            assert isinstance(outcome, BrokerTimeout), repr(outcome)
            assert elapsed <= DEADLINE + SLACK
        # Three timeouts in a row: the server is down, and calls no longer wait for it. The client
        # gives up on its own clock, a little before the broker times the third one out on its own.
        wait_for(lambda: broker.stats()["servers"][memcached.address]["state"] != "up", 10, "marked down")
        patient = Client(broker.url, timeout=FAST_DEADLINE)
        outcome, elapsed = timed(lambda: patient.get("md"))
        assert isinstance(outcome, ServerUnavailable), repr(outcome)
        assert elapsed < FAST, f"a call to a down server took {elapsed:.3f}s"
    finally:
        memcached.resume()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        outcome, _ = timed(lambda: client.get("md"))
        if outcome == b"v":
            break
        time.sleep(0.05)
    assert outcome == b"v", f"never recovered: {outcome!r}"
    assert broker.stats()["servers"][memcached.address]["ejections"] == 1


@pytest.mark.parametrize("how", ["paused", "killed"])
def test_a_stuck_server_does_not_hold_up_other_servers(memcached_factory, broker_factory, how):
    stuck, healthy = memcached_factory(2)
    broker: BrokerProcess = broker_factory([stuck.address, healthy.address])
    client = Client(broker.url, timeout=3.0)
    keys = [f"spread{i}" for i in range(60)]
    assert client.set_many({k: value_of(k) for k in keys}) == []
    on_stuck = sorted(keys_held_by(stuck, keys))
    on_healthy = sorted(keys_held_by(healthy, keys))
    assert sorted(on_stuck + on_healthy) == sorted(keys) and on_stuck and on_healthy

    quick = Client(broker.url, timeout=DEADLINE)
    if how == "paused":
        pause_fully(stuck)
    else:
        stuck.kill()
    try:
        calls: dict[str, Callable[[], object]] = {}
        for k in on_stuck[:6]:
            calls[k] = lambda k=k: quick.get(k)
        for k in on_healthy[:6]:
            calls[k] = lambda k=k: quick.get(k)
        calls["mixed"] = lambda: quick.get_many(on_stuck[:5] + on_healthy[:5])
        results = concurrently(quick, calls)
        for name, (outcome, elapsed) in results.items():
            assert elapsed <= DEADLINE + SLACK, f"{name} took {elapsed:.3f}s"
            if name in on_healthy:
                assert outcome == value_of(name), f"{name}: {outcome!r}"
            else:
                assert isinstance(outcome, MemcacheError), f"{name}: {outcome!r}"
        # While the stuck server has requests hanging, the healthy one keeps answering (within the
        # client's deadline: a value, not a timeout).
        for k in on_healthy:
            outcome, elapsed = timed(lambda: client.get(k))
            assert outcome == value_of(k), f"{k}: {outcome!r} after {elapsed:.3f}s"
        assert client.set(on_healthy[0], b"changed") is True
        assert client.get(on_healthy[0]) == b"changed"
    finally:
        if how == "paused":
            stuck.resume()


def test_frames_answered_while_an_older_one_waits_on_a_stuck_server_do_not_stay_in_memory(
    memcached_factory, broker_factory
):
    # The broker keeps each frame in a deadline heap until its deadline, or until it reaches the
    # top answered. A frame waiting on a stopped memcached sits at the top for its whole deadline;
    # every frame answered behind it must still let go of its values. Before, 4 workers reading
    # 50 x 10 KB per call from the healthy server took the broker from 33 to 634 MiB in 8 s.
    from harness import rss_bytes

    stuck, healthy = memcached_factory(2)
    # io_timeout past the test: the stopped server's connection is not reset (which would answer
    # the waiting frame with an error) while the healthy one is read.
    broker: BrokerProcess = broker_factory([stuck.address, healthy.address], io_timeout_ms=60_000)
    # The same timeout as the waiting call below: each call has a later deadline, so sits behind it.
    # Long, so that a slow machine still makes enough calls (a count, not a time, ends the loop).
    timeout = 30.0
    client = Client(broker.url, timeout=timeout)
    keys = [f"held{i}" for i in range(200)]
    value = b"v" * 10_000
    assert client.set_many({k: value for k in keys}) == []
    on_stuck = sorted(keys_held_by(stuck, keys))
    on_healthy = sorted(keys_held_by(healthy, keys))[:50]
    assert on_stuck and len(on_healthy) == 50
    enough = 250  # 250 calls of 500 KB: 125 MB if frames kept their values
    pause_fully(stuck)
    try:
        waiting = threading.Thread(target=lambda: timed(lambda: Client(broker.url, timeout=timeout).get(on_stuck[0])))
        waiting.start()
        # Its frame is in the broker, waiting on the stopped server.
        wait_for(lambda: broker.stats()["servers"][stuck.address]["depth"] >= 1, 10, "the waiting frame sent")
        base = rss_bytes(broker.pid)
        calls = 0
        end = time.monotonic() + 20.0
        while calls < enough and time.monotonic() < end:
            assert client.get_many(on_healthy) == {k: value for k in on_healthy}
            calls += 1
            if calls % 50 == 0 and rss_bytes(broker.pid) - base > 200 * (1 << 20):
                break  # failing already: no need to push a shared machine further
        grown = rss_bytes(broker.pid) - base
        assert waiting.is_alive(), "the waiting frame was answered: the test did not test anything"
    finally:
        stuck.resume()  # the waiting frame then gets its answer
    waiting.join(10)
    print(f"{calls} calls of 50 x 10 KB behind a waiting frame: broker RSS +{grown / (1 << 20):.1f} MiB")
    assert grown < 40 * (1 << 20), f"broker RSS grew {grown / (1 << 20):.1f} MiB over {calls} answered calls"
    assert calls * len(on_healthy) * len(value) > 100 * (1 << 20), f"only {calls} calls: too few to tell"
