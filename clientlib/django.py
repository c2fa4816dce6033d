"""Django cache backend: Django's cache API over the local mcbroker.

Settings::

    CACHES = {
        "default": {
            "BACKEND": "clientlib.django.BrokerCache",
            "LOCATION": "ipc:///run/mcbroker/mcbroker.sock",   # or tcp://127.0.0.1:PORT; "" = the default
            "OPTIONS": {"timeout": 1.0},                        # clientlib.Client keyword arguments
        }
    }

`LOCATION` is the broker's address, not memcached's: the memcached servers are in the broker's
config. An empty LOCATION (or none) means clientlib's default ($MCBROKER_URL, else the broker's
default ipc socket). `OPTIONS` are `clientlib.Client` keyword arguments; as Django's
PyMemcacheCache does, the backend defaults to ``allow_unicode_keys=True``,
``default_noreply=False`` and pickling serde (`clientlib.serde.pickle_serde`: bytes, str and int
as themselves, anything else pickled), so values written by PyMemcacheCache read back and the
reverse. TIMEOUT, KEY_PREFIX, VERSION and KEY_FUNCTION mean what they mean for every Django cache.
The options of pymemcache's HashClient that PyMemcacheCache settings may carry (use_pooling,
max_pool_size, pool_idle_timeout, lock_generator, retry_attempts, retry_timeout, dead_timeout,
hasher) are accepted and have no effect, so a switch from PyMemcacheCache is two lines: the broker
owns the memcached connections, their failover and placement. Any other unknown option is an
InvalidCacheBackendError naming the accepted ones.

Semantics are those of Django's memcached backends (django/core/cache/backends/memcached.py):

- timeouts: DEFAULT_TIMEOUT uses the cache's TIMEOUT; None never expires; 0 or a negative
  number expires at once; more than 30 days (2,592,000 s) becomes an absolute Unix time, as
  memcached reads such a number.
- keys: Django's key warnings (longer than 250 characters, control characters or spaces) are
  raised as `InvalidCacheKey`, as Django's memcached backends do; so is a key whose UTF-8 form is
  longer than memcached's 250 bytes.
- set: a store that fails removes the key's old value (memcached's rule for a too-large set).
  set_many returns the keys that were not stored. incr/decr raise ValueError for a missing key
  and are atomic (memcached's incr/decr).
- get_or_set is herd-safe: `Client.get_or_set` (memcached's leases, clientlib/lease.py), so a
  missing value is computed by one caller among all workers; the others wait for it (at most
  3 s, then compute it themselves without storing). Django's rules hold: `default` is called
  only if callable and only on a miss, `version` and `timeout` as for set (timeout 0: the value
  is returned and not kept). While the value is being computed, the key holds memcached's empty
  lease placeholder; this backend reads it as a miss (get, get_many, has_key), and never writes
  an empty item itself (b"" is stored pickled), so the two cannot be confused. add() of the key
  during that computation returns False, as for a key being written.
- close() does nothing and costs nothing: the broker channel is shared and reconnects by itself
  (Django calls close() after every request; PyMemcacheCache then reconnects to every server).
- the a* methods (aget, aset, ...) are native coroutines on `clientlib.AsyncClient`, not
  Django's sync_to_async fallbacks.

Backend instances with the same LOCATION and OPTIONS share one Client (thread-safe, one socket
per thread), so Django's per-thread and per-async-context cache instances open no socket each.
Errors are clientlib's (`clientlib.errors`); nothing is swallowed, as in Django's backends.
"""

from __future__ import annotations

import inspect
import pickle
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from django.core.cache.backends.base import (  # type: ignore[import-untyped]
    DEFAULT_TIMEOUT,
    BaseCache,
    InvalidCacheBackendError,
    InvalidCacheKey,
    memcache_key_warnings,
)

from . import address
from .client import AsyncClient, Client
from .errors import MemcacheIllegalInputError
from .keys import MAX_KEY_LENGTH
from .serde import FLAG_PICKLE, Serde, pickle_serde

__all__ = ["BrokerCache"]

# memcached reads an expiry above 30 days as a Unix time (protocol.txt, "Expiration times").
_RELATIVE_LIMIT = 60 * 60 * 24 * 30

_CLIENT_OPTIONS = frozenset(
    name for name, p in inspect.signature(Client.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)

# pymemcache HashClient options that PyMemcacheCache passes on; the broker does their job.
_HASHCLIENT_OPTIONS = frozenset({
    "use_pooling", "max_pool_size", "pool_idle_timeout", "lock_generator", "retry_attempts",
    "retry_timeout", "dead_timeout", "hasher",
})

_shared: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}
_shared_lock = threading.Lock()


