"""MockClient: Client's API and return values over memory, with memcached's semantics.

tests/integration/test_client_parity.py runs MockClient through the same long script as the real
Client and pymemcache-on-memcached and requires identical outcomes; the tests here pin the
semantics one by one, with a fake clock for expiry.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import clientlib
from clientlib import Client, MockClient
from clientlib.errors import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
)
from clientlib.mock import MOCK_VERSION
from clientlib.serde import FLAG_COMPRESSED, FLAG_PICKLE, CompressedSerde, PickleSerde

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mc(clock: FakeClock) -> MockClient:
    return MockClient(clock=clock)


def test_is_a_client_and_exported() -> None:
    assert clientlib.MockClient is MockClient
    m = MockClient(("ignored", 11211))
    assert isinstance(m, Client)
    assert m.server == ("ignored", 11211)
    for name in ("get_multi", "set_multi", "delete_multi", "close", "quit", "disconnect_all", "clear"):
        assert callable(getattr(m, name))


def test_a_sequence_of_calls_returns_what_client_returns(mc: MockClient) -> None:
    # The expected values are Client's documented (pymemcache's) return values.
    assert mc.get("a") is None
    assert mc.get("a", default=b"d") == b"d"
    assert mc.gets("a") == (None, None)
    assert mc.gets("a", default=1, cas_default=2) == (1, 2)
    assert mc.gat("a", 10) is None
    assert mc.gats("a", 10) == (None, None)
    assert mc.set("a", b"1") is True
    assert mc.get("a") == b"1"
    assert mc.add("a", b"2") is False
    assert mc.add("b", b"2") is True
    assert mc.replace("a", b"3") is True
    assert mc.replace("zz", b"3") is False
    assert mc.append("a", b"t") is True
    assert mc.prepend("a", b"h") is True
    assert mc.append("zz", b"t") is False
    assert mc.prepend("zz", b"t") is False
    assert mc.get("a") == b"h3t"
    value, cas = mc.gets("a")
    assert value == b"h3t" and isinstance(cas, bytes) and cas.isdigit()
    assert mc.cas("a", b"c", cas) is True
    assert mc.cas("a", b"d", cas) is False
    assert mc.cas("zz", b"d", cas) is None
    assert mc.get_many(["a", "b", "zz"]) == {"a": b"c", "b": b"2"}
    assert mc.get_multi([]) == {}
    many = mc.gets_many(["a", "zz"])
    assert list(many) == ["a"] and many["a"][0] == b"c"
    assert mc.set_many({"m1": b"1", "m2": b"2"}) == []
    assert mc.set_multi({}) == []
    assert mc.delete("m1") is True
    assert mc.delete("m1") is False
    assert mc.delete_many(["m2", "zz"]) is True
    assert mc.delete_multi([]) is True
    assert mc.incr("n", 1) is None
    assert mc.set("n", b"10") is True
    assert mc.incr("n", 5) == 15
    assert mc.decr("n", 6) == 9
    assert mc.get("n") == b"9 "  # memcached rewrites in place, padded
    assert mc.incr("n", 1) == 10
    assert mc.decr("n", 100) == 0
    assert mc.touch("a", 10) is True
    assert mc.touch("zz", 10) is False
    assert mc.version() == MOCK_VERSION.encode()
    assert mc.flush_all() is True
    assert mc.get("a") is None
    assert mc.cache_memlimit(100) is True
    assert mc.stats()[b"limit_maxbytes"] == 100 * 1024 * 1024
    assert mc.broker_ping() == "PONG"
    assert mc.close() is None and mc.quit() is None and mc.disconnect_all() is None
    assert mc.set("after", b"close") is True and mc.get("after") == b"close"


def test_mapping_protocol(mc: MockClient) -> None:
    mc["k"] = b"v"
    assert mc["k"] == b"v"
    del mc["k"]
    with pytest.raises(KeyError):
        mc["k"]
    del mc["k"]  # deleting a missing key is silent, as in Client (noreply)


def test_noreply_return_values(mc: MockClient) -> None:
    assert mc.set("a", b"1", noreply=True) is True
    assert mc.add("a", b"2", noreply=True) is True  # not stored, but noreply says True
    assert mc.get("a") == b"1"
    assert mc.replace("zz", b"1", noreply=True) is True
    assert mc.set_many({"b": b"1"}, noreply=True) == []
    assert mc.delete("zz", noreply=True) is True
    assert mc.delete_many(["zz"], noreply=True) is True
    assert mc.touch("zz", 5, noreply=True) is True
    assert mc.set("n", b"1") is True
    assert mc.incr("n", 1, noreply=True) is None
    assert mc.decr("n", 1, noreply=True) is None
    assert mc.get("n") == b"1"
    assert mc.flush_all(noreply=True) is True
    assert mc.get("a") is None


def test_default_noreply(clock: FakeClock) -> None:
    m = MockClient(clock=clock, default_noreply=True)
    assert m.add("a", b"1") is True
    assert m.add("a", b"2") is True  # noreply: no answer to report
    assert m.get("a") == b"1"
    assert m.replace("a", b"3", noreply=False) is True
    assert m.incr("a", 1) == 4  # incr waits for the answer unless asked not to


def test_arithmetic_edges(mc: MockClient) -> None:
    mc.set("n", b"18446744073709551615")
    assert mc.incr("n", 2) == 1  # wraps at 2**64
    mc.set("n", b"5")
    assert mc.incr("n", 2**64 - 1) == 4
    assert mc.decr("n", 10) == 0
    mc.set("n", 41)  # an int through the raw serde is its decimal text
    assert mc.incr("n", 1) == 42
    assert mc.get("n") == b"42"
    mc.set("n", b"9")
    assert mc.incr("n", 1) == 10
    assert mc.get("n") == b"10"  # grew: a new value, no padding
    for bad in (b"abc", b"", b"-5", b"12abc", b"18446744073709551616"):
        mc.set("bad", bad)
        with pytest.raises(MemcacheClientError):
            mc.incr("bad", 1)
    mc.set("blank", b" 7 ")
    assert mc.decr("blank", 1) == 6
    with pytest.raises(MemcacheIllegalInputError):
        mc.incr("n", -1)
    with pytest.raises(MemcacheIllegalInputError):
        mc.incr("n", 2**64)


def test_append_keeps_flags_and_ttl(clock: FakeClock) -> None:
    m = MockClient(clock=clock, serde=PickleSerde())
    m.set("s", "text", expire=10)  # str: flag 16 (text)
    assert m.append("s", " more") is True  # the str is encoded with its own flag; stored flag stays
    assert m.get("s") == "text more"
    clock.advance(10)
    assert m.get("s") is None  # the original TTL still applies
    raw = MockClient(clock=clock)
    raw.set("f", b"v", flags=5)
    assert raw.append("f", b"w", flags=9, expire=1) is True
    assert raw._memory.items[b"f"].flags == 5 and raw._memory.items[b"f"].exptime == 0


def test_cas_tokens(mc: MockClient) -> None:
    mc.set("k", b"1")
    _, c1 = mc.gets("k")
    mc.touch("k", 100)
    assert mc.gets("k")[1] == c1  # touch does not change the cas unique
    assert mc.gats("k", 50)[1] == c1
    mc.incr("k", 1)
    _, c2 = mc.gets("k")
    assert int(c2) > int(c1)
    assert mc.cas("k", b"x", int(c2)) is True
    assert mc.cas("k", b"y", c2.decode()) is False
    _, c3 = mc.gets("k")
    assert mc.cas("k", b"z", c3) is True and mc.get("k") == b"z"


def test_expiry_follows_the_clock(clock: FakeClock, mc: MockClient) -> None:
    mc.set("a", b"1", expire=10)
    mc.set("forever", b"1")
    clock.advance(9.9)
    assert mc.get("a") == b"1"
    clock.advance(0.1)
    assert mc.get("a") is None
    assert mc.add("a", b"2") is True  # an expired key is free again
    assert mc.touch("a", 5) is True
    clock.advance(4)
    assert mc.gat("a", 100) == b"2"
    clock.advance(90)
    assert mc.get("a") == b"2"
    assert mc.touch("a", 0) is True  # TTL 0: never expires
    clock.advance(10**6)
    assert mc.get("a") == b"2"
    assert mc.get("forever") == b"1"


def test_negative_and_absolute_expiry(clock: FakeClock, mc: MockClient) -> None:
    assert mc.set("neg", b"v", expire=-1) is True
    assert mc.get("neg") is None
    # Above 30 days a TTL is an absolute time (on the mock's clock).
    absolute = int(clock.now) + 100
    mc.set("abs", b"v", expire=absolute)
    clock.advance(99)
    assert mc.get("abs") == b"v"
    clock.advance(1)
    assert mc.get("abs") is None
    mc.set("past", b"v", expire=60 * 60 * 24 * 31)  # an absolute time long gone
    assert mc.get("past") is None
    mc.set("g", b"v")
    assert mc.gat("g", -1) == b"v"  # returned, then gone
    assert mc.get("g") is None


def test_flush_all_with_delay(clock: FakeClock, mc: MockClient) -> None:
    mc.set("a", b"1")
    assert mc.flush_all(delay=10) is True
    mc.set("b", b"2")
    clock.advance(9)
    assert mc.get_many(["a", "b"]) == {"a": b"1", "b": b"2"}
    clock.advance(1)
    assert mc.get_many(["a", "b"]) == {}
    mc.set("c", b"3")  # stored after the flush time: kept
    clock.advance(100)
    assert mc.get("c") == b"3"
    mc.flush_all(delay=10)
    mc.flush_all()  # an immediate flush replaces the pending one
    mc.set("d", b"4")
    clock.advance(20)
    assert mc.get("d") == b"4"


def test_serdes_round_trip(mc: MockClient, clock: FakeClock) -> None:
    m = MockClient(clock=clock, serde=PickleSerde())
    values: dict[str, Any] = {"b": b"raw", "s": "t\u00ebxt", "i": 2**70, "f": 0.5, "d": {"x": [1, 2]}, "t": (1,)}
    assert m.set_many(values) == []
    assert m.get_many(list(values)) == values
    # Flags are stored with the value: a raw reader sees the pickled bytes and the serde's flag.
    assert m._memory.items[b"d"].flags == FLAG_PICKLE
    z = MockClient(clock=clock, serde=CompressedSerde())
    z.set("big", "x" * 5000)
    assert z._memory.items[b"big"].flags & FLAG_COMPRESSED
    assert len(z._memory.items[b"big"].value) < 1000
    assert z.get("big") == "x" * 5000
    # The raw serde (no serde given) returns bytes whatever was stored.
    mc.set("i", 5)
    assert mc.get("i") == b"5"
    with pytest.raises(MemcacheIllegalInputError):
        mc.set("u", "\u00e9")  # not encodable as ascii


def test_legacy_serializer_functions(clock: FakeClock) -> None:
    def ser(key: Any, value: Any) -> tuple[bytes, int]:
        return repr(value).encode(), 3

    def de(key: Any, value: bytes, flags: int) -> Any:
        return ("decoded", value, flags)

    m = MockClient(clock=clock, serializer=ser, deserializer=de)
    m.set("k", [1])
    assert m.get("k") == ("decoded", b"[1]", 3)
    m.set("k", [1], flags=9)
    assert m.get("k") == ("decoded", b"[1]", 9)


def test_key_prefix_and_unicode_keys(clock: FakeClock) -> None:
    m = MockClient(clock=clock, key_prefix="p:", allow_unicode_keys=True)
    m.set("caf\u00e9", b"1")
    assert list(m._memory.items) == ["p:caf\u00e9".encode()]
    assert m.get_many(["caf\u00e9"]) == {"caf\u00e9": b"1"}  # the caller's key comes back
    with pytest.raises(MemcacheIllegalInputError):
        m.set("k" * 249, b"x")  # 251 bytes with the prefix
    with pytest.raises(MemcacheIllegalInputError):
        MockClient().get("caf\u00e9")  # non-ASCII without allow_unicode_keys


MIB = 1 << 20


def largest_value(key: bytes, flags: int = 0, item_size_max: int = MIB, cas_enabled: bool = True) -> int:
    """The longest value memcached stores under `key` (clientlib.limits' rule, spelled out)."""
    return item_size_max - (48 + len(key) + 1 + (4 if flags else 0) + 2 + (8 if cas_enabled else 0))


def test_item_size_rule_at_the_boundary(clock: FakeClock) -> None:
    for item_size_max, cas_enabled in ((MIB, True), (2 * MIB, True), (MIB, False)):
        m = MockClient(clock=clock, item_size_max=item_size_max, cas_enabled=cas_enabled)
        n = largest_value(b"k", 0, item_size_max, cas_enabled)
        assert m.set("k", b"x" * n) is True
        assert len(m.get("k")) == n
        with pytest.raises(MemcacheServerError, match="object too large for cache"):
            m.set("k", b"x" * (n + 1))
        # Client flags take 4 more bytes of the item.
        assert m.set("k", b"x" * (n - 4), flags=5) is True
        with pytest.raises(MemcacheServerError):
            m.set("k", b"x" * (n - 3), flags=5)
        settings = m.stats("settings")
        assert settings[b"item_size_max"] == item_size_max
        assert settings[b"cas_enabled"] == (b"yes" if cas_enabled else b"no")  # as pymemcache reads it


@pytest.mark.parametrize("size", [MIB + 1, 2 * MIB, 5 * MIB])
def test_too_large_set_deletes_the_old_value(mc: MockClient, size: int) -> None:
    # memcached unlinks the old item when a set fails for size; Django's cache relies on it.
    assert mc.set("k", b"old") is True
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        mc.set("k", b"x" * size)
    assert mc.get("k") is None
    with pytest.raises(MemcacheServerError):
        mc.set("missing", b"x" * size)  # nothing to delete: still the same error
    assert mc.get("missing") is None


def test_too_large_set_with_noreply_deletes_silently(mc: MockClient) -> None:
    mc.set("k", b"old")
    assert mc.set("k", b"x" * (MIB + 1), noreply=True) is True  # memcached sends no error
    assert mc.get("k") is None


@pytest.mark.parametrize("mode", ["add", "replace", "append", "prepend", "cas"])
def test_other_modes_with_a_too_large_value_keep_the_old_value(mc: MockClient, mode: str) -> None:
    assert mc.set("k", b"old") is True
    _, token = mc.gets("k")
    big = b"x" * (MIB - 10)  # passes a naive length check, not memcached's item rule
    call = {
        "add": lambda: mc.add("k", big), "replace": lambda: mc.replace("k", big),
        "append": lambda: mc.append("k", big), "prepend": lambda: mc.prepend("k", big),
        "cas": lambda: mc.cas("k", big, token),
    }[mode]
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        call()
    assert mc.gets("k") == (b"old", token)  # not even rewritten


def test_append_whose_result_would_not_fit_is_not_stored(mc: MockClient) -> None:
    n = largest_value(b"k")
    assert mc.set("k", b"a" * (n - 5)) is True
    assert mc.append("k", b"b" * 6) is False
    assert mc.prepend("k", b"b" * 6) is False
    assert mc.get("k") == b"a" * (n - 5)
    assert mc.append("k", b"b" * 5) is True  # exactly fits
    assert mc.get("k") == b"a" * (n - 5) + b"b" * 5


def test_set_many_with_a_too_large_value(mc: MockClient) -> None:
    mc.set_many({"a": b"old", "big": b"old", "c": b"old"})
    with pytest.raises(MemcacheServerError):
        mc.set_many({"a": b"1", "big": b"x" * (MIB + 1), "c": b"3"})
    # memcached runs every set of the batch: the others are stored, the too-large key is gone.
    assert mc.get_many(["a", "big", "c"]) == {"a": b"1", "c": b"3"}
    assert MockClient(ignore_exc=True).set_many({"a": b"1", "big": b"x" * (MIB + 1)}) == ["big"]


def test_values_above_the_frame_limit_follow_the_same_rule(clock: FakeClock) -> None:
    # Above max_frame_bytes the Client itself handles the value (nothing that large is framed):
    # the outcome is still memcached's.
    m = MockClient(clock=clock, max_frame_bytes=1 << 16)
    big = b"x" * (1 << 17)
    m.set("k", b"old")
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        m.set("k", big)
    assert m.get("k") is None
    m.set("k", b"old")
    for call in (lambda: m.add("k", big), lambda: m.replace("k", big), lambda: m.append("k", big),
                 lambda: m.prepend("k", big), lambda: m.cas("k", big, 1)):
        with pytest.raises(MemcacheServerError, match="object too large for cache"):
            call()
    assert m.get("k") == b"old"
    with pytest.raises(MemcacheServerError):
        m.set_many({"a": b"1", "k": big})
    assert m.get_many(["a", "k"]) == {"a": b"1"}
    assert m.set("k", big, noreply=True) is True
    assert m.add("k", big, noreply=True) is True


def test_ignore_exc_turns_failed_reads_into_misses(clock: FakeClock) -> None:
    # A read whose value the serde cannot decode is an error; with ignore_exc it is a miss, as
    # Client does for any MemcacheError on a read.
    class Strict(PickleSerde):
        def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
            raise MemcacheServerError("cannot decode")

    m = MockClient(clock=clock, serde=Strict(), ignore_exc=True)
    m.set("k", b"v")
    assert m.get("k", default="dflt") == "dflt"
    assert m.get_many(["k"]) == {}
    strict = MockClient(clock=clock, serde=Strict())
    strict.set("k", b"v")
    with pytest.raises(MemcacheError):
        strict.get("k")


def test_stats(mc: MockClient) -> None:
    mc.set("a", b"12345")
    mc.get("a")
    mc.get("zz")
    s = mc.stats()
    assert s[b"curr_items"] == 1 and s[b"bytes"] == 5
    assert s[b"get_hits"] == 1 and s[b"get_misses"] == 1 and s[b"cmd_set"] == 1
    assert s[b"version"] == MOCK_VERSION.encode()
    settings = mc.stats("settings")
    assert settings[b"item_size_max"] == 1 << 20
    assert mc.stats("nonsense") == {}


def test_clear(mc: MockClient) -> None:
    mc.set_many({"a": b"1", "b": b"2"})
    mc.clear()
    assert mc.get_many(["a", "b"]) == {}


def test_threads_share_one_mock() -> None:
    m = MockClient()
    m.set("n", b"0")

    def work() -> None:
        for _ in range(500):
            m.incr("n", 1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.get("n") == b"4000"
