"""Public bug reports against memcached clients and proxies, replayed through a real broker and
compared with pymemcache talking to the same memcached 1.6.18 directly (issue 8).

- Item size limits (Django ticket 16358, memcached #40 / #1069, pymemcache #377): a set that fails
  for size unlinks the old item, as the text protocol does; add / replace / append / prepend / cas
  that fail for size change nothing (memcached's meta `ms` would unlink in every mode).
- A CLIENT_ERROR that keeps the stream in step fails its own request only (mcrouter #334).
- A memcached restart costs at most one failed call, not seconds of fast failures (pylibmc #234).
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable

import pytest
from pymemcache.client.base import Client as Direct

from clientlib import Client, MemcacheClientError, MemcacheServerError
from timing import LATE
from clientlib.limits import item_size

pytestmark = pytest.mark.integration

MIB = 1 << 20


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """What a call did, comparable across pymemcache and clientlib: its return value, or the
    name of the exception class (both libraries use pymemcache's names)."""
    try:
        return ("returned", call())
    except Exception as exc:  # noqa: BLE001 - the class is the outcome being compared
        return ("raised", type(exc).__name__)


def direct(server: Any) -> Direct:
    host, _, port = server.address.rpartition(":")
    return Direct((host, int(port)), timeout=5, connect_timeout=5, default_noreply=False)


@pytest.fixture
def one_mib(memcached_factory, broker_factory):
    (mc,) = memcached_factory(1, extra_args=("-I", "1m"))
    broker = broker_factory([mc.address])  # the default broker config
    return mc, broker


@pytest.mark.parametrize("size", [MIB + 1, 2 * MIB, 5 * MIB])  # 5 MiB: past the 4 MiB frame too
def test_a_set_too_large_for_the_server_raises_and_unlinks_the_old_value(one_mib, size):
    mc, broker = one_mib
    ours, theirs = Client(broker.url, timeout=5.0), direct(mc)
    for client, key in ((theirs, "d"), (ours, "b")):
        client.set(key, b"old")
    big = b"v" * size
    assert outcome(lambda: theirs.set("d", big)) == ("raised", "MemcacheServerError")
    assert outcome(lambda: ours.set("b", big)) == ("raised", "MemcacheServerError")
    # memcached unlinks the item when a set fails for size, so no stale value stays readable.
    assert theirs.get("d") is None
    assert ours.get("b") is None
    assert broker.stats()["servers"][mc.address]["resets"] == 0


@pytest.mark.parametrize("mode", ["add", "replace", "append", "prepend", "cas"])
def test_other_store_modes_too_large_leave_the_old_value(one_mib, mode):
    mc, broker = one_mib
    ours, theirs = Client(broker.url, timeout=5.0), direct(mc)
    value = b"v" * (MIB - 10)  # passes a naive length check, does not fit memcached's item
    results = {}
    for name, client, key in (("direct", theirs, "d-" + mode), ("broker", ours, "b-" + mode)):
        client.set(key, b"old")
        if mode == "cas":
            _, token = client.gets(key)
            results[name] = outcome(lambda: client.cas(key, value, token))
        else:
            results[name] = outcome(lambda: getattr(client, mode)(key, value))
        assert client.get(key) == b"old", f"{name}: {mode} of a too-large value changed the item"
    assert results["broker"] == results["direct"]


def test_the_size_rule_matches_memcached_at_the_boundary(one_mib):
    # The largest value memcached stores for this key, found by asking it; the broker must agree
    # on both sides of that line for a mode it checks itself (replace).
    mc, broker = one_mib
    ours, theirs = Client(broker.url, timeout=5.0), direct(mc)
    key = "boundary"
    lo, hi = MIB // 2, MIB
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if outcome(lambda: theirs.set(key, b"x" * mid))[0] == "returned":
            lo = mid
        else:
            hi = mid - 1
    largest = lo
    assert item_size(len(key), largest) <= MIB < item_size(len(key), largest + 1)
    ours.set(key, b"old")
    assert outcome(lambda: ours.replace(key, b"y" * (largest + 1))) == ("raised", "MemcacheServerError")
    assert ours.get(key) == b"old"
    assert ours.replace(key, b"y" * largest) is True
    assert ours.get(key) == b"y" * largest


def test_a_server_with_a_larger_item_limit_is_used_to_its_limit(memcached_factory, broker_factory):
    # pymemcache #377: users run -I 2m and more. The broker asks each server its limit.
    (mc,) = memcached_factory(1, extra_args=("-I", "4m"))
    broker = broker_factory([mc.address], max_frame_bytes=8 * MIB, max_buffered_bytes=64 * MIB)
    client = Client(broker.url, timeout=10.0, max_frame_bytes=8 * MIB)
    small = {f"s{i}": b"%d" % i for i in range(50)}
    client.set_many(small)
    big = bytes(range(256)) * (3 * MIB // 256)
    assert client.set("big", big) is True
    for _ in range(3):
        # Large values interleaved with small reads on the same pipelines harm neither.
        got = client.get_many(["big", *small])
        assert got.pop("big") == big and got == small
    assert broker.stats()["servers"][mc.address]["item_size_max"] == 4 * MIB
    client.set("big", b"old")
    with pytest.raises(MemcacheServerError, match="too large"):
        client.set("big", b"z" * (4 * MIB + 1))
    assert client.get("big") is None


def _shared_connection_worker(url: str, rounds: int, out: Any) -> None:
    client = Client(url, timeout=5.0)
    failures = []
    for r in range(rounds):
        for i in range(20):
            key = f"b{i}"
            try:
                assert client.set(key, b"%d-%d" % (r, i)) is True
                assert client.get(key) == b"%d-%d" % (r, i)
            except Exception as exc:  # noqa: BLE001 - reported to the parent as the failure
                failures.append(f"{key}: {exc!r}")
    out.put(failures)


def test_client_error_to_incr_fails_only_its_own_request(mc, broker_factory):
    broker = broker_factory([mc.address], connections_per_server=1)
    a = Client(broker.url, timeout=5.0)
    a.set("n", b"abc")
    assert outcome(lambda: direct(mc).incr("n", 1)) == ("raised", "MemcacheClientError")
    results: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    worker = multiprocessing.get_context("fork").Process(target=_shared_connection_worker, args=(broker.url, 10, results))
    worker.start()
    try:
        raised = 0
        deadline = time.monotonic() + 30
        while worker.is_alive() and time.monotonic() < deadline and raised < 500:
            with pytest.raises(MemcacheClientError, match="non-numeric"):
                a.incr("n", 1)
            raised += 1
        failures = results.get(timeout=30)
    finally:
        worker.join(10)
    assert raised > 0
    assert failures == [], failures[:5]
    assert a.get("n") == b"abc"
    assert broker.stats()["servers"][mc.address]["resets"] == 0


@pytest.mark.parametrize("down_for", [0.3, 3.0])
def test_memcached_restart_is_back_in_use_at_once(memcached_factory, broker_factory, down_for):
    (mc,) = memcached_factory(1)
    broker = broker_factory([mc.address])
    client = Client(broker.url, timeout=1.0)
    assert client.set("k", b"v") is True
    mc.stop()
    time.sleep(down_for)
    mc.restart()  # same port, empty
    back = time.monotonic()
    first_ok = None
    failed = 0
    while time.monotonic() - back < 10:
        try:
            assert client.set("k", b"again") is True
            first_ok = time.monotonic()
            break
        except Exception:  # noqa: BLE001 - every failure here is counted, then retried
            failed += 1
            time.sleep(0.005)
    assert first_ok is not None, "the server never came back into use"
    # Issue 8 asks for 0.2 s; checked as the probe interval (100 ms) plus LATE (tests/timing.py).
    assert first_ok - back < 0.1 + LATE, f"back in use {first_ok - back:.3f}s after memcached answered ({failed} failures)"
    assert client.get("k") == b"again"


def test_an_idle_connection_closed_by_memcached_reconnects_without_counting_a_failure(memcached_factory, broker_factory):
    # memcached closes idle connections with -o idle_timeout; a restart does the same. The server
    # is fine: the next call must succeed and no failure may count toward a mark-down.
    (mc,) = memcached_factory(1, extra_args=("-o", "idle_timeout=1"))
    broker = broker_factory([mc.address], failure_limit=1)
    client = Client(broker.url, timeout=2.0)
    assert client.set("k", b"v") is True
    time.sleep(2.5)  # idle past the timeout: memcached closes both broker connections
    assert client.get("k") == b"v"
    s = broker.stats()["servers"][mc.address]
    assert s["ejections"] == 0 and s["errors"] == 0 and s["state"] == "up"
