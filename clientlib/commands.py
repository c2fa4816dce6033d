"""What each client call sends and how its results read, shared by Client, AsyncClient and
MockClient: argument checks, wire ops, and the translation of per-op results into pymemcache's
return values and exceptions. Pure: no sockets here (the transport does the I/O).

Each call is built as a `Command`: its ops plus a *finisher*, a plain function
``finish(commands, cmd, results)`` (no closure per call). Cache outcomes are values (a miss returns
the default, NOT_STORED returns False); failures are exceptions (`errors.error_for`).
"""

from __future__ import annotations

from itertools import compress, repeat
from operator import is_, itemgetter, not_
from typing import Any, Callable, Iterable, Union

from . import limits, serde as serde_mod, wire
from .errors import (
    MemcacheClientError, MemcacheError, MemcacheIllegalInputError, MemcacheServerError, ProtocolMismatch, error_for,
)
from .keys import check_cas, check_int, check_key, check_keys
from .wire import Code, Op

Key = Union[str, bytes]
Result = list[Any]

DEFAULT_TIMEOUT = 1.0
DEFAULT_MAX_FRAME = wire.DEFAULT_MAX_FRAME
# More than a frame's bytes beyond a store op's key and value: header, request id, deadline,
# flags, op code, bin headers, client flags, TTL, cas.
FRAME_SLACK = 64
# The smallest frame that holds any single non-store op (a 250-byte key and the header).
MIN_FRAME_BYTES = 512
_U32 = (1 << 32) - 1
_I32 = (1 << 31) - 1
_RELATIVE_TTL_LIMIT = 60 * 60 * 24 * 30  # memcached reads a longer TTL as a Unix time
_U64 = (1 << 64) - 1
_OK = int(Code.OK)
_MISS = int(Code.MISS)
_NOT_STORED = int(Code.NOT_STORED)
_EXISTS = int(Code.EXISTS)
_NOT_FOUND = int(Code.NOT_FOUND)
_FIRST_ERROR = int(Code.SERVER_ERROR)
# Plain ints in the ops: an IntEnum member costs more to pack and compare.
_GET, _GETS, _GAT, _GATS = int(Op.GET), int(Op.GETS), int(Op.GAT), int(Op.GATS)
_GET_MANY = int(Op.GET_MANY)
_code, _value = itemgetter(0), itemgetter(1)  # of a result: [code, value, client flags, ...]
_SET, _ADD, _REPLACE, _APPEND, _PREPEND, _CAS = (
    int(Op.SET), int(Op.ADD), int(Op.REPLACE), int(Op.APPEND), int(Op.PREPEND), int(Op.CAS),
)
_DELETE, _INCR, _DECR, _TOUCH = int(Op.DELETE), int(Op.INCR), int(Op.DECR), int(Op.TOUCH)
_LEASE_GET, _INVALIDATE = int(Op.LEASE_GET), int(Op.INVALIDATE)


# --- stats, as pymemcache reads them ----------------------------------------------------------


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


def _stats_result(per_server: dict[str, dict[str, str]]) -> dict[bytes, Any]:
    return _merge_stats({name: _convert_stats(s) for name, s in per_server.items()})


def _version_result(per_server: dict[str, str]) -> bytes:
    return next(iter(per_server.values())).encode()


def _as_is(value: Any) -> Any:
    return value


def _true_result(value: Any) -> bool:
    return True


# --- commands ----------------------------------------------------------------------------------


class Command:
    """One client call: its wire ops, its finisher, and how a failure is treated.

    `finish(commands, cmd, results)` turns the per-op results (in op order) into the call's return
    value. `key`, `default` and `extra` carry what the finisher needs. With `noreply` nothing is
    awaited and `noreply_value` is returned. A `read` returns `miss` instead of raising a
    MemcacheError when the client has ignore_exc (pymemcache's rule)."""

    __slots__ = ("ops", "finish", "key", "default", "extra", "noreply", "noreply_value", "read", "miss")

    def __init__(
        self, ops: list[list[Any]], finish: "Finisher", key: Any = None, default: Any = None, extra: Any = None,
        noreply: bool = False, noreply_value: Any = True, read: bool = False, miss: Any = None,
    ) -> None:
        self.ops = ops
        self.finish = finish
        self.key = key
        self.default = default
        self.extra = extra
        self.noreply = noreply
        self.noreply_value = noreply_value
        self.read = read
        self.miss = miss


