"""broker/meta.py `ResponseParser._take_hit_run`: a run of hits to the broker's plain gets taken in
bulk (split at CRLF, headers rebuilt and compared whole) ahead of `take_get_answers`' loop:

    VA <size> f<flags> s<size> O<n>\\r\\n<data>\\r\\n   (doc/protocol.txt "Meta Get")

The bulk read must take exactly what the loop would, answer by answer, and leave the rest exactly
where the loop would: every stream here is read both ways (run_min past any limit turns the bulk
read off) and compared, fed whole, split at each offset, byte by byte, or in drawn pieces."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from broker.meta import RUN_MIN, ProtocolError, ResponseParser

pytestmark = pytest.mark.unit

OK = 0
MISS = ["miss"]
OFF = 1 << 62  # run_min: the bulk read never runs


def hit(value: bytes, opaque: int, flags: int = 0) -> bytes:
    return b"VA %d f%d s%d O%d\r\n%b\r\n" % (len(value), flags, len(value), opaque, value)


def miss(opaque: int) -> bytes:
    return b"EN O%d\r\n" % opaque


def cut(data: bytes, at: list[int]) -> list[bytes]:
    """`data` in pieces, cut at the offsets `at` (in any order)."""
    cuts = sorted(at)
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def read(
    chunks: list[bytes], first: int, limit: int, run_min: int, max_value: int = 1 << 20, bare: bool = False,
) -> tuple[list[Any], int, ResponseParser]:
    """Feed the chunks, taking after each; the results, the bytes left, the parser."""
    p = ResponseParser(max_value_len=max_value)
    p.run_min = run_min
    got: list[Any] = []
    for chunk in chunks:
        p.feed(chunk)
        got += p.take_get_answers(first + len(got), limit - len(got), OK, MISS, bare)
    return got, p.buffered, p


def unbare(results: list[Any]) -> list[Any]:
    """Results taken with `bare` as they read without it: a value alone is [OK, value, 0]."""
    return [[OK, r, 0] if type(r) is bytes else r for r in results]


def test_a_run_of_hits_is_taken_in_bulk_with_each_value_and_its_flags() -> None:
    data = b"".join(hit(b"v%d" % i, i, flags=i * 3) for i in range(1, 21)) + miss(21)
    p = ResponseParser()
    p.feed(data)
    assert p._take_hit_run(1, 20, OK) == [[OK, b"v%d" % i, i * 3] for i in range(1, 21)]
    assert p.buffered == len(miss(21))
    assert p.take_get_answers(21, 1, OK, MISS) == [MISS]


def test_the_run_stops_at_a_miss_and_the_loop_takes_it_and_what_follows() -> None:
    data = b"".join(hit(b"x", i) for i in range(1, 11)) + miss(11) + hit(b"y", 12)
    p = ResponseParser()
    p.run_min = 8  # a run of 10 in bulk
    p.feed(data)
    assert p._take_hit_run(1, 12, OK) == [[OK, b"x", 0]] * 10
    bare = ResponseParser()
    bare.run_min = 8
    bare.feed(data)
    assert bare._take_hit_run(1, 12, OK, True) == [b"x"] * 10  # every flag f0: the values themselves
    p2 = ResponseParser()
    p2.feed(data)
    assert p2.take_get_answers(1, 12, OK, MISS) == [[OK, b"x", 0]] * 10 + [MISS, [OK, b"y", 0]]
    assert p2.buffered == 0


@pytest.mark.parametrize(
    "odd",
    [
        hit(b"a\r\nVA 1 f0 s1 O6\r\nb", 5),  # a data block holding CRLF and a header-like line
        b"VA 03 f0 s03 O5\r\nabc\r\n",  # a size with a leading zero: the loop's to take
        b"VA 3 f0 s4 O5\r\nabc\r\n",  # s disagrees
        b"VA 3 f0 s3 O05\r\nabc\r\n",  # an opaque with a leading zero is out of turn
        b"VA 3 f12345678901 s3 O5\r\nabc\r\n",  # 11 digits of flags
        b"VA 3 f0 s3 Z O5\r\nabc\r\n",  # a lease flag
        b"VA 3 f0 s3 O5\nVA 3 f0 s3 O5\r\nabc\r\n",  # an LF inside a header
        b"VA 3 f0 s3 O5\r\nabcd\r\n",  # the block is longer than its size
    ],
)
def test_an_answer_out_of_shape_inside_a_run_is_read_as_the_loop_reads_it(odd: bytes) -> None:
    data = b"".join(hit(b"v", i) for i in range(1, 5)) + odd + b"".join(hit(b"w", i) for i in range(6, 16))
    for chunks in ([data], [data[:40], data[40:]], [data[i : i + 1] for i in range(len(data))]):
        bulk, left, _ = read(chunks, 1, 15, 1)
        loop, loop_left, _ = read(chunks, 1, 15, OFF)
        assert (bulk, left) == (loop, loop_left), chunks


def test_every_split_of_a_run_reads_as_the_loop_reads_it() -> None:
    data = b"".join(hit(b"val\r\n%d" % i, i, flags=i) for i in range(1, 13)) + b"VA 9 f0 s9 O13\r\npart"
    ways = [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))] + [[data[i : i + 1] for i in range(len(data))]]
    for chunks in ways:
        bulk, left, _ = read(chunks, 1, 13, RUN_MIN)
        assert (bulk, left) == read(chunks, 1, 13, OFF)[:2], chunks
        assert len(bulk) == 12


def test_a_buffer_of_several_batches_is_read_batch_by_batch_in_bounded_regions() -> None:
    # Each batch is split from where the last one ended, in a region of at most _RUN_MOST bytes per
    # answer wanted (larger values are the loop's to take), not the whole buffer after it.
    sizes = [5, 90, 120, 1000]
    batches = [[b"%d" % b * (size + i) for i in range(20)] for b, size in enumerate(sizes)]
    data = b"".join(hit(v, 1 + 20 * b + i) for b, vals in enumerate(batches) for i, v in enumerate(vals))
    p = ResponseParser()
    p.feed(data)
    for b, vals in enumerate(batches[:3]):
        assert p._take_hit_run(1 + 20 * b, 20, OK) == [[OK, v, 0] for v in vals]
    assert p._take_hit_run(61, 20, OK) == []
    assert p.take_get_answers(61, 20, OK, MISS) == [[OK, v, 0] for v in batches[3]]
    assert p.buffered == 0


def test_values_over_the_limit_are_left_to_the_loop() -> None:
    data = b"".join(hit(b"x" * (5 if i != 9 else 50), i) for i in range(1, 13))
    bulk, left, _ = read([data], 1, 12, 1, max_value=10)
    assert (bulk, left) == read([data], 1, 12, OFF, max_value=10)[:2]
    assert len(bulk) == 8


@pytest.mark.parametrize("limit", [4, 5, 6])
def test_a_value_of_exactly_the_limit_is_taken_in_bulk_and_one_byte_more_is_not(limit: int) -> None:
    data = b"".join(hit(b"x" * 5, i) for i in range(1, 13))
    bulk, left, _ = read([data], 1, 12, 1, max_value=limit)
    assert (bulk, left) == read([data], 1, 12, OFF, max_value=limit)[:2]
    assert len(bulk) == (12 if limit >= 5 else 0)


def test_opaques_past_twenty_digits_are_left_to_the_loop() -> None:
    first = 10**20 - 5
    data = b"".join(hit(b"x", first + i) for i in range(10))
    bulk, left, _ = read([data], first, 10, 1)
    assert (bulk, left) == read([data], first, 10, OFF)[:2]
    assert len(bulk) == 5


@pytest.mark.parametrize("first", [1, 985, 999, 1000, 999_990, 10**19 - 10])
def test_a_run_whose_opaques_cross_a_thousand_is_taken_in_bulk(first: int) -> None:
    # The rebuilt headers' opaques are made of a high part and three low digits (meta._put_opaques):
    # a run from 985 has 985..999 then 1000..1019, from 999_990 has 999990..999999 then 1000000...
    data = b"".join(hit(b"v%d" % i, first + i) for i in range(35)) + miss(first + 35)
    bulk, left, p = read([data], first, 36, RUN_MIN)
    assert bulk == [[OK, b"v%d" % i, 0] for i in range(35)] + [MISS]
    assert left == 0
    assert (bulk, left) == read([data], first, 36, OFF)[:2]
    q = ResponseParser(1 << 20)
    q.feed(data)
    assert len(q._take_hit_run(first, 36, OK)) == 35  # in bulk, not by the loop


_ODD = [
    b"a\r\nb", b"\r\n", b"\r\nEN O3\r\n", b"\r\nVA 1 f0 s1 O4\r\nz", b"VA 2 f0 s2 O9\r\n", b"\n", b"\r",
    b"EN O", b"x" * 400,
]


@st.composite
def streams(draw: Any) -> tuple[list[bytes], int, int, int]:
    """Long runs of hits, some data blocks made to look like answers or to hold CRLF, some misses,
    some answers out of turn or out of shape, a tail cut anywhere; fed in drawn pieces."""
    first = draw(st.sampled_from([1, 2, 7, 990, 999_985, 10**20 - 30]))
    noisy = draw(st.booleans())  # else hits in turn only (their data blocks may still be odd)
    out = []
    for n in range(draw(st.integers(0, 40))):
        opaque = first + n if not noisy or draw(st.integers(0, 30)) else draw(st.integers(1, 60))
        kind = draw(st.sampled_from(["hit"] * 12 + ["miss", "odd", "other"])) if noisy else "hit"
        if kind == "hit":
            value = draw(st.binary(max_size=8)) if draw(st.integers(0, 5)) else draw(st.sampled_from(_ODD))
            out.append(hit(value, opaque, draw(st.sampled_from([0, 1, 2**32 - 1, 9999999999]))))
        elif kind == "miss":
            out.append(miss(opaque))
        elif kind == "odd":
            out.append(hit(draw(st.sampled_from(_ODD)), opaque))
        else:
            out.append(draw(st.sampled_from([
                b"VA 1 f0 s2 O%d\r\nx\r\n" % opaque, b"VA 01 f0 s01 O%d\r\nx\r\n" % opaque,
                b"SERVER_ERROR busy\r\n", b"VA 1 f0 s1 O%d\nx\r\n" % opaque, b"HD O%d\r\n" % opaque,
            ])))
    data = b"".join(out)
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    chunks = cut(data, draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return chunks, first, draw(st.integers(0, 45)), draw(st.sampled_from([1, 4, RUN_MIN]))


@settings(max_examples=600, deadline=None)
@given(streams())
def test_bulk_then_loop_reads_any_stream_as_the_loop_alone(stream: tuple[list[bytes], int, int, int]) -> None:
    assert_read_as_the_loop_alone(*stream)


def assert_read_as_the_loop_alone(chunks: list[bytes], first: int, limit: int, run_min: int) -> None:
    """Results, the bytes left, and what the general path then reads: the same both ways, and
    with `bare` the same results with each f0 hit's value alone."""
    bulk, left, p = read(chunks, first, limit, run_min, max_value=300)
    loop, loop_left, q = read(chunks, first, limit, OFF, max_value=300)
    assert (bulk, left) == (loop, loop_left)
    after = rest(p)
    assert after == rest(q)
    bare_bulk, bare_left, b = read(chunks, first, limit, run_min, max_value=300, bare=True)
    bare_loop, _, _ = read(chunks, first, limit, OFF, max_value=300, bare=True)
    assert bare_bulk == bare_loop and bare_left == left and rest(b) == after
    assert unbare(bare_bulk) == bulk
    assert not any(type(r) is list and r[0] == OK and r[2] == 0 for r in bare_bulk), "f0 hits go bare"


