"""broker/router.py's edges, from a mutation run over the router (docs/mutation.md): the counters
as README.md's stats table and reconciliation define them, the idents replies go to, the bounds at
their exact edges, the per-op path's reads (joining, pins, writes and flush_all closing a read), the
item size rule at its boundary, broadcast errors, and deadlines counted from the first request sent.

Same rig as tests/unit/test_router.py (a dict answering memcached's meta protocol, no process, no
socket); every expected value below is worked out from the inputs and the rule, not read off the
router.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from broker.health import State
from broker.router import SILENT_FAILURE, SMALL_OP_BYTES, SMALL_RESERVE_BYTES
from clientlib.wire import NOREPLY, Code, Op, decode_reply, encode_request
from pool import owners
from test_router import PEER, Memcached, Rig, set_op

pytestmark = pytest.mark.unit

# memcached 1.6's item (limits.py's docstring, from memcached's item header on 64-bit builds):
# 48-byte header + key + NUL + 4 bytes of client flags when not 0 + value + CRLF + 8 bytes of CAS.
HEADER, CAS_BYTES, FLAG_BYTES = 48, 8, 4


class IdentRig(Rig):
    """A rig that records which worker identity each reply is sent to, and can refuse sends (a
    worker gone or not reading)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_to: list[tuple[bytes, int]] = []
        self.accept = True

    def _send(self, peer: Any, ident: bytes, data: bytes) -> bool:
        assert peer is PEER
        if not self.accept:
            return False
        reply = decode_reply(data)
        self.replies.append(reply)
        self.sent_to.append((ident, reply.req_id))
        return True

    def handle(self, ident: bytes, req_id: int, ops: list[list[Any]], flags: int = 0, timeout_ms: int = 0) -> None:
        for s in self.servers:
            s.batch_conn = None
        self.router.handle(PEER, ident, encode_request(req_id, ops, timeout_ms, flags), self.now)


def mg_lines(rig: Rig, key: bytes, name: str | None = None) -> int:
    """How many `mg <key> ...` requests memcached got (the broker's fences excluded)."""
    far = rig.far[name or rig.names[0]]
    return sum(1 for line in far.requests if line.startswith(b"mg " + key + b" "))


def reconciles(rig: Rig) -> None:
    # README, "Nothing lost": once nothing is in flight, frame by frame and op by op.
    s = rig.router.stats
    assert s.frames == s.replies + s.replies_dropped + s.noreply + s.dropped_frames
    assert s.ops == s.ok + s.miss + s.errors + s.timeouts


# --- counters ------------------------------------------------------------------------------------


def test_counters_count_every_result_by_kind_and_reconcile() -> None:
    rig = Rig(1, timeout=0.5)
    server = rig.servers[0]
    server.item_size_max = 1024
    keys = [b"c-%d" % i for i in range(10)]
    stored = rig.frame([set_op(k, b"v") for k in keys])  # 10 sets: 10 ok
    rig.serve()
    many = rig.frame([[Op.GET, k] for k in keys] + [[Op.GET, b"nope-1"], [Op.GET, b"nope-2"]])  # 10 ok, 2 miss
    rig.serve()
    nine = rig.frame([[Op.GET, k] for k in keys[:9]])  # 9 ok
    rig.serve()
    # A set too large for the server (memcached's SERVER_ERROR, the key unlinked), an append too
    # large (refused by the broker with the same error), a hit: 2 server_error, 1 ok.
    mixed = rig.frame([set_op(b"big", b"x" * 2000), [Op.APPEND, keys[0], b"y" * 2000, 0, 0], [Op.GET, keys[1]]])
    rig.serve()
    # Two gets nobody answers before the deadline: 2 timeouts.
    late = rig.frame([[Op.GET, b"late-1"], [Op.DELETE, b"late-2"]], timeout_ms=100)
    rig.router.expire(rig.now + 0.1)
    rig.serve()
    # Two noreply writes: done, never answered.
    rig.frame([set_op(b"q1", b"v")], flags=NOREPLY)
    rig.frame([set_op(b"q2", b"v")], flags=NOREPLY)
    rig.serve()
    assert rig.codes(stored) == [Code.OK] * 10
    assert rig.codes(many) == [Code.OK] * 10 + [Code.MISS] * 2
    assert rig.codes(nine) == [Code.OK] * 9
    assert rig.codes(mixed) == [Code.SERVER_ERROR, Code.SERVER_ERROR, Code.OK]
    assert rig.codes(late) == [Code.TIMEOUT, Code.TIMEOUT]
    s = rig.router.stats
    assert s.frames == 7 and s.replies == 5 and s.noreply == 2
    assert s.ops == 10 + 12 + 9 + 3 + 2 + 1 + 1
    assert (s.ok, s.miss, s.errors, s.timeouts, s.overloaded) == (10 + 10 + 9 + 1 + 1 + 1, 2, 2, 2, 0)
    assert s.by_code[Code.SERVER_ERROR] == 2 and sum(s.by_code) == 2
    reconciles(rig)
    snap = s.snapshot()
    # Requests under the first op of each frame: set 10 + 3 (mixed starts with a set) + 1 + 1,
    # get 12 + 9 + 2 (late starts with a get).
    assert snap["requests_by_op"] == {"set": 15, "get": 23}
    assert snap["errors_by_kind"] == {"server_error": 2}
    assert (snap["frames"], snap["ops"], snap["ok"], snap["miss"], snap["errors"], snap["timeouts"]) == (7, 38, 32, 2, 2, 2)
    assert (snap["noreply"], snap["replies"], snap["replies_dropped"], snap["bad_frames"], snap["dropped_frames"]) == (2, 5, 0, 0, 0)
    assert (snap["overloaded"], snap["internal_errors"], snap["gets_upstream"], snap["gets_coalesced"]) == (0, 0, 12 + 9 + 1 + 1, 0)
    assert "by_op" not in snap and "by_code" not in snap


