"""broker/router.py with broker/connection.py's Server and Connection, no process and no socket.

The seam: a Connection drives whatever object sits in `conn.sock` (send / recv_into / fileno /
close), and a Server asks its `io` (watch / unwatch / dirty) for the loop. Here `sock` is a
`Wire` whose far end is `Memcached` below, a few lines answering the meta requests the broker
writes as memcached 1.6 answers them (doc/protocol.txt):

    mg <key> v f s O<n>   ->  VA <size> f<flags> s<size> O<n> + data  |  EN O<n>
    mg <key> O<n>         ->  HD O<n> | EN O<n>        (the fence that ends every write)
    ms <key> <size> ... F<flags> ... O<n> + data  ->  HD O<n>
    md <key> O<n>         ->  HD O<n> | NF O<n>
    stats / version / flush_all  ->  END / VERSION 1.6.18 / OK

Replies to the worker are decoded from what the router hands to its `send`. The rules checked are
the ones README.md and router.py state: placement by the configured hash (pymemcache's HashClient
for rendezvous), bounds answered at once with OVERLOADED in frame order, marked-down servers
refused (or remapped), one result per op and one reply per frame, broadcasts that fail naming
the failing server, deadlines that answer TIMEOUT and count a failure only for a silent server,
reads that follow their key's write in flight onto its connection, and drain.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from broker.connection import READY, Budget, Server
from broker.health import Health, State
from broker.router import SILENT_FAILURE, Router
from broker.shard import make_placement
from clientlib.address import parse_server
from clientlib.wire import NOREPLY, Code, Op, ReplyFrame, decode_reply, encode_request
from pool import owners

pytestmark = pytest.mark.unit

PEER = object()


class Memcached:
    """The far end: a dict, answering whole request lines (and data blocks) in order."""

    def __init__(self) -> None:
        self.store: dict[bytes, tuple[bytes, int]] = {}
        self.requests: list[bytes] = []

    def answer(self, data: bytearray) -> bytes:
        out = bytearray()
        while data:
            end = data.index(b"\r\n")
            line = bytes(data[:end])
            del data[: end + 2]
            self.requests.append(line)
            words = line.split()
            opaque = next((w for w in words if w.startswith(b"O")), b"")
            tail = b" " + opaque if opaque else b""
            cmd, args = words[0], words[1:]
            if cmd == b"mg":
                item = self.store.get(args[0])
                if item is None:
                    out += b"EN" + tail + b"\r\n"
                elif b"v" in args:
                    value, flags = item
                    out += b"VA %d f%d s%d%s\r\n%s\r\n" % (len(value), flags, len(value), tail, value)
                else:
                    out += b"HD" + tail + b"\r\n"
            elif cmd == b"ms":
                size = int(args[1])
                value = bytes(data[:size])
                del data[: size + 2]
                flags = next((int(w[1:]) for w in args[2:] if w.startswith(b"F")), 0)
                self.store[args[0]] = (value, flags)
                out += b"HD" + tail + b"\r\n"
            elif cmd == b"md":
                out += (b"HD" if self.store.pop(args[0], None) else b"NF") + tail + b"\r\n"
            elif cmd == b"stats":
                out += b"STAT curr_items %d\r\nEND\r\n" % len(self.store)
            elif cmd == b"version":
                out += b"VERSION 1.6.18\r\n"
            elif cmd == b"flush_all":
                self.store.clear()
                out += b"OK\r\n"
            else:
                out += b"ERROR\r\n"
        return bytes(out)


class Wire:
    """What a Connection needs of its socket; what it writes is answered by `far` on `serve()`."""

    _fds = iter(range(1000, 1 << 30))

    def __init__(self, far: Memcached) -> None:
        self.far = far
        self.written = bytearray()
        self.inbox = bytearray()
        self.closed = False
        self._fd = next(self._fds)

    def fileno(self) -> int:
        return self._fd

    def send(self, data: Any) -> int:
        self.written += data
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        if not self.inbox:
            raise BlockingIOError
        n = min(len(buf), len(self.inbox))
        buf[:n] = self.inbox[:n]
        del self.inbox[:n]
        return n

    def close(self) -> None:
        self.closed = True


class Loop:
    """The IO protocol a Server needs (the service's role), recording what it was asked."""

    def __init__(self) -> None:
        self.dirty_conns: list[Any] = []

    def watch(self, conn: Any) -> None:
        pass

    def unwatch(self, conn: Any) -> None:
        pass

    def dirty(self, conn: Any) -> None:
        self.dirty_conns.append(conn)


class Rig:
    def __init__(
        self,
        n_servers: int = 1,
        *,
        connections: int = 2,
        hash: str = "rendezvous",
        remap: bool = False,
        failure_limit: int = 3,
        max_conn: int = 1000,
        max_server: int = 1000,
        max_total: int = 1000,
        max_buffered: int = 1 << 24,
        timeout: float = 1.0,
    ) -> None:
        self.names = [f"127.0.0.1:{11211 + i}" for i in range(n_servers)]
        self.loop = Loop()
        self.budget = Budget(max_total, max_buffered)
        self.replies: list[ReplyFrame] = []
        self.router = Router(
            budget=self.budget, send=self._send, default_timeout=timeout, max_frame=1 << 22, max_value=0,
            remap=remap, local=lambda op: "PONG" if op == Op.PING else {"local": True},
        )
        self.far = {name: Memcached() for name in self.names}
        self.servers: list[Server] = []
        for name in self.names:
            server = Server(
                parse_server(name), connections=connections, io=self.loop, budget=self.budget,
                health=Health(failure_limit, 0.1, 30.0), max_inflight_conn=max_conn, max_inflight_server=max_server,
                on_down=self.router.refresh_down,
            )
            for conn in server.conns:  # connected, as after `open` and the connect's completion
                conn.sock = Wire(self.far[name])  # type: ignore[assignment]
                conn.state = READY
            self.servers.append(server)
        self.router.set_servers(self.servers, make_placement(hash, [(s.address.hash_key, 1) for s in self.servers]))
        self.now = 100.0
        self.req_id = 0

    def _send(self, peer: Any, ident: bytes, data: bytes) -> bool:
        assert peer is PEER
        self.replies.append(decode_reply(data))
        return True

    def server(self, name: str) -> Server:
        return self.servers[self.names.index(name)]

    def frame(self, ops: list[list[Any]], timeout_ms: int = 0, flags: int = 0) -> int:
        """One worker frame handled in a fresh loop turn; returns its request id."""
        self.req_id += 1
        for s in self.servers:
            s.batch_conn = None  # what the service does at the start of each turn
        self.router.handle(PEER, b"worker", encode_request(self.req_id, ops, timeout_ms, flags), self.now)
        return self.req_id

    def serve(self) -> None:
        """Write what is queued, let memcached answer everything it got, read the answers."""
        for s in self.servers:
            for conn in s.conns:
                if conn.sock is None:
                    continue
                conn.flush(self.now)
                wire: Wire = conn.sock  # type: ignore[assignment]
                wire.inbox += wire.far.answer(wire.written)
                conn.on_readable(self.now)

    def reply(self, req_id: int) -> ReplyFrame:
        found = [r for r in self.replies if r.req_id == req_id]
        assert len(found) == 1, f"{len(found)} replies to request {req_id}"
        return found[0]

    def results(self, req_id: int) -> list[list[Any]]:
        r = self.reply(req_id)
        assert r.code == Code.OK, r
        return list(r.payload)

    def codes(self, req_id: int) -> list[int]:
        return [r[0] for r in self.results(req_id)]

    def conn_of(self, server: Server, line_prefix: bytes) -> int:
        """Which of the server's connections carried the request line starting with `line_prefix`."""
        hits = [i for i, c in enumerate(server.conns) if c.sock is not None and any(
            line.startswith(line_prefix) for line in c.sock.far.requests  # type: ignore[union-attr]
        )]
        return hits[0] if len(hits) == 1 else -1


def set_op(key: bytes, value: bytes, flags: int = 0) -> list[Any]:
    return [Op.SET, key, value, flags, 0]  # wire: key, value, client flags, exptime


# --- one server: results, batching, reply once ----------------------------------------------------


def test_set_then_get_round_trip_with_one_reply_per_frame() -> None:
    rig = Rig()
    w = rig.frame([set_op(b"a", b"1", 5), set_op(b"b", b"22")])
    rig.serve()
    assert rig.results(w) == [[Code.OK], [Code.OK]]
    r = rig.frame([[Op.GET, b"a"], [Op.GET, b"missing"], [Op.GET, b"b"]])
    assert rig.replies[-1].req_id == w  # nothing answered before memcached did
    rig.serve()
    assert rig.results(r) == [[Code.OK, b"1", 5], [Code.MISS], [Code.OK, b"22", 0]]
    assert len(rig.replies) == 2
    assert rig.budget.inflight == 0 and rig.servers[0].inflight == 0
    s = rig.router.stats
    assert (s.frames, s.ops, s.ok, s.miss, s.replies) == (2, 5, 4, 1, 2)


def test_a_turns_requests_go_to_one_connection_in_one_write() -> None:
    rig = Rig(connections=2)
    a = rig.frame([[Op.GET, b"x"]])
    rig.router.handle(PEER, b"w2", encode_request(99, [[Op.GET, b"y"]]), rig.now)  # same turn
    used = [c for c in rig.servers[0].conns if c.pipeline.inflight]
    assert len(used) == 1 and used[0].pipeline.inflight == 2
    # The next turn takes the idle connection.
    b = rig.frame([[Op.GET, b"z"]])
    assert sorted(c.pipeline.inflight for c in rig.servers[0].conns) == [1, 2]
    rig.serve()
    assert rig.codes(a) == rig.codes(b) == rig.codes(99) == [Code.MISS]


def test_a_get_many_neither_joins_the_reads_in_flight_nor_offers_its_own() -> None:
    # Read coalescing (README) is for frames of one get: every key of a get_many goes to memcached
    # (joining cost the broker more than it saved: bench/README, thirteenth round).
    rig = Rig(connections=2)
    rig.frame([set_op(b"a", b"1"), set_op(b"b", b"2", 7), set_op(b"c", b"3")])
    rig.serve()
    one = rig.frame([[Op.GET, b"a"]])
    many = rig.frame([[Op.GET, b"c"], [Op.GET, b"a"], [Op.GET, b"d"], [Op.GET, b"b"], [Op.GET, b"c"]])
    later_c = rig.frame([[Op.GET, b"c"]])  # only the get_many reads c: not offered, so sent
    later_a = rig.frame([[Op.GET, b"a"]])  # the first frame's get of a is in flight: joined
    rig.serve()
    assert rig.results(one) == [[Code.OK, b"1", 0]] == rig.results(later_a)
    assert rig.results(many) == [[Code.OK, b"3", 0], [Code.OK, b"1", 0], [Code.MISS], [Code.OK, b"2", 7], [Code.OK, b"3", 0]]
    assert rig.results(later_c) == [[Code.OK, b"3", 0]]
    sent = [line.split()[1] for line in rig.far[rig.names[0]].requests if line.startswith(b"mg ") and b"_mcbroker_fence_" not in line]
    assert sorted(sent) == [b"a", b"a", b"b", b"c", b"c", b"c", b"d"]
    s = rig.router.stats
    assert (s.gets_upstream, s.gets_coalesced) == (7, 1)
    server = rig.servers[0]
    assert rig.budget.inflight == 0 and server.inflight_n == 0 and all(c.pipeline.inflight == 0 for c in server.conns)
    assert server.reads == {} and server.joiners == {}


def test_a_get_many_over_three_servers_goes_one_batch_per_server_and_reads_every_key() -> None:
    rig = Rig(3, connections=2)
    keys = [f"m-{i}" for i in range(40)]
    rig.frame([set_op(k.encode(), k.encode(), i) for i, k in enumerate(keys)])
    rig.serve()
    a = rig.frame([[Op.GET, k.encode()] for k in keys[:30]])
    b = rig.frame([[Op.GET, k.encode()] for k in keys[10:]])  # keys 10..29 are being read: read again
    rig.serve()
    assert rig.results(a) == [[Code.OK, k.encode(), i] for i, k in enumerate(keys[:30])]
    assert rig.results(b) == [[Code.OK, k.encode(), i + 10] for i, k in enumerate(keys[10:])]
    where = owners(rig.names, keys)
    for name in rig.names:
        sent = [line.split()[1].decode() for line in rig.far[name].requests if line.startswith(b"mg m-")]
        assert sorted(sent) == sorted(k for k in keys[:30] + keys[10:] if where[k] == name)  # where it lives
    s = rig.router.stats
    assert (s.gets_upstream, s.gets_coalesced) == (60, 0)
    assert rig.budget.inflight == 0
    for server in rig.servers:
        assert server.inflight_n == 0 and server.reads == {} and server.joiners == {}


def test_noreply_frame_gets_no_reply_but_its_write_is_done() -> None:
    rig = Rig()
    rig.frame([set_op(b"k", b"v")], flags=NOREPLY)
    rig.serve()
    assert rig.replies == [] and rig.router.stats.noreply == 1
    assert rig.far[rig.names[0]].store[b"k"] == (b"v", 0)


def test_local_ops_answer_at_once_without_memcached() -> None:
    rig = Rig()
    r = rig.frame([[Op.PING], [Op.BROKER_STATS]])
    assert rig.results(r) == [[Code.OK, "PONG"], [Code.OK, {"local": True}]]
    assert all(not s.requests for s in rig.far.values())


def test_bad_frame_with_a_request_id_gets_bad_request_and_without_one_is_dropped() -> None:
    import msgpack

    rig = Rig()
    # Version 1, request 41, a GET without its key: the id is readable, so the worker is told.
    rig.router.handle(PEER, b"w", msgpack.packb([1, 41, 0, 0, [[int(Op.GET)]]]), rig.now)
    rig.router.handle(PEER, b"w", b"\xc1 not msgpack", rig.now)
    (reply,) = rig.replies
    assert reply.req_id == 41 and reply.code == Code.BAD_REQUEST and "GET" in str(reply.payload)
    s = rig.router.stats
    assert (s.bad_frames, s.dropped_frames, s.ops) == (2, 1, 0)
    assert all(not far.requests for far in rig.far.values())


# --- placement -------------------------------------------------------------------------------------


def test_keys_go_to_the_server_pymemcache_hashclient_picks() -> None:
    rig = Rig(3)
    keys = [f"place-{i}" for i in range(60)]
    rig.frame([set_op(k.encode(), b"v") for k in keys])
    rig.serve()
    expected = owners(rig.names, keys)
    for k in keys:
        holders = [n for n in rig.names if k.encode() in rig.far[n].store]
        assert holders == [expected[k]], k
    assert len(set(expected.values())) == 3


def test_multi_key_get_is_split_per_server_and_merged_in_frame_order() -> None:
    rig = Rig(3)
    keys = [b"m-%d" % i for i in range(30)]
    w = rig.frame([set_op(k, k + b"!") for k in keys])
    rig.serve()
    assert rig.codes(w) == [Code.OK] * 30
    r = rig.frame([[Op.GET, k] for k in keys])
    assert sum(1 for s in rig.servers for c in s.conns if c.pipeline.inflight) == 3
    rig.serve()
    assert rig.results(r) == [[Code.OK, k + b"!", 0] for k in keys]


def test_a_down_server_refuses_its_keys_and_the_others_still_answer() -> None:
    rig = Rig(2, failure_limit=1)
    keys = [f"d-{i}" for i in range(20)]
    down_name = rig.names[1]
    rig.server(down_name).record_failure(rig.now, "test: gone")
    assert rig.router.down == frozenset({1})
    r = rig.frame([[Op.GET, k.encode()] for k in keys])
    rig.serve()
    where = owners(rig.names, keys)
    for k, res in zip(keys, rig.results(r)):
        if where[k] == down_name:
            assert res[0] == Code.SERVER_DOWN and down_name in res[1] and "test: gone" in res[1]
        else:
            assert res == [Code.MISS]


def test_remap_sends_a_down_servers_keys_to_the_next_choice() -> None:
    rig = Rig(2, failure_limit=1, remap=True)
    rig.server(rig.names[1]).record_failure(rig.now, "gone")
    keys = [b"r-%d" % i for i in range(20)]
    w = rig.frame([set_op(k, b"v") for k in keys])
    rig.serve()
    assert rig.codes(w) == [Code.OK] * 20
    assert set(rig.far[rig.names[0]].store) == set(keys)


# --- admission: bounds are exact, in frame order ----------------------------------------------------


@pytest.mark.parametrize("bound", ["max_conn", "max_server", "max_total"])
@pytest.mark.parametrize("op", [Op.GET, Op.DELETE])
def test_each_in_flight_bound_admits_exactly_its_limit_in_frame_order(bound: str, op: Op) -> None:
    rig = Rig(1, connections=1, **{bound: 7})  # type: ignore[arg-type]
    r = rig.frame([[op, b"k-%d" % i] for i in range(10)])
    assert rig.budget.inflight == 7
    rig.serve()
    codes = rig.codes(r)
    assert codes[7:] == [Code.OVERLOADED] * 3
    assert all(c != Code.OVERLOADED for c in codes[:7])
    assert rig.budget.inflight == 0 and rig.router.stats.overloaded == 3


@pytest.mark.parametrize("bound", ["max_conn", "max_server", "max_total"])
@pytest.mark.parametrize("n_servers", [1, 3])
def test_each_bound_holds_for_frames_of_one_get(bound: str, n_servers: int) -> None:
    # One-get frames take their own short path (Router._one_get); the bounds must hold there too.
    rig = Rig(n_servers, connections=1, **{bound: 7})  # type: ignore[arg-type]
    server = rig.servers[0]
    place = owners(rig.names, [f"k-{i}" for i in range(200)])
    keys = [k.encode() for k, name in place.items() if name == rig.names[0]][:10]
    ids = [rig.frame([[Op.GET, k]]) for k in keys]  # each in a turn of its own, none answered yet
    assert rig.budget.inflight == 7 and server.inflight_n == 7
    rig.serve()
    assert [rig.codes(i)[0] for i in ids] == [Code.MISS] * 7 + [Code.OVERLOADED] * 3
    assert rig.budget.inflight == 0 and rig.router.stats.overloaded == 3


def test_frames_of_one_get_join_the_read_in_flight_and_odd_keys_still_go() -> None:
    rig = Rig(1, connections=2)
    rig.frame([set_op(b"hot", b"v", 3), set_op(b"a b", b"spaced")])
    rig.serve()
    first = rig.frame([[Op.GET, b"hot"]])
    # Same turn and later turns, until the answer is in: all join the first get.
    rig.router.handle(PEER, b"w2", encode_request(900, [[Op.GET, b"hot"]]), rig.now)
    joined = rig.frame([[Op.GET, b"hot"]])
    odd = rig.frame([[Op.GET, b"a b"]])  # goes base64-encoded, on the per-op path
    rig.serve()
    assert rig.results(first) == rig.results(900) == rig.results(joined) == [[Code.OK, b"v", 3]]
    assert rig.results(odd) == [[Code.OK, b"spaced", 0]]
    sent = [line for line in rig.far[rig.names[0]].requests if line.startswith(b"mg ") and b"_mcbroker_fence_" not in line]
    assert len([line for line in sent if line.startswith(b"mg hot ")]) == 1
    s = rig.router.stats
    assert (s.gets_upstream, s.gets_coalesced) == (2, 2)
    assert rig.servers[0].reads == {} and rig.servers[0].joiners == {} and rig.budget.inflight == 0


def test_a_refused_write_leaves_no_pin_behind() -> None:
    rig = Rig(1, connections=1, max_conn=1)
    rig.frame([[Op.GET, b"first"], set_op(b"w", b"v")])
    assert rig.servers[0].pinned == {}


def test_buffer_bound_refuses_at_once() -> None:
    from broker.router import SMALL_OP_BYTES, SMALL_RESERVE_BYTES

    rig = Rig(1, max_buffered=1000)
    rig.budget.buffered = 1000
    # At the bound a large store is refused, while small requests still have the reserve above it.
    big = set_op(b"big", b"x" * (SMALL_OP_BYTES + 1))
    r = rig.frame([big, [Op.GET, b"k"], set_op(b"small", b"v")])
    rig.serve()
    assert rig.codes(r) == [Code.OVERLOADED, Code.MISS, Code.OK]
    # A large store that would pass the bound is refused even below it.
    rig2 = Rig(1, max_buffered=1000 + SMALL_OP_BYTES)
    rig2.budget.buffered = 1000
    assert rig2.codes(rig2.frame([big])) == [Code.OVERLOADED]
    # Past the reserve, everything is refused.
    rig3 = Rig(1, max_buffered=1000)
    rig3.budget.buffered = 1000 + SMALL_RESERVE_BYTES
    assert rig3.codes(rig3.frame([[Op.GET, b"k"]])) == [Code.OVERLOADED]


# --- key pinning -----------------------------------------------------------------------------------


def test_a_read_follows_its_keys_write_in_flight_onto_that_connection() -> None:
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    w = rig.frame([[Op.GET, b"other"], set_op(b"pinned", b"new")])
    assert list(server.pinned) == [b"pinned"]
    conn_a = server.pinned[b"pinned"][0]
    # A later turn: a fresh read would take the idle connection; the pinned key's read does not.
    r = rig.frame([[Op.GET, b"pinned"], [Op.GET, b"fresh"]])
    assert conn_a.pipeline.inflight == 3  # other, the pinned write, the pinned read (fences uncounted)
    other = [c for c in server.conns if c is not conn_a][0]
    assert other.pipeline.inflight == 1  # "fresh" went to the idle connection
    rig.serve()
    assert rig.results(r)[0] == [Code.OK, b"new", 0]
    assert rig.codes(w) == [Code.MISS, Code.OK]
    assert server.pinned == {}  # answered: the pin is released


def test_two_writes_to_a_key_keep_one_pin_until_both_are_answered() -> None:
    rig = Rig(1, connections=2)
    server = rig.servers[0]
    rig.frame([set_op(b"k", b"1")])
    rig.frame([set_op(b"k", b"2")])
    assert server.pinned[b"k"][1] == 2
    assert sum(1 for c in server.conns if c.pipeline.inflight) == 1
    rig.serve()
    assert server.pinned == {} and rig.far[rig.names[0]].store[b"k"][0] == b"2"


# --- broadcasts --------------------------------------------------------------------------------------


def test_broadcast_gathers_every_servers_answer_by_name() -> None:
    rig = Rig(2)
    r = rig.frame([[Op.VERSION], [Op.STATS, []], [Op.FLUSH_ALL, 0]])
    rig.serve()
    res = rig.results(r)
    assert res[0] == [Code.OK, {n: "1.6.18" for n in rig.names}]
    assert res[1][0] == Code.OK and set(res[1][1]) == set(rig.names)
    assert res[2][0] == Code.OK


@pytest.mark.parametrize("op", [[Op.VERSION], [Op.STATS, []], [Op.FLUSH_ALL, 0]])
def test_broadcast_with_one_server_down_fails_naming_it(op: list[Any]) -> None:
    rig = Rig(2, failure_limit=1)
    dead = rig.names[1]
    rig.server(dead).record_failure(rig.now, "refused")
    r = rig.frame([op])
    rig.serve()
    (res,) = rig.results(r)
    assert res[0] == Code.SERVER_ERROR and dead in res[1] and rig.names[0] not in res[1]


def test_broadcast_with_a_connection_failing_under_it_fails_naming_that_server() -> None:
    rig = Rig(2, failure_limit=1000)
    r = rig.frame([[Op.FLUSH_ALL, 0]])
    bad = rig.server(rig.names[0])
    for conn in bad.conns:
        if conn.pipeline.inflight:
            conn.failed(rig.now, "connection reset by peer", Code.CONNECTION_ERROR)
    rig.serve()
    (res,) = rig.results(r)
    assert res[0] == Code.SERVER_ERROR and rig.names[0] in res[1] and "reset" in res[1]
    assert rig.far[rig.names[1]].requests  # the other server still got its flush_all


def test_ops_before_a_broadcast_are_sent_before_it() -> None:
    rig = Rig(1)
    r = rig.frame([set_op(b"k", b"v"), [Op.FLUSH_ALL, 0], [Op.GET, b"k"]])
    rig.serve()
    assert rig.codes(r) == [Code.OK, Code.OK, Code.MISS]
    lines = [x.split()[0] for x in rig.far[rig.names[0]].requests]
    assert lines.index(b"ms") < lines.index(b"flush_all") < len(lines) - 1 - lines[::-1].index(b"mg")


# --- deadlines -----------------------------------------------------------------------------------------


def test_deadline_answers_timeout_for_what_is_pending_and_keeps_what_arrived() -> None:
    rig = Rig(2, timeout=0.5)
    keys = [f"t-{i}" for i in range(10)]
    where = owners(rig.names, keys)
    slow = rig.names[1]
    r = rig.frame([[Op.GET, k.encode()] for k in keys], timeout_ms=200)
    # Only the first server answers.
    fast = rig.server(rig.names[0])
    for conn in fast.conns:
        conn.flush(rig.now)
        wire = conn.sock
        wire.inbox += wire.far.answer(wire.written)  # type: ignore[union-attr]
        conn.on_readable(rig.now)
    assert rig.router.next_deadline() == pytest.approx(rig.now + 0.2)
    rig.router.expire(rig.now + 0.199)
    assert not any(x.req_id == r for x in rig.replies)
    rig.router.expire(rig.now + 0.2)
    for k, res in zip(keys, rig.results(r)):
        if where[k] == slow:
            assert res[0] == Code.TIMEOUT and slow in res[1]
        else:
            assert res == [Code.MISS]
    assert rig.router.next_deadline() is None
    # The late answers are swallowed: no second reply.
    rig.serve()
    assert len([x for x in rig.replies if x.req_id == r]) == 1
    assert rig.budget.inflight == 0


def test_answered_frames_let_go_of_their_values_while_an_older_frame_waits_for_its_deadline() -> None:
    # The deadline heap keeps a frame until its deadline, or until it reaches the top answered: a
    # frame stuck on a silent server holds every later frame in the heap. Those must not hold
    # their values (nor their result lists): at 3,500 get_many(100) frames a second of 100-byte
    # values, a 5 s deadline would otherwise keep about 350 MB alive for the collector to walk.
    import tracemalloc

    rig = Rig(2, timeout=5.0)
    keys = [f"r-{i}" for i in range(200)]
    where = owners(rig.names, keys)
    fast_keys = [k.encode() for k in keys if where[k] == rig.names[0]][:50]
    slow_key = next(k.encode() for k in keys if where[k] == rig.names[1])
    value = b"v" * 10_000
    fast = rig.server(rig.names[0])
    rig.far[rig.names[0]].store.update({k: (value, 0) for k in fast_keys})
    stuck = rig.frame([[Op.GET, slow_key]])  # its server never answers: it stays at the heap's top

    def answer_fast() -> None:
        for conn in fast.conns:
            conn.flush(rig.now)
            wire = conn.sock
            wire.inbox += wire.far.answer(wire.written)  # type: ignore[union-attr]
            del wire.written[:]  # type: ignore[union-attr]
            conn.on_readable(rig.now)

    rig.frame([[Op.GET, k] for k in fast_keys])  # warm up: tables and buffers reach their size
    answer_fast()
    rig.replies.clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):  # 100 frames x 50 values x 10 KB = 50 MB if each frame kept its values
            r = rig.frame([[Op.GET, k] for k in fast_keys])
            answer_fast()
            assert rig.results(r) == [[Code.OK, value, 0]] * len(fast_keys)
            rig.replies.clear()  # what the worker took away
            assert rig.router.next_deadline() == pytest.approx(rig.now + 5.0)  # the stuck one still waits
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2_000_000, f"{kept} bytes kept by 100 answered frames"
    assert not any(x.req_id == stuck for x in rig.replies)


