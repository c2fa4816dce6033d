"""broker/pipeline.py: one memcached connection's pipeline, sans-I/O, fed memcached's answers.

The requests are built as the router builds them (`encode_op` with opaque `seq + 1`, consecutive
per connection; a Batch's `first` is the opaque of its first request; text commands carry none)
and the answers are written out here as memcached 1.6 sends them (doc/protocol.txt; checked
against memcached 1.6.18 on one connection):

    mg <key> v f s O1    ->  VA <size> f<flags> s<size> O1\\r\\n<data>\\r\\n  |  EN O1
    mg <key> v f c s O1  ->  VA <size> f<flags> c<cas> s<size> O1\\r\\n<data>\\r\\n  |  EN O1
    ms <key> <len> O2    ->  HD O2 | NS O2 | EX O2 | NF O2
    md <key> O3          ->  HD O3 | NF O3
    ma <key> v O4        ->  VA <size> O4\\r\\n<number>\\r\\n  |  NF O4
    mg _mcbroker_fence_ O5  ->  EN O5 | HD O5   (the fence `seal()` ends each write with: it
                                                takes the opaque after the write's last request)
    stats                ->  STAT <name> <value> ... END
    version              ->  VERSION <version>
    errors               ->  ERROR | CLIENT_ERROR <message> | SERVER_ERROR <message>

and the results each waiter must get are the wire results of clientlib/wire.py.

The guarantees checked (pipeline.py's docstring, issues 8, 9 and 13):
- FIFO: every response goes to the request in its place, whose opaque it must carry.
- A meta result is held until the next response arrives whole and in its place (opaque checked)
  or the answer to the fence closing its write arrives (opaque checked too); text replies go at
  once. A value holding CRLF is never proven by a line without an opaque (an error, a text reply):
  the stream is reset instead, as a data block that ran past its end always holds a CRLF.
- `MN` answers nothing the broker sends: anywhere it is an unexpected response.
- A hit must carry every flag its request asked for (f; c for gets/gats; s), and s must be the
  data block's size: else OutOfStep. A status memcached never gives to the request: OutOfStep.
- `receive` returns how many meta requests its data answered (text replies and fences not).
- Anything that casts doubt on the stream raises OutOfStep; `fail_all` then fails every request
  not yet delivered, held results included; no value is ever delivered from a doubtful stream.
- SERVER_ERROR to any request, CLIENT_ERROR to mg/md/ma, ERROR/CLIENT_ERROR to a text command
  belong to their request and the stream goes on; CLIENT_ERROR/ERROR to ms and ERROR to a meta
  request fail that request with its own error (its one outcome) and raise
  OutOfStep(answered=True); `fail_all` then fails the rest.
- A waiter that gave up (done) is a tombstone: its responses are parsed, checked and dropped.
- `release` is called once per keyed request, answered or failed; `inflight` counts back to 0.

Every answer is fed whole, split in two at every offset, and byte by byte; every way must give
the same outcome, and at every point of the byte-by-byte feed exactly the results whose proof has
arrived must have been delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from broker.pipeline import TEXT, Batch, OutOfStep, Pipeline, tag_of
from broker import meta
from broker.meta import ResponseParser
from broker.translate import TEXT_EXPECT, UNLINK_TOO_LARGE, encode_op, encode_text
from clientlib.wire import Code, Op

pytestmark = pytest.mark.unit

MAX_VALUE = 1 << 20


@pytest.fixture(autouse=True, params=["fast path", "general path"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: as the broker runs (a batch of plain gets takes the fast path,
    `Pipeline._take_gets`, and a fence's `EN O<n>` is taken whole, `ResponseParser.take_exact`)
    and with every answer on the general path (`_match`): both must keep every guarantee, event
    for event."""
    if request.param == "general path":
        monkeypatch.setattr(Pipeline, "_take_gets", lambda self, batch, limit: 0)
        monkeypatch.setattr(ResponseParser, "take_exact", lambda self, response: False)
    return str(request.param)


# --- a recording waiter and a rig around one pipeline ---------------------------------------------


@dataclass(frozen=True)
class Failed:
    """`waiter.fail(index, code, message)` was called with this code."""

    code: Code


class Err:
    """Matches a delivered failure result `[code, message]` whose message mentions `text`."""

    def __init__(self, code: Code, text: str) -> None:
        self.code = code
        self.text = text

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, list) and len(other) == 2 and other[0] == self.code
            and isinstance(other[1], str) and self.text in other[1]
        )

    def __repr__(self) -> str:
        return f"Err({self.code.name}, {self.text!r})"


Event = tuple[str, int, Any]  # (waiter name, index, result list, Bare or Failed)


class Bare:
    """A hit delivered as its value alone (client flags 0): equal to the list it stands for,
    [OK, value, 0], so expectations read as the wire's GET result; `type(r) is Bare` tells."""

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Bare):
            return other.value == self.value
        return other == [Code.OK, self.value, 0]

    def __repr__(self) -> str:
        return f"Bare({self.value!r})"


def recorded(result: Any) -> Any:
    assert type(result) is not list or type(result[0]) is not bytes, f"a result list starts with its code: {result!r}"
    return Bare(result) if type(result) is bytes else result


class Recorder:
    """A waiter: what it was given goes into the rig's log, in the order it happened."""

    def __init__(self, name: str, log: list[Event]) -> None:
        self.name = name
        self.done = False
        self.log = log
        self.messages: dict[int, str] = {}

    def deliver(self, index: int, result: Any) -> None:
        self.log.append((self.name, index, recorded(result)))

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        for index, result in zip(indices, results):
            self.log.append((self.name, index, recorded(result)))

    def fail(self, index: int, code: Code, message: str) -> None:
        assert isinstance(message, str) and message, "a failure carries a message"
        self.messages[index] = message
        self.log.append((self.name, index, Failed(code)))


class Rig:
    """One pipeline, its waiters, and every key it released."""

    def __init__(self, max_value_len: int = MAX_VALUE) -> None:
        self.log: list[Event] = []
        self.released: list[bytes] = []
        self.p = Pipeline(max_value_len, release=self.released.append)
        self.waiters: dict[str, Recorder] = {}
        self.keys: list[bytes] = []
        self.fences: list[int] = []  # each fence's opaque, in order

    def waiter(self, name: str) -> Recorder:
        w = self.waiters.get(name)
        if w is None:
            w = self.waiters[name] = Recorder(name, self.log)
        return w

    def meta(self, name: str, ops: list[list[Any]], indices: list[int] | None = None) -> bytes:
        """Queue `ops` for waiter `name` as the router does; returns the bytes queued."""
        p = self.p
        first = p.seq + 1
        data = b"".join(encode_op(op[0], op, first + j) for j, op in enumerate(ops))
        p.seq += len(ops)
        keys = [op[1] for op in ops]
        self.keys += keys
        p.submit(Batch(self.waiter(name), indices or list(range(len(ops))), [int(op[0]) for op in ops], keys, first), data)
        return data

    def text(self, name: str, op: list[Any], index: int = 0) -> bytes:
        data = encode_text(op[0], op)
        self.p.submit(Batch(self.waiter(name), [index], [int(op[0])], None, TEXT, TEXT_EXPECT[op[0]]), data)
        return data

    def seal(self) -> int | None:
        """End the write; returns the fence's opaque (None if there was nothing to fence)."""
        before = self.p.seq
        self.p.seal()
        if self.p.seq == before:
            return None
        assert self.p.seq == before + 1, "the fence takes exactly one opaque"
        self.fences.append(self.p.seq)
        return self.p.seq


@dataclass
class Outcome:
    log: list[Event]
    error: OutOfStep | None
    released: list[bytes]
    inflight: int
    failed_in_flight: int | None = None  # what fail_all returned, when it ran
    keys: list[bytes] = field(default_factory=list)


def feedings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    for i in range(1, len(data)):
        yield f"split at {i}", [data[:i], data[i:]]
    yield "byte by byte", [data[i : i + 1] for i in range(len(data))]


def play(
    build: Callable[[], Rig], chunks: list[bytes], *,
    visible: list[int] | None = None, error_at: int | None = None, name: str = "",
) -> Outcome:
    """Feed `chunks`; on OutOfStep do what the driver does (fail_all with CONNECTION_ERROR).

    `visible[k]`: the stream offset from which the k-th event of the log (before any error) must
    have happened; `error_at`: the offset whose byte makes the pipeline raise OutOfStep."""
    rig = build()
    fed = 0
    error = None
    n = None
    for chunk in chunks:
        try:
            rig.p.receive(chunk)
        except OutOfStep as exc:
            error = exc
            assert error_at is not None, f"{name}: unexpected OutOfStep after {fed}+{len(chunk)} bytes: {exc}"
            assert fed < error_at <= fed + len(chunk), f"{name}: OutOfStep in bytes {fed}..{fed + len(chunk)}, expected at {error_at}"
            if visible is not None:
                assert len(rig.log) == sum(v <= error_at for v in visible), f"{name}: at the error: {rig.log}"
            n = rig.p.fail_all(Code.CONNECTION_ERROR, "pipeline reset")
            break
        fed += len(chunk)
        if error_at is not None:
            assert fed < error_at, f"{name}: no OutOfStep after {fed} bytes (expected at {error_at})"
        if visible is not None:
            assert len(rig.log) == sum(v <= fed for v in visible), f"{name}: after {fed} bytes: {rig.log}"
    return Outcome(rig.log, error, rig.released, rig.p.inflight, n, rig.keys)


def every_way(build: Callable[[], Rig], data: bytes, **kw: Any) -> Outcome:
    """Play `data` whole, split at every offset and byte by byte; all must agree. Returns one."""
    outcomes = {name: play(build, chunks, name=name, **kw) for name, chunks in feedings(data)}
    first = outcomes["whole"]
    for name, o in outcomes.items():
        assert o.log == first.log, f"{name}: {o.log} vs whole feed {first.log}"
        assert (o.error is None) == (first.error is None), f"{name}: OutOfStep {o.error} vs {first.error}"
        if o.error is not None and first.error is not None:
            assert o.error.answered == first.error.answered, name
        assert sorted(o.released) == sorted(first.released), name
        assert o.inflight == first.inflight, name
        assert o.failed_in_flight == first.failed_in_flight, name
    return first


def offsets(*parts: bytes) -> list[int]:
    """The stream offset at which each part ends."""
    ends, total = [], 0
    for part in parts:
        total += len(part)
        ends.append(total)
    return ends


def va(value: bytes, opaque: int, flags: int | None = 0, cas: int | None = None, size: int | None = -1) -> bytes:
    """memcached's hit to `mg <key> v f [c] s O<opaque>`: `VA <size> f<flags> [c<cas>] s<size>
    O<opaque>` and the data block (flags in request order). `size=None` leaves out the s token;
    another number puts it there in place of the value's size."""
    f = b"" if flags is None else b" f%d" % flags
    c = b"" if cas is None else b" c%d" % cas
    s = b"" if size is None else b" s%d" % (len(value) if size == -1 else size)
    return b"VA %d%b%b%b O%d\r\n%b\r\n" % (len(value), f, c, s, opaque, value)


def fence(opaque: int, hit: bool = False) -> bytes:
    """memcached's answer to the fence `mg _mcbroker_fence_ O<opaque>` (no `v`): EN, or HD
    should a key of that name exist."""
    return b"%s O%d\r\n" % (b"HD" if hit else b"EN", opaque)


MN = b"MN\r\n"  # the answer to `mn`, which the broker never sends
C = Code.CONNECTION_ERROR
STATS = b"STAT pid 1\r\nSTAT uptime 5\r\nEND\r\n"


# --- requests --------------------------------------------------------------------------------------


def test_requests_go_out_in_order_and_each_write_ends_with_a_fence() -> None:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"hi", 0, 0]])
    rig.meta("B", [[Op.DELETE, b"c"]])
    assert rig.p.inflight == 3
    assert rig.seal() == 4  # the fence takes the opaque after the write's last request
    assert rig.seal() is None  # nothing new: no second fence
    assert bytes(rig.p.out) == b"mg a v f s O1\r\nms b 2 O2\r\nhi\r\nmd c O3\r\nmg _mcbroker_fence_ O4\r\n"
    rig.p.sent(15)
    assert bytes(rig.p.out) == b"ms b 2 O2\r\nhi\r\nmd c O3\r\nmg _mcbroker_fence_ O4\r\n"
    rig.p.sent(len(rig.p.out))
    assert rig.p.out == b""
    rig.meta("C", [[Op.INCR, b"n", 5]])  # the next request's opaque follows the fence's
    rig.text("G", [Op.VERSION])
    assert rig.seal() == 6
    assert bytes(rig.p.out) == b"ma n v D5 O5\r\nversion\r\nmg _mcbroker_fence_ O6\r\n"
    assert rig.p.inflight == 5  # fences are not requests


# --- FIFO matching and the hold rule ---------------------------------------------------------------


def build_fifo() -> Rig:
    rig = Rig()
    # A frame's ops 0 and 2 bound here (op 1 went to another server).
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]], indices=[0, 2])
    rig.meta("B", [[Op.SET, b"c", b"vc", 0, 0], [Op.DELETE, b"d"], [Op.GET, b"e"]])
    rig.meta("C", [[Op.INCR, b"n", 5]], indices=[3])
    rig.seal()
    return rig


def test_fifo_across_batches_and_waiters_however_fed() -> None:
    r1 = va(b"va", 1, flags=5)
    r2 = b"EN O2\r\n"
    r3 = b"HD O3\r\n"
    r4 = b"NF O4\r\n"
    r5 = va(b"v\r\n", 5)  # a value may hold CRLF
    r6 = b"VA 2 O6\r\n47\r\n"
    e1, e2, e3, e4, e5, e6, e_fence = offsets(r1, r2, r3, r4, r5, r6, fence(7))
    out = every_way(
        build_fifo, r1 + r2 + r3 + r4 + r5 + r6 + fence(7),
        # each result goes once the next response arrived whole with its opaque, the last at the
        # fence's answer
        visible=[e2, e3, e4, e5, e6, e_fence],
    )
    assert out.log == [
        ("A", 0, [Code.OK, b"va", 5]),
        ("A", 2, [Code.MISS]),
        ("B", 0, [Code.OK]),
        ("B", 1, [Code.NOT_FOUND]),
        ("B", 2, [Code.OK, b"v\r\n", 0]),
        ("C", 3, [Code.OK, 47]),
    ]
    # A hit with client flags 0 goes as its value alone (the wire's GET_MANY result), any other as a list.
    assert [type(r) for _, _, r in out.log] == [list, list, list, list, Bare, list]
    assert out.error is None
    assert out.inflight == 0
    assert sorted(out.released) == sorted(out.keys) == [b"a", b"b", b"c", b"d", b"e", b"n"]


def build_two_writes() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GETS, b"b"]])
    rig.seal()
    rig.meta("B", [[Op.GET, b"c"]])
    rig.meta("A2", [[Op.TOUCH, b"d", 10]])
    rig.seal()
    return rig


def test_each_write_is_proven_by_its_own_fence_however_fed() -> None:
    # opaques: a O1, b O2, fence O3 | c O4, d O5, fence O6
    r1 = va(b"x", 1)
    r2 = b"VA 1 f7 c99 s1 O2\r\ny\r\n"
    r3 = va(b"z", 4)
    r4 = b"EN O5\r\n"
    e1, e2, fenced1, e3, e4, fenced2 = offsets(r1, r2, fence(3), r3, r4, fence(6))
    out = every_way(build_two_writes, r1 + r2 + fence(3) + r3 + r4 + fence(6), visible=[e2, fenced1, e4, fenced2])
    assert out.log == [
        ("A", 0, [Code.OK, b"x", 0]),
        ("A", 1, [Code.OK, b"y", 7, 99]),
        ("B", 0, [Code.OK, b"z", 0]),
        ("A2", 0, [Code.NOT_FOUND]),
    ]
    assert out.inflight == 0 and out.error is None
    assert sorted(out.released) == [b"a", b"b", b"c", b"d"]


