"""The broker's fast path through the meta parser: `ResponseParser.next_item`, `flag_dict`, `opaque_of`.

`next_item` returns a meta response (protocol.txt: `<CD> <flags>*\\r\\n`, and for VA
`VA <size> <flags>*\\r\\n<data block>\\r\\n`) as a tuple `(status, value or None, flag bytes)`, where
the flag bytes are the line's flag tokens each with its leading space, and anything else (errors,
text replies, STAT blocks) as the `Response` that `next_response` gives. Every input here is fed
whole, split in two at every offset, and byte by byte, and must come out the same every way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from broker.meta import (
    MAX_LINE_LEN,
    ProtocolError,
    Response,
    ResponseParser,
    Status,
    flag_dict,
    opaque_of,
)

pytestmark = pytest.mark.unit

Item = Any  # a (status, value, flags) tuple or a Response


def feedings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    for i in range(1, len(data)):
        yield f"split at {i}", [data[:i], data[i:]]
    yield "byte by byte", [data[i : i + 1] for i in range(len(data))]


def run(chunks: list[bytes], max_value_len: int | None = None) -> tuple[list[Item], bool, int]:
    parser = ResponseParser() if max_value_len is None else ResponseParser(max_value_len)
    items: list[Item] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            for _ in range(len(chunk) + 2):  # bounded: each item takes at least one line
                item = parser.next_item()
                if item is None:
                    break
                items.append(item)
            else:
                raise AssertionError("next_item() kept returning items without input")
    except ProtocolError:
        return items, True, parser.buffered
    return items, False, parser.buffered


def every_way(data: bytes, max_value_len: int | None = None) -> tuple[list[Item], bool, int]:
    outcomes = {name: run(chunks, max_value_len) for name, chunks in feedings(data)}
    items, failed, left = outcomes["whole"]
    for name, (its, err, rest) in outcomes.items():
        assert its == items, f"{name}: items differ from a whole feed"
        assert err == failed, f"{name}: ProtocolError {err} vs whole feed {failed}"
        if not failed:
            assert rest == left, f"{name}: {rest} bytes left vs {left}"
    return items, failed, left


def parse(data: bytes, **kw: Any) -> list[Item]:
    items, failed, left = every_way(data, **kw)
    assert not failed, "unexpected ProtocolError"
    assert left == 0, f"{left} bytes left"
    return items


def reject(data: bytes, **kw: Any) -> list[Item]:
    items, failed, _ = every_way(data, **kw)
    assert failed, "expected ProtocolError"
    return items


# --- meta responses come out as tuples -------------------------------------------------------------

META = [
    (b"VA 3 f5 O7\r\nbar\r\n", (Status.VALUE, b"bar", b" f5 O7")),
    (b"VA 0 f0 O1\r\n\r\n", (Status.VALUE, b"", b" f0 O1")),
    (b"VA 4 f0 O1\r\na\r\nb\r\n", (Status.VALUE, b"a\r\nb", b" f0 O1")),  # the data block may hold CRLF
    (b"VA 2 f5 c77 O4\r\nhi\r\n", (Status.VALUE, b"hi", b" f5 c77 O4")),
    (b"VA 2\r\n42\r\n", (Status.VALUE, b"42", b"")),
    # the broker's gets (`mg <key> v f [c] s O<n>`): s repeats the size; the parser leaves it to
    # the pipeline to check, so one that disagrees still comes out as it was sent
    (b"VA 3 f5 s3 O7\r\nbar\r\n", (Status.VALUE, b"bar", b" f5 s3 O7")),
    (b"VA 0 f0 s0 O1\r\n\r\n", (Status.VALUE, b"", b" f0 s0 O1")),
    (b"VA 2 f5 c77 s2 O4\r\nhi\r\n", (Status.VALUE, b"hi", b" f5 c77 s2 O4")),
    (b"HD O2\r\n", (Status.OK, None, b" O2")),
    (b"HD\r\n", (Status.OK, None, b"")),
    (b"EN O1\r\n", (Status.MISS, None, b" O1")),
    (b"EN\r\n", (Status.MISS, None, b"")),
    (b"NS O10\r\n", (Status.NOT_STORED, None, b" O10")),
    (b"EX O3\r\n", (Status.EXISTS, None, b" O3")),
    (b"NF O5\r\n", (Status.NOT_FOUND, None, b" O5")),
    (b"MN\r\n", (Status.NOOP, None, b"")),
    (b"HD t-1 kfoo O9\r\n", (Status.OK, None, b" t-1 kfoo O9")),
    (b"HD v\r\n", (Status.OK, None, b" v")),
]


@pytest.mark.parametrize("data, expected", META, ids=[repr(d[:16]) for d, _ in META])
def test_meta_response_is_a_tuple_however_fed(data: bytes, expected: tuple[Status, bytes | None, bytes]) -> None:
    assert parse(data) == [expected]


def test_the_brokers_get_answers_come_out_in_order_however_fed() -> None:
    # What memcached 1.6.18 answered on one connection to
    #   ms k 2 F5 O1 / mg k v f s O2 / mg k v f c s O3 / mg k v f c s T30 O4 / mg nokey v f s O5 /
    #   mg _mcbroker_fence_ O6 / ms e 0 O7 / mg e v f s O8 / mg k s v f O9
    # (flags come back in the request's order).
    data = (
        b"HD O1\r\nVA 2 f5 s2 O2\r\nhi\r\nVA 2 f5 c1 s2 O3\r\nhi\r\nVA 2 f5 c1 s2 O4\r\nhi\r\n"
        b"EN O5\r\nEN O6\r\nHD O7\r\nVA 0 f0 s0 O8\r\n\r\nVA 2 s2 f5 O9\r\nhi\r\n"
    )
    assert parse(data) == [
        (Status.OK, None, b" O1"),
        (Status.VALUE, b"hi", b" f5 s2 O2"),
        (Status.VALUE, b"hi", b" f5 c1 s2 O3"),
        (Status.VALUE, b"hi", b" f5 c1 s2 O4"),
        (Status.MISS, None, b" O5"),
        (Status.MISS, None, b" O6"),
        (Status.OK, None, b" O7"),
        (Status.VALUE, b"", b" f0 s0 O8"),
        (Status.VALUE, b"hi", b" s2 f5 O9"),
    ]


def test_a_pipelined_answer_comes_out_in_order_however_fed() -> None:
    # What memcached 1.6.18 answered to mg, ms, mg, mg c, md, mg T, ma, mn on one connection.
    data = (
        b"EN O1\r\n"
        b"HD O2\r\n"
        b"VA 2 f5 O3\r\nhi\r\n"
        b"VA 2 f5 c1 O4\r\nhi\r\n"
        b"NF O5\r\n"
        b"HD O7\r\n"
        b"VA 2 O8\r\n43\r\n"
        b"MN\r\n"
    )
    assert parse(data) == [
        (Status.MISS, None, b" O1"),
        (Status.OK, None, b" O2"),
        (Status.VALUE, b"hi", b" f5 O3"),
        (Status.VALUE, b"hi", b" f5 c1 O4"),
        (Status.NOT_FOUND, None, b" O5"),
        (Status.OK, None, b" O7"),
        (Status.VALUE, b"43", b" O8"),
        (Status.NOOP, None, b""),
    ]


def test_value_is_bytes_not_a_view_of_the_buffer() -> None:
    parser = ResponseParser()
    parser.feed(b"VA 3 f0 O1\r\nabc\r\n")
    item = parser.next_item()
    assert item is not None and type(item) is tuple
    assert type(item[1]) is bytes and type(item[2]) is bytes
    parser.feed(b"HD O2\r\n" * 100)  # the buffer moves on; what was returned must not change
    assert item == (Status.VALUE, b"abc", b" f0 O1")


# --- everything else comes out as the Response next_response gives ---------------------------------

OTHER = [
    (b"SERVER_ERROR out of memory storing object\r\n", Response(Status.SERVER_ERROR, {}, text=b"out of memory storing object")),
    (b"CLIENT_ERROR bad data chunk\r\n", Response(Status.CLIENT_ERROR, {}, text=b"bad data chunk")),
    (b"ERROR\r\n", Response(Status.ERROR, {}, text=b"")),
    (b"VERSION 1.6.18\r\n", Response(Status.VERSION, {}, text=b"1.6.18")),
    (b"OK\r\n", Response(Status.TEXT_OK, {})),
    (b"RESET\r\n", Response(Status.RESET, {})),
    (b"STAT pid 1\r\nSTAT version 1.6.18\r\nEND\r\n", Response(Status.STATS, {}, stats={"pid": "1", "version": "1.6.18"})),
    (b"END\r\n", Response(Status.STATS, {}, stats={})),
]


@pytest.mark.parametrize("data, expected", OTHER, ids=[repr(d[:16]) for d, _ in OTHER])
def test_other_responses_are_response_objects_however_fed(data: bytes, expected: Response) -> None:
    assert parse(data) == [expected]


def test_meta_lines_inside_and_after_a_stat_block() -> None:
    # A STAT block ends at END; what follows is meta again.
    data = b"HD O1\r\nSTAT pid 1\r\nEND\r\nVA 1 f0 O2\r\nx\r\nSERVER_ERROR boom\r\nMN\r\n"
    assert parse(data) == [
        (Status.OK, None, b" O1"),
        Response(Status.STATS, {}, stats={"pid": "1"}),
        (Status.VALUE, b"x", b" f0 O2"),
        Response(Status.SERVER_ERROR, {}, text=b"boom"),
        (Status.NOOP, None, b""),
    ]


def test_a_meta_line_inside_a_stat_block_is_rejected() -> None:
    assert reject(b"STAT pid 1\r\nHD O1\r\nEND\r\n") == []


# --- incomplete input waits, and resumes ---------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [b"", b"V", b"VA", b"VA 3 f5 O7", b"VA 3 f5 O7\r", b"VA 3 f5 O7\r\n", b"VA 3 f5 O7\r\nba", b"VA 3 f5 O7\r\nbar",
     b"VA 3 f5 O7\r\nbar\r", b"HD O2", b"HD O2\r", b"MN\r"],
)
def test_incomplete_input_waits_for_more(partial: bytes) -> None:
    parser = ResponseParser()
    parser.feed(partial)
    assert parser.next_item() is None
    assert parser.buffered == len(partial)


def test_a_stat_block_waits_for_its_end() -> None:
    parser = ResponseParser()
    parser.feed(b"STAT pid 1\r\nSTAT uptime 5\r\n")
    assert parser.next_item() is None
    parser.feed(b"END\r\n")
    assert parser.next_item() == Response(Status.STATS, {}, stats={"pid": "1", "uptime": "5"})


def test_a_value_is_returned_only_once_its_terminator_arrived() -> None:
    data = b"VA 3 f5 O7\r\nbar\r\n"
    for cut in range(len(data)):
        parser = ResponseParser()
        parser.feed(data[:cut])
        assert parser.next_item() is None, f"an item from {data[:cut]!r}"
        parser.feed(data[cut:])
        assert parser.next_item() == (Status.VALUE, b"bar", b" f5 O7")
        assert parser.next_item() is None
        assert parser.buffered == 0


def test_a_large_value_in_chunks() -> None:
    value = bytes(range(256)) * 400 + b"\r\n" * 10
    data = b"VA %d f1 O1\r\n" % len(value) + value + b"\r\nHD O2\r\n"
    parser = ResponseParser()
    items = []
    for i in range(0, len(data), 997):
        parser.feed(data[i : i + 997])
        while (item := parser.next_item()) is not None:
            items.append(item)
    assert items == [(Status.VALUE, value, b" f1 O1"), (Status.OK, None, b" O2")]


# --- malformed input raises ProtocolError, however fed -------------------------------------------

MALFORMED = [
    b"VA f0 O1\r\n",  # VA without its size
    b"VA -1 O1\r\nx\r\n",
    b"VA x O1\r\n",
    b"VA 1 O1\r\nxy\r\n",  # data block not followed by CRLF
    b"VA 3 O1\r\nab\r\n\r\n",  # the data block ran one byte into its terminator
    b"VA 1 O1\r\nx\n\r\n",
    b"VA 123456789012345678901 O1\r\n",  # more digits than any size
    b"HD 5 O1\r\n",  # only VA carries a size
    b"MN 2\r\n",
    b"HD O1 \r\n",  # a trailing space is an empty token
    b"HD  O1\r\n",
    b"HD 1x\r\n",  # a flag starts with a letter
    b"XY O1\r\n",
    b"hd O1\r\n",
    b"garbage\r\n",
    b"STAT pid 1\r\nEN\r\n",
]


@pytest.mark.parametrize("data", MALFORMED, ids=repr)
def test_malformed_input_raises_however_fed(data: bytes) -> None:
    assert reject(data) == []


@pytest.mark.parametrize("data", MALFORMED, ids=repr)
def test_good_items_before_bad_bytes_still_come_out(data: bytes) -> None:
    assert reject(b"HD O1\r\nVA 1 f0 O2\r\nx\r\n" + data) == [
        (Status.OK, None, b" O1"),
        (Status.VALUE, b"x", b" f0 O2"),
    ]


def test_value_larger_than_max_value_len_is_rejected_from_its_header_alone() -> None:
    assert parse(b"VA 4 f0 O1\r\nabcd\r\n", max_value_len=4) == [(Status.VALUE, b"abcd", b" f0 O1")]
    assert reject(b"VA 5 f0 O1\r\nabcde\r\n", max_value_len=4) == []
    # The header is enough: no need to wait for (or buffer) the data block.
    parser = ResponseParser(4)
    parser.feed(b"VA 5 f0 O1\r\n")
    with pytest.raises(ProtocolError):
        parser.next_item()


def test_set_max_value_len_applies_to_what_follows() -> None:
    parser = ResponseParser(2)
    parser.set_max_value_len(3)
    parser.feed(b"VA 3 f0 O1\r\nabc\r\n")
    assert parser.next_item() == (Status.VALUE, b"abc", b" f0 O1")


def test_an_endless_line_is_rejected_without_waiting_for_crlf() -> None:
    parser = ResponseParser()
    parser.feed(b"HD " + b"k" * (MAX_LINE_LEN + 10))
    with pytest.raises(ProtocolError):
        parser.next_item()


# --- the fast path says what the general parser says ---------------------------------------------

flag_tokens = st.lists(
    st.tuples(
        st.sampled_from("bcfhklOqstvNRTDJM"),
        st.binary(max_size=8).map(lambda b: bytes(x for x in b if 0x21 <= x <= 0x7E)),
    ),
    max_size=5,
)


def meta_line(head: bytes, tokens: list[tuple[str, bytes]], value: bytes | None) -> bytes:
    if value is not None:
        # protocol.txt: `s` is the item's size; a VA whose s says otherwise is refused (tested
        # on its own), so a generated one states its true size.
        tokens = [(c, b"%d" % len(value) if c == "s" and t.isdigit() else t) for c, t in tokens]
    flags = b"".join(b" " + c.encode() + t for c, t in tokens)
    if value is None:
        return head + flags + b"\r\n"
    return head + b" %d" % len(value) + flags + b"\r\n" + value + b"\r\n"


responses = st.one_of(
    st.tuples(st.sampled_from([b"HD", b"EN", b"NS", b"EX", b"NF", b"MN"]), flag_tokens, st.none()),
    st.tuples(st.just(b"VA"), flag_tokens, st.binary(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(responses, min_size=1, max_size=6), st.lists(st.integers(1, 400), max_size=6))
def test_next_item_agrees_with_next_response(resps: list[Any], cuts: list[int]) -> None:
    data = b"".join(meta_line(h, t, v) for h, t, v in resps)
    slow = ResponseParser()
    slow.feed(data)
    expected = []
    while (r := slow.next_response()) is not None:
        expected.append(r)
    assert slow.buffered == 0

    fast = ResponseParser()
    items = []
    pos = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        fast.feed(data[pos:cut])
        pos = max(pos, cut)
        while (item := fast.next_item()) is not None:
            items.append(item)
    assert fast.buffered == 0
    assert len(items) == len(expected) == len(resps)
    for item, resp in zip(items, expected):
        assert type(item) is tuple
        status, value, flags = item
        assert (status, value, flag_dict(flags)) == (resp.status, resp.value, resp.flags)
        if flags.rsplit(b" ", 1)[-1][:1] == b"O":  # O last, as the broker sends it
            assert opaque_of(flags) == resp.opaque


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=4), st.sampled_from([None, 0, 3, 16]))
def test_arbitrary_bytes_give_items_or_protocol_error_the_same_however_cut(
    data: bytes, cuts: list[int], max_value: int | None
) -> None:
    whole = run([data], max_value)
    chunks, pos = [], 0
    for cut in sorted(set(cuts)):
        chunks.append(data[pos:cut])
        pos = max(pos, cut)
    chunks.append(data[pos:])
    single = run([data[i : i + 1] for i in range(len(data))], max_value)
    for outcome in (run(chunks, max_value), single):
        assert outcome[0] == whole[0]
        assert outcome[1] == whole[1]
        if not whole[1]:
            assert outcome[2] == whole[2]


# --- flag_dict and opaque_of -------------------------------------------------------------------------


def test_flag_dict() -> None:
    assert flag_dict(b"") == {}
    assert flag_dict(b" f5 O7") == {"f": b"5", "O": b"7"}
    assert flag_dict(b" f5 c77 O4") == {"f": b"5", "c": b"77", "O": b"4"}
    assert flag_dict(b" v") == {"v": b""}  # a bare flag has an empty token
    assert flag_dict(b" t-1 kfoo O9") == {"t": b"-1", "k": b"foo", "O": b"9"}
    assert flag_dict(b" Oabc") == {"O": b"abc"}


def test_flag_dict_does_not_share_state_between_calls() -> None:
    a = flag_dict(b"")
    b = flag_dict(b" f1")
    assert a == {} and b == {"f": b"1"}
    assert flag_dict(b"") == {}


def test_opaque_of() -> None:
    assert opaque_of(b" O7") == b"7"
    assert opaque_of(b" f5 O7") == b"7"
    assert opaque_of(b" f5 c77 O123456") == b"123456"
    assert opaque_of(b"") is None
    assert opaque_of(b" f5") is None
    assert opaque_of(b" f5 kO7") is None  # a k token that happens to contain O is not the opaque
    assert opaque_of(b" O") == b""


def test_opaque_of_is_the_o_token_even_when_other_flags_follow_it() -> None:
    # Docstring: "The `O` token of a meta line's flags"; memcached answers flags in request
    # order, so a request with flags after O gets them after O on the response.
    assert opaque_of(b" O7 kfoo") == b"7"
    assert opaque_of(b" f5 O7 t-1") == b"7"


@settings(max_examples=300, deadline=None)
@given(flag_tokens, st.integers(0, 10**12))
def test_opaque_of_finds_the_last_o_token(tokens: list[tuple[str, bytes]], opaque: int) -> None:
    tokens = [(c, t) for c, t in tokens if c != "O"] + [("O", b"%d" % opaque)]
    flags = b"".join(b" " + c.encode() + t for c, t in tokens)
    assert opaque_of(flags) == b"%d" % opaque
    assert flag_dict(flags)["O"] == b"%d" % opaque


# --- issue 14's mutmut survivors: what a broken stream's error says, and that it stays broken ------


def _parse_error(data: bytes, max_value: int = 1 << 20) -> str:
    parser = ResponseParser(max_value)
    parser.feed(data)
    with pytest.raises(ProtocolError) as info:
        while parser.next_items():
            pass
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"VA f0 O2\r\n", ["VA", "f0 O2"]),  # VA without its size
        (b"HD 5 O2\r\n", ["HD", "5 O2"]),  # a size on a status that carries no data
        (b"EN O1\r\nVA f0 O2\r\n", ["VA", "f0 O2"]),  # after a good response: the next call
        (b"VA 2000 s2000 O1\r\n", ["2000", "1000"]),  # past the value bound (1000 here)
    ],
)
def test_a_bad_meta_line_error_shows_the_line(data: bytes, says: list[str]) -> None:
    message = _parse_error(data, max_value=1000)
    for words in says:
        assert words in message, f"{message!r} should show {words!r}"


@pytest.mark.parametrize("line", [b"HD 5 O1 " + b"k" * 100, b"VA O1 " + b"k" * 100])
def test_a_bad_line_is_shown_cut_to_60_bytes(line: bytes) -> None:
    message = _parse_error(line + b"\r\n")
    assert repr(line[:60]) in message and repr(line[:61]) not in message


def test_a_broken_stream_stays_broken() -> None:
    # Good responses first, then garbage: the good ones come out, then every call raises.
    parser = ResponseParser(1000)
    parser.feed(b"EN O1\r\nHD 5 O2\r\n")
    assert [item[0] for item in parser.next_items()] == [Status.MISS]  # type: ignore[index]
    for _ in range(3):
        with pytest.raises(ProtocolError):
            parser.next_items()


# --- next_items, the pipeline's call: a value in pieces, and its limit ----------------------------


def _items_in_pieces(data: bytes, cut: int, step: int, limit: int = 1 << 62) -> tuple[list[Item], int]:
    """`data[:cut]` first, then the rest `step` bytes at a time, calling next_items after each."""
    parser = ResponseParser()
    parser.feed(data[:cut])
    items = parser.next_items(limit)
    rest = data[cut:]
    for i in range(0, len(rest), step):
        parser.feed(rest[i : i + step])
        items += parser.next_items(limit)
    return items, parser.buffered


def test_next_items_gives_a_value_as_soon_as_the_piece_ending_its_crlf_arrives() -> None:
    # protocol.txt: `VA <size> <flags>*\r\n<data block>\r\n`; the response is whole when the
    # CRLF after the data block is in, and must come out then, not after one more byte.
    value = bytes(range(40)) * 3
    data = b"VA %d f0 O1\r\n" % len(value) + value + b"\r\n"
    for cut in range(1, len(data)):
        for step in (1, 2, 7, len(data)):
            items, left = _items_in_pieces(data, cut, step)
            assert items == [(Status.VALUE, value, b" f0 O1")], f"cut {cut}, pieces of {step}"
            assert left == 0


def test_next_items_gives_the_value_and_what_follows_when_a_piece_runs_past_it() -> None:
    value = b"v" * 50
    data = b"VA 50 f3 O1\r\n" + value + b"\r\nHD O2\r\n"
    for cut in range(1, len(data)):
        items, left = _items_in_pieces(data, cut, len(data))
        assert items == [(Status.VALUE, value, b" f3 O1"), (Status.OK, None, b" O2")], f"cut {cut}"
        assert left == 0


# Responses that are not meta lines (errors, text replies) take next_items' slower loop.
NOT_META = [
    (b"ERROR\r\n", Response(Status.ERROR, {}, text=b"")),
    (b"SERVER_ERROR out of memory\r\n", Response(Status.SERVER_ERROR, {}, text=b"out of memory")),
    (b"VERSION 1.6.18\r\n", Response(Status.VERSION, {}, text=b"1.6.18")),
    (b"OK\r\n", Response(Status.TEXT_OK, {})),
    (b"CLIENT_ERROR bad data chunk\r\n", Response(Status.CLIENT_ERROR, {}, text=b"bad data chunk")),
]


@pytest.mark.parametrize("limit", [1, 2, 3, 4])
def test_next_items_gives_at_most_limit_items_on_the_slower_loop_too(limit: int) -> None:
    stream = b"".join(data for data, _ in NOT_META)
    parser = ResponseParser()
    parser.feed(stream)
    batches = []
    while batch := parser.next_items(limit):
        batches.append(batch)
    assert [len(b) for b in batches[:-1]] == [limit] * (len(batches) - 1)
    assert 1 <= len(batches[-1]) <= limit
    assert [item for b in batches for item in b] == [expected for _, expected in NOT_META]


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_next_items_gives_at_most_limit_items_across_both_loops(limit: int) -> None:
    parser = ResponseParser()
    parser.feed(b"HD O1\r\nERROR\r\nEN O2\r\nSERVER_ERROR busy\r\n")
    first = parser.next_items(limit)
    assert len(first) == limit
    assert first[0] == (Status.OK, None, b" O1")


# protocol.txt, mg's flags: "s: return item size token". memcached writes the value's length
# there (1.6.18's proto_meta: `it->nbytes - 2`), so in a VA answer it must equal the VA size,
# wherever the token stands among the flags; a header that lost or gained a digit is refused
# from the header alone, without waiting for a data block of the wrong length.
S_DISAGREES = [
    b"VA 2 s3 f0 O1\r\nab\r\n",  # s first
    b"VA 2 f0 s3 O1\r\nab\r\n",
    b"VA 2 f0 O1 s3\r\nab\r\n",  # s last
    b"VA 2 s3\r\nab\r\n",  # s alone
    b"VA 10 s1\r\n",  # the header alone
    b"VA 1 s10 O1\r\n",
]


@pytest.mark.parametrize("data", S_DISAGREES)
def test_a_va_whose_s_token_disagrees_with_its_size_is_rejected_however_fed(data: bytes) -> None:
    assert reject(data) == []
    parser = ResponseParser()
    parser.feed(data)
    with pytest.raises(ProtocolError, match="says s"):
        parser.next_items()
    parser = ResponseParser()
    parser.feed(data)
    with pytest.raises(ProtocolError, match="says s"):
        parser.next_response()


@pytest.mark.parametrize("data", [b"VA 2 s2 f0 O1\r\nab\r\n", b"VA 2 f0 O1 s2\r\nab\r\n", b"VA 2 s2\r\nab\r\n"])
def test_a_va_whose_s_token_agrees_is_taken_wherever_it_stands(data: bytes) -> None:
    flags = data[len(b"VA 2") : data.index(b"\r\n")]
    assert parse(data) == [(Status.VALUE, b"ab", flags)]


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_feed_copies_a_buffer_the_caller_reuses(kind: type) -> None:
    # A reader that receives into one preallocated buffer (recv_into) feeds the parser a view of
    # it and then overwrites it: what the parser holds, and the values it returns, must be bytes
    # of their own.
    buffer = bytearray(b"VA 3 f0 O1\r\nab")
    parser = ResponseParser()
    parser.feed(buffer if kind is bytearray else memoryview(buffer))
    buffer[:] = b"c\r\nHD" + b"X" * (len(buffer) - 5)
    parser.feed(buffer[:5] if kind is bytearray else memoryview(buffer)[:5])
    parser.feed(b" O2\r\n")
    buffer[:] = b"Y" * len(buffer)
    items = parser.next_items()
    assert items == [(Status.VALUE, b"abc", b" f0 O1"), (Status.OK, None, b" O2")]
    assert all(type(item[1]) is bytes for item in items if item[1] is not None)
    assert all(type(item[2]) is bytes for item in items)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_next_items_gives_at_most_limit_meta_responses(limit: int) -> None:
    # The pipeline asks for at most what it has in flight (1 for a fence): no response past it.
    expected = [(Status.OK, None, b" O1"), (Status.MISS, None, b" O2"), (Status.VALUE, b"x", b" O3"), (Status.NOT_FOUND, None, b" O4")]
    parser = ResponseParser()
    parser.feed(b"HD O1\r\nEN O2\r\nVA 1 O3\r\nx\r\nNF O4\r\n")
    assert parser.next_items(limit) == expected[:limit]
    assert parser.next_items() == expected[limit:]
