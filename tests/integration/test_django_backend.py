"""clientlib.django.BrokerCache against a real broker and memcached, modelled on Django's own cache
tests for its memcached backends (tests/cache/tests.py: BaseCacheTests, BaseMemcachedTests):
every method, the timeout rules, versioning, key validation, incr/decr, get_or_set, the async
methods, and close() between requests opening no connection.

Where a rule is Django's, the test compares with Django's own PyMemcacheCache (same timeout
translation, same key errors, values that read back across the two backends).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.conf import settings
from hypothesis import given, settings as hsettings, strategies as st

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="mcbroker-tests",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    )
    django.setup()

from django.core.cache import caches  # noqa: E402
from django.core.cache.backends.base import (  # noqa: E402
    DEFAULT_TIMEOUT,
    BaseCache,
    InvalidCacheBackendError,
    InvalidCacheKey,
)
from django.core.cache.backends.memcached import PyMemcacheCache  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.test import AsyncClient as DjangoAsyncTestClient, Client as DjangoTestClient, override_settings  # noqa: E402
from django.urls import path  # noqa: E402

import harness  # noqa: E402
from brokerproc import BrokerProcess  # noqa: E402
from clientlib import Client  # noqa: E402
from clientlib.django import BrokerCache  # noqa: E402
from clientlib.errors import MemcacheServerError  # noqa: E402
from harness import Memcached  # noqa: E402
from timing import FAST_DEADLINE  # noqa: E402

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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def custom_key_func(key: str, key_prefix: str, version: int) -> str:
    """As Django's tests' custom_key_func."""
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def counter_view(request: Any) -> HttpResponse:
    # A response that depends on the cache: the per-process request count.
    return HttpResponse(str(caches["default"].incr("hits")))


async def async_counter_view(request: Any) -> HttpResponse:
    # The same through Django's async request path and the backend's native coroutines.
    return HttpResponse(str(await caches["default"].aincr("ahits")))


urlpatterns = [path("count", counter_view), path("acount", async_counter_view)]


@pytest.fixture
def make(broker: BrokerProcess) -> Callable[..., BrokerCache]:
    def make(**params: Any) -> BrokerCache:
        # Calls get a deadline a loaded machine cannot outlast (tests/timing.py), unless the test
        # sets its own.
        params["OPTIONS"] = {"timeout": FAST_DEADLINE, **params.get("OPTIONS", {})}
        return BrokerCache(params.pop("LOCATION", broker.url), params)

    return make


@pytest.fixture
def cache(make: Callable[..., BrokerCache]) -> BrokerCache:
    return make()


def ttl_left(mc: Memcached, key: str) -> int | None:
    """Seconds left on `key` as memcached reports them (-1: never expires), None if absent."""
    reply = harness.request(mc.address, b"mg " + key.encode() + b" t\r\n", b"\r\n")
    if reply.startswith(b"EN"):
        return None
    assert reply.startswith(b"HD"), reply
    return int(reply.split(b" t", 1)[1].split()[0])


# --- the basics (Django's test_simple, test_add, test_non_existent, test_get_many, ...) --------


def test_set_get_delete(cache: BrokerCache) -> None:
    cache.set("key", "value")
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
    cache.delete_many(["a", "b"])
    assert cache.get_many(["a", "b", "c"]) == {"c": "c"}
    cache.delete_many(iter(["c"]))
    assert cache.get("c") is None


def test_clear_flushes_everything(cache: BrokerCache, make: Callable[..., BrokerCache]) -> None:
    other = make(KEY_PREFIX="other")
    cache.set_many({"key1": "spam", "key2": "eggs"})
    other.set("key1", "ham")
    cache.clear()
    assert cache.get_many(["key1", "key2"]) == {}
    # As Django's memcached backends: clear() is flush_all, whatever the KEY_PREFIX.
    assert other.get("key1") is None


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
    unicode = {"ascii": "ascii_value", "unicode_ascii": "Iñtërnâtiônàlizætiøn1", "Iñtërnâtiônàlizætiøn": "x",
               "ascii2": {"x": 1}}
    for key, value in unicode.items():
        cache.set(key, value)
        assert cache.get(key) == value
    assert cache.get_many(list(unicode)) == unicode


def test_values_cross_read_with_djangos_pymemcache_backend(cache: BrokerCache, mc: Memcached) -> None:
    # Same serde flags and key layout as PyMemcacheCache: a switch keeps the warm cache.
    theirs = PyMemcacheCache(mc.address, {})
    try:
        theirs.set("from_django", {"n": 1, "s": "é"})
        cache.set("from_broker", [1, "two", 3.0])
        cache.set("int", 7)
        assert cache.get("from_django") == {"n": 1, "s": "é"}
        assert theirs.get("from_broker") == [1, "two", 3.0]
        assert theirs.incr("int") == 8
        assert cache.get("int") == 8
    finally:
        theirs._cache.disconnect_all()


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
    # memcached's decr stops at 0 (counters are unsigned).
    assert cache.decr("answer", 100) == 0


def test_incr_decr_missing_key_is_value_error(cache: BrokerCache) -> None:
    with pytest.raises(ValueError, match="Key ':1:does_not_exist' not found"):
        cache.incr("does_not_exist")
    with pytest.raises(ValueError):
        cache.incr("does_not_exist", -1)
    with pytest.raises(ValueError):
        cache.decr("does_not_exist")
    assert cache.get("does_not_exist") is None


def test_incr_is_atomic_across_threads(cache: BrokerCache) -> None:
    import threading

    cache.set("counter", 0)
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(100):
                cache.incr("counter")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert cache.get("counter") == 400


# --- timeouts ---------------------------------------------------------------------------------


@hsettings(max_examples=300, deadline=None)
@given(st.one_of(
    st.none(), st.just(DEFAULT_TIMEOUT), st.integers(-10**6, 10**8),
    st.floats(-1e6, 1e8, allow_nan=False), st.sampled_from([0, 0.0, 0.4, -0.5, 2592000, 2592001]),
))
def test_timeout_translation_is_djangos(timeout: Any) -> None:
    # Django's PyMemcacheCache never connects to build; only its timeout rule is used here.
    theirs = PyMemcacheCache("127.0.0.1:1", {"TIMEOUT": 300})
    ours = BrokerCache("tcp://127.0.0.1:1", {"TIMEOUT": 300})
    real_time = time.time
    frozen = real_time()
    time.time = lambda: frozen  # type: ignore[assignment]
    try:
        assert ours.get_backend_timeout(timeout) == theirs.get_backend_timeout(timeout)
    finally:
        time.time = real_time  # type: ignore[assignment]


def test_timeouts_reach_memcached(make: Callable[..., BrokerCache], mc: Memcached) -> None:
    cache = make()
    cache.set("default", 1)  # TIMEOUT 300 by default
    assert 290 <= (ttl_left(mc, ":1:default") or 0) <= 300
    cache.set("forever", 1, timeout=None)
    assert ttl_left(mc, ":1:forever") == -1
    cache.set("float", 1, timeout=60.9)
    assert 50 <= (ttl_left(mc, ":1:float") or 0) <= 60
    year = 60 * 60 * 24 * 365
    cache.set("long", 1, timeout=year)  # past 30 days: sent as a Unix time
    # memcached converts a Unix time with its coarse clock: a second or two either way.
    assert year - 60 <= (ttl_left(mc, ":1:long") or 0) <= year + 2
    for expired in (0, -1, 0.4):
        cache.set("zero", 1)
        cache.set("zero", 1, timeout=expired)
        assert cache.get("zero") is None, expired
        assert cache.add("zero", 1, timeout=expired) is True
        assert cache.get("zero") is None, expired
    assert cache.set_many({"m1": 1, "m2": 2}, timeout=0) == []
    assert cache.get_many(["m1", "m2"]) == {}
    never = make(TIMEOUT=None)
    never.set("infinite_foo", "bar")
    assert never.get("infinite_foo") == "bar"
    assert ttl_left(mc, ":1:infinite_foo") == -1
    far = make(TIMEOUT=31536000)
    far.set("future_foo", "bar")
    assert far.get("future_foo") == "bar"


def test_expiration_happens(cache: BrokerCache) -> None:
    # memcached's clock ticks once a second: 1 s expiries are gone within 2.5 s.
    cache.set("expire1", "very quickly", 1)
    cache.set("expire2", "very quickly", 1)
    cache.set("expire3", "very quickly", 1)
    time.sleep(2.5)
    assert cache.get("expire1") is None
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"
    assert cache.has_key("expire3") is False


def test_touch(cache: BrokerCache, mc: Memcached) -> None:
    cache.set("expire1", "very quickly", timeout=100)
    assert cache.touch("expire1", timeout=4000) is True
    assert 3990 <= (ttl_left(mc, ":1:expire1") or 0) <= 4000
    assert cache.touch("expire1", timeout=None) is True
    assert ttl_left(mc, ":1:expire1") == -1
    assert cache.touch("expire1") is True  # DEFAULT_TIMEOUT: the cache's 300
    assert 290 <= (ttl_left(mc, ":1:expire1") or 0) <= 300
    assert cache.touch("expire1", timeout=0) is True  # Django's 0: expire now
    assert cache.get("expire1") is None
    assert cache.touch("nonexistent") is False


# --- set failures -----------------------------------------------------------------------------


def test_failed_set_deletes_the_old_value(cache: BrokerCache) -> None:
    # Django's test_memcached_deletes_key_on_failed_set (the test servers run with -I 2m).
    cache.set("small_value", "a")
    assert cache.get("small_value") == "a"
    large = "a" * (3 << 20)
    with pytest.raises(MemcacheServerError):
        cache.set("small_value", large)
    assert cache.get("small_value") is None


def test_set_many_returns_the_keys_not_stored(make: Callable[..., BrokerCache]) -> None:
    # pymemcache's set_many lists a failed key instead of raising with ignore_exc.
    cache = make(OPTIONS={"ignore_exc": True})
    cache.set("big", "old")
    failed = cache.set_many({"ok1": 1, "big": "b" * (3 << 20), "ok2": 2})
    assert failed == ["big"]
    assert cache.get_many(["ok1", "ok2", "big"]) == {"ok1": 1, "ok2": 2}
    strict = make()
    with pytest.raises(MemcacheServerError):
        strict.set_many({"ok3": 3, "big": "b" * (3 << 20)})
    assert strict.get("ok3") == 3


# --- keys, versions, prefixes -----------------------------------------------------------------

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
    ("aget", lambda c, k: asyncio.run(c.aget(k))),
    ("aset", lambda c, k: asyncio.run(c.aset(k, 1))),
    ("aset_many", lambda c, k: asyncio.run(c.aset_many({k: 1}))),
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
    for key in ["a" * 246, "a" * 247, "a" * 248, "sp ace", "tab\t", "nul\x00", "é" * 82, "ok:key"]:
        def outcome(cache: BaseCache) -> str | None:
            try:
                cache.make_and_validate_key(key)
            except InvalidCacheKey as exc:
                return str(exc)
            return None
        assert outcome(ours) == outcome(theirs), key


def test_versioning(make: Callable[..., BrokerCache]) -> None:
    # Django's test_cache_versioning_get_set / _add / _has_key / _delete, compressed.
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
    assert cache.get_many(["m"], version=3) == {"m": 1}
    cache.delete_many(["m"], version=3)
    assert cache.get("m", version=3) is None
    cache.set("n", 1, version=2)
    assert cache.incr("n", version=2) == 2
    with pytest.raises(ValueError):
        cache.incr("n")


def test_incr_decr_version(make: Callable[..., BrokerCache]) -> None:
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
    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")
    with pytest.raises(ValueError):
        cache.decr_version("does_not_exist")


def test_key_prefix_and_key_function(make: Callable[..., BrokerCache], mc: Memcached) -> None:
    plain = make()
    prefixed = make(KEY_PREFIX="cacheprefix")
    custom = make(KEY_FUNCTION=custom_key_func)
    custom2 = make(KEY_FUNCTION=f"{__name__}.custom_key_func")
    plain.set("answer1", 42)
    assert prefixed.get("answer1") is None
    prefixed.set("answer1", 7)
    assert plain.get("answer1") == 42
    assert ttl_left(mc, "cacheprefix:1:answer1") is not None
    custom.set("answer1", 5)
    assert plain.get("answer1") == 42
    assert custom2.get("answer1") == 5
    assert ttl_left(mc, "CUSTOM--1-answer1") is not None


# --- get_or_set ---------------------------------------------------------------------------------


def test_get_or_set(cache: BrokerCache, mc: Memcached) -> None:
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("projector", 99) == 42
    assert cache.get_or_set("null", None) is None
    assert cache.has_key("null")  # None is stored, as in Django
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
    assert 40 <= (ttl_left(mc, ":1:short") or 0) <= 50
    # Timeout 0: the value is returned but not kept (Django's rule).
    assert cache.get_or_set("gone", "y", timeout=0) == "y"
    assert cache.get("gone") is None


def test_get_or_set_while_computing_the_key_reads_as_a_miss(cache: BrokerCache, make: Callable[..., BrokerCache]) -> None:
    # While one caller computes, memcached holds an empty lease placeholder under the key: the
    # backend's reads see a miss, as Django's would; an add() finds the key taken.
    other = make()
    seen: dict[str, Any] = {}

    def compute() -> str:
        seen["get"] = other.get("race", "absent")
        seen["has_key"] = other.has_key("race")
        seen["get_many"] = other.get_many(["race"])
        seen["aget"] = asyncio.run(other.aget("race", "absent"))
        seen["add"] = other.add("race", "theirs")
        return "ours"

    assert cache.get_or_set("race", compute) == "ours"
    assert seen == {"get": "absent", "has_key": False, "get_many": {}, "aget": "absent", "add": False}
    assert cache.get("race") == "ours"


def test_get_or_set_is_herd_safe(make: Callable[..., BrokerCache]) -> None:
    import threading

    calls: list[int] = []
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def expensive() -> str:
        with lock:
            calls.append(1)
        time.sleep(0.3)
        return "computed"

    def worker() -> None:
        try:
            value = make().get_or_set("hot", expensive, timeout=60)
            with lock:
                results.append(value)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == ["computed"] * 8
    assert len(calls) == 1  # one caller computed; seven waited for its value


def test_empty_bytes_are_a_value_not_a_placeholder(cache: BrokerCache, mc: Memcached) -> None:
    cache.set("empty", b"")
    assert cache.get("empty", "dflt") == b""
    assert cache.get_many(["empty"]) == {"empty": b""}
    assert cache.get_or_set("empty", lambda: pytest.fail("computed")) == b""
    theirs = PyMemcacheCache(mc.address, {})
    try:
        assert theirs.get("empty", "dflt") == b""
    finally:
        theirs._cache.disconnect_all()


# --- async --------------------------------------------------------------------------------------

ASYNC_METHODS = [
    "aadd", "aget", "aset", "atouch", "adelete", "aget_many", "aset_many", "adelete_many", "aincr", "adecr",
    "aget_or_set", "aclear", "aclose",
]


def test_async_methods_are_native() -> None:
    # Not Django's sync_to_async fallbacks: each is defined by BrokerCache itself. (ahas_key,
    # aincr_version and adecr_version are Django's, built from the native ones above.)
    for name in ASYNC_METHODS:
        assert name in vars(BrokerCache), name
        assert getattr(BrokerCache, name) is not getattr(BaseCache, name), name


def test_async_methods(cache: BrokerCache, make: Callable[..., BrokerCache], mc: Memcached) -> None:
    async def script() -> None:
        await cache.aset("a", {"x": 1})
        assert await cache.aget("a") == {"x": 1}
        assert await cache.aget("missing", "dflt") == "dflt"
        assert await cache.aadd("a", 2) is False
        assert await cache.aadd("b", 2) is True
        assert await cache.ahas_key("b") is True and await cache.ahas_key("zz") is False
        assert await cache.atouch("b", timeout=1000) is True
        assert 990 <= (ttl_left(mc, ":1:b") or 0) <= 1000
        assert await cache.atouch("zz") is False
        assert await cache.aset_many({"c": 3, "d": 4}) == []
        assert await cache.aget_many(["a", "b", "c", "d", "zz"]) == {"a": {"x": 1}, "b": 2, "c": 3, "d": 4}
        assert await cache.aincr("c") == 4
        assert await cache.aincr("c", -2) == 2
        assert await cache.adecr("c") == 1
        assert await cache.adecr("c", -9) == 10
        with pytest.raises(ValueError):
            await cache.aincr("zz")
        with pytest.raises(ValueError):
            await cache.adecr("zz")
        assert await cache.adelete("a") is True
        assert await cache.adelete("a") is False
        await cache.adelete_many(["b", "c"])
        assert await cache.aget_many(["b", "c", "d"]) == {"d": 4}
        assert await cache.aget_or_set("g", lambda: "made") == "made"
        assert await cache.aget_or_set("g", "other") == "made"
        assert await cache.aget_or_set("g0", "now", timeout=0) == "now"
        assert await cache.aget("g0") is None
        assert await cache.aincr_version("g") == 2
        assert await cache.aget("g", version=2) == "made" and await cache.aget("g") is None
        assert await cache.adecr_version("g", version=2) == 1
        await cache.aset("zero", 1, timeout=0)
        assert await cache.aget("zero") is None
        with pytest.raises(MemcacheServerError):
            await cache.aset("d", "x" * (3 << 20))
        assert await cache.aget("d") is None
        with pytest.raises(InvalidCacheKey):
            await cache.aget("bad key")
        # Many at once share the socket and all come back right.
        results = await asyncio.gather(*(cache.aset(f"k{i}", i) for i in range(50)))
        assert results == [None] * 50
        assert await asyncio.gather(*(cache.aget(f"k{i}") for i in range(50))) == list(range(50))
        await cache.aclear()
        assert await cache.aget("d") is None and await cache.aget("k1") is None
        await cache.aclose()

    asyncio.run(script())
    # A second event loop gets the same answers from the same backend instance.
    asyncio.run(cache.aset("again", 1))
    assert asyncio.run(cache.aget("again")) == 1


# --- close() between requests, configuration --------------------------------------------------


def test_close_between_requests_opens_no_connection(broker: BrokerProcess, mc: Memcached) -> None:
    caches_setting = {"default": {"BACKEND": "clientlib.django.BrokerCache", "LOCATION": broker.url}}
    with override_settings(CACHES=caches_setting):
        caches["default"].set("hits", 0)
        web = DjangoTestClient()
        web.get("/count")  # the first request may open this thread's broker socket
        with harness.StatsConnection(mc.address) as watch:
            before = watch.stats()
            before_broker = broker.stats()["servers"]
            for n in range(2, 42):
                # Each request ends with request_finished -> cache.close().
                assert web.get("/count").content == str(n).encode()
            after = watch.stats()
            after_broker = broker.stats()["servers"]
    # memcached accepted no connection while the 40 requests were served and closed.
    assert int(after["total_connections"]) == int(before["total_connections"])
    assert int(after["curr_connections"]) == int(before["curr_connections"])
    assert [s["connections"] for s in after_broker.values()] == [s["connections"] for s in before_broker.values()]


def test_async_views_share_one_client(broker: BrokerProcess, mc: Memcached) -> None:
    caches_setting = {"default": {"BACKEND": "clientlib.django.BrokerCache", "LOCATION": broker.url}}

    async def requests() -> list[bytes]:
        web = DjangoAsyncTestClient()
        replies = await asyncio.gather(*(web.get("/acount") for _ in range(30)))
        return [r.content for r in replies]

    with override_settings(CACHES=caches_setting):
        caches["default"].set("ahits", 0)
        with harness.StatsConnection(mc.address) as watch:
            before = watch.stats()
            bodies = asyncio.run(requests())
            after = watch.stats()
    # Concurrent requests, each in its own async context (so each with its own backend
    # instance), all counted once, and memcached saw no new connection.
    assert sorted(int(b) for b in bodies) == list(range(1, 31))
    assert int(after["total_connections"]) == int(before["total_connections"])


def test_djangos_own_backend_reconnects_after_close(mc: Memcached) -> None:
    # What the test above guards against, shown on Django's PyMemcacheCache: the same
    # measurement counts a new memcached connection for every request.
    caches_setting = {"default": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                                  "LOCATION": mc.address}}
    with override_settings(CACHES=caches_setting):
        caches["default"].set("hits", 0)
        web = DjangoTestClient()
        with harness.StatsConnection(mc.address) as watch:
            before = watch.stats()
            for _ in range(5):
                web.get("/count")
            after = watch.stats()
        caches["default"].close()
    # The first request reuses the connection made by set(); each later one opens a new one.
    assert int(after["total_connections"]) - int(before["total_connections"]) >= 4


def test_instances_with_the_same_settings_share_a_client(make: Callable[..., BrokerCache]) -> None:
    assert make()._cache is make()._cache
    assert make(KEY_PREFIX="x")._cache is make()._cache  # the prefix is Django's, not the client's
    assert make(OPTIONS={"timeout": 2.0})._cache is not make()._cache


def test_options_go_to_the_client(make: Callable[..., BrokerCache]) -> None:
    cache = make(OPTIONS={"timeout": 2.5, "allow_unicode_keys": False})
    assert isinstance(cache._cache, Client)
    assert cache._cache.timeout == 2.5
    assert cache._cache.allow_unicode_keys is False
    # PyMemcacheCache's OPTIONS (HashClient pooling/failover, socket options) keep working.
    migrated = make(OPTIONS={"use_pooling": True, "max_pool_size": 4, "retry_attempts": 2, "dead_timeout": 30,
                             "no_delay": True, "connect_timeout": 1.0})
    migrated.set("k", "v")
    assert migrated.get("k") == "v"


@pytest.mark.parametrize(
    "location, options, message",
    [
        ("127.0.0.1:11211", {}, "127.0.0.1:11211"),
        ("ipc:///a.sock;ipc:///b.sock", {}, "one address"),
        (["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], {}, "one address"),
        ("tcp://10.1.2.3:5555", {}, "10.1.2.3"),
        ("tcp://127.0.0.1:1", {"MAX_ENTRIES": 30}, "unknown OPTIONS ['MAX_ENTRIES']"),
        ("tcp://127.0.0.1:1", {"timeout": -1}, "timeout"),
    ],
)
def test_bad_settings_are_clear_errors(location: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCacheBackendError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BrokerCache(location, {"OPTIONS": options})


def test_empty_location_uses_clientlib_default(broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCBROKER_URL", broker.url)
    for location in ("", [], None):
        cache = BrokerCache(location if location is not None else "", {})
        cache.set("k", location is None)
        assert cache._cache.broker_url == broker.url
    single = BrokerCache([broker.url], {})
    assert single.get("k") is True
    # The default is read when the backend is made, not once per process.
    monkeypatch.setenv("MCBROKER_URL", "tcp://127.0.0.1:1")
    assert BrokerCache("", {})._cache.broker_url == "tcp://127.0.0.1:1"
    monkeypatch.setenv("MCBROKER_URL", "memcached:11211")
    with pytest.raises(InvalidCacheBackendError, match="MCBROKER_URL"):
        BrokerCache("", {})


def test_caches_setting_end_to_end(broker: BrokerProcess) -> None:
    caches_setting = {"default": {"BACKEND": "clientlib.django.BrokerCache", "LOCATION": broker.url,
                                  "TIMEOUT": 60, "KEY_PREFIX": "site", "VERSION": 3}}
    with override_settings(CACHES=caches_setting):
        c = caches["default"]
        assert isinstance(c, BrokerCache)
        c.set("x", 1)
        assert c.make_key("x") == "site:3:x"
        assert c.get("x") == 1