def test_a_value_waits_while_the_next_response_is_incomplete() -> None:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.seal()
    r1, r2 = va(b"one", 1), va(b"two", 2)
    assert rig.p.receive(r1) == 1
    assert rig.log == []  # nothing proves r1's length yet
    assert rig.p.receive(r2[:-1]) == 0  # r2 lacks its last byte
    assert rig.log == []
    assert rig.p.receive(r2[-1:]) == 1  # r2 whole, opaque 2 in place: r1 is proven
    assert rig.log == [("A", 0, [Code.OK, b"one", 0])]
    rig.p.receive(fence(3)[:-1])
    assert len(rig.log) == 1
    rig.p.receive(fence(3)[-1:])  # the fence's answer, opaque 3 in place, proves r2
    assert rig.log == [("A", 0, [Code.OK, b"one", 0]), ("A", 1, [Code.OK, b"two", 0])]
    assert rig.p.inflight == 0


def test_every_op_kind_answered_in_one_write_however_fed() -> None:
    ops: list[list[Any]] = [
        [Op.GET, b"k1"], [Op.GETS, b"k2"], [Op.GAT, b"k3", 10], [Op.GATS, b"k4", 10],
        [Op.SET, b"k5", b"v", 0, 0], [Op.ADD, b"k6", b"v", 0, 0], [Op.REPLACE, b"k7", b"v", 0, 0],
        [Op.APPEND, b"k8", b"v", 0, 0], [Op.PREPEND, b"k9", b"v", 0, 0], [Op.CAS, b"k10", b"v", 0, 0, 5],
        [Op.DELETE, b"k11"], [Op.INCR, b"k12", 1], [Op.DECR, b"k13", 1], [Op.TOUCH, b"k14", 10],
        [Op.CAS, b"k15", b"v", 0, 0, 6],
    ]

    def build() -> Rig:
        rig = Rig()
        rig.meta("A", ops)
        rig.seal()
        return rig

    answer = [
        va(b"1", 1, 1), b"VA 1 f2 c22 s1 O2\r\n2\r\n", b"EN O3\r\n", b"VA 1 f4 c44 s1 O4\r\n4\r\n",
        b"HD O5\r\n", b"NS O6\r\n", b"NS O7\r\n",
        b"HD O8\r\n", b"NS O9\r\n", b"EX O10\r\n",
        b"HD O11\r\n", b"VA 1 O12\r\n9\r\n", b"NF O13\r\n", b"HD O14\r\n",
        b"NF O15\r\n", fence(16),
    ]
    ends = offsets(*answer)
    out = every_way(build, b"".join(answer), visible=ends[1:])
    assert [e[2] for e in out.log] == [
        [Code.OK, b"1", 1], [Code.OK, b"2", 2, 22], [Code.MISS], [Code.OK, b"4", 4, 44],
        [Code.OK], [Code.NOT_STORED], [Code.NOT_STORED],
        [Code.OK], [Code.NOT_STORED], [Code.EXISTS],
        [Code.OK], [Code.OK, 9], [Code.NOT_FOUND], [Code.OK],
        [Code.NOT_FOUND],
    ]
    assert [e[1] for e in out.log] == list(range(len(ops)))
    assert out.inflight == 0 and sorted(out.released) == sorted(op[1] for op in ops)


def test_a_set_too_large_for_the_server_is_answered_as_memcached_answers_it() -> None:
    # The router sends it as `md` (memcached would refuse the value and unlink the key); whether
    # the key existed or not, the worker reads "SERVER_ERROR object too large for cache".
    def build() -> Rig:
        rig = Rig()
        first = rig.p.seq + 1
        data = meta.encode(meta.Delete(b"big", first)) + meta.encode(meta.Delete(b"big2", first + 1))
        assert data == b"md big O1\r\nmd big2 O2\r\n"
        rig.p.seq += 2
        rig.p.submit(Batch(rig.waiter("A"), [0, 1], [UNLINK_TOO_LARGE] * 2, [b"big", b"big2"], first), data)
        rig.meta("B", [[Op.GET, b"c"]])
        rig.seal()
        return rig

    answer = [b"HD O1\r\n", b"NF O2\r\n", b"EN O3\r\n", fence(4)]
    ends = offsets(*answer)
    out = every_way(build, b"".join(answer), visible=ends[1:])
    assert out.log == [
        ("A", 0, Err(Code.SERVER_ERROR, "object too large for cache")),
        ("A", 1, Err(Code.SERVER_ERROR, "object too large for cache")),
        ("B", 0, [Code.MISS]),
    ]
    assert sorted(out.released) == [b"big", b"big2", b"c"]


# --- opaque mismatch and other doubt: OutOfStep, and no value leaves -------------------------------


def build_two_gets() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.seal()
    return rig


F3 = fence(3)  # the fence closing build_two_gets' write


def two_gets_failed(out: Outcome) -> None:
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, Failed(C)), ("A", 1, Failed(C))]
    assert out.inflight == 0
    assert sorted(out.released) == [b"a", b"b"]


@pytest.mark.parametrize(
    "second",
    [va(b"y", 3), va(b"y", 1), b"VA 1 f0 s1\r\ny\r\n", va(b"y", 12), b"VA 1 f0 s1 O02\r\ny\r\n", F3, fence(3, hit=True), b"VA 1 f0 s1 O2 O3\r\ny\r\n"],
    # EN O3 / HD O3: the fence's answer where b's was due (b's answer lost)
    ids=["O3-for-O2", "O1-again", "no-opaque", "O12", "O02", "fence-EN-O3", "fence-HD-O3", "O2-then-O3"],
)
def test_opaque_mismatch_fails_the_held_and_the_unanswered(second: bytes) -> None:
    r1 = va(b"x", 1)
    e1, e2 = offsets(r1, second)
    out = every_way(build_two_gets, r1 + second + F3, visible=[], error_at=e2)
    two_gets_failed(out)
    assert out.failed_in_flight == 1  # r1 was answered (held), r2 was not


@pytest.mark.parametrize(
    "second, result",
    [
        (b"VA 1 f0 s1 O2 t-1\r\ny\r\n", [Code.OK, b"y", 0]),
        (b"VA 1 f7 s1 O2 kYg== b\r\ny\r\n", [Code.OK, b"y", 7]),
        (b"EN O2 kYg==\r\n", [Code.MISS]),
    ],
    ids=repr,
)
def test_the_opaque_token_is_checked_even_when_other_flags_follow_it(second: bytes, result: list[Any]) -> None:
    # protocol.txt returns flags in the request's order; should any come after O, the O token is
    # still the opaque (O2 here), not the rest of the line.
    r1 = va(b"x", 1)
    e1, e2, fenced = offsets(r1, second, F3)
    out = every_way(build_two_gets, r1 + second + F3, visible=[e2, fenced])
    assert out.log == [("A", 0, [Code.OK, b"x", 0]), ("A", 1, result)]


@pytest.mark.parametrize("second", [b"VA 1 f0 s1 O21 t-1\r\ny\r\n", b"VA 1 f0 s1 O1 t2\r\ny\r\n", b"EN O3 k2\r\n", b"EN kO2\r\n"], ids=repr)
def test_a_wrong_opaque_followed_by_other_flags_is_a_mismatch(second: bytes) -> None:
    r1 = va(b"x", 1)
    out = every_way(build_two_gets, r1 + second + F3, visible=[], error_at=len(r1 + second))
    two_gets_failed(out)


@pytest.mark.parametrize(
    "op, second",
    [
        ([Op.GET, b"b"], b"VA 1 s1 O2\r\ny\r\n"),
        ([Op.GETS, b"b"], b"VA 1 f5 s1 O2\r\ny\r\n"),
        ([Op.GETS, b"b"], b"VA 1 c9 s1 O2\r\ny\r\n"),
        ([Op.GAT, b"b", 10], b"VA 1 s1 O2\r\ny\r\n"),
    ],
    ids=["mg-no-f", "mg-c-no-c", "mg-c-no-f", "gat-no-f"],
)
def test_a_hit_without_a_flag_we_asked_for_is_no_result(op: list[Any], second: bytes) -> None:
    # protocol.txt: mg returns each flag asked for (f: client flags, c: cas) on a hit; memcached
    # 1.6.18 answered `mg k v f c s O1` for an item with flags 0 with "VA 1 f0 c1 s1 O1". A VA
    # without one is not memcached's answer; defaulting it to 0 would hand the worker client
    # flags (its serializer's tag) or a cas memcached never gave. b gets a failure, never
    # [OK, y, 0] or [OK, y, 5, 0].
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], op])
        rig.seal()
        return rig

    r1 = va(b"x", 1)
    for name, log in damaged_runs(build, r1 + second + F3):
        b = [e[2] for e in log if e[0] == "A" and e[1] == 1]
        assert len(b) == 1 and is_failure(b[0]), f"{name}: b got {b}"


GET_OPS: list[list[Any]] = [[Op.GET, b"b"], [Op.GETS, b"b"], [Op.GAT, b"b", 10], [Op.GATS, b"b", 10]]
GET_IDS = ["get", "gets", "gat", "gats"]


def build_get_then_get_op(op: list[Any]) -> Callable[[], Rig]:
    """a: mg O1 (GET); b: `op` O2; the fence O3."""

    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], op])
        rig.seal()
        return rig

    return build


def hit_for(op: list[Any], value: bytes, opaque: int, size: int | None) -> bytes:
    """memcached's hit to `op` (the flags it asks for: f, c for gets/gats, s) with s = `size`."""
    return va(value, opaque, flags=3, cas=9 if op[0] in (Op.GETS, Op.GATS) else None, size=size)


@pytest.mark.parametrize("size", [3, 1, 20, None], ids=["s-bigger", "s-smaller", "s-digit-gained", "no-s"])
@pytest.mark.parametrize("op", GET_OPS, ids=GET_IDS)
def test_a_hit_whose_s_disagrees_with_its_size_or_is_missing_resets(op: list[Any], size: int | None) -> None:
    # The broker's gets ask for s, the value's size again: a VA header whose size was damaged
    # (bigger or smaller) no longer agrees with it, and a hit without it is not memcached's answer
    # to the request. OutOfStep once that hit is whole; b's value is never delivered.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [op])
        rig.seal()
        return rig

    bad = hit_for(op, b"hi", 1, size)
    assert bad.startswith(b"VA 2 f3 ")
    # An s that disagrees is refused as soon as the header line is in (the parser checks it,
    # so a header that gained a digit does not wait for data that never comes); a missing s
    # once the whole hit is in.
    at = len(bad) if size is None else bad.index(b"\r\n") + 2
    out = every_way(build, bad + fence(2), visible=[], error_at=at)
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, Failed(C))]
    assert out.inflight == 0 and out.released == [b"b"]
    assert out.failed_in_flight == 1  # the refused answer answered nothing: b was still in flight


@pytest.mark.parametrize("size", [3, 1, None], ids=["s-bigger", "s-smaller", "no-s"])
@pytest.mark.parametrize("op", GET_OPS, ids=GET_IDS)
def test_a_bad_s_after_a_held_value_delivers_no_wrong_result(op: list[Any], size: int | None) -> None:
    # a's value is held when b's hit arrives; b's header in place (opaque O2) proves where a's
    # data ended, so a may get its value or a failure; b gets a failure only.
    r1, bad = va(b"x", 1), hit_for(op, b"hi", 2, size)
    at = len(r1 + bad) if size is None else len(r1) + bad.index(b"\r\n") + 2
    out = every_way(build_get_then_get_op(op), r1 + bad + F3, visible=None, error_at=at)
    by = outcomes_by_request(out.log)
    assert by[("A", 0)] in ([[Code.OK, b"x", 0]], [Failed(C)])
    assert by[("A", 1)] == [Failed(C)]
    assert out.inflight == 0 and sorted(out.released) == [b"a", b"b"]


@pytest.mark.parametrize("op", GET_OPS, ids=GET_IDS)
def test_a_hit_with_the_asked_for_flags_and_a_true_s_is_delivered(op: list[Any]) -> None:
    # The control for the two tests above: the same hit with s = its size.
    r1, r2 = va(b"x", 1), hit_for(op, b"hi", 2, -1)
    e1, e2, fenced = offsets(r1, r2, F3)
    out = every_way(build_get_then_get_op(op), r1 + r2 + F3, visible=[e2, fenced])
    cas = [9] if op[0] in (Op.GETS, Op.GATS) else []
    assert out.log == [("A", 0, [Code.OK, b"x", 0]), ("A", 1, [Code.OK, b"hi", 3] + cas)]
    assert out.error is None and out.inflight == 0


@pytest.mark.parametrize("op", [[Op.GETS, b"a"], [Op.GATS, b"a", 10]], ids=["gets", "gats"])
def test_a_gets_hit_without_cas_resets(op: list[Any]) -> None:
    # `mg a v f c s O1` asks for c; "VA 2 f3 s2 O1" lacks it. A cas of 0 in its place would be a
    # cas memcached never gave: OutOfStep, nothing delivered.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [op])
        rig.seal()
        return rig

    bad = b"VA 2 f3 s2 O1\r\nhi\r\n"
    assert bad == va(b"hi", 1, flags=3)
    out = every_way(build, bad + fence(2), visible=[], error_at=len(bad))
    assert out.error is not None and out.log == [("A", 0, Failed(C))]
    assert out.inflight == 0 and out.released == [b"a"]


def test_opaque_mismatch_on_the_first_response() -> None:
    r = va(b"x", 2)
    out = every_way(build_two_gets, r + va(b"y", 1) + F3, visible=[], error_at=len(r))
    two_gets_failed(out)
    assert out.failed_in_flight == 2


def test_responses_swapped_between_waiters_deliver_nothing() -> None:
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.seal()
        return rig

    rb = va(b"for B", 2)
    out = every_way(build, rb + va(b"for A", 1) + fence(3), visible=[], error_at=len(rb))
    assert out.log == [("A", 0, Failed(C)), ("B", 0, Failed(C))]


def test_an_mn_where_a_response_was_due() -> None:
    # The broker sends no `mn`: an MN answers nothing, and proves nothing.
    r1 = va(b"x", 1)
    out = every_way(build_two_gets, r1 + MN + va(b"y", 2) + F3, visible=[], error_at=len(r1 + MN))
    two_gets_failed(out)


def build_one_get() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])
    assert rig.seal() == 2
    return rig


@pytest.mark.parametrize(
    "fence_answer",
    [fence(2), fence(2, hit=True)],
    ids=["EN", "HD"],
)
def test_the_fence_answered_en_or_hd_proves_its_write(fence_answer: bytes) -> None:
    # The fence is `mg _mcbroker_fence_ O2` without v: EN if no such key, HD should it exist.
    r1 = va(b"x\r\ny", 1)
    e1, e2 = offsets(r1, fence_answer)
    out = every_way(build_one_get, r1 + fence_answer, visible=[e2])
    assert out.log == [("A", 0, [Code.OK, b"x\r\ny", 0])]
    assert out.error is None and out.inflight == 0 and out.released == [b"a"]


