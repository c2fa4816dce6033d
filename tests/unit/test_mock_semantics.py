"""MockClient against memcached's rules, one rule per test (the holes mutation testing found in
tests/unit/test_mock.py). Expected values come from protocol.txt and from memcached 1.6.18 driven
by hand with the meta commands the broker sends (`mg ... N<ttl> R<ttl>`, `md <key> I T<ttl>`,
`mg ... T<ttl>`, `ma`), never from the mock's own output.
"""

from __future__ import annotations

from typing import Any

import pytest

from clientlib import MockClient
from clientlib.errors import MemcacheClientError

from test_mock import FakeClock, clock, mc  # noqa: F401 - the clock and the fixtures, shared

pytestmark = pytest.mark.unit

MIB = 1 << 20
THIRTY_DAYS = 60 * 60 * 24 * 30  # protocol.txt: a longer TTL is a Unix time


def with_flags(clock: FakeClock) -> MockClient:
    """A mock whose reads return (value, client flags): pymemcache's legacy deserializer API."""
    return MockClient(clock=clock, serializer=lambda k, v: (v, 0), deserializer=lambda k, v, f: (v, f))


# --- get_or_set: memcached's lease (protocol.txt, "Meta Get": N, R, W, X, Z) -----------------------


def test_get_or_set_returns_a_stored_value_without_calling_fn(clock: FakeClock, mc: MockClient) -> None:
    mc.set("k", b"stored", expire=100)
    assert mc.get_or_set("k", lambda: pytest.fail("fn must not run on a hit")) == b"stored"
    clock.advance(100)  # expired: a miss again
    assert mc.get_or_set("k", lambda: b"fresh", expire=100) == b"fresh"
    assert mc.get("k") == b"fresh"


def test_a_missing_key_is_computed_once_and_stored(mc: MockClient) -> None:
    calls = []
    assert mc.get_or_set("k", lambda: calls.append(1) or b"v") == b"v"
    assert mc.get_or_set("k", lambda: calls.append(1) or b"w") == b"v"
    assert calls == [1]


def test_while_the_winner_computes_others_see_a_pending_lease(mc: MockClient) -> None:
    # N: a miss creates an empty item and wins its caller (W); the next caller gets that empty
    # item with Z, and a plain get reads it as a miss (the broker's translation of the placeholder).
    seen: dict[str, Any] = {}

    def winner() -> bytes:
        seen["get"] = mc.get("k", default="miss")
        seen["other"] = mc.get_or_set("k", lambda: b"others", wait=0)  # pending: computes, stores nothing
        seen["after_other"] = mc.get("k", default="miss")
        return b"winners"

    assert mc.get_or_set("k", winner) == b"winners"
    assert seen == {"get": "miss", "other": b"others", "after_other": "miss"}
    assert mc.get("k") == b"winners"


def test_a_write_during_the_computation_wins_over_the_fill(mc: MockClient) -> None:
    # The winner fills with cas against its lease's cas: a value stored meanwhile stays, and the
    # winner's value goes only to its own caller (clientlib/lease.py).
    def winner() -> bytes:
        mc.set("k", b"written meanwhile")
        return b"winners"

    assert mc.get_or_set("k", winner) == b"winners"
    assert mc.get("k") == b"written meanwhile"


def test_a_placeholder_lapses_after_lease_ttl(clock: FakeClock, mc: MockClient) -> None:
    # N<lease_ttl>: the empty item lives lease_ttl seconds; after that the next caller wins.
    seen = {}

    def slow_winner() -> bytes:
        clock.advance(9)
        seen["before"] = mc.get_or_set("k", lambda: b"too early", wait=0)
        clock.advance(1)
        seen["after"] = mc.get_or_set("k", lambda: b"second winner", wait=0)
        return b"first winner"

    mc.get_or_set("k", slow_winner, lease_ttl=10)
    assert seen == {"before": b"too early", "after": b"second winner"}
    assert mc.get("k") == b"second winner"  # the first winner's cas no longer matches


