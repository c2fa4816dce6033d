"""clientlib/wire.py at its edges (holes that mutation testing found): the fast paths take every
well-formed frame themselves, the schema's bounds hold on both of the request decoder's paths
(frames up to SMALL_FRAME bytes and larger ones), and every error names what was wrong."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from clientlib import wire
from clientlib.wire import (
    MAX_KEY_LEN, SMALL_FRAME, VERSION, Code, Op, WireError, decode_reply, decode_request, encode_request,
    pack_request, unpack_reply,
)

pytestmark = pytest.mark.unit

BAD = Code.BAD_REQUEST
U64_MAX = 2**64 - 1


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def error_of(fn: Any, *args: Any, **kwargs: Any) -> WireError:
    with pytest.raises(WireError) as info:
        fn(*args, **kwargs)
    return info.value


def big(ops: list[Any], req_id: int = 9) -> bytes:
    """A request frame past SMALL_FRAME (the op-by-op decoder): the ops, padded with SETs."""
    data = pack([VERSION, req_id, 0, 0, ops])
    while len(data) <= SMALL_FRAME:
        ops = [*ops, [Op.SET, b"pad", b"x" * 100, 0, 0]]
        data = pack([VERSION, req_id, 0, 0, ops])
    return data


# --- the worker's reply fast path takes well-formed frames itself ------------------------------

REPLIES = [
    pack([VERSION, 0, 0, [[0, b"v", 0], [1]]]),  # request id 0
    pack([VERSION, U64_MAX, 0, [[0, b"v", 5, 7]]]),  # the largest request id
    pack([VERSION, 3, 0, []]),
    pack([VERSION, 3, 0, [[0, {"a:1": {"pid": 1}}], [4]]]),
    pack([VERSION, 3, int(Code.TIMEOUT), "no answer within 5 ms"]),
    pack([VERSION, 3, int(Code.SHUTTING_DOWN), "broker is shutting down"]),
]


@pytest.mark.parametrize("data", REPLIES)
def test_unpack_reply_decodes_well_formed_replies_without_the_slow_path(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = decode_reply(data)

    def slow(*_: Any, **__: Any) -> Any:
        raise AssertionError("a well-formed reply went to decode_reply")

    monkeypatch.setattr(wire, "decode_reply", slow)
    assert unpack_reply(data) == (expected.req_id, int(expected.code), expected.payload)


@pytest.mark.parametrize(
    "data",
    [
        pack([VERSION, 3, 0, [[0, {1: "x"}]]]),  # a non-str map key (strict_map_key)
        pack([VERSION, 3, 0, [[0, msgpack.ExtType(1, b"x")]]]),  # an ext object, one byte long
    ],
    ids=["int-map-key", "ext-1"],
)
def test_unpack_reply_refuses_what_decode_reply_refuses(data: bytes) -> None:
    assert error_of(decode_reply, data).code is BAD
    assert error_of(unpack_reply, data).code is BAD


# --- the request decoder: fast checks, both paths ----------------------------------------------


def test_get_ops_are_checked_inline_without_check_op(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = wire.check_op
    monkeypatch.setattr(wire, "check_op", lambda op: (calls.append(op), real(op)))
    keys = [b"k", b"x" * MAX_KEY_LEN, b"\xff" * 7]
    frame = decode_request(encode_request(1, [[Op.GET, k] for k in keys]))
    assert [op[1] for op in frame.ops] == keys
    assert calls == []
    # every other op, and a GET that is not well formed, goes through check_op
    decode_request(encode_request(1, [[Op.GETS, b"k"], [Op.GET, b"k"]]))
    assert calls == [[int(Op.GETS), b"k"]]
    for bad in ([Op.GET, b""], [Op.GET, b"x" * (MAX_KEY_LEN + 1)], [Op.GET, "k"], [Op.GET, 1]):
        assert error_of(decode_request, encode_request(1, [bad])).code is BAD


def test_a_large_frame_with_a_str_key_is_refused_like_a_small_one() -> None:
    small = pack([VERSION, 4, 0, 0, [[Op.GET, "k"]]])
    large = big([[Op.GET, "k"]], req_id=4)
    assert len(small) <= SMALL_FRAME < len(large)
    for data in (small, large):
        exc = error_of(decode_request, data)
        assert (exc.code, exc.req_id) == (BAD, 4)
        assert "expected bytes, got str" in str(exc)


def test_too_many_ops_names_the_limit_on_both_paths() -> None:
    small = encode_request(5, [[Op.PING]] * 11)
    large = encode_request(5, [[Op.SET, b"k", b"v" * 30, 0, 0]] * 11)
    assert len(small) <= SMALL_FRAME < len(large)
    for data in (small, large):
        exc = error_of(decode_request, data, max_ops=10)
        assert (exc.code, exc.req_id) == (BAD, 5)
        assert "11 ops exceeds the 10 limit" in str(exc)


def test_a_large_frame_with_trailing_bytes_says_what_msgpack_found() -> None:
    data = big([[Op.PING]], req_id=6) + b"\x01"
    exc = error_of(decode_request, data)
    assert (exc.code, exc.req_id) == (BAD, 6)
    assert "undecodable frame: ExtraData" in str(exc)


# --- the request id of a frame that cannot be decoded ------------------------------------------


@pytest.mark.parametrize("req_id", [0, 1, U64_MAX])
def test_an_oversize_frame_is_answered_with_its_request_id(req_id: int) -> None:
    data = encode_request(req_id, [[Op.SET, b"k", b"v" * 100, 0, 0]])
    exc = error_of(decode_request, data, max_frame=len(data) - 1)
    assert (exc.code, exc.req_id) == (BAD, req_id)


def test_a_two_element_frame_with_trailing_bytes_is_answered_with_its_id() -> None:
    exc = error_of(decode_request, pack([VERSION, 7]) + b"\x00")
    assert (exc.code, exc.req_id) == (BAD, 7)


# --- defaults and messages ---------------------------------------------------------------------


def test_pack_request_defaults_to_the_brokers_timeout_and_no_flags() -> None:
    frame = decode_request(pack_request(7, [[Op.PING]]))
    assert (frame.req_id, frame.timeout_ms, frame.flags, frame.noreply) == (7, 0, 0, False)
    assert pack_request(7, [[Op.PING]]) == encode_request(7, [[Op.PING]])


def _request_error(*fields: Any) -> str:
    exc = error_of(decode_request, pack(list(fields)))
    assert exc.code in (BAD, Code.UNSUPPORTED_VERSION)
    return str(exc)


def test_request_errors_name_the_field_and_the_value() -> None:
    data = encode_request(1, [[Op.SET, b"k", b"v" * 200, 0, 0]])
    assert f"frame of {len(data)} bytes exceeds the 100 limit" in str(error_of(decode_request, data, max_frame=100))
    assert "unsupported wire version 2" in _request_error(2, 1, 0, 0, [[Op.PING]])
    assert "request frame must be an array" in str(error_of(decode_request, pack({})))
    assert "request id must be an unsigned 64-bit integer" in _request_error(VERSION, -1, 0, 0, [[Op.PING]])
    assert "request frame must be [version, req_id, timeout_ms, flags, ops]" in _request_error(VERSION, 1, 0, 0)
    assert "timeout_ms must be an integer in 0..86400000" in _request_error(VERSION, 1, -1, 0, [[Op.PING]])
    assert "unknown request flags 6" in _request_error(VERSION, 1, 0, 6, [[Op.PING]])
    assert "ops must be a non-empty array" in _request_error(VERSION, 1, 0, 0, [])
    assert "each op must be a non-empty array" in _request_error(VERSION, 1, 0, 0, [[]])
    assert "unknown op 99" in _request_error(VERSION, 1, 0, 0, [[99]])
    assert "unknown op 'x'" in _request_error(VERSION, 1, 0, 0, [["x"]])
    assert "unknown op list" in _request_error(VERSION, 1, 0, 0, [[[1]]])
    assert "op GET takes 1 arguments, got 2" in _request_error(VERSION, 1, 0, 0, [[Op.GET, b"k", b"x"]])
    assert "op GAT: expected int, got str" in _request_error(VERSION, 1, 0, 0, [[Op.GAT, b"k", "5"]])
    assert f"op GETS: key must have 1..{MAX_KEY_LEN} bytes" in _request_error(VERSION, 1, 0, 0, [[Op.GETS, b""]])
    assert "stats arguments must be bytes" in _request_error(VERSION, 1, 0, 0, [[Op.STATS, ["items"]]])


def test_unknown_version_shows_the_value_sent() -> None:
    assert "unsupported wire version 'x'" in _request_error("x", 1, 0, 0, [[Op.PING]])
    long = "v" * 50
    assert f"unsupported wire version {long[:40]!r}..." in _request_error(long, 1, 0, 0, [[Op.PING]])
    assert "unsupported wire version None" in _request_error(None, 1, 0, 0, [[Op.PING]])


def test_reply_errors_name_the_field_and_the_value() -> None:
    assert "reply frame must be an array" in str(error_of(decode_reply, pack(1)))
    assert "reply frame must be [version, req_id, code, payload]" in str(error_of(decode_reply, pack([VERSION, 1, 0])))
    assert "unknown reply code 99" in str(error_of(decode_reply, pack([VERSION, 1, 99, "x"])))
    assert "reply results must be an array of [code, ...]" in str(error_of(decode_reply, pack([VERSION, 1, 0, [[]]])))
    assert "error reply must carry a message" in str(error_of(decode_reply, pack([VERSION, 1, 16, None])))


def test_an_oversize_reply_names_its_size_and_the_limit() -> None:
    data = pack([VERSION, 1, 0, [[0, b"v" * 100, 0]]])
    exc = error_of(decode_reply, data, max_frame=50)
    assert exc.code is BAD and f"frame of {len(data)} bytes exceeds the 50 limit" in str(exc)


def test_long_values_are_cut_to_40_characters_in_messages() -> None:
    assert _request_error(VERSION, 1, 0, 0, [["x" * 40]]).endswith(f"unknown op {'x' * 40!r}")
    assert f"unknown op {'x' * 40!r}..." in _request_error(VERSION, 1, 0, 0, [["x" * 41]])


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_reply_whose_version_is_not_the_integer_1_is_refused_by_both_decoders(version: object) -> None:
    data = pack([version, 3, 0, []])
    assert error_of(decode_reply, data).code is Code.UNSUPPORTED_VERSION
    assert error_of(unpack_reply, data).code is Code.UNSUPPORTED_VERSION


def test_a_reply_with_more_results_than_max_ops_is_refused_by_both_decoders() -> None:
    ok = pack([VERSION, 3, 0, [[1]] * wire.MAX_OPS])
    assert len(unpack_reply(ok)[2]) == wire.MAX_OPS
    data = pack([VERSION, 3, 0, [[1]] * (wire.MAX_OPS + 1)])
    assert error_of(decode_reply, data).code is BAD
    assert error_of(unpack_reply, data).code is BAD
