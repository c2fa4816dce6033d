"""broker/connection.py's socket driver with real loopback sockets, in this process.

A `Server` and its `Connection`s are driven the way service.py's loop drives them (poll, then
`on_readable` / `on_writable`, `flush` of the connections made dirty, `tick` for timers), by a
small `Loop` over `selectors`: readiness is real, the clock is not. Every method takes `now`, so
timeouts and backoff are checked at exact instants without sleeping. (Two things read the real
clock inside the driver: a write's time for latency and for `since`; the tests start their clock
at `time.monotonic()` and read `conn.since` where it matters.)

The far end is a real memcached (tests/harness.py) where the promise is end to end (settings
learned on connect, a round trip, a probe that brings an ejected server back), and a socket the
test controls where memcached would have to misbehave: a listener that accepts and never
answers, answers garbage, resets or closes; a port that refuses; a socketpair whose far end
does not read. Worker requests go in through the router (as frames) and come out as its replies,
so an in-flight request's failure is checked as the worker sees it.

The rules checked are the README's ("When a memcached server is down", "Nothing lost", item
sizes) and connection.py's docstrings: `stats settings` first on every connection and its
`item_size_max` / `cas_enabled` followed; a connect that fails or takes longer than the connect
timeout fails what waits on it and counts one failure; a connection silent past the io timeout
with requests in flight is reset (TIMEOUT); a read error, an EOF with requests in flight or a
stream out of step fails everything in flight with CONNECTION_ERROR and a reason; an idle
connection closed by memcached, or a stream spoiled by an answer of the server's own, reconnects
at once without counting a failure; otherwise reconnects back off with equal jitter
(broker/health.py: `base * 2**attempt` capped, half fixed and half random: base 20 ms, cap 2 s);
a probe (a connection and `stats settings`) brings a server marked down back; writes that the
socket takes only in part keep the rest and ask for POLLOUT; a write that fails reads what waits
in the socket first, so answers memcached sent before it went away reach their requests.
"""

from __future__ import annotations

import logging
import os
import re
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker import connection as connection_mod
from broker.connection import CONNECTING, DISCONNECTED, READY, Budget, Connection, Server
from broker.health import Health, State
from broker.router import Router
from broker.shard import make_placement
from clientlib.address import parse_server
from clientlib.wire import Code, Op, ReplyFrame, decode_reply, encode_request
import harness
from harness import Memcached, MemcachedFactory

pytestmark = pytest.mark.unit

PEER = object()
# Real seconds any one wait for a socket event may take on a loaded machine. Under mutation testing
# (scripts/mutation), a broken mutant would otherwise wait this long in every test before failing.
WAIT = 3.0 if os.environ.get("MUTANT_UNDER_TEST") else 10.0
# The reconnect backoff connection.py documents (health.backoff with base 20 ms and cap 2 s).
BASE, CAP = 0.02, 2.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


class Loop:
    """service.py's side of the IO protocol over a selector: what it watches, and one poll turn."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Connection] = {}
        self.dirty_conns: list[Connection] = []

    def watch(self, conn: Connection) -> None:
        fd = conn.fd
        events = selectors.EVENT_READ
        if conn.want_write or conn.state == CONNECTING:
            events |= selectors.EVENT_WRITE
        if fd in self.conns:
            self.sel.modify(fd, events)
        else:
            self.sel.register(fd, events)
        self.conns[fd] = conn

    def unwatch(self, conn: Connection) -> None:
        fd = conn.fd
        if self.conns.pop(fd, None) is not None:
            self.sel.unregister(fd)

    def dirty(self, conn: Connection) -> None:
        self.dirty_conns.append(conn)

    def wants_write(self, conn: Connection) -> bool:
        return bool(self.sel.get_key(conn.fd).events & selectors.EVENT_WRITE)

    def turn(self, now: float | None, timeout: float) -> None:
        """Flush what was made dirty, poll, handle the events (`now` None: the clock after the poll)."""
        dirty, self.dirty_conns = self.dirty_conns, []
        for conn in dirty:
            conn.flush(time.monotonic() if now is None else now)
        if not self.conns:
            return
        events = self.sel.select(timeout)
        if now is None:
            now = time.monotonic()
        for key, ev in events:
            conn = self.conns.get(key.fd)  # type: ignore[call-overload]
            if conn is None:
                continue
            if ev & selectors.EVENT_READ:
                conn.on_readable(now)
            if ev & selectors.EVENT_WRITE and conn.sock is not None and conn.fd == key.fd:
                conn.on_writable(now)

    def close(self) -> None:
        self.sel.close()


class Rig:
    """One server, its connections, a router for worker frames and the loop."""

    def __init__(
        self, address: str, *, connections: int = 1, failure_limit: int = 3, probe_interval: float = 0.1,
        max_buffered: int = 1 << 24,
    ) -> None:
        self.loop = Loop()
        self.budget = Budget(1000, max_buffered)
        self.replies: list[ReplyFrame] = []
        self.downs: list[State] = []
        self.router = Router(
            budget=self.budget, send=self._send, default_timeout=5.0, max_frame=1 << 22, max_value=0,
            remap=False, local=lambda op: None,
        )
        self.server = Server(
            parse_server(address), connections=connections, io=self.loop, budget=self.budget,
            health=Health(failure_limit, probe_interval, 30.0), max_inflight_conn=1000, max_inflight_server=1000,
            on_down=self._on_down,
        )
        self.router.set_servers([self.server], make_placement("rendezvous", [(self.server.address.hash_key, 1)]))
        self.now = time.monotonic()
        self.req_id = 0

    @property
    def conn(self) -> Connection:
        return self.server.conns[0]

    def _on_down(self, server: Server) -> None:
        self.downs.append(server.health.state)
        self.router.refresh_down(server)

    def _send(self, peer: Any, ident: bytes, data: bytes) -> bool:
        self.replies.append(decode_reply(data))
        return True

    def frame(self, ops: list[list[Any]]) -> int:
        self.req_id += 1
        self.server.batch_conn = None  # a new loop turn
        self.router.handle(PEER, b"worker", encode_request(self.req_id, ops, 0), self.now)
        return self.req_id

    def pump(self, done: Callable[[], bool], what: str, *, real: bool = False) -> None:
        """Loop turns until `done()`, at most WAIT real seconds (`real`: the clock moves too)."""
        end = time.monotonic() + WAIT
        while not done():
            assert time.monotonic() < end, f"not within {WAIT}s: {what}"
            self.loop.turn(None if real else self.now, 0.05)
            if real:
                self.now = time.monotonic()

    def reply(self, req_id: int) -> ReplyFrame:
        found = [r for r in self.replies if r.req_id == req_id]
        assert len(found) == 1, f"{len(found)} replies to request {req_id}"
        return found[0]

    def results(self, req_id: int) -> list[list[Any]]:
        r = self.reply(req_id)
        assert r.code == Code.OK, r
        return list(r.payload)

    def ready(self) -> None:
        """Connect every connection and wait until each has its settings answered."""
        self.server.start(self.now)
        self.pump(lambda: all(c.state == READY and not c.pipeline.queue for c in self.server.conns), "connected", real=True)

    def plug(self, sock: socket.socket, conn: Connection | None = None) -> Connection:
        """A connected socket the test made (socketpair), installed as after a completed connect."""
        conn = conn or self.conn
        sock.setblocking(False)
        conn.sock = sock
        conn.state = READY
        self.loop.watch(conn)
        return conn

    def assert_nothing_in_flight(self) -> None:
        assert self.budget.inflight == 0 and self.server.inflight == 0
        assert self.budget.buffered == 0


class Peer:
    """A loopback listener standing in for a memcached that misbehaves as each test tells it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []

    def accept(self) -> socket.socket:
        self.listener.settimeout(WAIT)
        s, _ = self.listener.accept()
        s.settimeout(WAIT)
        self.accepted.append(s)
        return s

    def close(self) -> None:
        for s in self.accepted:
            s.close()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(autouse=True)
