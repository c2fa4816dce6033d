"""The msgpack frames that clientlib and the broker exchange over ZeroMQ (schema version 1).

One ZeroMQ message is one msgpack array. Every frame names the schema version first, so a mixed
deployment fails with a clear error instead of misreading fields.

Request (worker -> broker)::

    [1, req_id, timeout_ms, flags, ops]

    req_id      uint64 chosen by the worker; echoed in the reply. Unique per socket while pending.
    timeout_ms  the call's deadline, relative, in ms (0: the broker's default). The broker answers
                TIMEOUT at the deadline, so a worker never waits past its own timeout for memcached.
    flags       bit 0 NOREPLY: the broker sends no reply at all (pymemcache's noreply).
    ops         array of 1..MAX_OPS operations; a get_many of 100 keys is one frame of 100 GETs,
                or one GET_MANY op carrying the 100 keys.

Operations (keys and values are msgpack bin; the worker applies prefixes and checks keys)::

    [GET, key]  [GETS, key]  [GAT, key, ttl]  [GATS, key, ttl]
    [GET_MANY, [key, ...]]   (1..MAX_OPS keys; the frame's only op; answered as that many GETs)
    [LEASE_GET, key, lease_ttl, recache_ttl]   (herd-safe read: `mg` with N and R, never coalesced)
    [SET|ADD|REPLACE|APPEND|PREPEND, key, value, client_flags, ttl]
    [CAS, key, value, client_flags, ttl, cas]
    [DELETE, key]  [INCR|DECR, key, delta]  [TOUCH, key, ttl]  [INVALIDATE, key, stale_ttl]
    [VERSION]  [STATS, [arg, ...]]  [FLUSH_ALL, delay]  [CACHE_MEMLIMIT, megabytes]
    [PING]  [BROKER_STATS]

Reply (broker -> worker)::

    [1, req_id, Code.OK, results]      one result per op, in order
    [1, req_id, code, message]         the whole frame failed (BAD_REQUEST, OVERLOADED, ...)

A GET_MANY frame is answered as the frame of one GET per key would be, one result per key in
order, but for one shape: a hit whose client_flags are 0 is its value alone (bin), not
``[OK, value, 0]``. It exists for speed alone: 100 keys in one array cost the worker a third and
the broker half of what 100 two-element ops cost to pack and check, and a run of bare values
costs both sides a fraction of what as many three-element arrays do (no array built, packed or
unpacked per hit). A broker older than it refuses it as an unknown op (BAD_REQUEST), and
clientlib then sends one GET per key (whose replies carry no bare values).

Results (``[code, *payload]``)::

    GET/GAT hit        [OK, value, client_flags]
    GET_MANY key hit   value (bin) when client_flags is 0; else [OK, value, client_flags]
    GETS/GATS hit      [OK, value, client_flags, cas]
    LEASE_GET hit      [OK, value, client_flags, cas, lease]  lease: LEASE_WON | LEASE_STALE | LEASE_TAKEN bits
    miss               [MISS]
    store ops          [OK] | [NOT_STORED] | [EXISTS] | [NOT_FOUND]
    DELETE, TOUCH, INVALIDATE  [OK] | [NOT_FOUND]
    INCR/DECR          [OK, new_value] | [NOT_FOUND]
    VERSION            [OK, {server: version}]
    STATS              [OK, {server: {name: value}}]
    FLUSH_ALL, CACHE_MEMLIMIT  [OK, {server: true}]
    PING               [OK, "PONG"]
    BROKER_STATS       [OK, {name: value}]
    any failure        [code >= SERVER_ERROR, message]

Decoding uses msgpack's Unpacker limits, so a hostile frame costs at most its own size, and every
malformed frame raises `WireError` (with the request id when it could be read), never another
exception.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]

VERSION = 1
NOREPLY = 1
MAX_OPS = 100_000
MAX_KEY_LEN = 250
DEFAULT_MAX_FRAME = 4 << 20
_U64 = (1 << 64) - 1


class Op(enum.IntEnum):
    GET = 1
    GETS = 2
    GAT = 3
    GATS = 4
    LEASE_GET = 5
    GET_MANY = 6
    SET = 10
    ADD = 11
    REPLACE = 12
    APPEND = 13
    PREPEND = 14
    CAS = 15
    DELETE = 20
    INCR = 21
    DECR = 22
    TOUCH = 23
    INVALIDATE = 24
    VERSION = 30
    STATS = 31
    FLUSH_ALL = 32
    CACHE_MEMLIMIT = 33
    PING = 40
    BROKER_STATS = 41


class Code(enum.IntEnum):
    OK = 0
    MISS = 1
    NOT_STORED = 2
    EXISTS = 3
    NOT_FOUND = 4
    # failures: every one carries a message
    SERVER_ERROR = 16  # memcached's SERVER_ERROR, for this request alone
    CLIENT_ERROR = 17  # the request is invalid (bad key, too large) or memcached said CLIENT_ERROR
    UNKNOWN_COMMAND = 18  # memcached said ERROR
    CONNECTION_ERROR = 19  # the connection carrying the request failed or lost sync
    TIMEOUT = 20  # no answer from memcached before the deadline
    OVERLOADED = 21  # a broker bound was hit; nothing was sent
    SERVER_DOWN = 22  # the server is marked down; nothing was sent
    BAD_REQUEST = 23  # the frame or an op is malformed
    UNSUPPORTED_VERSION = 24
    SHUTTING_DOWN = 25


FIRST_ERROR = Code.SERVER_ERROR

# A LEASE_GET hit's lease bits: memcached's meta flags W (this caller won the right to compute the
# value: it was missing, stale or due for recache), X (the value is stale), Z (another caller won
# already and is computing). protocol.txt, "Meta Get": N, R, W, X, Z.
LEASE_WON = 1
LEASE_STALE = 2
LEASE_TAKEN = 4

# Argument types after the opcode, per op. bool is not int here: msgpack never yields bools for
# ints, and a worker sending True for a TTL is a bug worth reporting.
_ARGS: dict[int, tuple[type, ...]] = {
    Op.GET: (bytes,),
    Op.GETS: (bytes,),
    Op.GAT: (bytes, int),
    Op.GATS: (bytes, int),
    Op.SET: (bytes, bytes, int, int),
    Op.ADD: (bytes, bytes, int, int),
    Op.REPLACE: (bytes, bytes, int, int),
    Op.APPEND: (bytes, bytes, int, int),
    Op.PREPEND: (bytes, bytes, int, int),
    Op.CAS: (bytes, bytes, int, int, int),
    Op.DELETE: (bytes,),
    Op.INCR: (bytes, int),
    Op.DECR: (bytes, int),
    Op.TOUCH: (bytes, int),
    Op.LEASE_GET: (bytes, int, int),
    Op.GET_MANY: (list,),
    Op.INVALIDATE: (bytes, int),
    Op.VERSION: (),
    Op.STATS: (list,),
    Op.FLUSH_ALL: (int,),
    Op.CACHE_MEMLIMIT: (int,),
    Op.PING: (),
    Op.BROKER_STATS: (),
}
_GET = int(Op.GET)
_GET_MANY = int(Op.GET_MANY)
KEYED_OPS = frozenset(op for op, args in _ARGS.items() if args[:1] == (bytes,))
STORE_OPS = frozenset({Op.SET, Op.ADD, Op.REPLACE, Op.APPEND, Op.PREPEND, Op.CAS})


class WireError(ValueError):
    """A frame that does not follow this schema. `req_id` is set when it could be read."""

    def __init__(self, code: Code, message: str, req_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.req_id = req_id


class RequestFrame(NamedTuple):
    # A NamedTuple rather than a frozen dataclass: as immutable, and built in a third of the time
    # (the broker builds one per frame).
    req_id: int
    timeout_ms: int
    flags: int
    ops: list[list[Any]]
    # The keys, when the frame is one GET_MANY op, or holds two or more ops and every one is a
    # plain get (a get_many either way): checked as a whole by decode_request (1..MAX_KEY_LEN bytes
    # each), so the broker's get_many path need not look at each op.
    gets: list[bytes] | None = None

    @property
    def many(self) -> bool:
        """The frame is one GET_MANY op: its reply carries one result per key of `gets`."""
        return len(self.ops) == 1 and self.gets is not None

    def results_wanted(self) -> int:
        """How many results the reply carries: one per op, one per key of a GET_MANY."""
        return len(self.gets) if self.many else len(self.ops)  # type: ignore[arg-type]

    def each_op(self) -> list[list[Any]]:
        """The ops one by one, a GET_MANY as one GET per key (what its reply answers)."""
        if self.many:
            return [[_GET, key] for key in self.gets]  # type: ignore[union-attr]
        return self.ops

    @property
    def noreply(self) -> bool:
        return bool(self.flags & NOREPLY)


def encode_request(req_id: int, ops: list[list[Any]], timeout_ms: int = 0, flags: int = 0) -> bytes:
    return msgpack.packb([VERSION, req_id, timeout_ms, flags, ops], use_bin_type=True)


def encode_reply(req_id: int, results: list[list[Any]]) -> bytes:
    # The module's Packer (below): no Packer built per reply.
    return _pack([VERSION, req_id, _OK, results])


def encode_error(req_id: int, code: Code, message: str) -> bytes:
    return msgpack.packb([VERSION, req_id, int(code), message], use_bin_type=True)


def _no_map(_: Any) -> Any:
    # No request holds a map, and an empty one (all that max_map_len=0 lets through) is a 64-byte
    # dict for one byte of frame: in a large frame, refused where msgpack makes it, before it
    # makes the next. (A small frame's cost is bounded by its size; its errors name the field.)
    raise ValueError("a map (no request holds one)")


def _unpack(data: bytes, max_bytes: int, max_array: int, max_map: int, object_hook: Any = None) -> Any:
    if len(data) > max_bytes:
        raise WireError(Code.BAD_REQUEST, f"frame of {len(data)} bytes exceeds the {max_bytes} limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
            object_hook=object_hook,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, FormatError...)
        raise WireError(Code.BAD_REQUEST, f"undecodable frame: {type(exc).__name__}: {exc}") from None


# A frame this small decodes in one call: its declared array lengths are capped at SMALL_ARRAYS,
# so what it can make msgpack allocate stays within a fixed multiple of its size. The cap holds
# the most one-byte keys (3 bytes each in msgpack) a GET_MANY can carry in SMALL_FRAME bytes.
SMALL_FRAME = 256
SMALL_ARRAYS = 96
# No op has more elements than this (CAS has 6; STATS' argument list is short), but for the key
# array of a GET_MANY, read key by key.
OP_ARRAYS = 16
_GET_MANY_HEAD = b"\x92\x06"  # msgpack's shortest form of a GET_MANY op's start: [6, ...


def _unpack_request(data: bytes, max_frame: int, max_ops: int) -> Any:
    """msgpack decoding of a request whose cost is bounded by the frame's size, whatever its shape.

    msgpack allocates each array as its header declares, before reading any element: one call over
    a whole 5 KB frame of nested headers declaring 100,000 elements each costs 100+ ms. So the
    frame is read op by op, each op under a tight array limit; only the ops array may be long, and
    no longer than max_ops or the frame's own size (a GET_MANY's key array in one call when nothing
    after its header can start another array: see _read_keys). Anything irregular is decoded
    again in one call with tight limits, for its error message."""
    n = len(data)
    if n <= SMALL_FRAME:
        obj = _unpack(data, max_frame, SMALL_ARRAYS, 0)
        if type(obj) is list and len(obj) == 5 and type(obj[4]) is list and len(obj[4]) > max_ops:
            raise WireError(Code.BAD_REQUEST, f"frame of {len(obj[4])} ops exceeds the {max_ops} limit")
        return obj
    unpacker = msgpack.Unpacker(
        raw=False, use_list=True, strict_map_key=True, max_buffer_size=n, max_bin_len=max_frame,
        max_str_len=max_frame, max_array_len=OP_ARRAYS, max_map_len=0, max_ext_len=0, object_hook=_no_map,
    )
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() == 5:
            head = [unpacker.unpack() for _ in range(4)]
            count = unpacker.read_array_header()
            if count > max_ops or count > n:
                raise WireError(Code.BAD_REQUEST, f"frame of {count} ops exceeds the {max_ops} limit")
            if count == 1:
                # One op: read its header and code first, for a GET_MANY's key array is the one
                # long array, read key by key under the same limits as the ops array.
                size = unpacker.read_array_header()  # (which does not apply max_array_len)
                if size > OP_ARRAYS:
                    raise ValueError(f"{size} exceeds max_array_len({OP_ARRAYS})")  # decoded again below
                code = unpacker.unpack() if size else None
                if size == 2 and type(code) is int and code == _GET_MANY:
                    return [*head, [[_GET_MANY, _read_keys(unpacker, data, max_ops, n)]]]
                ops = [[code, *(unpacker.unpack() for _ in range(size - 1))] if size else []]
            else:
                ops = list(itertools.islice(unpacker, count))
            if len(ops) == count:
                try:
                    unpacker.unpack()
                except msgpack.OutOfData:
                    return [*head, ops]
    except WireError:
        raise
    except Exception:  # noqa: BLE001 - msgpack's zoo of errors: decoded again below for the message
        pass
    try:
        return _unpack(data, max_frame, OP_ARRAYS, 0, _no_map)
    except WireError as exc:
        if "max_array_len" in str(exc) and _GET_MANY_HEAD in data:
            # The likeliest long array in a frame that is not one GET_MANY op: a GET_MANY among others.
            exc.args = (f"{exc} (a GET_MANY op must be its frame's only op)",)
        raise


# msgpack's array headers (fixarray, array 16, array 32). Maps need no look: one past max_map_len
# (0 here) is refused before msgpack allocates it, and an empty one by _no_map as it is made.
_ARRAY_HEADERS = bytes([*range(0x90, 0xA0), 0xDC, 0xDD])


def _read_keys(unpacker: Any, data: bytes, max_ops: int, n: int) -> list[Any]:
    """A GET_MANY's key array, the last thing in its frame `data`, from `unpacker` (positioned at
    it); WireError for anything else.

    When no byte after the array's own header could start another array, the array is the only
    one msgpack can allocate, so it is decoded in one call (100 keys: 4.3 us against 7.4 key by
    key, in-process). Otherwise (a nested array, or only a key's length or a UTF-8 key's byte that looks
    like a header) it is read key by key under the unpacker's limits."""
    start = unpacker.tell()
    try:
        size = unpacker.read_array_header()
    except Exception as exc:  # noqa: BLE001 - not an array: the op check names it
        raise WireError(Code.BAD_REQUEST, f"op GET_MANY: expected list, got {type(exc).__name__}") from None
    if size > max_ops or size > n:
        raise WireError(Code.BAD_REQUEST, f"op GET_MANY takes 1..{max_ops} keys, got {size}")
    head = unpacker.tell()
    # The array headers of the whole frame less those before the keys (no copy of the keys' bytes).
    headers = n - len(data.translate(None, _ARRAY_HEADERS))
    if headers == head - len(data[:head].translate(None, _ARRAY_HEADERS)):
        try:
            keys = _unpackb(
                memoryview(data)[start:], raw=False, use_list=True, max_bin_len=n, max_str_len=n,
                max_array_len=size, max_map_len=0, max_ext_len=0, object_hook=_no_map,
            )
        except Exception:  # noqa: BLE001 - read again key by key below, for the error message
            pass
        else:
            return keys
    try:
        keys = list(itertools.islice(unpacker, size))
    except Exception as exc:  # noqa: BLE001 - msgpack's zoo again
        raise WireError(Code.BAD_REQUEST, f"undecodable GET_MANY key: {type(exc).__name__}: {exc}") from None
    if len(keys) != size:
        raise WireError(Code.BAD_REQUEST, f"undecodable frame: GET_MANY declares {size} keys and holds {len(keys)}")
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return keys
    raise WireError(Code.BAD_REQUEST, "undecodable frame: bytes after its GET_MANY op")