def rest(p: ResponseParser) -> list[Any]:
    """What the general path reads from what was left: items until more bytes are needed, or the
    error it raises."""
    out: list[Any] = []
    try:
        while items := p.next_items():
            out += [repr(i) for i in items]
    except ProtocolError as exc:
        out.append(("error", str(exc)))
    return out


# --- found in review: a header holding LF before `EN O`, a limit past any count --------------------


def test_a_header_holding_lf_then_en_o_is_not_cut_into_a_hit_and_a_miss() -> None:
    # The miss search found `\nEN O` inside the eighth header and cut the run there: the header's
    # part before the LF was rebuilt as a hit (O8) and given the data block that follows the whole
    # line, where the loop does not read that line as an answer at all.
    data = b"".join(hit(b"x", i) for i in range(1, 8)) + b"VA 1 f0 s1 O8\nEN O9\r\ny\r\n" + hit(b"z", 10)
    bulk, left, p = read([data], 1, 10, RUN_MIN)
    loop, loop_left, q = read([data], 1, 10, OFF)
    assert loop == [[OK, b"x", 0]] * 7
    assert (bulk, left) == (loop, loop_left)
    assert rest(p) == rest(q)


def test_lfs_inside_a_header_before_en_o_do_not_count_as_answers() -> None:
    # More LFs before the `\nEN O` than headers: the count of answers ran past the data blocks and
    # the rebuilding raised TypeError (take_get_answers never raises).
    data = b"\n".join([b"f1 s"] * 10) + b"\nEN O1\r\nd\r\n" + b"".join(hit(b"x", i) for i in range(2, 10))
    for limit in (8, 9, 12):
        bulk, left, p = read([data], 1, limit, RUN_MIN)
        assert (bulk, left) == read([data], 1, limit, OFF)[:2] == ([], len(data))
        assert rest(p)[0][0] == "error"