def _identity(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


class _Placeholder:
    """What an empty item with client flags 0 decodes to: get_or_set's lease placeholder."""

    __slots__ = ()


_PLACEHOLDER = _Placeholder()


class LeaseAwareSerde:
    """The backend's serde around the configured one (default: pickle_serde): an empty item with
    flags 0 is memcached's lease placeholder for a value get_or_set is computing (meta `mg N`),
    so it decodes to a marker the backend reads as a miss; and b"" itself is stored pickled, so
    no value of ours ever looks like a placeholder."""

    __slots__ = ("inner",)

    def __init__(self, inner: Serde) -> None:
        self.inner = inner

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        if type(value) is bytes and not value:
            return pickle.dumps(value, pickle.HIGHEST_PROTOCOL), FLAG_PICKLE
        return self.inner.serialize(key, value)

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        if flags == 0 and not value:
            return _PLACEHOLDER
        return self.inner.deserialize(key, value, flags)


def _shared_client(cls: type[Any], url: str | None, options: Mapping[str, Any]) -> Any:
    """One client per (class, address, options) in this process. An empty address is resolved
    first ($MCBROKER_URL or the default socket), so a changed environment gets its own client."""
    url = url or address.default_connect_url()
    key = (cls, url, tuple(sorted((name, _identity(v)) for name, v in options.items())))
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            made = {**options, "serde": LeaseAwareSerde(options["serde"])}
            # The options are kept with the client: unhashable values are keyed by id above,
            # and must stay alive as long as the entry.
            entry = _shared[key] = (cls(url, **made), dict(options))
        return entry[0]


def _location(server: Any) -> str | None:
    if isinstance(server, (list, tuple)):
        if len(server) > 1:
            raise InvalidCacheBackendError(_ONE_ADDRESS % (server,))
        server = server[0] if server else ""
    if not isinstance(server, str):
        raise InvalidCacheBackendError(
            f"clientlib.django.BrokerCache: LOCATION must be the broker's address as a string, got {server!r}"
        )
    if ";" in server or "," in server:
        raise InvalidCacheBackendError(_ONE_ADDRESS % (server,))
    return server.strip() or None


def _as_callable(default: Any) -> Any:
    # Django calls `default` only if it is callable; anything else is the value itself.
    return default if callable(default) else (lambda: default)


_ONE_ADDRESS = (
    "clientlib.django.BrokerCache: LOCATION is the address of the local mcbroker "
    "(ipc:///path or tcp://127.0.0.1:PORT), one address; the memcached servers are listed in the "
    "broker's config. Got %r"
)


class BrokerCache(BaseCache):  # type: ignore[misc]
    """Django's cache API (django.core.cache.backends.base.BaseCache) through mcbroker, with the
    semantics of Django's memcached backends. See the module docstring for the settings."""

    # Names as in Django's BaseMemcachedCache, so tests and tools written for it find them.
    _class = Client
    _async_class = AsyncClient

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._url = _location(server)
        options = {k: v for k, v in (params.get("OPTIONS") or {}).items() if k not in _HASHCLIENT_OPTIONS}
        unknown = sorted(set(options) - _CLIENT_OPTIONS)
        if unknown:
            raise InvalidCacheBackendError(
                f"clientlib.django.BrokerCache: unknown OPTIONS {unknown}; OPTIONS are clientlib.Client "
                f"keyword arguments: {sorted(_CLIENT_OPTIONS)}"
            )
        self._options = {"allow_unicode_keys": True, "default_noreply": False, "serde": pickle_serde, **options}
        try:
            self._cache = _shared_client(self._class, self._url, self._options)
        except (TypeError, ValueError, MemcacheIllegalInputError) as exc:
            raise InvalidCacheBackendError(f"clientlib.django.BrokerCache: {exc}") from exc
        self._acache_client: AsyncClient | None = None

    @property
    def _acache(self) -> AsyncClient:
        client = self._acache_client
        if client is None:
            client = self._acache_client = _shared_client(self._async_class, self._url, self._options)
        return client

    # --- Django's rules -------------------------------------------------------------------------

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> int:
        """Django's timeout as memcached's expiry: 0 = never (Django's None), -1 = already
        expired (Django's 0 or less), past 30 days an absolute Unix time."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return 0
        if int(timeout) == 0:
            # memcached's 0 means "never"; Django's 0 means "expire now".
            timeout = -1
        if timeout > _RELATIVE_LIMIT:
            timeout += int(time.time())
        return int(timeout)

    def validate_key(self, key: Any) -> None:
        """Raise InvalidCacheKey for what Django warns about (length, control characters) and for
        a key longer than memcached's 250 bytes once encoded as UTF-8."""
        for warning in memcache_key_warnings(key):
            raise InvalidCacheKey(warning)
        if isinstance(key, str) and len(key.encode("utf-8")) > MAX_KEY_LENGTH:
            raise InvalidCacheKey(
                f"Cache key will cause errors if used with memcached: {key!r} "
                f"(longer than {MAX_KEY_LENGTH} bytes in UTF-8)"
            )

    def _key(self, key: Any, version: Any) -> Any:
        return self.make_and_validate_key(key, version=version)

    # --- blocking -------------------------------------------------------------------------------

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        """Store only if absent (memcached's add: atomic). True if stored."""
        return bool(self._cache.add(self._key(key, version), value, self.get_backend_timeout(timeout)))

    def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
        value = self._cache.get(self._key(key, version), default)
        return default if value is _PLACEHOLDER else value

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> None:
        k = self._key(key, version)
        if not self._cache.set(k, value, self.get_backend_timeout(timeout)):
            # A failed store must not leave the old value readable (Django's rule; its
            # cache_db sessions depend on it).
            self._cache.delete(k)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return bool(self._cache.touch(self._key(key, version), self.get_backend_timeout(timeout)))

    def delete(self, key: Any, version: Any = None) -> bool:
        return bool(self._cache.delete(self._key(key, version)))

    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        made = {self._key(k, version): k for k in keys}
        found = self._cache.get_multi(made.keys())
        return {made[k]: v for k, v in found.items() if v is not _PLACEHOLDER}

    def set_many(self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> list[Any]:
        """Store every item; the caller's keys that were not stored."""
        made: dict[Any, Any] = {}
        values: dict[Any, Any] = {}
        for key, value in data.items():
            k = self._key(key, version)
            made[k] = key
            values[k] = value
        failed = self._cache.set_multi(values, self.get_backend_timeout(timeout))
        return [made[k] for k in failed]

    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        self._cache.delete_multi([self._key(k, version) for k in keys])

    def incr(self, key: Any, delta: int = 1, version: Any = None) -> int:
        """Atomic. ValueError if the key is missing; memcached's rules otherwise (the stored value
        must be a decimal number, MemcacheClientError if not; decr stops at 0)."""
        k = self._key(key, version)
        value = self._cache.decr(k, -delta) if delta < 0 else self._cache.incr(k, delta)
        if value is None:
            raise ValueError(f"Key '{k}' not found")
        return int(value)

    def get_or_set(self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> Any:
        """Django's get_or_set, herd-safe: the cached value; on a miss `default` (called if
        callable) is stored for `timeout` and returned, computed by one caller among all workers
        while the others wait for it (`Client.get_or_set`)."""
        return self._cache.get_or_set(self._key(key, version), _as_callable(default),
                                      self.get_backend_timeout(timeout))

    def clear(self) -> None:
        """flush_all on every memcached server behind the broker (as Django's memcached backends:
        the whole server, not only this cache's KEY_PREFIX)."""
        self._cache.flush_all()

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: the broker channel is shared and stays open (Django calls this after
        every request)."""

    # --- asyncio (native, on AsyncClient) -------------------------------------------------------

    async def aadd(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return bool(await self._acache.add(self._key(key, version), value, self.get_backend_timeout(timeout)))

    async def aget(self, key: Any, default: Any = None, version: Any = None) -> Any:
        value = await self._acache.get(self._key(key, version), default)
        return default if value is _PLACEHOLDER else value

    async def aset(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> None:
        k = self._key(key, version)
        if not await self._acache.set(k, value, self.get_backend_timeout(timeout)):
            await self._acache.delete(k)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return bool(await self._acache.touch(self._key(key, version), self.get_backend_timeout(timeout)))

    async def adelete(self, key: Any, version: Any = None) -> bool:
        return bool(await self._acache.delete(self._key(key, version)))

    async def aget_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        made = {self._key(k, version): k for k in keys}
        found = await self._acache.get_multi(made.keys())
        return {made[k]: v for k, v in found.items() if v is not _PLACEHOLDER}

    async def aset_many(self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                        version: Any = None) -> list[Any]:
        made: dict[Any, Any] = {}
        values: dict[Any, Any] = {}
        for key, value in data.items():
            k = self._key(key, version)
            made[k] = key
            values[k] = value
        failed = await self._acache.set_multi(values, self.get_backend_timeout(timeout))
        return [made[k] for k in failed]

    async def adelete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        await self._acache.delete_multi([self._key(k, version) for k in keys])

    async def aincr(self, key: Any, delta: int = 1, version: Any = None) -> int:
        k = self._key(key, version)
        if delta < 0:
            value = await self._acache.decr(k, -delta)
        else:
            value = await self._acache.incr(k, delta)
        if value is None:
            raise ValueError(f"Key '{k}' not found")
        return int(value)

    async def adecr(self, key: Any, delta: int = 1, version: Any = None) -> int:
        return await self.aincr(key, -delta, version=version)

    async def aget_or_set(self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> Any:
        return await self._acache.get_or_set(self._key(key, version), _as_callable(default),
                                             self.get_backend_timeout(timeout))

    async def aclear(self) -> None:
        await self._acache.flush_all()

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing to do, as close()."""