def _show(value: Any) -> str:
    """A value from an untrusted frame, for an error message: short, and never a recursive repr
    (a list nested 1,000 deep passes msgpack's limits but makes repr() raise RecursionError)."""
    if value is None or type(value) in (int, float, bool):
        return repr(value)
    if type(value) in (str, bytes):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return type(value).__name__


def _peek_req_id(data: bytes) -> int | None:
    """The request id of a frame too large to decode, read from its first bytes alone."""
    try:
        unpacker = msgpack.Unpacker(
            max_buffer_size=64, max_bin_len=16, max_str_len=16, max_array_len=16, max_map_len=0, max_ext_len=0
        )
        unpacker.feed(data[:32])
        if unpacker.read_array_header() < 2:
            return None
        unpacker.skip()
        rid = unpacker.unpack()
    except Exception:
        return None
    return rid if type(rid) is int and 0 <= rid <= _U64 else None


def _header(obj: Any, kind: str) -> int:
    if type(obj) is not list or len(obj) < 2:
        raise WireError(Code.BAD_REQUEST, f"{kind} frame must be an array [version, req_id, ...]")
    req_id = obj[1]
    rid = req_id if type(req_id) is int and 0 <= req_id <= _U64 else None
    if obj[0] != VERSION or type(obj[0]) is not int:
        raise WireError(Code.UNSUPPORTED_VERSION, f"unsupported wire version {_show(obj[0])}; this side speaks {VERSION}", rid)
    if rid is None:
        raise WireError(Code.BAD_REQUEST, "request id must be an unsigned 64-bit integer")
    return rid