def test_a_limit_past_any_count_of_answers_is_a_limit_like_any_other() -> None:
    data = b"".join(hit(b"v%d" % i, i) for i in range(1, 21)) + miss(21)
    for limit in (1 << 62, (1 << 63) - 1, 1 << 80):
        bulk, left, _ = read([data], 1, limit, RUN_MIN)
        assert (bulk, left) == read([data], 1, limit, OFF)[:2]
        assert len(bulk) == 21 and left == 0


def test_a_large_value_ends_the_bulk_run_and_the_loop_steps_over_it() -> None:
    # The bulk read scans every data block for CRLF, the loop steps over one by its size: the
    # region it splits holds at most _RUN_MOST bytes per answer wanted, so a large value (here
    # 100 kB among 100-byte ones; it was 20 times slower per answer with one of 1 MB) is left to
    # the loop, and the small ones after it too.
    vals = [b"s%d" % i * 25 for i in range(20)] + [b"L" * 100_000] + [b"t%d" % i * 25 for i in range(20)]
    data = b"".join(hit(v, i + 1) for i, v in enumerate(vals)) + miss(42)
    p = ResponseParser()
    p.feed(data)
    assert p._take_hit_run(1, 41, OK) == [[OK, v, 0] for v in vals[:20]]
    assert p._take_hit_run(21, 21, OK) == []
    assert p.take_get_answers(21, 22, OK, MISS) == [[OK, v, 0] for v in vals[20:]] + [MISS]
    assert p.buffered == 0
    for limit in (8, 21, 41, 60):
        for chunks in ([data], [data[:3000], data[3000:]], [data[:50_000], data[50_000:]]):
            bulk, left, _ = read(chunks, 1, limit, RUN_MIN)
            assert (bulk, left) == read(chunks, 1, limit, OFF)[:2]