Finisher = Callable[["Commands", Command, list[Result]], Any]


def raise_failure(r: Result) -> None:
    """Raise the exception for a failed per-op result; return for any other outcome."""
    if r[0] >= _FIRST_ERROR:
        raise error_for(r[0], r[1] if len(r) > 1 else "")


def _finish_get(c: "Commands", cmd: Command, results: list[Result]) -> Any:
    r = results[0]
    code = r[0]
    if code == _OK:
        return c.serde.deserialize(cmd.key, r[1], r[2])
    raise_failure(r)
    return cmd.default


def _finish_gets(c: "Commands", cmd: Command, results: list[Result]) -> Any:
    r = results[0]
    if r[0] == _OK:
        return c.serde.deserialize(cmd.key, r[1], r[2]), b"%d" % r[3]
    raise_failure(r)
    return cmd.miss


def _finish_many(c: "Commands", cmd: Command, results: list[Any]) -> dict[Any, Any]:
    """A get_many's or gets_many's dict. A result is `[code, ...]`, or (a GET_MANY's hit with
    client flags 0) the value alone: bytes."""
    with_cas = cmd.extra
    kinds = list(map(type, results))
    bare = kinds.count(bytes)
    if bare and with_cas:
        raise ProtocolMismatch(f"malformed result from the broker: a bare value for a gets: {results!r:.200}")
    if type(c.serde) is serde_mod.RawSerde and not with_cas:
        # The default serde reads values back as they are stored: the dict in C-level passes,
        # unless some key failed or carries flags (then the loop below reads each key).
        if bare == len(kinds):
            return dict(zip(cmd.key, results))
        if bare:
            is_bare = list(map(is_, kinds, repeat(bytes)))
            rest = list(map(_code, compress(results, map(not_, is_bare))))
            if rest.count(_MISS) == len(rest):
                return dict(zip(compress(cmd.key, is_bare), compress(results, is_bare)))
        else:
            codes = list(map(_code, results))
            if codes.count(_OK) == len(codes):
                return dict(zip(cmd.key, map(_value, results)))
            if max(codes) < _FIRST_ERROR:
                hits = list(map(not_, codes))  # OK is 0
                return dict(zip(compress(cmd.key, hits), map(_value, compress(results, hits))))
    out = {}
    deserialize = c.serde.deserialize
    failed: dict[Any, MemcacheError] | None = None
    for key, r in zip(cmd.key, results):
        if type(r) is bytes:
            out[key] = deserialize(key, r, 0)
            continue
        code = r[0]
        if code == _OK:
            value = deserialize(key, r[1], r[2])
            out[key] = (value, b"%d" % r[3]) if with_cas else value
        elif code >= _FIRST_ERROR:
            if failed is None:
                failed = {}
            failed[key] = error_for(code, r[1] if len(r) > 1 else "")
    if failed is not None and not c.ignore_exc:
        # The first failure is raised; the keys the broker did answer (from healthy servers)
        # travel with it, so one dead server need not cost the whole call.
        exc = next(iter(failed.values()))
        exc.partial = out
        exc.failed = failed
        raise exc
    return out


def _finish_store(c: "Commands", cmd: Command, results: list[Result]) -> bool | None:
    r = results[0]
    code = r[0]
    if code == _OK:
        return True
    if code == _NOT_STORED or code == _EXISTS:
        return False
    if code == _NOT_FOUND:
        return None
    raise_failure(r)
    return False


def _finish_deleted_too_large(c: "Commands", cmd: Command, results: list[Result]) -> Any:
    """A set too large to send: its key was deleted instead (memcached's rule); the set failed."""
    raise_failure(results[0])
    raise MemcacheServerError(cmd.extra)