def test_answered_frames_behind_long_waits_are_swept_and_the_waiting_ones_still_time_out() -> None:
    # Answered frames stay on the deadline heap until they reach its top; behind frames that wait
    # long they would pile up without end. The heap is swept of them when it passes SWEEP_MIN
    # (then twice what a sweep left), and a sweep must keep every frame still waiting, in order.
    from broker.router import SWEEP_MIN

    rig = Rig(2, timeout=5.0)
    keys = [f"w-{i}" for i in range(400)]
    where = owners(rig.names, keys)
    fast_key = next(k.encode() for k in keys if where[k] == rig.names[0])
    slow_keys = [k.encode() for k in keys if where[k] == rig.names[1]][:3]
    fast = rig.server(rig.names[0])
    waiting = {rig.frame([[Op.GET, k]], timeout_ms=ms): ms for k, ms in zip(slow_keys, (3000, 1000, 2000))}
    longest = 0
    for _ in range(3 * SWEEP_MIN):
        r = rig.frame([[Op.GET, fast_key]], timeout_ms=4000)
        for conn in fast.conns:
            conn.flush(rig.now)
            wire = conn.sock
            wire.inbox += wire.far.answer(wire.written)  # type: ignore[union-attr]
            del wire.written[:]  # type: ignore[union-attr]
            conn.on_readable(rig.now)
        assert rig.codes(r) == [Code.MISS]
        longest = max(longest, len(rig.router._deadlines))
    assert longest <= SWEEP_MIN + 1, longest
    rig.replies.clear()
    # The three still wait, and time out at their own deadlines, earliest first.
    for r, ms in sorted(waiting.items(), key=lambda item: item[1]):
        assert rig.router.next_deadline() == pytest.approx(rig.now + ms / 1000)
        rig.router.expire(rig.now + ms / 1000)
        assert rig.codes(r) == [Code.TIMEOUT]
    assert rig.router.next_deadline() is None


