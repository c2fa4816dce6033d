"""A loop turn's frames of one plain get bound for one connection go as one batch (Router._get_to,
router.Singles): one FIFO entry, one pass over their answers. Each frame must still get exactly
its own answer, once, whatever else happens to the others: a miss, client flags, an error line, a
deadline, a broken connection, a read joined, answers arriving a byte at a time.

The rig is tests/unit/test_router.py's (a Wire to a scripted memcached that answers as protocol.txt
says); here frames are handled in one turn (the service resets `batch_conn` once per turn).
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.pipeline import _FENCE_OP, Batch
from broker.router import Singles
from clientlib.wire import Code, Op, encode_request
from test_router import PEER, Memcached, Rig, Wire, set_op

pytestmark = pytest.mark.unit


def one_turn(rig: Rig, frames: list[tuple[int, list[list[Any]]]], timeout_ms: int = 0) -> None:
    """Handle each (request id, ops) frame in one loop turn, as the service does."""
    for s in rig.servers:
        s.batch_conn = None
    for req_id, ops in frames:
        rig.router.handle(PEER, b"w%d" % req_id, encode_request(req_id, ops, timeout_ms), rig.now)


def batches(rig: Rig) -> list[Batch]:
    """The batches queued on the first server's only connection, its fences left out."""
    return [b for b in rig.servers[0].conns[0].pipeline.queue if b.ops != [_FENCE_OP]]


def feed(rig: Rig, step: int | None) -> None:
    """Write what the first server's only connection holds; hand it memcached's answers whole
    (step None) or `step` bytes at a time, reading after each piece."""
    conn = rig.servers[0].conns[0]
    conn.flush(rig.now)
    wire: Wire = conn.sock  # type: ignore[assignment]
    answers = wire.far.answer(wire.written)
    for at in range(0, len(answers), step or len(answers)):
        wire.inbox += answers[at : at + (step or len(answers))]
        conn.on_readable(rig.now)


def stored(rig: Rig, values: dict[bytes, tuple[bytes, int]]) -> None:
    rig.far[rig.names[0]].store.update(values)


def mg_lines(rig: Rig) -> list[bytes]:
    return [line for line in rig.far[rig.names[0]].requests if line.startswith(b"mg ")]


def test_a_turns_single_gets_are_one_batch_and_each_frame_gets_its_own_answer() -> None:
    rig = Rig(1, connections=1)
    stored(rig, {b"a": (b"1", 0), b"b": (b"22", 5), b"c": (b"x\r\ny", 0)})
    one_turn(rig, [(1, [[Op.GET, b"a"]]), (2, [[Op.GET, b"nope"]]), (3, [[Op.GET, b"b"]]),
                   (4, [[Op.GET, b"c"]]), (5, [[Op.GET, b"a"]])])
    conn = rig.servers[0].conns[0]
    [batch] = batches(rig)
    assert type(batch.waiter) is Singles and len(batch.waiter.jobs) == 4  # the second get of a joins the first
    assert batch.indices == [0, 1, 2, 3] and batch.reads == [b"a", b"nope", b"b", b"c"]
    assert conn.pipeline.inflight == 5 and rig.budget.inflight == 5
    rig.serve()
    assert rig.results(1) == rig.results(5) == [[Code.OK, b"1", 0]]
    assert rig.results(2) == [[Code.MISS]]
    assert rig.results(3) == [[Code.OK, b"22", 5]]
    assert rig.results(4) == [[Code.OK, b"x\r\ny", 0]]
    assert len(rig.replies) == 5
    # One write: the four gets with consecutive opaques, then the fence.
    assert mg_lines(rig) == [b"mg a v f s O1", b"mg nope v f s O2", b"mg b v f s O3", b"mg c v f s O4",
                             b"mg _mcbroker_fence_ O5"]
    assert conn.pipeline.inflight == 0 and rig.budget.inflight == 0 and rig.servers[0].reads == {}
    s = rig.router.stats
    assert (s.frames, s.ok, s.miss, s.replies, s.gets_upstream, s.gets_coalesced) == (5, 4, 1, 5, 4, 1)
    served = rig.servers[0].stats  # the server's counters count each get of the batch
    assert (served.requests, served.written, served.writes) == (4, 4, 1)


def test_any_other_batch_closes_it_and_the_next_single_get_starts_a_new_one() -> None:
    rig = Rig(1, connections=1)
    stored(rig, {b"a": (b"1", 0), b"z": (b"26", 0)})
    one_turn(rig, [(1, [[Op.GET, b"a"]]), (2, [set_op(b"k", b"new")]), (3, [[Op.GET, b"z"]]),
                   (4, [[Op.GET_MANY, [b"a", b"z"]]]), (5, [[Op.GET, b"q"]]), (6, [[Op.GET, b"k"]])])
    kinds = [type(b.waiter).__name__ for b in batches(rig)]
    # The get of k follows its write in flight on the per-op path (its key is pinned).
    assert kinds == ["Singles", "Job", "Singles", "Job", "Singles", "Job"], kinds
    firsts = [b.first for b in batches(rig)]
    assert firsts == [1, 2, 3, 4, 6, 7], "opaques in queue order, each batch's own consecutive run"
    rig.serve()
    assert rig.results(1) == [[Code.OK, b"1", 0]]
    assert rig.results(2) == [[Code.OK]]
    assert rig.results(3) == [[Code.OK, b"26", 0]]
    assert rig.results(4) == [b"1", b"26"]  # a GET_MANY's bare hits
    assert rig.results(5) == [[Code.MISS]]
    assert rig.results(6) == [[Code.OK, b"new", 0]]
    assert len(rig.replies) == 6 and rig.budget.inflight == 0


