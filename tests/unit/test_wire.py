"""clientlib.wire: the msgpack frame schema between workers and the broker (schema version 1).

Every op round-trips through encode_request/decode_request and every documented result form
through encode_reply/decode_reply. Every kind of malformed frame gives WireError with the
documented code, carrying the request id whenever the frame's header could be read. Arbitrary
bytes give a frame or WireError, never another exception.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientlib.wire import (
    DEFAULT_MAX_FRAME,
    FIRST_ERROR,
    KEYED_OPS,
    MAX_KEY_LEN,
    MAX_OPS,
    NOREPLY,
    STORE_OPS,
    VERSION,
    Code,
    Op,
    ReplyFrame,
    RequestFrame,
    WireError,
    check_op,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
)

pytestmark = pytest.mark.unit

U64_MAX = 2**64 - 1
DAY_MS = 86_400_000


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- round trips -------------------------------------------------------------------------------

OPS: list[list[Any]] = [
    [Op.GET, b"k"],
    [Op.GETS, b"k"],
    [Op.GAT, b"k", 10],
    [Op.GATS, b"k", 0],
    [Op.SET, b"k", b"v", 0, 0],
    [Op.ADD, b"k", b"", 1, -1],
    [Op.REPLACE, b"k", b"\r\nmn\r\n", 2**32 - 1, 2**31 - 1],
    [Op.APPEND, b"k", bytes(range(256)), 3, 4],
    [Op.PREPEND, b"k", b"x", 5, 6],
    [Op.CAS, b"k", b"v", 7, 8, U64_MAX],
    [Op.DELETE, b"k"],
    [Op.INCR, b"k", 1],
    [Op.DECR, b"k", U64_MAX],
    [Op.TOUCH, b"k", -1],
    [Op.LEASE_GET, b"k", 30, 0],
    [Op.LEASE_GET, b"k", 1, 2**31 - 1],
    [Op.INVALIDATE, b"k", 30],
    [Op.VERSION],
    [Op.STATS, []],
    [Op.STATS, [b"settings"]],
    [Op.STATS, [b"cachedump", b"1", b"10"]],
    [Op.FLUSH_ALL, 0],
    [Op.FLUSH_ALL, 30],
    [Op.CACHE_MEMLIMIT, 64],
    [Op.PING],
    [Op.BROKER_STATS],
]


def test_the_round_trip_table_covers_every_op() -> None:
    # GET_MANY must be its frame's only op and decodes with its keys as `gets`: its own round
    # trips are in test_wire_get_many.py.
    assert {op[0] for op in OPS} == set(Op) - {Op.GET_MANY}


@pytest.mark.parametrize("op", OPS, ids=lambda op: f"{Op(op[0]).name}/{len(op)}" if isinstance(op, list) else None)
def test_each_op_round_trips(op: list[Any]) -> None:
    frame = decode_request(encode_request(42, [op], timeout_ms=250))
    assert frame == RequestFrame(42, 250, 0, [op])
    assert type(frame.ops[0][0]) is int
    assert not frame.noreply
    check_op(frame.ops[0])


def test_all_ops_in_one_frame_keep_their_order() -> None:
    frame = decode_request(encode_request(7, OPS))
    assert frame.ops == OPS
    assert frame.timeout_ms == 0 and frame.flags == 0


def test_a_frame_of_plain_gets_carries_its_keys() -> None:
    # `gets`: the keys, in order, when a frame of two or more ops holds only [GET, key] (a
    # get_many); None for anything else, which the broker then reads op by op.
    keys = [b"a", b"k" * 250, b"a"]
    assert decode_request(encode_request(1, [[Op.GET, k] for k in keys])).gets == keys
    assert decode_request(encode_request(1, [[Op.GET, b"a"], [Op.GET, b"b"]])).gets == [b"a", b"b"]
    assert decode_request(encode_request(1, [[Op.GET, b"a"]])).gets is None  # one op
    assert decode_request(encode_request(1, [[Op.GET, b"a"], [Op.GETS, b"b"]])).gets is None
    assert decode_request(encode_request(1, [[Op.GETS, b"a"], [Op.GET, b"b"]])).gets is None
    assert decode_request(encode_request(1, [[Op.GET, b"a"], [Op.DELETE, b"b"], [Op.GET, b"c"]])).gets is None
    assert decode_request(encode_request(1, [[Op.GET, b"a"], [Op.VERSION]])).gets is None


@pytest.mark.parametrize("req_id", [0, 1, 2**32, U64_MAX])
@pytest.mark.parametrize("timeout_ms", [0, 1, DAY_MS])
def test_header_bounds_round_trip(req_id: int, timeout_ms: int) -> None:
    assert decode_request(encode_request(req_id, [[Op.PING]], timeout_ms)) == RequestFrame(
        req_id, timeout_ms, 0, [[Op.PING]]
    )


def test_noreply_flag() -> None:
    frame = decode_request(encode_request(1, [[Op.SET, b"k", b"v", 0, 0]], flags=NOREPLY))
    assert frame.flags == NOREPLY and frame.noreply


def test_frame_layout_is_the_documented_array() -> None:
    data = encode_request(9, [[Op.GET, b"k"]], timeout_ms=5, flags=NOREPLY)
    assert msgpack.unpackb(data, raw=False) == [VERSION, 9, 5, NOREPLY, [[Op.GET, b"k"]]]
    # Keys and values travel as msgpack bin, not str.
    assert b"\xc4\x01k" in data


def test_key_length_limits() -> None:
    for op in KEYED_OPS:
        args = next(o for o in OPS if o[0] == op)[2:]
        longest = [op, b"k" * MAX_KEY_LEN, *args]
        assert decode_request(encode_request(1, [longest])).ops == [longest]
        shortest = [op, b"k", *args]
        assert decode_request(encode_request(1, [shortest])).ops == [shortest]


def test_a_value_close_to_the_frame_limit_round_trips() -> None:
    value = b"\xab" * (DEFAULT_MAX_FRAME - 64)
    frame = decode_request(encode_request(1, [[Op.SET, b"k", value, 0, 0]]))
    assert frame.ops[0][2] == value


def test_store_ops_are_the_value_carrying_ops() -> None:
    assert STORE_OPS == {Op.SET, Op.ADD, Op.REPLACE, Op.APPEND, Op.PREPEND, Op.CAS}
    assert KEYED_OPS == {
        Op.GET, Op.GETS, Op.GAT, Op.GATS, Op.LEASE_GET, Op.DELETE, Op.INCR, Op.DECR, Op.TOUCH, Op.INVALIDATE,
    } | STORE_OPS


RESULTS: list[tuple[str, list[Any]]] = [
    ("get hit", [Code.OK, b"value", 0]),
    ("get hit binary", [Code.OK, bytes(range(256)), 2**32 - 1]),
    ("get hit empty", [Code.OK, b"", 5]),
    ("gets hit", [Code.OK, b"v", 1, U64_MAX]),
    ("lease get hit", [Code.OK, b"", 0, 4, 1]),
    ("lease get stale, taken", [Code.OK, b"v", 3, U64_MAX, 6]),
    ("miss", [Code.MISS]),
    ("stored", [Code.OK]),
    ("not stored", [Code.NOT_STORED]),
    ("exists", [Code.EXISTS]),
    ("not found", [Code.NOT_FOUND]),
    ("incr", [Code.OK, U64_MAX]),
    ("version", [Code.OK, {"127.0.0.1:11211": "1.6.18", "unix:/tmp/mc.sock": "1.6.18"}]),
    ("stats", [Code.OK, {"127.0.0.1:11211": {"pid": "1", "version": "1.6.18"}}]),
    ("flush_all", [Code.OK, {"127.0.0.1:11211": True, "127.0.0.1:11212": True}]),
    ("ping", [Code.OK, "PONG"]),
    ("broker_stats", [Code.OK, {"requests": 10, "uptime": 1.5, "servers": [{"name": "a", "up": True}]}]),
] + [(f"failure {code.name}", [code, f"{code.name} message"]) for code in Code if code >= FIRST_ERROR]


@pytest.mark.parametrize("result", [r for _, r in RESULTS], ids=[n for n, _ in RESULTS])
def test_each_result_form_round_trips(result: list[Any]) -> None:
    reply = decode_reply(encode_reply(42, [result]))
    assert reply == ReplyFrame(42, Code.OK, [result])
    assert reply.code is Code.OK


def test_all_results_in_one_reply() -> None:
    results = [r for _, r in RESULTS]
    assert decode_reply(encode_reply(U64_MAX, results)) == ReplyFrame(U64_MAX, Code.OK, results)


def test_empty_results_list_is_a_valid_reply() -> None:
    assert decode_reply(encode_reply(1, [])) == ReplyFrame(1, Code.OK, [])


@pytest.mark.parametrize("code", [c for c in Code if c >= FIRST_ERROR], ids=lambda c: c.name)
def test_each_frame_error_round_trips(code: Code) -> None:
    reply = decode_reply(encode_error(5, code, "why it failed"))
    assert reply == ReplyFrame(5, code, "why it failed")
    assert type(reply.code) is Code


def test_failure_codes_are_the_ones_at_or_above_first_error() -> None:
    assert [c for c in Code if c < FIRST_ERROR] == [Code.OK, Code.MISS, Code.NOT_STORED, Code.EXISTS, Code.NOT_FOUND]


# --- malformed requests ------------------------------------------------------------------------

GOOD = [[Op.GET, b"k"]]
BAD = Code.BAD_REQUEST
UNSUPPORTED = Code.UNSUPPORTED_VERSION


def req(*fields: Any) -> bytes:
    return pack(list(fields))


def frame_with(op: list[Any]) -> bytes:
    return req(VERSION, 5, 0, 0, [op])


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth):
        out = [out]
    return out


DEEP_LIST = _nested(1000)


MALFORMED_REQUESTS: list[tuple[str, bytes, Code, int | None]] = [
    # not msgpack at all
    ("empty", b"", BAD, None),
    ("reserved byte", b"\xc1", BAD, None),
    ("truncated", encode_request(5, GOOD)[:-1], BAD, 5),
    ("text", b"mg foo v\r\n", BAD, None),
    ("trailing bytes", encode_request(5, GOOD) + b"\x00", BAD, 5),
    ("two frames", encode_request(5, GOOD) * 2, BAD, 5),
    # wrong top-level type
    ("int", pack(1), BAD, None),
    ("str", pack("frame"), BAD, None),
    ("bin", pack(b"frame"), BAD, None),
    ("nil", pack(None), BAD, None),
    ("map", pack({"v": 1}), BAD, None),
    ("empty array", pack([]), BAD, None),
    ("one element", pack([1]), BAD, None),
    # wrong version: the id is still reported when it is readable
    ("version 2", req(2, 5, 0, 0, GOOD), UNSUPPORTED, 5),
    ("version 0", req(0, 5, 0, 0, GOOD), UNSUPPORTED, 5),
    ("version true", req(True, 5, 0, 0, GOOD), UNSUPPORTED, 5),
    ("version float", req(1.0, 5, 0, 0, GOOD), UNSUPPORTED, 5),
    ("version str", req("1", 5, 0, 0, GOOD), UNSUPPORTED, 5),
    ("version 2 and bad id", req(2, -1, 0, 0, GOOD), UNSUPPORTED, None),
    ("old short frame", req(0, 5), UNSUPPORTED, 5),
    # missing or extra fields
    ("no ops", req(VERSION, 5, 0, 0), BAD, 5),
    ("header only", req(VERSION, 5), BAD, 5),
    ("extra field", req(VERSION, 5, 0, 0, GOOD, 0), BAD, 5),
    # bad request id
    ("negative id", req(VERSION, -1, 0, 0, GOOD), BAD, None),
    ("str id", req(VERSION, "5", 0, 0, GOOD), BAD, None),
    ("bin id", req(VERSION, b"5", 0, 0, GOOD), BAD, None),
    ("float id", req(VERSION, 5.0, 0, 0, GOOD), BAD, None),
    ("bool id", req(VERSION, True, 0, 0, GOOD), BAD, None),
    ("nil id", req(VERSION, None, 0, 0, GOOD), BAD, None),
    # bad timeout
    ("negative timeout", req(VERSION, 5, -1, 0, GOOD), BAD, 5),
    ("timeout over a day", req(VERSION, 5, DAY_MS + 1, 0, GOOD), BAD, 5),
    ("float timeout", req(VERSION, 5, 1.5, 0, GOOD), BAD, 5),
    ("bool timeout", req(VERSION, 5, True, 0, GOOD), BAD, 5),
    ("str timeout", req(VERSION, 5, "100", 0, GOOD), BAD, 5),
    ("nil timeout", req(VERSION, 5, None, 0, GOOD), BAD, 5),
    # unknown flags
    ("flag bit 1", req(VERSION, 5, 0, 2, GOOD), BAD, 5),
    ("flags 3", req(VERSION, 5, 0, 3, GOOD), BAD, 5),
    ("high flag", req(VERSION, 5, 0, 1 << 63, GOOD), BAD, 5),
    ("negative flags", req(VERSION, 5, 0, -1, GOOD), BAD, 5),
    ("bool flags", req(VERSION, 5, 0, True, GOOD), BAD, 5),
    ("float flags", req(VERSION, 5, 0, 1.0, GOOD), BAD, 5),
    # ops
    ("empty ops", req(VERSION, 5, 0, 0, []), BAD, 5),
    ("ops not an array", req(VERSION, 5, 0, 0, b"ops"), BAD, 5),
    ("nil ops", req(VERSION, 5, 0, 0, None), BAD, 5),
    ("op not an array", req(VERSION, 5, 0, 0, [Op.PING]), BAD, 5),
    ("empty op", frame_with([]), BAD, 5),
    ("unknown op 99", frame_with([99, b"k"]), BAD, 5),
    ("unknown op 0", frame_with([0]), BAD, 5),
    ("negative op", frame_with([-1]), BAD, 5),
    ("op by name", frame_with(["GET", b"k"]), BAD, 5),
    ("op as bool", frame_with([True, b"k"]), BAD, 5),
    ("op as float", frame_with([1.0, b"k"]), BAD, 5),
    ("op as bin", frame_with([b"\x01", b"k"]), BAD, 5),
    ("one bad op among good ones", req(VERSION, 5, 0, 0, [[Op.PING], [Op.GET, b"k"], [Op.GET]]), BAD, 5),
    # wrong arity
    ("get without key", frame_with([Op.GET]), BAD, 5),
    ("get with extra", frame_with([Op.GET, b"k", 1]), BAD, 5),
    ("gat without ttl", frame_with([Op.GAT, b"k"]), BAD, 5),
    ("set short", frame_with([Op.SET, b"k", b"v", 0]), BAD, 5),
    ("set long", frame_with([Op.SET, b"k", b"v", 0, 0, 0]), BAD, 5),
    ("cas without cas", frame_with([Op.CAS, b"k", b"v", 0, 0]), BAD, 5),
    ("incr without delta", frame_with([Op.INCR, b"k"]), BAD, 5),
    ("version with arg", frame_with([Op.VERSION, 1]), BAD, 5),
    ("stats without list", frame_with([Op.STATS]), BAD, 5),
    ("flush_all without delay", frame_with([Op.FLUSH_ALL]), BAD, 5),
    ("ping with arg", frame_with([Op.PING, b"x"]), BAD, 5),
    ("broker_stats with arg", frame_with([Op.BROKER_STATS, 0]), BAD, 5),
    # wrong argument types
    ("str key", frame_with([Op.GET, "k"]), BAD, 5),
    ("int key", frame_with([Op.DELETE, 1]), BAD, 5),
    ("nil key", frame_with([Op.GETS, None]), BAD, 5),
    ("list key", frame_with([Op.GET, [b"k"]]), BAD, 5),
    ("str value", frame_with([Op.SET, b"k", "v", 0, 0]), BAD, 5),
    ("nil value", frame_with([Op.ADD, b"k", None, 0, 0]), BAD, 5),
    ("bool flags arg", frame_with([Op.SET, b"k", b"v", False, 0]), BAD, 5),
    ("bool ttl", frame_with([Op.SET, b"k", b"v", 0, True]), BAD, 5),
    ("float ttl", frame_with([Op.TOUCH, b"k", 1.0]), BAD, 5),
    ("bin ttl", frame_with([Op.GAT, b"k", b"1"]), BAD, 5),
    ("bool cas", frame_with([Op.CAS, b"k", b"v", 0, 0, True]), BAD, 5),
    ("bool delta", frame_with([Op.INCR, b"k", True]), BAD, 5),
    ("str delta", frame_with([Op.DECR, b"k", "1"]), BAD, 5),
    ("stats bin", frame_with([Op.STATS, b"settings"]), BAD, 5),
    ("stats str arg", frame_with([Op.STATS, ["settings"]]), BAD, 5),
    ("stats int arg", frame_with([Op.STATS, [1]]), BAD, 5),
    ("stats nested list", frame_with([Op.STATS, [[b"settings"]]]), BAD, 5),
    ("nil delay", frame_with([Op.FLUSH_ALL, None]), BAD, 5),
    ("bool memlimit", frame_with([Op.CACHE_MEMLIMIT, True]), BAD, 5),
    # key length
    ("empty key", frame_with([Op.GET, b""]), BAD, 5),
    ("empty key on set", frame_with([Op.SET, b"", b"v", 0, 0]), BAD, 5),
    ("oversized key", frame_with([Op.GET, b"k" * (MAX_KEY_LEN + 1)]), BAD, 5),
    ("oversized key on cas", frame_with([Op.CAS, b"k" * (MAX_KEY_LEN + 1), b"v", 0, 0, 1]), BAD, 5),
    # maps and ext types: rejected by the unpacker; the id is still read from the frame's first bytes
    ("map in ops", req(VERSION, 5, 0, 0, [[Op.STATS, [{"a": 1}]]]), BAD, 5),
    ("map as op", req(VERSION, 5, 0, 0, [{"op": 1}]), BAD, 5),
    ("map as ops", req(VERSION, 5, 0, 0, {"op": 1}), BAD, 5),
    ("empty map as stats arg", req(VERSION, 5, 0, 0, [[Op.STATS, [{}]]]), BAD, 5),
    ("ext type", req(VERSION, 5, 0, 0, [[Op.GET, msgpack.ExtType(1, b"k")]]), BAD, 5),
    ("ext id", req(VERSION, msgpack.ExtType(0, b"\x05"), 0, 0, GOOD), BAD, None),
    ("timestamp", req(VERSION, 5, msgpack.Timestamp(1), 0, GOOD), BAD, 5),
    ("deep nesting", b"\x91" * 100_000 + b"\xc0", BAD, None),
    # Within msgpack's depth limit, but deeper than repr() can go: the message must not recurse.
    ("op code nested 1000 deep", frame_with([DEEP_LIST]), BAD, 5),
    ("key nested 1000 deep", frame_with([Op.GET, DEEP_LIST]), BAD, 5),
    ("flags nested 1000 deep", req(VERSION, 5, 0, DEEP_LIST, GOOD), BAD, 5),
    ("version nested 1000 deep", req(DEEP_LIST, 5, 0, 0, GOOD), UNSUPPORTED, 5),
]


@pytest.mark.parametrize(
    ("data", "code", "req_id"), [c[1:] for c in MALFORMED_REQUESTS], ids=[c[0] for c in MALFORMED_REQUESTS]
)
def test_malformed_request_gives_wire_error(data: bytes, code: Code, req_id: int | None) -> None:
    with pytest.raises(WireError) as info:
        decode_request(data)
    assert info.value.code is code
    assert info.value.req_id == req_id
    assert str(info.value)
    assert isinstance(info.value, ValueError)


def test_frame_over_max_size() -> None:
    data = encode_request(5, [[Op.SET, b"k", b"v" * 100, 0, 0]])
    assert decode_request(data, max_frame=len(data)).req_id == 5
    with pytest.raises(WireError) as info:
        decode_request(data, max_frame=len(data) - 1)
    # The id is read from the frame's first bytes, so the sender gets an answer, not a timeout.
    assert (info.value.code, info.value.req_id) == (BAD, 5)
    with pytest.raises(WireError) as info:
        decode_request(encode_request(U64_MAX, [[Op.SET, b"k", b"v" * DEFAULT_MAX_FRAME, 0, 0]]))
    assert (info.value.code, info.value.req_id) == (BAD, U64_MAX)
    with pytest.raises(WireError) as info:
        decode_request(b"\xc1" * (DEFAULT_MAX_FRAME + 1))
    assert (info.value.code, info.value.req_id) == (BAD, None)


def test_too_many_ops() -> None:
    assert len(decode_request(encode_request(5, [[Op.PING]] * 10), max_ops=10).ops) == 10
    with pytest.raises(WireError) as info:
        decode_request(encode_request(5, [[Op.PING]] * 11), max_ops=10)
    assert info.value.code is BAD
    # The default limit, exactly and one past it.
    assert len(decode_request(encode_request(5, [[Op.PING]] * MAX_OPS)).ops) == MAX_OPS
    with pytest.raises(WireError) as info:
        decode_request(encode_request(5, [[Op.PING]] * (MAX_OPS + 1)))
    assert info.value.code is BAD


def test_check_op_on_its_own() -> None:
    for op in OPS:
        # As decoded: plain ints, not Op members.
        check_op([int(op[0]), *op[1:]])
    for bad in ([], None, [Op.GET], [Op.GET, "k"], [Op.GET, b""], [99], "GET", [Op.STATS, [1]]):
        with pytest.raises(WireError) as info:
            check_op(bad)
        assert info.value.code is BAD


# --- malformed replies -------------------------------------------------------------------------


def rep(*fields: Any) -> bytes:
    return pack(list(fields))


MALFORMED_REPLIES: list[tuple[str, bytes, Code, int | None]] = [
    ("empty", b"", BAD, None),
    ("reserved byte", b"\xc1", BAD, None),
    ("truncated", encode_reply(5, [[Code.OK]])[:-1], BAD, None),
    ("trailing bytes", encode_reply(5, [[Code.OK]]) + b"\xc0", BAD, None),
    ("int", pack(0), BAD, None),
    ("map", pack({"a": 1}), BAD, None),
    ("one element", pack([1]), BAD, None),
    ("version 2", rep(2, 5, Code.OK, []), UNSUPPORTED, 5),
    ("version str", rep("1", 5, Code.OK, []), UNSUPPORTED, 5),
    ("negative id", rep(VERSION, -1, Code.OK, []), BAD, None),
    ("str id", rep(VERSION, "5", Code.OK, []), BAD, None),
    ("bool id", rep(VERSION, False, Code.OK, []), BAD, None),
    ("missing payload", rep(VERSION, 5, Code.OK), BAD, 5),
    ("extra field", rep(VERSION, 5, Code.OK, [], 0), BAD, 5),
    ("str code", rep(VERSION, 5, "OK", []), BAD, 5),
    ("bool code", rep(VERSION, 5, False, []), BAD, 5),
    ("unknown code", rep(VERSION, 5, 99, []), BAD, 5),
    ("negative code", rep(VERSION, 5, -1, []), BAD, 5),
    ("OK with message", rep(VERSION, 5, Code.OK, "fine"), BAD, 5),
    ("OK with map", rep(VERSION, 5, Code.OK, {"a": [0]}), BAD, 5),
    ("result not an array", rep(VERSION, 5, Code.OK, [0]), BAD, 5),
    ("empty result", rep(VERSION, 5, Code.OK, [[Code.OK], []]), BAD, 5),
    ("result code str", rep(VERSION, 5, Code.OK, [["OK"]]), BAD, 5),
    ("result code bool", rep(VERSION, 5, Code.OK, [[True]]), BAD, 5),
    ("error without message", rep(VERSION, 5, Code.TIMEOUT, None), BAD, 5),
    ("error with bin message", rep(VERSION, 5, Code.TIMEOUT, b"late"), BAD, 5),
    ("error with results", rep(VERSION, 5, Code.OVERLOADED, [[Code.OK]]), BAD, 5),
    ("int map keys", rep(VERSION, 5, Code.OK, [[Code.OK, {1: "x"}]]), BAD, None),
    ("ext type", rep(VERSION, 5, Code.OK, [[Code.OK, msgpack.ExtType(3, b"x")]]), BAD, None),
    ("deep nesting", b"\x91" * 100_000 + b"\xc0", BAD, None),
]


@pytest.mark.parametrize(
    ("data", "code", "req_id"), [c[1:] for c in MALFORMED_REPLIES], ids=[c[0] for c in MALFORMED_REPLIES]
)
def test_malformed_reply_gives_wire_error(data: bytes, code: Code, req_id: int | None) -> None:
    with pytest.raises(WireError) as info:
        decode_reply(data)
    assert info.value.code is code
    assert info.value.req_id == req_id


def test_reply_over_max_size() -> None:
    data = encode_reply(5, [[Code.OK, b"x" * 100, 0]])
    assert decode_reply(data, max_frame=len(data)).req_id == 5
    with pytest.raises(WireError) as info:
        decode_reply(data, max_frame=len(data) - 1)
    assert info.value.code is BAD


# --- hypothesis --------------------------------------------------------------------------------

_msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=U64_MAX),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.sampled_from(list(Op)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
    ),
    max_leaves=30,
)
_ints = st.one_of(st.integers(min_value=-2, max_value=2**64 - 1), st.sampled_from([0, 1, 2, DAY_MS, DAY_MS + 1]))
_near_ops = st.lists(
    st.one_of(
        st.sampled_from(OPS),
        st.builds(lambda op, args: [op, *args], st.sampled_from(list(Op)), st.lists(_msgpack_values, max_size=6)),
        _msgpack_values,
    ),
    max_size=5,
)
_near_requests = st.builds(
    lambda v, rid, t, f, ops: pack([v, rid, t, f, ops]),
    st.sampled_from([VERSION, VERSION, VERSION, 2, True]),
    _ints,
    _ints,
    st.sampled_from([0, 0, NOREPLY, 2, -1]),
    _near_ops,
)
_near_replies = st.builds(
    lambda v, rid, code, payload: pack([v, rid, code, payload]),
    st.sampled_from([VERSION, VERSION, 2]),
    _ints,
    st.one_of(st.sampled_from(list(Code)), st.integers(-1, 100)),
    st.one_of(st.lists(st.one_of(st.lists(_msgpack_values, max_size=4), _msgpack_values), max_size=4), _msgpack_values),
)


def _check_request_decode(data: bytes) -> None:
    try:
        frame = decode_request(data)
    except WireError as exc:
        assert isinstance(exc.code, Code) and exc.code >= FIRST_ERROR
        assert exc.req_id is None or 0 <= exc.req_id <= U64_MAX
        return
    assert type(frame) is RequestFrame
    assert 0 <= frame.req_id <= U64_MAX and 0 <= frame.timeout_ms <= DAY_MS and frame.flags in (0, NOREPLY)
    assert 1 <= len(frame.ops) <= MAX_OPS
    for op in frame.ops:
        check_op(op)
    # What decodes re-encodes to an equal frame.
    assert decode_request(encode_request(frame.req_id, frame.ops, frame.timeout_ms, frame.flags)) == frame


def _check_reply_decode(data: bytes) -> None:
    try:
        frame = decode_reply(data)
    except WireError as exc:
        assert isinstance(exc.code, Code)
        assert exc.req_id is None or 0 <= exc.req_id <= U64_MAX
        return
    assert type(frame) is ReplyFrame and type(frame.code) is Code
    if frame.code is Code.OK:
        # Each result is [code, ...], or a GET_MANY hit's value alone (bin) when its client flags are 0.
        assert all(type(r) is bytes or (type(r) is list and r and type(r[0]) is int) for r in frame.payload)
    else:
        assert type(frame.payload) is str


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_to_decode_request(data: bytes) -> None:
    _check_request_decode(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_to_decode_reply(data: bytes) -> None:
    _check_reply_decode(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_near_requests, _msgpack_values.map(pack)))
def test_arbitrary_msgpack_to_decode_request(data: bytes) -> None:
    _check_request_decode(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_near_replies, _msgpack_values.map(pack)))
def test_arbitrary_msgpack_to_decode_reply(data: bytes) -> None:
    _check_reply_decode(data)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([encode_request(5, OPS), encode_reply(5, [r for _, r in RESULTS]), encode_error(5, Code.TIMEOUT, "t")]),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255), st.sampled_from(["flip", "insert", "delete"])),
             min_size=1, max_size=4),
)
def test_corrupted_valid_frames_give_a_frame_or_wire_error(data: bytes, edits: list[tuple[int, int, str]]) -> None:
    buf = bytearray(data)
    for pos, byte, kind in edits:
        i = pos % (len(buf) + 1)
        if kind == "insert":
            buf[i:i] = bytes([byte])
        elif buf and i < len(buf):
            if kind == "flip":
                buf[i] ^= byte or 1
            else:
                del buf[i]
    _check_request_decode(bytes(buf))
    _check_reply_decode(bytes(buf))