def test_overloaded_and_down_results_are_counted_as_errors_by_kind() -> None:
    rig = Rig(2, failure_limit=1, max_total=1)
    down = rig.names[1]
    rig.server(down).record_failure(rig.now, "gone")
    keys = [f"o-{i}" for i in range(40)]
    where = owners(rig.names, keys)
    up_keys = [k.encode() for k in keys if where[k] == rig.names[0]][:3]
    down_keys = [k.encode() for k in keys if where[k] == down][:2]
    # One admitted (max_total 1), two refused for the bound, two refused for the down server.
    r = rig.frame([[Op.GET, k] for k in up_keys] + [[Op.DELETE, k] for k in down_keys])
    rig.serve()
    assert rig.codes(r) == [Code.MISS, Code.OVERLOADED, Code.OVERLOADED, Code.SERVER_DOWN, Code.SERVER_DOWN]
    s = rig.router.stats
    assert (s.miss, s.errors, s.overloaded) == (1, 4, 2)
    assert s.snapshot()["errors_by_kind"] == {"overloaded": 2, "server_down": 2}
    reconciles(rig)


def test_replies_go_to_the_worker_identity_that_sent_the_frame() -> None:
    rig = IdentRig(1)
    rig.handle(b"w-ok", 1, [[Op.GET, b"k"], [Op.GET, b"j"]])
    rig.handle(b"w-local", 2, [[Op.PING]])
    rig.router.handle(PEER, b"w-bad", msgpack.packb([1, 3, 0, 0, [[int(Op.GET)]]]), rig.now)
    rig.serve()
    rig.router.draining = True
    rig.handle(b"w-drain", 4, [[Op.GET, b"k"]])
    assert sorted(rig.sent_to) == sorted([(b"w-ok", 1), (b"w-local", 2), (b"w-bad", 3), (b"w-drain", 4)])


def test_replies_a_worker_does_not_take_are_counted_dropped() -> None:
    rig = IdentRig(1)
    rig.accept = False
    rig.handle(b"gone", 1, [[Op.PING]])
    rig.handle(b"gone", 2, [[Op.GET, b"k"]])
    rig.serve()
    s = rig.router.stats
    assert (s.replies, s.replies_dropped) == (0, 2)
    rig.accept = True
    rig.handle(b"back", 3, [[Op.PING]])
    assert (s.replies, s.replies_dropped) == (1, 2)
    reconciles(rig)


def test_frames_over_the_configured_size_are_refused_naming_their_id() -> None:
    rig = Rig(1)
    rig.router.max_frame = 200
    r = rig.frame([set_op(b"k", b"x" * 300)])
    reply = rig.reply(r)
    assert reply.code == Code.BAD_REQUEST and "200" in str(reply.payload)
    assert not rig.far[rig.names[0]].requests
    s = rig.router.stats
    assert (s.frames, s.bad_frames, s.dropped_frames, s.ops) == (1, 1, 0, 0)


def test_each_frame_without_a_readable_id_is_dropped_and_counted() -> None:
    rig = Rig(1)
    for junk in (b"\xc1", b"\xc1\xc1", b""):
        rig.router.handle(PEER, b"w", junk, rig.now)
    s = rig.router.stats
    assert rig.replies == [] and (s.frames, s.bad_frames, s.dropped_frames) == (3, 3, 3)
    reconciles(rig)


def test_noreply_frames_refused_while_draining_are_counted_and_not_answered() -> None:
    rig = Rig(1)
    rig.router.draining = True
    for i in range(3):
        rig.frame([set_op(b"k%d" % i, b"v")], flags=NOREPLY)
    answered = rig.frame([[Op.GET, b"k"]])
    s = rig.router.stats
    assert [x.req_id for x in rig.replies] == [answered] and rig.reply(answered).code == Code.SHUTTING_DOWN
    assert (s.frames, s.noreply, s.replies, s.ops) == (4, 3, 1, 0)
    reconciles(rig)


# --- a single server, or every server, down ---------------------------------------------------------


@pytest.mark.parametrize("ops", [
    [[Op.GET, b"k"]],
    [[Op.GET, b"k"], [Op.GET, b"j"]],
    [set_op(b"k", b"v"), [Op.DELETE, b"j"]],
])
def test_the_only_server_down_refuses_every_key_at_once(ops: list[list[Any]]) -> None:
    rig = Rig(1, failure_limit=1)
    rig.servers[0].record_failure(rig.now, "test: gone")
    r = rig.frame(ops)
    for res in rig.results(r):  # answered on the spot, before any serve()
        assert res[0] == Code.SERVER_DOWN and rig.names[0] in res[1] and "test: gone" in res[1]
    assert not rig.far[rig.names[0]].requests


def test_remap_with_every_server_down_refuses_the_keys() -> None:
    rig = Rig(2, failure_limit=1, remap=True)
    for s in rig.servers:
        s.record_failure(rig.now, "gone")
    r = rig.frame([[Op.GET, b"k"], set_op(b"k", b"v")])
    assert rig.codes(r) == [Code.SERVER_DOWN, Code.SERVER_DOWN]


