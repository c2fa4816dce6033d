"""Pure translation between the worker's wire ops and memcached's meta requests and responses.

No routing, no sockets, no state: `encode_op` turns one wire op into the bytes of its meta request
(raising `meta.RequestError` before producing any), and `meta_result` / `text_result` turn one
parsed response into the wire result the worker reads (see clientlib/wire.py for both shapes).
"""

from __future__ import annotations

from typing import Any

from clientlib.limits import TOO_LARGE
from clientlib.wire import LEASE_STALE, LEASE_TAKEN, LEASE_WON, Code, Op

from . import meta
from .meta import ArithMode, Response, SetMode, Status

_SET_MODES: dict[int, SetMode] = {
    Op.SET: SetMode.SET,
    Op.ADD: SetMode.ADD,
    Op.REPLACE: SetMode.REPLACE,
    Op.APPEND: SetMode.APPEND,
    Op.PREPEND: SetMode.PREPEND,
    Op.CAS: SetMode.SET,
}

# Which memcached answers are a value (not an error) for each kind of op; anything else is
# SERVER_ERROR "unexpected X reply to Y", which keeps the stream in step (it was one response).
OK = [Code.OK]
MISS = [Code.MISS]
_NOT_STORED = [Code.NOT_STORED]
_EXISTS = [Code.EXISTS]
NOT_FOUND = [Code.NOT_FOUND]
# protocol.txt: ms answers HD / NS / EX / NF and md HD / NF / EX, but EX and NF only come with a
# cas (`C`) compare: without one (every store but cas, every delete the broker sends) memcached
# 1.6.18 answers a store HD or NS (add of a present key, replace/append/prepend of a missing one)
# and a delete HD or NF. Anything else is not that request's answer.
_STORE_RESULTS = {
    Status.OK: OK,
    Status.NOT_STORED: _NOT_STORED,
}
_CAS_RESULTS = {
    Status.OK: OK,
    Status.NOT_STORED: _NOT_STORED,
    Status.EXISTS: _EXISTS,
    Status.NOT_FOUND: NOT_FOUND,
}
_DELETE_RESULTS = {
    Status.OK: OK,
    Status.NOT_FOUND: NOT_FOUND,
}

# Text commands: which statuses answer them.
TEXT_EXPECT = {
    Op.VERSION: frozenset({Status.VERSION}),
    Op.STATS: frozenset({Status.STATS, Status.RESET, Status.TEXT_OK}),
    Op.FLUSH_ALL: frozenset({Status.TEXT_OK}),
    Op.CACHE_MEMLIMIT: frozenset({Status.TEXT_OK}),
}
BROADCAST = frozenset(TEXT_EXPECT)

# Ops whose meta request carries a data block (`ms`): a CLIENT_ERROR to one of them may have left
# memcached reading our data as commands, so the stream can no longer be trusted.
DATA_OPS = frozenset({Op.SET, Op.ADD, Op.REPLACE, Op.APPEND, Op.PREPEND, Op.CAS})

# A set whose value cannot fit the server's item size limit is sent as `md`: memcached would
# refuse the value and unlink the key; this does the unlink without shipping the value, and the
# worker reads memcached's own SERVER_ERROR "object too large for cache".
UNLINK_TOO_LARGE = 1000


def op_name(op: int) -> str:
    return "SET (too large)" if op == UNLINK_TOO_LARGE else Op(op).name


def encode_op(code: int, op: list[Any], opaque: int) -> bytes:
    """The meta request for one keyed wire op, with opaque token `opaque`."""
    key = op[1]
    if code == Op.GET:
        return meta.encode_get(key, opaque)
    if code == Op.SET:
        return meta.encode_set(key, op[2], opaque, op[3], op[4])
    if code == Op.GETS:
        return meta.encode_get(key, opaque, cas=True)
    if code == Op.GAT:
        return meta.encode(meta.Get(key, opaque, size=True, touch=op[2]))
    if code == Op.GATS:
        return meta.encode(meta.Get(key, opaque, cas=True, size=True, touch=op[2]))
    if code == Op.LEASE_GET:
        # N: a miss creates an empty item and wins its caller the right to fill it (W); R: a hit
        # due to expire within recache_ttl seconds wins one caller the right to refresh it.
        return meta.encode(meta.Get(key, opaque, cas=True, size=True, vivify=op[2], recache=op[3] or None))
    if code <= Op.CAS:
        return meta.encode(meta.Set(
            key, op[2], opaque, mode=_SET_MODES[code], client_flags=op[3], ttl=op[4],
            cas=op[5] if code == Op.CAS else None,
        ))
    if code == Op.DELETE:
        return meta.encode(meta.Delete(key, opaque))
    if code == Op.INCR:
        return meta.encode(meta.Arith(key, opaque, delta=op[2]))
    if code == Op.DECR:
        return meta.encode(meta.Arith(key, opaque, mode=ArithMode.DECR, delta=op[2]))
    if code == Op.TOUCH:
        return meta.encode(meta.Get(key, opaque, value=False, client_flags=False, touch=op[2]))
    if code == Op.INVALIDATE:
        return meta.encode(meta.Delete(key, opaque, invalidate=True, ttl=op[2]))
    raise meta.RequestError(f"op {code} has no meta request")


