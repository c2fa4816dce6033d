"""Django cache API cases that hold the same through a real broker (tests/integration/
test_django_backend.py) and on clientlib's in-memory MockClient (tests/unit/test_django_unit.py):
each module imports them, and pytest runs them there with that module's `cache` fixture. The
expected values are Django's (its tests/cache/tests.py and memcached backends)."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import pytest

from clientlib.django import BrokerCache
from clientlib.errors import MemcacheClientError

def test_set_none_is_a_value(cache: BrokerCache) -> None:
    cache.set("k", None)
    assert cache.get("k", "dflt") is None
    assert cache.has_key("k") is True


def test_add_is_atomic_and_never_overwrites(cache: BrokerCache) -> None:
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_has_key_and_contains(cache: BrokerCache) -> None:
    cache.set("hello1", "goodbye1")
    assert cache.has_key("hello1") is True
    assert "hello1" in cache
    assert cache.has_key("goodbye1") is False
    assert "goodbye1" not in cache


def test_pickle_error_on_set_propagates(cache: BrokerCache) -> None:
    class Unpicklable:
        def __getstate__(self) -> Any:
            raise pickle.PickleError()

    with pytest.raises(pickle.PickleError):
        cache.set("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())


def test_incr_decr_of_non_number(cache: BrokerCache) -> None:
    # Django's incr_decr_type_error for pymemcache is MemcacheClientError, as here.
    cache.set("abc", "abc")
    with pytest.raises(MemcacheClientError):
        cache.incr("abc")
    with pytest.raises(MemcacheClientError):
        cache.decr("abc")
    assert cache.get("abc") == "abc"


def test_longest_valid_keys_work(cache: BrokerCache) -> None:
    key = "k" * (250 - len(":1:"))
    cache.set(key, "v")
    assert cache.get(key) == "v"
    wide = "é" * ((250 - 3) // 2)  # 246 bytes + ":1:" = 249
    cache.set(wide, "w")
    assert cache.get(wide) == "w"


def test_no_warnings_for_valid_keys(cache: BrokerCache) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.set("fine-key_1.2", 1)
        assert cache.get("fine-key_1.2") == 1