def test_a_failed_computation_deletes_the_placeholder(mc: MockClient) -> None:
    def boom() -> bytes:
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        mc.get_or_set("k", boom)
    # The next caller wins at once and stores (it does not find someone else's lease).
    assert mc.get_or_set("k", lambda: b"v", wait=0) == b"v"
    assert mc.get("k") == b"v"


def test_recache_wins_one_caller_when_the_remaining_ttl_is_below_recache_ttl(clock: FakeClock, mc: MockClient) -> None:
    # protocol.txt, R(token): "if remaining TTL is less than token, win for recache".
    mc.set("k", b"old", expire=100)
    clock.advance(90)  # 10 s left: not less than 10
    assert mc.get_or_set("k", lambda: pytest.fail("not due yet"), expire=100, recache_ttl=10) == b"old"
    clock.advance(1)  # 9 s left
    seen = {}

    def winner() -> bytes:
        seen["other"] = mc.get_or_set("k", lambda: pytest.fail("the other caller uses the old value"),
                                      expire=100, recache_ttl=10, wait=0)
        return b"new"

    assert mc.get_or_set("k", winner, expire=100, recache_ttl=10) == b"new"
    assert seen == {"other": b"old"}
    assert mc.get("k") == b"new"
    clock.advance(50)  # the refreshed value has 50 s left: not due
    assert mc.get_or_set("k", lambda: pytest.fail("not due"), expire=100, recache_ttl=10) == b"new"


def test_a_value_without_expiry_is_never_due_for_recache(clock: FakeClock, mc: MockClient) -> None:
    mc.set("k", b"forever")
    clock.advance(10**6)
    assert mc.get_or_set("k", lambda: pytest.fail("never due"), expire=100, recache_ttl=10) == b"forever"


def test_an_invalidated_key_is_recomputed_by_one_caller_the_others_get_the_stale_value(mc: MockClient) -> None:
    mc.set("k", b"old")
    assert mc.invalidate("k", 30) is True
    assert mc.get("k") == b"old"  # a stale item still reads
    seen = {}

    def winner() -> bytes:
        seen["other"] = mc.get_or_set("k", lambda: pytest.fail("another caller won"), wait=0)
        return b"new"

    assert mc.get_or_set("k", winner) == b"new"
    assert seen == {"other": b"old"}
    assert mc.get("k") == b"new"
    assert mc.get_or_set("k", lambda: pytest.fail("fresh again")) == b"new"


def test_a_stale_empty_value_is_a_value_not_a_lease_in_progress(mc: MockClient) -> None:
    # X marks the empty item as a stored (stale) value: neither the winner's failure deletes it,
    # nor does another caller wait for it.
    mc.set("k", b"")
    mc.invalidate("k", 30)
    seen = {}

    def failing_winner() -> bytes:
        seen["other"] = mc.get_or_set("k", lambda: pytest.fail("stale value: no compute"), wait=0)
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        mc.get_or_set("k", failing_winner)
    assert seen == {"other": b""}
    assert mc.get("k") == b""  # kept: it was not the winner's placeholder


def test_invalidate_of_a_missing_key_is_false_and_creates_nothing(mc: MockClient) -> None:
    assert mc.invalidate("zz", 30) is False
    assert mc.get("zz") is None


def test_an_invalidated_item_lives_stale_ttl_more_seconds(clock: FakeClock, mc: MockClient) -> None:
    # md I T<ttl>: T updates the TTL when paired with I (protocol.txt, "Meta Delete").
    mc.set("k", b"v")  # no expiry
    mc.invalidate("k", 30)
    clock.advance(29)
    assert mc.get("k") == b"v"
    clock.advance(1)
    assert mc.get("k") is None


# --- expiry, flags, TTLs kept by each store mode -----------------------------------------------------


def test_thirty_days_is_still_a_relative_ttl(clock: FakeClock, mc: MockClient) -> None:
    # protocol.txt: relative "may not exceed 60*60*24*30"; only a larger number is a Unix time.
    mc.set("k", b"v", expire=THIRTY_DAYS)
    clock.advance(THIRTY_DAYS - 1)
    assert mc.get("k") == b"v"
    clock.advance(1)
    assert mc.get("k") is None
    mc.set("k", b"v", expire=THIRTY_DAYS + 1)  # a Unix time in 1970: already past
    assert mc.get("k") is None


