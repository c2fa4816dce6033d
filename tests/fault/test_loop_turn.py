"""The order of work in one turn of the broker's loop (broker/service.py `run`), with both kinds of
event ready in the same turn: the test holds the loop just before its poll, lets memcached's side
and a worker's frame both arrive, then lets it go.

- A worker's get that arrives while a read of its key is in flight joins that read even when the
  read's answer is already waiting in the socket: the worker's frames are routed before the answers
  of busy connections are read (README "Hot keys and stampedes": read coalescing).
- A connection memcached closed while idle (its idle_timeout, a restart) is reset before the turn's
  frames are routed: none of them is put on it (each would fail unsent as "closed the connection",
  and the reset would count against the server's health). A busy connection's close is still read
  after the frames, like its answers: frames routed to it in that turn fail with it (before the
  reorder they could go to another connection). Telling a close from answers before reading them
  costs a system call per read event (a peek), which cost 4% of get_many's throughput.

- Requests routed in a turn are written to memcached before that turn's answers are read: memcached
  serves them while the loop parses the answers and replies (bench/README, tenth round). A write's
  latency is not negative when its answer is read in the turn that wrote it (the reads take the
  clock after the writes), while deadlines keep the turn's start: answers that arrive while a slow
  turn writes are read the next turn, and that wait is neither a timeout nor the server's silence.

A real Broker object in this process (ZeroMQ front end on a private ipc path) in front of the
scripted memcached of tests/fakemc.py.
"""

from __future__ import annotations

import select
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from broker import config as config_mod
from broker import service
from broker.connection import Connection
from broker.service import Broker
from broker.stats import LatencyWindow
from clientlib.wire import Code, Op, decode_reply, encode_request
from fakemc import FakeMemcached

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]


class Held:
    """A broker whose loop can be held before its next poll once `when()` holds."""

    def __init__(self, b: Broker) -> None:
        self.b = b
        self.when: Callable[[], bool] | None = None
        self.parked = threading.Event()
        self.go = threading.Event()
        self.overran = False  # the loop went on before the test let it go
        poll = b.poller.poll

        def held_poll(timeout: Any = None) -> Any:
            when = self.when
            if when is not None and when():
                self.when = None
                self.parked.set()
                # Longer than all the test's own waits while it holds the loop (5 + 10 + 10 s).
                if not self.go.wait(60):
                    self.overran = True
            return poll(timeout)

        b.poller.poll = held_poll  # type: ignore[method-assign]

    def arm(self, when: Callable[[], bool]) -> None:
        """Hold the loop before the first poll at which `when()` holds."""
        self.parked.clear()
        self.go.clear()
        self.when = when

    def wait(self) -> None:
        assert self.parked.wait(10), "the loop never reached the condition"

    # While the loop is parked its thread is outside every socket call, so the test thread may
    # look at the broker's sockets; these wait for what the held turn is to find ready, where a
    # fixed sleep would be too short on a loaded machine.

    def answers_waiting(self, socks: list[Any]) -> None:
        """Until every one of these memcached sockets is readable (answers, or the stream's end)."""
        assert socks, "no socket to wait for"
        end = time.monotonic() + 10
        while len(select.select(socks, [], [], 0.05)[0]) < len(socks):
            assert time.monotonic() < end, "memcached's side never reached the broker's sockets"

    def frame_waiting(self) -> None:
        """Until a worker's frame waits in the broker's ZeroMQ queue. The worker must have been
        answered once before: its handshake needs the loop, which is parked."""
        sock = self.b.front.sockets[0]
        end = time.monotonic() + 10
        while not sock.get(zmq.EVENTS) & zmq.POLLIN:
            assert time.monotonic() < end, "the frame never reached the broker's socket"
            time.sleep(0.005)


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    fake = FakeMemcached().start()
    d = tempfile.TemporaryDirectory(prefix="mcb-turn-")
    url = f"ipc://{d.name}/b.sock"
    conns = getattr(request, "param", 1)
    c = config_mod.from_mapping({
        "listen": [url], "servers": [fake.address], "connections_per_server": conns, "coalesce_reads": True,
    })
    b = Broker(c)
    held = Held(b)
    # run() installs signal handlers, which only the main thread may do (tests/integration/test_service_loop.py).
    monkeypatch.setattr(b, "_install_signals", lambda: None)
    monkeypatch.setattr(service.signal, "set_wakeup_fd", lambda *a, **k: -1)
    t = threading.Thread(target=b.run, kwargs={"ready_message": False}, daemon=True)
    t.start()
    sockets: list[zmq.Socket[Any]] = []

    def worker() -> zmq.Socket[Any]:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(url)
        sockets.append(s)
        return s

    try:
        yield {"broker": b, "fake": fake, "held": held, "worker": worker}
        assert not held.overran, "the loop was let go by its own timeout, not by the test"
    finally:
        held.when = None
        held.go.set()
        b._stop = True
        t.join(10)
        for s in sockets:
            s.close(0)
        fake.stop()
        d.cleanup()