_PIECES = [b"a", b"\r", b"\n", b"\r\n", b" ", b"0", b"EN O", b"VA ", b" f1 s", b"f1 s"]
_SIZES = [0, 100, 120, 130, 140, 200, 400]  # about the most bytes per answer the bulk read splits
_INSIDE = [b"\n", b"\r", b"\r\n", b" ", b"\nEN O", b"\n\n", b"0", b""]


@st.composite
def header_streams(draw: Any) -> tuple[list[bytes], int, int, int]:
    """Streams built from the pieces of the answers themselves: whole hits and misses in turn,
    headers cut short or ended by LF, CR or nothing, `EN O<n>` and `VA ...` inside headers and
    data blocks, stray CR, LF and CRLF, so that the split at CRLF lands anywhere in a header."""
    first = draw(st.sampled_from([1, 3, 10**20 - 12]))
    nxt = first
    out: list[bytes] = []
    ends = st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\n\r\n", b"\r\r\n"])
    for _ in range(draw(st.integers(0, 50))):
        kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 8, 9, 10, 11]))
        if kind <= 5:
            bits = draw(st.lists(st.sampled_from(_PIECES + [b"VA 1 f0 s1 O%d" % nxt, b"EN O%d" % nxt]), max_size=4))
            size = kind if kind < 5 else draw(st.sampled_from(_SIZES))
            out.append(hit(b"".join(bits) if kind == 0 else b"v" * size, nxt, draw(st.sampled_from([0, 7]))))
            nxt += 1
        elif kind == 6:
            out.append(miss(nxt))
            nxt += 1
        elif kind in (7, 8):
            # A hit with something put inside its header (or a header cut short).
            size = draw(st.integers(0, 2))
            head = b"VA %d f0 s%d O%d" % (size, size, nxt)
            at = len(head) if draw(st.booleans()) else draw(st.integers(0, len(head)))
            inside = draw(st.sampled_from(_INSIDE + [b"\nEN O%d" % (nxt + 1), b"\nVA 0 f0 s0 O%d" % (nxt + 1)]))
            tail = b"\r\n" + b"v" * size + b"\r\n" if kind == 7 else draw(ends)
            out.append(head[:at] + inside + head[at:] + tail)
            nxt += draw(st.integers(0, 1))
        elif kind == 9:
            out.append(b"EN O%d" % nxt + draw(ends))
            nxt += draw(st.integers(0, 1))
        else:
            out.append(b"".join(draw(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=3))))
    data = b"".join(out)
    chunks = cut(data, draw(st.lists(st.integers(0, len(data)), max_size=3)))
    limit = draw(st.sampled_from([1, 2, 8, 9, 20, 60, 1 << 62]))
    return chunks, first, limit, draw(st.sampled_from([1, 2, 3, RUN_MIN]))


