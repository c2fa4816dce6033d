"""clientlib.flask.BrokerCache in-process, over clientlib.mock.MockClient (memcached's semantics in
memory) instead of a broker: the contract of tests/integration/test_flask_backend.py, fast enough
for mutation testing (mutmut only sees code run by tests/unit).

The backend builds its client as `Client(broker, **options)` (clientlib.flask's `Client`); here
that name is replaced, for the test only, by a MockClient on a fake clock, which keeps every
argument check of the real client (a MockClient is a Client with an in-memory transport).
Expected values are Flask-Caching's contract (cachelib's BaseCache; where its in-process
SimpleCache defines the answer, the same script runs on both and must agree), the module's
docstring and memcached's rules (protocol.txt).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, request
from flask_caching import Cache
from flask_caching.backends.simplecache import SimpleCache

import clientlib.flask
from clientlib.flask import BrokerCache
from clientlib.mock import MockClient
from test_mock import FakeClock

pytestmark = pytest.mark.unit

MONTH = 60 * 60 * 24 * 30  # memcached's limit for a relative expiry (protocol.txt)
BIG = "x" * (2 << 20)  # larger than the mock's item size limit (memcached's default -I 1m)


@pytest.fixture
def clock() -> FakeClock:
    # test_mock's clock, started at the real time: the backend turns timeouts past 30 days into
    # Unix times with time.time().
    return FakeClock(float(int(time.time())))


@pytest.fixture
def mem(clock: FakeClock) -> MockClient:
    """A client without prefix or serde on the memory the backends use: what memcached holds."""
    return MockClient(clock=clock)


@pytest.fixture
def built(mem: MockClient, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any], MockClient]]:
    """Every client the backend builds: (broker argument, options, the MockClient). All share
    `mem`'s memory, as backends on one broker share memcached."""
    calls: list[tuple[Any, dict[str, Any], MockClient]] = []

    def make_client(broker: Any, **options: Any) -> MockClient:
        client = MockClient(broker, clock=mem._memory.clock, **options)
        client._memory = mem._memory
        client._memory_transport = mem._memory_transport
        client._transport = mem._transport
        calls.append((broker, options, client))
        return client

    monkeypatch.setattr(clientlib.flask, "Client", make_client)
    return calls


@pytest.fixture
def backend(built: list[Any]) -> BrokerCache:
    return BrokerCache("tcp://127.0.0.1:1", key_prefix="t:")


def make_app(**config: Any) -> tuple[Flask, Cache, dict[str, int]]:
    app = Flask(__name__)
    app.config.update(CACHE_TYPE="clientlib.flask.BrokerCache", CACHE_MCBROKER_URL="tcp://127.0.0.1:1", **config)
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

    return app, cache, calls


# --- Flask-Caching's configuration --------------------------------------------------------------


def test_cache_type_selects_the_backend_with_the_config_keys(built: list[Any], mem: MockClient, clock: FakeClock) -> None:
    app, cache, _ = make_app(CACHE_KEY_PREFIX="app:", CACHE_DEFAULT_TIMEOUT=50,
                             CACHE_OPTIONS={"timeout": 2.5})
    backend = cache.cache
    assert isinstance(backend, BrokerCache)
    broker, options, client = built[-1]
    assert broker == "tcp://127.0.0.1:1"
    assert options["timeout"] == 2.5 and client.timeout == 2.5
    assert backend.key_prefix == "app:"
    assert backend.default_timeout == 50
    backend.set("k", "v")
    assert mem.get("app:k") == b"v"
    clock.advance(49)
    assert backend.get("k") == "v"
    clock.advance(2)
    assert backend.get("k") is None


def test_factory_without_url_or_prefix(built: list[Any], mem: MockClient) -> None:
    app = Flask(__name__)
    app.config.update(CACHE_TYPE="clientlib.flask.BrokerCache")
    cache = Cache(app)
    assert built[-1][0] is None  # no CACHE_MCBROKER_URL: clientlib's default address
    assert cache.cache.key_prefix == "flask_cache_"  # Flask-Caching's CACHE_KEY_PREFIX default
    assert cache.cache.default_timeout == 300  # Flask-Caching's CACHE_DEFAULT_TIMEOUT
    cache.cache.set("plain", 1)
    assert mem.get("flask_cache_plain") == b"1"