def check_op(op: Any) -> None:
    """Raise WireError unless `op` is one operation of this schema (argument count and types)."""
    if type(op) is not list or not op:
        raise WireError(Code.BAD_REQUEST, "each op must be a non-empty array")
    spec = _ARGS.get(op[0]) if type(op[0]) is int else None
    if spec is None:
        raise WireError(Code.BAD_REQUEST, f"unknown op {_show(op[0])}")
    if len(op) != len(spec) + 1:
        raise WireError(Code.BAD_REQUEST, f"op {Op(op[0]).name} takes {len(spec)} arguments, got {len(op) - 1}")
    for arg, typ in zip(op[1:], spec):
        if type(arg) is not typ:
            raise WireError(Code.BAD_REQUEST, f"op {Op(op[0]).name}: expected {typ.__name__}, got {type(arg).__name__}")
    if spec and spec[0] is bytes and not 0 < len(op[1]) <= MAX_KEY_LEN:
        raise WireError(Code.BAD_REQUEST, f"op {Op(op[0]).name}: key must have 1..{MAX_KEY_LEN} bytes")
    if op[0] == Op.STATS and any(type(a) is not bytes for a in op[1]):
        raise WireError(Code.BAD_REQUEST, "stats arguments must be bytes")
    if op[0] == Op.GET_MANY:
        _check_keys(op[1])


