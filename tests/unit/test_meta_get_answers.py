"""broker/meta.py `ResponseParser.take_get_answers`: the fast path for answers to the broker's
plain gets (`mg <key> v f s O<n>`, doc/protocol.txt "Meta Get"):

    VA <size> f<flags> s<size> O<n>\\r\\n<data>\\r\\n   a hit (s repeats the data block's size)
    EN O<n>\\r\\n                                      a miss

It takes such answers, in turn, straight into wire results (`[OK, value, flags]` / MISS) and
leaves everything else to `next_items` (which checks it and raises where it must): the two paths
together must read any stream exactly as `next_items` alone does. Every stream is fed whole, split
at each offset and byte by byte."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from broker.meta import ProtocolError, ResponseParser, Status

pytestmark = pytest.mark.unit

OK = 0
MISS = ["miss"]


def hit(value: bytes, opaque: int, flags: int = 0) -> bytes:
    return b"VA %d f%d s%d O%d\r\n%b\r\n" % (len(value), flags, len(value), opaque, value)


def miss(opaque: int) -> bytes:
    return b"EN O%d\r\n" % opaque


def feedings(data: bytes) -> list[list[bytes]]:
    ways = [[data]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    ways.append([data[i : i + 1] for i in range(len(data))])
    return ways


def take_all(chunks: list[bytes], first: int, limit: int = 1 << 30, bare: bool = False) -> tuple[list[Any], ResponseParser]:
    p = ResponseParser(max_value_len=1 << 20)
    got: list[Any] = []
    for chunk in chunks:
        p.feed(chunk)
        got += p.take_get_answers(first + len(got), limit - len(got), OK, MISS, bare)
    return got, p


def test_hits_and_misses_in_turn_become_results_fed_every_way() -> None:
    data = hit(b"bar", 7, flags=5) + miss(8) + hit(b"a\r\nb", 9) + hit(b"", 10)
    for chunks in feedings(data):
        got, p = take_all(chunks, 7)
        assert got == [[OK, b"bar", 5], MISS, [OK, b"a\r\nb", 0], [OK, b"", 0]], chunks
        assert p.buffered == 0


def test_bare_hits_with_flags_0_are_their_values_alone_fed_every_way() -> None:
    # bare: the broker's GET_MANY shape (clientlib/wire.py), a hit whose flags are f0 is its value.
    data = hit(b"bar", 7, flags=5) + miss(8) + hit(b"a\r\nb", 9) + hit(b"", 10)
    for chunks in feedings(data):
        got, p = take_all(chunks, 7, bare=True)
        assert got == [[OK, b"bar", 5], MISS, b"a\r\nb", b""], chunks
        assert p.buffered == 0


def test_the_limit_is_kept_and_the_rest_is_left_whole() -> None:
    p = ResponseParser()
    p.feed(hit(b"x", 1) + miss(2) + miss(3))
    assert p.take_get_answers(1, 2, OK, MISS) == [[OK, b"x", 0], MISS]
    assert p.next_items() == [(Status.MISS, None, b" O3")]


@pytest.mark.parametrize(
    "answer",
    [
        hit(b"bar", 2),  # opaque out of turn (1 expected)
        b"VA 3 f0 s3 O01\r\nbar\r\n",  # a leading zero: the opaque is not the one sent
        b"EN O01\r\n",
        b"VA 3 f0 s4 O1\r\nbar\r\n",  # s disagrees with the VA length
        b"VA 3 f0 s3 O1\r\nbarX\r\n",  # the data block is not followed by CRLF
        b"VA 0 f0 s0 Z O1\r\n\r\n",  # a lease placeholder: Z (and W, X) go the general way
        b"VA 3 f0 s3 W O1\r\nbar\r\n",
        b"VA 3 s3 f0 O1\r\nbar\r\n",  # flags not in the order asked for
        b"HD O1\r\n",  # not an answer a plain get can have
        b"SERVER_ERROR out of memory\r\n",
        b"CLIENT_ERROR bad command line format\r\n",
        b"ERROR\r\n",
        b"garbage\r\n",
    ],
)
def test_anything_else_is_left_for_the_general_path_untouched(answer: bytes) -> None:
    for chunks in feedings(answer):
        got, p = take_all(chunks, 1)
        assert got == []
        assert p.buffered == len(answer)
    # ... which reads it as it would have without the fast path (an item, or its error).
    general = ResponseParser()
    general.feed(answer)
    fast = ResponseParser()
    fast.feed(answer)
    fast.take_get_answers(1, 10, OK, MISS)
    assert outcome(fast) == outcome(general)


def test_a_value_over_the_limit_is_left_for_the_general_path_to_refuse() -> None:
    p = ResponseParser(max_value_len=2)
    p.feed(hit(b"abc", 1))
    assert p.take_get_answers(1, 1, OK, MISS) == []
    with pytest.raises(ProtocolError):
        p.next_items()


def test_a_value_of_exactly_the_limit_is_taken() -> None:
    p = ResponseParser(max_value_len=3)
    p.feed(hit(b"abc", 1))
    assert p.take_get_answers(1, 1, OK, MISS) == [[OK, b"abc", 0]]


def test_nothing_is_taken_inside_a_stat_block() -> None:
    # A `stats` answer is being read (STAT lines until END): a get answer cannot come before its
    # END, so bytes that look like one are the general path's to refuse, never a result.
    p = ResponseParser()
    p.feed(b"STAT pid 1\r\n")
    assert p.next_items() == []
    p.feed(hit(b"x", 1))
    assert p.take_get_answers(1, 1, OK, MISS) == []
    with pytest.raises(ProtocolError, match="inside STAT block"):
        p.next_items()


def test_a_value_still_arriving_waits_and_is_taken_whole() -> None:
    value = b"v" * 10_000
    data = hit(value, 1)
    p = ResponseParser()
    p.feed(data[:5000])
    assert p.take_get_answers(1, 1, OK, MISS) == []
    p.feed(data[5000:])
    assert p.take_get_answers(1, 1, OK, MISS) == [[OK, value, 0]]


def test_nothing_is_taken_while_an_error_found_earlier_waits_to_be_raised() -> None:
    p = ResponseParser()
    p.feed(miss(1) + b"bogus line\r\n" + miss(2))
    assert p.next_items() == [(Status.MISS, None, b" O1")]
    assert p.failed
    assert p.take_get_answers(2, 1, OK, MISS) == []
    with pytest.raises(ProtocolError):
        p.next_items()


def outcome(p: ResponseParser) -> list[Any]:
    """Everything `next_items` gives until it needs bytes, or the error it raises."""
    out: list[Any] = []
    try:
        while items := p.next_items():
            out += items
    except ProtocolError as exc:
        out.append(("error", str(exc)))
    return out


@st.composite
def streams(draw: Any) -> tuple[bytes, int]:
    """Answers mostly in turn (opaques first, first + 1, ...), some out of turn, some of another
    shape (a lease flag, an error, a status a get cannot have, a size that disagrees)."""
    first = draw(st.integers(1, 4))
    out = []
    for n in range(draw(st.integers(0, 8))):
        opaque = first + n if draw(st.integers(0, 5)) else draw(st.integers(1, 12))
        kind = draw(st.sampled_from(["hit", "hit", "miss", "other"]))
        if kind == "hit":
            out.append(hit(draw(st.binary(max_size=12)), opaque, draw(st.integers(0, 2**32 - 1))))
        elif kind == "miss":
            out.append(miss(opaque))
        else:
            out.append(draw(st.sampled_from([
                b"HD O%d\r\n" % opaque, b"VA 1 f0 s1 Z O%d\r\nx\r\n" % opaque, b"SERVER_ERROR busy\r\n",
                b"VA 2 f0 s1 O%d\r\nab\r\n" % opaque, b"EN O0%d\r\n" % opaque,
            ])))
    return b"".join(out), first


def norm(item: Any) -> Any:
    """An item of `next_items` in a form a fast-path result can be compared with."""
    if isinstance(item, tuple) and item[0] is Status.MISS:
        return ("miss", item[2])
    if isinstance(item, tuple) and item[0] is Status.VALUE:
        return ("hit", item[1], item[2])
    if isinstance(item, tuple) and item[0] == "error":
        return item
    return ("other", repr(item))


def norm_fast(result: Any, opaque: int) -> Any:
    if result is MISS:
        return ("miss", b" O%d" % opaque)
    status, value, flags = result
    assert status == OK
    return ("hit", value, b" f%d s%d O%d" % (flags, len(value), opaque))


@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans())
def test_fast_then_general_reads_any_stream_as_the_general_path_alone(stream: tuple[bytes, int], bare: bool) -> None:
    data, first = stream
    general = ResponseParser()
    general.feed(data)
    expected = [norm(i) for i in outcome(general)]
    for chunks in (feedings(data) if len(data) < 60 else [[data]]):
        p = ResponseParser()
        got: list[Any] = []
        for chunk in chunks:
            p.feed(chunk)
            for r in p.take_get_answers(first + len(got), 8, OK, MISS, bare):
                if bare and r is not MISS and type(r) is list:
                    assert r[2] != 0, "with bare, a hit with flags 0 is its value alone"
                got.append(norm_fast([OK, r, 0] if type(r) is bytes else r, first + len(got)))
        assert got + [norm(i) for i in outcome(p)] == expected, chunks


# --- take_exact: an answer known in advance (the fence's `EN O<n>`) --------------------------------


def test_take_exact_consumes_the_expected_answer_only_once_it_is_whole_fed_every_way() -> None:
    data = miss(12) + hit(b"next", 13)
    for chunks in feedings(data):
        p = ResponseParser()
        taken = False
        for chunk in chunks:
            p.feed(chunk)
            if not taken:
                taken = p.take_exact(b"EN O12\r\n")
        assert taken, chunks
        # What follows is left exactly as it was, for the other paths.
        assert p.take_get_answers(13, 1, OK, MISS) == [[OK, b"next", 0]], chunks
        assert p.buffered == 0


@pytest.mark.parametrize("other", [b"HD O12\r\n", b"EN O13\r\n", b"EN O120\r\n", b"EN O12 k\r\n", b"SERVER_ERROR out of memory\r\n"])
def test_take_exact_leaves_any_other_answer_to_next_items(other: bytes) -> None:
    p = ResponseParser()
    p.feed(other)
    assert not p.take_exact(b"EN O12\r\n")
    assert p.buffered == len(other)
    items = p.next_items()
    assert len(items) == 1  # read by the general path, which checks and explains it


def test_take_exact_takes_nothing_while_a_value_is_incomplete_or_an_error_is_pending() -> None:
    p = ResponseParser()
    p.feed(b"VA 5 f0 s5 O1\r\nab")  # a value still arriving
    assert p.next_items() == []
    assert not p.take_exact(b"EN O2\r\n")
    p.feed(b"cde\r\nEN O2\r\n")
    assert not p.take_exact(b"EN O2\r\n")  # the value comes first
    assert [i[0] for i in p.next_items(1)] == [Status.VALUE]
    assert p.take_exact(b"EN O2\r\n") and p.buffered == 0
    bad = ResponseParser()
    bad.feed(miss(1) + b"BOGUS\r\n" + miss(2))
    assert len(bad.next_items()) == 1 and bad.failed
    assert not bad.take_exact(b"EN O2\r\n")  # the error found first is raised first
    with pytest.raises(ProtocolError):
        bad.next_items()