@pytest.mark.parametrize(
    "extra",
    [
        b"HD O3\r\n", fence(1), MN, b"EN\r\n", b"SERVER_ERROR out of memory\r\n",
        b"CLIENT_ERROR bad command line format\r\n", b"ERROR\r\n", b"END\r\n", b"VERSION 1.6.18\r\n",
    ],
    ids=repr,
)
def test_an_answer_without_the_fences_opaque_where_the_fence_answer_was_due(extra: bytes) -> None:
    # A wrong opaque, or none (an MN, an error line, a text reply), cannot prove where the data
    # block before it ended.
    r1 = va(b"x", 1)
    out = every_way(build_one_get, r1 + extra + fence(2), visible=[], error_at=len(r1 + extra))
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, Failed(C))]  # held, never delivered
    assert out.released == [b"a"] and out.inflight == 0 and out.failed_in_flight == 0


@pytest.mark.parametrize("extra", [b"VA 1 O2\r\nz\r\n", b"NF O2\r\n", b"NS O2\r\n", b"EX O2\r\n"], ids=repr)
def test_a_status_no_mg_without_v_gets_where_the_fence_answer_was_due(extra: bytes) -> None:
    # The fence's opaque in place proves where the value before it ended (so that value may go),
    # but VA, NF, NS and EX are no answer to the fence: memcached did not send this stream.
    r1 = va(b"x", 1)
    out = every_way(build_one_get, r1 + extra + fence(2), visible=[len(r1 + extra)], error_at=len(r1 + extra))
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, [Code.OK, b"x", 0])]
    assert out.released == [b"a"] and out.inflight == 0 and out.failed_in_flight == 0


@pytest.mark.parametrize(
    "op, second",
    [
        ([Op.GET, b"b"], b"NS O2\r\n"), ([Op.SET, b"b", b"v", 0, 0], b"EN O2\r\n"),
        ([Op.DELETE, b"b"], b"NS O2\r\n"), ([Op.INCR, b"b", 1], b"HD O2\r\n"),
        # mg with v: a hit is VA, never HD; NF / EX are no mg answers
        ([Op.GET, b"b"], b"HD O2\r\n"), ([Op.GETS, b"b"], b"NF O2\r\n"), ([Op.GAT, b"b", 10], b"EX O2\r\n"),
        ([Op.GATS, b"b", 10], b"HD O2\r\n"),
        ([Op.ADD, b"b", b"v", 0, 0], b"VA 1 O2\r\ny\r\n"), ([Op.CAS, b"b", b"v", 0, 0, 5], b"EN O2\r\n"),
        ([Op.DELETE, b"b"], b"EN O2\r\n"), ([Op.DELETE, b"b"], b"VA 1 O2\r\ny\r\n"),
        ([Op.DECR, b"b", 1], b"EN O2\r\n"), ([Op.INCR, b"b", 1], b"NS O2\r\n"),
        ([Op.INCR, b"b", 1], b"VA 1 O2\r\nx\r\n"),  # ma's VA holds the new number
        ([Op.TOUCH, b"b", 10], b"VA 1 O2\r\ny\r\n"), ([Op.TOUCH, b"b", 10], b"NF O2\r\n"),
    ],
    ids=lambda v: repr(v) if isinstance(v, bytes) else Op(v[0]).name,
)
def test_a_status_memcached_never_gives_to_the_request_resets(op: list[Any], second: bytes) -> None:
    # pipeline.py's docstring: "Reset: ... an unexpected opaque or status". memcached answers mg
    # with VA / EN (HD without v), ms with HD / NS / EX / NF, md with HD / NF / EX, ma with VA / NF
    # (protocol.txt); any other status means these are not the bytes memcached sent.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], op])
        rig.seal()
        return rig

    r1 = va(b"x", 1)
    stream = r1 + second + F3
    for name, chunks in feedings(stream):
        out = play(build, chunks, error_at=len(r1 + second), name=name)
        by = outcomes_by_request(out.log)
        assert by[("A", 0)] in ([[Code.OK, b"x", 0]], [Failed(C)]), name  # its framing was proven
        assert by[("A", 1)] == [Failed(C)], name
        assert out.inflight == 0 and sorted(out.released) == [b"a", b"b"]


@pytest.mark.parametrize(
    "op, second",
    [
        ([Op.DELETE, b"b"], b"EX O2\r\n"),
        ([Op.SET, b"b", b"v", 0, 0], b"EX O2\r\n"), ([Op.SET, b"b", b"v", 0, 0], b"NF O2\r\n"),
        ([Op.ADD, b"b", b"v", 0, 0], b"NF O2\r\n"), ([Op.REPLACE, b"b", b"v", 0, 0], b"NF O2\r\n"),
        ([Op.APPEND, b"b", b"v", 0, 0], b"EX O2\r\n"),
    ],
    ids=["md-EX", "ms-EX", "ms-NF", "ms-ME-NF", "ms-MR-NF", "ms-MA-EX"],
)
def test_ex_or_nf_to_a_request_without_cas_resets(op: list[Any], second: bytes) -> None:
    # protocol.txt: ms answers EX / NF only to a compare-and-swap (C), md answers EX only with C.
    # memcached 1.6.18 on one connection: `ms nokey 1 MR` / `MA` / `MP` -> NS, `ms k 1 ME` on k
    # -> NS, `md k` -> HD then NF, `ms k 1 C5` on a missing k -> NF, `ms k 1 C999` / `md k C999`
    # -> EX. So EX or NF to a request without C is a status memcached never gives to it (and
    # wire.py allows DELETE only [OK] | [NOT_FOUND]): reset, as for any such status.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], op])
        rig.seal()
        return rig

    assert b" C" not in encode_op(op[0], op, 2)
    r1 = va(b"x", 1)
    for name, chunks in feedings(r1 + second + F3):
        out = play(build, chunks, error_at=len(r1 + second), name=name)
        by = outcomes_by_request(out.log)
        assert by[("A", 0)] in ([[Code.OK, b"x", 0]], [Failed(C)]), name
        assert by[("A", 1)] == [Failed(C)], name
        assert out.inflight == 0 and sorted(out.released) == [b"a", b"b"]


@pytest.mark.parametrize("second", [b"EN O2\r\n", b"NS O2\r\n", b"EX O2\r\n", b"VA 1 O2\r\ny\r\n"], ids=repr)
def test_a_status_md_never_gives_to_a_set_too_large_resets(second: bytes) -> None:
    # A set too large for the server goes out as `md` (test_a_set_too_large_... above); md
    # answers HD or NF (EX only with C, which the broker never sends), so anything else resets
    # like any other status memcached never gives to the request, never a delivered
    # SERVER_ERROR "unexpected ...".
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.p.seq += 1
        rig.p.submit(Batch(rig.waiter("B"), [0], [UNLINK_TOO_LARGE], [b"big"], 2), meta.encode(meta.Delete(b"big", 2)))
        rig.seal()
        return rig

    r1 = va(b"x", 1)
    for name, chunks in feedings(r1 + second + F3):
        out = play(build, chunks, error_at=len(r1 + second), name=name)
        by = outcomes_by_request(out.log)
        assert by[("A", 0)] in ([[Code.OK, b"x", 0]], [Failed(C)]), name
        assert by[("B", 0)] == [Failed(C)], f"{name}: {by[('B', 0)]}"
        assert out.inflight == 0 and sorted(out.released) == [b"a", b"big"]


def test_a_response_with_nothing_in_flight() -> None:
    out = every_way(Rig, b"HD O1\r\n", visible=[], error_at=7)
    assert out.error is not None and out.log == [] and out.failed_in_flight == 0


def test_a_response_after_everything_was_answered() -> None:
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.seal()
        return rig

    r1 = va(b"x", 1)
    e1, fenced = offsets(r1, fence(2))
    for extra in (fence(2), fence(3), MN, b"SERVER_ERROR busy\r\n"):
        out = every_way(build, r1 + fence(2) + extra, visible=[fenced], error_at=fenced + len(extra))
        assert out.log == [("A", 0, [Code.OK, b"x", 0])]  # proven before the extra answer came
        assert out.failed_in_flight == 0 and out.released == [b"a"]


@pytest.mark.parametrize(
    "garbage",
    [b"garbage\r\n", b"VALUE a 0 1\r\nx\r\nEND\r\n", b"\r\n", b"STORED\r\n", b"VA f0 s1 O2\r\n", b"VA O2\r\n"],
    ids=repr,
)
def test_garbage_in_place_of_a_response(garbage: bytes) -> None:
    r1 = va(b"x", 1)
    out = every_way(build_two_gets, r1 + garbage + va(b"y", 2) + F3, visible=[], error_at=len(r1) + garbage.index(b"\r\n") + 2)
    two_gets_failed(out)


def test_trailing_garbage_after_the_fence() -> None:
    r1, r2 = va(b"x", 1), va(b"y", 2)
    e1, e2, fenced = offsets(r1, r2, F3)
    out = every_way(build_two_gets, r1 + r2 + F3 + b"junk\r\n", visible=[e2, fenced], error_at=fenced + 6)
    assert out.log == [("A", 0, [Code.OK, b"x", 0]), ("A", 1, [Code.OK, b"y", 0])]
    assert out.error is not None and out.failed_in_flight == 0


def test_va_data_not_followed_by_crlf() -> None:
    head = b"VA 1 f0 s1 O1\r\n"
    bad = head + b"xy\r\n"  # one byte more than the header said
    out = every_way(build_two_gets, bad + va(b"y", 2) + F3, visible=[], error_at=len(head) + 3)
    two_gets_failed(out)


def test_va_data_one_byte_short() -> None:
    head = b"VA 3 f0 s3 O1\r\n"
    bad = head + b"xy\r\n"  # the data lost a byte: its terminator is not where the size says
    out = every_way(build_two_gets, bad + va(b"y", 2) + F3, visible=[], error_at=len(head) + 5)
    two_gets_failed(out)


def test_va_larger_than_max_value_len_is_refused_from_its_header() -> None:
    def build() -> Rig:
        rig = Rig(max_value_len=4)
        rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
        rig.seal()
        return rig

    r1 = va(b"abcd", 1)  # exactly the limit: fine
    head2 = b"VA 5 f0 s5 O2\r\n"
    out = every_way(build, r1 + head2 + b"abcde\r\n" + F3, visible=[], error_at=len(r1 + head2))
    two_gets_failed(out)


def test_unusable_client_flags_reset_the_stream() -> None:
    bad = b"VA 1 fx s1 O1\r\nx\r\n"
    out = every_way(build_two_gets, bad + va(b"y", 2) + F3, visible=[], error_at=len(bad))
    two_gets_failed(out)


# --- a data block that swallows the next response (issue 13, item 3) ------------------------------


@pytest.mark.parametrize("s", [b"2", b"17"], ids=["s-true", "s-forged-too"])
def test_va_whose_data_swallows_the_next_response_line(s: bytes) -> None:
    # memcached sent "VA 2 f0 s2 O1\r\nxx\r\nVA 2 f0 s2 O2\r\nyy\r\nEN O3\r\n"; the stream's
    # first header is corrupted to a size that covers the next response's line. With the true s
    # the size disagrees with it as soon as the data block ends; with s corrupted to agree, b's
    # data "yy" then reads as a line where O2's answer is due.
    true = va(b"xx", 1) + va(b"yy", 2) + F3
    assert true == b"VA 2 f0 s2 O1\r\nxx\r\nVA 2 f0 s2 O2\r\nyy\r\nEN O3\r\n"
    bad = b"VA 17 f0 s%b O1\r\nxx\r\nVA 2 f0 s2 O2\r\nyy\r\nEN O3\r\n" % s  # data "xx\r\nVA 2 f0 s2 O2", then CRLF
    # A true s is refused as soon as the damaged header line is in (the parser checks s there).
    error_at = bad.index(b"\r\n") + 2 if s == b"2" else bad.index(b"yy") + 4
    out = every_way(build_two_gets, bad, visible=[], error_at=error_at)
    two_gets_failed(out)


def build_get_delete_get() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])
    rig.meta("B", [[Op.DELETE, b"b"]])
    rig.meta("C", [[Op.GET, b"c"]])
    rig.seal()
    return rig


@pytest.mark.parametrize("s", [b"2", b"9"], ids=["s-true", "s-forged-too"])
def test_va_whose_data_swallows_a_whole_response_and_stays_framed(s: bytes) -> None:
    # True: "VA 2 f0 s2 O1\r\nxx\r\n" "HD O2\r\n" "VA 2 f0 s2 O3\r\nzz\r\n" "EN O4\r\n". With
    # "VA 9" the data block is "xx\r\nHD O2" and is followed by CRLF: well framed, with the right
    # opaque. Its s (2) tells at once; should s be corrupted to 9 too, the next response (O3
    # where O2 is due) tells. Nobody may get a value.
    head = b"VA 9 f0 s%b O1\r\nxx\r\nHD O2\r\n" % s
    bad = head + va(b"zz", 3) + fence(4)
    out = every_way(build_get_delete_get, bad, visible=[], error_at=bad.index(b"\r\n") + 2 if s == b"2" else bad.index(b"zz") + 4)
    assert out.error is not None
    assert out.log == [("A", 0, Failed(C)), ("B", 0, Failed(C)), ("C", 0, Failed(C))]
    assert sorted(out.released) == [b"a", b"b", b"c"]


def test_va_whose_data_swallows_the_fence() -> None:
    # The last value of a write swallows its fence's answer: its proof never comes. The next
    # write's first response (O3) then arrives where the fence's answer (O2) was due.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        assert rig.seal() == 2
        rig.meta("B", [[Op.GET, b"b"]])
        assert rig.seal() == 4
        return rig

    for s in (b"2", b"9"):  # a's true size, or s corrupted to agree with the header
        head = b"VA 9 f0 s%b O1\r\nxx\r\nEN O2\r\n" % s  # true size 2
        bad = head + va(b"yy", 3) + fence(4)
        out = every_way(build, bad, visible=[], error_at=bad.index(b"\r\n") + 2 if s == b"2" else bad.index(b"yy") + 4)
        assert out.log == [("A", 0, Failed(C)), ("B", 0, Failed(C))], s


@pytest.mark.parametrize("line", [b"SERVER_ERROR x", b"CLIENT_ERROR x"])
def test_a_value_that_reads_as_an_error_line_cannot_pass_a_swallow(line: bytes) -> None:
    # Two gets. b's stored value is the 14 bytes "SERVER_ERROR x" with client flags 1234;
    # memcached sends
    #   VA 10 f0 s10 O1\r\nAAAAAAAAAA\r\n  VA 14 f1234 s14 O2\r\nSERVER_ERROR x\r\n  EN O3\r\n
    # One corrupted byte turns "VA 10" into "VA 30": a's data block then ends exactly at the end
    # of b's header line (10 + 2 + 18 bytes) and is followed by CRLF, and b's data reads as an
    # error line in b's place (SERVER_ERROR, or CLIENT_ERROR to an mg: both belong to their
    # request), which carries no opaque to check. Then the fence's answer arrives in place.
    # The stream lost a response header, so no value may leave: a gets its own value or a
    # failure, never its value with b's header appended. (a's swallowing data holds a CRLF and
    # is followed by a line without an opaque: the pipeline resets there.)
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.seal()
        return rig

    true = va(b"A" * 10, 1) + va(line, 2, flags=1234) + F3
    bad = true.replace(b"VA 10", b"VA 30", 1)
    assert sum(x != y for x, y in zip(true, bad)) == 1 and len(true) == len(bad)
    assert bad[len(b"VA 30 f0 s10 O1\r\n") + 30 :].startswith(b"\r\n" + line + b"\r\n")  # framed
    for name, log in damaged_runs(build, bad):
        a = [e[2] for e in log if e[0] == "A"]
        assert a in ([[Code.OK, b"A" * 10, 0]], [Failed(C)], [Failed(Code.TIMEOUT)]), f"{name}: a got {a}"
        b = [e[2] for e in log if e[0] == "B"]
        assert len(b) == 1 and is_failure(b[0]), f"{name}: b got {b}"


