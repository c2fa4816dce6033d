"""Sans-I/O codec for memcached's meta protocol (and the few text commands the broker passes through).

Bytes in, objects out: `encode(request) -> bytes`, and `ResponseParser.feed(data)` followed by
`while (r := parser.next_response()) is not None: ...`. No sockets here.

Two error types keep blame clear:
- `RequestError`: we were asked to encode something memcached would misread (bad key, bad number).
  Raised before a single byte is produced, so a pipeline is never desynchronised by our own output.
- `ProtocolError`: memcached (or whatever answered on that socket) sent bytes we cannot trust.
  The connection that produced them must be closed.

Wire tokens such as b"HD" and b"EN" appear only in this module; everything else uses `Status`.
"""

from __future__ import annotations

import binascii
import enum
import re
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Union, cast

MAX_KEY_LEN = 250
# base64 of n bytes takes 4*ceil(n/3) bytes, and memcached checks the encoded length against 250.
MAX_BINARY_KEY_LEN = 186
# memcached 1.6 limits the opaque token to 32 bytes counting its leading "O".
MAX_OPAQUE_LEN = 31
MAX_LINE_LEN = 8192
DEFAULT_MAX_VALUE_LEN = 1 << 30

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
# memcached reads TTLs and flush_all's delay into a signed 32-bit int: larger values wrap negative
# and the item is expired at once, so they are refused rather than silently lost.
_I32 = (1 << 31) - 1
# cache_memlimit outside 8..1e9 MB gets a MEMLIMIT_* line that no parser state expects.
_MEMLIMIT_MIN = 8
_MEMLIMIT_MAX = 1_000_000_000
_INT_OPAQUE_LIMIT = 10**MAX_OPAQUE_LEN

# A key can go on the wire as-is when it has 1..250 bytes, none <= 0x20 and none == 0x7F.
_BAD_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]")
_BAD_KEY_BYTES = bytes(range(0x21)) + b"\x7f"
_OPAQUE_OK = re.compile(rb"[\x21-\x7e]{1,31}\Z")


# The `stats <group>` arguments memcached 1.6 knows.
STATS_GROUPS = frozenset(
    {b"settings", b"items", b"slabs", b"sizes", b"conns", b"extstore", b"reset", b"detail", b"cachedump"}
)


class RequestError(ValueError):
    """What we were asked to send cannot be expressed safely on the wire."""


class ProtocolError(Exception):
    """The peer sent bytes that do not parse as a memcached response; the connection is unusable."""


class Status(enum.Enum):
    """Every response kind the parser produces. Names say what the token means."""

    VALUE = "VA"  # mg hit with data, ma with v
    OK = "HD"  # stored / deleted / touched / mg hit without data
    MISS = "EN"  # mg miss
    NOT_STORED = "NS"
    EXISTS = "EX"  # cas mismatch
    NOT_FOUND = "NF"
    NOOP = "MN"
    TEXT_OK = "OK"  # flush_all, verbosity, cache_memlimit
    RESET = "RESET"  # stats reset
    VERSION = "VERSION"
    STATS = "STATS"  # STAT lines up to END
    ERROR = "ERROR"  # unknown command: the stream can no longer be trusted
    CLIENT_ERROR = "CLIENT_ERROR"  # malformed request: the stream can no longer be trusted
    SERVER_ERROR = "SERVER_ERROR"  # belongs to its request alone


_META_STATUS = {
    b"VA": Status.VALUE,
    b"HD": Status.OK,
    b"EN": Status.MISS,
    b"NS": Status.NOT_STORED,
    b"EX": Status.EXISTS,
    b"NF": Status.NOT_FOUND,
    b"MN": Status.NOOP,
}
_TEXT_STATUS = {b"OK": Status.TEXT_OK, b"RESET": Status.RESET}
_ERROR_STATUS = {
    b"ERROR": Status.ERROR,
    b"CLIENT_ERROR": Status.CLIENT_ERROR,
    b"SERVER_ERROR": Status.SERVER_ERROR,
}


class SetMode(enum.Enum):
    SET = b"S"
    ADD = b"E"
    APPEND = b"A"
    PREPEND = b"P"
    REPLACE = b"R"


class ArithMode(enum.Enum):
    INCR = b"I"
    DECR = b"D"


Opaque = Union[int, bytes, None]


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Get:
    """`mg`: also touch (gat) with `touch`, and a pure touch with value=False, client_flags=False."""

    key: bytes
    opaque: Opaque = None
    value: bool = True
    client_flags: bool = True
    cas: bool = False
    size: bool = False  # `s`: the value's size again, a cross-check on the VA header
    ttl: bool = False
    return_key: bool = False
    touch: int | None = None
    vivify: int | None = None
    recache: int | None = None


