"""wire.pack_request / wire.unpack_reply, the worker's hot-path codec, agree with the schema's
reference functions encode_request / decode_reply: the same bytes out, the same frames accepted,
WireError (with the same request id) for every frame the reference refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientlib.wire import (
    NOREPLY, VERSION, Code, Op, WireError, decode_reply, encode_error, encode_reply, encode_request,
    pack_request, unpack_reply,
)

pytestmark = pytest.mark.unit

U64_MAX = 2**64 - 1

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=U64_MAX), st.floats(allow_nan=False),
    st.text(max_size=8), st.binary(max_size=8), st.sampled_from(list(Op)), st.sampled_from(list(Code)),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=20,
)
_req_ids = st.integers(min_value=0, max_value=U64_MAX)
_keys = st.binary(min_size=1, max_size=250)
_ops = st.one_of(
    st.builds(lambda k: [Op.GET, k], _keys),
    st.builds(lambda k, t: [Op.GAT, k, t], _keys, st.integers(-(2**31), 2**32 - 1)),
    st.builds(lambda o, k, v, f, t: [o, k, v, f, t], st.sampled_from([Op.SET, Op.ADD, Op.APPEND]), _keys,
              st.binary(max_size=300), st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**32 - 1)),
    st.builds(lambda k, v, c: [Op.CAS, k, v, 0, 0, c], _keys, st.binary(max_size=10), st.integers(0, U64_MAX)),
    st.builds(lambda k, d: [Op.INCR, k, d], _keys, st.integers(0, U64_MAX)),
    st.builds(lambda a: [Op.STATS, a], st.lists(st.binary(max_size=8), max_size=3)),
    st.just([Op.PING]),
)


@settings(max_examples=300, deadline=None)
@given(_req_ids, st.lists(_ops, min_size=1, max_size=5), st.integers(0, 86_400_000), st.sampled_from([0, NOREPLY]))
def test_pack_request_gives_encode_requests_bytes(req_id: int, ops: list[list[Any]], timeout_ms: int, flags: int) -> None:
    assert pack_request(req_id, ops, timeout_ms, flags) == encode_request(req_id, ops, timeout_ms, flags)


def reference(data: bytes) -> tuple[str, Any]:
    try:
        f = decode_reply(data)
    except WireError as exc:
        return "error", (exc.code, exc.req_id)
    return "ok", (f.req_id, int(f.code), f.payload)


def fast(data: bytes) -> tuple[str, Any]:
    try:
        rid, code, payload = unpack_reply(data)
    except WireError as exc:
        return "error", (exc.code, exc.req_id)
    assert type(code) is int
    return "ok", (rid, code, payload)


_results = st.lists(st.one_of(_values, st.lists(_values, max_size=4)), max_size=4)


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    # well-formed replies and near misses: every field drawn from values of the right and wrong kinds
    st.builds(lambda v, r, c, p: msgpack.packb([v, r, c, p], use_bin_type=True),
              st.one_of(st.just(VERSION), _scalars), st.one_of(_req_ids, _scalars),
              st.one_of(st.sampled_from([int(c) for c in Code]), _scalars), st.one_of(_results, _values)),
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), _values),
    st.binary(max_size=40),
))
def test_unpack_reply_agrees_with_decode_reply(data: bytes) -> None:
    assert fast(data) == reference(data)


@pytest.mark.parametrize("data", [
    encode_reply(7, [[Code.OK, b"v", 0]]),
    encode_reply(U64_MAX, [[Code.MISS], [Code.OK, b"v", 5, 99], [Code.SERVER_ERROR, "x"]]),
    encode_reply(0, []),
    encode_error(9, Code.OVERLOADED, "busy"),
    encode_error(9, Code.SHUTTING_DOWN, "bye"),
    msgpack.packb([1, 2, 0, [[0, {"srv": {"pid": "1"}}]]]),
    encode_reply(3, [b"v", b"", [Code.MISS], [Code.OK, b"w", 7]]),  # a GET_MANY's: bare values among lists
    encode_reply(4, [b"v"] * 100),
])
def test_well_formed_replies(data: bytes) -> None:
    kind, got = fast(data)
    assert kind == "ok" and (kind, got) == reference(data)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([2, 1, 0, []]), msgpack.packb([1, -1, 0, []]), msgpack.packb([1, 1, 99, "x"]),
    msgpack.packb([1, 1, 0, [[]]]), msgpack.packb([1, 1, 0, [["x"]]]), msgpack.packb([1, 1, 16, [1]]),
    msgpack.packb([1, 1, True, []]), msgpack.packb([1, 1, 0, []]) + b"\x00",
    msgpack.packb([1, 1, 0, [msgpack.ExtType(1, b"x")]]),
    msgpack.packb([1, 1, 0, ["v"]]), msgpack.packb([1, 1, 0, [b"v", 1]]), msgpack.packb([1, 1, 0, [b"v", None]]),
])
def test_malformed_replies(data: bytes) -> None:
    kind, got = fast(data)
    assert kind == "error" and (kind, got) == reference(data)
