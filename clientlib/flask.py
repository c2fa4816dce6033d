"""Flask-Caching backend: Flask-Caching's cache API over the local mcbroker.

Config::

    CACHE_TYPE = "clientlib.flask.BrokerCache"
    CACHE_MCBROKER_URL = "ipc:///run/mcbroker/mcbroker.sock"  # or tcp://127.0.0.1:PORT; unset = the default
    CACHE_KEY_PREFIX = "myapp:"                               # optional
    CACHE_DEFAULT_TIMEOUT = 300                               # seconds; 0 = never expire
    CACHE_OPTIONS = {"timeout": 1.0}                          # optional clientlib.Client keyword arguments

`CACHE_MCBROKER_URL` is the broker's address, not memcached's (the memcached servers are in the
broker's config); unset or empty means clientlib's default ($MCBROKER_URL, else the broker's
default ipc socket). `CACHE_ARGS` is refused with a TypeError that names CACHE_MCBROKER_URL and
CACHE_OPTIONS: the backend's only positional argument, the address, comes from the first. Values
are pickled as Flask-Caching's memcached backends store them (`clientlib.serde.pickle_serde`:
bytes, str and int as themselves, anything else pickled).

Semantics are Flask-Caching's (cachelib's BaseCache contract):

- timeouts: None = CACHE_DEFAULT_TIMEOUT, 0 = never expire, a `datetime.timedelta` is rounded
  up to whole seconds; more than 30 days is sent as a Unix time (memcached's rule).
- get returns None for a miss; get_many returns a list in the order of the keys; get_dict a
  dict with None for the misses; has(key) is cheap (an empty append, no value fetched).
- set/add return True when stored, False when memcached refused (a value too large: the old
  value is gone, as memcached does). set_many returns the keys that were stored, delete_many
  the keys that are gone.
- inc/dec are atomic (memcached's incr/decr); a missing key starts from `delta` (inc) or 0
  (dec). Unlike Flask-Caching's generic fallback, a counter never goes below 0: memcached's
  counters are unsigned 64-bit numbers and decr stops at 0. A value that is not a number gives
  None ("a backend error").
- keys that memcached cannot take (after the prefix: empty, longer than 250 bytes in UTF-8,
  whitespace or control characters) are never sent: reads miss, writes return False, as
  Flask-Caching's memcached backend treats such keys ("all get methods silently ignore key
  errors"). Failures of the broker itself (BrokerUnavailable, BrokerTimeout, ...) are raised.
- clear() is flush_all on every memcached server behind the broker, whatever the prefix.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

from flask import Flask
from flask_caching.backends.base import BaseCache

from .client import Client
from .errors import MemcacheClientError, MemcacheIllegalInputError, MemcacheServerError
from .serde import pickle_serde

__all__ = ["BrokerCache"]

# memcached reads an expiry above 30 days as a Unix time (protocol.txt, "Expiration times").
_RELATIVE_LIMIT = 60 * 60 * 24 * 30


class BrokerCache(BaseCache):
    """Flask-Caching's BaseCache through mcbroker. `broker`: the broker's address (None: the
    default); `key_prefix`: put before every key; `client_options`: clientlib.Client keyword
    arguments (timeout, ...). See the module docstring for the config keys and the semantics."""

    def __init__(
        self,
        broker: str | None = None,
        default_timeout: int | dt.timedelta = 300,
        key_prefix: str | None = None,
        ignore_delete_many_errors: bool = False,
        **client_options: Any,
    ) -> None:
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)  # type: ignore[arg-type]
        self.key_prefix = key_prefix or ""
        options: dict[str, Any] = {"serde": pickle_serde, "allow_unicode_keys": True, **client_options}
        self._client = Client(broker or None, **options)

    @classmethod
    def factory(cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]) -> BrokerCache:
        """What Flask-Caching calls for CACHE_TYPE = "clientlib.flask.BrokerCache": `kwargs` holds
        default_timeout, ignore_delete_many_errors and CACHE_OPTIONS; `args`, CACHE_ARGS, must be
        empty (TypeError otherwise)."""
        if args:
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__} takes no CACHE_ARGS (got {len(args)}): set the broker's "
                "address with CACHE_MCBROKER_URL and clientlib.Client options with CACHE_OPTIONS"
            )
        kwargs.update(broker=config.get("CACHE_MCBROKER_URL"), key_prefix=config.get("CACHE_KEY_PREFIX"))
        return cls(**kwargs)

    # --- keys and timeouts ------------------------------------------------------------------------

    def _key(self, key: str) -> bytes | None:
        """The key as sent, or None if memcached could not take it."""
        try:
            return self._client.check_key(self.key_prefix + key)
        except (MemcacheIllegalInputError, TypeError):
            return None

    def _expire(self, timeout: int | dt.timedelta | None) -> int:
        seconds = self._normalize_timeout(timeout)
        if seconds > _RELATIVE_LIMIT:
            seconds += int(time.time())
        return seconds

    # --- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        k = self._key(key)
        return None if k is None else self._client.get(k)

    def get_dict(self, *keys: str) -> dict[str, Any]:
        sent: dict[bytes, str] = {}
        for key in keys:
            k = self._key(key)
            if k is not None:
                sent[k] = key
        found = self._client.get_many(list(sent)) if sent else {}
        out = {key: None for key in keys}
        for k, value in found.items():
            out[sent[k]] = value
        return out

    def get_many(self, *keys: str) -> list[Any]:
        found = self.get_dict(*keys)
        return [found[key] for key in keys]

    def has(self, key: str) -> bool:
        k = self._key(key)
        # An empty append succeeds only on a present key and fetches nothing (cachelib's trick).
        return k is not None and bool(self._client.append(k, b""))

    def get_or_set(self, key: str, fn: Callable[[], Any], timeout: int | dt.timedelta | None = None) -> Any:
        """Not in Flask-Caching's API (its `cached`/`memoize` read then set): the value of `key`,
        computed by `fn()` and stored for `timeout` when missing, by exactly one caller among all
        workers of all hosts while the others wait for it (`Client.get_or_set`, memcached's
        leases; bounds in clientlib/lease.py). A key memcached cannot take: `fn()`, nothing stored."""
        k = self._key(key)
        if k is None:
            return fn()
        return self._client.get_or_set(k, fn, self._expire(timeout))

    # --- writes -------------------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        k = self._key(key)
        if k is None:
            return False
        try:
            return bool(self._client.set(k, value, self._expire(timeout)))
        except MemcacheServerError:
            return False  # memcached refused the value (too large); its old value is gone

    def add(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        k = self._key(key)
        if k is None:
            return False
        try:
            return bool(self._client.add(k, value, self._expire(timeout)))
        except MemcacheServerError:
            return False

    def set_many(self, mapping: dict[str, Any], timeout: int | dt.timedelta | None = None) -> list[Any]:
        """Store every item in one frame; the keys that were stored."""
        sent: dict[bytes, str] = {}
        values: dict[str | bytes, Any] = {}
        for key, value in mapping.items():
            k = self._key(key)
            if k is not None:
                sent[k] = key
                values[k] = value
        if not values:
            return []
        expire = self._expire(timeout)
        try:
            failed = set(self._client.set_many(values, expire))
        except MemcacheServerError:
            # One value was refused; the others are stored. Find which, one key at a time.
            failed = set()
            for sent_key, value in values.items():
                try:
                    if not self._client.set(sent_key, value, expire):
                        failed.add(sent_key)
                except MemcacheServerError:
                    failed.add(sent_key)
        return [sent[k] for k in sent if k not in failed]

    def delete(self, key: str) -> bool:
        k = self._key(key)
        return k is not None and bool(self._client.delete(k))

    def delete_many(self, *keys: str) -> list[Any]:
        """Delete in one frame; the keys that are now absent (missing keys count as deleted)."""
        sent = {k: key for key in keys if (k := self._key(key)) is not None}
        if sent:
            self._client.delete_many(list(sent))
        return list(sent.values())

    def clear(self) -> bool:
        return bool(self._client.flush_all())

    def inc(self, key: str, delta: int = 1) -> int | None:
        if delta < 0:
            return self.dec(key, -delta)
        return self._count(key, delta, up=True)

    def dec(self, key: str, delta: int = 1) -> int | None:
        if delta < 0:
            return self.inc(key, -delta)
        return self._count(key, delta, up=False)

    def _count(self, key: str, delta: int, up: bool) -> int | None:
        k = self._key(key)
        if k is None:
            return None
        arith = self._client.incr if up else self._client.decr
        start = delta if up else 0
        try:
            # Two rounds at most: a miss adds the start value; losing that add to another
            # worker means the key now exists, so the second incr/decr finds it.
            for _ in range(2):
                value = arith(k, delta)
                if value is not None:
                    return int(value)
                if self._client.add(k, start, self._expire(None)):
                    return start
        except MemcacheClientError:
            return None  # the stored value is not a number
        return None
