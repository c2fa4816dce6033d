"""clientlib.flask.BrokerCache: a real Flask app with Flask-Caching, a real broker and memcached.

Cached views, memoize, and Flask-Caching's contract (set_many returns the stored keys, get_many a
list, get_dict a dict, timeout 0 = never, has, atomic inc/dec, clear); where Flask-Caching's own
in-process SimpleCache defines the answer, the same script runs on both and must agree.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, request
from flask_caching import Cache
from flask_caching.backends.simplecache import SimpleCache

import harness
from brokerproc import BrokerProcess
from clientlib.flask import BrokerCache
from harness import Memcached
from timing import FAST_DEADLINE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def ttl_left(mc: Memcached, key: str) -> int | None:
    """Seconds left on `key` as memcached reports them (-1: never expires), None if absent."""
    reply = harness.request(mc.address, b"mg " + key.encode() + b" t\r\n", b"\r\n")
    if reply.startswith(b"EN"):
        return None
    assert reply.startswith(b"HD"), reply
    return int(reply.split(b" t", 1)[1].split()[0])


def make_app(broker: BrokerProcess, **config: Any) -> tuple[Flask, Cache, dict[str, int]]:
    app = Flask(__name__)
    app.config.update(CACHE_TYPE="clientlib.flask.BrokerCache", CACHE_MCBROKER_URL=broker.url, **config)
    cache = Cache(app)
    calls = {"view": 0, "memo": 0}

    @app.route("/hello")
    @cache.cached(timeout=60, query_string=True)
    def hello() -> str:
        calls["view"] += 1
        return f"hello {request.args.get('name', 'world')} #{calls['view']}"

    @cache.memoize(timeout=60)
    def square(n: int) -> int:
        calls["memo"] += 1
        return n * n

    @app.route("/square/<int:n>")
    def square_view(n: int) -> str:
        return str(square(n))

    @app.route("/hits")
    def hits() -> str:
        return str(cache.cache.inc("hits"))

    app.square = square  # type: ignore[attr-defined]
    return app, cache, calls


@pytest.fixture
def app_cache(broker: BrokerProcess) -> tuple[Flask, Cache, dict[str, int]]:
    return make_app(broker)


@pytest.fixture
def backend(broker: BrokerProcess) -> BrokerCache:
    return BrokerCache(broker.url, key_prefix="t:", timeout=FAST_DEADLINE)  # tests/timing.py


def test_cache_type_selects_the_backend(broker: BrokerProcess, mc: Memcached) -> None:
    app, cache, _ = make_app(broker, CACHE_KEY_PREFIX="app1:", CACHE_DEFAULT_TIMEOUT=120,
                             CACHE_OPTIONS={"timeout": 2.0})
    with app.app_context():
        backend = cache.cache
        assert isinstance(backend, BrokerCache)
        assert backend._client.timeout == 2.0
        assert backend._client.broker_url == broker.url
        assert cache.set("k", {"v": 1}) is True
        assert cache.get("k") == {"v": 1}
    assert 110 <= (ttl_left(mc, "app1:k") or 0) <= 120


def test_cached_view(app_cache: tuple[Flask, Cache, dict[str, int]]) -> None:
    app, cache, calls = app_cache
    web = app.test_client()
    assert web.get("/hello").text == "hello world #1"
    assert web.get("/hello").text == "hello world #1"  # from the cache
    assert web.get("/hello?name=ann").text == "hello ann #2"
    assert web.get("/hello?name=ann").text == "hello ann #2"
    assert calls["view"] == 2
    with app.app_context():
        cache.clear()
    assert web.get("/hello").text == "hello world #3"


def test_memoize(app_cache: tuple[Flask, Cache, dict[str, int]]) -> None:
    app, cache, calls = app_cache
    web = app.test_client()
    assert [web.get(f"/square/{n}").text for n in (3, 4, 3, 4, 3)] == ["9", "16", "9", "16", "9"]
    assert calls["memo"] == 2
    with app.app_context():
        cache.delete_memoized(app.square, 3)  # type: ignore[attr-defined]
        assert web.get("/square/3").text == "9"
        assert web.get("/square/4").text == "16"
        assert calls["memo"] == 3
        cache.delete_memoized(app.square)  # type: ignore[attr-defined]  # every argument: a new version
        assert web.get("/square/4").text == "16"
        assert calls["memo"] == 4


def test_counter_view_is_atomic_across_threads(app_cache: tuple[Flask, Cache, dict[str, int]]) -> None:
    app, _, _ = app_cache
    seen: list[int] = []
    lock = threading.Lock()

    errors: list[BaseException] = []

    def worker() -> None:
        web = app.test_client()
        try:
            for _ in range(50):
                reply = web.get("/hits")
                assert reply.status_code == 200, reply.text
                with lock:
                    seen.append(int(reply.text))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(seen) == list(range(1, 201))


def test_set_many_get_many_get_dict(backend: BrokerCache) -> None:
    assert backend.set_many({"a": 1, "b": "two", "c": [3]}) == ["a", "b", "c"]
    assert backend.get_many("a", "zz", "c", "b") == [1, None, [3], "two"]
    assert backend.get_dict("a", "zz", "b") == {"a": 1, "zz": None, "b": "two"}
    assert backend.get_many() == []
    assert backend.get_dict() == {}
    # A refused value is left out of the stored keys; the others are stored.
    backend.set("big", "old")
    assert backend.set_many({"d": 4, "big": "x" * (3 << 20), "e": 5}) == ["d", "e"]
    assert backend.get_dict("d", "big", "e") == {"d": 4, "big": None, "e": 5}


def test_timeouts(backend: BrokerCache, mc: Memcached) -> None:
    backend.set("default", 1)
    assert 290 <= (ttl_left(mc, "t:default") or 0) <= 300
    backend.set("never", 1, timeout=0)
    assert ttl_left(mc, "t:never") == -1
    backend.set("delta", 1, timeout=dt.timedelta(seconds=59, milliseconds=200))
    assert 50 <= (ttl_left(mc, "t:delta") or 0) <= 60
    year = 365 * 24 * 3600
    backend.set("year", 1, timeout=year)
    # memcached converts a Unix time with its coarse clock: a second or two either way.
    assert year - 60 <= (ttl_left(mc, "t:year") or 0) <= year + 2
    assert backend.set_many({"m": 1}, timeout=0) == ["m"]
    assert ttl_left(mc, "t:m") == -1
    assert backend.add("added", 1, timeout=30) is True
    assert 20 <= (ttl_left(mc, "t:added") or 0) <= 30
    backend.set("gone", 1, timeout=-1)
    assert backend.get("gone") is None
    forever = BrokerCache(backend._client.broker_url, default_timeout=0, key_prefix="t:")
    forever.set("f", 1)
    assert ttl_left(mc, "t:f") == -1


def test_has_reads_nothing_and_changes_nothing(backend: BrokerCache) -> None:
    backend.set("obj", {"x": 1})
    backend.set("n", 5)
    assert backend.has("obj") is True and backend.has("n") is True
    assert backend.has("zz") is False
    assert backend.get("obj") == {"x": 1} and backend.get("n") == 5
    assert backend.inc("n") == 6


def test_inc_dec(backend: BrokerCache) -> None:
    assert backend.inc("c") == 1  # a missing key starts from delta
    assert backend.inc("c", 5) == 6
    assert backend.dec("c", 2) == 4
    assert backend.inc("c", -1) == 3
    assert backend.dec("c", -2) == 5
    assert backend.get("c") == 5
    assert backend.dec("fresh") == 0  # memcached's counters stop at 0
    assert backend.dec("c", 100) == 0
    backend.set("text", "abc")
    assert backend.inc("text") is None  # not a number: a backend error, None
    assert backend.get("text") == "abc"


def test_add_delete_delete_many_clear(backend: BrokerCache) -> None:
    assert backend.add("a", 1) is True
    assert backend.add("a", 2) is False
    assert backend.get("a") == 1
    assert backend.delete("a") is True
    assert backend.delete("a") is False
    backend.set_many({"x": 1, "y": 2})
    assert backend.delete_many("x", "y", "missing") == ["x", "y", "missing"]
    assert backend.get_many("x", "y") == [None, None]
    backend.set("z", 1)
    assert backend.clear() is True
    assert backend.get("z") is None


def test_keys_memcached_cannot_take_are_never_sent(backend: BrokerCache) -> None:
    for bad in ("with space", "ctrl\x01", "k" * 300, "é" * 200):
        assert backend.get(bad) is None
        assert backend.set(bad, 1) is False
        assert backend.add(bad, 1) is False
        assert backend.has(bad) is False
        assert backend.delete(bad) is False
        assert backend.inc(bad) is None
    backend.set("ok", 1)
    assert backend.get_dict("ok", "with space") == {"ok": 1, "with space": None}
    assert backend.set_many({"ok2": 2, "with space": 3}) == ["ok2"]
    assert backend.delete_many("ok", "with space") == ["ok"]
    assert backend.get("ok") is None


def test_too_large_set_returns_false_and_drops_the_old_value(backend: BrokerCache) -> None:
    backend.set("v", "small")
    assert backend.set("v", "x" * (3 << 20)) is False
    assert backend.get("v") is None
    assert backend.add("w", "x" * (3 << 20)) is False


SCRIPT: list[tuple[str, tuple[Any, ...]]] = [
    ("get", ("a",)), ("set", ("a", 1)), ("get", ("a",)), ("add", ("a", 2)), ("add", ("b", [1, 2])),
    ("get_many", ("a", "b", "c")), ("get_dict", ("a", "c")), ("has", ("a",)), ("has", ("c",)),
    ("set_many", ({"c": "x", "d": None},)), ("get_dict", ("c", "d")), ("inc", ("n",)), ("inc", ("n", 4)),
    ("dec", ("n", 2)), ("get", ("n",)), ("delete", ("a",)), ("delete", ("a",)), ("delete_many", ("b", "zz")),
    ("get_many", ("a", "b", "c", "d")), ("set", ("e", {"k": (1, 2)}, 0)), ("get", ("e",)), ("clear", ()),
    ("get_many", ("c", "e")),
]


def test_agrees_with_flask_cachings_simplecache(backend: BrokerCache) -> None:
    reference = SimpleCache()
    for name, args in SCRIPT:
        assert getattr(backend, name)(*args) == getattr(reference, name)(*args), (name, args)


def test_get_or_set_computes_a_missing_value_once_among_concurrent_callers(backend: BrokerCache) -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def slow() -> str:
        with lock:
            calls.append(1)
        threading.Event().wait(0.3)
        return "computed"

    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(backend.get_or_set("herd", slow, timeout=60))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == ["computed"] * 8 and len(calls) == 1
    assert backend.get("herd") == "computed"
    assert backend.get_or_set("herd", slow) == "computed" and len(calls) == 1
    assert backend.get_or_set("bad key", lambda: "not stored") == "not stored"