@pytest.mark.parametrize("mode", ["add", "replace", "cas"])
def test_each_store_mode_stores_the_flags_and_ttl_it_was_given(clock: FakeClock, mode: str) -> None:
    m = with_flags(clock)
    if mode != "add":
        m.set("k", b"old", flags=1)
    _, token = m.gets("k")
    call = {
        "add": lambda: m.add("k", b"new", expire=10, flags=7),
        "replace": lambda: m.replace("k", b"new", expire=10, flags=7),
        "cas": lambda: m.cas("k", b"new", token, expire=10, flags=7),
    }[mode]
    assert call() is True
    assert m.get("k") == (b"new", 7)
    clock.advance(10)
    assert m.get("k") is None


def test_touch_sets_a_new_ttl(clock: FakeClock, mc: MockClient) -> None:
    mc.set("k", b"v", expire=100)
    assert mc.touch("k", 5) is True
    clock.advance(5)
    assert mc.get("k") is None


def test_delete_of_an_item_with_a_ttl(clock: FakeClock, mc: MockClient) -> None:
    mc.set("k", b"v", expire=100)
    assert mc.delete("k") is True
    mc.set("e", b"v", expire=5)
    clock.advance(5)
    assert mc.delete("e") is False  # expired: not found


def test_incr_that_grows_the_value_keeps_flags_and_ttl_and_changes_the_cas(clock: FakeClock) -> None:
    # memcached replaces the item with a longer one; flags and expiry are the old item's.
    m = with_flags(clock)
    m.set("n", b"9", flags=5, expire=10)
    _, before = m.gets("n")
    assert m.incr("n", 1) == 10
    value, after = m.gets("n")
    assert value == (b"10", 5)
    assert after.isdigit() and after != before
    clock.advance(10)
    assert m.get("n") is None


def test_a_negative_number_cannot_be_incremented(mc: MockClient) -> None:
    for text in (b"-1", b"-2"):
        mc.set("n", text)
        with pytest.raises(MemcacheClientError):
            mc.incr("n", 1)
    mc.set("n", b"-0")  # strtoull reads 0
    assert mc.incr("n", 1) == 1


def test_append_counts_the_items_client_flags_at_the_size_limit(mc: MockClient) -> None:
    # The item is 48 + key + 1 + 4 (flags != 0) + value + 2 + 8 (cas) bytes (clientlib/limits.py,
    # measured against memcached 1.6.18): with flags set, 4 fewer bytes of value fit.
    largest = MIB - (48 + 1 + 1 + 4 + 2 + 8)
    mc.set("k", b"a" * (largest - 5), flags=3)
    assert mc.append("k", b"b" * 6) is False
    assert mc.append("k", b"b" * 5) is True


def test_flush_all_with_a_one_second_delay(clock: FakeClock, mc: MockClient) -> None:
    mc.set("k", b"v")
    assert mc.flush_all(delay=1) is True
    assert mc.get("k") == b"v"
    clock.advance(1)
    assert mc.get("k") is None


def test_a_frame_limit_above_the_default_carries_large_values(clock: FakeClock) -> None:
    # max_frame_bytes (default 4 MiB) raised to 16 MiB and memcached's -I to 32 MiB: a 5 MiB value
    # is stored and read back, as through a broker configured so.
    m = MockClient(clock=clock, max_frame_bytes=16 * MIB, item_size_max=32 * MIB)
    big = b"x" * (5 * MIB)
    assert m.set("k", big) is True
    assert m.get("k") == big


# --- stats --------------------------------------------------------------------------------------------


def test_general_stats_of_an_idle_server(clock: FakeClock, mc: MockClient) -> None:
    import os

    clock.advance(100)
    s = mc.stats()
    assert s[b"pid"] == os.getpid()  # the "server" runs in this process
    assert s[b"uptime"] == 100  # seconds since the server started, on the mock's clock
    assert isinstance(s[b"time"], int)
    assert s[b"evictions"] == 0  # nothing is ever evicted
    assert s[b"limit_maxbytes"] == 64 * MIB  # memcached's default -m 64