def test_constructor_defaults(built: list[Any], mem: MockClient) -> None:
    backend = BrokerCache()
    broker, options, client = built[-1]
    assert broker is None
    assert backend.key_prefix == ""
    assert backend.default_timeout == 300
    assert backend.ignore_delete_many_errors is False
    assert client.allow_unicode_keys is True
    assert BrokerCache("")._client is built[-1][2] and built[-1][0] is None  # "" is the default too
    custom = BrokerCache("tcp://127.0.0.1:9", default_timeout=dt.timedelta(minutes=2), key_prefix=None,
                         ignore_delete_many_errors=True, timeout=3.0, allow_unicode_keys=False)
    broker, options, client = built[-1]
    assert broker == "tcp://127.0.0.1:9"
    assert custom.default_timeout == 120 and custom.key_prefix == ""
    assert custom.ignore_delete_many_errors is True
    assert client.timeout == 3.0 and client.allow_unicode_keys is False


def test_values_are_pickled_as_flask_cachings_memcached_backends(backend: BrokerCache, built: list[Any], mem: MockClient) -> None:
    # pymemcache's pickle_serde: bytes as is, str as UTF-8 text, int as decimal text, the rest
    # pickled; read raw under the prefix.
    backend.set("b", b"raw")
    backend.set("s", "é")
    backend.set("i", 7)
    backend.set("l", [1, "two"])
    mc = mem
    assert mc.get("t:b") == b"raw" and mc.get("t:s") == "é".encode() and mc.get("t:i") == b"7"
    assert backend.get_many("b", "s", "i", "l") == [b"raw", "é", 7, [1, "two"]]
    assert type(backend.get("i")) is int


def test_cached_view(built: list[Any], mem: MockClient) -> None:
    app, _, calls = make_app()
    web = app.test_client()
    assert web.get("/hello?name=a").data == b"hello a #1"
    assert web.get("/hello?name=a").data == b"hello a #1"
    assert web.get("/hello?name=b").data == b"hello b #2"
    assert calls["view"] == 2


def test_memoize(built: list[Any], mem: MockClient) -> None:
    app, cache, calls = make_app()
    web = app.test_client()
    assert web.get("/square/7").data == b"49"
    assert web.get("/square/7").data == b"49"
    assert web.get("/square/8").data == b"64"
    assert calls["memo"] == 2
    assert web.get("/hits").data == b"1"
    assert web.get("/hits").data == b"2"


# --- Flask-Caching's contract ---------------------------------------------------------------------


def test_set_many_get_many_get_dict(backend: BrokerCache) -> None:
    assert backend.set_many({"a": 1, "b": "two", "c": [3]}) == ["a", "b", "c"]
    assert backend.get_many("a", "zz", "c", "b") == [1, None, [3], "two"]
    assert backend.get_dict("a", "zz", "b") == {"a": 1, "zz": None, "b": "two"}
    assert backend.get_many() == []
    assert backend.get_dict() == {}
    assert backend.set_many({}) == []
    # A refused value is left out of the stored keys; the others are stored.
    backend.set("big", "old")
    assert backend.set_many({"d": 4, "big": BIG, "e": 5}) == ["d", "e"]
    assert backend.get_dict("d", "big", "e") == {"d": 4, "big": None, "e": 5}


def test_set_many_with_a_refused_value_keeps_the_timeout(backend: BrokerCache, clock: FakeClock) -> None:
    # The one-at-a-time fallback stores with the same timeout as the frame would have.
    assert backend.set_many({"d": 4, "big": BIG, "e": 5}, timeout=10) == ["d", "e"]
    clock.advance(9)
    assert backend.get_many("d", "e") == [4, 5]
    clock.advance(2)
    assert backend.get_many("d", "e") == [None, None]