def _finish_set_many(c: "Commands", cmd: Command, results: list[Result]) -> list[Any]:
    failed = []
    too_large: dict[int, str] = cmd.extra
    ignore = c.ignore_exc
    for n, (key, r) in enumerate(zip(cmd.key, results)):
        if n in too_large:
            if not ignore:
                raise MemcacheServerError(too_large[n])
            failed.append(key)
        elif r[0] != _OK:
            if not ignore:
                raise_failure(r)
            failed.append(key)
    return failed


def _finish_found(c: "Commands", cmd: Command, results: list[Result]) -> bool:
    r = results[0]
    if r[0] == _OK:
        return True
    raise_failure(r)
    return False


def _finish_all_ok(c: "Commands", cmd: Command, results: list[Result]) -> bool:
    for r in results:
        raise_failure(r)
    return True


def _finish_arith(c: "Commands", cmd: Command, results: list[Result]) -> int | None:
    r = results[0]
    if r[0] == _OK:
        return r[1]
    raise_failure(r)
    return None


def _finish_single(c: "Commands", cmd: Command, results: list[Result]) -> Any:
    r = results[0]
    raise_failure(r)
    return cmd.extra(r[1])


def _finish_lease(c: "Commands", cmd: Command, results: list[Result]) -> tuple[Any, int, int, int] | None:
    """(value, client flags, cas, lease bits) of a LEASE_GET; an empty item with flags 0 (the
    placeholder memcached vivified) stays b"" rather than go through the serde."""
    r = results[0]
    if r[0] == _OK:
        raw, flags = r[1], r[2]
        value = raw if raw == b"" and flags == 0 else c.serde.deserialize(cmd.key, raw, flags)
        return value, flags, r[3], r[4]
    raise_failure(r)
    return None  # a miss: only possible when the key was stored and evicted between N and now


def _finish_nothing(c: "Commands", cmd: Command, results: list[Result]) -> bool:
    return True