_BYTES_ONLY = {bytes}
_KEY_SIZES = bytes(range(1, MAX_KEY_LEN + 1))


def _check_keys(keys: list[Any], max_ops: int = MAX_OPS) -> None:
    """Raise WireError unless `keys` (a GET_MANY's) is 1..max_ops keys of 1..MAX_KEY_LEN bytes each."""
    if not 0 < len(keys) <= max_ops:
        raise WireError(Code.BAD_REQUEST, f"op GET_MANY takes 1..{max_ops} keys, got {len(keys)}")
    # C-level passes over the lot: the point of the op is not to look at each key in Python.
    if set(map(type, keys)) != _BYTES_ONLY:
        bad = next(k for k in keys if type(k) is not bytes)
        raise WireError(Code.BAD_REQUEST, f"op GET_MANY: expected bytes keys, got {type(bad).__name__}")
    sizes = list(map(len, keys))
    if min(sizes) == 0 or max(sizes) > MAX_KEY_LEN:
        raise WireError(Code.BAD_REQUEST, f"op GET_MANY: key must have 1..{MAX_KEY_LEN} bytes")


def _check_decoded_keys(keys: list[Any], max_ops: int) -> None:
    """_check_keys for keys as msgpack decoded them, whose only bytes-like type is bytes: the
    common case in two C-level passes instead of four (the four took half of a 100-key GET_MANY's
    decoding). The sizes, as bytes, refuse a key over 255 bytes and anything without a size, and
    the translate keeps any size outside 1..MAX_KEY_LEN; then the join refuses anything but bytes."""
    try:
        # The sizes first: the join sets aside 80 bytes per item before it looks at any, so it
        # must only see items of at least 2 bytes of frame each (then 40 bytes per byte at most).
        if 0 < len(keys) <= max_ops and not bytes(map(len, keys)).translate(None, _KEY_SIZES):
            b"".join(keys)
            return
    except (TypeError, ValueError):
        pass
    _check_keys(keys, max_ops)  # for the error