def test_set_many_counts_a_value_not_stored(backend: BrokerCache, built: list[Any], mem: MockClient) -> None:
    # In the fallback, a set answered False (NOT_STORED) is not a stored key either.
    client = backend._client
    stored = client.set

    def refuse(key: Any, value: Any, expire: int = 0, noreply: Any = None, flags: Any = None) -> bool:
        return False if value == "refused" else bool(stored(key, value, expire, noreply, flags))

    client.set = refuse  # type: ignore[method-assign]
    assert backend.set_many({"a": 1, "big": BIG, "r": "refused", "z": 2}) == ["a", "z"]
    assert backend.set("r", "refused") is False
    assert backend.set("r", "ok") is True


def test_timeouts(backend: BrokerCache, clock: FakeClock, built: list[Any], mem: MockClient) -> None:
    backend.set("default", 1)
    backend.set("never", 1, timeout=0)
    backend.set("delta", 1, timeout=dt.timedelta(seconds=59, milliseconds=200))  # rounded up: 60
    year = 365 * 24 * 3600
    backend.set("year", 1, timeout=year)  # past 30 days: sent as a Unix time
    backend.set("month", 1, timeout=MONTH)  # exactly 30 days: still relative
    assert backend.set_many({"m": 1}, timeout=0) == ["m"]
    assert backend.set_many({"m10": 1}, timeout=10) == ["m10"]
    assert backend.add("added", 1, timeout=30) is True
    assert backend.add("added_default", 1) is True
    backend.set("gone", 1, timeout=-1)
    assert backend.get("gone") is None
    assert backend.add("gone2", 1, timeout=-1) is True
    assert backend.get("gone2") is None
    forever = BrokerCache("tcp://127.0.0.1:1", default_timeout=0, key_prefix="t:")
    forever.set("f", 1)
    clock.advance(9)
    assert backend.get("m10") == 1
    clock.advance(2)
    assert backend.get("m10") is None
    clock.advance(18)
    assert backend.get("added") == 1
    clock.advance(2)
    assert backend.get("added") is None
    clock.advance(28.5)  # 59.5 s
    assert backend.get("delta") == 1
    clock.advance(1)
    assert backend.get("delta") is None
    clock.advance(239)  # 299.5 s
    assert backend.get_many("default", "added_default") == [1, 1]
    clock.advance(1)
    assert backend.get_many("default", "added_default") == [None, None]
    clock.advance(MONTH - 302)
    assert backend.get("month") == 1
    clock.advance(3)
    assert backend.get("month") is None
    assert backend.get("year") == 1
    clock.advance(year - MONTH - 10)
    assert backend.get("year") == 1
    clock.advance(20)
    assert backend.get("year") is None
    assert backend.get_many("never", "m", "f") == [1, 1, 1]


def test_has_reads_nothing_and_changes_nothing(backend: BrokerCache) -> None:
    backend.set("obj", {"x": 1})
    backend.set("n", 5)
    backend.set("empty", b"")
    assert backend.has("obj") is True and backend.has("n") is True and backend.has("empty") is True
    assert backend.has("zz") is False
    assert backend.get("obj") == {"x": 1} and backend.get("n") == 5 and backend.get("empty") == b""
    assert backend.inc("n") == 6


def test_inc_dec(backend: BrokerCache) -> None:
    assert backend.inc("c") == 1  # a missing key starts from delta
    assert backend.inc("c", 5) == 6
    assert backend.dec("c", 2) == 4
    assert backend.inc("c", -1) == 3
    assert backend.dec("c", -2) == 5
    assert backend.get("c") == 5
    assert type(backend.inc("c", 0)) is int
    assert backend.dec("fresh") == 0  # memcached's counters stop at 0
    assert backend.get("fresh") == 0
    assert backend.dec("fresh5", 5) == 0
    assert backend.inc("new5", 5) == 5
    assert backend.get("new5") == 5
    assert backend.inc("neg", -3) == 0  # dec of a missing key
    assert backend.dec("negd", -3) == 3  # inc of a missing key
    assert backend.dec("c", 100) == 0
    backend.set("text", "abc")
    assert backend.inc("text") is None  # not a number: a backend error, None
    assert backend.dec("text") is None
    assert backend.get("text") == "abc"