def call(sock: zmq.Socket[Any], rid: int, ops: list[list[Any]]) -> list[Any]:
    sock.send(encode_request(rid, ops, 5000))
    return reply(sock, rid)


def reply(sock: zmq.Socket[Any], rid: int) -> list[Any]:
    assert sock.poll(10_000), "no reply"
    r = decode_reply(sock.recv())
    assert r.req_id == rid and r.code == Code.OK, r
    return list(r.payload)


def gets_of(fake: FakeMemcached, key: bytes) -> int:
    return sum(
        line.startswith(b"mg " + key + b" ") for cid in range(1, fake.accepted + 1) for line in fake.lines(cid)
    )


def test_a_get_arriving_with_the_answer_of_its_keys_read_joins_that_read(rig: dict[str, Any]) -> None:
    b: Broker = rig["broker"]
    fake: FakeMemcached = rig["fake"]
    held: Held = rig["held"]
    a, c = rig["worker"](), rig["worker"]()
    assert call(a, 1, [[Op.SET, b"k", b"v", 0, 0]]) == [[Code.OK]]
    assert call(c, 9, [[Op.PING]]) == [[Code.OK, "PONG"]]  # connected
    server = next(iter(b.servers.values()))
    before = fake.requests
    # Held once the get is written to memcached and still unanswered in the broker.
    held.arm(lambda: server.reads.get(b"k") is not None and not any(x.pipeline.out for x in server.conns))
    a.send(encode_request(2, [[Op.GET, b"k"]], 5000))
    held.wait()
    assert fake.wait_for_requests(before + 1)
    held.answers_waiting([x.sock for x in server.conns if x.pipeline.inflight])
    c.send(encode_request(3, [[Op.GET, b"k"]], 5000))
    held.frame_waiting()
    held.go.set()
    assert reply(a, 2) == [[Code.OK, b"v", 0]]
    assert reply(c, 3) == [[Code.OK, b"v", 0]]
    assert gets_of(fake, b"k") == 1  # the second get went nowhere: it joined the first
    assert b.router.stats.gets_coalesced == 1


@pytest.mark.parametrize("rig", [1, 2], indirect=True, ids=["1 connection", "2 connections"])
def test_connections_memcached_closed_while_idle_take_none_of_the_same_turns_frames(rig: dict[str, Any]) -> None:
    b: Broker = rig["broker"]
    fake: FakeMemcached = rig["fake"]
    held: Held = rig["held"]
    w = rig["worker"]()
    assert call(w, 1, [[Op.SET, b"k", b"v", 0, 0], [Op.SET, b"n", b"5", 0, 0]]) == [[Code.OK], [Code.OK]]
    assert call(w, 2, [[Op.GET, b"k"]]) == [[Code.OK, b"v", 0]]
    server = next(iter(b.servers.values()))
    # Held while idle; then memcached closes every connection, as in a restart.
    held.arm(lambda: not any(x.pipeline.inflight or x.pipeline.out for x in server.conns))
    held.wait()
    live = fake.live_connections()
    assert len(live) == len(server.conns)
    for cid in live:
        fake.close_connection(cid)
    held.answers_waiting([x.sock for x in server.conns])
    w.send(encode_request(3, [[Op.INCR, b"n", 1], [Op.GET, b"k"]], 5000))
    held.frame_waiting()
    held.go.set()
    assert reply(w, 3) == [[Code.OK, 6], [Code.OK, b"v", 0]]
    assert fake.store[b"n"][0] == b"6"
    assert call(w, 4, [[Op.GET, b"n"]]) == [[Code.OK, b"6", 0]]  # the turn above has ended
    assert server.health.failures == 0 and server.stats.errors == 0


def answer_waiting_and_a_new_get(
    rig: dict[str, Any], prepare: Callable[[], None], on_hold: Callable[[], None] = lambda: None,
) -> None:
    """One turn that reads the answer to worker a's get of k1 (waiting unread in the broker's
    socket) and routes worker c's get of k2: `prepare()` runs once both keys are stored, `on_hold()`
    just before the loop is let go; both replies are checked."""
    b: Broker = rig["broker"]
    fake: FakeMemcached = rig["fake"]
    held: Held = rig["held"]
    a, c = rig["worker"](), rig["worker"]()
    assert call(a, 1, [[Op.SET, b"k1", b"v1", 0, 0], [Op.SET, b"k2", b"v2", 0, 0]]) == [[Code.OK], [Code.OK]]
    assert call(c, 9, [[Op.PING]]) == [[Code.OK, "PONG"]]  # connected
    (conn,) = next(iter(b.servers.values())).conns
    prepare()
    before = fake.requests
    held.arm(lambda: conn.server.reads.get(b"k1") is not None and not conn.pipeline.out)
    a.send(encode_request(2, [[Op.GET, b"k1"]], 5000))
    held.wait()
    assert fake.wait_for_requests(before + 1)
    held.answers_waiting([conn.sock])  # k1's answer, unread
    c.send(encode_request(3, [[Op.GET, b"k2"]], 5000))
    held.frame_waiting()
    on_hold()
    held.go.set()
    assert reply(a, 2) == [[Code.OK, b"v1", 0]]
    assert reply(c, 3) == [[Code.OK, b"v2", 0]]


