"""Process faults under self-verifying load (tests/verify.py), each ending with the reconciliation
and the no-misdelivery / no-lost-write checks:

- memcached kill -9 and restart on the same port;
- memcached SIGSTOP, then SIGCONT;
- broker kill -9 and restart on the same socket with live clients (the same Client recovers);
- a worker killed in the middle of a call.

What is already covered elsewhere, and not repeated here: the timing of a killed server's mark-down,
fail-fast and return (tests/fault/test_many_servers.py::test_killed_server_under_load), the first
call after a memcached restart (tests/integration/test_outside_reports.py), per-call deadlines and
swallowed late answers with a stopped memcached (tests/fault/test_deadlines.py), and one Client
across a broker restart, SIGSTOP and death (tests/integration/test_client_faults.py). These tests
add the counters and the verified values to the same faults, with several worker processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from typing import Any

import pytest

from clientlib import Client
from clientlib.errors import MemcacheError
from timing import LATE
from verify import COUNTERS, Tally, delta, reconcile, run_worker, summary

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

PROCS = 3
THREADS = 2
SECONDS = 4.0
TIMEOUT = 1.0
TOLERANCE = LATE  # stated tolerance over each call's deadline (tests/timing.py)


class Load:
    """PROCS forked worker processes running verify.run_worker; `gen` is shared with them."""

    def __init__(self, url: str, prefix: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self.out = ctx.Queue()
        self.gen = ctx.Value("i", 0)
        self.procs = [
            ctx.Process(target=run_worker,
                        args=(url, w, THREADS, SECONDS, 100_000, TIMEOUT, TOLERANCE, prefix, 8, self.out, w),
                        kwargs={"gen": self.gen})
            for w in range(PROCS)
        ]
        for p in self.procs:
            p.start()

    def collect(self) -> list[Tally]:
        tallies = []
        deadline = time.monotonic() + SECONDS + TIMEOUT + 60
        try:
            while len(tallies) < PROCS and time.monotonic() < deadline:
                try:
                    tallies.append(self.out.get(timeout=0.5))
                except Exception:  # queue.Empty
                    pass
        finally:
            for p in self.procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        assert len(tallies) == PROCS, f"{PROCS - len(tallies)} workers did not report"
        return tallies


def total_of(tallies: list[Tally]) -> Tally:
    total = Tally()
    for t in tallies:
        total = total + t
    return total


def common_checks(total: Tally, excuse: tuple[float, float] | None = None) -> None:
    assert not total.crashed, total.crashed[0]
    assert total.misdelivered == [], total.misdelivered[:5]
    lost = total.lost
    if excuse is not None:
        killed, restarted = excuse
        lost = [x for x in lost if not (x[1] <= restarted and x[2] >= killed)]
    assert lost == [], lost[:5]
    assert total.late == [], total.late[:5]
    assert sum(total.outcomes.values()) == total.calls


def test_memcached_kill_9_and_restart_on_the_same_port(memcached, broker_factory):
    broker = broker_factory([memcached.address], timeout_ms=1000)
    before = broker.stats()
    load = Load(broker.url, f"mckill-{uuid.uuid4().hex[:8]}")
    time.sleep(1.0)
    killed = time.monotonic()
    memcached.kill()
    time.sleep(0.6)
    memcached.restart()
    restarted = time.monotonic()
    total = total_of(load.collect())
    after = broker.stats()
    print(f"\nmemcached kill -9: {summary(total)}")
    # A killed memcached loses what it held: reads after the kill of states acknowledged before
    # the restart are excused (and counted by the soak as "killed servers").
    common_checks(total, excuse=(killed, restarted))
    assert reconcile(delta(before, after), total) == []
    failures = sum(v for k, v in total.outcomes.items() if k.startswith("error:") or k == "timeout")
    assert failures > 0, total.outcomes  # the kill was felt...
    assert after["servers"][memcached.address]["state"] == "up"  # ...and is over
    c = Client(broker.url, timeout=5.0)
    c.set("after-restart", b"1")
    assert c.get("after-restart") == b"1"


def test_memcached_sigstop_then_sigcont(memcached, broker_factory):
    broker = broker_factory([memcached.address], timeout_ms=1000, io_timeout_ms=1500)
    before = broker.stats()
    load = Load(broker.url, f"mcstop-{uuid.uuid4().hex[:8]}")
    time.sleep(1.0)
    memcached.pause()
    try:
        time.sleep(1.5)
    finally:
        memcached.resume()
    total = total_of(load.collect())
    after = broker.stats()
    print(f"\nmemcached SIGSTOP 1.5 s: {summary(total)}")
    # Nothing is excused: a stopped memcached keeps its data.
    common_checks(total)
    assert reconcile(delta(before, after), total) == []
    assert total.codes["timeouts"] > 0 or total.outcomes["error:ServerUnavailable"] > 0, total.codes


def test_broker_kill_9_and_restart_with_live_clients(memcached, broker_factory):
    broker = broker_factory([memcached.address], timeout_ms=1000)
    load = Load(broker.url, f"brkill-{uuid.uuid4().hex[:8]}")
    time.sleep(1.0)
    broker.kill()  # SIGKILL, reaped: the old broker can send nothing more
    # A reply the old broker sent just before the kill may still sit in a worker's queue: let the
    # workers take it (their next calls fail fast meanwhile) before the generation turns, so that
    # every reply counted from now on comes from the new broker.
    time.sleep(0.3)
    load.gen.value = 1
    broker.start(ping=False)
    tallies = load.collect()
    total = total_of(tallies)
    after = broker.stats()
    new = total.by_gen[1]
    print(f"\nbroker kill -9: {summary(total)}; after the kill: {dict(new)}")
    common_checks(total)
    # The new broker's counters against what the workers saw after the kill. The final stats
    # call is one frame and one op in, its reply and its ok not yet counted.
    assert after["frames"] - 1 == after["replies"] + after["replies_dropped"] + after["noreply"] + after["dropped_frames"]
    assert after["replies"] == new["replies"]  # every reply it sent was received
    assert after["ops"] - 1 == after["ok"] + after["miss"] + after["errors"] + after["timeouts"]
    for cls in ("ok", "miss", "errors", "timeouts"):
        assert after[cls] == new[cls], (cls, after[cls], dict(new))
    # Frames sent after the kill that never reached the new broker: sent to the dying one, or
    # waiting for a connection until their deadline (BrokerTimeout). Those that found nothing
    # listening failed at once (BrokerUnavailable) and are not counted as sent.
    lost_in_transit = new["frames"] - (after["frames"] - 1)
    assert 0 <= lost_in_transit <= total.outcomes["timeout"], (lost_in_transit, total.outcomes)
    for name in ("replies_dropped", "bad_frames", "internal_errors"):
        assert after[name] == 0, (name, after[name])
    assert total.unanswered <= total.outcomes["timeout"]
    # The same Client, in each worker process, recovered on its own.
    for t in tallies:
        assert t.by_gen[1]["ok"] > 0, summary(t)


def _stalled_get(url: str, key: str) -> None:
    Client(url, timeout=10.0).get(key)
    os._exit(0)


def test_worker_killed_in_the_middle_of_a_call(memcached, broker_factory):
    broker = broker_factory([memcached.address], timeout_ms=1000)
    setter = Client(broker.url, timeout=5.0)
    setter.set("mid-call", b"v")
    setter.disconnect_all()
    # One socket that stays: the broker's count of worker sockets, read through it, is 1 once every
    # other socket it has seen has closed (ZeroMQ's disconnect events come a little later).
    watcher = Client(broker.url, timeout=2.0)

    def only_the_watcher_left() -> None:
        deadline = time.monotonic() + 10
        while watcher.broker_stats()["connected_workers"] != 1:
            assert time.monotonic() < deadline, "the broker never saw the other worker sockets close"
            time.sleep(0.05)

    only_the_watcher_left()
    before = broker.stats()
    memcached.pause()  # the worker's get is written to memcached and waits there
    ctx = multiprocessing.get_context("fork")
    victim = ctx.Process(target=_stalled_get, args=(broker.url, "mid-call"))
    try:
        victim.start()
        deadline = time.monotonic() + 10
        while broker.stats()["inflight"] < 1:
            assert time.monotonic() < deadline, "the get never reached the broker"
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        # Until the broker has seen the victim's socket close (a fixed 0.5 s was not always enough
        # on a loaded machine: the answer then went out to a peer ZeroMQ still counted as there).
        only_the_watcher_left()
        time.sleep(0.2)  # the ROUTER drops the peer's pipe in the same turn of ZeroMQ's I/O thread
    finally:
        memcached.resume()
    # The answer comes back for a worker that is gone: dropped and counted, never delivered to
    # anyone else; the loop goes on. Meanwhile and afterwards, other workers are served.
    deadline = time.monotonic() + 10
    while broker.stats()["inflight"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    mid = broker.stats()
    watcher.disconnect_all()
    d = delta(before, mid)
    # Between the snapshots: the victim's frame, the polling stats frames (each answered).
    polls = d["frames"] - 1 - 1
    assert d["replies_dropped"] == 1, d
    assert d["replies"] - 1 == polls, d
    assert d["ops"] - 1 == d["ok"] - 1 + d["miss"] + d["errors"] + d["timeouts"]
    assert (d["bad_frames"], d["internal_errors"]) == (0, 0)

    load = Load(broker.url, f"victim-{uuid.uuid4().hex[:8]}")
    total = total_of(load.collect())
    after = broker.stats()
    common_checks(total)
    assert reconcile(delta(mid, after), total) == []
    assert total.outcomes["error:BrokerTimeout"] == 0 and total.outcomes["timeout"] == 0, total.outcomes
    assert set(COUNTERS) <= set(after)


def test_a_write_in_flight_when_its_server_is_marked_down_is_indeterminate(memcached, broker_factory):
    """Found by the SIGSTOP test's checker: at mark-down, requests already written to memcached
    failed as ServerUnavailable, which promises that nothing was sent, yet memcached applied them
    once it ran again. They are MemcacheUnexpectedCloseError now ("may or may not have been
    applied"); ServerUnavailable stays for requests refused before sending."""
    import threading

    from clientlib.errors import MemcacheUnexpectedCloseError, ServerUnavailable

    broker = broker_factory([memcached.address], failure_limit=1, io_timeout_ms=30000, probe_interval_ms=100)
    c = Client(broker.url, timeout=5.0)
    c.set("w", b"v1")
    # Connected now: its call below must reach the broker within a 0.3 s deadline.
    marker = Client(broker.url, timeout=5.0)
    assert marker.broker_ping() == "PONG"
    marker.timeout = 0.3
    memcached.pause()
    got: list[BaseException | None] = []
    try:
        writer = threading.Thread(target=lambda: got.append(_raises(lambda: Client(broker.url, timeout=5.0).set("w", b"v2"))))
        writer.start()
        deadline = time.monotonic() + 5
        while broker.stats()["inflight"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # written to memcached's socket
        # Another call's missed deadline on the silent server marks it down (failure_limit 1).
        assert isinstance(_raises(lambda: marker.get("other")), MemcacheError)
        writer.join(10)
    finally:
        memcached.resume()
    assert len(got) == 1 and isinstance(got[0], MemcacheUnexpectedCloseError), got
    assert not isinstance(got[0], ServerUnavailable)
    # Refused before sending while down: ServerUnavailable, and indeed nothing was sent.
    # Once memcached runs again it applies the write that was in flight.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert c.get("w") == b"v2"
            break
        except ServerUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _raises(fn: Any) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None