def test_a_write_closes_the_batch_so_a_later_get_in_it_never_passes_the_write() -> None:
    # Written in queue order on one connection: a get queued after a set of its key must read the
    # new value, so the set may not slip behind a batch of gets that grows after it.
    rig = Rig(1, connections=1)
    stored(rig, {b"k": (b"old", 0)})
    one_turn(rig, [(1, [[Op.GET, b"k"]]), (2, [set_op(b"k", b"new")]), (3, [[Op.GET, b"k"]])])
    rig.serve()
    assert rig.results(1) == [[Code.OK, b"old", 0]]
    assert rig.results(3) == [[Code.OK, b"new", 0]]


def test_the_batch_stays_open_only_until_the_write_ends_it_with_the_fence() -> None:
    rig = Rig(1, connections=1)
    one_turn(rig, [(1, [[Op.GET, b"a"]]), (2, [[Op.GET, b"b"]])])
    conn = rig.servers[0].conns[0]
    conn.flush(rig.now)  # the write: sealed with the fence
    assert conn.pipeline.open_batch() is None
    one_turn(rig, [(3, [[Op.GET, b"c"]])])
    assert [len(b.indices) for b in batches(rig)] == [2, 1]
    rig.serve()
    assert [rig.codes(i) for i in (1, 2, 3)] == [[Code.MISS]] * 3


@pytest.mark.parametrize("step", [None, 1], ids=["whole", "byte by byte"])
def test_a_frame_past_its_deadline_is_answered_timeout_once_and_the_others_get_their_values(step: int | None) -> None:
    rig = Rig(1, connections=1)
    stored(rig, {b"a": (b"1", 0), b"b": (b"2", 0), b"c": (b"3", 0)})
    one_turn(rig, [(1, [[Op.GET, b"a"]])], timeout_ms=5000)
    one_turn(rig, [(2, [[Op.GET, b"b"]])], timeout_ms=50)
    one_turn(rig, [(3, [[Op.GET, b"c"]])], timeout_ms=5000)
    [batch] = batches(rig)
    assert len(batch.indices) == 3
    rig.now += 0.1
    rig.router.expire(rig.now)
    assert rig.reply(2).payload[0][0] == Code.TIMEOUT
    # Its late answer arrives with the others': dropped, never a second reply. Byte by byte, each
    # answer is taken on its own and waits for the next to prove it.
    feed(rig, step)
    assert rig.results(1) == [[Code.OK, b"1", 0]] and rig.results(3) == [[Code.OK, b"3", 0]]
    assert len(rig.replies) == 3 and rig.budget.inflight == 0 and rig.servers[0].conns[0].pipeline.inflight == 0


def test_a_broken_connection_fails_each_frame_of_the_batch_once() -> None:
    rig = Rig(1, connections=1)
    one_turn(rig, [(i, [[Op.GET, b"k%d" % i]]) for i in (1, 2, 3)])
    conn = rig.servers[0].conns[0]
    conn.flush(rig.now)
    conn.failed(rig.now, "read from memcached: Connection reset by peer", Code.CONNECTION_ERROR)
    for i in (1, 2, 3):
        [result] = rig.results(i)
        assert result[0] == Code.CONNECTION_ERROR and "Connection reset" in result[1]
    assert len(rig.replies) == 3 and rig.budget.inflight == 0 and rig.servers[0].reads == {}


class ServerErrorFor(Memcached):
    """Answers `SERVER_ERROR out of memory` (no opaque: protocol.txt's error lines carry none) to
    gets of one key, as memcached does when it cannot build a value's answer."""

    def __init__(self, key: bytes) -> None:
        super().__init__()
        self.key = key

    def answer(self, data: bytearray) -> bytes:
        out = bytearray()
        for line in bytes(data).split(b"\r\n")[:-1]:
            if line.startswith(b"mg %b " % self.key):
                self.requests.append(line)
                out += b"SERVER_ERROR out of memory\r\n"
            else:
                out += super().answer(bytearray(line + b"\r\n"))
        data.clear()
        return bytes(out)