@pytest.mark.parametrize("hit", [False, True], ids=["EN", "HD"])
def test_a_swallow_up_to_a_later_writes_fence_is_caught(hit: bool) -> None:
    # Two writes in flight, each closed by its fence (a O1, fence O2 | b O3, fence O4); memcached
    # sends
    #   VA 12 f0 s12 O1\r\nxxxxxxxxxxxx\r\n EN O2\r\n VA 6 f0 s6 O3\r\nyyyyyy\r\n EN O4\r\n
    # One corrupted byte turns "VA 12" into "VA 42": a's data block then runs through its own
    # fence's answer and all of b's response (12 + 2 + 7 + 15 + 6 bytes) and is followed by
    # CRLF, and the second write's fence answer arrives where the first write's is due. a's s
    # (12 against VA 42) gives it away as soon as the header line is in: no value may leave.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        assert rig.seal() == 2
        rig.meta("B", [[Op.GET, b"b"]])
        assert rig.seal() == 4
        return rig

    true = va(b"x" * 12, 1) + fence(2, hit) + va(b"y" * 6, 3) + fence(4, hit)
    bad = true.replace(b"VA 12", b"VA 42", 1)
    assert sum(x != y for x, y in zip(true, bad)) == 1 and len(true) == len(bad)
    assert bad[len(b"VA 42 f0 s12 O1\r\n") + 42 :] == b"\r\n" + fence(4, hit)  # framed, then the later fence
    out = every_way(build, bad, visible=[], error_at=bad.index(b"\r\n") + 2)
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, Failed(C)), ("B", 0, Failed(C))]
    for name, log in damaged_runs(build, bad):
        a = [e[2] for e in log if e[0] == "A"]
        assert a in ([[Code.OK, b"x" * 12, 0]], [Failed(C)], [Failed(Code.TIMEOUT)]), f"{name}: a got {a}"


# --- a value holding CRLF is never proven by a line without an opaque ------------------------------


def build_get_then(op: list[Any]) -> Callable[[], Rig]:
    """a: mg O1; then `op` for B (O2 if it is a meta request; a text command takes none)."""

    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        if op[0] in (Op.VERSION, Op.STATS, Op.FLUSH_ALL):
            rig.text("B", op)
        else:
            rig.meta("B", [op])
        rig.seal()
        return rig

    return build


LINES_WITHOUT_OPAQUE = [
    ([Op.GET, b"b"], b"SERVER_ERROR out of memory\r\n", Err(Code.SERVER_ERROR, "out of memory")),
    ([Op.SET, b"b", b"v", 0, 0], b"SERVER_ERROR out of memory storing object\r\n", Err(Code.SERVER_ERROR, "out of memory storing object")),
    ([Op.INCR, b"b", 1], b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n", Err(Code.CLIENT_ERROR, "non-numeric")),
    ([Op.DELETE, b"b"], b"CLIENT_ERROR bad command line format\r\n", Err(Code.CLIENT_ERROR, "bad command line format")),
    ([Op.VERSION], b"VERSION 1.6.18\r\n", [Code.OK, "1.6.18"]),
    ([Op.STATS, []], STATS, [Code.OK, {"pid": "1", "uptime": "5"}]),
    ([Op.FLUSH_ALL, 0], b"OK\r\n", [Code.OK, True]),
    ([Op.VERSION], b"ERROR\r\n", Err(Code.UNKNOWN_COMMAND, "ERROR")),
]
LINE_IDS = ["mg-SERVER_ERROR", "ms-SERVER_ERROR", "ma-CLIENT_ERROR", "md-CLIENT_ERROR", "version", "stats", "flush_all", "version-ERROR"]


TEXT_LINES = [i for i, (op, _, _) in enumerate(LINES_WITHOUT_OPAQUE) if op[0] in (Op.VERSION, Op.STATS, Op.FLUSH_ALL)]
META_LINES = [i for i in range(len(LINES_WITHOUT_OPAQUE)) if i not in TEXT_LINES]


@pytest.mark.parametrize("value", [b"x\r\ny", b"\r\n", b"xy\r\n", b"\r\nVA 2 f0 O2"], ids=repr)
@pytest.mark.parametrize("op, line, result", [LINES_WITHOUT_OPAQUE[i] for i in TEXT_LINES], ids=[LINE_IDS[i] for i in TEXT_LINES])
def test_a_value_holding_crlf_then_a_text_reply_resets(value: bytes, op: list[Any], line: bytes, result: Any) -> None:
    # A data block that ran past its end holds the CRLF that ended it: a text reply after it would
    # be delivered at once, unproven, so the stream is reset and neither request gets anything but
    # a failure.
    r1 = va(value, 1)
    out = every_way(build_get_then(op), r1 + line + fence(2), visible=[], error_at=len(r1 + line))
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, Failed(C)), ("B", 0, Failed(C))]
    assert out.inflight == 0 and out.failed_in_flight == 1  # a was answered (held), b not
    assert sorted(out.released) == [b"a"]


@pytest.mark.parametrize("value", [b"x\r\ny", b"\r\n", b"xy\r\n", b"\r\nVA 2 f0 O2"], ids=repr)
@pytest.mark.parametrize("op, line, result", [LINES_WITHOUT_OPAQUE[i] for i in META_LINES], ids=[LINE_IDS[i] for i in META_LINES])
def test_a_value_holding_crlf_then_an_error_line_waits_for_proof(value: bytes, op: list[Any], line: bytes, result: Any) -> None:
    # An error line after a value holding CRLF cannot prove that value, but it need not reset the
    # connection (and fail everybody's requests in flight): both are held until the fence's answer
    # arrives in its place, which proves them. A swallow would have shifted the fence's answer
    # (test_a_swallow_ending_before_an_error_line_is_caught_at_the_next_opaque).
    r1 = va(value, 1)
    f = fence(3)
    e1, e2, fenced = offsets(r1, line, f)
    out = every_way(build_get_then(op), r1 + line + f, visible=[fenced, fenced])
    assert out.log == [("A", 0, [Code.OK, value, 0]), ("B", 0, result)]
    assert out.error is None and out.inflight == 0


def test_a_swallow_ending_before_an_error_line_is_caught_at_the_next_opaque() -> None:
    # a's VA header lost a digit's worth of truth: its size now covers b's whole answer, so the
    # data block (holding CRLF) ends right before c's SERVER_ERROR line. That line is read as b's
    # and held; the fence's answer then arrives where c's was expected: OutOfStep, and nobody
    # gets anything but a failure, the value least of all.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.meta("C", [[Op.GET, b"c"]])
        rig.seal()
        return rig

    true_a, r2, r3, f = va(b"one", 1), b"EN O2\r\n", b"SERVER_ERROR out of memory\r\n", fence(4)
    swallowed = b"one\r\nEN O2"
    bad_a = b"VA %d f0 s%d O1\r\n" % (len(swallowed), len(swallowed)) + swallowed + b"\r\n"
    assert bad_a.endswith(true_a[-5:] + r2)
    out = every_way(build, bad_a + r3 + f, visible=[], error_at=len(bad_a + r3 + f))
    assert out.error is not None
    assert out.log == [("A", 0, Failed(C)), ("B", 0, Failed(C)), ("C", 0, Failed(C))]


@pytest.mark.parametrize("value", [b"xy", b"", b"x\ry", b"x\ny", b"x\n\ry", b"x\r"], ids=repr)
@pytest.mark.parametrize("op, line, result", LINES_WITHOUT_OPAQUE, ids=LINE_IDS)
def test_a_value_without_crlf_then_a_line_without_an_opaque_goes_on(value: bytes, op: list[Any], line: bytes, result: Any) -> None:
    # No CRLF in the data: it cannot have run past its end. Both are delivered: the value once
    # the fence's answer proves it; an error for a meta request with it; a text reply at once.
    text = op[0] in (Op.VERSION, Op.STATS, Op.FLUSH_ALL)
    r1 = va(value, 1)
    f = fence(2 if text else 3)
    e1, e2, fenced = offsets(r1, line, f)
    out = every_way(build_get_then(op), r1 + line + f, visible=[e2, fenced] if text else [fenced, fenced])
    a = ("A", 0, [Code.OK, value, 0])
    b = ("B", 0, result)
    assert out.log == ([b, a] if text else [a, b])
    assert out.error is None and out.inflight == 0


def test_a_crlf_value_then_server_error_for_the_next_request_delivers_both_once_proven() -> None:
    # The case in pipeline.py's docstring, spelled out: a's data holds CRLF; the next line is a
    # SERVER_ERROR for b. Both wait for the fence's answer, then both are delivered.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.seal()
        return rig

    r1, r2 = va(b"one\r\ntwo", 1), b"SERVER_ERROR temporary failure\r\n"
    e1, e2, fenced = offsets(r1, r2, F3)
    out = every_way(build, r1 + r2 + F3, visible=[fenced, fenced])
    assert out.log == [("A", 0, [Code.OK, b"one\r\ntwo", 0]), ("B", 0, Err(Code.SERVER_ERROR, "temporary failure"))]
    assert out.error is None and out.inflight == 0 and sorted(out.released) == [b"a", b"b"]


def test_a_value_without_crlf_then_server_error_for_the_next_request_delivers_both() -> None:
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.seal()
        return rig

    r1, r2 = va(b"one two", 1), b"SERVER_ERROR temporary failure\r\n"
    e1, e2, fenced = offsets(r1, r2, F3)
    out = every_way(build, r1 + r2 + F3, visible=[fenced, fenced])
    assert out.log == [("A", 0, [Code.OK, b"one two", 0]), ("B", 0, Err(Code.SERVER_ERROR, "temporary failure"))]
    assert out.error is None and out.inflight == 0


def test_an_error_to_ms_after_a_crlf_value_is_not_trusted_as_its_answer() -> None:
    # CLIENT_ERROR to ms would be the ms's own answer (then a reset); after a value holding CRLF
    # it may be a swallow's leftover: the stream is reset before it is given to anyone.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0]])
        rig.seal()
        return rig

    r1, r2 = va(b"x\r\n", 1), b"CLIENT_ERROR bad data chunk\r\n"
    out = every_way(build, r1 + r2 + F3, visible=[], error_at=len(r1 + r2))
    assert out.error is not None and not out.error.answered
    assert out.log == [("A", 0, Failed(C)), ("A", 1, Failed(C))]


@pytest.mark.parametrize("between", [b"HD O2\r\n", va(b"y", 2), b"EN O2\r\n"], ids=repr)
def test_a_crlf_value_proven_by_an_opaque_then_an_error_line_goes_on(between: bytes) -> None:
    # Once an answer with its opaque in place proves the CRLF-holding value, a later error line
    # follows a response that ended where its size said: it belongs to its request.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0] if between.startswith(b"HD") else [Op.GET, b"b"]])
        rig.meta("B", [[Op.GET, b"c"]])
        rig.seal()
        return rig

    r1, r3 = va(b"x\r\ny", 1), b"SERVER_ERROR busy\r\n"
    e1, e2, e3, fenced = offsets(r1, between, r3, fence(4))
    out = every_way(build, r1 + between + r3 + fence(4), visible=[e2, fenced, fenced])
    assert [e[:2] for e in out.log] == [("A", 0), ("A", 1), ("B", 0)]
    assert out.log[0][2] == [Code.OK, b"x\r\ny", 0] and out.log[2][2] == Err(Code.SERVER_ERROR, "busy")
    assert out.error is None and out.inflight == 0


def test_a_crlf_value_last_in_its_write_then_an_error_line_first_in_the_next() -> None:
    # The fence's answer proves the value; the next write's first answer may be an error line.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        assert rig.seal() == 2
        rig.meta("B", [[Op.GET, b"b"]])
        assert rig.seal() == 4
        return rig

    r1, r3 = va(b"x\r\n", 1), b"SERVER_ERROR busy\r\n"
    e1, fenced1, e3, fenced2 = offsets(r1, fence(2), r3, fence(4))
    out = every_way(build, r1 + fence(2) + r3 + fence(4), visible=[fenced1, fenced2])
    assert out.log == [("A", 0, [Code.OK, b"x\r\n", 0]), ("B", 0, Err(Code.SERVER_ERROR, "busy"))]
    assert out.error is None


def test_a_crlf_value_proven_within_its_write_then_a_text_reply_in_the_next_write_is_delivered() -> None:
    # a's value holds CRLF; b's answer, its opaque in place, proves it, and the fence's proves b.
    # On the fast path b's answer and the fence's may come in one read, after a's came alone: the
    # fence then proves b in the same step that takes b, and nothing is left unproven, so the
    # version reply opening the next write is delivered, not taken for a swallow's leftover.
    # (A text reply goes at once and held results at the end of a read, so the order between
    # waiters depends on the reads; each waiter's events, and when they become visible, do not.)
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
        assert rig.seal() == 3
        rig.text("B", [Op.VERSION])
        assert rig.seal() == 4
        return rig

    r1, r2, r3 = va(b"x\r\ny", 1), va(b"y", 2), b"VERSION 1.6.18\r\n"
    data = r1 + r2 + fence(3) + r3 + fence(4)
    _, e2, fenced, e3, _ = offsets(r1, r2, fence(3), r3, fence(4))
    want = [("A", 0, [Code.OK, b"x\r\ny", 0]), ("A", 1, Bare(b"y")), ("B", 0, [Code.OK, "1.6.18"])]
    for name, chunks in feedings(data):  # "split at len(r1)" is the read described above
        out = play(build, chunks, name=name, visible=[e2, fenced, e3])
        assert out.error is None and out.inflight == 0, name
        assert sorted(out.log, key=lambda e: e[:2]) == want, f"{name}: {out.log}"


def test_a_tombstones_crlf_value_then_an_error_line_waits_for_proof_too() -> None:
    # The value's waiter gave up; the error line after it is held all the same until the fence
    # proves the stream, then delivered to its own request.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.seal()
        rig.waiters["A"].done = True
        return rig

    r1, r2 = va(b"x\r\ny", 1), b"SERVER_ERROR busy\r\n"
    e1, e2, fenced = offsets(r1, r2, F3)
    out = every_way(build, r1 + r2 + F3, visible=[fenced])
    assert out.error is None and out.log == [("B", 0, Err(Code.SERVER_ERROR, "busy"))]


@pytest.mark.parametrize("then", ["set", "fence"])
def test_a_value_cut_short_whose_rest_reads_as_the_next_answer_cannot_pass(then: str) -> None:
    # The mirror of the swallow: a's size lowered, so its data block stops at a CRLF inside its
    # value, and the rest of the value is read as the next answer. a's value is 9 bytes,
    # "ab\r\nHD O2" (or "ab\r\nEN O2"), which anyone may store; memcached sends
    #   VA 9 f0 O1\r\nab\r\nHD O2\r\n  HD O2\r\n  EN O3\r\n     (then: b's set O2, fence O3)
    #   VA 9 f0 O1\r\nab\r\nEN O2\r\n  EN O2\r\n                (then: the fence O2)
    # One corrupted byte turns "VA 9" into "VA 2": the data block "ab" is followed by CRLF, holds
    # no CRLF, and the next line carries the opaque due next. a must get its own value or a
    # failure, never "ab".
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        if then == "set":
            rig.meta("B", [[Op.SET, b"b", b"v", 0, 0]])
        rig.seal()
        return rig

    if then == "set":
        value = b"ab\r\nHD O2"
        true = va(value, 1) + b"HD O2\r\n" + fence(3)
    else:
        value = b"ab\r\nEN O2"
        true = va(value, 1) + fence(2)
    bad = true.replace(b"VA 9", b"VA 2", 1)
    assert sum(x != y for x, y in zip(true, bad)) == 1 and len(true) == len(bad)
    for name, log in damaged_runs(build, bad):
        a = [e[2] for e in log if e[0] == "A"]
        assert a in ([[Code.OK, value, 0]], [Failed(C)], [Failed(Code.TIMEOUT)]), f"{name}: a got {a}"