def test_frame_without_a_timeout_takes_the_brokers_default() -> None:
    rig = Rig(timeout=0.75)
    rig.frame([[Op.GET, b"k"]])
    assert rig.router.next_deadline() == pytest.approx(rig.now + 0.75)


def test_missed_deadline_is_a_failure_only_when_the_server_has_been_silent() -> None:
    rig = Rig(1, failure_limit=1, timeout=0.05)
    server = rig.servers[0]
    # The server answered recently (a read 10 ms before the deadline): slow, not failed.
    rig.frame([[Op.GET, b"a"]])
    busy = [c for c in server.conns if c.pipeline.inflight][0]
    busy.since = rig.now + 0.05 - SILENT_FAILURE / 10
    rig.router.expire(rig.now + 0.05)
    assert server.health.is_up and server.health.failures == 0 and server.stats.timeouts == 1
    # Silent for SILENT_FAILURE and more: one failure, and with failure_limit 1 the server goes down.
    rig.now += 1.0
    rig.frame([[Op.GET, b"b"], [Op.GET, b"c"], [Op.GET, b"d"]])
    for c in server.conns:
        if c.pipeline.inflight:
            c.since = rig.now - SILENT_FAILURE
    rig.router.expire(rig.now + 0.05)
    assert server.health.state is State.DOWN and server.health.ejections == 1
    assert server.health.failures == 1  # one missed deadline is one failure, however many keys