def test_curr_items_and_bytes_leave_out_expired_items(clock: FakeClock, mc: MockClient) -> None:
    mc.set("short", b"12", expire=5)
    mc.set("long", b"123", expire=50)
    clock.advance(5)
    s = mc.stats()
    assert s[b"curr_items"] == 1 and s[b"bytes"] == 3


def test_stats_settings(mc: MockClient) -> None:
    # As memcached 1.6.18's `stats settings` with default options, read as pymemcache reads them.
    s = mc.stats("settings")
    assert s[b"maxbytes"] == 64 * MIB
    assert s[b"evictions"] == b"on"
    assert mc.cache_memlimit(100) is True
    assert mc.stats("settings")[b"maxbytes"] == 100 * MIB


def test_broker_stats_answers_without_a_broker(mc: MockClient) -> None:
    assert isinstance(mc.broker_stats(), dict)



# --- counters: what memcached 1.6.18 counts for each command the broker sends ------------------------

COUNTERS = (
    "cmd_get", "get_hits", "get_misses", "cmd_set", "cmd_touch", "touch_hits", "touch_misses", "delete_hits",
    "delete_misses", "incr_hits", "incr_misses", "decr_hits", "decr_misses", "cas_hits", "cas_misses",
    "cas_badval", "cmd_flush", "total_items", "curr_items",
)


def counted(mc: MockClient, call: Any) -> dict[str, int]:
    """The counters `call()` changed, and by how much."""
    before = mc.stats()
    call()
    after = mc.stats()
    return {name: after[name.encode()] - before[name.encode()] for name in COUNTERS
            if after[name.encode()] != before[name.encode()]}


def test_counters_follow_memcached(mc: MockClient) -> None:
    # Each expected change was read from `stats` of memcached 1.6.18 (Debian bookworm) around the
    # command the broker sends for the call (broker/meta.py), one command at a time. Quirks kept:
    # a get-and-touch hit counts as a touch only; its miss as a get miss; a lease get's miss
    # creates an item and counts as a hit; `md I` counts nothing; an incr that lengthens the value
    # stores a new item (total_items), one that keeps its length rewrites it in place.
    steps: list[tuple[Any, dict[str, int]]] = [
        (lambda: mc.set("a", b"1"), {"cmd_set": 1, "total_items": 1, "curr_items": 1}),
        (lambda: mc.get("a"), {"cmd_get": 1, "get_hits": 1}),
        (lambda: mc.get("zz"), {"cmd_get": 1, "get_misses": 1}),
        (lambda: mc.gets("a"), {"cmd_get": 1, "get_hits": 1}),
        (lambda: mc.gat("a", 100), {"cmd_touch": 1, "touch_hits": 1}),
        (lambda: mc.gats("a", 100), {"cmd_touch": 1, "touch_hits": 1}),
        (lambda: mc.gat("zz", 100), {"cmd_get": 1, "get_misses": 1}),
        (lambda: mc.touch("a", 10), {"cmd_touch": 1, "touch_hits": 1}),
        (lambda: mc.touch("zz", 10), {"cmd_touch": 1, "touch_misses": 1}),
        (lambda: mc.get_many(["a", "b", "zz"]), {"cmd_get": 3, "get_hits": 1, "get_misses": 2}),
        (lambda: mc.incr("n", 1), {"incr_misses": 1}),
        (lambda: mc.decr("n", 1), {"decr_misses": 1}),
        (lambda: mc.set("n", b"5"), {"cmd_set": 1, "total_items": 1, "curr_items": 1}),
        (lambda: mc.incr("n", 1), {"incr_hits": 1}),
        (lambda: mc.decr("n", 1), {"decr_hits": 1}),
        (lambda: mc.incr("n", 10), {"incr_hits": 1, "total_items": 1}),  # "5" -> "15": a new item
        (lambda: mc.decr("n", 6), {"decr_hits": 1}),  # "15" -> "9 ": in place
        (lambda: mc.incr("n", 1), {"incr_hits": 1}),  # "9 " -> "10": same length, in place
        (lambda: mc.cas("zz", b"x", 1), {"cmd_set": 1, "cas_misses": 1}),
        (lambda: mc.cas("n", b"x", 10**9), {"cmd_set": 1, "cas_badval": 1}),
        (lambda: mc.cas("n", b"x", mc.gets("n")[1]), {"cmd_get": 1, "get_hits": 1, "cmd_set": 1, "cas_hits": 1,
                                                      "total_items": 1}),
        (lambda: mc.add("a", b"x"), {"cmd_set": 1}),
        (lambda: mc.replace("zz", b"x"), {"cmd_set": 1}),
        (lambda: mc.append("a", b"x"), {"cmd_set": 1, "total_items": 1}),
        (lambda: mc.append("zz", b"x"), {"cmd_set": 1}),
        # mg N on a miss (a hit that creates the placeholder), then the winner's fill (ms C<cas>)
        (lambda: mc.get_or_set("L", lambda: b"v"), {"cmd_get": 1, "get_hits": 1, "total_items": 2,
                                                    "curr_items": 1, "cmd_set": 1, "cas_hits": 1}),
        (lambda: mc.get_or_set("L", lambda: b"w"), {"cmd_get": 1, "get_hits": 1}),
        (lambda: mc.invalidate("a", 30), {}),
        (lambda: mc.invalidate("zz", 30), {"delete_misses": 1}),
        (lambda: mc.delete("a"), {"delete_hits": 1, "curr_items": -1}),
        (lambda: mc.delete("zz"), {"delete_misses": 1}),
        (lambda: mc.flush_all(), {"cmd_flush": 1, "curr_items": -2}),
    ]
    for n, (call, expected) in enumerate(steps):
        assert counted(mc, call) == expected, f"step {n}"


