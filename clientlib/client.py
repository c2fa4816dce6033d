"""`Client` and `AsyncClient`: pymemcache's API, served by the local mcbroker.

Each method is written once, as a *command*: it checks its arguments, builds the wire ops, and
says how to turn the broker's per-op results into pymemcache's return value. `Client` runs
commands over the blocking transport; `AsyncClient` runs the very same commands over zmq.asyncio.

Cache outcomes are values (a miss returns the default, NOT_STORED returns False); failures are
exceptions, translated from wire codes in one place (`error_for`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import address, limits, serde as serde_mod, wire
from .errors import (
    BrokerOverloaded,
    BrokerTimeout,
    BrokerUnavailable,
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    ProtocolMismatch,
    ServerUnavailable,
)
from .keys import check_cas, check_int, check_key
from .transport import GRACE, Transport
from .wire import Code, Op

DEFAULT_TIMEOUT = 1.0
MAX_OPS_PER_FRAME = 10_000
DEFAULT_MAX_FRAME = wire.DEFAULT_MAX_FRAME
# More than a frame's bytes beyond a store op's key and value: header, request id, deadline,
# flags, op code, bin headers, client flags, TTL, cas.
FRAME_SLACK = 64
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

_ERRORS: dict[int, type[MemcacheError]] = {
    Code.SERVER_ERROR: MemcacheServerError,
    Code.CLIENT_ERROR: MemcacheClientError,
    Code.UNKNOWN_COMMAND: MemcacheUnknownCommandError,
    Code.CONNECTION_ERROR: MemcacheUnexpectedCloseError,
    Code.TIMEOUT: BrokerTimeout,
    Code.OVERLOADED: BrokerOverloaded,
    Code.SERVER_DOWN: ServerUnavailable,
    Code.BAD_REQUEST: MemcacheClientError,
    Code.UNSUPPORTED_VERSION: ProtocolMismatch,
    Code.SHUTTING_DOWN: BrokerUnavailable,
}


def error_for(code: int, message: Any) -> MemcacheError:
    """The exception for a wire failure code: the one place wire codes become exceptions."""
    return _ERRORS.get(code, MemcacheServerError)(str(message))


def _deleted_then_raise(message: str, results: list[list[Any]]) -> Any:
    """finish() of a set too large to send: its key was deleted instead; the set still failed."""
    r = results[0]
    if r[0] >= Code.SERVER_ERROR:
        raise error_for(r[0], r[1] if len(r) > 1 else "")
    raise MemcacheServerError(message)


def _true(results: list[list[Any]]) -> bool:
    return True


# pymemcache converts some stats to Python types; everything else is tried as int.
def _stat_float(v: bytes) -> float:
    return float(v.replace(b":", b"."))


_STAT_TYPES: dict[bytes, Callable[[bytes], Any]] = {
    b"version": bytes,
    b"rusage_user": _stat_float,
    b"rusage_system": _stat_float,
    b"hash_is_expanding": lambda v: int(v) != 0,
    b"slab_reassign_running": lambda v: int(v) != 0,
    b"inter": bytes,
    b"growth_factor": float,
    b"stat_key_prefix": bytes,
    b"umask": lambda v: int(v, 8),
    b"detail_enabled": lambda v: int(v) != 0,
    b"cas_enabled": lambda v: int(v) != 0,
    b"auth_enabled_sasl": lambda v: v == b"yes",
    b"maxconns_fast": lambda v: int(v) != 0,
    b"slab_reassign": lambda v: int(v) != 0,
    b"slab_automove": lambda v: int(v) != 0,
}


def _convert_stats(raw: dict[str, str]) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for name, value in raw.items():
        k = name.encode()
        v = value.encode()
        try:
            out[k] = _STAT_TYPES.get(k, int)(v)
        except Exception:
            out[k] = v
    return out


def _merge_stats(per_server: dict[str, dict[bytes, Any]]) -> dict[bytes, Any]:
    """One server: its stats. Several: numeric counters summed, the rest from the first server."""
    values = list(per_server.values())
    if len(values) == 1:
        return values[0]
    merged: dict[bytes, Any] = {}
    for stats in values:
        for k, v in stats.items():
            if k not in merged:
                merged[k] = v
            elif type(v) is int and type(merged[k]) is int:
                merged[k] += v
    return merged


@dataclass(slots=True)
class Command:
    """One client call: its ops, how to read their results, and how failures are treated."""

    ops: list[list[Any]]
    finish: Callable[[list[list[Any]]], Any]
    noreply: bool = False
    noreply_value: Any = True
    read: bool = False  # with ignore_exc, a failed read is a miss
    miss_value: Any = None


class _Commands:
    """Argument checks and result translation shared by Client and AsyncClient."""

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        serde: Any = None,
        serializer: Callable[..., Any] | None = None,
        deserializer: Callable[..., Any] | None = None,
        key_prefix: bytes | str = b"",
        allow_unicode_keys: bool = False,
        default_noreply: bool = False,
        ignore_exc: bool = False,
        encoding: str = "ascii",
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        # pymemcache's socket-level options: accepted so existing configuration keeps working.
        # The broker owns the memcached sockets, so they have no effect here (see the README).
        connect_timeout: float | None = None,
        no_delay: bool = False,
        socket_module: Any = None,
        socket_keepalive: Any = None,
        tls_context: Any = None,
    ) -> None:
        if broker is not None and not isinstance(broker, str):
            raise TypeError(
                "clientlib.Client takes the broker's URL (ipc:///path or tcp://127.0.0.1:PORT), "
                f"not a memcached address: got {broker!r}"
            )
        # Checked here, once: a bad address must not surface later as a raw ZeroMQ error.
        self.broker_url = address.check_connect_url(broker) if broker else address.default_connect_url()
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 86_400:
            raise MemcacheIllegalInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.serde = serde_mod.make_serde(serde, serializer, deserializer, encoding)
        if isinstance(key_prefix, str):
            key_prefix = key_prefix.encode(encoding)
        self.key_prefix = key_prefix
        self.allow_unicode_keys = allow_unicode_keys
        self.default_noreply = default_noreply
        self.ignore_exc = ignore_exc
        self.encoding = encoding
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout

    def _broker_timeout_ms(self) -> int:
        # The broker answers TIMEOUT a little before our own deadline, so its explicit per-key
        # answer (partial results of a fan-out included) arrives before we give up waiting.
        ms = self.timeout * 1000
        return max(1, int(ms - min(25.0, ms / 20)))

    # --- checks --------------------------------------------------------------------------------

    def check_key(self, key: Any) -> bytes:
        return check_key(key, prefix=self.key_prefix, allow_unicode_keys=self.allow_unicode_keys, encoding=self.encoding)

    def _expire(self, expire: Any) -> int:
        return check_int(expire, "expire", minimum=-(1 << 31), maximum=_U32)

    def _value(self, key: Any, value: Any, flags: int | None) -> tuple[bytes, int]:
        return serde_mod.encode_value(self.serde, key, value, flags=flags, encoding=self.encoding)

    def _noreply(self, noreply: bool | None) -> bool:
        return self.default_noreply if noreply is None else bool(noreply)

    def _found(self, on_ok: Callable[[list[Any]], Any], otherwise: Any) -> Callable[[list[list[Any]]], Any]:
        """finish() for single-key ops whose only outcomes are done / not found / failure."""

        def finish(results: list[list[Any]]) -> Any:
            r = results[0]
            if r[0] == Code.OK:
                return on_ok(r)
            self._raise(r)
            return otherwise

        return finish

    def _guarded(self, cmd: Command, run: Callable[[], Any]) -> Any:
        """Run a command; with ignore_exc a failed read is a miss, as in pymemcache."""
        try:
            return run()
        except MemcacheIllegalInputError:
            raise
        except MemcacheError:
            if cmd.read and self.ignore_exc:
                return cmd.miss_value
            raise

    @staticmethod
    def _raise(result: list[Any]) -> None:
        if result[0] >= Code.SERVER_ERROR:
            raise error_for(result[0], result[1] if len(result) > 1 else "")

    # --- reads ---------------------------------------------------------------------------------

    def _cmd_get(self, key: Any, default: Any = None) -> Command:
        k = self.check_key(key)

        def finish(results: list[list[Any]]) -> Any:
            r = results[0]
            if r[0] == Code.OK:
                return self.serde.deserialize(key, r[1], r[2])
            if r[0] == Code.MISS:
                return default
            self._raise(r)

        return Command([[Op.GET, k]], finish, read=True, miss_value=default)

    def _cmd_gets(self, key: Any, default: Any = None, cas_default: Any = None) -> Command:
        k = self.check_key(key)

        def finish(results: list[list[Any]]) -> Any:
            r = results[0]
            if r[0] == Code.OK:
                return self.serde.deserialize(key, r[1], r[2]), b"%d" % r[3]
            if r[0] == Code.MISS:
                return default, cas_default
            self._raise(r)

        return Command([[Op.GETS, k]], finish, read=True, miss_value=(default, cas_default))

    def _cmd_gat(self, key: Any, expire: int = 0, default: Any = None) -> Command:
        k = self.check_key(key)
        ttl = self._expire(expire)
        cmd = self._cmd_get(key, default)
        cmd.ops = [[Op.GAT, k, ttl]]
        return cmd

    def _cmd_gats(self, key: Any, expire: int = 0, default: Any = None, cas_default: Any = None) -> Command:
        k = self.check_key(key)
        ttl = self._expire(expire)
        cmd = self._cmd_gets(key, default, cas_default)
        cmd.ops = [[Op.GATS, k, ttl]]
        return cmd

    def _many(self, keys: Iterable[Any], op: int, with_cas: bool) -> Command:
        keys = list(keys)
        ops = [[op, self.check_key(k)] for k in keys]
        ignore = self.ignore_exc

        def finish(results: list[list[Any]]) -> dict[Any, Any]:
            out: dict[Any, Any] = {}
            deserialize = self.serde.deserialize
            for key, r in zip(keys, results):
                code = r[0]
                if code == Code.OK:
                    value = deserialize(key, r[1], r[2])
                    out[key] = (value, b"%d" % r[3]) if with_cas else value
                elif code >= Code.SERVER_ERROR and not ignore:
                    self._raise(r)
            return out

        return Command(ops, finish, read=True, miss_value={})

    def _cmd_get_many(self, keys: Iterable[Any]) -> Command:
        return self._many(keys, Op.GET, False)

    def _cmd_gets_many(self, keys: Iterable[Any]) -> Command:
        return self._many(keys, Op.GETS, True)

    # --- writes --------------------------------------------------------------------------------

    def _fits_frame(self, op: list[Any]) -> bool:
        """Whether a frame holding just this store op stays within max_frame_bytes."""
        if len(op[1]) + len(op[2]) + FRAME_SLACK <= self.max_frame_bytes:
            return True  # the common case, decided without encoding the value
        return len(wire.encode_request(_U64, [op], _U32, wire.NOREPLY)) <= self.max_frame_bytes

    def _too_large(self, key: bytes, value: bytes) -> str:
        return (
            f"{limits.TOO_LARGE}: a {len(value)}-byte value for key {key[:64]!r} does not fit the "
            f"broker's frame limit of {self.max_frame_bytes} bytes (max_frame_bytes)"
        )

    def _store(self, op: int, key: Any, value: Any, expire: Any, noreply: bool | None, flags: int | None, cas: Any = None) -> Command:
        k = self.check_key(key)
        ttl = self._expire(expire)
        data, fl = self._value(key, value, flags)
        o: list[Any] = [op, k, data, fl, ttl]
        if op == Op.CAS:
            o.append(check_cas(cas))
        nr = self._noreply(noreply)
        if not self._fits_frame(o):
            # memcached's text protocol answers "SERVER_ERROR object too large for cache"; for a
            # set it also unlinks the key's old item, so a failed write never leaves stale data
            # readable (Django's cache relies on it). With noreply the error is not sent.
            message = self._too_large(k, data)
            if op == Op.SET:
                return Command([[Op.DELETE, k]], functools.partial(_deleted_then_raise, message), noreply=nr)
            if nr:
                return Command([], _true, noreply=True)
            raise MemcacheServerError(message)

        def finish(results: list[list[Any]]) -> Any:
            r = results[0]
            code = r[0]
            if code == Code.OK:
                return True
            if code == Code.NOT_STORED or code == Code.EXISTS:
                return False
            if code == Code.NOT_FOUND:
                return None
            self._raise(r)

        return Command([o], finish, noreply=nr)

    def _cmd_set(self, key: Any, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> Command:
        return self._store(Op.SET, key, value, expire, noreply, flags)

    def _cmd_add(self, key: Any, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> Command:
        return self._store(Op.ADD, key, value, expire, noreply, flags)

    def _cmd_replace(self, key: Any, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> Command:
        return self._store(Op.REPLACE, key, value, expire, noreply, flags)

    def _cmd_append(self, key: Any, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> Command:
        return self._store(Op.APPEND, key, value, expire, noreply, flags)

    def _cmd_prepend(self, key: Any, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> Command:
        return self._store(Op.PREPEND, key, value, expire, noreply, flags)

    def _cmd_cas(self, key: Any, value: Any, cas: Any, expire: int = 0, noreply: bool = False, flags: int | None = None) -> Command:
        return self._store(Op.CAS, key, value, expire, noreply, flags, cas)

    def _cmd_set_many(self, values: dict[Any, Any], expire: int = 0, noreply: bool | None = None, flags: int | None = None) -> Command:
        ttl = self._expire(expire)
        keys = list(values)
        ops = []
        too_large: dict[int, str] = {}
        for n, key in enumerate(keys):
            data, fl = self._value(key, values[key], flags)
            k = self.check_key(key)
            op = [Op.SET, k, data, fl, ttl]
            if not self._fits_frame(op):
                # As memcached does for each too-large set of a batch: the key's old item goes.
                too_large[n] = self._too_large(k, data)
                op = [Op.DELETE, k]
            ops.append(op)
        ignore = self.ignore_exc

        def finish(results: list[list[Any]]) -> list[Any]:
            failed = []
            for n, (key, r) in enumerate(zip(keys, results)):
                if n in too_large:
                    if not ignore:
                        raise MemcacheServerError(too_large[n])
                    failed.append(key)
                elif r[0] != Code.OK:
                    if r[0] >= Code.SERVER_ERROR and not ignore:
                        self._raise(r)
                    failed.append(key)
            return failed

        return Command(ops, finish, noreply=self._noreply(noreply), noreply_value=[])

    def _cmd_delete(self, key: Any, noreply: bool | None = None) -> Command:
        k = self.check_key(key)

        return Command([[Op.DELETE, k]], self._found(lambda r: True, False), noreply=self._noreply(noreply))

    def _cmd_delete_many(self, keys: Iterable[Any], noreply: bool | None = None) -> Command:
        ops = [[Op.DELETE, self.check_key(k)] for k in keys]

        def finish(results: list[list[Any]]) -> bool:
            for r in results:
                self._raise(r)
            return True

        return Command(ops, finish, noreply=self._noreply(noreply))

    def _arith(self, op: int, key: Any, value: Any, noreply: bool | None) -> Command:
        k = self.check_key(key)
        delta = check_int(value, "value", minimum=0, maximum=_U64)

        return Command([[op, k, delta]], self._found(lambda r: r[1], None), noreply=bool(noreply), noreply_value=None)

    def _cmd_incr(self, key: Any, value: int, noreply: bool | None = False) -> Command:
        return self._arith(Op.INCR, key, value, noreply)

    def _cmd_decr(self, key: Any, value: int, noreply: bool | None = False) -> Command:
        return self._arith(Op.DECR, key, value, noreply)

    def _cmd_touch(self, key: Any, expire: int = 0, noreply: bool | None = None) -> Command:
        k = self.check_key(key)
        ttl = self._expire(expire)

        return Command([[Op.TOUCH, k, ttl]], self._found(lambda r: True, False), noreply=self._noreply(noreply))

    # --- server-wide ---------------------------------------------------------------------------

    def _single(self, op: list[Any], convert: Callable[[Any], Any], **kw: Any) -> Command:
        def finish(results: list[list[Any]]) -> Any:
            r = results[0]
            self._raise(r)
            return convert(r[1])

        return Command([op], finish, **kw)

    def _cmd_stats(self, *args: Any) -> Command:
        raw_args = [a if isinstance(a, bytes) else str(a).encode(self.encoding) for a in args]

        def convert(per_server: dict[str, dict[str, str]]) -> dict[bytes, Any]:
            return _merge_stats({name: _convert_stats(s) for name, s in per_server.items()})

        return self._single([Op.STATS, raw_args], convert, read=True, miss_value={})

    def _cmd_version(self) -> Command:
        return self._single([Op.VERSION], lambda per_server: next(iter(per_server.values())).encode())

    def _cmd_flush_all(self, delay: int = 0, noreply: bool | None = None) -> Command:
        d = check_int(delay, "delay", minimum=0, maximum=_U32)
        return self._single([Op.FLUSH_ALL, d], lambda _: True, noreply=self._noreply(noreply))

    def _cmd_cache_memlimit(self, memlimit: int) -> Command:
        m = check_int(memlimit, "memlimit", minimum=0, maximum=_U32)
        return self._single([Op.CACHE_MEMLIMIT, m], lambda _: True)

    def _cmd_broker_ping(self) -> Command:
        return self._single([Op.PING], lambda v: v)

    def _cmd_broker_stats(self) -> Command:
        return self._single([Op.BROKER_STATS], lambda v: v)

    # --- frames --------------------------------------------------------------------------------

    def _one_frame(self, rid: int, ops: list[list[Any]], timeout_ms: int) -> bytes:
        data = wire.encode_request(rid, ops, timeout_ms)
        if len(data) > self.max_frame_bytes:
            raise MemcacheIllegalInputError(
                f"request of {len(data)} bytes exceeds the broker's frame limit of {self.max_frame_bytes} bytes"
            )
        return data

    def _frames(self, cmd: Command, new_id: Callable[[], int], timeout_ms: int) -> list[tuple[int, bytes, int, int]]:
        """Split a command into frames under the size and op limits: (id, bytes, first op, end)."""
        ops = cmd.ops
        flags = wire.NOREPLY if cmd.noreply else 0
        out = []
        start = 0
        while start < len(ops):
            rid = new_id()
            end = min(len(ops), start + MAX_OPS_PER_FRAME)
            data = wire.encode_request(rid, ops[start:end], timeout_ms, flags)
            while len(data) > self.max_frame_bytes:
                if end - start == 1:
                    raise MemcacheIllegalInputError(
                        f"request of {len(data)} bytes exceeds the broker's frame limit of {self.max_frame_bytes} bytes"
                    )
                end = start + (end - start) // 2
                data = wire.encode_request(rid, ops[start:end], timeout_ms, flags)
            out.append((rid, data, start, end))
            start = end
        return out

    def _results(self, cmd: Command, frames: list[tuple[int, bytes, int, int]], replies: dict[int, wire.ReplyFrame]) -> list[list[Any]]:
        results: list[list[Any]] = []
        for rid, _, start, end in frames:
            reply = replies[rid]
            if reply.code != Code.OK:
                raise error_for(reply.code, reply.payload)
            if len(reply.payload) != end - start:
                raise ProtocolMismatch(f"broker answered {len(reply.payload)} results for {end - start} ops")
            results.extend(reply.payload)
        return results


def _sync(name: str) -> Callable[..., Any]:
    builder = getattr(_Commands, "_cmd_" + name)

    @functools.wraps(builder)
    def method(self: "Client", *args: Any, **kwargs: Any) -> Any:
        return self._run(builder(self, *args, **kwargs))

    method.__name__ = name
    method.__qualname__ = "Client." + name
    return method


def _async(name: str) -> Callable[..., Any]:
    builder = getattr(_Commands, "_cmd_" + name)

    @functools.wraps(builder)
    async def method(self: "AsyncClient", *args: Any, **kwargs: Any) -> Any:
        return await self._run(builder(self, *args, **kwargs))

    method.__name__ = name
    method.__qualname__ = "AsyncClient." + name
    return method


COMMANDS = [
    "get", "gets", "gat", "gats", "get_many", "gets_many", "set", "add", "replace", "append",
    "prepend", "cas", "set_many", "delete", "delete_many", "incr", "decr", "touch", "stats",
    "version", "flush_all", "cache_memlimit", "broker_ping", "broker_stats",
]


class Client(_Commands):
    """A drop-in for pymemcache's Client that sends every call through the local mcbroker.

    Thread-safe (one ZeroMQ socket per thread) and fork-safe (a child process opens its own).
    """

    def __init__(self, broker: str | None = None, **kwargs: Any) -> None:
        super().__init__(broker, **kwargs)
        self._transport = Transport(self.broker_url)

    def _run(self, cmd: Command) -> Any:
        if not cmd.ops:
            return cmd.finish([])
        return self._guarded(cmd, lambda: self._call(cmd))

    def _call(self, cmd: Command) -> Any:
        ops = cmd.ops
        if len(ops) == 1 and not cmd.noreply:
            # Most calls are one op in one frame: skip the splitting and gathering machinery.
            timeout_ms = self._broker_timeout_ms()
            reply = self._transport.call_one(lambda rid: self._one_frame(rid, ops, timeout_ms), self.timeout)
            if reply.code != Code.OK:
                raise error_for(reply.code, reply.payload)
            if len(reply.payload) != 1:
                raise ProtocolMismatch(f"broker answered {len(reply.payload)} results for 1 op")
            return cmd.finish(reply.payload)
        frames = self._frames(cmd, self._transport.next_id, self._broker_timeout_ms())
        if cmd.noreply:
            self._transport.send_only([f[1] for f in frames], self.timeout)
            return cmd.noreply_value
        replies = self._transport.call([(f[0], f[1]) for f in frames], self.timeout)
        return cmd.finish(self._results(cmd, frames, replies))

    def close(self) -> None:
        """Cheap and idempotent: the broker connection is shared, stateless and reconnects by
        itself, so there is nothing to tear down per request (Django and Celery call this after
        every request or task). Stale replies can never leak into later calls: ids filter them."""

    def disconnect_all(self) -> None:
        """Close this process's sockets to the broker; the next call opens new ones."""
        self._transport.close()

    def quit(self) -> None:
        self.disconnect_all()

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value, noreply=True)

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __delitem__(self, key: Any) -> None:
        self.delete(key, noreply=True)

    get_multi = property(lambda self: self.get_many)
    set_multi = property(lambda self: self.set_many)
    delete_multi = property(lambda self: self.delete_many)