def test_a_one_get_frame_for_a_healthy_server_goes_while_another_is_down() -> None:
    rig = Rig(2, failure_limit=1)
    rig.server(rig.names[1]).record_failure(rig.now, "gone")
    key = next(k for k, n in owners(rig.names, [f"h-{i}" for i in range(50)]).items() if n == rig.names[0]).encode()
    rig.frame([set_op(key, b"v")])
    rig.serve()
    r = rig.frame([[Op.GET, key]])
    rig.serve()
    assert rig.results(r) == [[Code.OK, b"v", 0]]


# --- reads on the per-op path: joining, pins, writes and flush_all ---------------------------------


def test_gets_in_a_mixed_frame_neither_join_the_reads_in_flight_nor_offer_theirs() -> None:
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([set_op(b"hot", b"v", 3)])
    rig.serve()
    first = rig.frame([[Op.GET, b"hot"]])
    # Not all gets: the per-op path. Only a frame of one get coalesces: hot and cold both go.
    mixed = rig.frame([[Op.GET, b"hot"], set_op(b"x", b"1"), [Op.GET, b"cold"]])
    after = rig.frame([[Op.GET, b"cold"]])  # cold's read in flight is the mixed frame's: not offered
    again = rig.frame([[Op.GET, b"hot"]])  # joins the first frame's read
    # In flight: the first get, the mixed frame's three, cold again, hot joined (fences not counted).
    assert (rig.budget.inflight, server.inflight_n) == (6, 6)
    s = rig.router.stats
    assert (s.gets_upstream, s.gets_coalesced) == (4, 1)
    rig.serve()
    assert rig.results(first) == [[Code.OK, b"v", 3]] == rig.results(again)
    assert rig.results(mixed) == [[Code.OK, b"v", 3], [Code.OK], [Code.MISS]]
    assert rig.results(after) == [[Code.MISS]]
    assert mg_lines(rig, b"hot") == 2 and mg_lines(rig, b"cold") == 2
    assert (rig.budget.inflight, server.inflight_n) == (0, 0)
    assert all(c.pipeline.inflight == 0 for c in server.conns)
    assert server.reads == {} and server.joiners == {} and server.pinned == {}


def test_a_joined_get_that_times_out_names_its_server() -> None:
    rig = Rig(1, connections=2, timeout=1.0)
    server = rig.servers[0]
    rig.frame([[Op.GET, b"hot"]])
    joined = rig.frame([[Op.GET, b"hot"]], timeout_ms=100)
    mixed = rig.frame([[Op.GET, b"cold"], [Op.DELETE, b"x"]], timeout_ms=100)
    assert rig.router.stats.gets_coalesced == 1
    rig.router.expire(rig.now + 0.1)
    res = rig.results(joined) + rig.results(mixed)
    assert [r[0] for r in res] == [Code.TIMEOUT] * 3
    assert all(rig.names[0] in r[1] for r in res)
    assert server.stats.timeouts == 3


def test_a_gets_never_joins_a_plain_get_and_pins_nothing() -> None:
    # A gets asks for the cas, which a plain get's answer does not carry; only writes pin a key.
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([[Op.GET, b"hot"]])
    alone = rig.frame([[Op.GETS, b"hot"]])  # a frame of one op: the one kind that may join
    r = rig.frame([[Op.GETS, b"hot"], set_op(b"x", b"1")])
    assert list(server.pinned) == [b"x"]
    assert rig.router.stats.gets_coalesced == 0
    rig.serve()
    assert mg_lines(rig, b"hot") == 3
    rig.reply(alone)  # answered by its own request
    assert rig.codes(r)[1] == Code.OK


def test_a_write_closes_its_keys_read_to_later_gets() -> None:
    rig = Rig(1, connections=2)
    rig.frame([set_op(b"k", b"old")])
    rig.serve()
    before = rig.frame([[Op.GET, b"k"]])
    write = rig.frame([set_op(b"k", b"new")])
    after = rig.frame([[Op.GET, b"k"]])
    rig.serve()
    assert rig.results(before) == [[Code.OK, b"old", 0]]
    assert rig.codes(write) == [Code.OK]
    assert rig.results(after) == [[Code.OK, b"new", 0]]
    assert mg_lines(rig, b"k") == 2 and rig.router.stats.gets_coalesced == 0


def test_flush_all_closes_the_reads_in_flight() -> None:
    rig = Rig(1, connections=2)
    rig.frame([set_op(b"k", b"v")])
    rig.serve()
    before = rig.frame([[Op.GET, b"k"]])
    rig.frame([[Op.FLUSH_ALL, 0]])
    after = rig.frame([[Op.GET, b"k"]])
    assert rig.router.stats.gets_coalesced == 0
    rig.serve()
    # The later get went to memcached itself (which of the two memcached answers first across
    # connections is memcached's business: a worker waits for flush_all's reply before its get).
    assert rig.codes(before) == [Code.OK] and rig.reply(after).code == Code.OK
    assert mg_lines(rig, b"k") == 2


