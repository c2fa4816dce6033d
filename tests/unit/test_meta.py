"""broker.meta, checked against memcached's doc/protocol.txt (meta commands, 1.6.18).

Requests: every request type and option is encoded byte-exact, keys that memcached would not
take verbatim go base64 with the `b` flag, and every bad input raises RequestError (never
returns bytes, never another exception).

Responses: every response form, and streams of several, come out the same whether the bytes are
fed whole, split in two at every offset, or one byte at a time. Malformed input raises
ProtocolError, after exactly the responses that preceded it.

Facts from protocol.txt (and checked against memcached 1.6.18 in the integration tests):
- `ms <key> <datalen> <flags>*\\r\\n<data>\\r\\n`: the length comes straight after the key.
- `mg`/`md`/`ma` take `<key> <flags>*`; a flag is one letter, optionally followed by a token.
- The opaque token `O...` is limited to 32 bytes including the `O`.
- TTLs (`T`, `N`, `R`) and flush_all's delay are read into a signed 32-bit int.
- Responses: `VA <size> <flags>*\\r\\n<data>\\r\\n`, `HD|EN|NS|EX|NF|MN <flags>*\\r\\n`,
  `ERROR`, `CLIENT_ERROR <msg>`, `SERVER_ERROR <msg>`; text commands answer `VERSION <v>`,
  `OK`, `RESET`, or `STAT <name> <value>` lines closed by `END`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.meta import (
    MAX_BINARY_KEY_LEN,
    MAX_KEY_LEN,
    MAX_LINE_LEN,
    MAX_OPAQUE_LEN,
    Arith,
    ArithMode,
    CacheMemlimit,
    Delete,
    FlushAll,
    Get,
    NoOp,
    ProtocolError,
    RequestError,
    Response,
    ResponseParser,
    Set,
    SetMode,
    Stats,
    Status,
    Verbosity,
    Version,
    encode,
    encode_key,
)

pytestmark = pytest.mark.unit

I32_MAX = 2**31 - 1
I32_MIN = -(2**31)
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


# --- requests: byte-exact ----------------------------------------------------------------------

ENCODINGS: list[tuple[str, Any, bytes]] = [
    # mg: the defaults ask for value and client flags, as a pymemcache get does.
    ("mg", Get(b"foo"), b"mg foo v f\r\n"),
    ("mg opaque int", Get(b"foo", opaque=7), b"mg foo v f O7\r\n"),
    ("mg opaque 0", Get(b"foo", opaque=0), b"mg foo v f O0\r\n"),
    ("mg opaque bytes", Get(b"foo", opaque=b"a-b.c"), b"mg foo v f Oa-b.c\r\n"),
    ("mg cas", Get(b"foo", cas=True), b"mg foo v f c\r\n"),
    ("mg ttl", Get(b"foo", ttl=True), b"mg foo v f t\r\n"),
    ("mg key", Get(b"foo", return_key=True), b"mg foo v f k\r\n"),
    ("mg no value", Get(b"foo", value=False), b"mg foo f\r\n"),
    ("mg no flags", Get(b"foo", client_flags=False), b"mg foo v\r\n"),
    ("mg bare", Get(b"foo", value=False, client_flags=False), b"mg foo\r\n"),
    ("mg gat", Get(b"foo", touch=30), b"mg foo v f T30\r\n"),
    ("mg gat 0", Get(b"foo", touch=0), b"mg foo v f T0\r\n"),
    ("mg gat negative", Get(b"foo", touch=-1), b"mg foo v f T-1\r\n"),
    ("mg touch only", Get(b"foo", value=False, client_flags=False, touch=10, opaque=1), b"mg foo T10 O1\r\n"),
    ("mg vivify", Get(b"foo", vivify=30), b"mg foo v f N30\r\n"),
    ("mg recache", Get(b"foo", recache=5), b"mg foo v f R5\r\n"),
    (
        "mg everything",
        Get(b"foo", opaque=9, cas=True, ttl=True, return_key=True, touch=1, vivify=2, recache=3),
        b"mg foo v f c t k T1 N2 R3 O9\r\n",
    ),
    ("mg ttl max", Get(b"k", touch=I32_MAX), b"mg k v f T2147483647\r\n"),
    ("mg ttl min", Get(b"k", touch=I32_MIN), b"mg k v f T-2147483648\r\n"),
    # ms: S (set) is memcached's default mode, so it is not sent.
    ("ms", Set(b"foo", b"bar"), b"ms foo 3\r\nbar\r\n"),
    ("ms opaque", Set(b"foo", b"bar", opaque=7), b"ms foo 3 O7\r\nbar\r\n"),
    ("ms explicit set", Set(b"foo", b"bar", mode=SetMode.SET), b"ms foo 3\r\nbar\r\n"),
    ("ms add", Set(b"foo", b"bar", mode=SetMode.ADD), b"ms foo 3 ME\r\nbar\r\n"),
    ("ms append", Set(b"foo", b"bar", mode=SetMode.APPEND), b"ms foo 3 MA\r\nbar\r\n"),
    ("ms prepend", Set(b"foo", b"bar", mode=SetMode.PREPEND), b"ms foo 3 MP\r\nbar\r\n"),
    ("ms replace", Set(b"foo", b"bar", mode=SetMode.REPLACE), b"ms foo 3 MR\r\nbar\r\n"),
    ("ms client flags", Set(b"foo", b"bar", client_flags=5), b"ms foo 3 F5\r\nbar\r\n"),
    ("ms client flags max", Set(b"foo", b"", client_flags=U32_MAX), b"ms foo 0 F4294967295\r\n\r\n"),
    ("ms ttl", Set(b"foo", b"bar", ttl=60), b"ms foo 3 T60\r\nbar\r\n"),
    ("ms ttl negative", Set(b"foo", b"bar", ttl=-1), b"ms foo 3 T-1\r\nbar\r\n"),
    ("ms ttl max", Set(b"foo", b"", ttl=I32_MAX), b"ms foo 0 T2147483647\r\n\r\n"),
    ("ms cas", Set(b"foo", b"bar", cas=99), b"ms foo 3 C99\r\nbar\r\n"),
    ("ms cas 0", Set(b"foo", b"bar", cas=0), b"ms foo 3 C0\r\nbar\r\n"),
    ("ms cas max", Set(b"foo", b"", cas=U64_MAX), b"ms foo 0 C18446744073709551615\r\n\r\n"),
    ("ms invalidate", Set(b"foo", b"bar", cas=5, invalidate=True), b"ms foo 3 C5 I\r\nbar\r\n"),
    (
        "ms everything",
        Set(b"k", b"v", opaque=3, mode=SetMode.ADD, client_flags=1, ttl=2, cas=4, invalidate=True),
        b"ms k 1 F1 T2 C4 I ME O3\r\nv\r\n",
    ),
    # The data block is length-framed: CRLF and meta commands inside it are just bytes.
    ("ms value with mn", Set(b"k", b"\r\nmn\r\n"), b"ms k 6\r\n\r\nmn\r\n\r\n"),
    ("ms empty value", Set(b"k", b""), b"ms k 0\r\n\r\n"),
    ("ms binary value", Set(b"k", bytes(range(256))), b"ms k 256\r\n" + bytes(range(256)) + b"\r\n"),
    # md
    ("md", Delete(b"foo"), b"md foo\r\n"),
    ("md opaque", Delete(b"foo", opaque=1), b"md foo O1\r\n"),
    ("md cas", Delete(b"foo", opaque=1, cas=5), b"md foo C5 O1\r\n"),
    # ma: incr by 1 is memcached's default, so neither mode nor delta is sent for it.
    ("ma", Arith(b"n"), b"ma n v\r\n"),
    ("ma no value", Arith(b"n", value=False), b"ma n\r\n"),
    ("ma opaque", Arith(b"n", opaque=4), b"ma n v O4\r\n"),
    ("ma incr explicit", Arith(b"n", mode=ArithMode.INCR), b"ma n v\r\n"),
    ("ma decr", Arith(b"n", mode=ArithMode.DECR), b"ma n v MD\r\n"),
    ("ma delta", Arith(b"n", delta=5), b"ma n v D5\r\n"),
    ("ma delta 0", Arith(b"n", delta=0), b"ma n v D0\r\n"),
    ("ma delta max", Arith(b"n", delta=U64_MAX), b"ma n v D18446744073709551615\r\n"),
    ("ma initial", Arith(b"n", initial=10), b"ma n v J10\r\n"),
    ("ma vivify", Arith(b"n", vivify=0, initial=10), b"ma n v N0 J10\r\n"),
    (
        "ma everything",
        Arith(b"n", opaque=2, mode=ArithMode.DECR, delta=3, initial=U64_MAX, vivify=60),
        b"ma n v MD D3 N60 J18446744073709551615 O2\r\n",
    ),
    # mn
    ("mn", NoOp(), b"mn\r\n"),
    ("mn opaque", NoOp(5), b"mn O5\r\n"),
    ("mn opaque max", NoOp(10**MAX_OPAQUE_LEN - 1), b"mn O" + b"9" * MAX_OPAQUE_LEN + b"\r\n"),
    ("mn opaque bytes max", NoOp(b"~" * MAX_OPAQUE_LEN), b"mn O" + b"~" * MAX_OPAQUE_LEN + b"\r\n"),
    # text commands
    ("version", Version(), b"version\r\n"),
    ("stats", Stats(), b"stats\r\n"),
    ("stats settings", Stats((b"settings",)), b"stats settings\r\n"),
    ("stats items", Stats((b"items",)), b"stats items\r\n"),
    ("stats cachedump", Stats((b"cachedump", b"1", b"10")), b"stats cachedump 1 10\r\n"),
    ("stats reset", Stats((b"reset",)), b"stats reset\r\n"),
    ("flush_all", FlushAll(), b"flush_all\r\n"),
    ("flush_all 0", FlushAll(0), b"flush_all 0\r\n"),
    ("flush_all delay", FlushAll(10), b"flush_all 10\r\n"),
    ("flush_all delay max", FlushAll(I32_MAX), b"flush_all 2147483647\r\n"),
    ("verbosity", Verbosity(1), b"verbosity 1\r\n"),
    ("verbosity 0", Verbosity(0), b"verbosity 0\r\n"),
    ("verbosity max", Verbosity(U32_MAX), b"verbosity 4294967295\r\n"),
    ("cache_memlimit", CacheMemlimit(64), b"cache_memlimit 64\r\n"),
    ("cache_memlimit min", CacheMemlimit(8), b"cache_memlimit 8\r\n"),
    ("cache_memlimit max", CacheMemlimit(1_000_000_000), b"cache_memlimit 1000000000\r\n"),
]


@pytest.mark.parametrize(("request_", "expected"), [c[1:] for c in ENCODINGS], ids=[c[0] for c in ENCODINGS])
def test_encode_is_byte_exact(request_: Any, expected: bytes) -> None:
    assert encode(request_) == expected


# --- keys --------------------------------------------------------------------------------------

RAW_KEYS = [
    b"a",
    b"foo:bar/baz",
    b"!\"#$%&'()*+,-./0123456789:;<=>?@AZ[\\]^_`az{|}~",
    b"x" * MAX_KEY_LEN,
    # Bytes above 0x7F are not special to memcached: UTF-8 keys go verbatim.
    "ключ".encode(),
    b"\x80\xff",
]

BINARY_KEYS = [
    b"a b",
    b" ",
    b"\x00",
    b"\x7f",
    b"\t",
    b"\r\n",
    b"key\r\nmn",
    b"tail ",
    bytes(range(33)),
    b" " * MAX_BINARY_KEY_LEN,
    bytes(range(256))[:MAX_BINARY_KEY_LEN],
]


@pytest.mark.parametrize("key", RAW_KEYS, ids=repr)
def test_valid_keys_go_verbatim(key: bytes) -> None:
    assert encode_key(key) == (key, False)
    assert encode(Get(key)) == b"mg " + key + b" v f\r\n"
    assert encode(Set(key, b"v")) == b"ms " + key + b" 1\r\nv\r\n"
    assert encode(Delete(key)) == b"md " + key + b"\r\n"
    assert encode(Arith(key)) == b"ma " + key + b" v\r\n"


@pytest.mark.parametrize("key", BINARY_KEYS, ids=repr)
def test_other_keys_go_base64_with_the_b_flag(key: bytes) -> None:
    wire = base64.b64encode(key)
    assert encode_key(key) == (wire, True)
    assert len(wire) <= MAX_KEY_LEN
    assert encode(Get(key, opaque=1)) == b"mg " + wire + b" b v f O1\r\n"
    # ms: the data length must follow the key directly, the b flag comes after it.
    assert encode(Set(key, b"v", client_flags=2)) == b"ms " + wire + b" 1 b F2\r\nv\r\n"
    assert encode(Delete(key)) == b"md " + wire + b" b\r\n"
    assert encode(Arith(key, mode=ArithMode.DECR)) == b"ma " + wire + b" b v MD\r\n"


def test_base64_example_from_first_principles() -> None:
    assert encode(Get(b"a b")) == b"mg YSBi b v f\r\n"
    assert encode(Set(b"a b", b"xyz", opaque=1)) == b"ms YSBi 3 b O1\r\nxyz\r\n"


def test_key_length_limits() -> None:
    assert encode_key(b"k" * MAX_KEY_LEN)[1] is False
    assert encode_key(b" " * MAX_BINARY_KEY_LEN)[1] is True
    with pytest.raises(RequestError, match="250"):
        encode_key(b"k" * (MAX_KEY_LEN + 1))
    # 187 raw bytes would be 252 base64 bytes: over memcached's 250.
    with pytest.raises(RequestError, match="186"):
        encode_key(b" " * (MAX_BINARY_KEY_LEN + 1))
    with pytest.raises(RequestError, match="250"):
        encode_key(b" " * (MAX_KEY_LEN + 1))
    with pytest.raises(RequestError, match="empty"):
        encode_key(b"")


def test_distinct_keys_never_share_a_wire_form() -> None:
    keys = RAW_KEYS + BINARY_KEYS + [base64.b64encode(k) for k in BINARY_KEYS]
    forms = {encode_key(k) for k in keys}
    assert len(forms) == len(set(keys))


# --- requests: every bad input is a RequestError -----------------------------------------------

BAD_KEYS: list[Any] = [
    b"",
    b"k" * (MAX_KEY_LEN + 1),
    b"\x00" * (MAX_BINARY_KEY_LEN + 1),
    "foo",
    bytearray(b"foo"),
    memoryview(b"foo"),
    None,
    1,
]

BAD_OPAQUES: list[Any] = [
    -1,
    10**MAX_OPAQUE_LEN,  # 32 digits: memcached answers "opaque token too long"
    10**5000,  # str() of it raises ValueError; must still be a RequestError
    b"",
    b"a b",
    b"x" * (MAX_OPAQUE_LEN + 1),
    b"\r\n",
    b"\x7f",
    b"\xff",
    "7",
    7.0,
    True,
    bytearray(b"7"),
]

BAD_TTLS: list[Any] = [I32_MAX + 1, U32_MAX, I32_MIN - 1, 1.0, "1", True, b"1"]
BAD_U32: list[Any] = [-1, U32_MAX + 1, 1.0, "1", True, b"1"]
BAD_U64: list[Any] = [-1, U64_MAX + 1, 1.0, "1", True, b"1"]


def _short(value: Any) -> str:
    if type(value) is int and value.bit_length() > 128:
        return f"<{value.bit_length()}-bit int>"
    # reprs holding an address would make test ids differ per run (mutmut re-runs tests by id)
    if type(value) is memoryview:
        return f"memoryview({bytes(value)!r})"
    if type(value) is object:
        return "object()"
    return repr(value)[:30]


def _bad_requests() -> Iterator[tuple[str, Any]]:
    for key in BAD_KEYS:
        for make in (Get, Delete, Arith, lambda k: Set(k, b"v")):
            yield f"key {_short(key)}", make(key)
    for opaque in BAD_OPAQUES:
        yield f"mg opaque {_short(opaque)}", Get(b"k", opaque=opaque)
        yield f"ms opaque {_short(opaque)}", Set(b"k", b"v", opaque=opaque)
        yield f"md opaque {_short(opaque)}", Delete(b"k", opaque=opaque)
        yield f"ma opaque {_short(opaque)}", Arith(b"k", opaque=opaque)
        yield f"mn opaque {_short(opaque)}", NoOp(opaque)
    for ttl in BAD_TTLS:
        yield f"mg touch {_short(ttl)}", Get(b"k", touch=ttl)
        yield f"mg vivify {_short(ttl)}", Get(b"k", vivify=ttl)
        yield f"mg recache {_short(ttl)}", Get(b"k", recache=ttl)
        yield f"ms ttl {_short(ttl)}", Set(b"k", b"v", ttl=ttl)
        yield f"ma vivify {_short(ttl)}", Arith(b"k", vivify=ttl)
    # Falsy wrong types must not pass as "0" by omission.
    for falsy in (None, False, 0.0, b"", ""):
        yield f"ms ttl {_short(falsy)}", Set(b"k", b"v", ttl=falsy)
        yield f"ms client flags {_short(falsy)}", Set(b"k", b"v", client_flags=falsy)
    for value in BAD_U32:
        yield f"ms client flags {_short(value)}", Set(b"k", b"v", client_flags=value)
        yield f"verbosity {_short(value)}", Verbosity(value)
    for value in BAD_U64:
        yield f"ms cas {_short(value)}", Set(b"k", b"v", cas=value)
        yield f"md cas {_short(value)}", Delete(b"k", cas=value)
        yield f"ma delta {_short(value)}", Arith(b"k", delta=value)
        yield f"ma initial {_short(value)}", Arith(b"k", initial=value)
    # delta=1 is the default and is not sent; equal-but-wrong types must still be refused.
    for value in (1.0, True, None):
        yield f"ma delta {_short(value)}", Arith(b"k", delta=value)
    for value in ("data", bytearray(b"data"), memoryview(b"data"), None, 1):
        yield f"ms value {_short(value)}", Set(b"k", value)
    for mode in ("E", b"E", None, ArithMode.INCR):
        yield f"ms mode {_short(mode)}", Set(b"k", b"v", mode=mode)
    for mode in ("I", b"D", None, SetMode.SET):
        yield f"ma mode {_short(mode)}", Arith(b"k", mode=mode)
    for args in [(b"",), (b"a b",), (b"x\r\n",), (b"\x00",), ("settings",), (1,), None, [b"settings"], b"settings"]:
        yield f"stats {_short(args)}", Stats(args)
    # A known group whose later argument carries protocol text, a space or nothing: one request
    # must stay one line (b"0\r\nflush_all" would be a second command).
    for arg in (b"0\r\nflush_all", b"0 1", b"", b"\x7f"):
        yield f"stats cachedump 1 {_short(arg)}", Stats((b"cachedump", b"1", arg))
    # Its PREFIX lines are no response the parser accepts: it would cost the connection.
    yield "stats detail dump", Stats((b"detail", b"dump"))
    yield "stats detail dump x", Stats((b"detail", b"dump", b"x"))
    for delay in (-1, I32_MAX + 1, 1.0, True, "1"):
        yield f"flush_all {_short(delay)}", FlushAll(delay)
    # memcached answers MEMLIMIT_TOO_SMALL / MEMLIMIT_ADJUST_FAILED outside 8..1e9.
    for mb in (0, 7, 1_000_000_001, U32_MAX, -1, None, True, 64.0):
        yield f"cache_memlimit {_short(mb)}", CacheMemlimit(mb)
    yield "verbosity None", Verbosity(None)
    for other in (object(), "mg foo v\r\n", b"mg foo v\r\n", None, Response):
        yield f"not a request {_short(other)}", other


BAD_REQUESTS = list(_bad_requests())


@pytest.mark.parametrize("request_", [r for _, r in BAD_REQUESTS], ids=[n for n, _ in BAD_REQUESTS])
def test_bad_requests_raise_request_error(request_: Any) -> None:
    with pytest.raises(RequestError):
        encode(request_)


def test_request_error_is_a_value_error_and_not_a_protocol_error() -> None:
    assert issubclass(RequestError, ValueError)
    assert not issubclass(RequestError, ProtocolError)
    assert not issubclass(ProtocolError, RequestError)


_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(10**5000),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=40),
    st.sampled_from(list(SetMode) + list(ArithMode)),
    st.tuples(st.binary(max_size=4)),
)
_keyish = st.one_of(st.binary(max_size=260), _anything)
_requests = st.one_of(
    st.builds(
        Get, _keyish, _anything, _anything, _anything, _anything, _anything, _anything, _anything, _anything, _anything
    ),
    st.builds(Set, _keyish, _anything, _anything, _anything, _anything, _anything, _anything, _anything),
    st.builds(Delete, _keyish, _anything, _anything),
    st.builds(Arith, _keyish, _anything, _anything, _anything, _anything, _anything, _anything),
    st.builds(NoOp, _anything),
    st.builds(Stats, _anything),
    st.builds(FlushAll, _anything),
    st.builds(Verbosity, _anything),
    st.builds(CacheMemlimit, _anything),
    _anything,
)


@settings(max_examples=1500, deadline=None)
@given(_requests)
def test_encode_returns_one_framed_request_or_raises_request_error(request_: Any) -> None:
    try:
        out = encode(request_)
    except RequestError:
        return
    assert type(out) is bytes
    line, sep, rest = out.partition(b"\r\n")
    assert sep, "every request ends its first line with CRLF"
    assert b"\r" not in line and b"\n" not in line
    tokens = line.split(b" ")
    assert all(tokens), f"empty token in {_short(line)}"
    assert all(0x20 < b < 0x7F or b >= 0x80 for b in line.replace(b" ", b""))
    if type(request_) is Set:
        assert rest == request_.value + b"\r\n"
        assert int(tokens[2]) == len(request_.value)
    else:
        assert rest == b""
    if type(request_) in (Get, Set, Delete, Arith):
        key = base64.b64decode(tokens[1], validate=True) if b"b" in tokens[2:] else tokens[1]
        assert key == request_.key
    for opaque in [t for t in tokens[2:] if t[:1] == b"O"]:
        assert 2 <= len(opaque) <= MAX_OPAQUE_LEN + 1


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_KEY_LEN), st.binary(max_size=64), st.integers(0, 2**32))
def test_any_acceptable_key_round_trips_through_its_wire_form(key: bytes, value: bytes, opaque: int) -> None:
    try:
        wire, b64 = encode_key(key)
    except RequestError:
        assert len(key) > MAX_BINARY_KEY_LEN
        return
    assert (base64.b64decode(wire, validate=True) if b64 else wire) == key
    assert b64 == any(b <= 0x20 or b == 0x7F for b in key)
    ms = encode(Set(key, value, opaque=opaque))
    assert ms == b"ms %b %d%b O%d\r\n%b\r\n" % (wire, len(value), b" b" if b64 else b"", opaque, value)


# --- responses: one helper, three ways of feeding -------------------------------------------------


def _run(chunks: list[bytes], max_value_len: int | None) -> tuple[list[Response], ProtocolError | None, int]:
    parser = ResponseParser() if max_value_len is None else ResponseParser(max_value_len)
    out: list[Response] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            # Bounded: each response consumes at least one line, so more calls than bytes is a hang.
            for _ in range(len(chunk) + 2):
                resp = parser.next_response()
                if resp is None:
                    break
                out.append(resp)
            else:
                raise AssertionError("next_response() kept returning responses without input")
    except ProtocolError as exc:
        return out, exc, parser.buffered
    return out, None, parser.buffered


def _feedings(data: bytes, every_split: bool = True) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    splits = range(1, len(data)) if every_split else sorted({1, len(data) // 2, len(data) - 1} - {0, len(data)})
    for i in splits:
        yield f"split at {i}", [data[:i], data[i:]]
    yield "byte by byte", [data[i : i + 1] for i in range(len(data))]


def feed_every_way(
    data: bytes, *, max_value_len: int | None = None, every_split: bool = True
) -> tuple[list[Response], bool, int]:
    """Parse `data` whole, split in two at every offset, and byte by byte.

    Every way must give the same responses, the same verdict (ProtocolError or not) and, when
    there is no error, the same number of bytes left waiting. Returns that common outcome.
    """
    results = {name: _run(chunks, max_value_len) for name, chunks in _feedings(data, every_split)}
    responses, error, left = results["whole"]
    for name, (resps, err, rest) in results.items():
        assert resps == responses, f"{name}: responses differ from a whole feed"
        assert (err is None) == (error is None), f"{name}: {_short(err)} vs whole feed {_short(error)}"
        if error is None:
            assert rest == left, f"{name}: {rest} bytes left vs {left}"
    return responses, error is not None, left


def parse_every_way(data: bytes, **kw: Any) -> list[Response]:
    responses, failed, left = feed_every_way(data, **kw)
    assert not failed
    assert left == 0, f"{left} bytes left unparsed"
    return responses


def reject_every_way(data: bytes, **kw: Any) -> list[Response]:
    """`data` must raise ProtocolError however it is fed; returns the responses before the error."""
    responses, failed, _ = feed_every_way(data, **kw)
    assert failed, "expected ProtocolError"
    return responses


def R(status: Status, flags: dict[str, bytes] | None = None, value: bytes | None = None, **kw: Any) -> Response:
    return Response(status, flags or {}, value, **kw)


MID_DATA = b"a\r\nmn\r\nMN\r\nEND\r\nVA 1\r\nb"

RESPONSES: list[tuple[str, bytes, Response]] = [
    ("VA", b"VA 3\r\nbar\r\n", R(Status.VALUE, value=b"bar")),
    ("VA empty", b"VA 0\r\n\r\n", R(Status.VALUE, value=b"")),
    ("VA flags", b"VA 3 f5 c42 t-1 s3 O7\r\nbar\r\n",
     R(Status.VALUE, {"f": b"5", "c": b"42", "t": b"-1", "s": b"3", "O": b"7"}, b"bar")),
    ("VA crlf in data", b"VA %d O1\r\n%b\r\n" % (len(MID_DATA), MID_DATA), R(Status.VALUE, {"O": b"1"}, MID_DATA)),
    ("VA only crlf", b"VA 2\r\n\r\n\r\n", R(Status.VALUE, value=b"\r\n")),
    ("VA binary", b"VA 256 f0\r\n" + bytes(range(256)) + b"\r\n", R(Status.VALUE, {"f": b"0"}, bytes(range(256)))),
    # 20 digits, the length of the largest 64-bit size, is still a size (21 is refused, below).
    ("VA 20 digit size", b"VA " + b"0" * 19 + b"3\r\nabc\r\n", R(Status.VALUE, value=b"abc")),
    ("VA key", b"VA 1 kfoo\r\nx\r\n", R(Status.VALUE, {"k": b"foo"}, b"x")),
    ("VA base64 key", b"VA 1 kYSBi b\r\nx\r\n", R(Status.VALUE, {"k": b"YSBi", "b": b""}, b"x")),
    ("VA win", b"VA 0 W\r\n\r\n", R(Status.VALUE, {"W": b""}, b"")),
    ("VA stale, won", b"VA 3 X Z c9\r\nold\r\n", R(Status.VALUE, {"X": b"", "Z": b"", "c": b"9"}, b"old")),
    ("ma VA", b"VA 2 O3\r\n42\r\n", R(Status.VALUE, {"O": b"3"}, b"42")),
    ("HD", b"HD\r\n", R(Status.OK)),
    ("HD opaque", b"HD O123\r\n", R(Status.OK, {"O": b"123"})),
    ("HD flags", b"HD c7 f1 t-1 s0 kfoo O1\r\n",
     R(Status.OK, {"c": b"7", "f": b"1", "t": b"-1", "s": b"0", "k": b"foo", "O": b"1"})),
    ("HD win", b"HD W O2\r\n", R(Status.OK, {"W": b"", "O": b"2"})),
    ("EN", b"EN\r\n", R(Status.MISS)),
    ("EN opaque key", b"EN O9 kfoo\r\n", R(Status.MISS, {"O": b"9", "k": b"foo"})),
    ("EN base64 key", b"EN kAAEC b\r\n", R(Status.MISS, {"k": b"AAEC", "b": b""})),
    ("NS", b"NS\r\n", R(Status.NOT_STORED)),
    ("NS opaque", b"NS O1\r\n", R(Status.NOT_STORED, {"O": b"1"})),
    ("EX", b"EX O2\r\n", R(Status.EXISTS, {"O": b"2"})),
    ("NF", b"NF O3\r\n", R(Status.NOT_FOUND, {"O": b"3"})),
    ("MN", b"MN\r\n", R(Status.NOOP)),
    ("MN opaque", b"MN O4\r\n", R(Status.NOOP, {"O": b"4"})),
    ("opaque max", b"HD O" + b"~" * 31 + b"\r\n", R(Status.OK, {"O": b"~" * 31})),
    ("ERROR", b"ERROR\r\n", R(Status.ERROR, text=b"")),
    ("CLIENT_ERROR", b"CLIENT_ERROR bad command line format\r\n",
     R(Status.CLIENT_ERROR, text=b"bad command line format")),
    ("SERVER_ERROR", b"SERVER_ERROR out of memory storing object\r\n",
     R(Status.SERVER_ERROR, text=b"out of memory storing object")),
    ("SERVER_ERROR too large", b"SERVER_ERROR object too large for cache\r\n",
     R(Status.SERVER_ERROR, text=b"object too large for cache")),
    ("VERSION", b"VERSION 1.6.18\r\n", R(Status.VERSION, text=b"1.6.18")),
    ("VERSION words", b"VERSION 1.6.18 custom build\r\n", R(Status.VERSION, text=b"1.6.18 custom build")),
    ("OK", b"OK\r\n", R(Status.TEXT_OK)),
    ("RESET", b"RESET\r\n", R(Status.RESET)),
    ("STAT", b"STAT pid 1\r\nSTAT version 1.6.18\r\nSTAT rusage_user 0.123\r\nEND\r\n",
     R(Status.STATS, stats={"pid": "1", "version": "1.6.18", "rusage_user": "0.123"})),
    ("STAT one", b"STAT sizes_status disabled\r\nEND\r\n", R(Status.STATS, stats={"sizes_status": "disabled"})),
    ("STAT spaces in value", b"STAT a b c\r\nEND\r\n", R(Status.STATS, stats={"a": "b c"})),
    ("STAT empty value", b"STAT ssl_chain_cert \r\nEND\r\n", R(Status.STATS, stats={"ssl_chain_cert": ""})),
    ("STAT conns", b"STAT 14:addr tcp:127.0.0.1:43727\r\nEND\r\n", R(Status.STATS, stats={"14:addr": "tcp:127.0.0.1:43727"})),
    ("ITEM cachedump", b"ITEM foo [3 b; 0 s]\r\nITEM bar [1 b; 0 s]\r\nEND\r\n",
     R(Status.STATS, stats={"foo": "[3 b; 0 s]", "bar": "[1 b; 0 s]"})),
    ("END", b"END\r\n", R(Status.STATS, stats={})),
    ("flags at the letter bounds", b"HD A1 Z a z9\r\n", R(Status.OK, {"A": b"1", "Z": b"", "a": b"", "z": b"9"})),
    ("VA flags at the letter bounds", b"VA 1 A Z2 a z\r\nx\r\n", R(Status.VALUE, {"A": b"", "Z": b"2", "a": b"", "z": b""}, b"x")),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in RESPONSES], ids=[c[0] for c in RESPONSES])
def test_each_response_form_parses_the_same_however_fed(data: bytes, expected: Response) -> None:
    assert parse_every_way(data) == [expected]


def test_a_stream_of_every_response_form_parses_in_order() -> None:
    stream = b"".join(data for _, data, _ in RESPONSES)
    assert parse_every_way(stream) == [expected for _, _, expected in RESPONSES]


def test_a_pipelined_batch_parses_in_order() -> None:
    stream = (
        b"HD O1\r\n"  # ms
        b"VA 6 f0 O2\r\n\r\nmn\r\n\r\n"  # mg of a value holding "\r\nmn\r\n"
        b"EN O3\r\n"
        b"NF O4\r\n"
        b"VA 1 O5\r\n7\r\n"  # ma
        b"STAT curr_items 1\r\nEND\r\n"  # stats between meta responses
        b"SERVER_ERROR out of memory\r\n"
        b"MN O6\r\n"
    )
    assert parse_every_way(stream) == [
        R(Status.OK, {"O": b"1"}),
        R(Status.VALUE, {"f": b"0", "O": b"2"}, b"\r\nmn\r\n"),
        R(Status.MISS, {"O": b"3"}),
        R(Status.NOT_FOUND, {"O": b"4"}),
        R(Status.VALUE, {"O": b"5"}, b"7"),
        R(Status.STATS, stats={"curr_items": "1"}),
        R(Status.SERVER_ERROR, text=b"out of memory"),
        R(Status.NOOP, {"O": b"6"}),
    ]


@pytest.mark.parametrize(
    "partial",
    [b"H", b"HD", b"HD\r", b"HD O1", b"VA 3", b"VA 3\r\n", b"VA 3\r\nba", b"VA 3\r\nbar", b"VA 3\r\nbar\r",
     b"STAT a 1\r\n", b"STAT a 1\r\nEN", b"STAT a 1\r\nEND\r", b"VERSION 1.6"],
)
def test_incomplete_input_waits_for_more(partial: bytes) -> None:
    responses, failed, left = feed_every_way(partial)
    assert (responses, failed) == ([], False)
    # STAT lines already read are held in the parser's block state, not in its buffer.
    assert left <= len(partial)
    assert left > 0 or partial.endswith(b"STAT a 1\r\n")


def test_parser_resumes_after_waiting() -> None:
    parser = ResponseParser()
    parser.feed(b"STAT a 1\r\nSTAT b")
    assert parser.next_response() is None
    assert parser.next_response() is None  # asking again changes nothing
    parser.feed(b" 2\r\nEND\r\nVA 2\r\nx")
    assert parser.next_response() == R(Status.STATS, stats={"a": "1", "b": "2"})
    assert parser.next_response() is None
    assert parser.buffered == len(b"VA 2\r\nx")
    parser.feed(b"y\r\n")
    assert parser.next_response() == R(Status.VALUE, value=b"xy")
    assert parser.next_response() is None
    assert parser.buffered == 0


def test_opaque_property() -> None:
    assert parse_every_way(b"HD O77\r\n")[0].opaque == b"77"
    assert parse_every_way(b"HD\r\n")[0].opaque is None
    assert parse_every_way(b"ERROR\r\n")[0].opaque is None


def test_large_value_in_chunks() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB, with CRLFs and everything else inside
    data = b"VA %d O1\r\n%b\r\nMN\r\n" % (len(value), value)
    parser = ResponseParser()
    out = []
    for i in range(0, len(data), 65536):
        parser.feed(data[i : i + 65536])
        while (r := parser.next_response()) is not None:
            out.append(r)
    assert out == [R(Status.VALUE, {"O": b"1"}, value), R(Status.NOOP)]
    assert parser.buffered == 0


def test_max_value_len_is_inclusive() -> None:
    assert parse_every_way(b"VA 10\r\n0123456789\r\n", max_value_len=10) == [R(Status.VALUE, value=b"0123456789")]
    # Refused as soon as the header is complete: no need to buffer the oversized data.
    parser = ResponseParser(max_value_len=10)
    parser.feed(b"VA 11\r\n")
    with pytest.raises(ProtocolError, match="11"):
        parser.next_response()


def test_line_of_exactly_max_line_len_is_accepted_however_fed() -> None:
    flag = b" k" + b"x" * (MAX_LINE_LEN - len(b"HD k"))
    line = b"HD" + flag
    assert len(line) == MAX_LINE_LEN
    assert parse_every_way(line + b"\r\n", every_split=False) == [R(Status.OK, {"k": flag[2:]})]


def test_line_of_max_line_len_plus_one_is_rejected_however_fed() -> None:
    line = b"HD k" + b"x" * (MAX_LINE_LEN + 1 - len(b"HD k"))
    assert len(line) == MAX_LINE_LEN + 1
    assert reject_every_way(line + b"\r\n", every_split=False) == []


def test_endless_line_without_crlf_is_rejected_without_waiting_for_crlf() -> None:
    for tail in (b"", b"\r"):
        parser = ResponseParser()
        parser.feed(b"HD O1\r\n" + b"z" * (MAX_LINE_LEN + 1) + tail)
        assert parser.next_response() == R(Status.OK, {"O": b"1"})
        with pytest.raises(ProtocolError, match="longer than"):
            parser.next_response()


# --- malformed responses --------------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("unknown line", b"BOGUS\r\n"),
    ("lowercase status", b"hd\r\n"),
    ("empty line", b"\r\n"),
    ("text protocol VALUE", b"VALUE foo 0 3\r\nbar\r\nEND\r\n"),
    ("text protocol STORED", b"STORED\r\n"),
    ("VERSION without version", b"VERSION\r\n"),
    ("OK with trailer", b"OK now\r\n"),
    ("leading space", b" HD\r\n"),
    ("bare LF", b"HD\nHD\r\n"),
    ("lone STAT name", b"STAT x\r\n"),
    ("MEMLIMIT line", b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"),
    ("PREFIX line", b"PREFIX foo get 1 hit 0 set 0 del 0\r\nEND\r\n"),
    ("VA no size", b"VA\r\n"),
    ("VA size not a number", b"VA x\r\nabc\r\n"),
    ("VA negative size", b"VA -1\r\n\r\n"),
    ("VA signed size", b"VA +3\r\nabc\r\n"),
    ("VA size with suffix", b"VA 3a\r\nabc\r\n"),
    ("VA double space", b"VA  3\r\nabc\r\n"),
    ("VA unicode digits", "VA ３\r\nabc\r\n".encode()),
    ("VA 5000 digit size", b"VA " + b"9" * 5000 + b"\r\n"),
    ("VA 21 digit size", b"VA " + b"0" * 20 + b"3\r\nabc\r\n"),
    ("VA data then garbage", b"VA 3\r\nbarXY"),
    ("VA data then LF CR", b"VA 3\r\nbar\n\r"),
    ("VA data longer than size", b"VA 2\r\nbar\r\n"),
    ("VA data shorter than size", b"VA 4\r\nbar\r\nMN\r\n"),
    ("VA bad flag", b"VA 1 5\r\nx\r\n"),
    ("flag starting with a digit", b"HD 1\r\n"),
    # protocol.txt: a flag is one letter (A-Z, a-z); the bytes just outside both ranges are not.
    ("flag starting with @", b"HD @1\r\n"),
    ("flag starting with [", b"HD [1\r\n"),
    ("flag starting with `", b"EN `\r\n"),
    ("flag starting with {", b"HD {\r\n"),
    ("flag starting with punctuation", b"EN -\r\n"),
    ("flag starting with a high byte", b"HD \xffx\r\n"),
    ("double space between flags", b"HD  O1\r\n"),
    ("trailing space", b"HD \r\n"),
    ("garbage inside STAT block", b"STAT a 1\r\nHD\r\nEND\r\n"),
    ("short STAT inside block", b"STAT a 1\r\nSTAT b\r\nEND\r\n"),
    ("VA inside STAT block", b"STAT a 1\r\nVA 1\r\nx\r\nEND\r\n"),
    ("END with trailer in block", b"STAT a 1\r\nEND \r\n"),
    ("ERROR inside STAT block", b"STAT a 1\r\nERROR\r\n"),
]


@pytest.mark.parametrize("data", [d for _, d in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_response_raises_protocol_error_however_fed(data: bytes) -> None:
    assert reject_every_way(data) == []


@pytest.mark.parametrize("data", [d for _, d in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_good_responses_before_the_bad_bytes_still_come_out(data: bytes) -> None:
    prefix = b"HD O1\r\nVA 2 O2\r\nok\r\n"
    assert reject_every_way(prefix + data) == [R(Status.OK, {"O": b"1"}), R(Status.VALUE, {"O": b"2"}, b"ok")]


def test_value_over_max_value_len_raises_however_fed() -> None:
    assert reject_every_way(b"VA 11\r\n" + b"x" * 11 + b"\r\n", max_value_len=10) == []
    assert reject_every_way(b"MN\r\nVA 1073741825\r\n") == [R(Status.NOOP)]


# --- hypothesis: arbitrary and generated streams -----------------------------------------------

_fragments = st.sampled_from(
    [b"VA ", b"VA 3", b"VA 0", b"HD", b"EN", b"NS", b"EX", b"NF", b"MN", b"OK", b"RESET", b"END", b"ERROR",
     b"CLIENT_ERROR x", b"SERVER_ERROR y", b"VERSION 1", b"STAT ", b"STAT a 1", b"ITEM k v", b" O1", b" k",
     b" b", b" W", b" 3", b" ", b"  ", b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"3", b"99999999999", b"abc", b"\x00"]
)
_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(_fragments, st.binary(max_size=4)), max_size=60).map(b"".join),
)


@settings(max_examples=1500, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0, max_value=300), max_size=8), st.sampled_from([None, 0, 5, 100]))
def test_arbitrary_bytes_give_responses_or_protocol_error(data: bytes, cuts: list[int], max_value: int | None) -> None:
    points = sorted({c for c in cuts if c <= len(data)} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    whole = _run([data], max_value)
    split = _run(chunks, max_value)
    single = _run([data[i : i + 1] for i in range(len(data))], max_value)
    for outcome in (whole, split, single):
        responses, _, _ = outcome
        # Each response consumes at least "XX\r\n": bounded work for bounded input.
        assert len(responses) <= len(data) // 4
    assert split[0] == whole[0] == single[0]
    assert (split[1] is None) == (whole[1] is None) == (single[1] is None)
    if whole[1] is None:
        assert split[2] == whole[2] == single[2] <= len(data)


_flag_letters = st.sampled_from("bcfhklstOWXZ")
_flag_tokens = st.binary(max_size=12).map(lambda b: bytes(c for c in b if 0x20 < c < 0x7F))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_flag_letters, _flag_tokens, max_size=6),
    st.binary(max_size=40),
    st.sampled_from([b"VA", b"HD", b"EN", b"NS", b"EX", b"NF", b"MN"]),
)
def test_generated_meta_responses_parse_back(flags: dict[str, bytes], value: bytes, head: bytes) -> None:
    line = head
    if head == b"VA":
        line += b" %d" % len(value)
        if flags.get("s", b"").isdigit():
            # protocol.txt: `s` is the item's size; a VA whose s says otherwise is refused.
            flags = {**flags, "s": b"%d" % len(value)}
    line += b"".join(b" " + k.encode() + v for k, v in flags.items())
    data = line + b"\r\n" + (value + b"\r\n" if head == b"VA" else b"")
    status = {b"VA": Status.VALUE, b"HD": Status.OK, b"EN": Status.MISS, b"NS": Status.NOT_STORED,
              b"EX": Status.EXISTS, b"NF": Status.NOT_FOUND, b"MN": Status.NOOP}[head]
    expected = R(status, flags, value if head == b"VA" else None)
    # Twice in a row: the parser's state after one response is clean.
    assert parse_every_way(data + data) == [expected, expected]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_:0123456789", min_size=1, max_size=12),
                       st.text("abcdefghij 0123456789.:-", max_size=12), max_size=8))
def test_generated_stat_blocks_parse_back(stats: dict[str, str]) -> None:
    data = b"".join(b"STAT %s %s\r\n" % (k.encode(), v.encode()) for k, v in stats.items()) + b"END\r\n"
    assert parse_every_way(data) == [R(Status.STATS, stats=stats)]