def test_inc_of_a_missing_key_expires_after_the_default_timeout(built: list[Any], mem: MockClient, clock: FakeClock) -> None:
    backend = BrokerCache("tcp://127.0.0.1:1", default_timeout=20)
    assert backend.inc("c") == 1
    assert backend.dec("d") == 0
    clock.advance(19)
    assert backend.get_many("c", "d") == [1, 0]
    clock.advance(2)
    assert backend.get_many("c", "d") == [None, None]


def test_inc_that_loses_the_add_to_another_worker(backend: BrokerCache, built: list[Any], mem: MockClient) -> None:
    # Two rounds: the key is missing at the first incr, another worker adds it before our add,
    # so our add fails and the second incr finds the key.
    client = backend._client
    real_add = client.add

    def add_after_another(key: Any, value: Any, expire: int = 0, noreply: Any = None, flags: Any = None) -> bool:
        real_add(key, 10, expire)  # the other worker's add wins
        return bool(real_add(key, value, expire, noreply, flags))

    client.add = add_after_another  # type: ignore[method-assign]
    assert backend.inc("race", 2) == 12
    assert backend.dec("race2", 3) == 7
    assert backend.get_many("race", "race2") == [12, 7]


def test_inc_gives_up_after_two_rounds(backend: BrokerCache, built: list[Any], mem: MockClient) -> None:
    # A key that keeps vanishing between add and incr (deleted by another worker each time):
    # two rounds, then None, not a loop.
    client = backend._client
    calls = {"incr": 0}

    def missing(key: Any, delta: int, noreply: Any = False) -> None:
        calls["incr"] += 1
        return None

    def add_lost(key: Any, value: Any, expire: int = 0, noreply: Any = None, flags: Any = None) -> bool:
        return False

    client.incr = missing  # type: ignore[method-assign,assignment]
    client.add = add_lost  # type: ignore[method-assign]
    assert backend.inc("ghost") is None
    assert calls["incr"] == 2


def test_add_delete_delete_many_clear(backend: BrokerCache) -> None:
    assert backend.add("a", 1) is True
    assert backend.add("a", 2) is False
    assert backend.get("a") == 1
    assert backend.delete("a") is True
    assert backend.delete("a") is False
    backend.set_many({"x": 1, "y": 2})
    assert backend.delete_many("x", "y", "missing") == ["x", "y", "missing"]
    assert backend.get_many("x", "y") == [None, None]
    assert backend.delete_many() == []
    backend.set("z", 1)
    assert backend.clear() is True
    assert backend.get("z") is None


def test_clear_is_flush_all_whatever_the_prefix(backend: BrokerCache) -> None:
    other = BrokerCache("tcp://127.0.0.1:1", key_prefix="other:")
    other.set("k", 1)
    backend.set("k", 2)
    assert backend.clear() is True
    assert other.get("k") is None and backend.get("k") is None


def test_key_prefix_keeps_caches_apart(backend: BrokerCache, built: list[Any], mem: MockClient) -> None:
    other = BrokerCache("tcp://127.0.0.1:1", key_prefix="other:")
    backend.set("k", "mine")
    other.set("k", "theirs")
    assert backend.get("k") == "mine" and other.get("k") == "theirs"
    assert mem.get_many(["t:k", "other:k"]) == {"t:k": b"mine", "other:k": b"theirs"}
    assert backend.delete("k") is True
    assert other.get("k") == "theirs"


