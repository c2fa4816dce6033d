"""Decoding a request costs memory bounded by the frame's size, whatever its shape (issue 13
item 4): msgpack allocates each array as its header declares, so a few KB of nested headers
declaring 100,000 elements each once cost the broker 100+ ms and tens of MB per frame."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from clientlib.wire import Code, Op, WireError, decode_request, encode_request

pytestmark = pytest.mark.unit

# Stated bound: peak memory of one decode, as a multiple of the frame's size, plus a constant.
# The constant is one chain of nested arrays at msgpack's depth limit (1,024 levels of up to 16
# preallocated slots), decoded at most twice: what a failing frame can waste before it fails.
PER_BYTE = 64
CONSTANT = 1 << 20


def peak_of_decode(data: bytes) -> int:
    tracemalloc.start()
    try:
        try:
            decode_request(data)
        except WireError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HEADERS = {
    "array16 of 65535": b"\xdc\xff\xff",
    "array32 of 100000": b"\xdd\x00\x01\x86\xa0",
    "fixarray of 15": b"\x9f",
}


@pytest.mark.parametrize("header", list(HEADERS.values()), ids=list(HEADERS))
@pytest.mark.parametrize("size", [100, 1_000, 5_000, 50_000])
def test_nested_declared_arrays_cost_a_bounded_multiple_of_the_frame(header: bytes, size: int) -> None:
    # [1, 5, 0, 0, <nested headers...>]: a valid start, then arrays that declare far more
    # elements than the frame holds, nested as deep as the bytes allow.
    data = msgpack.packb([1, 5, 0, 0, 0])[:-1] + header * (size // len(header))
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT
    with pytest.raises(WireError) as info:
        decode_request(data)
    assert (info.value.code, info.value.req_id) == (Code.BAD_REQUEST, 5)


@pytest.mark.parametrize("header", list(HEADERS.values()), ids=list(HEADERS))
def test_hostile_arrays_inside_an_op_are_bounded_too(header: bytes) -> None:
    ops = [[Op.GET, b"k%d" % i] for i in range(100)]
    good = encode_request(9, ops)
    # The last op replaced by nested hostile headers.
    last = msgpack.packb([Op.GET, b"k99"])
    data = good[: -len(last)] + header * 2000
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT
    with pytest.raises(WireError) as info:
        decode_request(data)
    assert (info.value.code, info.value.req_id) == (Code.BAD_REQUEST, 9)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_after_a_valid_start_are_bounded(tail: bytes) -> None:
    data = msgpack.packb([1, 7, 0, 0, 0])[:-1] + tail
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT


def test_large_valid_frames_decode_unchanged() -> None:
    # The op-by-op path (frames above 256 bytes) gives exactly what one msgpack call gives.
    ops = [[Op.GET, b"key:%06d" % i] for i in range(5000)] + [[Op.SET, b"s", b"v" * 300, 3, 60], [Op.STATS, [b"slabs"]]]
    frame = decode_request(encode_request(11, ops, 250, 0))
    assert (frame.req_id, frame.timeout_ms, frame.flags) == (11, 250, 0)
    assert frame.ops == [list(op) for op in ops]


# Nested headers that declare no more than the key array does, so that only the look for array
# headers keeps them from one msgpack call with max_array_len at the key count (found by review:
# without it, nested `dc 0b b8` headers cost 24.7 MB for a 1.5 MB bound).
KEY_ARRAY = b"\xdc\x0b\xb8"  # array 16 of 3,000
AMONG_KEYS = {**HEADERS, "array16 of 3000, as the key array": KEY_ARRAY, "fixarray of 15": b"\x9f"}


@pytest.mark.parametrize("header", list(AMONG_KEYS.values()), ids=list(AMONG_KEYS))
def test_hostile_arrays_among_a_get_manys_keys_are_bounded_too(header: bytes) -> None:
    # A large GET_MANY, its key array declaring 3,000 keys: 100 keys, then nested hostile headers.
    keys = msgpack.packb([b"k%05d" % i for i in range(100)])[3:]
    data = msgpack.packb([1, 9, 0, 0, [[Op.GET_MANY, []]]])[:-1] + KEY_ARRAY + keys + header * 2000
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT
    with pytest.raises(WireError) as info:
        decode_request(data)
    assert (info.value.code, info.value.req_id) == (Code.BAD_REQUEST, 9)


# A GET_MANY of 100,000 one-byte elements (the most max_ops allows), each costing the most memory
# per byte of frame (found by review: a join used as the keys' type check set aside 80 bytes per
# element before looking at any: 8.9 MB against a 7.5 MB bound for nil or a fixint).
ONE_BYTE = {"nil": b"\xc0", "fixint": b"\x01", "empty map": b"\x80", "true": b"\xc3"}


@pytest.mark.parametrize("element", list(ONE_BYTE.values()), ids=list(ONE_BYTE))
def test_a_get_many_of_one_byte_elements_is_bounded(element: bytes) -> None:
    n = 100_000
    data = msgpack.packb([1, 9, 0, 0, [[Op.GET_MANY, []]]])[:-1] + b"\xdd" + n.to_bytes(4, "big") + element * n
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT
    with pytest.raises(WireError) as info:
        decode_request(data)
    assert (info.value.code, info.value.req_id) == (Code.BAD_REQUEST, 9)


def test_a_valid_get_many_of_the_shortest_keys_is_bounded() -> None:
    keys = [b"%c" % (33 + i % 90) for i in range(100_000)]
    data = encode_request(9, [[Op.GET_MANY, keys]])
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT
    assert decode_request(data).gets == keys


def test_a_get_manys_declared_key_count_alone_costs_a_bounded_multiple() -> None:
    # No byte that could start an array after the key array's header (the one-call path), and
    # a declared count as large as the frame allows: the array msgpack allocates is the only one.
    data = msgpack.packb([1, 9, 0, 0, [[Op.GET_MANY, []]]])[:-1] + b"\xdd\x00\x00\x46\x50" + b"\xc4\x01a" * 6000
    assert peak_of_decode(data) <= PER_BYTE * len(data) + CONSTANT
    with pytest.raises(WireError) as info:
        decode_request(data)
    assert (info.value.code, info.value.req_id) == (Code.BAD_REQUEST, 9)
    assert "GET_MANY declares 18000 keys and holds 6000" in str(info.value)