def decode_request(data: bytes, max_frame: int = DEFAULT_MAX_FRAME, max_ops: int = MAX_OPS) -> RequestFrame:
    if len(data) > max_frame:
        # Answerable: the id sits in the first bytes, so the sender gets a clear error, not a timeout.
        message = f"frame of {len(data)} bytes exceeds the {max_frame} limit"
        raise WireError(Code.BAD_REQUEST, message, _peek_req_id(data))
    try:
        obj = _unpack_request(data, max_frame, max_ops)
    except WireError as exc:
        # Too many ops, trailing bytes, a hostile nesting: still answer the sender when we can.
        exc.req_id = _peek_req_id(data)
        raise
    rid = _header(obj, "request")
    if len(obj) != 5:
        raise WireError(Code.BAD_REQUEST, "request frame must be [version, req_id, timeout_ms, flags, ops]", rid)
    _, _, timeout_ms, flags, ops = obj
    if type(timeout_ms) is not int or not 0 <= timeout_ms <= 86_400_000:
        raise WireError(Code.BAD_REQUEST, "timeout_ms must be an integer in 0..86400000", rid)
    if type(flags) is not int or flags & ~NOREPLY or flags < 0:
        raise WireError(Code.BAD_REQUEST, f"unknown request flags {_show(flags)}", rid)
    if type(ops) is not list or not ops:
        raise WireError(Code.BAD_REQUEST, "ops must be a non-empty array", rid)
    if len(ops) == 1:
        op = ops[0]
        if type(op) is list and len(op) == 2 and type(op[0]) is int and op[0] == _GET_MANY and type(op[1]) is list:
            try:
                _check_decoded_keys(op[1], max_ops)  # the small frame's path read them without that bound
            except WireError as exc:
                exc.req_id = rid
                raise
            return RequestFrame(rid, timeout_ms, flags, ops, op[1])
    gets: list[bytes] | None = [] if len(ops) > 1 else None
    try:
        for op in ops:
            # The common op, checked inline (a get_many of 100 keys is 100 of these), its key
            # collected while every op is one.
            if type(op) is list and len(op) == 2 and type(op[0]) is int and op[0] == 1:
                key = op[1]
                if type(key) is bytes and 0 < len(key) <= MAX_KEY_LEN:
                    if gets is not None:
                        gets.append(key)
                    continue
            check_op(op)
            if op[0] == _GET_MANY:
                raise WireError(Code.BAD_REQUEST, "op GET_MANY must be its frame's only op")
            gets = None
    except WireError as exc:
        exc.req_id = rid
        raise
    return RequestFrame(rid, timeout_ms, flags, ops, gets)