@pytest.mark.parametrize("flags", [NOREPLY, 0], ids=["noreply", "reply"])
def test_a_read_sent_after_flush_all_waits_behind_a_flush_on_its_own_connection(flags: int) -> None:
    # memcached keeps the order of requests on one connection only, and a worker's next read may
    # go out on either of the server's connections (the one with less in flight): so each of them
    # carries the flush before anything sent after it.
    rig = Rig(1, connections=2)
    rig.frame([set_op(b"k", b"v")])
    rig.serve()
    flush = rig.frame([[Op.FLUSH_ALL, 0]], flags=flags)
    get = rig.frame([[Op.GET, b"k"]])
    streams = []
    for conn in rig.servers[0].conns:
        conn.flush(rig.now)
        streams.append(bytes(conn.sock.written))  # type: ignore[union-attr]
    # protocol.txt: "flush_all [delay]"; a delay of 0 is sent as none.
    assert [s.startswith(b"flush_all\r\n") for s in streams] == [True, True]
    assert sum(b"mg k " in s for s in streams) == 1
    rig.serve()
    assert rig.codes(get) == [Code.MISS]
    if flags:
        assert not [r for r in rig.replies if r.req_id == flush]
    else:
        # One result for the broadcast, once both flushes were answered.
        assert rig.results(flush) == [[Code.OK, {rig.names[0]: True}]]


def test_flush_all_goes_once_on_a_server_with_one_connection() -> None:
    rig = Rig(1, connections=1)
    rig.frame([[Op.FLUSH_ALL, 0]])
    (conn,) = rig.servers[0].conns
    conn.flush(rig.now)
    written = bytes(conn.sock.written)  # type: ignore[union-attr]
    assert written.startswith(b"flush_all\r\n") and written.count(b"flush_all") == 1


def test_a_one_get_of_a_key_with_a_write_in_flight_follows_the_write() -> None:
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([set_op(b"k", b"old")])
    rig.serve()
    rig.frame([set_op(b"k", b"new")])
    conn_w = server.pinned[b"k"][0]
    r = rig.frame([[Op.GET, b"k"]])  # a later turn: the idle connection would be picked
    assert conn_w.pipeline.inflight == 2
    assert all(c.pipeline.inflight == 0 for c in server.conns if c is not conn_w)
    rig.serve()
    assert rig.results(r) == [[Code.OK, b"new", 0]]


def test_a_get_many_of_keys_needing_base64_gets_their_values() -> None:
    rig = Rig(1)
    rig.frame([set_op(b"a b", b"1"), set_op(b"c\td", b"2")])
    rig.serve()
    r = rig.frame([[Op.GET, b"a b"], [Op.GET, b"c\td"], [Op.GET, b"e f"]])
    rig.serve()
    assert rig.results(r) == [[Code.OK, b"1", 0], [Code.OK, b"2", 0], [Code.MISS]]


def test_without_coalescing_every_get_goes_and_nothing_is_left_behind() -> None:
    rig = Rig(1, connections=1)
    rig.router.coalesce = False
    server = rig.servers[0]
    rig.frame([set_op(b"a", b"1")])
    rig.serve()
    r1 = rig.frame([[Op.GET, b"a"]])
    r2 = rig.frame([[Op.GET, b"a"], [Op.GET, b"b"]])
    r3 = rig.frame([[Op.GET, b"a"], set_op(b"c", b"3")])
    rig.serve()
    assert rig.results(r1) == [[Code.OK, b"1", 0]]
    assert rig.results(r2) == [[Code.OK, b"1", 0], [Code.MISS]]
    assert rig.results(r3) == [[Code.OK, b"1", 0], [Code.OK]]
    assert mg_lines(rig, b"a") == 3 and rig.router.stats.gets_coalesced == 0
    assert server.reads == {} and server.joiners == {} and server.inflight_n == 0


def test_reads_of_frames_of_one_get_are_released_when_answered() -> None:
    rig = Rig(1, connections=1)
    server = rig.servers[0]
    rs = [rig.frame([[Op.GET, k]]) for k in (b"a", b"b", b"c")]
    w = rig.frame([set_op(b"d", b"4")])
    assert sorted(server.reads) == [b"a", b"b", b"c"]
    rig.serve()
    assert [rig.codes(r) for r in rs] == [[Code.MISS]] * 3 and rig.codes(w) == [Code.OK]
    assert server.reads == {} and server.joiners == {}
    # And a later get of each is sent, not joined to an answered read.
    later = [rig.frame([[Op.GET, k]]) for k in (b"a", b"b", b"c")]
    rig.serve()
    assert [rig.codes(r) for r in later] == [[Code.MISS]] * 3 and rig.router.stats.gets_coalesced == 0
    assert all(mg_lines(rig, k) == 2 for k in (b"a", b"b", b"c"))


def test_gets_of_one_turn_on_one_connection_each_get_their_own_value() -> None:
    # The fast paths and the per-op path number requests on one connection in one turn: every
    # frame must get its own key's value, whichever path queued it and whoever joined it.
    rig = Rig(1, connections=1)
    keys = [b"s-%d" % i for i in range(8)]
    rig.frame([set_op(k, b"value of " + k) for k in keys])
    rig.serve()
    ids: list[tuple[int, list[bytes]]] = []
    n = 100
    plan = [
        [keys[0]], [keys[1], keys[2]], [keys[3]], [keys[4], None], [keys[5]], [keys[6], keys[7]],
        [keys[1]], [keys[4]], [keys[5]], [keys[7], keys[3]], [keys[2], None], [keys[6]],
    ]
    for ks in plan:
        n += 1
        ops = [[Op.GET, k] if k is not None else set_op(b"w-%d" % n, b"w") for k in ks]
        rig.router.handle(PEER, b"w", encode_request(n, ops), rig.now)  # all in one turn
        ids.append((n, ks))
    rig.serve()
    for req_id, ks in ids:
        assert rig.results(req_id) == [[Code.OK, b"value of " + k, 0] if k is not None else [Code.OK] for k in ks]
    assert rig.servers[0].reads == {} and rig.servers[0].joiners == {} and rig.budget.inflight == 0