def encode_text(code: int, op: list[Any]) -> bytes:
    """The text command for a broadcast op (version, stats, flush_all, cache_memlimit)."""
    if code == Op.VERSION:
        return meta.encode(meta.Version())
    if code == Op.STATS:
        return meta.encode(meta.Stats(tuple(op[1])))
    if code == Op.FLUSH_ALL:
        return meta.encode(meta.FlushAll(op[1] or None))
    return meta.encode(meta.CacheMemlimit(op[1]))


def too_large(size: int, limit: int) -> list[Any]:
    """memcached's own answer to a value that does not fit its item size limit."""
    return [Code.SERVER_ERROR, f"SERVER_ERROR {TOO_LARGE} (a {size}-byte value does not fit the {limit}-byte item limit)"]


def meta_result(op: int, status: Status, value: bytes | None, flags: dict[str, bytes]) -> list[Any]:
    """The wire result of `op` answered by a meta response. Raises ValueError on unusable
    content (flags that are not numbers), which the pipeline treats as a broken stream."""
    if op == UNLINK_TOO_LARGE:
        if status is Status.OK or status is Status.NOT_FOUND:
            return [Code.SERVER_ERROR, f"SERVER_ERROR {TOO_LARGE}"]
        raise ValueError(f"unexpected {status.name} reply to {op_name(op)}")
    if op <= Op.GATS:
        if status is Status.VALUE:
            # Every flag the broker asked for must be there: a default in place of a missing one
            # would hand the worker client flags (its serializer's tag) or a cas never given.
            f = flags.get("f")
            size = flags.get("s")
            if f is None or not f.isdigit() or size is None or size != b"%d" % len(value or b""):
                raise ValueError(f"hit without the asked-for flags or with a size that disagrees: {flags!r}")
            if "Z" in flags and not value and f == b"0" and "X" not in flags:
                # The empty item memcached vivified for a get_or_set lease (Z: its win is out) is a
                # value being computed, not a value: a plain read of it is a miss.
                return MISS
            if op == Op.GET or op == Op.GAT:
                return [Code.OK, value, int(f)]
            c = flags.get("c")
            if c is None or not c.isdigit():
                raise ValueError(f"hit without cas: {flags!r}")
            return [Code.OK, value, int(f), int(c)]
        if status is Status.MISS:
            return MISS
    elif op == Op.LEASE_GET:
        if status is Status.VALUE:
            f = flags.get("f")
            size = flags.get("s")
            c = flags.get("c")
            if (
                f is None or not f.isdigit() or size is None or size != b"%d" % len(value or b"")
                or c is None or not c.isdigit()
            ):
                raise ValueError(f"hit without the asked-for flags or with a size that disagrees: {flags!r}")
            lease = (LEASE_WON if "W" in flags else 0) | (LEASE_STALE if "X" in flags else 0) | (
                LEASE_TAKEN if "Z" in flags else 0
            )
            return [Code.OK, value, int(f), int(c), lease]
        if status is Status.MISS:
            return MISS
    elif op <= Op.CAS:
        r = (_CAS_RESULTS if op == Op.CAS else _STORE_RESULTS).get(status)
        if r is not None:
            return r
    elif op == Op.DELETE:
        r = _DELETE_RESULTS.get(status)
        if r is not None:
            return r
    elif op <= Op.DECR:
        if status is Status.VALUE and value is not None and value.isdigit():
            return [Code.OK, int(value)]
        if status is Status.NOT_FOUND:
            return NOT_FOUND
    elif op == Op.TOUCH:
        if status is Status.OK:
            return OK
        if status is Status.MISS:
            return NOT_FOUND
    elif op == Op.INVALIDATE:
        r = _DELETE_RESULTS.get(status)
        if r is not None:
            return r
    return [Code.SERVER_ERROR, f"unexpected {status.name} reply to {op_name(op)}"]


def text_result(op: int, resp: Response) -> list[Any]:
    """The wire result of a text command's answer (the per-server part of a broadcast)."""
    status = resp.status
    if op == Op.VERSION:
        if status is Status.VERSION:
            return [Code.OK, resp.text.decode("ascii", "replace")]
    elif op == Op.STATS:
        if status is Status.STATS:
            return [Code.OK, resp.stats]
        if status is Status.RESET or status is Status.TEXT_OK:
            return [Code.OK, {}]
    elif status is Status.TEXT_OK:
        return [Code.OK, True]
    return [Code.SERVER_ERROR, f"unexpected {status.name} reply to {op_name(op)}"]


def error_result(resp: Response) -> list[Any]:
    """SERVER_ERROR / CLIENT_ERROR / ERROR as the wire failure of the request it answers."""
    status = resp.status
    code = Code.SERVER_ERROR if status is Status.SERVER_ERROR else (
        Code.CLIENT_ERROR if status is Status.CLIENT_ERROR else Code.UNKNOWN_COMMAND
    )
    return [code, f"{status.value} {resp.text.decode('utf-8', 'replace')}".strip()]