@dataclass(frozen=True, slots=True)
class ReplyFrame:
    req_id: int
    code: Code
    payload: Any  # results (list) when code is OK, else the error message


# --- the worker's hot path ----------------------------------------------------------------------
# The same bytes as encode_request and the same acceptance as decode_reply (tests/unit/test_wire.py
# checks both with hypothesis), without the per-call costs that matter at a few microseconds per
# call: no Packer built per frame, no enum or dataclass per reply.

# One Packer for the process. Packer.pack is C code that runs no Python code for these types
# (exact ints, bytes, str, lists, dicts), so it never lets another thread in mid-frame; it resets
# its buffer after each frame, also when packing fails.
_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb
_REPLY_MAX = 1 << 30
_CODES = frozenset(int(c) for c in Code)
_OK = int(Code.OK)


def pack_request(req_id: int, ops: list[list[Any]], timeout_ms: int = 0, flags: int = 0) -> bytes:
    """encode_request's bytes, faster."""
    return _pack([VERSION, req_id, timeout_ms, flags, ops])


def unpack_reply(data: bytes) -> tuple[int, int, Any]:
    """decode_reply for the worker's hot path: (req_id, code as a plain int, payload).

    Accepts exactly the frames decode_reply accepts and raises WireError (with the request id when
    it could be read) for every other, like decode_reply."""
    try:
        obj = _unpackb(
            data, raw=False, use_list=True, strict_map_key=True, max_bin_len=_REPLY_MAX,
            max_str_len=_REPLY_MAX, max_array_len=MAX_OPS, max_map_len=1 << 20, max_ext_len=0,
        )
    except Exception:
        return _reply_frame(decode_reply(data))  # raises its WireError
    if type(obj) is list and len(obj) == 4:
        rid, code, payload = obj[1], obj[2], obj[3]
        if (
            obj[0] == VERSION and type(obj[0]) is int and type(rid) is int and 0 <= rid <= _U64
            and type(code) is int
        ):
            if code == _OK:
                if type(payload) is list:
                    if len(payload) > 8 and list(map(type, payload)).count(bytes) == len(payload):
                        return rid, code, payload  # a GET_MANY's hits, every one bare: checked in C
                    for r in payload:
                        if type(r) is not list:
                            if type(r) is bytes:
                                continue  # a GET_MANY's hit with client flags 0
                            break
                        if not r or type(r[0]) is not int:
                            break
                    else:
                        return rid, code, payload
            elif code in _CODES and type(payload) is str:
                return rid, code, payload
    return _reply_frame(decode_reply(data))  # the rare malformed frame: decode_reply says why


def _reply_frame(frame: ReplyFrame) -> tuple[int, int, Any]:
    return frame.req_id, int(frame.code), frame.payload


def decode_reply(data: bytes, max_frame: int = 1 << 30) -> ReplyFrame:
    obj = _unpack(data, max_frame, MAX_OPS, 1 << 20)
    rid = _header(obj, "reply")
    if len(obj) != 4 or type(obj[2]) is not int:
        raise WireError(Code.BAD_REQUEST, "reply frame must be [version, req_id, code, payload]", rid)
    try:
        code = Code(obj[2])
    except ValueError:
        raise WireError(Code.BAD_REQUEST, f"unknown reply code {obj[2]}", rid) from None
    payload = obj[3]
    if code is Code.OK:
        if type(payload) is not list or any(
            type(r) is not bytes and (type(r) is not list or not r or type(r[0]) is not int) for r in payload
        ):
            raise WireError(Code.BAD_REQUEST, "reply results must be an array of [code, ...] or bare values", rid)
    elif type(payload) is not str:
        raise WireError(Code.BAD_REQUEST, "error reply must carry a message", rid)
    return ReplyFrame(rid, code, payload)
