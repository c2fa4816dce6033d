"""The GET_MANY op (clientlib/wire.py): a get_many's keys as one array, `[GET_MANY, [key, ...]]`,
the frame's only op, answered as one GET per key. Decoded on both of the request decoder's paths
(frames up to SMALL_FRAME bytes in one call; in larger ones the key array in one call when no byte
after its header could start another array, else key by key), with the same key rules as a
GET (1..MAX_KEY_LEN bytes), and every malformed one refused with an error that names it."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientlib.wire import (
    MAX_KEY_LEN, MAX_OPS, SMALL_FRAME, VERSION, Code, Op, RequestFrame, WireError, check_op, decode_request,
    encode_request,
)

pytestmark = pytest.mark.unit

GET_MANY = Op.GET_MANY


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame_of(ops: list[Any], req_id: int = 7) -> bytes:
    return pack([VERSION, req_id, 250, 0, ops])


def error_of(data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        decode_request(data)
    return info.value


def test_the_op_is_number_6() -> None:
    assert int(Op.GET_MANY) == 6
    assert frame_of([[GET_MANY, [b"a", b"b"]]]) == b"\x95\x01\x07\xcc\xfa\x00\x91\x92\x06\x92\xc4\x01a\xc4\x01b"


@pytest.mark.parametrize(
    "keys",
    [
        [b"a"],
        [b"a", b"b"],
        [b"%c" % (65 + i % 26) for i in range(85)],  # the most one-byte keys in a small frame
        [b"k%d" % i for i in range(100)],
        [b"x" * MAX_KEY_LEN] * 3,
        [b"k%d" % i for i in range(10_000)],
    ],
    ids=lambda keys: f"{len(keys)} keys",
)
def test_a_get_many_decodes_to_its_keys_as_gets(keys: list[bytes]) -> None:
    data = encode_request(42, [[GET_MANY, keys]], timeout_ms=250)
    frame = decode_request(data)
    assert frame == RequestFrame(42, 250, 0, [[GET_MANY, keys]], keys)
    assert frame.many
    assert frame.results_wanted() == len(keys)
    assert frame.each_op() == [[Op.GET, key] for key in keys]
    check_op(frame.ops[0])


def test_both_decoder_paths_take_it() -> None:
    small = frame_of([[GET_MANY, [b"k%d" % i for i in range(20)]]])
    large = frame_of([[GET_MANY, [b"k%d" % i for i in range(200)]]])
    assert len(small) <= SMALL_FRAME < len(large)
    assert decode_request(small).gets == [b"k%d" % i for i in range(20)]
    assert decode_request(large).gets == [b"k%d" % i for i in range(200)]


def test_other_frames_are_not_many() -> None:
    one = decode_request(frame_of([[Op.GET, b"a"]]))
    assert not one.many and one.gets is None and one.results_wanted() == 1 and one.each_op() == [[Op.GET, b"a"]]
    several = decode_request(frame_of([[Op.GET, b"a"], [Op.GET, b"b"]]))
    assert not several.many and several.gets == [b"a", b"b"] and several.results_wanted() == 2
    assert several.each_op() == [[Op.GET, b"a"], [Op.GET, b"b"]]


keys_st = st.lists(st.binary(min_size=1, max_size=MAX_KEY_LEN), min_size=2, max_size=300)


@settings(max_examples=200, deadline=None)
@given(keys_st)
def test_a_get_many_reads_as_the_frame_of_one_get_per_key(keys: list[bytes]) -> None:
    many = decode_request(frame_of([[GET_MANY, keys]]))
    each = decode_request(frame_of([[Op.GET, k] for k in keys]))
    assert many.gets == each.gets == keys
    assert many.each_op() == each.ops
    assert many.results_wanted() == each.results_wanted() == len(keys)


LONG = [b"k%05d" % i for i in range(100)]  # past SMALL_FRAME as one GET_MANY

REFUSED = {
    "no keys": ([[GET_MANY, []]], "1..100000 keys, got 0"),
    "an empty key": ([[GET_MANY, [b"a", b""]]], "key must have 1..250 bytes"),
    "a key too long": ([[GET_MANY, [b"a", b"x" * (MAX_KEY_LEN + 1)]]], "key must have 1..250 bytes"),
    "a str key": ([[GET_MANY, [b"a", "b"]]], "expected bytes keys, got str"),
    "an int key": ([[GET_MANY, [b"a", 5]]], "expected bytes keys, got int"),
    "a list key": ([[GET_MANY, [b"a", [b"b"]]]], "expected bytes keys, got list"),
    "keys not an array": ([[GET_MANY, b"ab"]], "expected list, got bytes"),
    "an extra argument": ([[GET_MANY, [b"a"], 1]], "takes 1 arguments, got 2"),
    "after another op": ([[Op.GET, b"x"], [GET_MANY, [b"a"]]], "must be its frame's only op"),
    "before another op": ([[GET_MANY, [b"a"]], [Op.GET, b"x"]], "must be its frame's only op"),
    "long, an empty key": ([[GET_MANY, [*LONG, b""]]], "key must have 1..250 bytes"),
    "long, an int key": ([[GET_MANY, [*LONG, 1]]], "expected bytes keys, got int"),
    "long, a nested array key": ([[GET_MANY, [*LONG, [1] * 17]]], "GET_MANY key"),
    "long, after another op": ([[Op.GET, b"x"], [GET_MANY, LONG]], "must be its frame's only op"),
    "long, before another op": ([[GET_MANY, LONG], [Op.GET, b"x"]], "must be its frame's only op"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_malformed_get_many_is_refused_with_its_reason(name: str) -> None:
    ops, reason = REFUSED[name]
    exc = error_of(frame_of(ops))
    assert exc.code == Code.BAD_REQUEST
    assert exc.req_id == 7
    assert reason in str(exc)


def test_a_truncated_or_overlong_get_many_is_refused() -> None:
    data = frame_of([[GET_MANY, LONG]])
    short = error_of(data[:-3])
    assert short.req_id == 7 and "GET_MANY declares 100 keys and holds 99" in str(short)
    extra = error_of(data + b"\x00")
    assert extra.req_id == 7 and "bytes after its GET_MANY op" in str(extra)


def test_a_key_count_past_the_bounds_is_refused_before_reading_keys() -> None:
    # Declares a million keys (past MAX_OPS and the frame's own size) and carries 200.
    head = b"\x95\x01\x07\x00\x00\x91\x92\x06\xdd" + struct.pack(">I", 1_000_000)
    exc = error_of(head + b"\xc4\x01a" * 200)
    assert exc.req_id == 7 and f"1..{MAX_OPS} keys, got 1000000" in str(exc)
    # Within MAX_OPS but more keys than the frame has bytes.
    head = b"\x95\x01\x07\x00\x00\x91\x92\x06\xdd" + struct.pack(">I", 90_000)
    exc = error_of(head + b"\xc4\x01a" * 200)
    assert "got 90000" in str(exc)


# --- review findings --------------------------------------------------------------------------


@pytest.mark.parametrize("count", [20, 200], ids=["small frame", "large frame"])
def test_decode_requests_max_ops_bounds_a_get_manys_keys_on_both_paths(count: int) -> None:
    """decode_request(max_ops=...) bounds a GET_MANY's keys as it bounds a frame's ops: the large
    frame's key by key path refused 20 keys over max_ops=10, the small frame's took them all."""
    data = frame_of([[GET_MANY, [b"k%d" % i for i in range(count)]]])
    assert (len(data) <= SMALL_FRAME) == (count == 20)
    with pytest.raises(WireError) as info:
        decode_request(data, max_ops=10)
    assert info.value.req_id == 7 and f"op GET_MANY takes 1..10 keys, got {count}" in str(info.value)
    assert decode_request(data, max_ops=count).gets == [b"k%d" % i for i in range(count)]


def test_an_undecodable_frame_without_get_many_is_not_blamed_on_one() -> None:
    value = b"\x92\x06" * 200  # a set's value that happens to hold those two bytes
    data = frame_of([[Op.SET, b"k", value, 0, 0]]) + b"\x00"  # trailing byte: undecodable
    exc = error_of(data)
    assert "undecodable frame" in str(exc) or "bytes after" in str(exc) or "extra" in str(exc).lower()
    assert "GET_MANY" not in str(exc)


# Found by review: the large frame's path once looked for the bytes 92 06 (fixarray of 2, fixint
# 6) and refused the same op in other valid msgpack, which a small frame decoded.
@pytest.mark.parametrize("op_head", [b"\x92\xcc\x06", b"\xdc\x00\x02\x06"], ids=["6 as uint8", "op as array16"])
def test_a_large_get_many_in_non_canonical_msgpack_decodes(op_head: bytes) -> None:
    keys = [b"k%05d" % i for i in range(100)]
    small = b"\x95\x01\x07\x00\x00\x91" + op_head + b"\x92\xc4\x01a\xc4\x01b"
    assert decode_request(small).gets == [b"a", b"b"]
    large = b"\x95\x01\x07\x00\x00\x91" + op_head + b"\xdc\x00\x64" + b"".join(pack(k) for k in keys)
    assert msgpack.unpackb(large)[4] == [[GET_MANY, keys]] and len(large) > SMALL_FRAME
    assert decode_request(large).gets == keys


# --- the large frame's key array in one msgpack call --------------------------------------------


def count_one_call_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import clientlib.wire as wire

    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return msgpack.unpackb(*args, **kwargs)

    monkeypatch.setattr(wire, "_unpackb", counted)
    return calls


ONE_CALL = {
    "ascii keys": ([b"user:%05d" % i for i in range(100)], True),
    "a key of 150 bytes (its length byte 0x96 looks like a fixarray)": ([*LONG, b"x" * 150], False),
    "utf-8 keys holding 0x90..0x9f": ([("ѐ%d" % i).encode() for i in range(100)], False),  # d1 90
    "a key holding 0xdc (array 16)": ([*LONG, b"a\xdcb"], False),
}


@pytest.mark.parametrize("name", ONE_CALL)
def test_a_large_get_many_is_decoded_in_one_call_only_when_no_byte_could_start_an_array(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, one_call = ONE_CALL[name]
    data = frame_of([[GET_MANY, keys]])
    assert len(data) > SMALL_FRAME
    calls = count_one_call_decodes(monkeypatch)
    assert decode_request(data).gets == keys
    assert bool(calls) == one_call


def test_nested_arrays_in_a_large_get_manys_keys_are_read_key_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_one_call_decodes(monkeypatch)
    exc = error_of(frame_of([[GET_MANY, [*LONG, [[b"a"] * 3] * 3]]]))
    assert "expected bytes keys, got list" in str(exc) and not calls


# Every type msgpack decodes a request's element to (ext only empty: max_ext_len is 0).
_decoded = st.one_of(
    st.binary(min_size=0, max_size=300), st.text(max_size=3), st.integers(-(1 << 63), (1 << 64) - 1), st.none(),
    st.booleans(), st.floats(), st.just({}), st.lists(st.binary(max_size=3), max_size=3),
    st.just(msgpack.ExtType(1, b"")),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=MAX_KEY_LEN), _decoded), max_size=40), st.integers(1, 50))
def test_the_decoded_keys_check_is_the_exact_check(keys: list[Any], max_ops: int) -> None:
    """_check_decoded_keys (two C-level passes) refuses what _check_keys refuses, with its message,
    for every type msgpack decodes to."""
    from clientlib.wire import _check_decoded_keys, _check_keys

    def outcome(check: Any) -> str | None:
        try:
            check(keys, max_ops)
        except WireError as exc:
            return str(exc)
        return None

    assert outcome(_check_decoded_keys) == outcome(_check_keys)