def damaged_runs(build: Callable[[], Rig], bad: bytes) -> Iterator[tuple[str, list[Event]]]:
    """Feed `bad` every way; what each waiter got once the driver gave up on the stream (a reset on
    OutOfStep, else the deadline of whatever never got its answer)."""
    for name, chunks in feedings(bad):
        rig = build()
        try:
            for chunk in chunks:
                rig.p.receive(chunk)
        except OutOfStep:
            rig.p.fail_all(C, "pipeline reset")
        else:
            rig.p.fail_all(Code.TIMEOUT, "deadline")
        yield name, rig.log


# --- errors that keep the stream in step (issue 8, item 2) -----------------------------------------


def test_server_error_belongs_to_its_request_and_the_stream_goes_on() -> None:
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"big", 0, 0], [Op.DELETE, b"c"]])
        rig.meta("B", [[Op.GET, b"d"], [Op.INCR, b"n", 1]])
        rig.seal()
        return rig

    r1 = va(b"x", 1)
    r2 = b"SERVER_ERROR out of memory storing object\r\n"
    r3 = b"HD O3\r\n"
    r4 = b"SERVER_ERROR temporary failure\r\n"
    r5 = b"SERVER_ERROR busy\r\n"
    e1, e2, e3, e4, e5, fenced = offsets(r1, r2, r3, r4, r5, fence(6))
    # An error line carries no opaque: it proves nothing, and waits for the next proof itself.
    out = every_way(build, r1 + r2 + r3 + r4 + r5 + fence(6), visible=[e3, e3, fenced, fenced, fenced])
    assert out.log == [
        ("A", 0, [Code.OK, b"x", 0]),
        ("A", 1, Err(Code.SERVER_ERROR, "out of memory storing object")),
        ("A", 2, [Code.OK]),
        ("B", 0, Err(Code.SERVER_ERROR, "temporary failure")),
        ("B", 1, Err(Code.SERVER_ERROR, "busy")),
    ]
    assert out.error is None and out.inflight == 0
    assert sorted(out.released) == [b"a", b"b", b"c", b"d", b"n"]


@pytest.mark.parametrize(
    "op, reply, expected",
    [
        ([Op.SET, b"b", b"v", 0, 0], b"SERVER_ERROR out of memory storing object\r\n", Err(Code.SERVER_ERROR, "out of memory storing object")),
        ([Op.GET, b"b"], b"SERVER_ERROR temporary failure\r\n", Err(Code.SERVER_ERROR, "temporary failure")),
        ([Op.INCR, b"b", 1], b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n", Err(Code.CLIENT_ERROR, "non-numeric")),
    ],
    ids=["ms-SERVER_ERROR", "mg-SERVER_ERROR", "ma-CLIENT_ERROR"],
)
def test_an_error_reply_first_in_a_write_is_delivered_however_fed(op: list[Any], reply: bytes, expected: Err) -> None:
    # Two writes (a O1, fence O2 | op O3, c O4, fence O5): the second write's first answer is an
    # error line. Read in one recv (whole) it comes right after the first write's fence answer;
    # it belongs to its request all the same.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.seal()
        rig.meta("B", [op, [Op.GET, b"c"]])
        rig.seal()
        return rig

    r1, r3 = b"EN O1\r\n", va(b"z", 4)
    e1, fenced1, e2, e3, fenced2 = offsets(r1, fence(2), reply, r3, fence(5))
    for name, chunks in feedings(r1 + fence(2) + reply + r3 + fence(5)):
        out = play(build, chunks, visible=[fenced1, e3, fenced2], name=name)
        assert out.log == [("A", 0, [Code.MISS]), ("B", 0, expected), ("B", 1, [Code.OK, b"z", 0])], name
        assert out.inflight == 0


@pytest.mark.parametrize(
    "op, reply",
    [
        ([Op.INCR, b"n", 1], b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
        ([Op.DECR, b"n", 1], b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
        ([Op.GET, b"a"], b"CLIENT_ERROR bad command line format\r\n"),
        ([Op.DELETE, b"a"], b"CLIENT_ERROR bad command line format\r\n"),
        ([Op.TOUCH, b"a", 5], b"CLIENT_ERROR bad command line format\r\n"),
    ],
    ids=["ma-incr", "ma-decr", "mg", "md", "mg-touch"],
)
def test_client_error_to_a_request_without_data_belongs_to_it(op: list[Any], reply: bytes) -> None:
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [op])
        rig.meta("B", [[Op.GET, b"x"], [Op.SET, b"y", b"v", 0, 0]])
        rig.meta("C", [[Op.DELETE, b"z"]])
        rig.seal()
        return rig

    r2, r3, r4 = va(b"vx", 2), b"HD O3\r\n", b"HD O4\r\n"
    e1, e2, e3, e4, fenced = offsets(reply, r2, r3, r4, fence(5))
    out = every_way(build, reply + r2 + r3 + r4 + fence(5), visible=[e2, e3, e4, fenced])
    message = reply[len(b"CLIENT_ERROR ") : -2].decode()
    assert out.log == [
        ("A", 0, Err(Code.CLIENT_ERROR, message)),
        ("B", 0, [Code.OK, b"vx", 0]),
        ("B", 1, [Code.OK]),
        ("C", 0, [Code.OK]),
    ]
    assert out.error is None and out.inflight == 0
    assert sorted(out.released) == sorted([op[1], b"x", b"y", b"z"])


@pytest.mark.parametrize(
    "reply, code",
    [(b"CLIENT_ERROR bad data chunk\r\n", Code.CLIENT_ERROR), (b"ERROR\r\n", Code.UNKNOWN_COMMAND)],
    ids=["CLIENT_ERROR", "ERROR"],
)
@pytest.mark.parametrize("store", [Op.SET, Op.ADD, Op.APPEND, Op.CAS])
def test_client_error_or_error_to_ms_fails_it_and_resets(reply: bytes, code: Code, store: Op) -> None:
    ms = [store, b"b", b"hi", 0, 0] + ([7] if store == Op.CAS else [])

    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], ms, [Op.GET, b"c"]])
        rig.meta("B", [[Op.GET, b"d"]])
        rig.seal()
        return rig

    # memcached may have read our data block as commands: what follows cannot be trusted.
    r1 = va(b"x", 1)
    e1, e2 = offsets(r1, reply)
    after = b"ERROR\r\n" + va(b"z", 3) + va(b"w", 4) + fence(5)
    out = every_way(build, r1 + reply + after, visible=[e2], error_at=e2)
    assert out.error is not None and out.error.answered
    assert out.log == [
        ("A", 1, Failed(code)),  # the ms gets memcached's own answer
        ("A", 0, Failed(C)),  # held, unproven: never delivered
        ("A", 2, Failed(C)),
        ("B", 0, Failed(C)),
    ]
    assert sorted(out.released) == [b"a", b"b", b"c", b"d"]
    assert out.inflight == 0 and out.failed_in_flight == 2


@pytest.mark.parametrize(
    "reply, code",
    [(b"CLIENT_ERROR bad data chunk\r\n", Code.CLIENT_ERROR), (b"ERROR\r\n", Code.UNKNOWN_COMMAND)],
    ids=["CLIENT_ERROR", "ERROR"],
)
def test_an_ms_error_gives_each_request_of_every_write_exactly_one_outcome(reply: bytes, code: Code) -> None:
    # Two writes in flight (a O1, ms O2, fence O3 | c O4, fence O5) and a third request queued
    # but not yet sealed: the ms gets its own error once, everything else one CONNECTION_ERROR.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0]])
        assert rig.seal() == 3
        rig.meta("B", [[Op.GET, b"c"]])
        assert rig.seal() == 5
        rig.meta("D", [[Op.DELETE, b"d"]])
        return rig

    r1 = va(b"x", 1)
    out = every_way(build, r1 + reply + fence(3) + va(b"z", 4) + fence(5), visible=[len(r1 + reply)], error_at=len(r1 + reply))
    assert out.error is not None and out.error.answered
    assert out.log == [("A", 1, Failed(code)), ("A", 0, Failed(C)), ("B", 0, Failed(C)), ("D", 0, Failed(C))]
    assert out.failed_in_flight == 2 and out.inflight == 0  # c and d; a was answered (held)
    assert sorted(out.released) == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize("op", [[Op.GET, b"a"], [Op.DELETE, b"a"], [Op.INCR, b"a", 1], [Op.TOUCH, b"a", 1]], ids=lambda o: Op(o[0]).name)
def test_error_to_a_meta_request_resets(op: list[Any]) -> None:
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [op])
        rig.meta("B", [[Op.GET, b"b"]])
        rig.seal()
        return rig

    # memcached answers ERROR to a command it does not know: it did not read what we think.
    out = every_way(build, b"ERROR\r\n" + va(b"y", 2) + fence(3), visible=[7], error_at=7)
    assert out.error is not None and out.error.answered
    assert out.log == [("A", 0, Failed(Code.UNKNOWN_COMMAND)), ("B", 0, Failed(C))]
    assert sorted(out.released) == [b"a", b"b"]


# --- text commands -----------------------------------------------------------------------------



@pytest.mark.parametrize(
    "op, reply, result",
    [
        ([Op.STATS, []], STATS, [Code.OK, {"pid": "1", "uptime": "5"}]),
        ([Op.STATS, [b"settings"]], b"STAT item_size_max 1048576\r\nEND\r\n", [Code.OK, {"item_size_max": "1048576"}]),
        ([Op.STATS, [b"reset"]], b"RESET\r\n", [Code.OK, {}]),
        ([Op.VERSION], b"VERSION 1.6.18\r\n", [Code.OK, "1.6.18"]),
        ([Op.FLUSH_ALL, 0], b"OK\r\n", [Code.OK, True]),
        ([Op.CACHE_MEMLIMIT, 64], b"OK\r\n", [Code.OK, True]),
    ],
    ids=["stats", "stats-settings", "stats-reset", "version", "flush_all", "cache_memlimit"],
)
def test_text_command_answer_goes_at_once(op: list[Any], reply: bytes, result: list[Any]) -> None:
    def build() -> Rig:
        rig = Rig()
        rig.text("G", op, index=3)
        rig.seal()
        return rig

    out = every_way(build, reply + fence(1), visible=[len(reply)])  # the text command takes no opaque
    assert out.log == [("G", 3, result)]
    assert out.error is None and out.inflight == 0 and out.released == []


def build_mixed() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])
    rig.text("G", [Op.STATS, []])
    rig.meta("B", [[Op.GET, b"b"]])
    rig.seal()
    return rig


def test_text_reply_between_meta_responses() -> None:
    r1, r3 = va(b"x", 1), va(b"y", 2)  # the text command takes no opaque
    e1, e2, e3, fenced = offsets(r1, STATS, r3, fence(3))
    out = every_way(build_mixed, r1 + STATS + r3 + fence(3), visible=[e2, e3, fenced])
    assert out.log == [
        ("G", 0, [Code.OK, {"pid": "1", "uptime": "5"}]),
        ("A", 0, [Code.OK, b"x", 0]),
        ("B", 0, [Code.OK, b"y", 0]),
    ]
    assert out.inflight == 0 and sorted(out.released) == [b"a", b"b"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        (b"ERROR\r\n", Err(Code.UNKNOWN_COMMAND, "ERROR")),
        (b"CLIENT_ERROR bad command line format\r\n", Err(Code.CLIENT_ERROR, "bad command line format")),
        (b"SERVER_ERROR out of memory\r\n", Err(Code.SERVER_ERROR, "out of memory")),
    ],
    ids=["ERROR", "CLIENT_ERROR", "SERVER_ERROR"],
)
def test_an_error_to_a_text_command_belongs_to_it(reply: bytes, expected: Err) -> None:
    r1, r3 = va(b"x", 1), va(b"y", 2)
    e1, e2, e3, fenced = offsets(r1, reply, r3, fence(3))
    out = every_way(build_mixed, r1 + reply + r3 + fence(3), visible=[e2, e3, fenced])
    assert out.log == [("G", 0, expected), ("A", 0, [Code.OK, b"x", 0]), ("B", 0, [Code.OK, b"y", 0])]
    assert out.error is None and out.inflight == 0


@pytest.mark.parametrize(
    "op, reply",
    [
        ([Op.VERSION], b"OK\r\n"),
        ([Op.VERSION], b"HD O1\r\n"),
        ([Op.VERSION], MN),
        ([Op.STATS, []], b"VERSION 1.6.18\r\n"),
        ([Op.FLUSH_ALL, 0], b"END\r\n"),
        ([Op.FLUSH_ALL, 0], b"EN O1\r\n"),
    ],
    ids=["version-OK", "version-HD", "version-MN", "stats-VERSION", "flush_all-END", "flush_all-EN"],
)
def test_a_text_command_answered_by_something_else_resets(op: list[Any], reply: bytes) -> None:
    def build() -> Rig:
        rig = Rig()
        rig.text("G", op)
        rig.meta("A", [[Op.GET, b"a"]])
        rig.seal()
        return rig

    out = every_way(build, reply + va(b"x", 1) + fence(2), visible=[], error_at=len(reply))
    assert out.log == [("G", 0, Failed(C)), ("A", 0, Failed(C))]


@pytest.mark.parametrize("reply", [STATS, b"VERSION 1.6.18\r\n", b"OK\r\n", b"END\r\n"], ids=repr)
def test_a_meta_request_answered_by_a_text_reply_resets(reply: bytes) -> None:
    r1 = va(b"x", 1)
    out = every_way(build_two_gets, r1 + reply + F3, visible=[], error_at=len(r1 + reply))
    two_gets_failed(out)


# --- tombstones ---------------------------------------------------------------------------------


def build_tombstone() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0]])
    rig.meta("B", [[Op.GET, b"c"]])
    rig.seal()
    rig.waiters["A"].done = True  # A's deadline passed: it was answered TIMEOUT elsewhere
    return rig


def test_a_tombstone_gets_nothing_and_later_waiters_get_theirs() -> None:
    r1, r2, r3 = va(b"x", 1), b"HD O2\r\n", va(b"y", 3)
    e1, e2, e3, fenced = offsets(r1, r2, r3, fence(4))
    out = every_way(build_tombstone, r1 + r2 + r3 + fence(4), visible=[fenced])
    assert out.log == [("B", 0, [Code.OK, b"y", 0])]
    assert out.inflight == 0
    assert sorted(out.released) == [b"a", b"b", b"c"]  # A's pins go too


def test_a_tombstones_late_responses_are_still_checked() -> None:
    # A gave up, but its responses still prove (or disprove) the stream.
    r1, r2 = va(b"x", 1), b"HD O7\r\n"
    out = every_way(build_tombstone, r1 + r2 + va(b"y", 3) + fence(4), visible=[], error_at=len(r1 + r2))
    assert out.error is not None
    assert out.log == [("B", 0, Failed(C))]  # nothing at all for A, not even a failure
    assert sorted(out.released) == [b"a", b"b", b"c"]


def test_a_tombstones_bad_ms_answer_resets_without_telling_it() -> None:
    r1 = va(b"x", 1)
    reply = b"CLIENT_ERROR bad data chunk\r\n"
    out = every_way(build_tombstone, r1 + reply + va(b"y", 3) + fence(4), visible=[], error_at=len(r1 + reply))
    assert out.error is not None and out.error.answered
    assert out.log == [("B", 0, Failed(C))]


def test_a_waiter_that_gives_up_while_its_result_is_held_gets_nothing() -> None:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])
    rig.meta("B", [[Op.GET, b"b"]])
    rig.seal()
    rig.p.receive(va(b"x", 1))  # held until r2 proves it
    rig.waiters["A"].done = True
    rig.p.receive(va(b"y", 2) + fence(3))
    assert rig.log == [("B", 0, [Code.OK, b"y", 0])]
    assert rig.p.inflight == 0 and sorted(rig.released) == [b"a", b"b"]