# --- an op that cannot be sent does not stop the ops after it ------------------------------------


def test_an_op_memcached_could_not_read_is_a_client_error_and_the_rest_go() -> None:
    # A key needing base64 that is too long once encoded (memcached checks the encoded length):
    # 200 raw bytes -> 268 > 250.
    rig = Rig(1)
    bad = b"a " * 100
    r = rig.frame([set_op(bad, b"v"), [Op.GET, bad], set_op(b"k", b"v"), [Op.GET, b"k"]])
    assert rig.servers[0].pinned.keys() == {b"k"}
    rig.serve()
    res = rig.results(r)
    assert [x[0] for x in res] == [Code.CLIENT_ERROR, Code.CLIENT_ERROR, Code.OK, Code.OK]
    assert "200" in res[0][1] and "200" in res[1][1]  # says how long the key is
    assert rig.servers[0].pinned == {}


def test_no_connection_for_one_servers_key_leaves_the_other_servers_keys_going() -> None:
    rig = Rig(2)
    cut = rig.server(rig.names[1])
    for conn in cut.conns:
        conn.sock = None
        conn.reconnect_at = rig.now + 10
    where = owners(rig.names, [f"n-{i}" for i in range(50)])
    cut_key = next(k for k, n in where.items() if n == rig.names[1]).encode()
    ok_key = next(k for k, n in where.items() if n == rig.names[0]).encode()
    r = rig.frame([[Op.GET, cut_key], set_op(ok_key, b"v"), [Op.GET, ok_key], set_op(cut_key, b"v")])
    rig.serve()
    res = rig.results(r)
    assert [x[0] for x in res] == [Code.CONNECTION_ERROR, Code.OK, Code.OK, Code.CONNECTION_ERROR]
    assert rig.names[1] in res[0][1] and "connecting" in res[0][1]


@pytest.mark.parametrize("ops", [
    [set_op(b"k", b"v")],
    [[Op.GET, b"k"], [Op.GET, b"j"]],
    [[Op.VERSION]],
])
def test_no_connection_and_none_due_to_reconnect_is_an_error_at_once(ops: list[list[Any]]) -> None:
    rig = Rig(1)
    for conn in rig.servers[0].conns:
        conn.sock = None
        conn.reconnect_at = rig.now + 10
    r = rig.frame(ops)
    res = rig.results(r)
    if ops[0][0] == Op.VERSION:
        assert res[0][0] == Code.SERVER_ERROR and rig.names[0] in res[0][1]
    else:
        assert [x[0] for x in res] == [Code.CONNECTION_ERROR] * len(ops)


# --- bounds at their edges -------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["max_conn", "max_server"])
def test_an_op_refused_at_a_per_server_bound_is_told_which_server(bound: str) -> None:
    rig = Rig(1, connections=1, **{bound: 1})  # type: ignore[arg-type]
    r = rig.frame([[Op.GET, b"a"], [Op.DELETE, b"b"]])
    rig.serve()
    res = rig.results(r)
    assert res[1][0] == Code.OVERLOADED and rig.names[0] in res[1][1]


def test_an_op_refused_at_the_brokers_bound_says_so() -> None:
    rig = Rig(1, max_total=1)
    r = rig.frame([[Op.GET, b"a"], [Op.DELETE, b"b"]])
    rig.serve()
    res = rig.results(r)
    assert res[1][0] == Code.OVERLOADED and isinstance(res[1][1], str) and "limit" in res[1][1]


def test_a_large_store_that_reaches_the_buffer_bound_exactly_is_admitted() -> None:
    # "refused once it would take the buffered bytes past max_buffered_bytes": reaching it is not past.
    size = SMALL_OP_BYTES + 1000
    rig = Rig(1, max_buffered=1000 + size)
    rig.budget.buffered = 1000
    r = rig.frame([set_op(b"big", b"x" * size)])
    rig.budget.buffered -= 1000
    rig.serve()
    assert rig.codes(r) == [Code.OK]


def test_a_store_of_exactly_4_kib_is_small_and_keeps_the_reserve() -> None:
    # README: a store of a value *over* 4 KiB is the large kind.
    rig = Rig(1, max_buffered=1000)
    rig.budget.buffered = 1000
    r = rig.frame([set_op(b"edge", b"x" * SMALL_OP_BYTES), set_op(b"over", b"x" * (SMALL_OP_BYTES + 1))])
    rig.budget.buffered -= 1000
    rig.serve()
    assert rig.codes(r) == [Code.OK, Code.OVERLOADED]


def test_a_large_cas_is_a_large_store_for_the_buffer_bound() -> None:
    rig = Rig(1, max_buffered=1000)
    rig.budget.buffered = 1000
    assert rig.budget.buffered < rig.budget.max_buffered + SMALL_RESERVE_BYTES
    r = rig.frame([[Op.CAS, b"k", b"x" * (SMALL_OP_BYTES + 1), 0, 0, 5], [Op.GET, b"k"]])
    rig.budget.buffered -= 1000
    rig.serve()
    assert rig.codes(r) == [Code.OVERLOADED, Code.MISS]


# --- memcached's item size rule, at its boundary ---------------------------------------------------


def item_size(key: bytes, value_len: int, flags: int, cas_enabled: bool) -> int:
    return HEADER + len(key) + 1 + (FLAG_BYTES if flags else 0) + value_len + 2 + (CAS_BYTES if cas_enabled else 0)