def _quiet_failure_lines() -> Iterator[None]:
    # connection.py rate-limits failure lines per server name across the process: start clean.
    connection_mod.FAILURE_LINES._next.clear()
    connection_mod.FAILURE_LINES._held.clear()
    yield


def read_until(rig: Rig, s: socket.socket, pattern: bytes) -> bytes:
    """What the broker wrote to `s` until `pattern` (a regex) matches it, turning its loop."""
    got = b""
    end = time.monotonic() + WAIT
    s.settimeout(0.02)
    while not re.search(pattern, got, re.S):
        assert time.monotonic() < end, f"no {pattern!r} in {got[:200]!r}"
        rig.loop.turn(rig.now, 0.02)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        assert chunk, f"closed before {pattern!r}: {got[:200]!r}"
        got += chunk
    s.settimeout(WAIT)
    return got


def settings_answer(**stats: str) -> bytes:
    return b"".join(b"STAT %s %s\r\n" % (k.encode(), v.encode()) for k, v in stats.items()) + b"END\r\n"


def fence_answers(written: bytes) -> bytes:
    return b"".join(b"EN O%s\r\n" % o for o in re.findall(rb"mg _mcbroker_fence_ O(\d+)\r\n", written))


def accept_ready(rig: Rig, peer: Peer, **stats: str) -> socket.socket:
    """Connect the rig's first connection to the peer and answer its `stats settings`."""
    rig.conn.open(rig.now)
    far = peer.accept()
    written = read_until(rig, far, rb"stats settings\r\nmg _mcbroker_fence_ O\d+\r\n")
    assert written.startswith(b"stats settings\r\n")  # the first request on every connection
    far.sendall(settings_answer(**stats) + fence_answers(written))
    rig.pump(lambda: rig.conn.state == READY and not rig.conn.pipeline.queue, "settings answered")
    return far


def backoff_bounds(attempt: int) -> tuple[float, float]:
    """Equal jitter (health.py): a step of base * 2**(attempt - 1), capped; half fixed, half random."""
    step = min(CAP, BASE * 2 ** (attempt - 1))
    return step / 2, step


# --- against a real memcached ------------------------------------------------------------------


def test_a_new_connection_asks_stats_settings_first_and_follows_item_size_max(
    memcached_factory: MemcachedFactory,
) -> None:
    (mc,) = memcached_factory(1, ["-I", "3m"])  # after the harness's own -I 2m
    rig = Rig(mc.address, connections=2)
    # memcached's defaults until the server says otherwise: -I 1m, CAS on.
    assert rig.server.item_size_max is None and rig.server.item_limit == 1024 * 1024
    assert rig.server.cas_enabled is True
    rig.ready()
    limit = 3 * 1024 * 1024
    assert rig.server.item_size_max == limit and rig.server.item_limit == limit
    assert rig.server.snapshot()["item_size_max"] == limit
    assert rig.server.snapshot()["connections"] == 2
    assert rig.server.cas_enabled is True
    for conn in rig.server.conns:
        assert conn.pipeline.parser._max_value == limit
    # The broker's own request is neither a worker request nor a failure, and left nothing behind.
    assert rig.server.stats.requests == 0 and rig.server.stats.errors == 0
    rig.assert_nothing_in_flight()
    # A reconnect starts from the limit already known, before its own answer comes.
    conn = rig.conn
    conn.close()
    assert conn.state == DISCONNECTED and conn.sock is None and not conn.want_write
    conn.open(rig.now)
    assert conn.state == CONNECTING and conn.pipeline.parser._max_value == limit
    rig.pump(lambda: conn.state == READY and not conn.pipeline.queue, "reconnected")


def test_a_server_without_cas_is_known_as_such(memcached_factory: MemcachedFactory) -> None:
    (mc,) = memcached_factory(1, ["-C"])
    rig = Rig(mc.address)
    rig.ready()
    assert rig.server.cas_enabled is False
    assert rig.server.item_size_max == 2 * 1024 * 1024  # the harness's -I 2m


def test_set_and_get_round_trip_through_memcached(mc: Memcached) -> None:
    rig = Rig(mc.address)
    rig.ready()
    s = rig.frame([[Op.SET, b"conn:k", b"value-1", 7, 0]])
    g = rig.frame([[Op.GET, b"conn:k"], [Op.GET, b"conn:missing"]])
    rig.pump(lambda: len(rig.replies) == 2, "answers", real=True)
    assert rig.results(s) == [[Code.OK]]
    assert rig.results(g) == [[Code.OK, b"value-1", 7], [Code.MISS]]
    # Really in memcached, as another client reads it (text protocol: flags 7, 7 bytes).
    assert harness.request(mc.address, b"get conn:k\r\n", b"END\r\n", timeout=WAIT) == (
        b"VALUE conn:k 7 7\r\nvalue-1\r\nEND\r\n"
    )
    stats = rig.server.stats
    assert stats.requests == 3  # worker requests only
    assert stats.errors == 0 and stats.resets == 0
    # Requests written: the broker's own `stats settings`, then the three (one turn, one write).
    assert stats.written == 4 and stats.writes == 2
    rig.assert_nothing_in_flight()
    snap = rig.server.snapshot()
    assert snap["requests"] == 3 and snap["requests_written"] == 4 and snap["writes"] == 2
    assert snap["requests_per_write"] == 2.0
    # Each write's latency is sampled once its last answer is read.
    assert rig.server.latency.count == 2 and snap["latency_samples"] == 2
    assert snap["latency_p50_us"] is not None and 0 < snap["latency_avg_us"] < WAIT * 1e6


def test_a_unix_socket_server(memcached_factory: MemcachedFactory) -> None:
    (mc,) = memcached_factory(1, unix=True)
    rig = Rig(mc.address)
    rig.ready()
    assert rig.conn.sock is not None and rig.conn.sock.family == socket.AF_UNIX
    s = rig.frame([[Op.SET, b"u", b"v", 0, 0]])
    g = rig.frame([[Op.GET, b"u"]])
    rig.pump(lambda: len(rig.replies) == 2, "answers")
    assert rig.results(s) == [[Code.OK]] and rig.results(g) == [[Code.OK, b"v", 0]]