def test_expired_job_finds_its_slots_failed_by_a_mark_down_without_a_second_reply() -> None:
    rig = Rig(1, failure_limit=1)
    r = rig.frame([[Op.GET, b"a"], [Op.GET, b"b"]], timeout_ms=100)
    for c in rig.servers[0].conns:
        c.since = rig.now - 1.0
    rig.router.expire(rig.now + 0.1)
    assert rig.codes(r) == [Code.TIMEOUT, Code.TIMEOUT]
    assert rig.budget.inflight == 0 and rig.servers[0].inflight == 0


# --- drain ----------------------------------------------------------------------------------------------


def test_draining_refuses_new_frames_and_in_flight_requests_still_complete() -> None:
    rig = Rig()
    rig.frame([set_op(b"k", b"v")])
    rig.serve()
    held = rig.frame([[Op.GET, b"k"]])
    rig.router.draining = True
    late = rig.frame([[Op.GET, b"k"]])
    silent = rig.frame([set_op(b"q", b"v")], flags=NOREPLY)
    refused = rig.reply(late)
    assert refused.code == Code.SHUTTING_DOWN and "shutting down" in str(refused.payload)
    assert not [x for x in rig.replies if x.req_id == silent]
    rig.serve()
    assert rig.results(held) == [[Code.OK, b"v", 0]]
    assert b"q" not in rig.far[rig.names[0]].store