@dataclass(frozen=True, slots=True)
class Set:
    """`ms`: set / add / replace / append / prepend, and cas with `cas`."""

    key: bytes
    value: bytes
    opaque: Opaque = None
    mode: SetMode = SetMode.SET
    client_flags: int = 0
    ttl: int = 0
    cas: int | None = None
    invalidate: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """`md`; with `invalidate` (I) the item is marked stale instead of removed, its TTL set to `ttl`
    (T): the next `mg` with N or R wins the right to recompute and gets the stale value (X W)."""

    key: bytes
    opaque: Opaque = None
    cas: int | None = None
    invalidate: bool = False
    ttl: int | None = None


@dataclass(frozen=True, slots=True)
class Arith:
    """`ma`: incr/decr; `initial` with `vivify` creates a missing counter."""

    key: bytes
    opaque: Opaque = None
    mode: ArithMode = ArithMode.INCR
    delta: int = 1
    value: bool = True
    initial: int | None = None
    vivify: int | None = None


@dataclass(frozen=True, slots=True)
class NoOp:
    opaque: Opaque = None


@dataclass(frozen=True, slots=True)
class Version:
    pass


@dataclass(frozen=True, slots=True)
class Stats:
    args: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class FlushAll:
    delay: int | None = None


@dataclass(frozen=True, slots=True)
class Verbosity:
    level: int


@dataclass(frozen=True, slots=True)
class CacheMemlimit:
    megabytes: int


Request = Union[Get, Set, Delete, Arith, NoOp, Version, Stats, FlushAll, Verbosity, CacheMemlimit]

# Requests whose answer carries our opaque token: the pipeline cross-checks it. Not NoOp:
# memcached 1.6.18 answers `mn O5` with a bare MN.
META_REQUESTS = (Get, Set, Delete, Arith)


def encode_key(key: bytes) -> tuple[bytes, bool]:
    """Return the key as it goes on the wire and whether it needs the `b` (base64) flag.

    Keys memcached accepts verbatim go verbatim; any other key goes base64, never rewritten
    otherwise, so two distinct keys can never become one item.
    """
    if type(key) is not bytes:
        raise RequestError(f"key must be bytes, not {type(key).__name__}")
    n = len(key)
    if 0 < n <= MAX_KEY_LEN and _BAD_KEY_BYTE.search(key) is None:
        return key, False
    if n == 0:
        raise RequestError("key must not be empty")
    if n > MAX_BINARY_KEY_LEN:
        if n > MAX_KEY_LEN:
            raise RequestError(f"key is {n} bytes; memcached allows at most {MAX_KEY_LEN}")
        raise RequestError(
            f"binary key is {n} bytes; keys with spaces, control bytes or 0x7F are sent base64 "
            f"and may have at most {MAX_BINARY_KEY_LEN} bytes"
        )
    return binascii.b2a_base64(key, newline=False), True


def _opaque(opaque: Opaque) -> bytes:
    if opaque is None:
        return b""
    if type(opaque) is int:
        # Bounded before formatting: str() of a huge int raises ValueError, not RequestError.
        if not 0 <= opaque < _INT_OPAQUE_LIMIT:
            raise RequestError(f"opaque must be an integer in 0..{_INT_OPAQUE_LIMIT - 1}")
        token = b"%d" % opaque
    elif type(opaque) is bytes:
        token = opaque
    else:
        raise RequestError(f"opaque must be int or bytes, not {type(opaque).__name__}")
    if _OPAQUE_OK.match(token) is None:
        raise RequestError(f"opaque must be 1..{MAX_OPAQUE_LEN} printable bytes without spaces")
    return b" O" + token


def _show(value: object) -> str:
    # repr() of an int past 4300 digits raises ValueError; an error message must not.
    if type(value) is int and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    return repr(value)[:60]