class AsyncClient(_Commands):
    """The same methods as coroutines; concurrent calls share one socket and are pipelined."""

    def __init__(self, broker: str | None = None, **kwargs: Any) -> None:
        super().__init__(broker, **kwargs)
        self._pid = 0
        self._sock: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, asyncio.Future[wire.ReplyFrame]] = {}
        self._next_id = 0

    def _ensure(self) -> Any:
        import zmq
        import zmq.asyncio

        loop = asyncio.get_running_loop()
        if self._sock is None or self._pid != os.getpid() or self._reader is None or self._reader.get_loop() is not loop or self._reader.done():
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close(linger=0)
            ctx = zmq.asyncio.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.connect(self.broker_url)
            self._sock = sock
            self._pid = os.getpid()
            self._waiters = {}
            self._next_id = int.from_bytes(os.urandom(6), "big")
            self._reader = loop.create_task(self._read_loop(sock))
        return self._sock

    def _new_id(self) -> int:
        self._next_id = rid = (self._next_id + 1) & _U64
        return rid

    async def _read_loop(self, sock: Any) -> None:
        while True:
            try:
                data = await sock.recv()
            except Exception:
                return
            try:
                reply = wire.decode_reply(data)
            except wire.WireError:
                continue
            fut = self._waiters.pop(reply.req_id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def _send(self, sock: Any, data: bytes, deadline: float) -> None:
        import zmq

        while True:
            try:
                await sock.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(f"no broker is accepting requests at {self.broker_url}") from None
                await asyncio.sleep(0.005)

    async def _run(self, cmd: Command) -> Any:
        if not cmd.ops:
            return cmd.finish([])
        try:
            sock = self._ensure()
            frames = self._frames(cmd, self._new_id, self._broker_timeout_ms())
            start = time.monotonic()
            loop = asyncio.get_running_loop()
            futs = {}
            if not cmd.noreply:
                for rid, *_ in frames:
                    futs[rid] = self._waiters[rid] = loop.create_future()
            try:
                for _, data, _, _ in frames:
                    await self._send(sock, data, start + self.timeout)
                if cmd.noreply:
                    return cmd.noreply_value
                remaining = start + self.timeout + GRACE - time.monotonic()
                try:
                    done = await asyncio.wait_for(asyncio.gather(*futs.values()), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise BrokerTimeout(f"no reply from the broker at {self.broker_url} within {self.timeout:.3f}s") from None
            finally:
                for rid in futs:
                    self._waiters.pop(rid, None)
            replies = dict(zip(futs, done))
            return cmd.finish(self._results(cmd, frames, replies))
        except MemcacheIllegalInputError:
            raise
        except MemcacheError:
            if cmd.read and self.ignore_exc:
                return cmd.miss_value
            raise

    async def close(self) -> None:
        """Cheap and idempotent, as Client.close."""

    async def disconnect_all(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close(linger=0)
        self._sock = None

    async def quit(self) -> None:
        await self.disconnect_all()

    # pymemcache's aliases, as on Client.
    get_multi = property(lambda self: self.get_many)
    set_multi = property(lambda self: self.set_many)
    delete_multi = property(lambda self: self.delete_many)


for _name in COMMANDS:
    setattr(Client, _name, _sync(_name))
    setattr(AsyncClient, _name, _async(_name))
del _name