@pytest.mark.parametrize("op", [Op.APPEND, Op.ADD, Op.CAS])
@pytest.mark.parametrize("flags", [0, 5])
@pytest.mark.parametrize("cas_enabled", [True, False])
def test_stores_other_than_set_are_refused_exactly_past_the_item_limit(op: Op, flags: int, cas_enabled: bool) -> None:
    limit = 1024
    key = b"key-17"
    fits = limit - item_size(key, 0, flags, cas_enabled)  # the largest value that fits
    rig = Rig(1)
    server = rig.servers[0]
    server.item_size_max = limit
    server.cas_enabled = cas_enabled

    def store(n: int) -> list[Any]:
        base = [op, key, b"x" * n, flags, 0]
        return base + [7] if op == Op.CAS else base

    r = rig.frame([store(fits), store(fits + 1), [Op.GET, b"after"]])
    rig.serve()
    res = rig.results(r)
    assert res[0][0] != Code.SERVER_ERROR
    assert res[1][0] == Code.SERVER_ERROR and str(fits + 1) in res[1][1] and str(limit) in res[1][1]
    assert res[2] == [Code.MISS]  # the refusal does not stop the frame
    sent = [line for line in rig.far[rig.names[0]].requests if line.startswith(b"ms ")]
    assert len(sent) == 1 and sent[0].split()[2] == str(fits).encode()


def test_the_brokers_value_cap_applies_when_below_the_servers_limit() -> None:
    rig = Rig(1)
    rig.router.max_value = 500
    r = rig.frame([set_op(b"at", b"x" * 500), set_op(b"over", b"x" * 501)])
    rig.serve()
    res = rig.results(r)
    assert res[0] == [Code.OK]
    assert res[1][0] == Code.SERVER_ERROR and "too large" in res[1][1]
    store = rig.far[rig.names[0]].store
    assert b"at" in store and b"over" not in store
    rig.router.max_value = 1
    r = rig.frame([set_op(b"one", b"x"), set_op(b"two", b"xy")])
    rig.serve()
    assert [x[0] for x in rig.results(r)] == [Code.OK, Code.SERVER_ERROR]


def test_a_set_of_exactly_the_servers_limit_is_shipped() -> None:
    # The broker unlinks without shipping only a value longer than the limit; memcached decides the rest.
    rig = Rig(1)
    rig.servers[0].item_size_max = 1024
    rig.frame([set_op(b"k", b"x" * 1024)])
    rig.serve()
    assert any(line.startswith(b"ms k 1024") for line in rig.far[rig.names[0]].requests)


# --- broadcasts ------------------------------------------------------------------------------------


def test_a_broadcast_memcached_could_not_read_is_a_client_error_and_the_rest_go() -> None:
    rig = Rig(2)
    r = rig.frame([[Op.STATS, [b"bogus"]], [Op.GET, b"k"], [Op.VERSION]])
    rig.serve()
    res = rig.results(r)
    assert res[0][0] == Code.CLIENT_ERROR and "bogus" in res[0][1]
    assert res[1] == [Code.MISS]
    assert res[2] == [Code.OK, {n: "1.6.18" for n in rig.names}]
    assert not any(line.startswith(b"stats") for far in rig.far.values() for line in far.requests)


def test_a_broadcast_with_the_first_server_down_still_reaches_the_others() -> None:
    rig = Rig(3, failure_limit=1)
    dead = rig.names[0]
    rig.server(dead).record_failure(rig.now, "refused")
    r = rig.frame([[Op.FLUSH_ALL, 0]])
    rig.serve()
    (res,) = rig.results(r)
    assert res[0] == Code.SERVER_ERROR and dead in res[1] and "down" in res[1]
    for name in rig.names[1:]:
        assert b"flush_all" in rig.far[name].requests


def test_a_broadcast_answered_with_errors_fails_naming_the_first_server() -> None:
    # This memcached does not know cache_memlimit: each server answers ERROR.
    rig = Rig(2)
    r = rig.frame([[Op.CACHE_MEMLIMIT, 100]])
    rig.serve()
    (res,) = rig.results(r)
    assert res[0] == Code.SERVER_ERROR and res[1].startswith(rig.names[0] + ":") and "ERROR" in res[1]


class WrongFlush(Memcached):
    def answer(self, data: bytearray) -> bytes:
        if data.startswith(b"flush_all"):
            del data[: data.index(b"\r\n") + 2]
            return b"VERSION 1.6.18\r\n" + super().answer(data)
        return super().answer(data)


def test_a_broadcast_answered_with_the_wrong_kind_of_reply_fails() -> None:
    # protocol.txt: flush_all answers OK; a VERSION line there means the stream is out of step.
    rig = Rig(2, failure_limit=1000)
    wrong = rig.names[1]
    far = WrongFlush()
    rig.far[wrong] = far
    for conn in rig.server(wrong).conns:
        conn.sock.far = far  # type: ignore[union-attr]
    r = rig.frame([[Op.FLUSH_ALL, 0]])
    # flush_all goes on each of the server's two connections, and each is answered wrongly.
    carriers = [c.sock for c in rig.server(wrong).conns if c.pipeline.inflight]
    assert len(carriers) == 2
    rig.serve()
    (res,) = rig.results(r)
    assert res[0] == Code.SERVER_ERROR and wrong in res[1]
    # Out of step (DESIGN.md, the memcached proxy's rule): the connection is reset, not reused.
    assert all(carrier.closed for carrier in carriers)  # type: ignore[union-attr]