def test_a_probe_brings_a_server_marked_down_back(
    memcached_factory: MemcachedFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    (mc,) = memcached_factory(1)  # its own: stopped and started again on the same port
    rig = Rig(mc.address, connections=2, failure_limit=1)
    mc.stop()
    try:
        rig.server.start(rig.now)
        rig.pump(lambda: rig.server.state is State.DOWN, "marked down")
    finally:
        mc.start()
    health = rig.server.health
    assert rig.downs == [State.DOWN] and health.ejections == 1
    assert all(c.sock is None for c in rig.server.conns)
    # Nothing before the probe is due: no connection, no reconnect while down.
    rig.server.tick(health.probe_at - 0.001, 1.0, 5.0)
    assert all(c.sock is None for c in rig.server.conns) and health.state is State.DOWN
    rig.now = health.probe_at
    with caplog.at_level(logging.WARNING, logger="mcbroker.pipeline"):
        rig.server.tick(rig.now, 1.0, 5.0)
        assert health.state is State.PROBING and rig.conn.probe and rig.conn.connect_started == rig.now
        assert rig.server.conns[1].sock is None  # one connection probes
        rig.pump(lambda: health.state is State.UP, "probe answered")
    assert [r.message for r in caplog.records if "back up" in r.message] == [f"{rig.server.name} is back up"]
    assert rig.server.conns[1].connect_started == rig.now
    assert rig.downs == [State.DOWN, State.UP]
    assert not rig.conn.probe and health.failures == 0
    # Back up: every connection is opened again, with no backoff left over.
    assert all(c.sock is not None and c.attempt == 0 for c in rig.server.conns)
    g = rig.frame([[Op.GET, b"back"]])
    rig.pump(lambda: len(rig.replies) == 1, "answer")
    assert rig.results(g) == [[Code.MISS]]


# --- connect ------------------------------------------------------------------------------------


def test_a_refused_connect_fails_what_waits_on_it_and_backs_off() -> None:
    port = closed_port()
    rig = Rig(f"127.0.0.1:{port}")
    rig.server.start(rig.now)
    conn = rig.conn
    assert conn.state == CONNECTING and rig.loop.wants_write(conn)
    g = rig.frame([[Op.GET, b"k"]])  # queued behind the connect
    assert conn.pipeline.inflight == 2  # its `stats settings` and the get
    rig.pump(lambda: conn.sock is None, "refused")
    (result,) = rig.reply(g).payload
    assert result[0] == Code.CONNECTION_ERROR
    assert re.fullmatch(rf"connect to 127\.0\.0\.1:{port}: (Connection refused|ECONNREFUSED)", result[1]), result
    assert conn.state == DISCONNECTED and not rig.loop.conns
    stats, health = rig.server.stats, rig.server.health
    assert health.failures == 1 and stats.errors == 1 and stats.resets == 1
    assert health.last_error == result[1] and health.state is State.UP  # 1 of failure_limit 3
    lo, hi = backoff_bounds(1)
    assert conn.attempt == 1 and rig.now + lo <= conn.reconnect_at <= rig.now + hi
    rig.assert_nothing_in_flight()


def test_a_refused_connect_seen_as_writable_names_the_errno() -> None:
    port = closed_port()
    rig = Rig(f"127.0.0.1:{port}")
    conn = rig.conn
    conn.open(rig.now)
    g = rig.frame([[Op.GET, b"k"]])
    sock = conn.sock
    assert sock is not None
    # Wait for the refusal without reading the socket, then let on_writable find it (SO_ERROR).
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        assert sel.select(WAIT)
    conn.on_writable(rig.now)
    assert conn.sock is None and conn.state == DISCONNECTED
    assert rig.server.health.last_error == f"connect to 127.0.0.1:{port}: ECONNREFUSED"
    assert rig.reply(g).payload == [[Code.CONNECTION_ERROR, f"connect to 127.0.0.1:{port}: ECONNREFUSED"]]
    assert rig.server.health.failures == 1 and conn.attempt == 1
    rig.assert_nothing_in_flight()


def test_reconnects_back_off_with_jitter_until_a_data_answer(peer: Peer) -> None:
    port = closed_port()
    rig = Rig(f"127.0.0.1:{port}", failure_limit=100)
    conn = rig.conn
    for attempt in range(1, 10):
        if attempt > 1:
            # Not before its time; then at once.
            rig.server.tick(conn.reconnect_at - 0.001, 1.0, 5.0)
            assert conn.sock is None
            rig.now = conn.reconnect_at
            rig.server.tick(rig.now, 1.0, 5.0)
            assert conn.connect_started == rig.now
        else:
            rig.server.start(rig.now)
        assert conn.sock is not None
        rig.pump(lambda: conn.sock is None, "refused")
        lo, hi = backoff_bounds(attempt)
        assert conn.attempt == attempt
        assert rig.now + lo <= conn.reconnect_at <= rig.now + hi, (attempt, conn.reconnect_at - rig.now)
    assert rig.server.health.failures == 9 and rig.server.stats.errors == 9 and rig.server.stats.resets == 9
    # Now to a peer that answers: `stats settings` alone does not reset the backoff or the failures
    # (a server that answers it and garbles every request must still go down); a data answer does.
    rig.server.address = parse_server(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    assert conn.attempt == 9 and rig.server.health.failures == 9
    g = rig.frame([[Op.GET, b"k"]])
    rig.loop.turn(rig.now, 0)
    written = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    far.sendall(b"EN O%s\r\n" % re.search(rb"mg k v f s O(\d+)", written)[1] + fence_answers(written))  # type: ignore[index]
    rig.pump(lambda: len(rig.replies) == 1, "answer")
    assert rig.results(g) == [[Code.MISS]]
    assert conn.attempt == 0 and rig.server.health.failures == 0


def test_a_connect_that_takes_too_long_fails_after_the_connect_timeout(peer: Peer) -> None:
    rig = Rig(peer.address)
    conn = rig.conn
    conn.open(rig.now)
    g = rig.frame([[Op.GET, b"k"]])
    started = conn.connect_started
    assert started == rig.now
    # The loop never saw it writable: still connecting. At the timeout exactly, nothing yet.
    conn.check_timers(started + 1.5, 1.5, 0.5)
    assert conn.state == CONNECTING and rig.replies == []
    conn.check_timers(started + 1.501, 1.5, 0.5)
    assert conn.sock is None and conn.state == DISCONNECTED
    (result,) = rig.reply(g).payload
    assert result == [Code.CONNECTION_ERROR, f"connect to {peer.address} timed out"]
    assert rig.server.health.failures == 1 and conn.attempt == 1
    rig.assert_nothing_in_flight()


def test_a_completed_connect_is_ready_and_writes_what_waited(peer: Peer) -> None:
    rig = Rig(peer.address)
    conn = rig.conn
    conn.open(rig.now)
    assert conn.want_write and rig.loop.wants_write(conn)
    g = rig.frame([[Op.GET, b"k"]])
    assert rig.loop.dirty_conns == []  # nothing to flush before the connect completes
    far = peer.accept()
    with selectors.DefaultSelector() as sel:
        sel.register(conn.sock, selectors.EVENT_WRITE)  # type: ignore[arg-type]
        assert sel.select(WAIT)
    before = time.monotonic()
    conn.on_writable(before)
    assert conn.state == READY
    # Requests waited for the connect: their silence starts when they are written.
    assert before <= conn.since <= time.monotonic()
    assert not conn.want_write and not rig.loop.wants_write(conn)  # all written at once
    written = read_until(rig, far, rb"mg k v f s O\d+\r\nmg _mcbroker_fence_ O\d+\r\n")
    assert written.startswith(b"stats settings\r\nmg k v f s O")
    # The connection stays ready, and a completed connect past the connect timeout is no failure.
    conn.check_timers(rig.now + 100.0, 1.0, 1000.0)
    assert conn.state == READY


def test_a_connect_to_a_name_that_does_not_resolve_is_a_failed_connect() -> None:
    rig = Rig("no-such-host.invalid:11211")
    rig.server.start(rig.now)
    conn = rig.conn
    assert conn.sock is None and not rig.loop.conns
    assert rig.server.health.last_error.startswith("connect to no-such-host.invalid:11211: ")
    assert rig.server.health.failures == 1 and conn.attempt == 1
    rig.assert_nothing_in_flight()


# --- io timeout ---------------------------------------------------------------------------------


def test_a_connection_silent_past_the_io_timeout_with_requests_in_flight_is_reset(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    # Idle: silence is no failure, however long.
    conn.check_timers(rig.now + 1000.0, 1.0, 2.0)
    assert conn.state == READY
    g = rig.frame([[Op.GET, b"k"]])
    before = time.monotonic()
    rig.loop.turn(rig.now, 0)
    read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")  # read, never answered
    since = conn.since
    assert before <= since <= time.monotonic()  # the write's time: the silence starts there
    conn.check_timers(since + 2.0, 1.0, 2.0)
    assert conn.state == READY and rig.replies == []
    conn.check_timers(since + 2.25, 1.0, 2.0)
    assert conn.sock is None
    (result,) = rig.reply(g).payload
    assert result == [Code.TIMEOUT, f"{peer.address} silent for 2.2s with requests in flight"]
    assert rig.server.health.failures == 1 and conn.attempt == 1 and rig.server.stats.resets == 1
    rig.assert_nothing_in_flight()


def test_any_read_restarts_the_silence(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    rig.frame([[Op.GET, b"a"], [Op.GET, b"b"]])
    rig.loop.turn(rig.now, 0)
    written = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    first = re.search(rb"mg a v f s O(\d+)", written)[1]  # type: ignore[index]
    far.sendall(b"EN O%s\r\n" % first)  # half of the answers
    rig.now += 1.5
    rig.pump(lambda: conn.since == rig.now, "read")
    assert conn.pipeline.inflight == 1 and rig.budget.inflight == 1 and rig.server.inflight == 1
    conn.check_timers(rig.now + 2.0, 1.0, 2.0)
    assert conn.state == READY


# --- reads: EOF, errors, garbage ----------------------------------------------------------------


def test_eof_with_requests_in_flight_fails_them_and_counts_a_failure(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    g = rig.frame([[Op.GET, b"a"], [Op.SET, b"b", b"v", 0, 0]])
    rig.loop.turn(rig.now, 0)
    read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    far.close()
    rig.pump(lambda: conn.sock is None, "EOF seen")
    assert not conn.marks and conn.sent_n == conn.answered_n == 0  # no latency from a dead write
    message = f"{peer.address} closed the connection"
    assert rig.reply(g).payload == [[Code.CONNECTION_ERROR, message]] * 2
    assert rig.server.health.failures == 1 and rig.server.stats.errors == 1 and rig.server.stats.resets == 1
    lo, hi = backoff_bounds(1)
    assert conn.attempt == 1 and rig.now + lo <= conn.reconnect_at <= rig.now + hi
    rig.assert_nothing_in_flight()


def test_an_idle_connection_closed_by_memcached_reconnects_at_once_uncounted(
    peer: Peer, caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    far.close()
    with caplog.at_level(logging.INFO, logger="mcbroker.pipeline"):
        rig.pump(lambda: conn.sock is None, "EOF seen")
        assert rig.server.health.failures == 0 and rig.server.stats.errors == 0
        assert rig.server.stats.resets == 1
        assert conn.attempt == 0 and conn.reconnect_at == rig.now
        rig.server.tick(rig.now, 1.0, 5.0)  # the next timer turn reconnects
        assert conn.state == CONNECTING and conn.sock is not None and conn.connect_started == rig.now
        # Routine, so never held back: a second idle close a moment later is logged too.
        far = peer.accept()
        w = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
        far.sendall(settings_answer() + fence_answers(w))
        rig.pump(lambda: conn.state == READY and not conn.pipeline.queue, "settings answered")
        far.close()
        rig.pump(lambda: conn.sock is None, "second EOF seen")
    lines = [(r.levelno, r.message) for r in caplog.records if "closing connection" in r.message]
    line = f"{peer.address}: closing connection: {peer.address} closed the connection (0 in flight)"
    assert lines == [(logging.INFO, line)] * 2


def test_a_reset_connection_fails_in_flight_requests_as_a_read_error(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    g = rig.frame([[Op.GET, b"a"]])
    rig.loop.turn(rig.now, 0)
    read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    far.close()
    rig.pump(lambda: conn.sock is None, "reset seen")
    (result,) = rig.reply(g).payload
    assert result == [Code.CONNECTION_ERROR, f"read from {peer.address}: Connection reset by peer"]
    assert rig.server.health.failures == 1 and conn.attempt == 1
    rig.assert_nothing_in_flight()


def test_a_refused_connect_seen_as_readable_is_a_connect_failure() -> None:
    port = closed_port()
    rig = Rig(f"127.0.0.1:{port}")
    conn = rig.conn
    conn.open(rig.now)
    with selectors.DefaultSelector() as sel:
        sel.register(conn.sock, selectors.EVENT_WRITE)  # type: ignore[arg-type]
        assert sel.select(WAIT)
    conn.on_readable(rig.now)  # POLLERR: the loop reads first
    assert conn.sock is None
    assert rig.server.health.last_error == f"connect to 127.0.0.1:{port}: Connection refused"


def test_garbage_from_the_server_resets_the_connection_and_counts_a_failure(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    g = rig.frame([[Op.GET, b"a"], [Op.GET, b"b"], [Op.GET, b"c"]])
    rig.loop.turn(rig.now, 0)
    written = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    first = int(re.search(rb"mg a v f s O(\d+)", written)[1])  # type: ignore[index]
    # Two answers in step, then garbage: the first is proven by the second, which nothing proves.
    far.sendall(b"EN O%d\r\nEN O%d\r\nWHAT IS THIS\r\n" % (first, first + 1))
    rig.pump(lambda: conn.sock is None, "reset")
    results = rig.reply(g).payload
    assert [r[0] for r in results] == [Code.MISS, Code.CONNECTION_ERROR, Code.CONNECTION_ERROR]
    results = results[1:]
    assert results[0][1].startswith(f"{peer.address}: protocol error") and results[0][1].endswith("; pipeline reset")
    assert rig.server.health.failures == 1 and conn.attempt == 1
    rig.assert_nothing_in_flight()


def test_an_error_answer_that_spoils_the_stream_reconnects_at_once_uncounted(
    peer: Peer, caplog: pytest.LogCaptureFixture,
) -> None:
    # CLIENT_ERROR to ms: the request's own answer (the server answered), nothing after it trusted.
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")
    conn = rig.conn
    g = rig.frame([[Op.SET, b"a", b"v", 0, 0], [Op.GET, b"b"]])
    rig.loop.turn(rig.now, 0)
    read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    far.sendall(b"CLIENT_ERROR bad data chunk\r\n")
    with caplog.at_level(logging.INFO, logger="mcbroker.pipeline"):
        rig.pump(lambda: conn.sock is None, "reset")
    # Not counted, but requests failed with it: a warning, not the idle close's info line.
    assert [r.levelno for r in caplog.records if "closing connection" in r.message] == [logging.WARNING]
    first, second = rig.reply(g).payload
    assert first[0] == Code.CLIENT_ERROR and "bad data chunk" in first[1]
    assert second[0] == Code.CONNECTION_ERROR and second[1].endswith("; pipeline reset")
    assert rig.server.health.failures == 0 and rig.server.stats.errors == 0
    assert conn.attempt == 0 and conn.reconnect_at == rig.now
    rig.assert_nothing_in_flight()


def test_a_value_larger_than_the_servers_limit_is_out_of_step(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1024", cas_enabled="no")
    assert rig.server.item_size_max == 1024 and rig.server.cas_enabled is False
    assert rig.conn.pipeline.parser._max_value == 1024
    g = rig.frame([[Op.GET, b"a"]])
    rig.loop.turn(rig.now, 0)
    written = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    opaque = re.search(rb"mg a v f s O(\d+)", written)[1]  # type: ignore[index]
    far.sendall(b"VA 2000 f0 s2000 O%s\r\n" % opaque + b"x" * 2000 + b"\r\n")
    rig.pump(lambda: rig.conn.sock is None, "reset")
    (result,) = rig.reply(g).payload
    assert result[0] == Code.CONNECTION_ERROR and "protocol error" in result[1]


@pytest.mark.parametrize(
    ("answer", "size", "cas"),
    [
        ({"item_size_max": "4096"}, 4096, True),  # cas_enabled not said: memcached's default, on
        ({"cas_enabled": "yes"}, None, True),  # no size: the last one known stays
        ({"item_size_max": "1m", "cas_enabled": "no"}, None, False),  # not a number of bytes: ignored
    ],
)
def test_settings_learned_from_what_the_server_says(peer: Peer, answer: dict[str, str], size: int | None, cas: bool) -> None:
    rig = Rig(peer.address)
    rig.server.cas_enabled = not cas
    accept_ready(rig, peer, **answer)
    assert rig.server.item_size_max == size and rig.server.cas_enabled is cas
    assert rig.conn.pipeline.parser._max_value == (size or connection_mod.MAX_ITEM_SIZE)


def test_settings_are_logged_when_they_change(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(peer.address)
    with caplog.at_level(logging.INFO, logger="mcbroker.pipeline"):
        accept_ready(rig, peer, item_size_max="4096")
        rig.conn.close()
        accept_ready(rig, peer, item_size_max="4096")
        rig.conn.close()
        accept_ready(rig, peer, item_size_max="8192")  # memcached restarted with another -I
    lines = [r.message for r in caplog.records if "item_size_max" in r.message]
    assert lines == [f"{peer.address}: item_size_max 4096 bytes", f"{peer.address}: item_size_max 8192 bytes"]


# --- writes -------------------------------------------------------------------------------------


def test_a_write_the_socket_takes_in_part_keeps_the_rest_and_waits_for_pollout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    b.setblocking(False)
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    value = bytes(range(256)) * 1024  # 256 KiB: more than the socket buffers hold
    s = rig.frame([[Op.SET, b"big", value, 3, 0]])
    assert rig.loop.dirty_conns == [conn]
    queued = len(conn.pipeline.out)
    rig.loop.turn(rig.now, 0)
    left = len(conn.pipeline.out)
    assert 0 < left < queued + 64  # part written (the fence was added to what is queued)
    assert conn.want_write and rig.loop.wants_write(conn)
    assert rig.budget.buffered == left  # only what still waits counts against the budget
    stats = rig.server.stats
    assert stats.writes == 1 and stats.written == 1
    # Already waiting for POLLOUT: a request added now asks for no flush of its own.
    g = rig.frame([[Op.GET, b"after"]])
    assert rig.loop.dirty_conns == []
    got = b""
    end = time.monotonic() + WAIT
    while conn.pipeline.out:
        assert time.monotonic() < end, "write not finished"
        try:
            got += b.recv(1 << 20)
        except BlockingIOError:
            pass
        rig.loop.turn(rig.now, 0.05)
    assert not conn.want_write and not rig.loop.wants_write(conn)
    assert rig.budget.buffered == 0
    assert stats.writes > 1 and stats.written == 2  # each request once, however many sends it took
    while not got.endswith(b"\r\n") or b"_mcbroker_fence_" not in got:
        try:
            got += b.recv(1 << 20)
        except BlockingIOError:
            assert time.monotonic() < end
    head, rest = got.split(b"\r\n", 1)
    assert re.fullmatch(rb"ms big 262144 .*O(\d+)", head), head
    assert rest[: len(value)] == value
    assert re.fullmatch(rb"\r\nmg _mcbroker_fence_ O\d+\r\nmg after v f s O\d+\r\nmg _mcbroker_fence_ O\d+\r\n", rest[len(value):])
    opaques = re.findall(rb"O(\d+)", head + rest[len(value):])
    b.sendall(b"HD O%s\r\nEN O%s\r\nEN O%s\r\nEN O%s\r\n" % tuple(opaques))
    rig.pump(lambda: len(rig.replies) == 2, "answer")
    assert rig.results(s) == [[Code.OK]] and rig.results(g) == [[Code.MISS]]
    rig.assert_nothing_in_flight()


def test_a_failed_write_fails_what_was_queued(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    b.close()
    g = rig.frame([[Op.GET, b"a"]])
    rig.loop.turn(rig.now, 0)
    assert conn.sock is None
    (result,) = rig.reply(g).payload
    # The failed write reads what waits in the socket first (answers would reach their requests):
    # here only the end of the stream, which names the failure.
    assert result == [Code.CONNECTION_ERROR, "127.0.0.1:11211 closed the connection"]
    assert rig.server.health.failures == 1 and conn.attempt == 1
    assert rig.server.stats.writes == 0
    rig.assert_nothing_in_flight()


@pytest.mark.parametrize("how", ["close, unix socket", "reset, tcp"])
def test_answers_waiting_when_a_write_fails_reach_their_requests(peer: Peer, how: str) -> None:
    # memcached answered a set (and the write's fence), then went away: a close on a unix socket
    # (the next write fails with EPIPE) or a reset on TCP (ECONNRESET), as a crash under load
    # leaves it. The loop writes a turn's requests before it reads (service.py), so the write
    # fails first; the answers already received must still reach their requests.
    if how.startswith("close"):
        near, far = socket.socketpair()
        rig = Rig("127.0.0.1:11211")
        conn = rig.plug(near)
    else:
        rig = Rig(peer.address)
        far = accept_ready(rig, peer, item_size_max="1048576")
        conn = rig.conn
    s = rig.frame([[Op.SET, b"k", b"v", 0, 0]])
    written = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    (set_opaque,) = re.findall(rb"^ms k .* O(\d+)\r\n", written, re.M)
    far.sendall(b"HD O%s\r\n" % set_opaque + fence_answers(written))
    if how.startswith("reset"):
        far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    far.close()
    # Until the close or reset has reached this end too (POLLHUP for a unix close, POLLERR and
    # POLLHUP for a TCP reset): the answers arrive first, and a loaded machine may take a while.
    hangup = select.poll()
    hangup.register(conn.sock, select.POLLHUP | select.POLLERR)
    assert hangup.poll(WAIT * 1000)
    g = rig.frame([[Op.GET, b"x"]])
    conn.flush(rig.now)  # as the loop does before reading
    assert conn.sock is None
    assert rig.results(s) == [[Code.OK]]  # answered before the failure: delivered
    ((code, reason),) = rig.reply(g).payload
    # The read stopped short of the stream's end (a read shorter than its buffer): the write's
    # error names the failure, counted once.
    assert code == Code.CONNECTION_ERROR and reason.startswith("write to 127.0.0.1:"), reason
    assert rig.server.health.failures == 1 and rig.server.stats.resets == 1
    rig.assert_nothing_in_flight()


def test_one_write_per_turn_counts_its_requests_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    rig.frame([[Op.GET, b"a"], [Op.GET, b"b"], [Op.GET, b"c"]])
    rig.loop.turn(rig.now, 0)
    assert not conn.pipeline.out and not conn.want_write
    snap = rig.server.snapshot()
    assert (snap["writes"], snap["requests_written"], snap["requests_per_write"]) == (1, 3, 3.0)
    assert snap["requests"] == 3 and snap["depth"] == 3 and rig.server.inflight == 3
    # Nothing more to write: a flush now writes nothing and counts nothing.
    conn.flush(rig.now)
    assert rig.server.stats.writes == 1


# --- health: mark-down, probes ------------------------------------------------------------------


def test_a_mark_down_fails_every_connections_requests_and_unpins(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(peer.address, connections=2, failure_limit=1)
    accept_ready(rig, peer, item_size_max="1048576")
    second = rig.server.conns[1]
    second.open(rig.now)
    far2 = peer.accept()
    w = read_until(rig, far2, rb"mg _mcbroker_fence_ O\d+\r\n")
    far2.sendall(settings_answer() + fence_answers(w))
    rig.pump(lambda: second.state == READY and not second.pipeline.queue, "second ready")
    s = rig.frame([[Op.SET, b"pinned", b"v", 0, 0]])
    assert rig.server.pinned
    rig.loop.turn(rig.now, 0)
    pinned_conn = rig.server.pinned[b"pinned"][0]
    other = next(c for c in rig.server.conns if c is not pinned_conn)
    with caplog.at_level(logging.ERROR, logger="mcbroker.pipeline"):
        other.failed(rig.now, "test failure", Code.CONNECTION_ERROR)
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == [
        f"{peer.address} marked down after 1 consecutive failures: test failure"
    ]
    assert rig.server.state is State.DOWN and rig.downs == [State.DOWN]
    assert all(c.sock is None for c in rig.server.conns) and not rig.loop.conns
    (result,) = rig.reply(s).payload
    # Written, maybe applied: CONNECTION_ERROR, never SERVER_DOWN.
    assert result == [Code.CONNECTION_ERROR, f"{peer.address} is down: test failure"]
    assert rig.server.pinned == {}
    rig.assert_nothing_in_flight()
    # Down: no reconnect on the timer, and a new request is refused without a connection.
    rig.server.tick(rig.now + 0.001, 1.0, 5.0)
    assert all(c.sock is None for c in rig.server.conns)
    assert rig.server.pick(b"x", rig.now + 1.0) is None


def test_a_failed_probe_keeps_the_server_down_without_counting_a_failure() -> None:
    port = closed_port()
    rig = Rig(f"127.0.0.1:{port}", failure_limit=1)
    rig.server.start(rig.now)
    rig.pump(lambda: rig.server.state is State.DOWN, "down")
    health = rig.server.health
    errors = rig.server.stats.errors
    rig.now = health.probe_at
    rig.server.tick(rig.now, 1.0, 5.0)
    assert rig.conn.probe and health.state is State.PROBING
    rig.pump(lambda: rig.conn.sock is None, "probe refused")
    assert health.state is State.DOWN and not rig.conn.probe
    assert health.probe_at > rig.now
    assert rig.server.stats.errors == errors and health.ejections == 1
    assert health.last_error.startswith(f"connect to 127.0.0.1:{port}: ")


def test_any_answer_to_the_probe_proves_the_server_alive(peer: Peer) -> None:
    rig = Rig(peer.address, failure_limit=1)
    conn = rig.conn
    conn.failed(rig.now, "before", Code.CONNECTION_ERROR)  # no socket yet: only counted
    assert rig.server.state is State.DOWN
    rig.now = rig.server.health.probe_at
    rig.server.tick(rig.now, 1.0, 5.0)
    far = peer.accept()
    w = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
    far.sendall(b"SERVER_ERROR out of memory\r\n" + fence_answers(w))
    rig.now += 0.5  # read later than the probe started
    rig.pump(lambda: rig.server.state is State.UP, "probe answered")
    assert not conn.probe and conn.state == READY
    assert rig.server.health.up_since == rig.now  # back up when the answer was read
    assert rig.server.item_size_max is None  # an error is no settings
    assert rig.downs == [State.DOWN, State.UP]


def test_retired_servers_neither_reconnect_nor_probe() -> None:
    rig = Rig(f"127.0.0.1:{closed_port()}", failure_limit=1)
    rig.server.retired = True
    rig.server.tick(rig.now, 1.0, 5.0)
    assert rig.conn.sock is None
    rig.conn.failed(rig.now, "x", Code.CONNECTION_ERROR)
    rig.server.tick(rig.server.health.probe_at + 1.0, 1.0, 5.0)
    assert rig.conn.sock is None and rig.server.state is State.DOWN


def test_a_failure_line_per_server_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(f"127.0.0.1:{closed_port()}", failure_limit=100)
    name = rig.server.name
    with caplog.at_level(logging.WARNING, logger="mcbroker.pipeline"):
        for i in range(3):
            rig.conn.open(rig.now + i)
            rig.conn.failed(rig.now + i, "refused", Code.CONNECTION_ERROR)
        rig.conn.open(rig.now + 10.5)
        rig.conn.failed(rig.now + 10.5, "refused", Code.CONNECTION_ERROR)
    lines = [r.message for r in caplog.records if "closing connection" in r.message]
    assert lines == [
        f"{name}: closing connection: refused (1 in flight)",
        f"{name}: closing connection: refused (1 in flight); 2 more failures like it in the last 10s",
    ]


# --- counters and the snapshot ------------------------------------------------------------------


def bucket_us(seconds: float) -> float:
    """The README's latency percentile: the smallest bucket bound (1 us, each 10% above the last)
    at or above the sample, in microseconds to 0.1."""
    i = 0
    while 1e-6 * 1.1**i < seconds:
        i += 1
    return round(1e-6 * 1.1**i * 1e6, 1)


def test_the_snapshot_names_each_counter_as_the_readme_does(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211", connections=1)
    conn = rig.plug(a)
    quiet = rig.server.snapshot()
    assert quiet == {
        "state": "up", "connections": 1, "depth": 0, "item_size_max": 1024 * 1024, "requests": 0, "errors": 0,
        "timeouts": 0, "resets": 0, "ejections": 0, "writes": 0, "requests_written": 0, "requests_per_write": 0.0,
        "latency_avg_us": 0.0, "latency_p50_us": None, "latency_p99_us": None, "latency_p999_us": None,
        "latency_samples": 0,
    }
    g1 = rig.frame([[Op.GET, b"a"], [Op.GET, b"b"]])  # opaques 1, 2, fence 3
    rig.loop.turn(rig.now, 0)
    assert rig.server.snapshot()["depth"] == 2
    g2 = rig.frame([[Op.GET, b"c"]])  # 4, fence 5
    rig.loop.turn(rig.now, 0)
    g3 = rig.frame([[Op.GET, b"d"]])  # 6, fence 7
    rig.loop.turn(rig.now, 0)
    (t1, _), (t2, _), (t3, _) = conn.marks
    # Write 1 answered 0.1 s after it, write 2 0.14691356 s after it; write 3 never.
    b.sendall(b"EN O1\r\nEN O2\r\nEN O3\r\n")
    rig.now = t1 + 0.1
    rig.pump(lambda: rig.server.latency.count == 1, "first write answered")
    b.sendall(b"EN O4\r\nEN O5\r\n")
    rig.now = t2 + 0.14691356
    rig.pump(lambda: rig.server.latency.count == 2, "second write answered")
    assert rig.results(g1) == [[Code.MISS]] * 2 and rig.results(g2) == [[Code.MISS]]
    assert [r.req_id for r in rig.replies] == [g1, g2]
    low, high = bucket_us(0.1), bucket_us(0.14691356)
    assert rig.server.latency_snapshot(rig.now) == {
        "latency_p50_us": low, "latency_p99_us": high, "latency_p999_us": high, "latency_samples": 2,
    }
    snap = rig.server.snapshot()  # at the real clock: the samples are recent
    assert snap == {
        "state": "up", "connections": 1, "depth": 1, "item_size_max": 1024 * 1024, "requests": 4, "errors": 0,
        "timeouts": 0, "resets": 0, "ejections": 0, "writes": 3, "requests_written": 4, "requests_per_write": 1.33,
        "latency_avg_us": 123456.8, "latency_p50_us": low, "latency_p99_us": high, "latency_p999_us": high,
        "latency_samples": 2,
    }
    # Nothing recorded for a whole window: no percentiles (the lifetime average stays).
    later = rig.server.latency_snapshot(rig.now + 25.0)
    assert later == {"latency_p50_us": None, "latency_p99_us": None, "latency_p999_us": None, "latency_samples": 0}
    assert g3 not in [r.req_id for r in rig.replies]


def test_the_snapshot_of_a_server_marked_down(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211", failure_limit=1)
    rig.plug(a)
    b.close()
    rig.conn.on_readable(rig.now)  # idle EOF: not counted
    assert rig.server.snapshot()["state"] == "up" and rig.server.snapshot()["resets"] == 1
    rig.conn.failed(rig.now, "refused", Code.CONNECTION_ERROR)
    snap = rig.server.snapshot()
    assert (snap["state"], snap["connections"], snap["errors"], snap["ejections"], snap["resets"]) == (
        "down", 0, 1, 1, 1,
    )


def test_silent_for_is_the_shortest_wait_of_the_connections_with_requests(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    c, d = socket.socketpair()
    try:
        rig = Rig("127.0.0.1:11211", connections=3)
        first, second, idle = rig.server.conns
        rig.plug(a, first)
        rig.plug(c, second)
        assert rig.server.silent_for(rig.now) == 0.0  # nothing waits
        rig.frame([[Op.GET, b"a"]])
        rig.frame([[Op.GET, b"b"]])  # a new turn: the idle connection
        rig.loop.turn(rig.now, 0)
        assert first.pipeline.inflight == second.pipeline.inflight == 1 and not idle.pipeline.inflight
        first.since, second.since, idle.since = 10.0, 12.0, 13.0
        assert rig.server.silent_for(20.0) == 8.0
    finally:
        c.close()
        d.close()


def test_pick_reopens_a_closed_connection_only_when_its_time_has_come() -> None:
    rig = Rig(f"127.0.0.1:{closed_port()}", connections=2)
    first, second = rig.server.conns
    first.reconnect_at, second.reconnect_at = rig.now + 1.0, rig.now + 2.0
    assert rig.server.pick(None, rig.now + 0.5) is None
    assert first.sock is None and second.sock is None
    assert rig.server.pick(b"k", rig.now + 1.0) is first
    assert first.state == CONNECTING and second.sock is None and first.connect_started == rig.now + 1.0
    assert rig.server.pinned == {b"k": [first, 1]}
    # The same key follows; another key takes the turn's connection.
    assert rig.server.pick(b"k", rig.now + 1.0) is first and rig.server.pinned[b"k"][1] == 2
    rig.server.batch_conn = None
    assert rig.server.pick(b"j", rig.now + 5.0) is first  # the open one, before any reopen
    assert second.sock is None


# --- more of connect, write and read -------------------------------------------------------------


def test_a_tcp_connection_is_non_blocking_with_nodelay_and_keepalive(peer: Peer) -> None:
    rig = Rig(peer.address)
    rig.conn.open(rig.now)
    sock = rig.conn.sock
    assert sock is not None and sock.family == socket.AF_INET
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert rig.conn.fd == sock.fileno() and rig.loop.conns == {sock.fileno(): rig.conn}


def test_an_ipv6_server_is_reached_over_ipv6() -> None:
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    try:
        rig = Rig(f"[::1]:{listener.getsockname()[1]}")
        rig.conn.open(rig.now)
        assert rig.conn.sock is not None and rig.conn.sock.family == socket.AF_INET6
        listener.settimeout(WAIT)
        far, _ = listener.accept()
        far.close()
    finally:
        listener.close()


def test_a_connect_refused_at_once_fails_at_once() -> None:
    rig = Rig("unix:/nonexistent-mcbroker-dir/mc.sock")
    rig.server.start(rig.now)
    assert rig.conn.sock is None and not rig.loop.conns
    assert rig.server.health.last_error == "connect to unix:/nonexistent-mcbroker-dir/mc.sock: ENOENT"
    assert rig.server.health.failures == 1 and rig.conn.attempt == 1
    rig.assert_nothing_in_flight()


def test_a_server_that_accepts_and_closes_at_once_is_failing(peer: Peer) -> None:
    rig = Rig(peer.address)
    rig.conn.open(rig.now)
    peer.accept().close()  # before answering `stats settings`: not an idle close
    rig.pump(lambda: rig.conn.sock is None, "EOF seen")
    assert rig.server.health.failures == 1 and rig.conn.attempt == 1
    assert rig.server.health.last_error == f"{peer.address} closed the connection"


def test_a_full_socket_buffer_writes_nothing_and_waits(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    filler = b"x" * 65536
    while True:  # fill the socket until it takes nothing
        try:
            a.send(filler)
        except BlockingIOError:
            break
    rig.frame([[Op.GET, b"a"]])
    rig.loop.turn(rig.now, 0)
    assert conn.sock is a and conn.want_write and rig.loop.wants_write(conn)
    assert rig.server.stats.writes == 0 and rig.server.stats.written == 0 and not conn.marks
    assert rig.budget.buffered == len(conn.pipeline.out) > 0


def test_a_later_write_does_not_restart_the_silence_of_earlier_requests(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    rig.frame([[Op.GET, b"a"]])
    rig.loop.turn(rig.now, 0)
    since = conn.since
    rig.frame([[Op.GET, b"b"]])
    rig.loop.turn(rig.now, 0)
    assert rig.server.stats.writes == 2 and len(conn.marks) == 2
    assert conn.since == since  # the first request still waits since its own write
    conn.check_timers(since + 2.001, 1.0, 2.0)
    assert conn.sock is None
    # Answers to the first write only would have taken one sample: both failed, none taken.
    assert not conn.marks and conn.sent_n == conn.answered_n == 0


def test_each_writes_latency_is_taken_when_its_last_answer_is_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    rig.frame([[Op.GET, b"a"], [Op.GET, b"b"]])  # opaques 1, 2, fence 3
    rig.loop.turn(rig.now, 0)
    rig.frame([[Op.GET, b"c"]])  # opaque 4, fence 5
    rig.loop.turn(rig.now, 0)
    (t1, m1), (t2, m2) = conn.marks
    assert (m1, m2) == (2, 3)
    b.sendall(b"EN O1\r\n")
    rig.now = t1 + 0.001
    rig.pump(lambda: conn.answered_n == 1, "one answer")
    assert rig.server.latency.count == 0  # the first write is not all answered
    b.sendall(b"EN O2\r\nEN O3\r\n")
    rig.now = t1 + 0.002
    rig.pump(lambda: rig.server.latency.count == 1, "first write answered")
    assert rig.server.latency.total == pytest.approx(0.002, abs=1e-9)
    b.sendall(b"EN O4\r\nEN O5\r\n")
    rig.now = t2 + 0.004
    rig.pump(lambda: rig.server.latency.count == 2, "second write answered")
    assert rig.server.latency.total == pytest.approx(0.006, abs=1e-9)
    assert not conn.marks and conn.answered_n == conn.sent_n == 3


def test_a_large_answer_is_read_whole_in_one_event(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    g = rig.frame([[Op.GET, b"big"]])  # opaque 1, fence 2
    rig.loop.turn(rig.now, 0)
    value = bytes(range(256)) * 3000  # 768,000 bytes: three reads of 256 KiB
    b.sendall(b"VA %d f0 s%d O1\r\n%s\r\nEN O2\r\n" % (len(value), len(value), value))
    conn.on_readable(rig.now)  # one readiness event
    assert rig.results(g) == [[Code.OK, value, 0]]
    assert conn.pipeline.inflight == 0


def test_the_server_close_fails_everything_in_flight_with_its_reason(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    rig = Rig("127.0.0.1:11211")
    conn = rig.plug(a)
    g = rig.frame([[Op.GET, b"a"]])
    rig.loop.turn(rig.now, 0)
    rig.server.close("server removed", Code.SHUTTING_DOWN)
    assert conn.sock is None and not rig.loop.conns and conn.state == DISCONNECTED
    assert rig.reply(g).payload == [[Code.SHUTTING_DOWN, "server removed"]]
    assert rig.server.health.failures == 0 and rig.server.stats.resets == 0
    rig.assert_nothing_in_flight()


def test_a_server_back_up_logs_its_next_failure_at_once(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(peer.address, failure_limit=1)
    with caplog.at_level(logging.WARNING, logger="mcbroker.pipeline"):
        rig.conn.open(rig.now)
        rig.conn.failed(rig.now, "first", Code.CONNECTION_ERROR)
        peer.accept().close()
        rig.now = rig.server.health.probe_at
        rig.server.tick(rig.now, 1.0, 5.0)
        far = peer.accept()
        w = read_until(rig, far, rb"mg _mcbroker_fence_ O\d+\r\n")
        far.sendall(settings_answer() + fence_answers(w))
        rig.pump(lambda: rig.server.state is State.UP, "probe answered")
        rig.conn.failed(rig.now + 1.0, "second", Code.CONNECTION_ERROR)  # within 10 s of the first line
    lines = [r.message for r in caplog.records if "closing connection" in r.message]
    assert [line.split(": closing connection: ")[1].split(" ")[0] for line in lines] == ["first", "second"]


def test_a_server_that_never_answers_stats_settings_is_reset_by_the_io_timeout(peer: Peer) -> None:
    rig = Rig(peer.address)
    conn = rig.conn
    conn.open(rig.now)
    far = peer.accept()
    read_until(rig, far, rb"stats settings\r\nmg _mcbroker_fence_ O\d+\r\n")  # read, never answered
    assert conn.state == READY
    conn.check_timers(conn.since + 2.001, 1.0, 2.0)
    assert conn.sock is None and rig.server.health.failures == 1
    assert rig.server.health.last_error.startswith(f"{peer.address} silent for 2.0s")


def test_tick_applies_the_connect_and_io_timeouts_to_open_connections(peer: Peer) -> None:
    rig = Rig(peer.address, connections=2, failure_limit=10)
    first, second = rig.server.conns
    far = accept_ready(rig, peer, item_size_max="1048576")
    rig.frame([[Op.GET, b"k"]])
    rig.loop.turn(rig.now, 0)
    read_until(rig, far, rb"mg k v f s O\d+\r\nmg _mcbroker_fence_ O\d+\r\n")  # never answered
    second.open(rig.now)  # never completes: the loop is not turned again
    # Each timer by its own timeout: io 3 s from the write, connect 1 s from the start.
    rig.server.tick(first.since + 2.9, 1.0, 3.0)
    assert first.state == READY and second.state == DISCONNECTED
    assert rig.server.health.last_error == f"connect to {peer.address} timed out"
    rig.server.tick(first.since + 3.001, 1.0, 3.0)
    assert first.sock is None
    assert rig.server.health.last_error.startswith(f"{peer.address} silent for 3.0s")
    assert rig.server.health.failures == 2


def test_a_pin_is_released_by_the_answer_of_its_last_request(peer: Peer) -> None:
    rig = Rig(peer.address)
    far = accept_ready(rig, peer, item_size_max="1048576")  # a pipeline made by open()
    s1 = rig.frame([[Op.SET, b"k", b"1", 0, 0]])
    s2 = rig.frame([[Op.SET, b"k", b"2", 0, 0]])  # follows the first onto its connection
    assert rig.server.pinned == {b"k": [rig.conn, 2]}
    rig.loop.turn(rig.now, 0)
    written = read_until(rig, far, rb"ms k .*\r\n2\r\nmg _mcbroker_fence_ O\d+\r\n")
    o = [int(x) for x in re.findall(rb"O(\d+)\r\n", written)]
    far.sendall(b"HD O%d\r\n" % o[-3])  # the first set's answer (held until the next proves it)
    rig.pump(lambda: rig.conn.pipeline.inflight == 1, "first set answered")
    assert rig.server.pinned == {b"k": [rig.conn, 1]}  # the second still holds it
    far.sendall(b"HD O%d\r\nEN O%d\r\n" % (o[-2], o[-1]))
    rig.pump(lambda: len(rig.replies) == 2, "both answered")
    assert rig.results(s1) == [[Code.OK]] and rig.results(s2) == [[Code.OK]]
    assert rig.server.pinned == {}


def test_reads_joined_across_connections_get_their_own_keys_answer(peer: Peer) -> None:
    # Both connections made by open(): the same opaques on each, the reads tagged per connection.
    rig = Rig(peer.address, connections=2)
    first, second = rig.server.conns
    far1 = accept_ready(rig, peer, item_size_max="1048576")
    second.open(rig.now)
    far2 = peer.accept()
    w = read_until(rig, far2, rb"mg _mcbroker_fence_ O\d+\r\n")
    far2.sendall(settings_answer() + fence_answers(w))
    rig.pump(lambda: second.state == READY and not second.pipeline.queue, "second ready")
    ga = rig.frame([[Op.GET, b"a"]])  # idle first: the first connection
    gb = rig.frame([[Op.GET, b"b"]])  # the idle one: the second
    rig.loop.turn(rig.now, 0)
    w1 = read_until(rig, far1, rb"mg a v f s O\d+\r\nmg _mcbroker_fence_ O\d+\r\n")
    w2 = read_until(rig, far2, rb"mg b v f s O\d+\r\nmg _mcbroker_fence_ O\d+\r\n")
    oa = re.search(rb"mg a v f s O(\d+)", w1)[1]  # type: ignore[index]
    ob = re.search(rb"mg b v f s O(\d+)", w2)[1]  # type: ignore[index]
    assert oa == ob  # the same opaque on both connections
    assert set(rig.server.reads) == {b"a", b"b"}  # in the server's table, which joins use
    gb2 = rig.frame([[Op.GET, b"b"]])  # joins b's read in flight: nothing more written
    gets_written = rig.server.stats.written
    far1.sendall(b"VA 1 f0 s1 O%s\r\nA\r\n" % oa + fence_answers(w1))
    rig.pump(lambda: len(rig.replies) == 1, "a answered")
    assert rig.results(ga) == [[Code.OK, b"A", 0]]
    far2.sendall(b"VA 1 f0 s1 O%s\r\nB\r\n" % ob + fence_answers(w2))
    rig.pump(lambda: len(rig.replies) == 3, "b answered")
    assert rig.results(gb) == [[Code.OK, b"B", 0]]
    assert rig.results(gb2) == [[Code.OK, b"B", 0]]
    assert rig.server.stats.written == gets_written and rig.server.reads == {}


def test_a_wrong_answer_to_stats_settings_resets_the_connection(peer: Peer) -> None:
    rig = Rig(peer.address)
    conn = rig.conn
    conn.open(rig.now)
    far = peer.accept()
    w = read_until(rig, far, rb"stats settings\r\nmg _mcbroker_fence_ O\d+\r\n")
    far.sendall(b"VERSION 1.6.18\r\n" + fence_answers(w))
    rig.pump(lambda: conn.sock is None, "reset")
    assert rig.server.item_size_max is None
    assert rig.server.health.last_error == f"{peer.address}: unexpected VERSION for a text command; pipeline reset"
    assert rig.server.health.failures == 1 and conn.attempt == 1