def test_an_error_line_for_one_get_is_that_frames_alone() -> None:
    rig = Rig(1, connections=1)
    far = ServerErrorFor(b"bad")
    far.store.update({b"a": (b"1", 0), b"b": (b"2", 0)})
    rig.servers[0].conns[0].sock = Wire(far)  # type: ignore[assignment]
    one_turn(rig, [(1, [[Op.GET, b"a"]]), (2, [[Op.GET, b"bad"]]), (3, [[Op.GET, b"b"]])])
    rig.serve()
    assert rig.results(1) == [[Code.OK, b"1", 0]]
    [err] = rig.results(2)
    assert err[0] == Code.SERVER_ERROR and "out of memory" in err[1]
    assert rig.results(3) == [[Code.OK, b"2", 0]]
    assert len(rig.replies) == 3 and rig.servers[0].conns[0].sock is not None, "the stream stayed in step"


@pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "byte by byte", "7 bytes at a time"])
def test_answers_fed_in_pieces_reach_the_same_frames(step: int | None) -> None:
    rig = Rig(1, connections=1)
    stored(rig, {b"a": (b"1", 0), b"b": (b"22", 5), b"c": (b"x\r\nVA 1 f0 s1 O2\r\nz", 0)})
    keys = [b"a", b"nope", b"b", b"c", b"nope2", b"a2"]
    one_turn(rig, [(i + 1, [[Op.GET, k]]) for i, k in enumerate(keys)])
    conn = rig.servers[0].conns[0]
    feed(rig, step)
    want = {1: [[Code.OK, b"1", 0]], 2: [[Code.MISS]], 3: [[Code.OK, b"22", 5]],
            4: [[Code.OK, b"x\r\nVA 1 f0 s1 O2\r\nz", 0]], 5: [[Code.MISS]], 6: [[Code.MISS]]}
    assert {i: rig.results(i) for i in want} == want
    assert len(rig.replies) == 6 and conn.pipeline.inflight == 0 and conn.sock is not None


def test_a_get_in_the_next_turn_joins_a_read_inside_the_batch() -> None:
    rig = Rig(1, connections=1)
    stored(rig, {b"hot": (b"v", 3)})
    one_turn(rig, [(1, [[Op.GET, b"x"]]), (2, [[Op.GET, b"hot"]]), (3, [[Op.GET, b"y"]])])
    rig.servers[0].conns[0].flush(rig.now)
    one_turn(rig, [(4, [[Op.GET, b"hot"]])])  # written already: joins the read, nothing more sent
    rig.serve()
    assert rig.results(2) == rig.results(4) == [[Code.OK, b"v", 3]]
    assert [line for line in mg_lines(rig) if line.startswith(b"mg hot")] == [b"mg hot v f s O2"]
    assert rig.router.stats.gets_coalesced == 1 and rig.budget.inflight == 0 and rig.servers[0].joiners == {}


def test_with_coalescing_off_the_batch_offers_no_reads() -> None:
    rig = Rig(1, connections=1)
    rig.router.coalesce = False
    one_turn(rig, [(1, [[Op.GET, b"a"]]), (2, [[Op.GET, b"a"]])])
    [batch] = batches(rig)
    assert batch.reads is None and batch.indices == [0, 1]
    assert rig.servers[0].reads == {}
    rig.serve()
    assert rig.codes(1) == rig.codes(2) == [Code.MISS]
    assert rig.router.stats.gets_upstream == 2


def test_a_get_that_others_may_join_never_goes_into_a_batch_that_offers_no_reads() -> None:
    # coalesce_reads changed by a reload between two frames of one turn: the joinable get's answer
    # must clear its entry in the read table, which only a batch that carries reads does.
    rig = Rig(1, connections=1)
    rig.router.coalesce = False
    one_turn(rig, [(1, [[Op.GET, b"a"]])])
    rig.router.coalesce = True
    one_turn(rig, [(2, [[Op.GET, b"b"]])])
    assert [b.reads for b in batches(rig)] == [None, [b"b"]]
    rig.serve()
    assert rig.codes(1) == rig.codes(2) == [Code.MISS]
    assert rig.servers[0].reads == {}, "no read left open for later gets to join"


def test_a_get_whose_opaque_does_not_run_on_from_the_batch_starts_its_own() -> None:
    # A batch's request j carries opaque first + j. Should anything ever take an opaque without
    # queueing a request (nothing does today), the next get must not join the batch under an
    # opaque that is not its place: it goes as a batch of its own, and both are answered.
    rig = Rig(1, connections=1)
    stored(rig, {b"a": (b"1", 0), b"b": (b"2", 0)})
    one_turn(rig, [(1, [[Op.GET, b"a"]])])
    conn = rig.servers[0].conns[0]
    conn.pipeline.seq += 1  # an opaque taken and never written
    rig.router.handle(PEER, b"w2", encode_request(2, [[Op.GET, b"b"]]), rig.now)
    assert [(b.first, len(b.indices)) for b in batches(rig)] == [(1, 1), (3, 1)]
    rig.serve()
    assert rig.results(1) == [[Code.OK, b"1", 0]] and rig.results(2) == [[Code.OK, b"2", 0]]
    assert conn.sock is not None and rig.budget.inflight == 0