def test_invalidate_bumps_the_cas(mc: MockClient) -> None:
    # protocol.txt, Meta Delete: "I: invalidate. mark as stale, bumps CAS." A cas with a token
    # read before the invalidation is refused (memcached 1.6.18: EXISTS).
    mc.set("k", b"v")
    _, token = mc.gets("k")
    assert mc.invalidate("k", 30) is True
    _, after = mc.gets("k")
    assert after != token
    assert mc.cas("k", b"w", token) is False
    assert mc.get("k") == b"v"


def test_a_minus_sign_reads_as_strtoull_reads_it(mc: MockClient) -> None:
    # memcached's safe_strtoull: strtoull negates "-N" modulo 2**64 and memcached refuses the
    # result only when it is negative as a signed 64-bit number (checked on memcached 1.6.18).
    mc.set("n", b"-9223372036854775809")  # 2**64 - (2**63 + 1) = 2**63 - 1
    assert mc.incr("n", 1) == 2**63
    mc.set("n", b"-18446744073709551615")  # 2**64 - (2**64 - 1) = 1
    assert mc.decr("n", 1) == 0
    for refused in (b"-9223372036854775808", b"-1", b"-18446744073709551616"):  # 2**63; 2**64 - 1; ERANGE
        mc.set("n", refused)
        with pytest.raises(MemcacheClientError):
            mc.incr("n", 1)
    mc.set("n", b"+42")
    assert mc.incr("n", 1) == 43


def test_counters_are_cumulative(mc: MockClient) -> None:
    # protocol.txt: "Cumulative number of ..." - each miss adds one, not sets one.
    for _ in range(2):
        mc.delete("zz")
        mc.invalidate("zz", 30)
        mc.cas("zz", b"x", 1)
        mc.incr("zz", 1)
        mc.decr("zz", 1)
        mc.flush_all()
    mc.set("k", b"v")
    for _ in range(2):
        mc.cas("k", b"x", 10**9)
    s = mc.stats()
    assert (s[b"delete_misses"], s[b"cas_misses"], s[b"cas_badval"]) == (4, 2, 2)
    assert (s[b"incr_misses"], s[b"decr_misses"], s[b"cmd_flush"]) == (2, 2, 2)


def test_a_non_numeric_value_gets_memcacheds_message(mc: MockClient) -> None:
    mc.set("n", b"abc")
    with pytest.raises(MemcacheClientError, match="cannot increment or decrement non-numeric value"):
        mc.incr("n", 1)