def test_keys_memcached_cannot_take_are_never_sent(backend: BrokerCache) -> None:
    for bad in ("with space", "ctrl\x01", "k" * 300, "é" * 200, 1):
        assert backend.get(bad) is None  # type: ignore[arg-type]
        assert backend.set(bad, 1) is False  # type: ignore[arg-type]
        assert backend.add(bad, 1) is False  # type: ignore[arg-type]
        assert backend.has(bad) is False  # type: ignore[arg-type]
        assert backend.delete(bad) is False  # type: ignore[arg-type]
        assert backend.inc(bad) is None  # type: ignore[arg-type]
        assert backend.dec(bad) is None  # type: ignore[arg-type]
        assert backend.get_or_set(bad, lambda: "computed") == "computed"  # type: ignore[arg-type]
    backend.set("ok", 1)
    assert backend.get_dict("ok", "with space") == {"ok": 1, "with space": None}
    assert backend.get_dict("with space") == {"with space": None}
    assert backend.set_many({"ok2": 2, "with space": 3}) == ["ok2"]
    assert backend.set_many({"with space": 3}) == []
    assert backend.delete_many("ok", "with space") == ["ok"]
    assert backend.delete_many("with space") == []
    assert backend.get("ok") is None
    # Without a prefix, an empty key is not a key either; the longest one is.
    plain = BrokerCache("tcp://127.0.0.1:1")
    assert plain.set("", 1) is False
    assert plain.set("k" * 250, 1) is True and plain.get("k" * 250) == 1
    assert backend.set("k" * 248, 1) is True and backend.get("k" * 248) == 1
    assert backend.set("k" * 249, 1) is False


def test_too_large_set_returns_false_and_drops_the_old_value(backend: BrokerCache) -> None:
    backend.set("v", "small")
    assert backend.set("v", BIG) is False
    assert backend.get("v") is None
    backend.set("w", "small")
    assert backend.add("w", BIG) is False
    assert backend.add("w2", BIG) is False
    assert backend.get_many("w", "w2") == ["small", None]


def test_get_or_set(backend: BrokerCache, clock: FakeClock) -> None:
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return "computed"

    assert backend.get_or_set("g", compute) == "computed"
    assert backend.get_or_set("g", compute) == "computed"
    assert calls == [1]
    assert backend.get("g") == "computed"
    assert backend.get_or_set("g10", compute, timeout=10) == "computed"
    clock.advance(9)
    assert backend.get("g10") == "computed"
    clock.advance(2)
    assert backend.get("g10") is None
    clock.advance(288)
    assert backend.get("g") == "computed"  # the default timeout, 300 s
    clock.advance(2)
    assert backend.get("g") is None


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


def test_broker_failures_are_raised(backend: BrokerCache, built: list[Any], mem: MockClient) -> None:
    # Only a key memcached cannot take is swallowed; a failure of the broker is raised.
    from clientlib.errors import BrokerUnavailable

    def down(*args: Any, **kwargs: Any) -> Any:
        raise BrokerUnavailable("broker down")

    client = backend._client
    for name in ("get", "set", "add", "get_many", "delete", "append", "incr"):
        setattr(client, name, down)
    calls: list[Callable[[], Any]] = [
        lambda: backend.get("k"), lambda: backend.set("k", 1), lambda: backend.add("k", 1),
        lambda: backend.get_many("k"), lambda: backend.delete("k"), lambda: backend.has("k"),
        lambda: backend.inc("k"),
    ]
    for call in calls:
        with pytest.raises(BrokerUnavailable):
            call()


# --- survivors of the first mutation run (docs/mutation.md) -------------------------------------


def test_negative_deltas_and_the_default_delta_on_an_existing_counter(backend: BrokerCache) -> None:
    # cachelib's contract: inc(key, delta) adds delta, dec(key, delta) subtracts it, delta 1 by
    # default; a negative delta goes the other way.
    backend.set("n", 10)
    assert backend.inc("n", -3) == 7
    assert backend.dec("n") == 6
    assert backend.inc("n") == 7
    assert backend.dec("n", -4) == 11
    assert backend.get("n") == 11


def test_cache_args_are_not_silently_dropped(built: list[Any], mem: MockClient) -> None:
    # Flask-Caching passes CACHE_ARGS positionally to the factory; this backend's first argument
    # is the broker, which the factory already sets from CACHE_MCBROKER_URL: a CACHE_ARGS is
    # refused, not ignored, with a message naming the keys to use instead.
    app = Flask(__name__)
    app.config.update(CACHE_TYPE="clientlib.flask.BrokerCache", CACHE_MCBROKER_URL="tcp://127.0.0.1:1",
                      CACHE_ARGS=["tcp://127.0.0.1:2"])
    with pytest.raises(TypeError, match=r"takes no CACHE_ARGS \(got 1\): .*CACHE_MCBROKER_URL.*CACHE_OPTIONS"):
        Cache(app)
    assert built == []