def test_a_tombstone_text_command_gets_nothing() -> None:
    def build() -> Rig:
        rig = build_mixed()
        rig.waiters["G"].done = True
        return rig

    r1, r3 = va(b"x", 1), va(b"y", 2)
    e1, e2, e3, fenced = offsets(r1, STATS, r3, fence(3))
    out = every_way(build, r1 + STATS + r3 + fence(3), visible=[e3, fenced])
    assert out.log == [("A", 0, [Code.OK, b"x", 0]), ("B", 0, [Code.OK, b"y", 0])]


def test_fail_all_does_not_tell_a_tombstone() -> None:
    rig = build_tombstone()
    rig.p.receive(va(b"x", 1))
    assert rig.p.fail_all(Code.TIMEOUT, "silent") == 2
    assert rig.log == [("B", 0, Failed(Code.TIMEOUT))]
    assert sorted(rig.released) == [b"a", b"b", b"c"]


# --- failing what is in flight, and reconnecting -----------------------------------------------


def test_fail_all_before_anything_was_sent() -> None:
    # A connect that failed: the queued requests never left.
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0]])
    rig.text("G", [Op.VERSION])
    rig.seal()
    assert rig.p.fail_all(Code.CONNECTION_ERROR, "connect refused") == 3
    assert rig.log == [("A", 0, Failed(C)), ("A", 1, Failed(C)), ("G", 0, Failed(C))]
    assert rig.waiters["A"].messages[0] == "connect refused"
    assert rig.p.out == b"" and rig.p.inflight == 0
    assert sorted(rig.released) == [b"a", b"b"]
    rig.p.seal()
    assert rig.p.out == b""  # nothing left to fence


def test_fail_all_fails_held_results_with_its_code() -> None:
    # An io timeout with results held for a fence that never came.
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"], [Op.GET, b"c"]])
    rig.seal()
    rig.p.receive(va(b"x", 1) + va(b"y", 2))  # a proven by b; b held; c unanswered
    assert rig.log == [("A", 0, [Code.OK, b"x", 0])]
    assert rig.p.fail_all(Code.TIMEOUT, "silent for 5s") == 1
    assert rig.log == [("A", 0, [Code.OK, b"x", 0]), ("A", 1, Failed(Code.TIMEOUT)), ("A", 2, Failed(Code.TIMEOUT))]
    assert rig.p.inflight == 0 and sorted(rig.released) == [b"a", b"b", b"c"]


def test_fail_all_on_an_idle_pipeline_fails_nobody() -> None:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])
    rig.seal()
    rig.p.receive(va(b"x", 1) + fence(2))
    assert rig.p.fail_all(Code.CONNECTION_ERROR, "closed by the server") == 0
    assert rig.log == [("A", 0, [Code.OK, b"x", 0])]
    assert rig.released == [b"a"]


def test_reconnect_after_a_reset_starts_clean() -> None:
    # The driver (connection.py) closes the socket on OutOfStep, calls fail_all, and on reconnect
    # builds a new Pipeline whose first request is `stats settings`.
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.seal()
    with pytest.raises(OutOfStep):
        rig.p.receive(va(b"x", 1) + va(b"y", 5) + F3)
    assert rig.p.fail_all(Code.CONNECTION_ERROR, "reset") == 1
    assert rig.p.inflight == 0 and rig.p.out == b""
    assert rig.log == [("A", 0, Failed(C)), ("A", 1, Failed(C))]

    fresh = Pipeline(MAX_VALUE, release=rig.released.append)
    settings_waiter = Recorder("S", rig.log)
    fresh.submit(Batch(settings_waiter, [0], [int(Op.STATS)], None, TEXT, TEXT_EXPECT[Op.STATS]), b"stats settings\r\n")
    waiter = Recorder("B", rig.log)
    fresh.submit(Batch(waiter, [0], [int(Op.GET)], [b"a"], fresh.seq + 1), encode_op(Op.GET, [Op.GET, b"a"], fresh.seq + 1))
    fresh.seq += 1
    fresh.seal()
    assert bytes(fresh.out) == b"stats settings\r\nmg a v f s O1\r\nmg _mcbroker_fence_ O2\r\n"
    fresh.sent(len(fresh.out))
    answer = b"STAT item_size_max 1048576\r\nEND\r\n" + va(b"new", 1) + fence(2)
    for i in range(len(answer)):
        fresh.receive(answer[i : i + 1])
    assert rig.log[2:] == [("S", 0, [Code.OK, {"item_size_max": "1048576"}]), ("B", 0, [Code.OK, b"new", 0])]
    assert fresh.inflight == 0


# --- what receive() returns: meta requests answered ------------------------------------------------


def returns_every_way(build: Callable[[], Rig], data: bytes, ends: list[int]) -> None:
    """Feed `data` every way; each receive() must return how many of the meta answers ending at
    `ends` (stream offsets) it completed."""
    for name, chunks in feedings(data):
        rig = build()
        fed = 0
        for chunk in chunks:
            got = rig.p.receive(chunk)
            want = sum(fed < e <= fed + len(chunk) for e in ends)
            assert got == want, f"{name}: receive of bytes {fed}..{fed + len(chunk)} returned {got}, {want} meta answers ended there"
            fed += len(chunk)


def test_receive_counts_meta_answers_not_fences_or_text_replies() -> None:
    # The broker's own `stats settings` goes first on a new connection; it, `version` and the
    # fences are not meta requests: a server that answers only those is not doing its job.
    def build() -> Rig:
        rig = Rig()
        rig.text("S", [Op.STATS, [b"settings"]])
        rig.meta("A", [[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0], [Op.DELETE, b"c"], [Op.INCR, b"n", 1], [Op.GETS, b"g"]])
        rig.text("V", [Op.VERSION])
        assert rig.seal() == 6
        rig.meta("B", [[Op.TOUCH, b"t", 10]])
        assert rig.seal() == 8
        return rig

    stats = b"STAT item_size_max 1048576\r\nEND\r\n"
    answers = [
        stats, va(b"x", 1), b"HD O2\r\n", b"NF O3\r\n", b"VA 1 O4\r\n2\r\n", b"EN O5\r\n",
        b"VERSION 1.6.18\r\n", fence(6), b"HD O7\r\n", fence(8),
    ]
    ends = offsets(*answers)
    meta_ends = [ends[i] for i in (1, 2, 3, 4, 5, 8)]
    data = b"".join(answers)
    rig = build()
    assert rig.p.receive(data) == 6
    assert rig.p.inflight == 0 and len(rig.log) == 8
    returns_every_way(build, data, meta_ends)
    # Only text replies and a fence's answer: nothing counts.
    def build_text() -> Rig:
        rig = Rig()
        rig.text("S", [Op.STATS, [b"settings"]])
        rig.meta("A", [[Op.GET, b"a"]])
        rig.seal()
        return rig

    returns_every_way(build_text, stats + b"EN O1\r\n" + fence(2), [len(stats) + 7])
    rig = build_text()
    assert rig.p.receive(stats) == 0 and rig.log == [("S", 0, [Code.OK, {"item_size_max": "1048576"}])]


def test_receive_counts_a_tombstones_answer_and_a_set_too_large() -> None:
    # A waiter that gave up does not change what memcached answered; the md standing in for a set
    # too large is a meta request like any other.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"]])
        rig.waiters["A"].done = True
        rig.p.seq += 1
        rig.p.submit(Batch(rig.waiter("B"), [0], [UNLINK_TOO_LARGE], [b"big"], 2), meta.encode(meta.Delete(b"big", 2)))
        rig.seal()
        return rig

    answers = [va(b"x", 1), b"NF O2\r\n", fence(3)]
    ends = offsets(*answers)
    returns_every_way(build, b"".join(answers), ends[:2])


@pytest.mark.parametrize(
    "op, line",
    [
        ([Op.GET, b"b"], b"SERVER_ERROR out of memory\r\n"),
        ([Op.SET, b"b", b"v", 0, 0], b"SERVER_ERROR out of memory storing object\r\n"),
        ([Op.DELETE, b"b"], b"CLIENT_ERROR bad command line format\r\n"),
        ([Op.INCR, b"b", 1], b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ],
    ids=["mg-SERVER_ERROR", "ms-SERVER_ERROR", "md-CLIENT_ERROR", "ma-CLIENT_ERROR"],
)
def test_receive_counts_an_error_line_that_answers_a_meta_request(op: list[Any], line: bytes) -> None:
    # receive()'s docstring: it returns how many meta requests (not fences, not text commands)
    # were answered. These error lines belong to their meta request (its result is the error and
    # the stream goes on), so that request was answered, as a VA or HD would have answered it.
    def build() -> Rig:
        rig = Rig()
        rig.meta("A", [[Op.GET, b"a"], op])
        rig.seal()
        return rig

    answers = [va(b"x", 1), line, F3]
    ends = offsets(*answers)
    rig = build()
    assert rig.p.receive(b"".join(answers)) == 2, "a's VA and b's error line both answered their request"
    assert rig.log[1][:2] == ("A", 1) and rig.log[1][2][0] >= Code.SERVER_ERROR
    returns_every_way(build, b"".join(answers), ends[:2])


def test_reserved_requests_are_not_counted_twice() -> None:
    # The router counts each admitted request (Connection.reserve) before the batch is pushed.
    rig = Rig()
    rig.p.inflight += 2
    first = rig.p.seq + 1
    data = encode_op(Op.GET, [Op.GET, b"a"], first) + encode_op(Op.GET, [Op.GET, b"b"], first + 1)
    rig.p.seq += 2
    rig.p.submit(Batch(rig.waiter("A"), [0, 1], [int(Op.GET)] * 2, [b"a", b"b"], first), data, reserved=True)
    assert rig.p.inflight == 2
    rig.seal()
    rig.p.receive(va(b"x", 1) + b"EN O2\r\n" + F3)
    assert rig.p.inflight == 0
    assert rig.log == [("A", 0, [Code.OK, b"x", 0]), ("A", 1, [Code.MISS])]


def test_inflight_counts_back_to_zero_as_answers_arrive() -> None:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.meta("B", [[Op.DELETE, b"c"]])
    rig.seal()
    answer = [va(b"x", 1), va(b"y", 2), b"HD O3\r\n", fence(4)]
    seen = []
    for part in answer:
        rig.p.receive(part)
        seen.append(rig.p.inflight)
    assert seen == [2, 1, 0, 0]


# --- property: random batches against a model of memcached ---------------------------------------

KEYS = [b"k%d" % i for i in range(4)]

values = st.one_of(
    st.binary(max_size=12),
    st.integers(0, 2**64 - 1).map(lambda n: b"%d" % n),
    # values holding CRLF, and ones that read as a response line (a swallow would look like them)
    st.sampled_from([b"a\r\nb", b"\r\n", b"x\r\n", b"SERVER_ERROR x", b"EN O1", b"HD O2\r\nHD O3"]),
)
op_strategy = st.one_of(
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    # the last field: memcached answers SERVER_ERROR out of memory (and unlinks the key)
    st.tuples(st.just("set"), st.sampled_from(KEYS), values, st.integers(0, 2**32 - 1), st.booleans()),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("incr"), st.sampled_from(KEYS), st.integers(0, 2**64 - 1)),
)
batch_strategy = st.tuples(
    st.integers(0, 3),  # which waiter (a waiter may have several batches)
    st.lists(op_strategy, min_size=1, max_size=4),
    st.booleans(),  # seal (end a write) after this batch
)


@dataclass
class Scenario:
    rig: Rig
    stream: bytes
    expected: dict[tuple[str, int], Any]  # (waiter, index) -> result (a list, or an Err)
    owner: list[tuple[str, int] | None]  # per stream byte: the request whose content it is
    tombstones: set[str]
    vas: list[tuple[int, int]]  # each VA response: where it starts, where its data starts
    parts: list[tuple[int, int]]  # each response (and each fence's answer): where it starts and ends
    fence_at: list[int]  # where each fence's answer starts
    reset: bool  # the pipeline must reset (never, for the undamaged streams this model writes)
    truth: dict[tuple[str, int], Any] = field(default_factory=dict)  # memcached's own answers, no reset


def model_scenario(batches: list[Any], dead: set[int], fence_hit: bool = False) -> Scenario:
    """Submit `batches`, and write the answer memcached would send (from a model of its data).
    `fence_hit`: the fence's key exists, so memcached answers the fence HD rather than EN.

    The expected results follow pipeline.py's rule: results are held until a response with its
    opaque in place proves them; an error line (here: SERVER_ERROR to ms, CLIENT_ERROR to ma)
    proves nothing, even after a value holding CRLF, and resets nothing. (`reset` stays for
    scenarios that would reset: none of these ops' answers do.)"""
    rig = Rig()
    store: dict[bytes, tuple[bytes, int]] = {}
    stream = bytearray()
    owner: list[tuple[str, int] | None] = []
    expected: dict[tuple[str, int], Any] = {}
    next_index = {w: 0 for w in range(4)}
    pending_fence = False
    vas: list[tuple[int, int]] = []
    parts: list[tuple[int, int]] = []
    fence_at: list[int] = []
    # The proof model, response by response: results held for proof, and whether the last
    # response was a value holding CRLF.
    answered: list[tuple[str, int]] = []  # requests in stream order
    held: list[tuple[str, int]] = []
    reset = False
    risky = False

    def answer(who: tuple[str, int] | None, kind: str, value: bytes | None = None) -> None:
        """`kind`: "meta" (carries an opaque), "line" (an error line), "fence"."""
        nonlocal reset, risky
        if reset:
            return
        # An error line after a value holding CRLF is held with it, unproven, like any line.
        if kind != "line":
            held.clear()  # proven
            risky = value is not None and b"\r\n" in value
        if who is not None:
            answered.append(who)
            held.append(who)

    def emit(part: bytes, who: tuple[str, int] | None, content: list[tuple[int, int]] = []) -> None:
        start = len(stream)
        stream.extend(part)
        parts.append((start, len(stream)))
        marks: list[tuple[str, int] | None] = [None] * len(part)
        for a, b in content:  # spans of this response that only its own request can miss-read
            for i in range(a, b):
                marks[i] = who
        owner.extend(marks)
        assert len(owner) == len(stream) == start + len(part)

    def end_write() -> None:
        opaque = rig.seal()
        assert opaque is not None and opaque == rig.p.seq
        fence_at.append(len(stream))
        emit(fence(opaque, fence_hit), None)
        answer(None, "fence")

    for w, ops, seal in batches:
        name = f"W{w}"
        wire_ops: list[list[Any]] = []
        for op in ops:
            if op[0] == "get":
                wire_ops.append([Op.GET, op[1]])
            elif op[0] == "set":
                wire_ops.append([Op.SET, op[1], op[2], op[3], 0])
            elif op[0] == "incr":
                wire_ops.append([Op.INCR, op[1], op[2]])
            else:
                wire_ops.append([Op.DELETE, op[1]])
        indices = list(range(next_index[w], next_index[w] + len(ops)))
        next_index[w] += len(ops)
        first = rig.p.seq + 1
        rig.meta(name, wire_ops, indices)
        for j, op in enumerate(ops):
            opaque = first + j
            who = (name, indices[j])
            if op[0] == "get":
                hit = store.get(op[1])
                if hit is None:
                    part = b"EN O%d\r\n" % opaque
                    emit(part, who, [(0, 2)])
                    expected[who] = [Code.MISS]
                    answer(who, "meta")
                else:
                    value, flags = hit
                    head = b"VA %d f%d s%d O%d\r\n" % (len(value), flags, len(value), opaque)
                    f_at = head.index(b" f") + 1
                    vas.append((len(stream), len(stream) + len(head)))
                    # The client flags are the request's own content; the s token is not: it
                    # must agree with the header's size, so damage to it is always caught.
                    emit(head + value + b"\r\n", who, [(0, 2), (f_at, head.index(b" s")), (len(head), len(head) + len(value))])
                    expected[who] = [Code.OK, value, flags]
                    answer(who, "meta", value)
            elif op[0] == "set" and op[4]:
                store.pop(op[1], None)
                line = b"SERVER_ERROR out of memory storing object\r\n"
                emit(line, who, [(13, len(line) - 2)])
                expected[who] = Err(Code.SERVER_ERROR, "out of memory storing object")
                answer(who, "line")
            elif op[0] == "set":
                store[op[1]] = (op[2], op[3])
                emit(b"HD O%d\r\n" % opaque, who, [(0, 2)])
                expected[who] = [Code.OK]
                answer(who, "meta")
            elif op[0] == "incr":
                hit = store.get(op[1])
                if hit is None:
                    emit(b"NF O%d\r\n" % opaque, who, [(0, 2)])
                    expected[who] = [Code.NOT_FOUND]
                    answer(who, "meta")
                elif hit[0].isdigit() and len(hit[0]) <= 20 and int(hit[0]) < 2**64:
                    new = (int(hit[0]) + op[2]) % 2**64  # protocol.txt: incrementing can overflow
                    store[op[1]] = (b"%d" % new, hit[1])
                    head = b"VA %d O%d\r\n" % (len(b"%d" % new), opaque)
                    vas.append((len(stream), len(stream) + len(head)))
                    emit(head + b"%d\r\n" % new, who, [(0, 2), (len(head), len(head) + len(b"%d" % new))])
                    expected[who] = [Code.OK, new]
                    answer(who, "meta", b"%d" % new)
                else:
                    line = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
                    emit(line, who, [(13, len(line) - 2)])
                    expected[who] = Err(Code.CLIENT_ERROR, "non-numeric")
                    answer(who, "line")
            else:
                found = store.pop(op[1], None) is not None
                emit(b"%s O%d\r\n" % (b"HD" if found else b"NF", opaque), who, [(0, 2)])
                expected[who] = [Code.OK] if found else [Code.NOT_FOUND]
                answer(who, "meta")
        pending_fence = True
        if seal:
            end_write()
            pending_fence = False
    if pending_fence:
        end_write()
    truth = dict(expected)
    if reset:
        # Unproven when the stream was reset: the held results, and every request after them.
        unproven = set(held) | (set(expected) - set(answered))
        for who in unproven:
            expected[who] = Failed(C)
    tombstones = {f"W{w}" for w in dead}
    for name in tombstones:
        rig.waiter(name).done = True
    return Scenario(rig, bytes(stream), expected, owner, tombstones, vas, parts, fence_at, reset, truth)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    chunks, pos = [], 0
    for cut in sorted(set(cuts)):
        chunks.append(data[pos:cut])
        pos = max(pos, cut)
    chunks.append(data[pos:])
    return chunks