@settings(max_examples=500, deadline=None)
@given(header_streams())
def test_bulk_then_loop_reads_streams_of_answer_pieces_as_the_loop_alone(stream: tuple[list[bytes], int, int, int]) -> None:
    assert_read_as_the_loop_alone(*stream)


def test_a_miss_or_what_looks_like_one_in_a_data_block_ends_the_region_split() -> None:
    # The bulk read looks for `\r\nEN O` before splitting and splits no further: a data block
    # holding it (as one holding CRLF) fails the bulk run, and the loop takes all by size.
    vals = [b"v%d" % i for i in range(1, 21)]
    vals[11] = b"a\r\nEN O5\r\nb"
    data = b"".join(hit(v, i + 1) for i, v in enumerate(vals)) + miss(21) + hit(b"after", 22)
    p = ResponseParser()
    p.run_min = 8  # the 11 before the odd block in bulk
    p.feed(data)
    assert p._take_hit_run(1, 22, OK) == []
    assert p._take_hit_run(1, 11, OK) == [[OK, v, 0] for v in vals[:11]]
    assert p.take_get_answers(12, 11, OK, MISS) == [[OK, v, 0] for v in vals[11:]] + [MISS, [OK, b"after", 0]]
    assert p.buffered == 0
    q = ResponseParser()
    q.feed(miss(1) + data[len(hit(vals[0], 1)) :])
    assert q._take_hit_run(1, 22, OK) == []  # a miss first


_BYTES = [b"\r", b"\n", b"0", b"1", b"9", b" ", b"E", b"N", b"V", b"A", b"O", b"f", b"s", b"x"]
_STRINGS = [b"\r\n", b"\n\r", b"\nEN O10", b"\r\nEN O9", b"\nVA 3 f5 s3 O9", b"\r\nVA 0 f0 s0 O9\r\n"]


def mutations(answer: bytes) -> list[bytes]:
    """Every answer one edit away: each byte dropped or replaced, each byte or string put in."""
    out = [answer[:i] + answer[i + 1 :] for i in range(len(answer))]
    out += [answer[:i] + b + answer[i + 1 :] for i in range(len(answer)) for b in _BYTES]
    out += [answer[:i] + b + answer[i:] for i in range(len(answer) + 1) for b in _BYTES + _STRINGS]
    return out


@pytest.mark.parametrize("answer", [hit(b"abc", 9, flags=5), hit(b"", 9), miss(9)])
@pytest.mark.parametrize("at", [0, 3, 8])
def test_every_answer_one_edit_away_inside_a_run_is_read_as_the_loop_reads_it(answer: bytes, at: int) -> None:
    # Exhaustive where the drawn streams are not: the answer with opaque 9 (first 9 - at) edited
    # every way one edit can, among plain hits, read whole and in two pieces, with the bulk read
    # from one answer on and from RUN_MIN on.
    first = 9 - at
    before = b"".join(hit(b"v%d" % i, i) for i in range(first, 9))
    after = b"".join(hit(b"w%d" % i, i) for i in range(10, 14)) + miss(14)
    seen = 0
    for odd in set(mutations(answer)):
        data = before + odd + after
        for chunks in ([data], [data[: len(before) + 7], data[len(before) + 7 :]]):
            for run_min in (1, RUN_MIN):
                bulk, left, p = read(chunks, first, 14 - first + 1, run_min)
                loop, loop_left, q = read(chunks, first, 14 - first + 1, OFF)
                assert (bulk, left, rest(p)) == (loop, loop_left, rest(q)), (odd, chunks, run_min)
        seen += 1
    assert seen > 20 * len(answer)