def _uint(value: object, name: str, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise RequestError(f"{name} must be an integer in 0..{limit}, got {_show(value)}")
    return value


def _ttl(value: object, name: str) -> int:
    # memcached treats a negative TTL as "already expired", as pymemcache users rely on.
    if type(value) is not int or not -(1 << 31) <= value <= _I32:
        raise RequestError(f"{name} must be an integer TTL, got {_show(value)}")
    return value


def _key_part(verb: bytes, key: bytes) -> bytes:
    wire, b64 = encode_key(key)
    return verb + wire + (b" b" if b64 else b"")


def encode(req: Request) -> bytes:
    """Encode one request. Raises RequestError, never emits partial or ambiguous bytes."""
    if type(req) is Get:
        out = _key_part(b"mg ", req.key)
        if req.value:
            out += b" v"
        if req.client_flags:
            out += b" f"
        if req.cas:
            out += b" c"
        if req.size:
            out += b" s"
        if req.ttl:
            out += b" t"
        if req.return_key:
            out += b" k"
        if req.touch is not None:
            out += b" T%d" % _ttl(req.touch, "touch")
        if req.vivify is not None:
            out += b" N%d" % _ttl(req.vivify, "vivify")
        if req.recache is not None:
            out += b" R%d" % _ttl(req.recache, "recache")
        return out + _opaque(req.opaque) + b"\r\n"
    if type(req) is Set:
        value = req.value
        if type(value) is not bytes:
            raise RequestError(f"value must be bytes, not {type(value).__name__}")
        wire, b64 = encode_key(req.key)
        # `ms <key> <datalen> <flags>*`: a `b` before the length is read as the length.
        out = b"ms " + wire + b" %d" % len(value) + (b" b" if b64 else b"")
        # Checked even when falsy: None or False must not pass as 0.
        if _uint(req.client_flags, "client flags", _U32):
            out += b" F%d" % req.client_flags
        if _ttl(req.ttl, "ttl"):
            out += b" T%d" % req.ttl
        if req.cas is not None:
            out += b" C%d" % _uint(req.cas, "cas", _U64)
        if req.invalidate:
            out += b" I"
        if type(req.mode) is not SetMode:
            raise RequestError(f"mode must be a SetMode, not {_show(req.mode)}")
        if req.mode is not SetMode.SET:
            out += b" M" + req.mode.value
        return out + _opaque(req.opaque) + b"\r\n" + value + b"\r\n"
    if type(req) is Delete:
        out = _key_part(b"md ", req.key)
        if req.cas is not None:
            out += b" C%d" % _uint(req.cas, "cas", _U64)
        if req.invalidate:
            out += b" I"
        if req.ttl is not None:
            out += b" T%d" % _ttl(req.ttl, "ttl")
        return out + _opaque(req.opaque) + b"\r\n"
    if type(req) is Arith:
        out = _key_part(b"ma ", req.key)
        if req.value:
            out += b" v"
        if type(req.mode) is not ArithMode:
            raise RequestError(f"mode must be an ArithMode, not {_show(req.mode)}")
        if req.mode is not ArithMode.INCR:
            out += b" M" + req.mode.value
        if _uint(req.delta, "delta", _U64) != 1:
            out += b" D%d" % req.delta
        if req.vivify is not None:
            out += b" N%d" % _ttl(req.vivify, "vivify")
        if req.initial is not None:
            out += b" J%d" % _uint(req.initial, "initial", _U64)
        return out + _opaque(req.opaque) + b"\r\n"
    if type(req) is NoOp:
        return b"mn" + _opaque(req.opaque) + b"\r\n"
    if type(req) is Version:
        return b"version\r\n"
    if type(req) is Stats:
        if type(req.args) is not tuple:
            raise RequestError(f"stats arguments must be a tuple, not {type(req.args).__name__}")
        for arg in req.args:
            if type(arg) is not bytes or not arg or _BAD_KEY_BYTE.search(arg):
                raise RequestError(f"bad stats argument {_show(arg)}")
        if req.args and req.args[0] not in STATS_GROUPS:
            # memcached answers an unknown group with ERROR, which no pipeline can tell from a
            # desync: refuse it here so one typo cannot reset a connection shared by everyone.
            raise RequestError(f"unknown stats group {_show(req.args[0])}; known: {b', '.join(sorted(STATS_GROUPS)).decode()}")
        if req.args[:2] == (b"detail", b"dump"):
            # Its PREFIX lines are no response form we parse; memcached would be disconnected.
            raise RequestError("stats detail dump is not supported")
        return b" ".join((b"stats",) + tuple(req.args)) + b"\r\n"
    if type(req) is FlushAll:
        if req.delay is None:
            return b"flush_all\r\n"
        return b"flush_all %d\r\n" % _uint(req.delay, "delay", _I32)
    if type(req) is Verbosity:
        return b"verbosity %d\r\n" % _uint(req.level, "verbosity level", _U32)
    if type(req) is CacheMemlimit:
        mb = req.megabytes
        if type(mb) is not int or not _MEMLIMIT_MIN <= mb <= _MEMLIMIT_MAX:
            raise RequestError(f"cache_memlimit must be an integer in {_MEMLIMIT_MIN}..{_MEMLIMIT_MAX} (MB), got {_show(mb)}")
        return b"cache_memlimit %d\r\n" % mb
    raise RequestError(f"cannot encode {type(req).__name__}")


def encode_get(key: bytes, opaque: int, cas: bool = False) -> bytes:
    """The broker's hot path for `mg <key> v f [c] s O<opaque>`: the bytes of
    `encode(Get(key, opaque, cas=cas, size=True))` without building a Get (about 3x cheaper)."""
    if type(key) is bytes and 0 < len(key) <= MAX_KEY_LEN and type(opaque) is int and 0 <= opaque < _INT_OPAQUE_LIMIT and _BAD_KEY_BYTE.search(key) is None:
        return (b"mg %b v f c s O%d\r\n" if cas else b"mg %b v f s O%d\r\n") % (key, opaque)
    return encode(Get(key, opaque, cas=cas, size=True))


def is_plain_key(key: bytes) -> bool:
    """True when `key` goes on the wire as it is (1..250 bytes, none <= 0x20 or 0x7F): then
    `encode_get` takes its fast path and cannot raise."""
    return 0 < len(key) <= MAX_KEY_LEN and _BAD_KEY_BYTE.search(key) is None


def needs_encoding(keys: list[bytes]) -> bool:
    """True unless every key goes on the wire as it is (1..250 bytes, none <= 0x20 or 0x7F): C-level
    passes over the lot (deleting the bytes a key may not hold from all of them at once is about 3x
    faster than a regex search for one, 0.02 against 0.06 us per 10-byte key)."""
    if not keys:
        return False
    sizes = list(map(len, keys))
    if min(sizes) == 0 or max(sizes) > MAX_KEY_LEN:
        return True
    return holds_unsafe_byte(keys)


def holds_unsafe_byte(keys: list[bytes]) -> bool:
    """needs_encoding for keys already known to have 1..250 bytes each (as clientlib.wire's
    decode_request checks a get_many's): True when any holds a byte <= 0x20 or 0x7F."""
    joined = b"".join(keys)
    return len(joined.translate(None, _BAD_KEY_BYTES)) != len(joined)


_GET_TEMPLATE = b"mg %b v f s O%d\r\n"

# Consecutive opaques written from pieces made once: opaque x is the digits of x // 1000 (none when
# that is 0) then x % 1000 in three digits (as many as it has when x < 1000), so a batch's requests
# are one b"".join of keys, templates and these pieces, where formatting each opaque with %d cost
# 4 x as much (100 gets: 26 -> 6.5 us on the Xeon machine).
_LOW_DIGITS = ([b"%03d" % j for j in range(1000)], [b"%d" % j for j in range(1000)])
_LOW_DIGITS_CRLF = ([b"%03d\r\n" % j for j in range(1000)], [b"%d\r\n" % j for j in range(1000)])
_PIECES_FROM = 12  # encode_gets' batches of at least this many keys are built from the pieces


def _put_opaques(
    parts: list[bytes], step: int, first: int, n: int, before: bytes, low: tuple[list[bytes], list[bytes]],
) -> None:
    """Write `before` and the opaques first .. first + n - 1 into `parts`, `step` slots per item:
    item j's last two slots get `before` with the opaque's high digits, and its low digits from
    `low` (padded, short tables of 1000 entries). `first` >= 0: the pipeline counts opaques from 1
    (divmod floors, so a negative one would be written wrong)."""
    padded, short = low
    i = 0
    x = first
    while i < n:
        high, lo = divmod(x, 1000)
        take = min(1000 - lo, n - i)
        start = i * step + step - 2
        end = (i + take) * step
        parts[start:end:step] = [before + b"%d" % high if high else before] * take
        parts[start + 1 : end : step] = (padded if high else short)[lo : lo + take]
        i += take
        x += take


def encode_gets(keys: list[bytes], first_opaque: int) -> bytes:
    """`encode_get` of each key in turn, with opaques first_opaque, first_opaque + 1, ...; keys
    checked by `needs_encoding` first."""
    n = len(keys)
    if n == 1:
        return _GET_TEMPLATE % (keys[0], first_opaque)  # a single get: no interleaving to build
    if n < _PIECES_FROM:
        # One formatting call over the whole batch, the template repeated n times: for a few keys
        # cheaper than building the pieces (2 keys: 2.3 against 3.7 us; 16 keys: 10.7 against 5.1).
        return (_GET_TEMPLATE * n) % tuple(chain.from_iterable(zip(keys, range(first_opaque, first_opaque + n))))
    parts = [b"mg "] * (4 * n)
    parts[1::4] = keys
    _put_opaques(parts, 4, first_opaque, n, b" v f s O", _LOW_DIGITS_CRLF)
    return b"".join(parts)


def encode_set(key: bytes, value: bytes, opaque: int, client_flags: int, ttl: int) -> bytes:
    """The broker's hot path for a plain `ms` (mode set, no cas): the bytes of
    `encode(Set(key, value, opaque, client_flags=client_flags, ttl=ttl))`."""
    if (
        type(key) is bytes and 0 < len(key) <= MAX_KEY_LEN and type(value) is bytes
        and type(opaque) is int and 0 <= opaque < _INT_OPAQUE_LIMIT and client_flags == 0 and ttl == 0
        and type(client_flags) is int and type(ttl) is int and _BAD_KEY_BYTE.search(key) is None
    ):
        return b"ms %b %d O%d\r\n%b\r\n" % (key, len(value), opaque, value)
    return encode(Set(key, value, opaque, client_flags=client_flags, ttl=ttl))


# --- responses ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Response:
    """One complete response. `flags` maps a flag letter to its token (b"" for bare flags)."""

    status: Status
    flags: dict[str, bytes]
    value: bytes | None = None
    text: bytes = b""  # the message of an error, the VERSION string
    stats: dict[str, str] | None = None

    @property
    def opaque(self) -> bytes | None:
        return self.flags.get("O")


_NO_FLAGS: dict[str, bytes] = {}
# One meta response line: status, VA's size, and the flag tokens. A line this does not match (an
# error, a text reply, a malformed line) goes through the general parser, which explains it.
_META_LINE = re.compile(rb"(VA|HD|EN|NS|EX|NF|MN)(?: (\d{1,20}))?((?: [A-Za-z][\x21-\x7e]*)*)\r\n")
_FLAG_TOKEN = re.compile(rb" ([A-Za-z])([\x21-\x7e]*)")
# The two answers to `mg <key> v f s O<n>` that carry nothing unusual: a hit whose `s` token
# repeats the VA length (the backreference), and a miss. Anything else (W/X/Z lease flags, an
# error line, a header that lost or gained a digit) does not match and goes the general way.
# Opaques are never 0 and never written with a leading zero: one that is is out of turn.
_GET_ANSWER = re.compile(rb"VA (\d{1,20}) f(\d{1,10}) s\1 O([1-9]\d{0,19})\r\n|EN O([1-9]\d{0,19})\r\n")
# A run of such hits is also taken in bulk (ResponseParser._take_hit_run): the flags of its headers
# are read with this, then the headers are rebuilt from the template below and compared whole.
_RUN_FLAGS = re.compile(rb"f(\d{1,10}) s")
_RUN_HEADER = b"\nVA %d f%b s%d O%d"
# The f0 headers up to their opaque, `\nVA <size> f0 s<size> O`, by size: formatting the two sizes
# once per size instead of once per answer (0.184 -> 0.144 us per answer for the rebuild).
_RUN_F0_STARTS: dict[int, bytes] = {}
_RUN_F0_STARTS_MOST = 4096


def _f0_starts(sizes: list[int]) -> list[bytes]:
    if len(_RUN_F0_STARTS) > _RUN_F0_STARTS_MOST:
        _RUN_F0_STARTS.clear()  # bounded: values of thousands of sizes only cost the formatting again
    for size in set(sizes).difference(_RUN_F0_STARTS):
        _RUN_F0_STARTS[size] = b"\nVA %d f0 s%d O" % (size, size)
    return list(map(_RUN_F0_STARTS.__getitem__, sizes))
# From this many answers wanted, a run of hits is tried in bulk first: all hits of 100 bytes, the bulk
# read costs 1.12 x the loop's time per answer at 8, 1.03 x at 12, 0.93 x at 16, 0.80 x at 32.
RUN_MIN = 16
# The bytes per answer wanted that the bulk read splits at most: it scans every data block for CRLF
# (about 1 ns a byte), where the loop steps over one by its size, so from about 300 bytes an answer
# the loop is faster; a run of larger answers is taken in part (what the region holds), or not. The
# bound also keeps a buffer that holds many batches from being copied whole for each of them.
_RUN_MOST = 160
# How far ahead the bulk read looks for a miss before splitting (about the first 16 answers): the
# whole region, at about 0.4 ns a byte, would cost the run of hits 8 %.
_RUN_LOOK = 16 * _RUN_MOST
_RUN_LARGE = b"400"  # (as the digits of VA's size) the bulk read pays up to about this
_RUN_LARGE_DIGITS = len(_RUN_LARGE)
_RUN_OPAQUE_END = 10**20  # _GET_ANSWER's opaques have at most 20 digits
MetaItem = tuple[Status, Union[bytes, None], bytes]


def flag_dict(flags: bytes) -> dict[str, bytes]:
    """The flag tokens of a meta line (as `next_item` returns them) as {letter: token}."""
    return {chr(m[0][0]): m[1] for m in _FLAG_TOKEN.findall(flags)} if flags else _NO_FLAGS


def opaque_of(flags: bytes) -> bytes | None:
    """The `O` token of a meta line's flags (as `next_item` returns them), or None."""
    i = flags.rfind(b" O")
    if i < 0:
        return None
    end = flags.find(b" ", i + 2)
    return flags[i + 2 :] if end < 0 else flags[i + 2 : end]


def _check_size(flags: bytes, size: bytes) -> None:
    """An `s` (item size) token states the VA's size again: it must agree, checked as soon as the
    header is in, so a header that lost or gained a digit is caught before waiting for its data."""
    i = flags.find(b" s")
    if i >= 0:
        end = flags.find(b" ", i + 2)
        token = flags[i + 2 :] if end < 0 else flags[i + 2 : end]
        if token != size and token.isdigit():
            raise ProtocolError(f"VA of {size.decode()} bytes says s{token[:20].decode()}")


# `stats cachedump` answers ITEM lines where the others answer STAT lines (pymemcache reads both).
_STAT_HEADS = (b"STAT", b"ITEM")


def _parse_flags(tokens: list[bytes]) -> dict[str, bytes]:
    if not tokens:
        return _NO_FLAGS
    flags: dict[str, bytes] = {}
    for tok in tokens:
        if not tok:
            raise ProtocolError("empty flag token (double space)")
        c = tok[0]
        if not (0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A):
            raise ProtocolError(f"bad flag token {tok[:40]!r}")
        flags[chr(c)] = tok[1:]
    return flags


class ResponseParser:
    """Incremental parser: feed any slices of the byte stream, pull whole responses."""

    __slots__ = ("_buf", "_pos", "_max_value", "_stats", "_error", "_chunks", "_chunked", "_need", "run_min")

    def __init__(self, max_value_len: int = DEFAULT_MAX_VALUE_LEN) -> None:
        self._buf = b""
        self._pos = 0
        self._chunks: list[bytes] = []
        self._chunked = 0
        self._need = 0  # bytes still missing for the value being received (0: none)
        self._max_value = max_value_len
        self._stats: dict[str, str] | None = None
        self._error: ProtocolError | None = None
        self.run_min = RUN_MIN  # tests set it past any limit to check the bulk read against the loop

    def feed(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        if self._need:
            # A large value arriving in pieces: collect them and join once it is whole, instead of
            # copying the growing buffer on every read.
            self._chunks.append(data)
            self._chunked += len(data)
            if self._chunked < self._need:
                return
            data = b"".join(self._chunks)
            self._chunks = []
            self._chunked = 0
            self._need = 0
        buf = self._buf
        pos = self._pos
        # bytes, not bytearray: a value is then one slice (one copy) of what recv() returned.
        self._buf = data if pos >= len(buf) else buf[pos:] + data
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as responses."""
        return len(self._buf) - self._pos + self._chunked

    def set_max_value_len(self, limit: int) -> None:
        self._max_value = limit

    def take_exact(self, response: bytes) -> bool:
        """Consume `response` if the next buffered bytes are exactly it (the hot path for an
        answer known in advance, such as the fence's `EN O<n>`); False, consuming nothing,
        otherwise (another answer, or not all here yet), leaving every check to `next_items`."""
        if self._error is not None or self._stats is not None or self._need:
            return False
        if not self._buf.startswith(response, self._pos):
            return False
        self._pos += len(response)
        return True

    @property
    def failed(self) -> bool:
        """next_items found bad bytes after the responses it returned; the next call raises."""
        return self._error is not None

    def take_get_answers(self, first: int, limit: int, hit: Any, miss: Any, bare: bool = False) -> list[Any]:
        """The hot path for answers to `mg <key> v f s O<first>`, `... O<first + 1>`, ...: up to
        `limit` of them, in order, straight into results: `[hit, value, client_flags]` for a hit
        (with `bare`, a hit whose client flags are 0 is its value alone, the bytes object) and `miss`
        itself for a miss. It stops, leaving the bytes for `next_items`, at the first response
        that is not exactly such an answer with the next opaque in turn, or is not yet whole, so
        every check and every error stays on the general path; it never raises."""
        if self._error is not None or self._stats is not None or self._need:
            return []
        out = self._take_hit_run(first, limit, hit, bare) if limit >= self.run_min else []
        if out:
            first += len(out)
            limit -= len(out)
        append = out.append
        buf = self._buf
        pos = self._pos
        match = _GET_ANSWER.match
        limit_value = self._max_value
        expect = first
        stop_at = first + limit
        while expect < stop_at:
            m = match(buf, pos)
            if m is None:
                break
            size, flags, opaque, miss_opaque = m.groups()
            if size is None:
                if int(miss_opaque) != expect:
                    break
                append(miss)
                pos = m.end()
            else:
                if int(opaque) != expect:
                    break
                length = int(size)
                end = m.end()
                stop = end + length
                if length > limit_value or not buf.startswith(b"\r\n", stop):
                    break
                client_flags = 0 if flags == b"0" else int(flags)  # most values: no int() to make
                append(buf[end:stop] if bare and not client_flags else [hit, buf[end:stop], client_flags])
                pos = stop + 2
            expect += 1
        self._pos = pos
        return out

    def _take_hit_run(self, first: int, limit: int, hit: Any, bare: bool = False) -> list[Any]:
        """The leading hits of `take_get_answers`, taken in bulk with C-level passes instead of a
        Python step per answer (about 0.5 against 0.9 us per answer), or [] (nothing taken) when
        fewer than run_min of them are in the region it splits (at most _RUN_MOST bytes per answer
        wanted) or any of them is not exactly in shape.

        The region is split at CRLF into header, data block, header, ...; the headers are joined by
        LF and must equal, byte for byte, the headers rebuilt from the template with each data
        block's real length (as VA's size and `s`), the flags read from them, and the opaques in
        turn. Equality proves each header whole and in shape, the data block after it exactly its
        size with CRLF after it (data holding CRLF splits short and fails it), and no LF in a
        header (the rebuilt ones have n - 1): what the loop would read, answer by answer."""
        buf = self._buf
        pos = self._pos
        if buf.startswith(b"EN O", pos):
            return []  # a miss first: no run (the search below finds the ones after a CRLF)
        # A first value past _RUN_LARGE bytes: the values are large, and splitting the region only
        # to fail or take a few would cost more than the loop (500-byte values: 1.05 x the loop's
        # time per answer, 1 kB 1.18 x, without this look at the first size).
        digits = buf.find(b" ", pos + 3, pos + 25) - pos - 3
        if digits > _RUN_LARGE_DIGITS or (digits == _RUN_LARGE_DIGITS and buf[pos + 3 : pos + 3 + digits] > _RUN_LARGE):
            return []
        avail = len(buf) - pos
        if limit > avail:
            limit = avail  # an answer has more than one byte; and split's count is a C ssize_t
        most = limit * _RUN_MOST
        # A miss ends the run: one among the first answers (in 15 % of batches at a hit ratio of
        # 0.99, 56 % at 0.95) made the split and join of the whole region waste, then the loop
        # took all of them (1.2 x the loop's time per answer at 0.9; now 1.04 x).
        cut = buf.find(b"\r\nEN O", pos, pos + _RUN_LOOK)
        if cut >= 0 and cut - pos < most:
            most = cut + 2 - pos  # split no further (one in a data block fails the run, as CRLF does)
        # A bounded region: splitting all of a buffer that holds many batches would copy the rest
        # of it once per batch, and scanning large values costs more than the loop.
        if most >= avail:
            region = buf if not pos else buf[pos:]
        else:
            region = buf[pos : pos + most]
        parts = region.split(b"\r\n", 2 * limit)
        n = min(limit, (len(parts) - 1) >> 1)
        if n < self.run_min or not n or not 0 < first < _RUN_OPAQUE_END - n:
            return []
        heads = parts[0 : 2 * n : 2]
        joined = b"\n" + b"\n".join(heads)
        at = joined.find(b"\nEN O")
        if at >= 0:
            # A miss ends the run (the loop takes it and what follows). The LF found must be the
            # one put before a header, not one inside a header (then the LFs before it are not
            # n headers and the cut header would be read with the block after the whole line).
            n = joined.count(b"\n", 0, at)
            if n < self.run_min or at != n + sum(map(len, heads[:n])):
                return []
            joined = joined[:at]
        data = parts[1 : 2 * n : 2]
        sizes = list(map(len, data))
        if max(sizes) > self._max_value:
            return []
        client_flags: Any
        all_f0 = joined.count(b" f0 s") == n
        if all_f0:
            # Most runs carry one serializer's flags, often 0: then no flags to read, no int()s,
            # and each header up to its opaque is a size's own bytes, made once per size.
            starts: list[bytes | None] | list[bytes] = list(map(_RUN_F0_STARTS.get, sizes))
            if None in starts:
                starts = _f0_starts(sizes)
            known = cast("list[bytes]", starts)
            pieces = known * 3
            pieces[0::3] = known
            _put_opaques(pieces, 3, first, n, b"", _LOW_DIGITS)
            rebuilt = b"".join(pieces)
            client_flags = repeat(0)
        else:
            flags = _RUN_FLAGS.findall(joined)
            if len(flags) != n:
                return []
            rebuilt = (_RUN_HEADER * n) % tuple(chain.from_iterable(zip(sizes, flags, sizes, range(first, first + n))))
            client_flags = map(int, flags)
        if rebuilt != joined:
            return []
        taken = len(joined) + 3 * n + sum(sizes)  # each header's LF stands for its CRLF, each block has one
        self._pos = pos + taken
        if bare:
            if all_f0:
                return data  # the values are the results: nothing built per answer
            return [v if not f else [hit, v, f] for v, f in zip(data, client_flags)]
        return list(map(list, zip(repeat(hit), data, client_flags)))

    def next_items(self, limit: int = 1 << 62) -> list[MetaItem | Response]:
        """Every complete response buffered now (at most `limit`), in order (empty when more bytes
        are needed). A ProtocolError after good responses is raised by the next call, so those
        come first."""
        error = self._error
        if error is not None:
            self._error = None
            raise error
        items: list[MetaItem | Response] = []
        append = items.append
        # The hot loop, inlined from next_item: one regex match and one slice per response.
        buf = self._buf
        pos = self._pos
        n = len(buf)
        match = _META_LINE.match
        statuses = _META_STATUS
        try:
            while self._stats is None and len(items) < limit:
                m = match(buf, pos)
                if m is None:
                    break
                head, size, flags = m.groups()
                end = m.end()
                if size is None:
                    if head == b"VA":
                        raise ProtocolError(f"bad VA line: {bytes(m[0][:60])!r}")
                    append((statuses[head], None, flags))
                    pos = end
                    continue
                if head != b"VA":
                    raise ProtocolError(f"bad {head.decode()} line: {bytes(m[0][:60])!r}")
                length = int(size)
                if length > self._max_value:
                    raise ProtocolError(f"VA of {length} bytes exceeds the {self._max_value} limit")
                _check_size(flags, size)
                stop = end + length
                if n < stop + 2:
                    self._need = stop + 2 - n
                    break
                if buf[stop : stop + 2] != b"\r\n":
                    raise ProtocolError("VA data not followed by CRLF")
                append((Status.VALUE, buf[end:stop], flags))
                pos = stop + 2
            self._pos = pos
            # What the fast loop does not take (errors, text replies, STAT blocks), one by one; with
            # every byte taken (the usual end of a read) there is nothing for them to find.
            while pos < n and len(items) < limit and (item := self.next_item()) is not None:
                append(item)
                pos = self._pos
        except ProtocolError as exc:
            self._pos = max(self._pos, pos)
            if not items:
                raise
            self._error = exc
        return items

    def next_item(self) -> MetaItem | Response | None:
        """The next complete response, or None when more bytes are needed; raises ProtocolError.

        A meta response comes back as a tuple `(status, value or None, flag bytes)` with no object
        built per response (the hot path); anything else as a `Response` from `next_response`.
        """
        if self._stats is None:
            buf = self._buf
            m = _META_LINE.match(buf, self._pos)
            if m is not None:
                head, size, flags = m.groups()
                end = m.end()
                if size is None:
                    if head == b"VA":
                        raise ProtocolError(f"bad VA line: {bytes(m[0][:60])!r}")
                    self._pos = end
                    return (_META_STATUS[head], None, flags)
                if head != b"VA":
                    raise ProtocolError(f"bad {head.decode()} line: {bytes(m[0][:60])!r}")
                length = int(size)
                if length > self._max_value:
                    raise ProtocolError(f"VA of {length} bytes exceeds the {self._max_value} limit")
                _check_size(flags, size)
                stop = end + length
                if len(buf) < stop + 2:
                    self._need = stop + 2 - len(buf)
                    return None
                if buf[stop : stop + 2] != b"\r\n":
                    raise ProtocolError("VA data not followed by CRLF")
                self._pos = stop + 2
                return (Status.VALUE, buf[end:stop], flags)
        return self.next_response()

    def next_response(self) -> Response | None:
        """The next complete response, or None when more bytes are needed. Raises ProtocolError."""
        while True:
            buf = self._buf
            pos = self._pos
            end = buf.find(b"\r\n", pos)
            if end < 0:
                # A trailing CR may be half of the CRLF ending a line of exactly MAX_LINE_LEN.
                if len(buf) - pos - (buf[-1:] == b"\r") > MAX_LINE_LEN:
                    raise ProtocolError("response line longer than %d bytes" % MAX_LINE_LEN)
                return None
            if end - pos > MAX_LINE_LEN:
                raise ProtocolError("response line longer than %d bytes" % MAX_LINE_LEN)
            line = bytes(buf[pos:end])
            tokens = line.split(b" ")
            head = tokens[0]
            if self._stats is not None:
                if head in _STAT_HEADS and len(tokens) >= 3:
                    self._stats[tokens[1].decode("ascii", "replace")] = b" ".join(tokens[2:]).decode(
                        "ascii", "replace"
                    )
                    self._pos = end + 2
                    continue
                if line == b"END":
                    stats, self._stats = self._stats, None
                    self._pos = end + 2
                    return Response(Status.STATS, _NO_FLAGS, stats=stats)
                raise ProtocolError(f"unexpected line inside STAT block: {line[:60]!r}")
            status = _META_STATUS.get(head)
            if status is Status.VALUE:
                # The digit cap keeps int() away from its 4300-digit ValueError.
                if len(tokens) < 2 or not tokens[1].isdigit() or len(tokens[1]) > 20:
                    raise ProtocolError(f"bad VA line: {line[:60]!r}")
                if any(t[:1] == b"s" for t in tokens[2:]):
                    _check_size(b" " + b" ".join(tokens[2:]), tokens[1])
                size = int(tokens[1])
                if size > self._max_value:
                    raise ProtocolError(f"VA of {size} bytes exceeds the {self._max_value} limit")
                start = end + 2
                stop = start + size
                if len(buf) < stop + 2:
                    return None
                if buf[stop : stop + 2] != b"\r\n":
                    raise ProtocolError("VA data not followed by CRLF")
                flags = _parse_flags(tokens[2:])
                self._pos = stop + 2
                return Response(status, flags, bytes(buf[start:stop]))
            if status is not None:
                flags = _parse_flags(tokens[1:])
                self._pos = end + 2
                return Response(status, flags)
            err = _ERROR_STATUS.get(head)
            if err is not None:
                self._pos = end + 2
                return Response(err, _NO_FLAGS, text=line[len(head) + 1 :])
            if head == b"VERSION" and len(tokens) >= 2:
                self._pos = end + 2
                return Response(Status.VERSION, _NO_FLAGS, text=line[8:])
            text = _TEXT_STATUS.get(line)
            if text is not None:
                self._pos = end + 2
                return Response(text, _NO_FLAGS)
            if head in _STAT_HEADS and len(tokens) >= 3:
                self._stats = {}
                continue  # re-read this line as the first of the block
            if line == b"END":
                self._pos = end + 2
                return Response(Status.STATS, _NO_FLAGS, stats={})
            raise ProtocolError(f"unparsable response line: {line[:60]!r}")