def outcomes_by_request(log: list[Event]) -> dict[tuple[str, int], list[Any]]:
    by: dict[tuple[str, int], list[Any]] = {}
    for name, index, what in log:
        by.setdefault((name, index), []).append(what)
    return by


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch_strategy, min_size=1, max_size=6), st.sets(st.integers(0, 3), max_size=2), st.booleans(), st.data())
def test_every_waiter_gets_exactly_its_own_results_in_order(
    batches: list[Any], dead: set[int], fence_hit: bool, data: st.DataObject,
) -> None:
    probe = model_scenario(batches, dead, fence_hit)
    cuts = data.draw(st.lists(st.integers(0, len(probe.stream)), max_size=8), label="cuts")
    for how in ("random cuts", "byte by byte"):
        sc = model_scenario(batches, dead, fence_hit)
        stream = sc.stream
        chunks = chunked(stream, cuts) if how == "random cuts" else [stream[i : i + 1] for i in range(len(stream))]
        reset = False
        try:
            for chunk in chunks:
                sc.rig.p.receive(chunk)
        except OutOfStep:
            reset = True
            sc.rig.p.fail_all(C, "pipeline reset")
        assert reset == sc.reset, f"{how}: OutOfStep {reset}, the model says {sc.reset}"
        for name in {n for n, _ in sc.expected}:
            got = [(i, r) for n, i, r in sc.rig.log if n == name]
            if name in sc.tombstones:
                assert got == [], f"{how}: tombstone {name} got {got}"
            else:
                want = sorted((i, r) for (n, i), r in sc.expected.items() if n == name)
                assert got == want, f"{how}: {name}"
        assert sc.rig.p.inflight == 0
        assert sorted(sc.rig.released) == sorted(sc.rig.keys)
        assert sc.rig.p.fail_all(Code.CONNECTION_ERROR, "end") == 0
        assert len(sc.rig.log) == sum(1 for n, _ in sc.expected if n not in sc.tombstones)


def test_the_model_holds_an_error_line_after_a_crlf_value_until_the_fence() -> None:
    # The model itself, on the case pipeline.py's rule is about (and its control).
    batches = [(0, [("set", b"k0", b"a\r\nb", 0, False)], True), (1, [("get", b"k0"), ("set", b"k1", b"v", 0, True)], True)]
    sc = model_scenario(batches, set())
    assert not sc.reset
    assert set(sc.expected) == {("W0", 0), ("W1", 0), ("W1", 1)}
    assert sc.expected[("W0", 0)] == [Code.OK] and sc.expected[("W1", 0)] == [Code.OK, b"a\r\nb", 0]
    assert repr(sc.expected[("W1", 1)]) == repr(Err(Code.SERVER_ERROR, "out of memory storing object"))
    batches[0] = (0, [("set", b"k0", b"a b", 0, False)], True)
    sc = model_scenario(batches, set(), fence_hit=True)
    assert not sc.reset and sc.expected[("W1", 0)] == [Code.OK, b"a b", 0]
    assert sc.stream.endswith(b"SERVER_ERROR out of memory storing object\r\nHD O5\r\n")


def damage(sc: Scenario, data: st.DataObject) -> tuple[str, bytes, tuple[str, int] | None]:
    """Damage the answer stream one way; returns how, the damaged stream, and the one request
    (if any) whose own content (status, client flags, data) alone was touched: that request may
    read a wrong result, as no protocol can tell; every other request must not."""
    stream = sc.stream
    n = len(stream)
    kind = data.draw(st.sampled_from(["replace", "lose", "repeat", "resize"] if sc.vas else ["replace", "lose", "repeat"]), label="kind")

    def own(a: int, b: int) -> tuple[str, int] | None:
        who = sc.owner[a]
        return who if who is not None and all(sc.owner[i] == who for i in range(a, b)) else None

    if kind == "replace":
        pos = data.draw(st.integers(0, n - 1), label="pos")
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != stream[pos]), label="byte")
        return f"byte {pos} {stream[pos:pos + 1]!r} -> {bytes([byte])!r}", stream[:pos] + bytes([byte]) + stream[pos + 1 :], own(pos, pos + 1)
    if kind in ("lose", "repeat"):
        if data.draw(st.booleans(), label="whole responses"):
            i = data.draw(st.integers(0, len(sc.parts) - 1), label="first")
            j = data.draw(st.integers(i, min(len(sc.parts) - 1, i + 3)), label="last")
            a, b = sc.parts[i][0], sc.parts[j][1]
        else:
            a = data.draw(st.integers(0, n - 1), label="start")
            b = data.draw(st.integers(a + 1, min(n, a + 48)), label="end")
        if kind == "lose":  # a middlebox dropped bytes
            return f"lost {stream[a:b]!r} at {a}", stream[:a] + stream[b:], own(a, b)
        return f"repeated {stream[a:b]!r} at {a}", stream[:b] + stream[a:b] + stream[b:], own(a, b)
    # A VA header whose size now ends its data at another CRLF of the stream: the data block
    # swallows what follows (or stops short). No request may get such a value.
    start, data_at = sc.vas[data.draw(st.integers(0, len(sc.vas) - 1), label="va")]
    ends = [i for i in range(data_at, n - 1) if stream[i : i + 2] == b"\r\n"]
    before_fence = [i for i in ends if i + 2 in sc.fence_at]  # the data then ends at a fence's answer
    end = data.draw(st.sampled_from(ends) | st.sampled_from(before_fence) if before_fence else st.sampled_from(ends), label="crlf")
    line_end = data_at - 2
    head = stream[start:line_end].split(b" ")
    head[1] = b"%d" % (end - data_at)
    return f"VA at {start} resized to {end - data_at}", stream[:start] + b" ".join(head) + stream[line_end:], None


def is_failure(what: Any) -> bool:
    return isinstance(what, Failed) or (isinstance(what, list) and what[0] >= Code.SERVER_ERROR)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch_strategy, min_size=1, max_size=5), st.data())
def test_a_damaged_stream_never_delivers_a_wrong_result(batches: list[Any], data: st.DataObject) -> None:
    # A first write stores every key, so that later gets hit and values are in flight.
    seed = (3, [("set", k, b"seed " + k, 1, False) for k in KEYS], True)
    sc = model_scenario([seed] + batches, set())
    how, bad, exempt = damage(sc, data)
    cuts = data.draw(st.lists(st.integers(0, len(bad)), max_size=6), label="cuts")
    p = sc.rig.p
    try:
        for chunk in chunked(bad, cuts):
            p.receive(chunk)
    except OutOfStep:
        p.fail_all(Code.CONNECTION_ERROR, "pipeline reset")
    else:
        p.fail_all(Code.TIMEOUT, "deadline")  # what a stream that stalls ends with
    by = outcomes_by_request(sc.rig.log)
    assert set(by) == set(sc.expected), "every request gets an outcome"
    for who, right in sc.expected.items():
        got = by[who]
        assert len(got) == 1, f"{who} got {got}"
        if who == exempt:
            continue
        # memcached's own answer is never wrong either: damage can take the CRLF out of a value
        # and so spare the reset the undamaged stream would have caused.
        true = sc.truth.get(who, right)
        assert got[0] == right or got[0] == true or is_failure(got[0]), f"{how}: {who} got {got[0]}, right is {right}"
    assert p.inflight == 0
    assert sorted(sc.rig.released) == sorted(sc.rig.keys)


# --- read coalescing: waiters that joined a plain get in flight (issue 10) -------------------------
#
# The router registers each plain get it sends in the server's read table ([pipeline, key]); a
# later plain get of the key joins it (appends its waiter and index, counted in flight on the
# read's pipeline). Checked here: joiners get the leader's own answer, held and proven exactly
# like it; an answered read leaves the table at once (nothing joins a response gone by) but never
# removes a newer read of the key; failures reach every joiner; a tombstone leader still answers
# its joiners; inflight counts back to 0.


class CoalescingRig(Rig):
    CONN_NO = 5  # the pipeline's connection number: part of each read's tag

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[bytes, int] = {}
        self.joiners: dict[int, list[Any]] = {}
        self.p = Pipeline(MAX_VALUE, release=self.released.append, reads=self.reads, joiners=self.joiners, conn_no=self.CONN_NO)

    def gets(self, name: str, keys: list[bytes]) -> list[int]:
        """Queue plain gets as the router does with coalescing on; returns their tags."""
        p = self.p
        first = p.seq + 1
        data = b"".join(encode_op(Op.GET, [Op.GET, k], first + j) for j, k in enumerate(keys))
        p.seq += len(keys)
        tags = [tag_of(first + j, self.CONN_NO) for j in range(len(keys))]
        self.reads.update(zip(keys, tags))
        p.submit(Batch(self.waiter(name), list(range(len(keys))), [int(Op.GET)] * len(keys), None, first, None, list(keys)), data)
        return tags

    def join(self, key: bytes, name: str, index: int) -> None:
        self.joiners.setdefault(self.reads[key], []).extend((self.waiter(name), index))
        self.p.inflight += 1


def build_joined() -> CoalescingRig:
    rig = CoalescingRig()
    rig.gets("A", [b"hot", b"other"])
    rig.join(b"hot", "B", 0)
    rig.join(b"hot", "C", 3)
    rig.join(b"other", "B", 1)
    rig.seal()
    return rig


def test_joiners_get_the_leaders_answer_once_it_is_proven_however_fed() -> None:
    r1 = va(b"v1", 1, flags=3)
    r2 = b"EN O2\r\n"
    e1, e2, e_fence = offsets(r1, r2, fence(3))
    out = every_way(build_joined, r1 + r2 + fence(3), visible=[e2, e2, e2, e_fence, e_fence])
    assert out.log == [
        ("A", 0, [Code.OK, b"v1", 3]),
        ("B", 0, [Code.OK, b"v1", 3]),
        ("C", 3, [Code.OK, b"v1", 3]),
        ("A", 1, [Code.MISS]),
        ("B", 1, [Code.MISS]),
    ]
    assert out.error is None
    assert out.inflight == 0


def test_an_answered_read_leaves_the_table_at_once_and_nothing_joins_it() -> None:
    rig = build_joined()
    rig.p.receive(va(b"v1", 1))  # answered, not yet proven
    assert b"hot" not in rig.reads and b"other" in rig.reads
    rig.p.receive(b"EN O2\r\n")
    assert rig.reads == {}


def test_an_answered_read_never_removes_a_newer_read_of_its_key() -> None:
    # A write of "hot" closed the first read (the router takes it out of the table); a later get
    # of "hot" was sent and registered: the old read's answer must leave the new one in place,
    # and the new one's joiner must get the new answer, not the old.
    rig = CoalescingRig()
    (old,) = rig.gets("A", [b"hot"])
    del rig.reads[b"hot"]
    rig.meta("W", [[Op.SET, b"hot", b"new", 0, 0]])
    (new,) = rig.gets("B", [b"hot"])
    rig.join(b"hot", "C", 0)
    rig.seal()
    rig.p.receive(va(b"old", 1) + b"HD O2\r\n")
    assert rig.reads == {b"hot": new} and list(rig.joiners) == [new]
    rig.p.receive(va(b"new", 3) + fence(4))
    assert rig.log == [
        ("A", 0, [Code.OK, b"old", 0]),
        ("W", 0, [Code.OK]),
        ("B", 0, [Code.OK, b"new", 0]),
        ("C", 0, [Code.OK, b"new", 0]),
    ]
    assert rig.reads == {} and rig.joiners == {} and rig.p.inflight == 0


def test_with_nobody_joined_an_answered_read_leaves_other_reads_of_its_key_in_place() -> None:
    # The table is cleared in one pass when nobody joined (the common case): entries that are not
    # the answered reads' own must come back, whether a newer read on this connection or a read
    # on another connection (another conn_no in its tag) holds the key.
    rig = CoalescingRig()
    rig.gets("A", [b"hot", b"cold"])
    del rig.reads[b"hot"]  # a write of "hot" closed that read
    rig.meta("W", [[Op.SET, b"hot", b"new", 0, 0]])
    (new,) = rig.gets("B", [b"hot"])
    elsewhere = tag_of(1, CoalescingRig.CONN_NO + 1)
    rig.reads[b"cold"] = elsewhere  # as if "cold" were being read on another connection now
    rig.seal()
    rig.p.receive(va(b"old", 1) + b"EN O2\r\n" + b"HD O3\r\n")
    assert rig.reads == {b"hot": new, b"cold": elsewhere}
    rig.p.receive(va(b"new", 4) + fence(5))
    assert rig.reads == {b"cold": elsewhere}
    assert rig.log == [
        ("A", 0, [Code.OK, b"old", 0]), ("A", 1, [Code.MISS]), ("W", 0, [Code.OK]), ("B", 0, [Code.OK, b"new", 0]),
    ]