# Pieces of a stream as functions of the opaque in turn: (bytes, how many opaques they use).
_TOKENS = [
    lambda n: (b"VA 1 f0 s1 O%d\r\nx\r\n" % n, 1),
    lambda n: (b"VA 0 f7 s0 O%d\r\n\r\n" % n, 1),
    lambda n: (b"EN O%d\r\n" % n, 1),
    lambda n: (b"\n", 0),
    lambda n: (b"\r", 0),
    lambda n: (b"\r\n", 0),
    lambda n: (b"VA 1 f0 s1 O%d" % n, 1),
    lambda n: (b"EN O%d" % n, 0),
]


def test_every_stream_of_up_to_four_pieces_reads_as_the_loop_reads_it() -> None:
    # Exhaustive over a small alphabet (a length of 6, about a million reads, passed in review;
    # the LF-before-`EN O` cut showed at 4), the bulk read from one answer on.
    count = 0
    for k in range(5):
        for seq in itertools.product(_TOKENS, repeat=k):
            n = 1
            out = []
            for token in seq:
                piece, used = token(n)
                out.append(piece)
                n += used
            data = b"".join(out)
            for limit in (1, 3, 9):
                bulk, left, p = read([data], 1, limit, 1)
                loop, loop_left, q = read([data], 1, limit, OFF)
                assert (bulk, left, rest(p)) == (loop, loop_left, rest(q)), (data, limit)
                count += 1
    assert count == 3 * sum(8**k for k in range(5))


@pytest.mark.parametrize(
    "odd",
    [
        hit(b"x", 9, flags=5),  # one header with other flags: the run is read with the flags template
        b"VA 1 f0 s1 O9 f0 s\r\nx\r\n",  # " f0 s" twice in one header, n times in all: the fast template fails it
        b"VA 1 f0 s1 O9\r\nx\r\n",  # in shape: the whole run with flags 0
    ],
)
def test_runs_of_flags_0_and_of_other_flags_are_read_as_the_loop_reads_them(odd: bytes) -> None:
    data = b"".join(hit(b"v%d" % i, i) for i in range(1, 9)) + odd + b"".join(hit(b"w", i) for i in range(10, 20))
    bulk, left, p = read([data], 1, 19, 1)
    loop, loop_left, q = read([data], 1, 19, OFF)
    assert (bulk, left, rest(p)) == (loop, loop_left, rest(q))
    assert len(bulk) == (8 if b"O9 f0" in odd else 19)


@pytest.mark.parametrize(("first_size", "bulk"), [(400, 21), (401, 0), (1000, 0), (99, 21)])
def test_a_first_value_past_400_bytes_leaves_the_batch_to_the_loop(first_size: int, bulk: int) -> None:
    # The bulk read looks at the first answer's size before splitting: past 400 bytes the split
    # would cost more than the loop. Either way both readings take the same answers.
    data = hit(b"L" * first_size, 1) + b"".join(hit(b"s%d" % i, i) for i in range(2, 22))
    p = ResponseParser()
    p.feed(data)
    assert len(p._take_hit_run(1, 21, OK)) == bulk
    got, left, _ = read([data], 1, 21, RUN_MIN)
    assert (got, left) == read([data], 1, 21, OFF)[:2] and len(got) == 21


def test_the_f0_header_starts_are_made_once_per_size_and_bounded() -> None:
    from broker import meta

    meta._RUN_F0_STARTS.clear()
    values = [b"x" * (i % 7 + 1) for i in range(40)]  # seven sizes, each seen several times
    data = b"".join(hit(v, 100 + i) for i, v in enumerate(values))
    got, left, _ = read([data], 100, 40, RUN_MIN)
    assert got == [[OK, v, 0] for v in values] and left == 0
    assert meta._RUN_F0_STARTS == {n: b"\nVA %d f0 s%d O" % (n, n) for n in range(1, 8)}
    # Past its bound the table starts again at the next new size instead of growing.
    meta._f0_starts(list(range(1000, 1000 + meta._RUN_F0_STARTS_MOST + 1)))
    assert len(meta._RUN_F0_STARTS) > meta._RUN_F0_STARTS_MOST
    values = [b"y" * (i % 3 + 8) for i in range(40)]  # three new sizes
    data = b"".join(hit(v, 100 + i) for i, v in enumerate(values))
    got, left, _ = read([data], 100, 40, RUN_MIN)
    assert got == [[OK, v, 0] for v in values] and left == 0
    assert sorted(meta._RUN_F0_STARTS) == [8, 9, 10]
