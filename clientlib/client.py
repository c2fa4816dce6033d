"""`Client` and `AsyncClient`: pymemcache's Client API, served by the local mcbroker.

Every public method is written out here with its real signature and a docstring; each builds its
call with `Commands` (checks, ops, result translation, shared with MockClient) and runs it over
the transport, the one module that talks to the broker.

Errors, for every method: MemcacheIllegalInputError (a bad key, value or number; raised in the
worker before anything is sent, whatever ignore_exc says); BrokerUnavailable (nothing listens at
the broker's address, or the broker went away: raised at once, not after the timeout),
BrokerTimeout (no answer within `timeout` seconds; for a write the outcome is unknown),
BrokerOverloaded (refused by a broker bound, nothing was sent), ServerUnavailable (the key's
memcached server is marked down), MemcacheServerError / MemcacheClientError /
MemcacheUnknownCommandError (memcached's SERVER_ERROR / CLIENT_ERROR / ERROR for that request),
MemcacheUnexpectedCloseError (the memcached connection failed with the request in flight),
ProtocolMismatch (a malformed or other-version reply). All are MemcacheError subclasses; nothing
from ZeroMQ or msgpack escapes. With ignore_exc=True a failed *read* returns its miss value
instead of raising, as in pymemcache.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable, Iterable, Protocol

from . import address, lease
from . import commands as commands_module
from .curve import CurveKeys, curve_keys
from .commands import DEFAULT_MAX_FRAME, DEFAULT_TIMEOUT, Command, Commands, Key, _finish_many, raise_failure
from .commands import _OK
from .commands import _ADD, _APPEND, _CAS, _DECR, _GET, _GET_MANY, _GETS, _INCR, _PREPEND, _REPLACE, _SET
from .errors import MemcacheClientError, MemcacheIllegalInputError, ProtocolMismatch, error_for
from .lease import DEFAULT_LEASE_TTL, DEFAULT_WAIT
from .transport import AsyncTransport, Transport

# Where results are read: an IndexError raised there means a result too short for its op.
_RESULT_READERS = frozenset({commands_module.__file__, __file__})

__all__ = ["Client", "AsyncClient", "DEFAULT_TIMEOUT", "DEFAULT_MAX_FRAME", "error_for"]


class BlockingTransport(Protocol):
    """What Client needs from its transport (transport.Transport; MockClient's memory store)."""

    def request1(self, op: list[Any], timeout_ms: int, timeout: float) -> list[Any]: ...

    def request(
        self, ops: list[list[Any]], timeout_ms: int, timeout: float, *, noreply: bool = False,
        max_frame_bytes: int = ...,
    ) -> list[list[Any]] | None: ...

    def close(self) -> None: ...


def _check_wait(wait: Any) -> float:
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 3600:
        raise MemcacheIllegalInputError(f"wait must be a number of seconds in 0..3600, got {wait!r}")
    return float(wait)


def _broker_url(broker: str | None, curve: CurveKeys | None = None) -> str:
    if broker is not None and not isinstance(broker, str):
        raise TypeError(
            "clientlib.Client takes the broker's URL (ipc:///path or tcp://127.0.0.1:PORT), "
            f"not a memcached address: got {broker!r}"
        )
    # Checked here, once: a bad address must not surface later as a raw ZeroMQ error.
    remote = curve is not None
    return address.check_connect_url(broker, remote=remote) if broker else address.default_connect_url(remote)


def _finished(client: Any, cmd: Command, results: list[Any]) -> Any:
    """cmd.finish, with a result too short for its op (an OK get without its value, say) raised as
    ProtocolMismatch: the wire schema's shapes are checked per frame, not per op, so the finisher
    finds it. An IndexError from the caller's own serde, deeper down, stays what it is."""
    # A bare value answers only a GET_MANY's key (_finish_many reads it): anywhere else its first
    # byte would be read as a code. One C-level pass, not a Python step per result.
    if cmd.finish is not _finish_many and bytes in map(type, results):
        raise ProtocolMismatch(f"malformed result from the broker: {results!r:.200}")
    try:
        return cmd.finish(client, cmd, results)
    except IndexError as exc:
        if _short_result(exc):
            raise ProtocolMismatch(f"malformed result from the broker: {results!r:.200}") from None
        raise


def _short_result(exc: IndexError) -> bool:
    """The IndexError was raised reading a result in clientlib itself (not in a caller's serde)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename in _RESULT_READERS



class Client(Commands):
    """A drop-in for pymemcache's Client that sends every call through the local mcbroker.

    `broker`: the broker's address, ``ipc:///path/to/mcbroker.sock`` or ``tcp://127.0.0.1:PORT``
    (default: $MCBROKER_URL, else the broker's default socket); anything else raises ValueError
    here. Keyword options as pymemcache's: `timeout` (seconds per call, default 1), `serde` or
    `serializer`/`deserializer`, `key_prefix`, `allow_unicode_keys`, `default_noreply` (False),
    `ignore_exc`, `encoding`; `max_frame_bytes` (bytes, default 4 MiB: larger requests are split,
    larger values are refused the way memcached refuses them). pymemcache's socket options
    (connect_timeout, no_delay, socket_module, socket_keepalive, tls_context) are accepted and
    have no effect: the broker owns the memcached connections.

    For a broker on TCP with CURVE: `curve_secretkey`, `curve_publickey` (this client's key pair)
    and `curve_serverkey` (the broker's public key), Z85 text of 40 characters each, all three or
    none; default $MCBROKER_CURVE_SECRETKEY, $MCBROKER_CURVE_PUBLICKEY, $MCBROKER_CURVE_SERVERKEY
    (clientlib/curve.py). With them the broker's host may be any host. A key the broker does not
    list is refused by it: calls then raise BrokerTimeout at their deadline.

    Thread-safe (one ZeroMQ socket per thread) and fork-safe (a child process opens its own).
    See the module docstring for the errors every method may raise.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        serde: Any = None,
        serializer: Any = None,
        deserializer: Any = None,
        key_prefix: bytes | str = b"",
        allow_unicode_keys: bool = False,
        default_noreply: bool = False,
        ignore_exc: bool = False,
        encoding: str = "ascii",
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        connect_timeout: float | None = None,
        no_delay: bool = False,
        socket_module: Any = None,
        socket_keepalive: Any = None,
        tls_context: Any = None,
        curve_secretkey: str | bytes | None = None,
        curve_publickey: str | bytes | None = None,
        curve_serverkey: str | bytes | None = None,
    ) -> None:
        super().__init__(
            timeout=timeout, serde=serde, serializer=serializer, deserializer=deserializer,
            key_prefix=key_prefix, allow_unicode_keys=allow_unicode_keys, default_noreply=default_noreply,
            ignore_exc=ignore_exc, encoding=encoding, max_frame_bytes=max_frame_bytes,
            connect_timeout=connect_timeout, no_delay=no_delay, socket_module=socket_module,
            socket_keepalive=socket_keepalive, tls_context=tls_context,
        )
        curve = curve_keys(curve_secretkey, curve_publickey, curve_serverkey)
        self.broker_url = _broker_url(broker, curve)
        self._transport: BlockingTransport = Transport(self.broker_url, curve)

    def _run(self, cmd: Command) -> Any:
        ops = cmd.ops
        try:
            if cmd.noreply:
                if ops:
                    self._transport.request(ops, self._timeout_ms, self._timeout, noreply=True,
                                            max_frame_bytes=self.max_frame_bytes)
                return cmd.noreply_value
            if len(ops) == 1 and ops[0][0] != _GET_MANY:
                results = self._transport.request1(ops[0], self._timeout_ms, self._timeout)
            elif ops:
                try:
                    results = self._transport.request(ops, self._timeout_ms, self._timeout,
                                                      max_frame_bytes=self.max_frame_bytes) or []
                except MemcacheClientError as exc:
                    each = self.one_get_per_key(exc, ops)  # a broker older than GET_MANY
                    if each is None:
                        raise
                    results = self._transport.request(each, self._timeout_ms, self._timeout,
                                                      max_frame_bytes=self.max_frame_bytes) or []
            else:
                results = []
            return _finished(self, cmd, results)
        except MemcacheIllegalInputError:
            raise
        except Exception:
            # pymemcache's ignore_exc: a read that fails for any reason (the broker, memcached,
            # a serde that cannot decode) returns its miss value.
            if cmd.read and self.ignore_exc:
                return cmd.miss
            raise

    # --- reads ---------------------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under `key` (decoded by the serde; bytes by default), or `default` on
        a miss. `key`: str or bytes, 1-250 bytes with key_prefix, no whitespace or control bytes
        (non-ASCII str only with allow_unicode_keys). As pymemcache's Client.get."""
        # The hot path, spelled out: what _run(_get(...)) does, without a Command per call.
        k = self.check_key(key)
        try:
            r = self._transport.request1([_GET, k], self._timeout_ms, self._timeout)[0]
            if type(r) is bytes:
                raise ProtocolMismatch("malformed result from the broker: a get answered by a bare value")
            if r[0] == _OK:
                return self.serde.deserialize(key, r[1], r[2])
            raise_failure(r)
        except Exception as exc:
            if self.ignore_exc:
                return default
            if type(exc) is IndexError and _short_result(exc):
                raise ProtocolMismatch("malformed result from the broker: a get's result without its value") from None
            raise
        return default

    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """(value, cas token as bytes of digits) for `key`, or (default, cas_default) on a miss.
        The token is for `cas`. As pymemcache's Client.gets."""
        return self._run(self._gets(key, default, cas_default))

    def gat(self, key: Key, expire: int = 0, default: Any = None) -> Any:
        """Get and touch: the value under `key` (or `default`), its expiry reset to `expire`
        seconds (0: never; above 30 days: a Unix time). As pymemcache's Client.gat."""
        return self._run(self._gat(key, expire, default))

    def gats(self, key: Key, expire: int = 0, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """`gets` and touch: (value, cas token) or (default, cas_default), expiry reset to
        `expire` seconds. As pymemcache's Client.gats."""
        return self._run(self._gats(key, expire, default, cas_default))

    def get_many(self, keys: Iterable[Key]) -> dict[Any, Any]:
        """{key: value} for the keys found (missing keys are left out), keyed by the caller's
        keys. Sent as one frame (split only past the frame limits). As pymemcache's get_many.
        When some keys fail (say their server is down) the first failure is raised carrying the
        answered keys as `exc.partial` and {key: exception} as `exc.failed`; with ignore_exc the
        answered keys are returned."""
        return self._run(self._many(keys, _GET, False))

    get_multi = get_many

    def gets_many(self, keys: Iterable[Key]) -> dict[Any, tuple[Any, bytes]]:
        """{key: (value, cas token)} for the keys found. As pymemcache's Client.gets_many; a
        partial failure raises with `exc.partial` / `exc.failed`, as get_many."""
        return self._run(self._many(keys, _GETS, True))

    # --- writes --------------------------------------------------------------------------------

    def set(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> bool:
        """Store `value` (encoded by the serde) under `key` for `expire` seconds (0: never);
        True. `noreply` (default: default_noreply) returns True without waiting. A value too
        large for a frame raises MemcacheServerError("object too large for cache") and, as
        memcached does, deletes the key's old value. As pymemcache's Client.set."""
        return self._run(self._store(_SET, key, value, expire, noreply, flags))

    def set_many(self, values: dict[Key, Any], expire: int = 0, noreply: bool | None = None,
                 flags: int | None = None) -> list[Any]:
        """Store every {key: value}; the list of keys that were not stored (empty on success).
        A too-large value raises MemcacheServerError after the others are stored (with
        ignore_exc its key is listed instead). As pymemcache's Client.set_many."""
        return self._run(self._set_many(values, expire, noreply, flags))

    set_multi = set_many

    def add(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> bool:
        """Store only if `key` is absent: True if stored, False if it exists. As pymemcache's."""
        return self._run(self._store(_ADD, key, value, expire, noreply, flags))

    def replace(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> bool:
        """Store only if `key` exists: True if stored, False if absent. As pymemcache's."""
        return self._run(self._store(_REPLACE, key, value, expire, noreply, flags))

    def append(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> bool:
        """Add bytes after the stored value (flags and expiry stay the item's): True, or False
        if `key` is absent or the joined value would not fit. As pymemcache's Client.append."""
        return self._run(self._store(_APPEND, key, value, expire, noreply, flags))

    def prepend(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> bool:
        """Add bytes before the stored value; as `append` otherwise. As pymemcache's."""
        return self._run(self._store(_PREPEND, key, value, expire, noreply, flags))

    def cas(self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool | None = False,
            flags: int | None = None) -> bool | None:
        """Store if the item's cas token is still `cas` (int, or str/bytes of digits, from
        `gets`): True if stored, False if it changed, None if `key` is absent. As pymemcache's."""
        return self._run(self._store(_CAS, key, value, expire, noreply, flags, cas))

    def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Remove `key`: True if it was there, False if not. As pymemcache's Client.delete."""
        return self._run(self._delete(key, noreply))

    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Remove every key; True (missing keys are not an error). As pymemcache's delete_many."""
        return self._run(self._delete_many(keys, noreply))

    delete_multi = delete_many

    def incr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Add `value` (0..2**64-1) to the decimal number stored under `key`, wrapping at 2**64:
        the new value, or None if `key` is absent. A non-numeric value raises
        MemcacheClientError, as memcached answers. As pymemcache's Client.incr."""
        return self._run(self._arith(_INCR, key, value, noreply))

    def decr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Subtract `value`, stopping at 0: the new value, or None if `key` is absent."""
        return self._run(self._arith(_DECR, key, value, noreply))

    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Reset the expiry of `key` to `expire` seconds: True, or False if absent."""
        return self._run(self._touch(key, expire, noreply))

    # --- herd-safe recompute (clientlib/lease.py) ------------------------------------------------

    def get_or_set(self, key: Key, fn: Callable[[], Any], expire: int = 0, *, lease_ttl: int = DEFAULT_LEASE_TTL,
                   recache_ttl: int = 0, wait: float = DEFAULT_WAIT) -> Any:
        """The value of `key`; when it is missing, stale (`invalidate`) or due to expire within
        `recache_ttl` seconds, `fn()` computes it, stored for `expire` seconds, by exactly one
        caller among all workers of all hosts (memcached's lease: `mg` N/R, the W/X/Z flags).
        The others get the stale value, or wait for the fresh one, polling, at most `wait`
        seconds, after which they call `fn()` themselves and store nothing. `lease_ttl` (seconds):
        how long a winner has to fill a missing key before another caller may win. An exception
        from `fn` or the fill propagates (a winner first deletes its empty placeholder, so the
        others need not wait out `lease_ttl`). Errors as for `get` (reads) and `cas` (the fill); with ignore_exc a
        failed read runs `fn()` and stores nothing. An empty value (b"" with flags 0) reads as a
        lease in progress: see clientlib/lease.py for the rules and bounds."""
        read = self._lease_get(key, lease_ttl, recache_ttl, expire)
        run = lease.steps(wait=_check_wait(wait), poll=lease.DEFAULT_POLL, clock=time.monotonic)
        try:
            step = next(run)
            while True:
                try:
                    outcome = None
                    if type(step) is lease.LeaseGet:
                        outcome = self._run(read)
                    elif type(step) is lease.Compute:
                        outcome = fn()
                    elif type(step) is lease.Fill:
                        self._run(self._fill(key, step, expire))
                    elif type(step) is lease.Release:
                        self._run(self._delete(key, False))
                    else:
                        time.sleep(step.seconds)  # type: ignore[union-attr]
                except Exception as exc:
                    step = run.throw(exc)
                    continue
                step = run.send(outcome)
        except StopIteration as stop:
            return stop.value

    def invalidate(self, key: Key, stale_ttl: int = 30, noreply: bool | None = None) -> bool:
        """Mark `key` stale instead of deleting it (meta `md <key> I T<stale_ttl>`): it lives on
        `stale_ttl` more seconds, `get` still reads it, and the next `get_or_set` wins one caller
        the recompute while the rest get the stale value. True, or False if `key` is absent."""
        return self._run(self._invalidate(key, stale_ttl, noreply))

    # --- server-wide ---------------------------------------------------------------------------

    def stats(self, *args: Any) -> dict[bytes, Any]:
        """memcached's stats (``stats`` with `args`, e.g. "settings"), values converted as
        pymemcache converts them; summed over servers when there are several."""
        return self._run(self._stats(args))

    def version(self) -> bytes:
        """memcached's version string (of the first server), as bytes."""
        return self._run(self._version())

    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> bool:
        """Invalidate every item on every server, after `delay` seconds: True."""
        return self._run(self._flush_all(delay, noreply))

    def cache_memlimit(self, memlimit: int) -> bool:
        """Set every server's memory limit to `memlimit` megabytes: True."""
        return self._run(self._cache_memlimit(memlimit))

    def broker_ping(self) -> str:
        """"PONG" from the broker itself (no memcached involved)."""
        return self._run(self._broker_ping())

    def broker_stats(self) -> dict[str, Any]:
        """The broker's own counters and per-server state, as a dict."""
        return self._run(self._broker_stats())

    # --- connection ----------------------------------------------------------------------------

    def close(self) -> None:
        """Cheap and idempotent: the broker connection is shared, stateless and reconnects by
        itself, so there is nothing to tear down per request (Django and Celery call this after
        every request or task). Stale replies can never leak into later calls: ids filter them."""

    def disconnect_all(self) -> None:
        """Close this process's sockets to the broker; the next call opens new ones."""
        self._transport.close()

    def quit(self) -> None:
        """As disconnect_all."""
        self.disconnect_all()

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value, noreply=True)

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __delitem__(self, key: Key) -> None:
        self.delete(key, noreply=True)


class AsyncClient(Commands):
    """Client's calls as coroutines, for asyncio: the same arguments, results and errors.

    Concurrent calls share one socket per event loop and are pipelined to the broker. Takes the
    same constructor arguments as Client (the broker address is checked the same way).
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        serde: Any = None,
        serializer: Any = None,
        deserializer: Any = None,
        key_prefix: bytes | str = b"",
        allow_unicode_keys: bool = False,
        default_noreply: bool = False,
        ignore_exc: bool = False,
        encoding: str = "ascii",
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        connect_timeout: float | None = None,
        no_delay: bool = False,
        socket_module: Any = None,
        socket_keepalive: Any = None,
        tls_context: Any = None,
        curve_secretkey: str | bytes | None = None,
        curve_publickey: str | bytes | None = None,
        curve_serverkey: str | bytes | None = None,
    ) -> None:
        super().__init__(
            timeout=timeout, serde=serde, serializer=serializer, deserializer=deserializer,
            key_prefix=key_prefix, allow_unicode_keys=allow_unicode_keys, default_noreply=default_noreply,
            ignore_exc=ignore_exc, encoding=encoding, max_frame_bytes=max_frame_bytes,
            connect_timeout=connect_timeout, no_delay=no_delay, socket_module=socket_module,
            socket_keepalive=socket_keepalive, tls_context=tls_context,
        )
        curve = curve_keys(curve_secretkey, curve_publickey, curve_serverkey)
        self.broker_url = _broker_url(broker, curve)
        self._transport = AsyncTransport(self.broker_url, curve)

    async def _run(self, cmd: Command) -> Any:
        ops = cmd.ops
        try:
            if cmd.noreply:
                if ops:
                    await self._transport.request(ops, self._timeout_ms, self._timeout, noreply=True,
                                                  max_frame_bytes=self.max_frame_bytes)
                return cmd.noreply_value
            results = []
            if ops:
                try:
                    results = await self._transport.request(ops, self._timeout_ms, self._timeout,
                                                            max_frame_bytes=self.max_frame_bytes) or []
                except MemcacheClientError as exc:
                    each = self.one_get_per_key(exc, ops)  # a broker older than GET_MANY
                    if each is None:
                        raise
                    results = await self._transport.request(each, self._timeout_ms, self._timeout,
                                                            max_frame_bytes=self.max_frame_bytes) or []
            return _finished(self, cmd, results)
        except MemcacheIllegalInputError:
            raise
        except Exception:
            # pymemcache's ignore_exc: a read that fails for any reason (the broker, memcached,
            # a serde that cannot decode) returns its miss value.
            if cmd.read and self.ignore_exc:
                return cmd.miss
            raise

    async def get(self, key: Key, default: Any = None) -> Any:
        """Coroutine form of Client.get: the value under `key`, or `default` on a miss."""
        return await self._run(self._get(key, default))

    async def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """Coroutine form of Client.gets: (value, cas token) or (default, cas_default)."""
        return await self._run(self._gets(key, default, cas_default))

    async def gat(self, key: Key, expire: int = 0, default: Any = None) -> Any:
        """Coroutine form of Client.gat: get and reset the expiry to `expire` seconds."""
        return await self._run(self._gat(key, expire, default))

    async def gats(self, key: Key, expire: int = 0, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """Coroutine form of Client.gats: gets and reset the expiry to `expire` seconds."""
        return await self._run(self._gats(key, expire, default, cas_default))

    async def get_many(self, keys: Iterable[Key]) -> dict[Any, Any]:
        """Coroutine form of Client.get_many: {key: value} for the keys found."""
        return await self._run(self._many(keys, _GET, False))

    get_multi = get_many

    async def gets_many(self, keys: Iterable[Key]) -> dict[Any, tuple[Any, bytes]]:
        """Coroutine form of Client.gets_many: {key: (value, cas token)} for the keys found."""
        return await self._run(self._many(keys, _GETS, True))

    async def set(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None,
                  flags: int | None = None) -> bool:
        """Coroutine form of Client.set: True; a too-large value deletes the key and raises
        MemcacheServerError."""
        return await self._run(self._store(_SET, key, value, expire, noreply, flags))

    async def set_many(self, values: dict[Key, Any], expire: int = 0, noreply: bool | None = None,
                       flags: int | None = None) -> list[Any]:
        """Coroutine form of Client.set_many: the keys that were not stored."""
        return await self._run(self._set_many(values, expire, noreply, flags))

    set_multi = set_many

    async def add(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None,
                  flags: int | None = None) -> bool:
        """Coroutine form of Client.add: True if stored, False if `key` exists."""
        return await self._run(self._store(_ADD, key, value, expire, noreply, flags))

    async def replace(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None,
                      flags: int | None = None) -> bool:
        """Coroutine form of Client.replace: True if stored, False if `key` is absent."""
        return await self._run(self._store(_REPLACE, key, value, expire, noreply, flags))

    async def append(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None,
                     flags: int | None = None) -> bool:
        """Coroutine form of Client.append: True, or False if absent or the result would not fit."""
        return await self._run(self._store(_APPEND, key, value, expire, noreply, flags))

    async def prepend(self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None,
                      flags: int | None = None) -> bool:
        """Coroutine form of Client.prepend: True, or False if absent or the result would not fit."""
        return await self._run(self._store(_PREPEND, key, value, expire, noreply, flags))

    async def cas(self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool | None = False,
                  flags: int | None = None) -> bool | None:
        """Coroutine form of Client.cas: True if stored, False if changed, None if absent."""
        return await self._run(self._store(_CAS, key, value, expire, noreply, flags, cas))

    async def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Coroutine form of Client.delete: True if `key` was there, False if not."""
        return await self._run(self._delete(key, noreply))

    async def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Coroutine form of Client.delete_many: True."""
        return await self._run(self._delete_many(keys, noreply))

    delete_multi = delete_many

    async def incr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Coroutine form of Client.incr: the new value, or None if `key` is absent."""
        return await self._run(self._arith(_INCR, key, value, noreply))

    async def decr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Coroutine form of Client.decr: the new value (not below 0), or None if absent."""
        return await self._run(self._arith(_DECR, key, value, noreply))

    async def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Coroutine form of Client.touch: True, or False if `key` is absent."""
        return await self._run(self._touch(key, expire, noreply))

    async def get_or_set(self, key: Key, fn: Callable[[], Any], expire: int = 0, *,
                         lease_ttl: int = DEFAULT_LEASE_TTL, recache_ttl: int = 0, wait: float = DEFAULT_WAIT) -> Any:
        """Coroutine form of Client.get_or_set; `fn` may be a coroutine function (awaited) or a
        plain callable; waits with asyncio.sleep."""
        read = self._lease_get(key, lease_ttl, recache_ttl, expire)
        run = lease.steps(wait=_check_wait(wait), poll=lease.DEFAULT_POLL, clock=time.monotonic)
        try:
            step = next(run)
            while True:
                try:
                    outcome = None
                    if type(step) is lease.LeaseGet:
                        outcome = await self._run(read)
                    elif type(step) is lease.Compute:
                        outcome = fn()
                        if inspect.isawaitable(outcome):
                            outcome = await outcome
                    elif type(step) is lease.Fill:
                        await self._run(self._fill(key, step, expire))
                    elif type(step) is lease.Release:
                        await self._run(self._delete(key, False))
                    else:
                        await asyncio.sleep(step.seconds)  # type: ignore[union-attr]
                except Exception as exc:
                    step = run.throw(exc)
                    continue
                step = run.send(outcome)
        except StopIteration as stop:
            return stop.value

    async def invalidate(self, key: Key, stale_ttl: int = 30, noreply: bool | None = None) -> bool:
        """Coroutine form of Client.invalidate: True, or False if `key` is absent."""
        return await self._run(self._invalidate(key, stale_ttl, noreply))

    async def stats(self, *args: Any) -> dict[bytes, Any]:
        """Coroutine form of Client.stats."""
        return await self._run(self._stats(args))

    async def version(self) -> bytes:
        """Coroutine form of Client.version."""
        return await self._run(self._version())

    async def flush_all(self, delay: int = 0, noreply: bool | None = None) -> bool:
        """Coroutine form of Client.flush_all: True."""
        return await self._run(self._flush_all(delay, noreply))

    async def cache_memlimit(self, memlimit: int) -> bool:
        """Coroutine form of Client.cache_memlimit: True."""
        return await self._run(self._cache_memlimit(memlimit))

    async def broker_ping(self) -> str:
        """Coroutine form of Client.broker_ping: "PONG"."""
        return await self._run(self._broker_ping())

    async def broker_stats(self) -> dict[str, Any]:
        """Coroutine form of Client.broker_stats."""
        return await self._run(self._broker_stats())

    async def close(self) -> None:
        """Cheap and idempotent, as Client.close."""

    async def disconnect_all(self) -> None:
        """Close this client's socket; the next call opens a new one."""
        await self._transport.close()

    async def quit(self) -> None:
        """As disconnect_all."""
        await self.disconnect_all()