# --- requests the broker refuses by memcached's rules ---------------------------------------------------


def test_a_set_too_large_for_the_server_unlinks_the_key_and_others_are_refused_unchanged() -> None:
    rig = Rig()
    server = rig.servers[0]
    server.item_size_max = 1024
    rig.frame([set_op(b"big", b"old"), set_op(b"keep", b"old")])
    rig.serve()
    r = rig.frame([set_op(b"big", b"x" * 2000), [Op.APPEND, b"keep", b"x" * 2000, 0, 0]])
    rig.serve()
    res = rig.results(r)
    assert res[0][0] == Code.SERVER_ERROR and "too large" in res[0][1]
    assert res[1][0] == Code.SERVER_ERROR and "too large" in res[1][1]
    store = rig.far[rig.names[0]].store
    assert b"big" not in store and store[b"keep"] == (b"old", 0)
    assert not any(line.startswith(b"ms big 2000") for line in rig.far[rig.names[0]].requests)


def test_no_usable_connection_is_a_connection_error_naming_the_server() -> None:
    rig = Rig(1)
    server = rig.servers[0]
    for conn in server.conns:
        conn.sock = None
        conn.reconnect_at = rig.now + 10
    server.health.last_error = "connect refused"
    r = rig.frame([[Op.GET, b"k"]])
    (res,) = rig.results(r)
    assert res[0] == Code.CONNECTION_ERROR and server.name in res[1] and "refused" in res[1]