class Commands:
    """Options, argument checks and result translation shared by Client, AsyncClient and
    MockClient. Subclasses provide the transport and the public methods."""

    def __init__(
        self,
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
        connect_timeout: float | None = None,
        no_delay: bool = False,
        socket_module: Any = None,
        socket_keepalive: Any = None,
        tls_context: Any = None,
    ) -> None:
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.serde = serde_mod.make_serde(serde, serializer, deserializer, encoding)
        if isinstance(key_prefix, str):
            key_prefix = key_prefix.encode(encoding)
        self.key_prefix = key_prefix
        self.allow_unicode_keys = allow_unicode_keys
        self.default_noreply = default_noreply
        self.ignore_exc = ignore_exc
        self.encoding = encoding
        if type(max_frame_bytes) is not int or not MIN_FRAME_BYTES <= max_frame_bytes <= 1 << 30:
            raise MemcacheIllegalInputError(
                f"max_frame_bytes must be an int in {MIN_FRAME_BYTES}..{1 << 30} (bytes), got {max_frame_bytes!r}"
            )
        self.max_frame_bytes = max_frame_bytes
        # A get_many goes as one GET_MANY op until a broker refuses it (one_get_per_key).
        self.get_many_op = True
        # pymemcache's socket-level options: accepted so existing configuration keeps working.
        # The broker owns the memcached sockets, so they have no effect here (see the README).
        self.connect_timeout = connect_timeout

    @property
    def timeout(self) -> float:
        """Seconds a call may take in all (the broker is told a little less, so that its explicit
        TIMEOUT answer arrives before the client gives up)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86_400:
            raise MemcacheIllegalInputError(f"timeout must be a positive number of seconds, got {value!r}")
        self._timeout = float(value)
        ms = self._timeout * 1000
        self._timeout_ms = max(1, int(ms - min(25.0, ms / 20)))

    # --- checks --------------------------------------------------------------------------------

    def check_key(self, key: Any) -> bytes:
        """`key` as the bytes sent (prefix added), or MemcacheIllegalInputError."""
        return check_key(key, prefix=self.key_prefix, allow_unicode_keys=self.allow_unicode_keys, encoding=self.encoding)

    def _expire(self, expire: Any) -> int:
        return check_int(expire, "expire", minimum=-(1 << 31), maximum=_U32)

    def _noreply(self, noreply: bool | None) -> bool:
        return self.default_noreply if noreply is None else bool(noreply)

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

    # --- reads ---------------------------------------------------------------------------------

    def _get(self, key: Any, default: Any) -> Command:
        return Command([[_GET, self.check_key(key)]], _finish_get, key, default, None, False, True, True, default)

    def _gets(self, key: Any, default: Any, cas_default: Any) -> Command:
        miss = (default, cas_default)
        return Command([[_GETS, self.check_key(key)]], _finish_gets, key, default, None, False, True, True, miss)

    def _gat(self, key: Any, expire: Any, default: Any) -> Command:
        k = self.check_key(key)
        return Command([[_GAT, k, self._expire(expire)]], _finish_get, key, default, read=True, miss=default)

    def _gats(self, key: Any, expire: Any, default: Any, cas_default: Any) -> Command:
        k = self.check_key(key)
        miss = (default, cas_default)
        return Command([[_GATS, k, self._expire(expire)]], _finish_gets, key, default, read=True, miss=miss)

    def _many(self, keys: Iterable[Any], op: int, with_cas: bool) -> Command:
        keys = list(keys)
        full = check_keys(keys, prefix=self.key_prefix, allow_unicode_keys=self.allow_unicode_keys, encoding=self.encoding)
        if op == _GET and len(full) > 1 and self.get_many_op:
            return Command([[_GET_MANY, full]], _finish_many, keys, extra=with_cas, read=True, miss={})
        return Command([[op, k] for k in full], _finish_many, keys, extra=with_cas, read=True, miss={})

    def one_get_per_key(self, exc: Exception, ops: list[list[Any]]) -> list[list[Any]] | None:
        """When `exc` is a broker's refusal of the GET_MANY op in `ops` as a broker older than
        the op refuses it, the same gets as one GET per key, and this client sends those from now
        on; None otherwise. An older broker answers the frame BAD_REQUEST, "unknown op 6" when it
        is small, and "undecodable frame: ..." when its bounded decoder meets the key array (more
        than 16 elements) first; clientlib builds these frames itself, so a broker that knows the
        op never says either of them."""
        if not (len(ops) == 1 and ops[0][0] == _GET_MANY and type(exc) is MemcacheClientError):
            return None
        message = str(exc)
        if message != f"unknown op {_GET_MANY}" and not message.startswith("undecodable frame"):
            return None
        self.get_many_op = False
        return [[_GET, key] for key in ops[0][1]]

    def _lease_get(self, key: Any, lease_ttl: Any, recache_ttl: Any, expire: Any = 0) -> Command:
        k = self.check_key(key)
        lease = check_int(lease_ttl, "lease_ttl", minimum=1, maximum=_I32)
        recache = check_int(recache_ttl, "recache_ttl", minimum=0, maximum=_I32)
        ttl = self._expire(expire)
        if recache and 0 < ttl <= _RELATIVE_TTL_LIMIT and recache >= ttl:
            # Every value would be due for recache as soon as it is stored: fn on every call.
            raise MemcacheIllegalInputError(f"recache_ttl ({recache} s) must be below expire ({ttl} s)")
        return Command([[_LEASE_GET, k, lease, recache]], _finish_lease, key, read=True, miss=None)

    # --- writes --------------------------------------------------------------------------------

    def _store(self, op: int, key: Any, value: Any, expire: Any, noreply: bool | None, flags: int | None, cas: Any = None) -> Command:
        k = self.check_key(key)
        ttl = self._expire(expire)
        data, fl = serde_mod.encode_value(self.serde, key, value, flags=flags, encoding=self.encoding)
        o: list[Any] = [op, k, data, fl, ttl]
        if op == _CAS:
            o.append(check_cas(cas))
        nr = self.default_noreply if noreply is None else bool(noreply)
        if len(k) + len(data) + FRAME_SLACK > self.max_frame_bytes and not self._fits_frame(o):
            # memcached's text protocol answers "SERVER_ERROR object too large for cache"; for a
            # set it also unlinks the key's old item, so a failed write never leaves stale data
            # readable (Django's cache relies on it). With noreply the error is not sent.
            message = self._too_large(k, data)
            if op == _SET:
                return Command([[_DELETE, k]], _finish_deleted_too_large, extra=message, noreply=nr)
            if nr:
                return Command([], _finish_nothing, noreply=True)
            raise MemcacheServerError(message)
        return Command([o], _finish_store, noreply=nr)

    def _set_many(self, values: dict[Any, Any], expire: Any, noreply: bool | None, flags: int | None) -> Command:
        ttl = self._expire(expire)
        keys = list(values)
        ops = []
        too_large: dict[int, str] = {}
        for n, key in enumerate(keys):
            data, fl = serde_mod.encode_value(self.serde, key, values[key], flags=flags, encoding=self.encoding)
            k = self.check_key(key)
            op: list[Any] = [_SET, k, data, fl, ttl]
            if not self._fits_frame(op):
                # As memcached does for each too-large set of a batch: the key's old item goes.
                too_large[n] = self._too_large(k, data)
                op = [_DELETE, k]
            ops.append(op)
        return Command(ops, _finish_set_many, keys, extra=too_large, noreply=self._noreply(noreply), noreply_value=[])

    def _delete(self, key: Any, noreply: bool | None) -> Command:
        return Command([[_DELETE, self.check_key(key)]], _finish_found, noreply=self._noreply(noreply))

    def _delete_many(self, keys: Iterable[Any], noreply: bool | None) -> Command:
        full = check_keys(list(keys), prefix=self.key_prefix, allow_unicode_keys=self.allow_unicode_keys,
                          encoding=self.encoding)
        return Command([[_DELETE, k] for k in full], _finish_all_ok, noreply=self._noreply(noreply))

    def _arith(self, op: int, key: Any, value: Any, noreply: bool | None) -> Command:
        k = self.check_key(key)
        delta = check_int(value, "value", minimum=0, maximum=_U64)
        return Command([[op, k, delta]], _finish_arith, noreply=bool(noreply), noreply_value=None)

    def _fill(self, key: Any, step: Any, expire: Any) -> Command:
        """A lease winner's store (lease.Fill): cas against the lease's token; a plain set when
        the server keeps no cas tokens (memcached -C answers every cas 0)."""
        if step.cas:
            return self._store(_CAS, key, step.value, expire, False, None, step.cas)
        return self._store(_SET, key, step.value, expire, False, None)

    def _invalidate(self, key: Any, stale_ttl: Any, noreply: bool | None) -> Command:
        k = self.check_key(key)
        ttl = check_int(stale_ttl, "stale_ttl", minimum=1, maximum=_I32)
        return Command([[_INVALIDATE, k, ttl]], _finish_found, noreply=self._noreply(noreply))

    def _touch(self, key: Any, expire: Any, noreply: bool | None) -> Command:
        k = self.check_key(key)
        return Command([[_TOUCH, k, self._expire(expire)]], _finish_found, noreply=self._noreply(noreply))

    # --- server-wide ---------------------------------------------------------------------------

    def _stats(self, args: tuple[Any, ...]) -> Command:
        raw_args = [a if isinstance(a, bytes) else str(a).encode(self.encoding) for a in args]
        return Command([[int(Op.STATS), raw_args]], _finish_single, extra=_stats_result, read=True, miss={})

    def _version(self) -> Command:
        return Command([[int(Op.VERSION)]], _finish_single, extra=_version_result)

    def _flush_all(self, delay: Any, noreply: bool | None) -> Command:
        d = check_int(delay, "delay", minimum=0, maximum=_U32)
        return Command([[int(Op.FLUSH_ALL), d]], _finish_single, extra=_true_result, noreply=self._noreply(noreply))

    def _cache_memlimit(self, memlimit: Any) -> Command:
        m = check_int(memlimit, "memlimit", minimum=0, maximum=_U32)
        return Command([[int(Op.CACHE_MEMLIMIT), m]], _finish_single, extra=_true_result)

    def _broker_ping(self) -> Command:
        return Command([[int(Op.PING)]], _finish_single, extra=_as_is)

    def _broker_stats(self) -> Command:
        return Command([[int(Op.BROKER_STATS)]], _finish_single, extra=_as_is)