def test_a_batch_reading_a_key_twice_leaves_nothing_in_the_table() -> None:
    # The router registers a frame's keys in one update, so the later of two gets of a key holds
    # its entry; both answers arrive in one pass and the table must end empty.
    def build() -> CoalescingRig:
        rig = CoalescingRig()
        rig.gets("A", [b"k", b"x", b"k"])
        rig.seal()
        return rig

    out = every_way(build, va(b"1", 1) + b"EN O2\r\n" + va(b"1", 3) + fence(4))
    assert out.log == [("A", 0, [Code.OK, b"1", 0]), ("A", 1, [Code.MISS]), ("A", 2, [Code.OK, b"1", 0])]
    rig = build()
    rig.p.receive(va(b"1", 1) + b"EN O2\r\n" + va(b"1", 3) + fence(4))
    assert rig.reads == {} and rig.joiners == {} and rig.p.inflight == 0


def build_unregistered_first() -> CoalescingRig:
    # A batch of plain gets whose first get is not offered for joining (`reads` holds None there)
    # and whose second is, and was joined. The router sends no such mix today (only a frame of
    # one get offers its read); the pipeline takes any.
    rig = CoalescingRig()
    p = rig.p
    keys = [b"pinned", b"hot"]
    data = b"".join(encode_op(Op.GET, [Op.GET, k], 1 + j) for j, k in enumerate(keys))
    p.seq += 2
    rig.reads[b"hot"] = tag_of(2, CoalescingRig.CONN_NO)
    p.submit(Batch(rig.waiter("A"), [0, 1], [int(Op.GET)] * 2, None, 1, None, [None, b"hot"]), data)
    rig.join(b"hot", "B", 4)
    rig.seal()
    return rig


def test_a_get_left_out_of_the_read_table_does_not_stop_the_joiners_of_the_next() -> None:
    out = every_way(build_unregistered_first, va(b"p", 1) + va(b"h", 2) + fence(3))
    assert out.log == [("A", 0, [Code.OK, b"p", 0]), ("A", 1, [Code.OK, b"h", 0]), ("B", 4, [Code.OK, b"h", 0])]
    assert out.inflight == 0
    rig = build_unregistered_first()
    rig.p.receive(va(b"p", 1) + va(b"h", 2) + fence(3))
    assert rig.reads == {} and rig.joiners == {}


def test_the_fast_path_takes_a_batch_of_gets_however_its_answers_are_split(
    path: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not a guarantee of results (the general path gives the same events) but of the hot path:
    # a batch whose answers arrive in several reads resumes on the fast path mid-batch, with the
    # opaque of the answer it resumes at, instead of falling to the general path for the rest.
    answers = [va(b"v%d" % i, i + 1) if i % 3 else b"EN O%d\r\n" % (i + 1) for i in range(6)]
    stream = b"".join(answers) + fence(7)
    next_items = ResponseParser.next_items
    for name, chunks in feedings(stream):
        rig = CoalescingRig()
        rig.gets("A", [b"k%d" % i for i in range(6)])
        rig.seal()
        general: list[Any] = []

        def spy(parser: ResponseParser, limit: int = 1 << 62) -> list[Any]:
            items = next_items(parser, limit)
            general.extend(items)
            return items

        monkeypatch.setattr(ResponseParser, "next_items", spy)
        for chunk in chunks:
            rig.p.receive(chunk)
        assert [e[1] for e in rig.log] == list(range(6)), name
        # The fence's EN takes its own fast path (take_exact) too.
        assert len(general) == (6 + 1 if path == "general path" else 0), f"{name}: {general}"


def test_a_tombstone_leader_still_answers_its_joiners() -> None:
    rig = build_joined()
    rig.waiters["A"].done = True  # A's deadline passed
    rig.p.receive(va(b"v1", 1) + b"EN O2\r\n" + fence(3))
    assert rig.log == [("B", 0, [Code.OK, b"v1", 0]), ("C", 3, [Code.OK, b"v1", 0]), ("B", 1, [Code.MISS])]
    assert rig.p.inflight == 0


def test_a_reset_fails_every_joiner_and_empties_the_table_however_fed() -> None:
    # The leader's answer arrived but its proof did not: an opaque out of place follows.
    r1 = va(b"v1", 1)
    bad = b"EN O9\r\n"
    out = every_way(build_joined, r1 + bad, error_at=len(r1 + bad), visible=[])
    assert sorted(out.log) == sorted([
        ("A", 0, Failed(C)), ("B", 0, Failed(C)), ("C", 3, Failed(C)), ("A", 1, Failed(C)), ("B", 1, Failed(C)),
    ])
    # "other" and its joiner were still in flight; "hot" and its joiners were answered (held,
    # unproven), so they are failed without counting as in flight
    assert out.failed_in_flight == 2
    rig = build_joined()
    with pytest.raises(OutOfStep):
        rig.p.receive(r1 + bad)
    rig.p.fail_all(C, "pipeline reset")
    assert rig.reads == {} and rig.joiners == {} and rig.p.inflight == 0


def test_an_error_that_resets_the_stream_is_the_joiners_answer_too() -> None:
    # ERROR to a meta request: its own answer (one outcome), then the stream is reset.
    rig = build_joined()
    with pytest.raises(OutOfStep) as info:
        rig.p.receive(b"ERROR\r\n")
    assert info.value.answered
    assert rig.log == [
        ("A", 0, Failed(Code.UNKNOWN_COMMAND)), ("B", 0, Failed(Code.UNKNOWN_COMMAND)), ("C", 3, Failed(Code.UNKNOWN_COMMAND)),
    ]
    assert rig.p.fail_all(C, "pipeline reset") == 2  # "other" and its joiner
    assert rig.log[3:] == [("A", 1, Failed(C)), ("B", 1, Failed(C))]
    assert rig.reads == {} and rig.joiners == {} and rig.p.inflight == 0


def test_a_server_error_to_a_shared_get_is_every_joiners_answer() -> None:
    r1 = b"SERVER_ERROR out of memory\r\n"
    out = every_way(build_joined, r1 + b"EN O2\r\n" + fence(3))
    e = Err(Code.SERVER_ERROR, "out of memory")
    assert out.log == [("A", 0, e), ("B", 0, e), ("C", 3, e), ("A", 1, [Code.MISS]), ("B", 1, [Code.MISS])]
    assert out.inflight == 0


# --- why a reset: the message names what came and what was due -----------------------------------
# The driver puts OutOfStep's message in every failed request's error ("...; pipeline reset") and
# in the log, so it must say what arrived and what was expected (mutmut survivors of issue 14).


def _get_rig() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])  # mg a v f s O1; the fence takes O2
    rig.seal()
    return rig


def _set_rig() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.SET, b"a", b"hi", 0, 0]])
    rig.seal()
    return rig


def _two_gets_rig() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])  # O1, O2; the fence takes O3
    rig.seal()
    return rig


def _gets_rig() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GETS, b"a"]])  # mg a v f c s O1: its hit must carry c
    rig.seal()
    return rig


def _get_then_version_rig() -> Rig:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"]])
    rig.text("T", [Op.VERSION])
    return rig


def _text_rig() -> Rig:
    rig = Rig()
    rig.text("T", [Op.VERSION])
    return rig


def _fresh_rig() -> Rig:
    return Rig()


@pytest.mark.parametrize(
    ("build", "answer", "says"),
    [
        pytest.param(_fresh_rig, b"EN O1\r\n", ["nothing in flight"], id="nothing-in-flight"),
        pytest.param(_get_rig, va(b"x", 7), ["opaque mismatch", "expected 1", "7"], id="hit-wrong-opaque"),
        pytest.param(_get_rig, b"EN O7\r\n", ["opaque mismatch", "expected 1", "7"], id="miss-wrong-opaque"),
        pytest.param(_two_gets_rig, b"EN O1\r\n" + va(b"x", 7), ["opaque mismatch", "expected 2", "7"], id="second-hit-wrong-opaque"),
        pytest.param(_two_gets_rig, b"EN O1\r\nEN O7\r\n", ["opaque mismatch", "expected 2", "7"], id="second-miss-wrong-opaque"),
        pytest.param(_get_rig, b"VA 2 f0 s9 O1\r\nxy\r\n", ["9", "2 bytes"], id="s-disagrees"),
        pytest.param(_gets_rig, va(b"x", 1), ["unusable", "VALUE", "cas"], id="gets-hit-without-cas"),
        pytest.param(_get_rig, b"EN O1\r\nNS O2\r\n", ["NOT_STORED", "fence"], id="fence-answered-ns"),
        pytest.param(_get_rig, b"EN O1\r\nSERVER_ERROR busy\r\n", ["SERVER_ERROR", "fence"], id="fence-answered-error"),
        pytest.param(_get_rig, b"NS O1\r\n", ["NOT_STORED", "GET"], id="status-never-given-to-mg"),
        pytest.param(_get_rig, b"END\r\n", ["unexpected", "GET"], id="text-reply-to-mg"),
        pytest.param(_get_then_version_rig, b"VA 3 f0 s3 O1\r\nx\r\n\r\nVERSION 1.6.18\r\n", ["VERSION", "CRLF"], id="crlf-value-then-text-reply"),
        pytest.param(_set_rig, b"CLIENT_ERROR bad data chunk\r\n", ["CLIENT_ERROR", "SET"], id="client-error-to-ms"),
        pytest.param(_text_rig, b"HD O1\r\n", ["text command"], id="meta-line-to-text"),
        pytest.param(_text_rig, b"OK\r\n", ["unexpected", "text command"], id="ok-to-version"),
        pytest.param(_get_rig, b"garbage\r\n", ["protocol error"], id="unparsable"),
    ],
)
def test_a_reset_says_what_came_and_what_was_due(build: Callable[[], Rig], answer: bytes, says: list[str]) -> None:
    rig = build()
    with pytest.raises(OutOfStep) as info:
        rig.p.receive(answer)
    message = str(info.value)
    for words in says:
        assert words in message, f"{message!r} should say {words!r}"


# --- the counters the driver reads: unflushed, inflight; a fresh pipeline has nothing to fence ------


def test_a_fresh_pipeline_has_nothing_to_write_or_fence() -> None:
    p = Pipeline(MAX_VALUE)
    p.seal()
    assert bytes(p.out) == b"" and p.seq == 0 and p.unflushed == 0 and p.inflight == 0


def test_unflushed_counts_the_requests_queued_since_the_last_write() -> None:
    # connection.py adds `unflushed` to the requests written when a write goes out
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.meta("B", [[Op.DELETE, b"c"]])
    assert rig.p.unflushed == 3
    rig.seal()
    assert rig.p.unflushed == 3  # the fence is the broker's own, not a request
    rig.p.sent(len(rig.p.out))
    assert rig.p.unflushed == 0
    rig.meta("C", [[Op.GET, b"d"]])
    assert rig.p.unflushed == 1


def test_fail_all_leaves_nothing_to_write_and_nothing_unflushed() -> None:
    rig = Rig()
    rig.meta("A", [[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.seal()
    assert rig.p.fail_all(C, "pipeline reset") == 2
    assert bytes(rig.p.out) == b"" and rig.p.unflushed == 0 and rig.p.inflight == 0
    rig.p.seal()
    assert bytes(rig.p.out) == b""


def test_a_pipeline_without_shared_tables_keeps_its_own_and_tags_as_connection_0() -> None:
    # Pipeline(max_value_len) alone: its reads and joiners tables are its own, its connection 0.
    p = Pipeline(MAX_VALUE)
    log: list[Event] = []
    w = Recorder("A", log)
    p.reads[b"hot"] = tag_of(1, 0)
    p.joiners[tag_of(1, 0)] = [Recorder("B", log), 5]  # a later get of "hot" joined this one
    p.submit(Batch(w, [0], [int(Op.GET)], None, 1, None, [b"hot"]), encode_op(Op.GET, [Op.GET, b"hot"], 1))
    p.inflight += 1  # the joiner, counted in flight as the router counts it
    p.seq = 1
    p.seal()
    assert p.receive(va(b"v", 1) + fence(2)) == 1
    assert log == [("A", 0, [Code.OK, b"v", 0]), ("B", 5, [Code.OK, b"v", 0])]
    assert p.reads == {} and p.joiners == {}, "the answered read leaves the tables (its tag: opaque 1, connection 0)"
    assert p.inflight == 0 and type(p.inflight) is int


def test_error_lines_to_shared_gets_after_other_answers_count_every_answer() -> None:
    # mg hot, mg other (joinable, nobody joined) and a third; in one read: EN, SERVER_ERROR, EN,
    # the fence. Each answered request leaves `inflight` once: 3 requests, 0 left.
    rig = CoalescingRig()
    rig.joiners[tag_of(99, CoalescingRig.CONN_NO)] = [rig.waiter("Z"), 0]  # someone else's read
    rig.gets("A", [b"hot", b"other", b"third"])
    rig.seal()
    assert rig.p.inflight == 3
    answered = rig.p.receive(b"EN O1\r\nSERVER_ERROR busy\r\nEN O3\r\n" + fence(4))
    assert answered == 3
    assert rig.log == [("A", 0, [Code.MISS]), ("A", 1, Err(Code.SERVER_ERROR, "busy")), ("A", 2, [Code.MISS])]
    assert rig.p.inflight == 0 and type(rig.p.inflight) is int
    assert rig.reads == {}
    assert list(rig.joiners) == [tag_of(99, CoalescingRig.CONN_NO)], "another read's joiners stay"


def test_a_reset_by_an_error_line_releases_only_keyed_requests() -> None:
    # A batch whose requests pin no key (keys None) answered by CLIENT_ERROR to ms: nothing to release.
    rig = Rig()
    p = rig.p
    data = encode_op(Op.SET, [Op.SET, b"a", b"hi", 0, 0], 1)
    p.submit(Batch(rig.waiter("A"), [0], [int(Op.SET)], None, 1), data)
    p.seq = 1
    p.seal()
    with pytest.raises(OutOfStep) as info:
        p.receive(b"CLIENT_ERROR bad data chunk\r\n")
    assert info.value.answered
    assert rig.released == []
    assert p.inflight == 0


def test_a_batch_of_plain_gets_is_answered_by_the_fast_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of plain gets, no pinned keys, every read offered for joining: in the fast-path
    run every answer is taken by `take_get_answers`; both runs deliver the same results, each
    proven by the response after it (the last by the fence)."""
    p = Pipeline(MAX_VALUE)
    log: list[Event] = []
    w = Recorder("A", log)
    keys = [b"k%d" % i for i in range(100)]
    p.submit(Batch(w, list(range(100)), [int(Op.GET)] * 100, None, 1, None, list(keys)), meta.encode_gets(keys, 1))
    p.seq = 100
    p.seal()
    taken: list[int] = []
    real = meta.ResponseParser.take_get_answers

    def spy(self: meta.ResponseParser, first: int, limit: int, hit: Any, miss: Any, bare: bool = False) -> list[Any]:
        out = real(self, first, limit, hit, miss, bare)
        taken.append(len(out))
        return out

    monkeypatch.setattr(meta.ResponseParser, "take_get_answers", spy)
    answers = b"".join(va(b"v%d" % i, i + 1, flags=i) if i % 3 else b"EN O%d\r\n" % (i + 1) for i in range(100))
    assert p.receive(answers) == 100
    assert len(log) == 99  # the last waits for its proof
    p.receive(fence(101))
    assert log == [("A", i, [Code.OK, b"v%d" % i, i] if i % 3 else [Code.MISS]) for i in range(100)]
    assert p.inflight == 0 and not p.queue
    assert sum(taken) == (100 if path == "fast path" else 0)
