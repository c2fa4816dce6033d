"""clientlib.django.BrokerCache in-process, over clientlib.mock.MockClient (memcached's semantics
in memory) instead of a broker: the same contract as tests/integration/test_django_backend.py, fast
enough for mutation testing (mutmut only sees code run by tests/unit).

The backend is pointed at the mock through its client classes, `BrokerCache._class` and
`_async_class` (the names of Django's BaseMemcachedCache, which its own tests replace the same
way): a subclass here builds a MockClient on a fake clock, and an async face over the same mock.
Expected values are Django's rules (its cache API documentation, tests/cache/tests.py
BaseCacheTests / BaseMemcachedTests, django/core/cache/backends/memcached.py) and memcached's.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Callable
from typing import Any

import pytest

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    BaseCache,
    InvalidCacheBackendError,
    InvalidCacheKey,
)
from django.core.cache.backends.memcached import PyMemcacheCache

from clientlib import Client
from clientlib.django import BrokerCache
from clientlib.errors import MemcacheServerError
from clientlib.mock import MockClient
from test_mock import FakeClock

# Cases shared with the other backend test module (tests/django_cases.py): collected here, with
# this module's `cache` fixture.
from django_cases import (  # noqa: F401
    test_add_is_atomic_and_never_overwrites,
    test_has_key_and_contains,
    test_incr_decr_of_non_number,
    test_longest_valid_keys_work,
    test_no_warnings_for_valid_keys,
    test_pickle_error_on_set_propagates,
    test_set_none_is_a_value,
)

pytestmark = pytest.mark.unit

MONTH = 60 * 60 * 24 * 30  # memcached's limit for a relative expiry (protocol.txt)
BIG = "x" * (2 << 20)  # larger than the mock's item size limit (memcached's default -I 1m)


class AsyncFace:
    """AsyncClient's coroutine methods over a (sync) MockClient: the backend's a* methods await
    these as they await AsyncClient's."""

    def __init__(self, client: MockClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return method(*args, **kwargs)

        return call


def custom_key_func(key: str, key_prefix: str, version: int) -> str:
    """As Django's tests' custom_key_func."""
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


@pytest.fixture
def clock() -> FakeClock:
    # test_mock's clock, started at the real time: the backend turns timeouts past 30 days into
    # Unix times with time.time(), as Django's memcached backends do.
    return FakeClock(float(int(time.time())))


@pytest.fixture
def make(clock: FakeClock) -> Callable[..., BrokerCache]:
    made: dict[Any, MockClient] = {}

    def options_key(url: Any, options: dict[str, Any]) -> Any:
        return url, tuple(sorted((k, v) for k, v in options.items() if k != "serde"))

    def sync_client(url: Any, **options: Any) -> MockClient:
        client = MockClient(url, clock=clock, **options)
        made[options_key(url, options)] = client
        return client

    def async_client(url: Any, **options: Any) -> AsyncFace:
        return AsyncFace(made[options_key(url, options)])

    class MockBacked(BrokerCache):
        _class = staticmethod(sync_client)
        _async_class = staticmethod(async_client)

    def make(**params: Any) -> BrokerCache:
        return MockBacked(params.pop("LOCATION", "tcp://127.0.0.1:1"), params)

    return make


@pytest.fixture
def cache(make: Callable[..., BrokerCache]) -> BrokerCache:
    return make()


def raw_view(cache: BrokerCache) -> MockClient:
    """A client without serde on the same memory as `cache`'s: another program writing to the
    same memcached (pymemcache writes bytes as they are, with flags 0)."""
    inner = cache._cache
    view = MockClient()
    view._memory = inner._memory
    view._memory_transport = inner._memory_transport
    view._transport = inner._transport
    return view


def stored(cache: BrokerCache, key: str) -> tuple[bytes, int]:
    """(value bytes, client flags) of the item as the mock's memory holds it."""
    item = cache._cache._memory.items[key.encode()]
    return item.value, item.flags


# --- the basics (Django's test_simple, test_add, test_non_existent, test_get_many, ...) --------


def test_set_get_delete(cache: BrokerCache) -> None:
    assert cache.set("key", "value") is None
    assert cache.get("key") == "value"
    assert cache.get("missing") is None
    assert cache.get("missing", "dflt") == "dflt"
    assert cache.delete("key") is True
    assert cache.delete("key") is False
    assert cache.get("key") is None


def test_get_many_set_many_delete_many(cache: BrokerCache) -> None:
    assert cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"}) == []
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    assert cache.get_many([]) == {}
    assert cache.delete_many(["a", "b"]) is None
    assert cache.get_many(["a", "b", "c"]) == {"c": "c"}
    cache.delete_many(iter(["c"]))
    assert cache.get("c") is None
    assert cache.get("d") == "d"


def test_clear_flushes_everything(cache: BrokerCache, make: Callable[..., BrokerCache]) -> None:
    other = make(KEY_PREFIX="other")
    cache.set_many({"key1": "spam", "key2": "eggs"})
    other.set("key1", "ham")
    assert cache.clear() is None
    assert cache.get_many(["key1", "key2"]) == {}
    # As Django's memcached backends: clear() is flush_all, whatever the KEY_PREFIX.
    assert other.get("key1") is None


def test_close_does_nothing(cache: BrokerCache) -> None:
    cache.set("k", 1)
    assert cache.close() is None
    assert cache.get("k") == 1
    client = cache._cache
    cache.close()
    assert cache._cache is client


def test_data_types_and_unicode(cache: BrokerCache) -> None:
    values: dict[str, Any] = {
        "string": "this is a string",
        "int": 42,
        "bigint": 2**80,
        "bool": True,
        "list": [1, 2, 3, 4],
        "tuple": ("a", "b"),
        "dict": {"A": 1, "B": 2},
        "float": 1.5,
        "bytes": b"\x00\xffbinary",
        "none": None,
        "set": {1, 2},
    }
    for name, value in values.items():
        cache.set(name, value)
        got = cache.get(name)
        assert got == value and type(got) is type(value), name
    assert cache.get_many(list(values)) == values
    unicode = {"ascii": "ascii_value", "unicode_ascii": "Iñtërnâtiônàlizætiøn1", "Iñtërnâtiônàlizætiøn": "x",
               "ascii2": {"x": 1}}
    for key, value in unicode.items():
        cache.set(key, value)
        assert cache.get(key) == value
    assert cache.get_many(list(unicode)) == unicode


def test_values_are_stored_as_pymemcache_stores_them(cache: BrokerCache) -> None:
    # PyMemcacheCache's serde (pymemcache's pickle_serde): bytes as is (flags 0), str as UTF-8
    # text (16), int as decimal text (2), anything else pickled (1). Read raw from the mock with
    # no serde, under Django's key layout ":1:key".
    cache.set("b", b"raw")
    cache.set("s", "é")
    cache.set("i", 7)
    cache.set("l", [1])
    seen = {key: stored(cache, f":1:{key}") for key in ("b", "s", "i", "l")}
    assert seen["b"] == (b"raw", 0)
    assert seen["s"] == ("é".encode(), 16)
    assert seen["i"] == (b"7", 2)
    assert seen["l"][1] == 1 and pickle.loads(seen["l"][0]) == [1]


# --- incr / decr (Django's test_incr, test_decr, test_incr_decr_type_error ...) ----------------


def test_incr_decr(cache: BrokerCache) -> None:
    cache.set("answer", 41)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.incr("answer", -10) == 42
    assert cache.decr("answer") == 41
    assert cache.decr("answer", 10) == 31
    assert cache.decr("answer", -10) == 41
    assert cache.get("answer") == 41
    assert cache.incr("answer", 0) == 41
    # memcached's decr stops at 0 (counters are unsigned).
    assert cache.decr("answer", 100) == 0
    assert type(cache.incr("answer")) is int


def test_incr_decr_missing_key_is_value_error(cache: BrokerCache) -> None:
    with pytest.raises(ValueError, match="^Key ':1:does_not_exist' not found$"):
        cache.incr("does_not_exist")
    with pytest.raises(ValueError, match="^Key ':1:does_not_exist' not found$"):
        cache.incr("does_not_exist", -1)
    with pytest.raises(ValueError, match="^Key ':1:does_not_exist' not found$"):
        cache.decr("does_not_exist")
    assert cache.get("does_not_exist") is None


# --- timeouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timeout",
    [None, DEFAULT_TIMEOUT, 0, 0.0, 0.4, -0.5, -1, -300, 1, 60.9, 299, MONTH - 1, MONTH, MONTH + 1,
     31536000, 2.5e7, "30"],
)
def test_timeout_translation_is_djangos(timeout: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Django's PyMemcacheCache never connects to build; only its timeout rule is used here.
    theirs = PyMemcacheCache("127.0.0.1:1", {"TIMEOUT": 300})
    ours = BrokerCache("tcp://127.0.0.1:1", {"TIMEOUT": 300})
    frozen = time.time()
    monkeypatch.setattr(time, "time", lambda: frozen)
    if isinstance(timeout, str):
        with pytest.raises(TypeError):
            theirs.get_backend_timeout(timeout)
        with pytest.raises(TypeError):
            ours.get_backend_timeout(timeout)
        return
    expected = theirs.get_backend_timeout(timeout)
    got = ours.get_backend_timeout(timeout)
    assert got == expected and type(got) is type(expected)


def test_timeout_rules_written_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Django's rule (BaseMemcachedCache.get_backend_timeout) stated independently.
    monkeypatch.setattr(time, "time", lambda: 1_000_000.75)
    ours = BrokerCache("tcp://127.0.0.1:1", {"TIMEOUT": 120})
    assert ours.get_backend_timeout() == 120
    assert ours.get_backend_timeout(DEFAULT_TIMEOUT) == 120
    assert ours.get_backend_timeout(None) == 0
    assert ours.get_backend_timeout(0) == -1
    assert ours.get_backend_timeout(0.9) == -1
    assert ours.get_backend_timeout(-5) == -5
    assert ours.get_backend_timeout(7.9) == 7
    assert ours.get_backend_timeout(MONTH) == MONTH
    assert ours.get_backend_timeout(MONTH + 1) == MONTH + 1 + 1_000_000
    assert BrokerCache("tcp://127.0.0.1:1", {"TIMEOUT": None}).get_backend_timeout() == 0
    assert BrokerCache("tcp://127.0.0.1:1", {"TIMEOUT": 0}).get_backend_timeout() == -1


def test_default_timeout_is_the_caches(make: Callable[..., BrokerCache], clock: FakeClock) -> None:
    cache = make()  # Django's default TIMEOUT: 300 s
    short = make(TIMEOUT=10)
    cache.set("default", 1)
    short.set("short", 1)
    cache.add("added", 1)
    cache.set_many({"many": 1})
    clock.advance(9)
    assert cache.get_many(["default", "short", "added", "many"]) == {"default": 1, "short": 1, "added": 1, "many": 1}
    clock.advance(2)
    assert cache.get_many(["default", "short", "added", "many"]) == {"default": 1, "added": 1, "many": 1}
    clock.advance(288)
    assert cache.get_many(["default", "added", "many"]) == {"default": 1, "added": 1, "many": 1}
    clock.advance(2)
    assert cache.get_many(["default", "added", "many"]) == {}


def test_zero_and_negative_timeouts_expire_at_once(cache: BrokerCache) -> None:
    # Django's test_zero_timeout.
    for expired in (0, -1, 0.4):
        cache.set("zero", 1)
        assert cache.set("zero", 1, timeout=expired) is None
        assert cache.get("zero") is None, expired
        assert cache.add("zero", 1, timeout=expired) is True
        assert cache.get("zero") is None, expired
    assert cache.set_many({"m1": 1, "m2": 2}, timeout=0) == []
    assert cache.get_many(["m1", "m2"]) == {}
    cache.set("key5", "belgian fries", timeout=1)
    assert cache.touch("key5", timeout=0) is True
    assert cache.get("key5") is None


def test_forever_and_long_timeouts(make: Callable[..., BrokerCache], clock: FakeClock) -> None:
    # Django's test_forever_timeout, test_long_timeout, test_default_never_expiring_timeout and
    # test_default_far_future_timeout.
    cache = make()
    never = make(TIMEOUT=None)
    never.set("infinite_foo", "bar")
    far = make(TIMEOUT=MONTH + 100)  # past 30 days: a Unix time, as for a timeout passed in
    far.set("future_foo", "bar")
    cache.set("forever", "v", timeout=None)
    assert cache.add("forever", "w", timeout=None) is False
    year = 60 * 60 * 24 * 365
    cache.set("long", "v", timeout=year)  # past 30 days: sent as a Unix time
    cache.set("month", "v", timeout=MONTH)  # exactly 30 days: still relative
    cache.set("float", "v", timeout=60.9)  # whole seconds, rounded down
    clock.advance(59.5)
    assert cache.get("float") == "v"
    clock.advance(1)
    assert cache.get("float") is None
    clock.advance(MONTH - 61)
    assert cache.get("month") == "v"
    assert far.get("future_foo") == "bar"
    clock.advance(1.5)
    assert cache.get("month") is None
    assert cache.get("long") == "v"
    clock.advance(year - MONTH - 10)
    assert cache.get("long") == "v"
    clock.advance(20)
    assert cache.get("long") is None
    assert cache.get("forever") == "v"
    assert never.get("infinite_foo") == "bar"
    assert far.get("future_foo") is None


def test_touch(cache: BrokerCache, clock: FakeClock) -> None:
    cache.set("expire1", "very quickly", timeout=100)
    assert cache.touch("expire1", timeout=4000) is True
    clock.advance(3999)
    assert cache.get("expire1") == "very quickly"
    assert cache.touch("expire1", timeout=None) is True
    clock.advance(10 * MONTH)
    assert cache.get("expire1") == "very quickly"
    assert cache.touch("expire1") is True  # DEFAULT_TIMEOUT: the cache's 300
    clock.advance(299)
    assert cache.get("expire1") == "very quickly"
    assert cache.touch("expire1", timeout=0) is True  # Django's 0: expire now
    assert cache.get("expire1") is None
    assert cache.touch("nonexistent") is False


# --- set failures -------------------------------------------------------------------------------


def test_failed_set_deletes_the_old_value(cache: BrokerCache) -> None:
    # Django's test_memcached_deletes_key_on_failed_set.
    cache.set("small_value", "a")
    assert cache.get("small_value") == "a"
    with pytest.raises(MemcacheServerError):
        cache.set("small_value", BIG)
    assert cache.get("small_value") is None


def test_a_set_answered_not_stored_deletes_the_old_value(cache: BrokerCache) -> None:
    # Django's rule (BaseMemcachedCache.set): when the client reports a store as not done
    # (pymemcache's False for NOT_STORED), the old value must not stay readable. memcached itself
    # answers a too-large set with an error (above); a False answer is simulated here.
    cache.set("small_value", "a")
    cache.set("kept", "b")
    client = cache._cache
    stored = client.set

    def refuse_big(key: Any, value: Any, expire: int = 0, noreply: Any = None, flags: Any = None) -> bool:
        return False if value == "refused" else bool(stored(key, value, expire, noreply, flags))

    client.set = refuse_big  # type: ignore[method-assign]
    assert cache.set("small_value", "refused") is None
    assert cache.get("small_value") is None
    cache.set("kept", "c")  # a stored value is not deleted
    assert cache.get("kept") == "c"

    async def script() -> None:
        await cache.aset("async_value", "a")
        assert await cache.aset("async_value", "refused") is None
        assert await cache.aget("async_value") is None
        await cache.aset("kept", "d")
        assert await cache.aget("kept") == "d"

    asyncio.run(script())


def test_set_many_returns_the_keys_not_stored(make: Callable[..., BrokerCache]) -> None:
    # pymemcache's set_many lists a failed key instead of raising with ignore_exc.
    cache = make(OPTIONS={"ignore_exc": True}, KEY_PREFIX="p")
    cache.set("big", "old")
    failed = cache.set_many({"ok1": 1, "big": BIG, "ok2": 2})
    assert failed == ["big"]
    assert cache.get_many(["ok1", "ok2", "big"]) == {"ok1": 1, "ok2": 2}
    assert asyncio.run(cache.aset_many({"a1": 1, "abig": BIG})) == ["abig"]
    assert cache.get_many(["a1", "abig"]) == {"a1": 1}
    strict = make()
    with pytest.raises(MemcacheServerError):
        strict.set_many({"ok3": 3, "big": BIG})
    assert strict.get("ok3") == 3


# --- keys, versions, prefixes -------------------------------------------------------------------

INVALID_KEY_OPS: list[tuple[str, Callable[[BrokerCache, str], Any]]] = [
    ("add", lambda c, k: c.add(k, 1)),
    ("get", lambda c, k: c.get(k)),
    ("set", lambda c, k: c.set(k, 1)),
    ("incr", lambda c, k: c.incr(k)),
    ("decr", lambda c, k: c.decr(k)),
    ("touch", lambda c, k: c.touch(k)),
    ("delete", lambda c, k: c.delete(k)),
    ("has_key", lambda c, k: c.has_key(k)),
    ("get_or_set", lambda c, k: c.get_or_set(k, 1)),
    ("get_many", lambda c, k: c.get_many([k, "b"])),
    ("set_many", lambda c, k: c.set_many({k: 1, "b": 2})),
    ("delete_many", lambda c, k: c.delete_many([k, "b"])),
    ("incr_version", lambda c, k: c.incr_version(k)),
    ("aadd", lambda c, k: asyncio.run(c.aadd(k, 1))),
    ("aget", lambda c, k: asyncio.run(c.aget(k))),
    ("aset", lambda c, k: asyncio.run(c.aset(k, 1))),
    ("atouch", lambda c, k: asyncio.run(c.atouch(k))),
    ("adelete", lambda c, k: asyncio.run(c.adelete(k))),
    ("aincr", lambda c, k: asyncio.run(c.aincr(k))),
    ("adecr", lambda c, k: asyncio.run(c.adecr(k))),
    ("aget_or_set", lambda c, k: asyncio.run(c.aget_or_set(k, 1))),
    ("aget_many", lambda c, k: asyncio.run(c.aget_many([k, "b"]))),
    ("aset_many", lambda c, k: asyncio.run(c.aset_many({k: 1, "b": 2}))),
    ("adelete_many", lambda c, k: asyncio.run(c.adelete_many([k, "b"]))),
]


@pytest.mark.parametrize(
    "key, message",
    [
        # Django's test_invalid_with_version_key_length: the version makes it 252 characters.
        ("a" * 248, "Cache key will cause errors if used with memcached: ':1:{}' (longer than 250)".format("a" * 248)),
        ("key with spaces", "Cache key contains characters that will cause errors if used with memcached: "
                            "':1:key with spaces'"),
        ("ctrl\x01", "Cache key contains characters that will cause errors if used with memcached: ':1:ctrl\\x01'"),
        ("del\x7f", "Cache key contains characters that will cause errors if used with memcached: ':1:del\\x7f'"),
        # Django counts characters; memcached counts bytes: 124 two-byte characters are 251 bytes.
        ("é" * 124, "Cache key will cause errors if used with memcached: ':1:{}' (longer than 250 bytes in UTF-8)"
                    .format("é" * 124)),
    ],
)
def test_invalid_keys_raise_before_anything_is_sent(cache: BrokerCache, key: str, message: str) -> None:
    cache.set("b", "untouched")
    for name, op in INVALID_KEY_OPS:
        with pytest.raises(InvalidCacheKey) as info:
            op(cache, key)
        assert str(info.value) == message, name
    # Nothing of a multi-key call went out.
    assert cache.get("b") == "untouched"


def test_key_errors_match_djangos_memcached_backends() -> None:
    theirs = PyMemcacheCache("127.0.0.1:1", {})
    ours = BrokerCache("tcp://127.0.0.1:1", {})
    keys = ["a" * 246, "a" * 247, "a" * 248, "sp ace", "tab\t", "nul\x00", "del\x7f", "é" * 82, "é" * 123,
            "é" * 124, "ok:key", "!~"]
    for key in keys:
        def outcome(cache: BaseCache) -> str | None:
            try:
                cache.make_and_validate_key(key)
            except InvalidCacheKey as exc:
                return str(exc).split(" (longer than")[0]
            return None
        assert outcome(ours) == outcome(theirs) or ("é" in key and outcome(theirs) is None), key
    # validate_key is public (Django's BaseCache API): the same rule on a made key.
    with pytest.raises(InvalidCacheKey):
        ours.validate_key("é" * 126)
    ours.validate_key("é" * 125)  # 250 bytes: allowed


def test_versioning(make: Callable[..., BrokerCache]) -> None:
    # Django's test_cache_versioning_get_set / _add / _has_key / _delete / _get_set_many.
    cache = make()
    v2 = make(VERSION=2)
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert v2.get("answer1") is None
    assert v2.get("answer1", version=1) == 42
    v2.set("answer2", 42)
    assert cache.get("answer2") is None
    assert cache.get("answer2", version=2) == 42
    assert cache.add("answer2", 37, version=2) is False
    assert cache.add("answer2", 37, version=1) is True
    assert v2.has_key("answer2") and cache.has_key("answer2", version=2)
    assert cache.delete("answer2", version=2) is True
    assert v2.get("answer2") is None and cache.get("answer2") == 37
    assert cache.get_many(["answer1", "answer2"], version=2) == {}
    cache.set_many({"m": 1}, version=3)
    assert cache.get("m") is None
    assert cache.get_many(["m"], version=3) == {"m": 1}
    cache.delete_many(["m"], version=3)
    assert cache.get("m", version=3) is None
    cache.set("n", 1, version=2)
    assert cache.incr("n", version=2) == 2
    assert cache.decr("n", version=2) == 1
    with pytest.raises(ValueError):
        cache.incr("n")
    cache.set("t", 1, version=2)
    assert cache.touch("t") is False
    assert cache.touch("t", version=2) is True
    assert cache.get_or_set("t", 5, version=2) == 1


def test_incr_decr_version(make: Callable[..., BrokerCache]) -> None:
    # Django's test_incr_version / test_decr_version.
    cache = make()
    v2 = make(VERSION=2)
    cache.set("answer", 42, version=2)
    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42
    assert cache.decr_version("answer", version=3) == 2
    assert cache.get("answer", version=2) == 42
    v2.set("answer2", 1)
    assert v2.incr_version("answer2") == 3
    assert v2.get("answer2", version=3) == 1 and v2.get("answer2") is None
    assert v2.decr_version("answer2", version=3, delta=2) == 1
    assert v2.get("answer2", version=1) == 1
    cache.set("null", None)
    assert cache.incr_version("null") == 2
    assert cache.get("null", "dflt", version=2) is None
    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")
    with pytest.raises(ValueError):
        cache.decr_version("does_not_exist")


def test_key_prefix_and_key_function(make: Callable[..., BrokerCache]) -> None:
    plain = make()
    prefixed = make(KEY_PREFIX="cacheprefix")
    custom = make(KEY_FUNCTION=custom_key_func)
    custom2 = make(KEY_FUNCTION=f"{__name__}.custom_key_func")
    plain.set("answer1", 42)
    assert prefixed.get("answer1") is None
    prefixed.set("answer1", 7)
    assert plain.get("answer1") == 42
    raw = plain._cache
    assert raw.get("cacheprefix:1:answer1") == 7  # Django's key layout: prefix:version:key
    assert raw.get(":1:answer1") == 42
    custom.set("answer1", 5)
    assert plain.get("answer1") == 42
    assert custom2.get("answer1") == 5
    assert raw.get("CUSTOM--1-answer1") == 5
    assert prefixed.get_many(["answer1"]) == {"answer1": 7}


# --- get_or_set -----------------------------------------------------------------------------------


def test_get_or_set(cache: BrokerCache, clock: FakeClock) -> None:
    # Django's test_get_or_set, test_get_or_set_callable, test_get_or_set_version.
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("projector", 99) == 42
    assert cache.get_or_set("null", None) is None
    assert cache.get("null", "default") is None  # None is stored, as in Django
    calls: list[int] = []

    def make_value() -> str:
        calls.append(1)
        return "value"

    assert cache.get_or_set("mykey", make_value) == "value"
    assert cache.get_or_set("mykey", make_value) == "value"
    assert calls == [1]
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    assert cache.get("brian") is None and cache.get("brian", version=2) == 1979
    assert cache.get_or_set("short", "x", timeout=50) == "x"
    assert cache.get_or_set("default", "d") == "d"  # the cache's 300 s
    clock.advance(49)
    assert cache.get("short") == "x"
    clock.advance(2)
    assert cache.get("short") is None
    clock.advance(248)
    assert cache.get("default") == "d"
    clock.advance(2)
    assert cache.get("default") is None
    # Timeout 0: the value is returned but not kept (Django's rule).
    assert cache.get_or_set("gone", "y", timeout=0) == "y"
    assert cache.get("gone") is None
    with pytest.raises(TypeError):
        cache.get_or_set("brian")  # type: ignore[call-arg]  # default is required, as Django's


def test_get_or_set_while_computing_the_key_reads_as_a_miss(cache: BrokerCache, make: Callable[..., BrokerCache]) -> None:
    # While one caller computes, memcached holds an empty lease placeholder under the key: the
    # backend's reads see a miss, as Django's would; an add() finds the key taken.
    other = make()
    seen: dict[str, Any] = {}

    def compute() -> str:
        seen["get"] = other.get("race", "absent")
        seen["has_key"] = other.has_key("race")
        seen["get_many"] = other.get_many(["race", "present"])
        seen["aget"] = asyncio.run(other.aget("race", "absent"))
        seen["aget_many"] = asyncio.run(other.aget_many(["race", "present"]))
        seen["add"] = other.add("race", "theirs")
        return "ours"

    cache.set("present", 1)
    assert cache.get_or_set("race", compute) == "ours"
    assert seen == {"get": "absent", "has_key": False, "get_many": {"present": 1}, "aget": "absent",
                    "aget_many": {"present": 1}, "add": False}
    assert cache.get("race") == "ours"


def test_empty_bytes_are_a_value_not_a_placeholder(cache: BrokerCache) -> None:
    cache.set("empty", b"")
    assert cache.get("empty", "dflt") == b""
    assert cache.get_many(["empty"]) == {"empty": b""}
    assert cache.get_or_set("empty", lambda: pytest.fail("computed")) == b""
    # Stored pickled, so it cannot look like memcached's empty placeholder (flags 0, no bytes).
    value, flags = stored(cache, ":1:empty")
    assert flags == 1 and pickle.loads(value) == b""
    # Empty values of other types are values too.
    cache.set_many({"s": "", "z": 0, "n": b"\x00"})
    assert cache.get_many(["s", "z", "n"]) == {"s": "", "z": 0, "n": b"\x00"}


# --- async --------------------------------------------------------------------------------------

ASYNC_METHODS = [
    "aadd", "aget", "aset", "atouch", "adelete", "aget_many", "aset_many", "adelete_many", "aincr", "adecr",
    "aget_or_set", "aclear", "aclose",
]


def test_async_methods_are_native() -> None:
    # Not Django's sync_to_async fallbacks: each is defined by BrokerCache itself.
    for name in ASYNC_METHODS:
        assert name in vars(BrokerCache), name
        assert getattr(BrokerCache, name) is not getattr(BaseCache, name), name


def test_async_methods(cache: BrokerCache, clock: FakeClock) -> None:
    async def script() -> None:
        assert await cache.aset("a", {"x": 1}) is None
        assert await cache.aget("a") == {"x": 1}
        assert await cache.aget("missing", "dflt") == "dflt"
        assert await cache.aadd("a", 2) is False
        assert await cache.aadd("b", 2) is True
        assert await cache.aadd("b0", 2, timeout=0) is True
        assert await cache.aget("b0") is None
        assert await cache.ahas_key("b") is True and await cache.ahas_key("zz") is False
        assert await cache.atouch("b", timeout=1000) is True
        assert await cache.atouch("zz") is False
        assert await cache.aset_many({"c": 3, "d": 4}) == []
        assert await cache.aget_many(["a", "b", "c", "d", "zz"]) == {"a": {"x": 1}, "b": 2, "c": 3, "d": 4}
        assert await cache.aincr("c") == 4
        assert await cache.aincr("c", -2) == 2
        assert await cache.adecr("c") == 1
        assert await cache.adecr("c", -9) == 10
        assert await cache.aincr("c", 0) == 10
        with pytest.raises(ValueError, match="^Key ':1:zz' not found$"):
            await cache.aincr("zz")
        with pytest.raises(ValueError, match="^Key ':1:zz' not found$"):
            await cache.adecr("zz")
        with pytest.raises(ValueError, match="^Key ':1:zz' not found$"):
            await cache.aincr("zz", -1)
        assert await cache.adelete("a") is True
        assert await cache.adelete("a") is False
        assert await cache.adelete_many(["b", "c"]) is None
        assert await cache.aget_many(["b", "c", "d"]) == {"d": 4}
        assert await cache.aget_or_set("g", lambda: "made") == "made"
        assert await cache.aget_or_set("g", "other") == "made"
        assert await cache.aget_or_set("g0", "now", timeout=0) == "now"
        assert await cache.aget("g0") is None
        assert await cache.aget_or_set("gv", "v3", version=3) == "v3"
        assert await cache.aget("gv") is None and await cache.aget("gv", version=3) == "v3"
        assert await cache.aincr_version("g") == 2
        assert await cache.aget("g", version=2) == "made" and await cache.aget("g") is None
        assert await cache.adecr_version("g", version=2) == 1
        await cache.aset("zero", 1, timeout=0)
        assert await cache.aget("zero") is None
        await cache.aset("d", "small")
        with pytest.raises(MemcacheServerError):
            await cache.aset("d", BIG)
        assert await cache.aget("d") is None
        with pytest.raises(InvalidCacheKey):
            await cache.aget("bad key")
        await cache.aset("v", 1, version=2)
        assert await cache.aget("v") is None and await cache.aget("v", version=2) == 1
        assert await cache.aadd("v", 5, version=2) is False
        assert await cache.aincr("v", version=2) == 2
        assert await cache.atouch("v", version=2) is True
        assert await cache.aget_many(["v"], version=2) == {"v": 2}
        await cache.aset_many({"w": 1}, version=2)
        assert await cache.aget("w", version=2) == 1
        await cache.adelete_many(["w", "v"], version=2)
        assert await cache.adelete("v", version=2) is False
        assert await cache.aget_many(["w", "v"], version=2) == {}
        await cache.aset("x", "y")
        assert await cache.aclear() is None
        assert await cache.aget("x") is None
        assert await cache.aclose() is None

    asyncio.run(script())


def test_async_timeouts(cache: BrokerCache, clock: FakeClock) -> None:
    async def script() -> None:
        await cache.aset("set", 1)
        await cache.aadd("add", 1, timeout=10)
        await cache.aset_many({"many": 1}, timeout=10)
        await cache.aget_or_set("gos", 1, timeout=10)
        await cache.aset("touched", 1)
        assert await cache.atouch("touched", timeout=10) is True
        clock.advance(9)
        assert await cache.aget_many(["set", "add", "many", "gos", "touched"]) == dict.fromkeys(
            ["set", "add", "many", "gos", "touched"], 1)
        clock.advance(2)
        assert await cache.aget_many(["set", "add", "many", "gos", "touched"]) == {"set": 1}
        clock.advance(288)
        assert await cache.aget("set") == 1
        clock.advance(2)
        assert await cache.aget("set") is None
        await cache.aset("forever", 1, timeout=None)
        clock.advance(10 * MONTH)
        assert await cache.aget("forever") == 1

    asyncio.run(script())


def test_async_client_is_made_once_and_shared(make: Callable[..., BrokerCache]) -> None:
    a, b = make(), make()
    assert a._acache is a._acache
    assert a._acache is b._acache  # same settings: one client per process


# --- configuration ------------------------------------------------------------------------------


def test_instances_with_the_same_settings_share_a_client(make: Callable[..., BrokerCache]) -> None:
    assert make()._cache is make()._cache
    assert make(KEY_PREFIX="x")._cache is make()._cache  # the prefix is Django's, not the client's
    assert make(OPTIONS={"timeout": 2.0})._cache is not make()._cache
    assert make(LOCATION="tcp://127.0.0.1:2")._cache is not make()._cache
    assert make(OPTIONS={"timeout": 2.0})._cache is make(OPTIONS={"timeout": 2.0})._cache


def test_options_go_to_the_client() -> None:
    # A real Client (built without connecting: the broker is reached on first use).
    cache = BrokerCache("tcp://127.0.0.1:1", {"OPTIONS": {"timeout": 2.5, "allow_unicode_keys": False}})
    assert isinstance(cache._cache, Client)
    assert cache._cache.broker_url == "tcp://127.0.0.1:1"
    assert cache._cache.timeout == 2.5
    assert cache._cache.allow_unicode_keys is False
    defaults = BrokerCache("tcp://127.0.0.1:1", {})._cache
    # PyMemcacheCache's defaults: unicode keys allowed, replies waited for, pickling serde.
    assert defaults.allow_unicode_keys is True
    assert defaults.default_noreply is False
    # PyMemcacheCache's OPTIONS (HashClient pooling/failover) are accepted and do nothing.
    migrated = BrokerCache("tcp://127.0.0.1:1", {"OPTIONS": {
        "use_pooling": True, "max_pool_size": 4, "pool_idle_timeout": 1, "lock_generator": None,
        "retry_attempts": 2, "retry_timeout": 1, "dead_timeout": 30, "hasher": None}})
    assert migrated._cache is defaults
    assert BrokerCache(" tcp://127.0.0.1:1 ", {})._cache is defaults
    assert BrokerCache(("tcp://127.0.0.1:1",), {})._cache is defaults
    assert BrokerCache(["tcp://127.0.0.1:1"], {})._cache is defaults


def test_async_client_gets_the_same_settings() -> None:
    cache = BrokerCache("tcp://127.0.0.1:1", {"OPTIONS": {"timeout": 2.5}})
    from clientlib import AsyncClient

    client = cache._acache
    assert isinstance(client, AsyncClient)
    assert client.broker_url == "tcp://127.0.0.1:1"
    assert client.timeout == 2.5
    assert client.allow_unicode_keys is True


@pytest.mark.parametrize(
    "location, options, message",
    [
        ("127.0.0.1:11211", {}, "127.0.0.1:11211"),
        ("ipc:///a.sock;ipc:///b.sock", {}, "one address"),
        ("ipc:///a.sock,ipc:///b.sock", {}, "one address"),
        (["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], {}, "one address"),
        (42, {}, "LOCATION must be the broker's address as a string, got 42"),
        ([42], {}, "got 42"),
        ("tcp://10.1.2.3:5555", {}, "10.1.2.3"),
        ("tcp://127.0.0.1:1", {"MAX_ENTRIES": 30}, "unknown OPTIONS ['MAX_ENTRIES']; OPTIONS are clientlib.Client "
                                                  "keyword arguments: ["),
        ("tcp://127.0.0.1:1", {"timeout": -1}, "timeout"),
        ("tcp://127.0.0.1:1", {"timeout": "x"}, "BrokerCache: "),
    ],
)
def test_bad_settings_are_clear_errors(location: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCacheBackendError) as info:
        BrokerCache(location, {"OPTIONS": options})
    assert message in str(info.value)
    assert str(info.value).startswith("clientlib.django.BrokerCache: ")


def test_unknown_options_name_the_accepted_ones() -> None:
    with pytest.raises(InvalidCacheBackendError) as info:
        BrokerCache("tcp://127.0.0.1:1", {"OPTIONS": {"MAX_ENTRIES": 30, "timeout": 1.0, "b_bad": 1}})
    text = str(info.value)
    assert "['MAX_ENTRIES', 'b_bad']" in text  # the unknown ones, sorted; not the known one
    for accepted in ("'timeout'", "'serde'", "'allow_unicode_keys'", "'ignore_exc'", "'key_prefix'"):
        assert accepted in text.split("keyword arguments:")[1]


def test_empty_location_uses_clientlib_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCBROKER_URL", "tcp://127.0.0.1:7")
    for location in ("", [], (), "  "):
        assert BrokerCache(location, {})._cache.broker_url == "tcp://127.0.0.1:7"
    # The default is read when the backend is made, not once per process.
    monkeypatch.setenv("MCBROKER_URL", "tcp://127.0.0.1:8")
    assert BrokerCache("", {})._cache.broker_url == "tcp://127.0.0.1:8"
    assert BrokerCache("", {})._acache.broker_url == "tcp://127.0.0.1:8"
    monkeypatch.setenv("MCBROKER_URL", "memcached:11211")
    with pytest.raises(InvalidCacheBackendError, match="MCBROKER_URL"):
        BrokerCache("", {})


# --- survivors of the first mutation run (docs/mutation.md) -------------------------------------


def test_an_empty_item_with_flags_0_reads_as_a_miss(cache: BrokerCache) -> None:
    # The module's rule: an empty item with client flags 0 is memcached's lease placeholder (a
    # value being computed by get_or_set), so every read treats it as a miss.
    raw_view(cache).set(":1:ph", b"")
    assert cache.get("ph") is None
    assert cache.get("ph", "dflt") == "dflt"
    assert cache.has_key("ph") is False
    assert cache.get_many(["ph"]) == {}
    assert asyncio.run(cache.aget("ph", "dflt")) == "dflt"
    assert asyncio.run(cache.aget_many(["ph"])) == {}
    # Empty values with other flags are values (here: an empty str, flags 16).
    cache.set("es", "")
    assert cache.get("es", "dflt") == ""


def test_stored_pickles_use_the_highest_protocol(cache: BrokerCache) -> None:
    # As pymemcache's pickle_serde (DEFAULT_PICKLE_VERSION = pickle.HIGHEST_PROTOCOL), which
    # Django's test_memcached_uses_highest_pickle_version checks for PyMemcacheCache.
    cache.set("empty", b"")
    cache.set("list", [1])
    header = pickle.PROTO + bytes([pickle.HIGHEST_PROTOCOL])
    assert raw_view(cache).get(":1:empty").startswith(header)
    assert raw_view(cache).get(":1:list").startswith(header)


class RecordingSerde:
    """A user serde (OPTIONS["serde"]): records the keys it is given."""

    def __init__(self) -> None:
        self.keys: list[Any] = []

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        self.keys.append(("out", key))
        return pickle.dumps(value), 1

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        self.keys.append(("in", key))
        return pickle.loads(value)


def test_a_serde_option_gets_the_key(make: Callable[..., BrokerCache]) -> None:
    # pymemcache's serde protocol: serialize(key, value) and deserialize(key, value, flags).
    serde = RecordingSerde()
    cache = make(OPTIONS={"serde": serde})
    cache.set("k", [1])
    assert cache.get("k") == [1]
    assert [direction for direction, _ in serde.keys] == ["out", "in"]
    assert all(key is not None and ":1:k" in (key.decode() if isinstance(key, bytes) else key)
               for _, key in serde.keys)


class UnhashableSerde(RecordingSerde):
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnhashableSerde)


def test_options_are_told_apart_by_value_and_unhashable_ones_by_identity(make: Callable[..., BrokerCache]) -> None:
    # One client per (address, OPTIONS): the same options share it, different values do not.
    assert make(OPTIONS={"timeout": 2.0})._cache is not make(OPTIONS={"timeout": 3.0})._cache
    assert make(OPTIONS={"timeout": 2.0})._cache.timeout == 2.0
    assert make(OPTIONS={"timeout": 3.0})._cache.timeout == 3.0
    first, second = UnhashableSerde(), UnhashableSerde()
    a = make(OPTIONS={"serde": first})
    assert make(OPTIONS={"serde": first})._cache is a._cache
    b = make(OPTIONS={"serde": second})
    assert b._cache is not a._cache
    a.set("k", 1)
    b.set("k2", 2)
    assert len(first.keys) == 1 and len(second.keys) == 1  # each value went through its own serde


def test_async_versions_of_delete_and_decr(cache: BrokerCache) -> None:
    async def script() -> None:
        await cache.aset("v", 5, version=2)
        await cache.aset("v", 50)
        assert await cache.adecr("v", version=2) == 4
        assert await cache.adecr("v", 2, version=2) == 2
        assert await cache.aget("v") == 50
        assert await cache.adelete("v", version=2) is True
        assert await cache.aget("v", version=2) is None
        assert await cache.aget("v") == 50

    asyncio.run(script())
