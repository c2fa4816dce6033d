"""broker/translate.py: wire ops to meta requests, meta responses to wire results.

Expected bytes are memcached's meta protocol as doc/protocol.txt (memcached 1.6) writes it:
  mg <key> <flags>*            v: value, f: client flags, c: cas, s: the value's size,
                               T(token): update TTL, O(token): opaque, copied back on the
                               response (a hit returns the flags asked for, in request order:
                               `mg k v f c s O1` -> `VA <size> f<flags> c<cas> s<size> O1`)
  ms <key> <datalen> <flags>*  F(token): client flags, T(token): TTL, C(token): compare cas,
                               M(token): mode E add, A append, P prepend, R replace, S set
  md <key> <flags>*
  ma <key> <flags>*            v: return new value, D(token): delta, M(token): I incr / D decr
  b: the key is base64 (for keys memcached cannot take verbatim)
Expected results are the wire results of clientlib/wire.py:
  GET/GAT hit [OK, value, client_flags]; GETS/GATS hit [OK, value, client_flags, cas]; miss [MISS];
  store ops [OK] | [NOT_STORED] | [EXISTS] | [NOT_FOUND]; DELETE, TOUCH [OK] | [NOT_FOUND];
  INCR/DECR [OK, new_value] | [NOT_FOUND]; any failure [code >= SERVER_ERROR, message].
Which status answers which command is protocol.txt's list for each command:
  mg: VA (hit with v), HD (hit without v), EN (miss)
  ms: HD stored, NS not stored, EX cas mismatch, NF cas on a missing item
  md: HD deleted, NF not found, EX cas mismatch
  ma: VA (with v) the new number, NF not found (NS, EX only with N / C, which we never send)
Anything else is no answer memcached gives to that request: SERVER_ERROR "unexpected ..." (the
pipeline does not deliver it: it resets the connection, tests/unit/test_pipeline.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from broker import meta
from broker.meta import Response, Status
from broker.translate import (
    UNLINK_TOO_LARGE,
    encode_op,
    encode_text,
    error_result,
    meta_result,
    text_result,
    too_large,
)
from clientlib.wire import Code, Op

pytestmark = pytest.mark.unit


# --- encode_op: one wire op -> the bytes of its meta request ---------------------------------------

ENCODED: list[tuple[list[Any], int, bytes]] = [
    ([Op.GET, b"foo"], 7, b"mg foo v f s O7\r\n"),
    ([Op.GETS, b"foo"], 7, b"mg foo v f c s O7\r\n"),
    ([Op.GAT, b"foo", 30], 8, b"mg foo v f s T30 O8\r\n"),
    ([Op.GAT, b"foo", 0], 8, b"mg foo v f s T0 O8\r\n"),
    ([Op.GATS, b"foo", 30], 9, b"mg foo v f c s T30 O9\r\n"),
    ([Op.TOUCH, b"foo", 60], 10, b"mg foo T60 O10\r\n"),
    ([Op.TOUCH, b"foo", -1], 10, b"mg foo T-1 O10\r\n"),
    # protocol.txt: N(token) vivify on miss with this TTL, R(token) win a recache when the TTL
    # left is under the token; R0 would mean nothing, so it is left out
    ([Op.LEASE_GET, b"foo", 30, 0], 12, b"mg foo v f c s N30 O12\r\n"),
    ([Op.LEASE_GET, b"foo", 30, 10], 12, b"mg foo v f c s N30 R10 O12\r\n"),
    # md I: mark stale instead of removing, T: the stale item's TTL
    ([Op.INVALIDATE, b"foo", 30], 13, b"md foo I T30 O13\r\n"),
    ([Op.SET, b"foo", b"bar", 0, 0], 11, b"ms foo 3 O11\r\nbar\r\n"),
    ([Op.SET, b"foo", b"bar", 5, 60], 11, b"ms foo 3 F5 T60 O11\r\nbar\r\n"),
    ([Op.SET, b"foo", b"", 0, 0], 11, b"ms foo 0 O11\r\n\r\n"),
    ([Op.SET, b"foo", b"a\r\nb", 0, 0], 11, b"ms foo 4 O11\r\na\r\nb\r\n"),
    ([Op.ADD, b"foo", b"bar", 0, 0], 12, b"ms foo 3 ME O12\r\nbar\r\n"),
    ([Op.REPLACE, b"foo", b"bar", 0, 0], 13, b"ms foo 3 MR O13\r\nbar\r\n"),
    ([Op.APPEND, b"foo", b"bar", 0, 0], 14, b"ms foo 3 MA O14\r\nbar\r\n"),
    ([Op.PREPEND, b"foo", b"bar", 0, 0], 15, b"ms foo 3 MP O15\r\nbar\r\n"),
    ([Op.ADD, b"foo", b"bar", 1, 2], 12, b"ms foo 3 F1 T2 ME O12\r\nbar\r\n"),
    ([Op.CAS, b"foo", b"bar", 0, 0, 42], 16, b"ms foo 3 C42 O16\r\nbar\r\n"),
    ([Op.CAS, b"foo", b"bar", 3, 4, 42], 16, b"ms foo 3 F3 T4 C42 O16\r\nbar\r\n"),
    ([Op.DELETE, b"foo"], 17, b"md foo O17\r\n"),
    ([Op.INCR, b"n", 1], 18, b"ma n v O18\r\n"),
    ([Op.INCR, b"n", 5], 18, b"ma n v D5 O18\r\n"),
    ([Op.DECR, b"n", 1], 19, b"ma n v MD O19\r\n"),
    ([Op.DECR, b"n", 5], 19, b"ma n v MD D5 O19\r\n"),
    # A key memcached cannot take verbatim (a space) goes base64 with the b flag; ms puts its
    # b after the length, where memcached reads the length.
    ([Op.GET, b"foo bar"], 1, b"mg Zm9vIGJhcg== b v f s O1\r\n"),
    ([Op.GETS, b"foo bar"], 1, b"mg Zm9vIGJhcg== b v f c s O1\r\n"),
    ([Op.SET, b"foo bar", b"x", 0, 0], 2, b"ms Zm9vIGJhcg== 1 b O2\r\nx\r\n"),
    ([Op.DELETE, b"foo bar"], 3, b"md Zm9vIGJhcg== b O3\r\n"),
]


@pytest.mark.parametrize("op, opaque, expected", ENCODED, ids=[f"{Op(o[0]).name}-{e[:24]!r}" for o, _, e in ENCODED])
def test_encode_op_bytes(op: list[Any], opaque: int, expected: bytes) -> None:
    assert encode_op(op[0], op, opaque) == expected


@pytest.mark.parametrize(
    "op",
    [
        [Op.GET, b""],
        [Op.GET, b"k" * 251],
        [Op.SET, b"", b"v", 0, 0],
        [Op.SET, b"k", b"v", -1, 0],
        [Op.SET, b"k", b"v", 1 << 32, 0],
        [Op.CAS, b"k", b"v", 0, 0, -1],
        [Op.INCR, b"k", -1],
        [Op.INCR, b"k", 1 << 64],
        [Op.GAT, b"k", 1 << 31],
        [Op.VERSION, b"k"],  # no meta request
    ],
    ids=repr,
)
def test_encode_op_refuses_what_memcached_would_misread(op: list[Any]) -> None:
    with pytest.raises(meta.RequestError):
        encode_op(op[0], op, 1)


def test_encode_text_bytes() -> None:
    assert encode_text(Op.VERSION, [Op.VERSION]) == b"version\r\n"
    assert encode_text(Op.STATS, [Op.STATS, []]) == b"stats\r\n"
    assert encode_text(Op.STATS, [Op.STATS, [b"settings"]]) == b"stats settings\r\n"
    assert encode_text(Op.STATS, [Op.STATS, [b"slabs"]]) == b"stats slabs\r\n"
    assert encode_text(Op.FLUSH_ALL, [Op.FLUSH_ALL, 0]) == b"flush_all\r\n"
    assert encode_text(Op.FLUSH_ALL, [Op.FLUSH_ALL, 10]) == b"flush_all 10\r\n"
    assert encode_text(Op.CACHE_MEMLIMIT, [Op.CACHE_MEMLIMIT, 64]) == b"cache_memlimit 64\r\n"


# --- meta_result: one parsed meta response -> the wire result --------------------------------------


def unexpected(result: list[Any]) -> bool:
    """A SERVER_ERROR result that says the reply was not one memcached gives to that request."""
    return result[0] == Code.SERVER_ERROR and isinstance(result[1], str) and "unexpected" in result[1]


GET_LIKE = [Op.GET, Op.GAT]
GETS_LIKE = [Op.GETS, Op.GATS]
STORE = [Op.SET, Op.ADD, Op.REPLACE, Op.APPEND, Op.PREPEND, Op.CAS]
ARITH = [Op.INCR, Op.DECR]


@pytest.mark.parametrize("op", GET_LIKE)
def test_get_hit_is_value_and_client_flags(op: Op) -> None:
    assert meta_result(op, Status.VALUE, b"hi", {"f": b"5", "s": b"2", "O": b"1"}) == [Code.OK, b"hi", 5]
    assert meta_result(op, Status.VALUE, b"", {"f": b"0", "s": b"0", "O": b"1"}) == [Code.OK, b"", 0]
    assert meta_result(op, Status.VALUE, b"a\r\nb", {"f": b"4294967295", "s": b"4"}) == [Code.OK, b"a\r\nb", 4294967295]


@pytest.mark.parametrize("op", GETS_LIKE)
def test_gets_hit_is_value_client_flags_and_cas(op: Op) -> None:
    assert meta_result(op, Status.VALUE, b"hi", {"f": b"5", "c": b"77", "s": b"2", "O": b"1"}) == [Code.OK, b"hi", 5, 77]
    assert meta_result(op, Status.VALUE, b"hi", {"f": b"0", "c": b"18446744073709551615", "s": b"2"}) == [
        Code.OK, b"hi", 0, 18446744073709551615,
    ]


@pytest.mark.parametrize("op", GET_LIKE + GETS_LIKE)
def test_get_miss(op: Op) -> None:
    assert meta_result(op, Status.MISS, None, {"O": b"1"}) == [Code.MISS]


@pytest.mark.parametrize("op", GET_LIKE + GETS_LIKE)
@pytest.mark.parametrize("status", [Status.OK, Status.NOT_STORED, Status.EXISTS, Status.NOT_FOUND, Status.NOOP])
def test_get_answered_by_no_mg_answer_is_unexpected(op: Op, status: Status) -> None:
    # We always send v: a hit is VA, never HD. NS / EX / NF / MN are no answer to mg.
    assert unexpected(meta_result(op, status, None, {}))


@pytest.mark.parametrize("op", STORE)
def test_store_results(op: Op) -> None:
    assert meta_result(op, Status.OK, None, {"O": b"1"}) == [Code.OK]
    assert meta_result(op, Status.NOT_STORED, None, {}) == [Code.NOT_STORED]
    # EX and NF answer a cas compare (`C`) only; to any other store they are not its answer.
    if op == Op.CAS:
        assert meta_result(op, Status.EXISTS, None, {}) == [Code.EXISTS]
        assert meta_result(op, Status.NOT_FOUND, None, {}) == [Code.NOT_FOUND]
    else:
        assert unexpected(meta_result(op, Status.EXISTS, None, {}))
        assert unexpected(meta_result(op, Status.NOT_FOUND, None, {}))


@pytest.mark.parametrize("op", STORE)
@pytest.mark.parametrize("status", [Status.VALUE, Status.MISS, Status.NOOP])
def test_store_answered_by_no_ms_answer_is_unexpected(op: Op, status: Status) -> None:
    # protocol.txt: ms answers HD, NS, EX or NF. EN is mg's miss, not a store outcome.
    assert unexpected(meta_result(op, status, b"x" if status is Status.VALUE else None, {}))


def test_delete_results() -> None:
    assert meta_result(Op.DELETE, Status.OK, None, {"O": b"1"}) == [Code.OK]
    assert meta_result(Op.DELETE, Status.NOT_FOUND, None, {}) == [Code.NOT_FOUND]


@pytest.mark.parametrize("status", [Status.VALUE, Status.MISS, Status.NOT_STORED, Status.NOOP])
def test_delete_answered_by_no_md_answer_is_unexpected(status: Status) -> None:
    # protocol.txt: md answers HD, NF or EX; wire.py: DELETE gives [OK] or [NOT_FOUND].
    assert unexpected(meta_result(Op.DELETE, status, b"x" if status is Status.VALUE else None, {}))


@pytest.mark.parametrize("op", ARITH)
def test_arith_results(op: Op) -> None:
    assert meta_result(op, Status.VALUE, b"42", {"O": b"1"}) == [Code.OK, 42]
    assert meta_result(op, Status.VALUE, b"0", {}) == [Code.OK, 0]
    assert meta_result(op, Status.VALUE, b"18446744073709551615", {}) == [Code.OK, 18446744073709551615]
    assert meta_result(op, Status.NOT_FOUND, None, {}) == [Code.NOT_FOUND]


@pytest.mark.parametrize("op", ARITH)
@pytest.mark.parametrize(
    "status, value",
    [(Status.VALUE, b"abc"), (Status.VALUE, b""), (Status.VALUE, b"-1"), (Status.MISS, None), (Status.OK, None), (Status.NOOP, None)],
)
def test_arith_answered_by_no_ma_answer_is_unexpected(op: Op, status: Status, value: bytes | None) -> None:
    # We always send v: success is VA with the new number; a number is decimal digits.
    assert unexpected(meta_result(op, status, value, {}))


def test_touch_results() -> None:
    # touch is mg without v: HD on a hit, EN on a miss (wire: TOUCH [OK] | [NOT_FOUND]).
    assert meta_result(Op.TOUCH, Status.OK, None, {"O": b"1"}) == [Code.OK]
    assert meta_result(Op.TOUCH, Status.MISS, None, {}) == [Code.NOT_FOUND]


@pytest.mark.parametrize("status", [Status.VALUE, Status.NOT_FOUND, Status.NOT_STORED, Status.EXISTS, Status.NOOP])
def test_touch_answered_by_no_touch_answer_is_unexpected(status: Status) -> None:
    assert unexpected(meta_result(Op.TOUCH, status, b"x" if status is Status.VALUE else None, {}))


@pytest.mark.parametrize("flags", [{"f": b"x"}, {"f": b"1x"}])
@pytest.mark.parametrize("op", GET_LIKE + GETS_LIKE)
def test_unusable_client_flags_raise_value_error(op: Op, flags: dict[str, bytes]) -> None:
    with pytest.raises(ValueError):
        meta_result(op, Status.VALUE, b"v", dict(flags, c=b"1", s=b"1"))


@pytest.mark.parametrize("op", GETS_LIKE)
def test_unusable_cas_raises_value_error(op: Op) -> None:
    with pytest.raises(ValueError):
        meta_result(op, Status.VALUE, b"v", {"f": b"0", "c": b"zz", "s": b"1"})


@pytest.mark.parametrize(
    "flags",
    [
        {"f": b"0"},  # no s
        {"f": b"0", "s": b"3"},  # s bigger than the value
        {"f": b"0", "s": b"1"},  # s smaller than the value
        {"f": b"0", "s": b"12"},  # the value's size with a digit gained
        {"f": b"0", "s": b"02"},  # the right number, not memcached's spelling of it
        {"f": b"0", "s": b""},
        {"f": b"0", "s": b"x"},
        {"s": b"2"},  # no f
    ],
    ids=repr,
)
@pytest.mark.parametrize("op", GET_LIKE + GETS_LIKE)
def test_a_hit_without_s_or_whose_s_disagrees_with_its_size_raises_value_error(op: Op, flags: dict[str, bytes]) -> None:
    # GET/GETS/GAT/GATS ask for f and s (and c for gets/gats): a hit must carry each, and s must
    # be the data block's size, so a VA header that lost or gained a digit is caught.
    with pytest.raises(ValueError):
        meta_result(op, Status.VALUE, b"hi", dict(flags, c=b"1", O=b"1"))


@pytest.mark.parametrize("op", GETS_LIKE)
@pytest.mark.parametrize("flags", [{"f": b"0", "s": b"2"}, {"f": b"0", "s": b"2", "c": b""}], ids=["no-c", "empty-c"])
def test_a_gets_hit_without_cas_raises_value_error(op: Op, flags: dict[str, bytes]) -> None:
    # A cas of 0 in place of the missing one would be a cas memcached never gave.
    with pytest.raises(ValueError):
        meta_result(op, Status.VALUE, b"hi", flags)


# --- a set too large for the server: sent as md, answered as memcached answers the set -------------


def test_unlink_too_large_is_memcacheds_own_refusal_whether_or_not_the_key_existed() -> None:
    # memcached's text protocol answers a set it cannot store for size with
    # "SERVER_ERROR object too large for cache" (and unlinks the key).
    for status in (Status.OK, Status.NOT_FOUND):
        result = meta_result(UNLINK_TOO_LARGE, status, None, {"O": b"1"})
        assert result[0] == Code.SERVER_ERROR
        assert "object too large for cache" in result[1]
        assert not unexpected(result)


@pytest.mark.parametrize("status", [Status.VALUE, Status.MISS, Status.NOT_STORED, Status.EXISTS, Status.NOOP])
def test_unlink_too_large_answered_by_no_md_answer_is_unexpected(status: Status) -> None:
    # Not that request's answer: the pipeline resets (meta_result's ValueError is its OutOfStep).
    with pytest.raises(ValueError, match="unexpected"):
        meta_result(UNLINK_TOO_LARGE, status, b"x" if status is Status.VALUE else None, {})


def test_unlink_too_large_is_no_wire_op() -> None:
    assert UNLINK_TOO_LARGE not in {int(op) for op in Op}


def test_too_large_names_memcacheds_reason_and_both_sizes() -> None:
    result = too_large(1048577, 1048576)
    assert result[0] == Code.SERVER_ERROR
    assert result[1].startswith("SERVER_ERROR object too large for cache")
    assert "1048577" in result[1] and "1048576" in result[1]


# --- text commands and errors ----------------------------------------------------------------------


def test_text_results() -> None:
    assert text_result(Op.VERSION, Response(Status.VERSION, {}, text=b"1.6.18")) == [Code.OK, "1.6.18"]
    stats = {"pid": "1", "uptime": "5"}
    assert text_result(Op.STATS, Response(Status.STATS, {}, stats=stats)) == [Code.OK, stats]
    assert text_result(Op.FLUSH_ALL, Response(Status.TEXT_OK, {})) == [Code.OK, True]
    assert text_result(Op.CACHE_MEMLIMIT, Response(Status.TEXT_OK, {})) == [Code.OK, True]


@pytest.mark.parametrize(
    "op, resp",
    [
        (Op.VERSION, Response(Status.TEXT_OK, {})),
        (Op.VERSION, Response(Status.STATS, {}, stats={"pid": "1"})),
        (Op.STATS, Response(Status.VERSION, {}, text=b"1.6.18")),
        (Op.FLUSH_ALL, Response(Status.VERSION, {}, text=b"1.6.18")),
    ],
    ids=["version-OK", "version-STATS", "stats-VERSION", "flush_all-VERSION"],
)
def test_text_command_answered_by_another_commands_reply_is_a_server_error(op: Op, resp: Response) -> None:
    # version answers VERSION <v>; stats answers STAT lines and END (or RESET); flush_all OK.
    assert text_result(op, resp)[0] == Code.SERVER_ERROR


@pytest.mark.parametrize(
    "resp, code, text",
    [
        (Response(Status.SERVER_ERROR, {}, text=b"out of memory storing object"), Code.SERVER_ERROR, "out of memory storing object"),
        (Response(Status.CLIENT_ERROR, {}, text=b"bad data chunk"), Code.CLIENT_ERROR, "bad data chunk"),
        (Response(Status.ERROR, {}), Code.UNKNOWN_COMMAND, "ERROR"),
    ],
)
def test_error_result_keeps_memcacheds_message(resp: Response, code: Code, text: str) -> None:
    result = error_result(resp)
    assert result[0] == code
    assert text in result[1]
    assert code >= Code.SERVER_ERROR  # wire.py: every failure is a code >= SERVER_ERROR


# --- leases (issue 10): LEASE_GET and INVALIDATE ------------------------------------------------
# memcached 1.6.18 answers `mg k v f c s N30 O1` with the flags asked for, then W / X / Z
# (won, stale, another caller won): `VA 0 f0 c4 s0 O1 W` on a miss it vivified,
# `VA 3 f4 c4 s3 O2 Z X` on a stale item whose lease is out.

from clientlib.wire import LEASE_STALE, LEASE_TAKEN, LEASE_WON  # noqa: E402


@pytest.mark.parametrize(
    "extra, bits",
    [
        ({}, 0),
        ({"W": b""}, LEASE_WON),
        ({"Z": b""}, LEASE_TAKEN),
        ({"X": b"", "W": b""}, LEASE_STALE | LEASE_WON),
        ({"Z": b"", "X": b""}, LEASE_STALE | LEASE_TAKEN),
    ],
)
def test_lease_get_hit_is_value_flags_cas_and_lease_bits(extra: dict[str, bytes], bits: int) -> None:
    flags = {"f": b"4", "c": b"9", "s": b"3", "O": b"2", **extra}
    assert meta_result(Op.LEASE_GET, Status.VALUE, b"abc", flags) == [Code.OK, b"abc", 4, 9, bits]


def test_lease_get_of_the_vivified_placeholder_is_an_empty_value_won() -> None:
    flags = meta.flag_dict(b" f0 c4 s0 O1 W")
    assert meta_result(Op.LEASE_GET, Status.VALUE, b"", flags) == [Code.OK, b"", 0, 4, LEASE_WON]


@pytest.mark.parametrize("missing", ["f", "c", "s"])
def test_a_lease_get_hit_without_an_asked_for_flag_raises_value_error(missing: str) -> None:
    flags = {"f": b"0", "c": b"1", "s": b"1"}
    del flags[missing]
    with pytest.raises(ValueError):
        meta_result(Op.LEASE_GET, Status.VALUE, b"x", flags)


def test_invalidate_results_are_md_s() -> None:
    assert meta_result(Op.INVALIDATE, Status.OK, None, {}) == [Code.OK]
    assert meta_result(Op.INVALIDATE, Status.NOT_FOUND, None, {}) == [Code.NOT_FOUND]
    assert meta_result(Op.INVALIDATE, Status.NOT_STORED, None, {})[0] == Code.SERVER_ERROR


@pytest.mark.parametrize("op", [Op.GET, Op.GETS, Op.GAT, Op.GATS])
def test_a_plain_read_of_a_lease_placeholder_is_a_miss(op: Op) -> None:
    # memcached 1.6.18: after `mg k v f c s N30` (W), a plain `mg k v f s` answers
    # `VA 0 f0 s0 O2 Z`: the empty item get_or_set's winner is computing, not a value.
    flags = meta.flag_dict(b" f0 c1 s0 O2 Z")
    assert meta_result(op, Status.VALUE, b"", flags) == [Code.MISS]


@pytest.mark.parametrize(
    "line, value",
    [
        (b" f0 c1 s0 O2", b""),  # a stored empty value: no lease out
        (b" f5 c1 s0 O2 Z", b""),  # client flags: a stored value due for recache
        (b" f0 c1 s0 O2 Z X", b""),  # stale: the old value is served
        (b" f0 c1 s1 O2 Z", b"v"),
    ],
)
def test_only_the_empty_flagless_item_whose_lease_is_out_reads_as_a_miss(line: bytes, value: bytes) -> None:
    assert meta_result(Op.GETS, Status.VALUE, value, meta.flag_dict(line))[0] == Code.OK


# --- issue 14's mutmut survivors: the rule each one broke ------------------------------------------


@pytest.mark.parametrize("op", [Op.GET, Op.GETS, Op.LEASE_GET])
@pytest.mark.parametrize("f", [b"-1", b"+1", b"x"])
def test_client_flags_that_are_not_an_unsigned_number_are_unusable(op: Op, f: bytes) -> None:
    # protocol.txt: f(token) returns the client flags, a 32-bit unsigned number: no sign, no letter.
    flags = {"f": f, "s": b"1", "c": b"5"}
    with pytest.raises(ValueError, match="flags"):
        meta_result(op, Status.VALUE, b"x", flags)


@pytest.mark.parametrize("op", [Op.GET, Op.GETS, Op.LEASE_GET])
def test_a_hit_without_f_says_which_flags_came(op: Op) -> None:
    with pytest.raises(ValueError, match="flags") as info:
        meta_result(op, Status.VALUE, b"x", {"s": b"1", "c": b"5"})
    assert "'s'" in str(info.value), "the message shows the flags the hit carried"


def test_a_gets_hit_without_cas_says_so() -> None:
    with pytest.raises(ValueError, match="cas"):
        meta_result(Op.GETS, Status.VALUE, b"x", {"f": b"0", "s": b"1"})


def test_a_lease_get_answered_en_is_a_miss() -> None:
    # protocol.txt: EN is mg's miss, whatever flags the mg carried.
    assert meta_result(Op.LEASE_GET, Status.MISS, None, {}) == [Code.MISS]
    assert meta_result(Op.LEASE_GET, Status.NOT_STORED, None, {})[0] == Code.SERVER_ERROR


def test_an_unexpected_reply_names_the_request_as_the_client_sent_it() -> None:
    assert "GET" in meta_result(Op.GET, Status.NOT_STORED, None, {})[1]
    assert "DELETE" in meta_result(Op.DELETE, Status.VALUE, b"1", {})[1]
    # the md that unlinks a set too large for the server is the client's SET
    with pytest.raises(ValueError) as info:
        meta_result(UNLINK_TOO_LARGE, Status.NOT_STORED, None, {})
    assert "SET" in str(info.value) and "too large" in str(info.value)


def test_a_version_string_with_a_byte_beyond_ascii_is_still_a_version() -> None:
    # The VERSION line is memcached's text; a stray byte must not fail the broadcast.
    result = text_result(Op.VERSION, Response(Status.VERSION, {}, text=b"1.6.18\xff"))
    assert result[0] == Code.OK and result[1].startswith("1.6.18") and len(result[1]) == 7


@pytest.mark.parametrize("op", [Op.GET, Op.GETS, Op.LEASE_GET])
def test_a_hit_whose_s_is_not_its_size_is_unusable(op: Op) -> None:
    # `s` returns the item's size: a 1-byte value saying s2 lost or gained a byte.
    with pytest.raises(ValueError, match="size"):
        meta_result(op, Status.VALUE, b"x", {"f": b"0", "s": b"2", "c": b"5"})


def test_a_text_command_has_no_meta_request_and_says_so() -> None:
    with pytest.raises(meta.RequestError, match="no meta request"):
        encode_op(Op.VERSION, [Op.VERSION, b"k"], 1)
