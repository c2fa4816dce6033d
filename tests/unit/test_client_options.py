"""The Client's options and argument handling (clientlib/commands.py) as pymemcache defines them,
through MockClient (the Client code over memory) and, where the answer must be a failure or the
frame itself is the point, through the in-process ROUTER peer of test_client_peer.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from clientlib import Client, MockClient
from clientlib.errors import MemcacheIllegalInputError, MemcacheServerError
from clientlib.wire import Code, Op, encode_request
from test_client_peer import Answer, Peer, peer  # noqa: F401 - the peer fixture, shared

pytestmark = pytest.mark.unit

MIB = 1 << 20


def failing(op: list[Any]) -> list[Any]:
    return [Code.SERVER_ERROR, "out of memory storing object"]


# --- noreply: explicit, and default_noreply ----------------------------------------------------------


@pytest.mark.parametrize("default_noreply", [False, True])
def test_noreply_writes_do_not_wait_and_say_so_in_the_frame(peer: Callable[[Answer], Peer], default_noreply: bool) -> None:
    # pymemcache: noreply=None means default_noreply; with noreply the call returns its "success"
    # value at once (True, [] for set_many) and never sees the server's answer.
    p = peer(failing)
    c = Client(p.url, timeout=5, default_noreply=default_noreply)
    explicit = {"noreply": True}
    assert c.set_many({"a": b"1", "b": b"2"}, **explicit) == []
    assert c.delete_many(["a", "b"], **explicit) is True
    assert c.flush_all(**explicit) is True
    assert c.delete("a", **explicit) is True
    if default_noreply:
        assert c.set_many({"a": b"1"}) == []
        assert c.delete_many(["a"]) is True
        assert c.flush_all() is True
        assert c.delete("a") is True
        assert c.touch("a", 5) is True
    with pytest.raises(MemcacheServerError):
        c.delete_many(["a"], noreply=False)  # waits, and the failure is raised
    with pytest.raises(MemcacheServerError):
        c.flush_all(noreply=False)


def test_noreply_frames_carry_the_noreply_flag(peer: Callable[[Answer], Peer]) -> None:
    p = peer(lambda op: [Code.MISS] if op[0] == Op.GET else [Code.OK])
    c = Client(p.url, timeout=5)
    c.set_many({"a": b"1"}, noreply=True)
    c.delete_many(["a"], noreply=True)
    c.flush_all(noreply=True)
    c.get("sync")  # a round trip: every frame before it has been read by the peer
    assert [op[0] for op in p.ops] == [Op.SET, Op.DELETE, Op.FLUSH_ALL, Op.GET]


def test_set_many_returns_the_keys_that_failed_with_ignore_exc(peer: Callable[[Answer], Peer]) -> None:
    # pymemcache's set_many: "a list of keys that failed to be inserted".
    p = peer(lambda op: [Code.SERVER_ERROR, "no memory"] if op[1] == b"bad" else [Code.OK])
    assert Client(p.url, timeout=5, ignore_exc=True).set_many({"a": b"1", "bad": b"2", "c": b"3"}) == ["bad"]
    with pytest.raises(MemcacheServerError, match="no memory"):
        Client(p.url, timeout=5).set_many({"a": b"1", "bad": b"2"})


def test_delete_and_touch_follow_default_noreply() -> None:
    m = MockClient(default_noreply=True)
    assert m.delete("missing") is True  # no answer awaited: True, as pymemcache
    assert m.touch("missing", 5) is True
    assert m.delete("missing", noreply=False) is False


# --- stats as pymemcache converts them ------------------------------------------------------------


def test_stats_conversions_and_merging(peer: Callable[[Answer], Peer]) -> None:
    # pymemcache's STAT_TYPES: rusage_* are floats written with ':' or '.', everything else is
    # tried as int and left as bytes otherwise. Several servers: numbers summed, the rest the
    # first server's (a stat that is a number on one server and text on another is text's turn).
    answer = {
        "mc1:11211": {"rusage_user": "1:5", "rusage_system": "0.25", "curr_items": "3", "odd": "7", "version": "1.6.18"},
        "mc2:11211": {"rusage_user": "2:0", "rusage_system": "0.5", "curr_items": "4", "odd": "n/a", "version": "1.6.9"},
    }
    p = peer(lambda op: [Code.OK, answer])
    s = Client(p.url, timeout=5).stats()
    assert s[b"rusage_user"] == 1.5 and s[b"rusage_system"] == 0.25  # floats: the first server's
    assert s[b"curr_items"] == 7
    assert s[b"odd"] == 7
    assert s[b"version"] == b"1.6.18"
    assert p.ops[0] == [Op.STATS, []]


def test_stats_arguments_are_sent_as_bytes(peer: Callable[[Answer], Peer]) -> None:
    p = peer(lambda op: [Code.OK, {"mc1:11211": {}}])
    c = Client(p.url, timeout=5)
    assert c.stats("slabs") == {}
    c.stats(b"items", 5)
    assert p.ops == [[Op.STATS, [b"slabs"]], [Op.STATS, [b"items", b"5"]]]


def test_a_failed_stats_is_empty_with_ignore_exc(peer: Callable[[Answer], Peer]) -> None:
    p = peer(failing)
    assert Client(p.url, timeout=5, ignore_exc=True).stats() == {}
    with pytest.raises(MemcacheServerError):
        Client(p.url, timeout=5).stats()


# --- constructor options -------------------------------------------------------------------------


def test_timeout_none_is_the_default_timeout() -> None:
    assert MockClient(timeout=None).timeout == 1.0  # Client's docstring: default 1 second


def test_max_frame_bytes_range_is_inclusive() -> None:
    # Commands: "max_frame_bytes must be an int in 512..1 << 30 (bytes)".
    assert MockClient(max_frame_bytes=1 << 30).max_frame_bytes == 1 << 30
    assert MockClient(max_frame_bytes=512).max_frame_bytes == 512
    for bad in ((1 << 30) + 1, 511):
        with pytest.raises(MemcacheIllegalInputError, match=r"512\.\.1073741824"):
            MockClient(max_frame_bytes=bad)


def test_pymemcache_socket_options_are_kept_as_attributes() -> None:
    assert MockClient(connect_timeout=2.5).connect_timeout == 2.5


def test_encoding_applies_to_values_the_raw_serde_turns_into_text() -> None:
    # pymemcache without a serde stores str(value).encode(encoding) for anything not bytes.
    class Name:
        def __str__(self) -> str:
            return "caf\u00e9"

    m = MockClient(encoding="utf-8")
    assert m.set("k", Name()) is True
    assert m.get("k") == "caf\u00e9".encode()
    m.set_many({"k2": Name()})
    assert m.get("k2") == "caf\u00e9".encode()
    with pytest.raises(MemcacheIllegalInputError):
        MockClient().set("k", Name())  # ascii, the default


def test_the_serializer_gets_the_callers_key() -> None:
    seen: list[Any] = []

    def ser(key: Any, value: Any) -> tuple[bytes, int]:
        seen.append(key)
        return b"v", 0

    m = MockClient(serializer=ser, deserializer=lambda k, v, f: v, key_prefix="p:")
    m.set("k1", 1)
    m.set_many({"k2": 2})
    m.add("k3", 3)
    assert seen == ["k1", "k2", "k3"]


@pytest.mark.parametrize("name, call", [
    ("expire", lambda m: m.set("k", b"v", expire="soon")),
    ("value", lambda m: m.incr("k", "one")),
    ("delay", lambda m: m.flush_all(delay="later")),
    ("memlimit", lambda m: m.cache_memlimit("big")),
])
def test_a_bad_number_names_its_argument(name: str, call: Callable[[MockClient], Any]) -> None:
    with pytest.raises(MemcacheIllegalInputError, match=rf"\b{name}\b"):
        call(MockClient())


def test_cache_memlimit_is_at_most_32_bits_and_incr_may_add_zero() -> None:
    m = MockClient()
    assert m.cache_memlimit((1 << 32) - 1) is True
    with pytest.raises(MemcacheIllegalInputError):
        m.cache_memlimit(1 << 32)
    m.set("n", b"5")
    assert m.incr("n", 0) == 5  # memcached accepts a delta of 0


def test_set_many_with_a_value_above_the_frame_limit_says_why() -> None:
    m = MockClient(max_frame_bytes=1 << 16)
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        m.set_many({"a": b"1", "big": b"x" * (1 << 17)})


def test_a_store_whose_frame_is_exactly_max_frame_bytes_is_sent() -> None:
    # "larger values are refused": a frame of exactly max_frame_bytes is not larger. The frame is
    # measured with the wire encoder at its largest header (request id 2**64-1, deadline 2**32-1).
    limit = 4096
    key = b"k"

    def frame_len(n: int) -> int:
        return len(encode_request((1 << 64) - 1, [[Op.SET, key, b"x" * n, 0, 0]], (1 << 32) - 1, 1))

    n = max(v for v in range(limit) if frame_len(v) <= limit)
    assert frame_len(n) == limit  # msgpack's bin header does not jump at this size
    m = MockClient(max_frame_bytes=limit)
    assert m.set("k", b"x" * n) is True
    assert m.get("k") == b"x" * n
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        m.set("k", b"x" * (n + 1))


# --- get_or_set and invalidate: their numbers and their fill ----------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"lease_ttl": 0}, "lease_ttl"),  # N<ttl>: the placeholder must lapse
    ({"lease_ttl": 1 << 31}, "lease_ttl"),
    ({"recache_ttl": -1}, "recache_ttl"),
    ({"recache_ttl": 1 << 31}, "recache_ttl"),
])
def test_get_or_set_refuses_bad_lease_numbers_naming_them(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(MemcacheIllegalInputError, match=rf"^{name} "):
        MockClient().get_or_set("k", lambda: b"v", **kwargs)


def test_get_or_set_accepts_the_smallest_and_largest_lease_numbers() -> None:
    m = MockClient()
    assert m.get_or_set("a", lambda: b"v", lease_ttl=1, recache_ttl=0) == b"v"
    assert m.get_or_set("b", lambda: b"v", lease_ttl=(1 << 31) - 1, recache_ttl=(1 << 31) - 1) == b"v"


@pytest.mark.parametrize("expire", [1, 60 * 60 * 24 * 30])
def test_a_recache_window_as_long_as_a_relative_expiry_is_refused(expire: int) -> None:
    # Every stored value would be due at once. 1 s and 30 days are both relative TTLs.
    with pytest.raises(MemcacheIllegalInputError, match="recache_ttl"):
        MockClient().get_or_set("k", lambda: b"v", expire=expire, recache_ttl=expire)


@pytest.mark.parametrize("stale_ttl, ok", [(0, False), (1, True), ((1 << 31) - 1, True), (1 << 31, False)])
def test_invalidate_stale_ttl_range(stale_ttl: int, ok: bool) -> None:
    m = MockClient()
    m.set("k", b"v")
    if ok:
        assert m.invalidate("k", stale_ttl) is True
    else:
        with pytest.raises(MemcacheIllegalInputError, match="^stale_ttl "):
            m.invalidate("k", stale_ttl)


def test_invalidate_follows_noreply_and_default_noreply() -> None:
    assert MockClient(default_noreply=True).invalidate("missing") is True  # no answer awaited
    assert MockClient().invalidate("missing", noreply=True) is True
    assert MockClient(default_noreply=True).invalidate("missing", noreply=False) is False


@pytest.mark.parametrize("cas_enabled", [True, False])
@pytest.mark.parametrize("default_noreply", [False, True])
def test_a_fill_that_memcached_refuses_raises(cas_enabled: bool, default_noreply: bool) -> None:
    # get_or_set's docstring: an exception from the fill propagates (the fill waits for its
    # answer whatever default_noreply says), and the placeholder is deleted.
    m = MockClient(item_size_max=1024, cas_enabled=cas_enabled, default_noreply=default_noreply)
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        m.get_or_set("k", lambda: b"x" * 2000)
    assert m.get_or_set("k", lambda: b"small", wait=0) == b"small"
    assert m.get("k") == b"small"


def test_without_cas_the_fill_is_a_plain_set_with_the_callers_key_value_and_ttl() -> None:
    # memcached -C answers every cas unique 0: the winner stores with set (commands._fill).
    clock = [1000.0]
    seen: list[Any] = []

    def ser(key: Any, value: Any) -> tuple[bytes, int]:
        seen.append(key)
        return value, 2

    m = MockClient(cas_enabled=False, clock=lambda: clock[0], serializer=ser, deserializer=lambda k, v, f: (v, f))
    assert m.get_or_set("k", lambda: b"v", expire=10) == b"v"
    assert seen == ["k"]
    assert m.get("k") == (b"v", 2)
    clock[0] += 10
    assert m.get("k") is None


def test_get_or_set_reads_a_stored_value_through_the_deserializer() -> None:
    seen: list[Any] = []

    def de(key: Any, value: bytes, flags: int) -> Any:
        seen.append((key, value, flags))
        return ("decoded", value)

    m = MockClient(serializer=lambda k, v: (v, 0), deserializer=de)
    m.set("zero", b"v")  # flags 0: still a value for the deserializer
    m.set("five", b"w", flags=5)
    assert m.get_or_set("zero", lambda: pytest.fail("a hit")) == ("decoded", b"v")
    assert m.get_or_set("five", lambda: pytest.fail("a hit")) == ("decoded", b"w")
    assert seen == [("zero", b"v", 0), ("five", b"w", 5)]


def test_the_placeholder_is_not_handed_to_the_deserializer() -> None:
    # The empty flag-0 item is a lease in progress, whatever the serde would make of b"".
    m = MockClient(serializer=lambda k, v: (v, 0), deserializer=lambda k, v, f: ("decoded", v))
    seen = {}

    def winner() -> bytes:
        seen["other"] = m.get_or_set("k", lambda: b"others", wait=0)
        return b"mine"

    assert m.get_or_set("k", winner) == b"mine"
    assert seen == {"other": b"others"}  # pending: computed by the other caller, not stored
    assert m.get("k") == ("decoded", b"mine")


def test_a_failed_lease_read_raises_or_with_ignore_exc_computes_and_stores_nothing(peer: Callable[[Answer], Peer]) -> None:
    p = peer(lambda op: [Code.SERVER_DOWN, "server mc1:11211 is down"])
    with pytest.raises(MemcacheServerError, match="mc1:11211"):
        Client(p.url, timeout=5).get_or_set("k", lambda: b"v")
    assert Client(p.url, timeout=5, ignore_exc=True).get_or_set("k", lambda: b"v") == b"v"
    assert [op[0] for op in p.ops] == [Op.LEASE_GET, Op.LEASE_GET]  # no fill, no delete


def test_utf8_encoding_applies_to_str_values() -> None:
    m = MockClient(encoding="utf-8")
    m.set("k", "caf\u00e9")
    m.set_many({"k2": "caf\u00e9"})
    assert m.get("k") == m.get("k2") == "caf\u00e9".encode()


def test_set_many_lists_a_value_above_the_frame_limit_as_failed_with_ignore_exc() -> None:
    # pymemcache's set_many returns the keys that failed to be inserted.
    m = MockClient(ignore_exc=True, max_frame_bytes=1 << 16)
    assert m.set_many({"a": b"1", "big": b"x" * (1 << 17), "c": b"3"}) == ["big"]
    assert m.get_many(["a", "big", "c"]) == {"a": b"1", "c": b"3"}


@pytest.mark.parametrize("wait", [-1, 3601, "1", True, None])
def test_get_or_set_refuses_a_bad_wait(wait: Any) -> None:
    # Client.get_or_set: `wait` is a number of seconds in 0..3600.
    with pytest.raises(MemcacheIllegalInputError, match=r"^wait "):
        MockClient().get_or_set("k", lambda: b"v", wait=wait)


@pytest.mark.parametrize("wait", [0, 0.5, 3600])
def test_get_or_set_accepts_a_wait_in_range(wait: float) -> None:
    assert MockClient().get_or_set("k", lambda: b"v", wait=wait) == b"v"