def test_a_broadcast_waiting_on_a_server_counts_its_silence_from_when_it_was_sent() -> None:
    rig = Rig(1)
    rig.frame([[Op.VERSION]])
    assert rig.servers[0].silent_for(rig.now + 0.25) == pytest.approx(0.25)


# --- deadlines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ops", [
    [[Op.GET, b"a"]],
    [[Op.GET, b"a"], [Op.GET, b"b"]],
    [[Op.GET, b"a"], [Op.DELETE, b"b"]],
    [[Op.GET, b"a"], [Op.PING]],
])
def test_silence_is_counted_from_the_first_request_sent_not_from_before(ops: list[list[Any]]) -> None:
    # The connection has been idle since start (t = 0): a deadline of 50 ms, under SILENT_FAILURE,
    # is the server being slow, not silent, however long it had nothing to answer.
    rig = Rig(1, failure_limit=1, timeout=0.05)
    server = rig.servers[0]
    assert 0.05 < SILENT_FAILURE
    r = rig.frame(ops)
    rig.router.expire(rig.now + 0.05)
    assert rig.codes(r) == [Code.TIMEOUT if op[0] != Op.PING else Code.OK for op in ops]
    assert server.health.is_up and server.health.failures == 0
    assert server.silent_for(rig.now + 0.05) == pytest.approx(0.05)


def test_a_deadline_missed_after_exactly_the_silence_limit_is_a_failure() -> None:
    # "A deadline missed while the server had answered nothing for this long": this long counts.
    rig = Rig(1, failure_limit=1)
    rig.now = 0.0
    server = rig.servers[0]
    r = rig.frame([[Op.GET, b"a"], [Op.DELETE, b"b"]], timeout_ms=int(SILENT_FAILURE * 1000))
    rig.router.expire(SILENT_FAILURE)
    assert rig.codes(r) == [Code.TIMEOUT, Code.TIMEOUT]
    assert server.health.state is State.DOWN
    # The reason the server went down is told to the next request refused for it.
    (res,) = rig.results(rig.frame([set_op(b"k", b"v")]))
    assert res[0] == Code.SERVER_DOWN and "timed out" in res[1]


def test_a_broadcast_with_no_answer_by_the_deadline_times_out() -> None:
    rig = Rig(2, timeout=0.5)
    r = rig.frame([[Op.VERSION], [Op.GET, b"k"]], timeout_ms=100)
    rig.router.expire(rig.now + 0.1)
    res = rig.results(r)
    assert [x[0] for x in res] == [Code.TIMEOUT, Code.TIMEOUT]


def test_server_timeouts_count_every_op_of_every_expired_frame() -> None:
    rig = Rig(1, timeout=0.05)
    server = rig.servers[0]
    rig.frame([[Op.GET, b"a"], [Op.DELETE, b"b"]])
    rig.frame([[Op.GET, b"c"], [Op.GET, b"d"], [Op.GET, b"e"]])
    rig.router.expire(rig.now + 0.05)
    assert server.stats.timeouts == 5 and rig.router.stats.timeouts == 5


def test_a_mixed_frame_left_unanswered_times_out() -> None:
    rig = Rig(1, timeout=0.5)
    r = rig.frame([[Op.GET, b"a"], set_op(b"b", b"v")])
    assert rig.router.next_deadline() == pytest.approx(rig.now + 0.5)
    rig.router.expire(rig.now + 0.5)
    assert rig.codes(r) == [Code.TIMEOUT, Code.TIMEOUT]


def test_an_answered_frame_is_not_answered_again_at_its_deadline() -> None:
    rig = Rig(1, timeout=0.5)
    local = rig.frame([[Op.PING]])
    got = rig.frame([[Op.GET, b"a"]], timeout_ms=100)
    mixed = rig.frame([[Op.GET, b"a"], set_op(b"b", b"v")], timeout_ms=100)
    rig.serve()
    pending = rig.frame([[Op.GET, b"c"]])  # deadline now + 0.5
    # The answered frames' deadlines come first and are skipped.
    assert rig.router.next_deadline() == pytest.approx(rig.now + 0.5)
    rig.router.expire(rig.now + 1.0)
    for r in (local, got, mixed, pending):
        rig.reply(r)  # exactly one each
    assert rig.codes(pending) == [Code.TIMEOUT]
    assert rig.router.stats.replies == 4
    reconciles(rig)


def test_a_gather_takes_a_run_of_answers_as_answers_one_by_one() -> None:
    # Gather is a Waiter (pipeline.py): deliver_many is the fast path's run of answers, indices and
    # results in step. Today broadcasts go as text commands, one per server, so only this reaches it.
    from broker.router import Gather, Job
    from clientlib.wire import decode_request

    rig = Rig(1)
    names = ["a:1", "b:2", "c:3"]
    ok = Job(rig.router, PEER, b"w", decode_request(encode_request(7, [[Op.VERSION]])), rig.now + 1)
    g = Gather(ok, 0, names)
    g.deliver_many([2, 0], [[Code.OK, "1.6.3"], [Code.OK, "1.6.1"]])
    assert not ok.done and g.pending == 1
    g.deliver_many([1], [[Code.OK, "1.6.2"]])
    assert g.done and rig.results(7) == [[Code.OK, {"a:1": "1.6.1", "b:2": "1.6.2", "c:3": "1.6.3"}]]
    bad = Job(rig.router, PEER, b"w", decode_request(encode_request(8, [[Op.VERSION]])), rig.now + 1)
    g = Gather(bad, 0, names)
    g.deliver_many([0, 1, 2], [[Code.OK, "1.6.1"], [Code.SERVER_ERROR, "busy"], [Code.CONNECTION_ERROR, "reset"]])
    (res,) = rig.results(8)
    assert res[0] == Code.SERVER_ERROR and res[1].startswith("b:2") and "busy" in res[1]