def test_a_turns_requests_are_written_before_its_answers_are_read(
    rig: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, int]] = []
    on_readable = Connection.on_readable

    def recording(self: Connection, now: float) -> None:
        # What is in flight, and what is still unwritten, when the answers are read.
        seen.append((self.pipeline.inflight, len(self.pipeline.out)))
        on_readable(self, now)

    answer_waiting_and_a_new_get(rig, lambda: monkeypatch.setattr(Connection, "on_readable", recording))
    # When k1's answer was read, k2's get (and its write's fence) had already gone out.
    assert seen[0] == (2, 0), seen


def test_a_write_answered_in_the_turn_it_was_written_has_no_negative_latency(
    rig: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake: FakeMemcached = rig["fake"]
    samples: list[float] = []
    record = LatencyWindow.record

    def recording(self: LatencyWindow, seconds: float, now: float) -> None:
        samples.append(seconds)
        record(self, seconds, now)

    slow: list[int] = []
    flush = Connection.flush

    def flush_then_wait(self: Connection, now: float) -> None:
        # memcached answers this write before the loop gets to read: both answers are read in the
        # turn that wrote the second request.
        flush(self, now)
        if slow:
            assert fake.wait_for_handled(slow.pop())  # answered: on loopback, in this end's socket

    reads: list[tuple[int, int]] = []
    on_readable = Connection.on_readable

    def counting(self: Connection, now: float) -> None:
        # Writes whose answers are still to come, before and after each read.
        before = len(self.marks)
        on_readable(self, now)
        reads.append((before, len(self.marks)))

    def prepare() -> None:
        monkeypatch.setattr(LatencyWindow, "record", recording)
        monkeypatch.setattr(Connection, "flush", flush_then_wait)
        monkeypatch.setattr(Connection, "on_readable", counting)

    answer_waiting_and_a_new_get(rig, prepare, lambda: slow.append(fake.requests + 2))  # k2's get, its fence
    assert not slow, "the turn's write was not flushed"
    end = time.monotonic() + 5
    while (2, 0) not in reads and time.monotonic() < end:
        time.sleep(0.01)  # the loop records a write's latency just after it delivers the answers
    assert (2, 0) in reads, reads  # one read took the answers of both writes, k2's in its own turn
    assert len(samples) >= 2 and min(samples) >= 0, samples


def test_answers_that_arrive_while_a_turn_writes_are_not_the_servers_silence(
    rig: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow turn (a loaded machine, a flood of frames) writes a get with a 50 ms deadline, and
    # memcached answers at once, after the turn's poll: the answer is read next turn. Deadlines
    # are checked against the turn's start, so the get is answered, not timed out, and the
    # server is not blamed for a silence that was the loop's.
    b: Broker = rig["broker"]
    fake: FakeMemcached = rig["fake"]
    w = rig["worker"]()
    assert call(w, 1, [[Op.SET, b"k", b"v", 0, 0]]) == [[Code.OK]]
    server = next(iter(b.servers.values()))
    slow: list[int] = []
    flush = Connection.flush

    def slow_flush(self: Connection, now: float) -> None:
        flush(self, now)
        if slow:
            # memcached has answered, and the turn goes on past the get's deadline.
            assert fake.wait_for_handled(slow.pop())
            time.sleep(0.1)

    monkeypatch.setattr(Connection, "flush", slow_flush)
    slow.append(fake.requests + 2)  # the get and its write's fence
    w.send(encode_request(2, [[Op.GET, b"k"]], 50))
    assert reply(w, 2) == [[Code.OK, b"v", 0]]
    assert not slow
    assert server.health.failures == 0 and server.stats.timeouts == 0


def test_a_bug_in_a_write_costs_its_connection_not_the_service(
    rig: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failed write reads the answers waiting in its socket, so the parser and the deliveries
    # run inside a flush too: an exception there is handled as one on a read event is.
    b: Broker = rig["broker"]
    w = rig["worker"]()
    assert call(w, 1, [[Op.SET, b"k", b"v", 0, 0]]) == [[Code.OK]]
    broken: list[bool] = []
    flush = Connection.flush

    def buggy_flush(self: Connection, now: float) -> None:
        if broken:
            broken.pop()
            raise RuntimeError("a bug")
        flush(self, now)

    monkeypatch.setattr(Connection, "flush", buggy_flush)
    broken.append(True)
    assert call(w, 2, [[Op.GET, b"k"]]) == [[Code.CONNECTION_ERROR, "internal error in the broker"]]
    assert b.router.stats.internal_errors == 1
    assert call(w, 3, [[Op.GET, b"k"]]) == [[Code.OK, b"v", 0]]  # the service goes on