# --- only a frame of one get coalesces: the per-op path's joins, and writes in any frame ----------


def _mg_sent(rig: Rig) -> int:
    return sum(1 for line in rig.far[rig.names[0]].requests if line.startswith(b"mg ") and b"_mcbroker_fence_" not in line)


def test_a_write_in_a_frame_of_several_ops_closes_its_keys_read() -> None:
    # The guarantee: a get that arrives after a write of its key is never answered with a response
    # requested before it. The write here is in a multi-op frame (per-op path, `coalesce` False).
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([set_op(b"k", b"old")])
    rig.serve()
    before = rig.frame([[Op.GET, b"k"]])  # a frame of one get: offers its read
    assert b"k" in server.reads
    write = rig.frame([set_op(b"k", b"new"), [Op.DELETE, b"x"]])
    assert b"k" not in server.reads
    after = rig.frame([[Op.GET, b"k"]])
    rig.serve()
    assert rig.results(before) == [[Code.OK, b"old", 0]]
    assert rig.codes(write)[0] == Code.OK
    assert rig.results(after) == [[Code.OK, b"new", 0]]
    assert rig.router.stats.gets_coalesced == 0
    assert server.reads == {} and server.joiners == {} and server.inflight_n == 0 and rig.budget.inflight == 0


def test_frames_of_one_get_off_the_short_path_join_with_their_bookkeeping() -> None:
    # A key needing base64 takes the per-op path (Router._one_get declines): its read is offered,
    # and a later frame of one get of it joins there (router.py's per-op join).
    rig = Rig(1, connections=2, timeout=1.0)
    server = rig.servers[0]
    rig.frame([set_op(b"a b", b"spaced")])
    rig.serve()
    sent0 = _mg_sent(rig)
    first = rig.frame([[Op.GET, b"a b"]])
    assert list(server.reads) == [b"a b"]
    second = rig.frame([[Op.GET, b"a b"]], timeout_ms=100)
    s = rig.router.stats
    assert (s.gets_upstream, s.gets_coalesced) == (1, 1)
    assert (rig.budget.inflight, server.inflight_n) == (2, 2)
    rig.router.expire(rig.now + 0.1)  # only the joiner's deadline
    (res,) = rig.results(second)
    assert res[0] == Code.TIMEOUT and rig.names[0] in res[1]
    rig.serve()
    assert rig.results(first) == [[Code.OK, b"spaced", 0]]
    assert _mg_sent(rig) - sent0 == 1
    assert (rig.budget.inflight, server.inflight_n) == (0, 0)
    assert all(c.pipeline.inflight == 0 for c in server.conns)
    assert server.reads == {} and server.joiners == {}


def test_a_get_many_of_one_key_off_the_short_path_neither_joins_nor_offers() -> None:
    # README: every key of a get_many goes to memcached and is offered to no one. A GET_MANY of one
    # key that needs base64 leaves Router._all_gets for the per-op path, where len(ops) is 1.
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([set_op(b"a b", b"1"), set_op(b"c d", b"2")])
    rig.serve()
    many_first = rig.frame([[Op.GET_MANY, [b"c d"]]])
    assert server.reads == {}  # not offered
    single_after = rig.frame([[Op.GET, b"c d"]])  # so this one is sent
    single = rig.frame([[Op.GET, b"a b"]])
    many_after = rig.frame([[Op.GET_MANY, [b"a b"]]])  # must not join `single`'s read
    s = rig.router.stats
    assert (s.gets_upstream, s.gets_coalesced) == (4, 0)
    rig.serve()
    assert rig.results(many_first) == [b"2"] and rig.results(many_after) == [b"1"]
    assert rig.results(single_after) == [[Code.OK, b"2", 0]] and rig.results(single) == [[Code.OK, b"1", 0]]
    assert server.reads == {} and server.joiners == {} and server.inflight_n == 0 and rig.budget.inflight == 0


def test_a_failed_connection_fails_a_reads_joiners_and_leaves_no_entry_beside_get_many_batches() -> None:
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([set_op(b"hot", b"v"), set_op(b"b", b"2")])
    rig.serve()
    lead = rig.frame([[Op.GET, b"hot"]])
    many = rig.frame([[Op.GET_MANY, [b"hot", b"b"]]])
    mixed = rig.frame([[Op.GET, b"hot"], [Op.GET, b"b"]])
    joiner = rig.frame([[Op.GET, b"hot"]])
    assert rig.router.stats.gets_coalesced == 1 and len(server.reads) == 1
    tag = server.reads[b"hot"]
    conn = server.conns[tag & 7]
    conn.failed(rig.now, "test: cut", Code.CONNECTION_ERROR)
    assert server.reads == {} and server.joiners == {}
    assert rig.codes(lead) == [Code.CONNECTION_ERROR] and rig.codes(joiner) == [Code.CONNECTION_ERROR]
    again = rig.frame([[Op.GET, b"hot"]])  # not joined to the failed read
    assert rig.router.stats.gets_coalesced == 1
    rig.serve()
    assert rig.results(again) == [[Code.OK, b"v", 0]]
    for r in (many, mixed):
        rig.reply(r)  # answered once, whichever connection it went on
    assert server.reads == {} and server.joiners == {}
    assert server.inflight_n == 0 and rig.budget.inflight == 0
    assert all(c.pipeline.inflight == 0 for c in server.conns)
