"""broker/front.py's Front in-process: its worker sockets (binding an ipc path with its mode and
directory, refusing a live broker's path), reading frames in bounded batches, replies (small, large
and tracked, to a worker that is gone), and counting worker connections under max_clients.

Real ZeroMQ sockets over ipc in a temporary directory; DEALERs stand for workers. No processes.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import front as front_mod
from broker.front import (
    DIR_MARKER,
    DIR_MODE,
    LARGE_REPLY,
    RCVHWM,
    AddressInUse,
    Front,
    SocketAccessError,
    max_message_size,
    receive_slack,
    resolve_group,
)

pytestmark = pytest.mark.unit

MAX_FRAME = 1 << 20
WAIT = 10.0  # seconds: a bound on waiting for ZeroMQ's I/O thread, never a measured duration


def wait_for(cond: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError(f"not within {WAIT} s: {what}")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mcb-front-") as d:
        yield Path(d)


class Rig:
    def __init__(self, ctx: zmq.Context[Any], sockdir: Path, **kw: Any) -> None:
        self.ctx = ctx
        self.path = sockdir / "run" / "broker.sock"
        self.url = f"ipc://{self.path}"
        self.front = Front(ctx, (self.url,), MAX_FRAME, **kw)
        self.sock = self.front.sockets[0]
        self.workers: list[zmq.Socket[Any]] = []

    def worker(self, ident: bytes, reconnect: bool = True) -> zmq.Socket[Any]:
        w = self.ctx.socket(zmq.DEALER)
        w.setsockopt(zmq.IDENTITY, ident)
        w.setsockopt(zmq.LINGER, 0)
        if not reconnect:
            w.setsockopt(zmq.RECONNECT_IVL, -1)
        w.connect(self.url)
        self.workers.append(w)
        return w

    def take(self, n: int, limit: int = 1000, max_bytes: int = 1 << 30) -> list[tuple[bytes, bytes]]:
        """recv_batch until n frames came (each call as the loop makes it: socket readable)."""
        got: list[tuple[bytes, bytes]] = []

        def more() -> bool:
            if self.sock.poll(10, zmq.POLLIN):
                got.extend(self.front.recv_batch(self.sock, limit, max_bytes))
            return len(got) >= n

        wait_for(more, f"{n} frames")
        return got

    def settle(self, cond: Callable[[], Any], what: str) -> None:
        """Wait until `cond` holds, taking ZeroMQ's accept and disconnect events before each look."""

        def check() -> Any:
            self.front.poll_workers()
            return cond()

        wait_for(check, what)

    def drop(self, w: zmq.Socket[Any]) -> None:
        """A worker leaves: its socket closed, no longer the rig's to close."""
        w.close(linger=0)
        self.workers.remove(w)

    def close(self) -> None:
        for w in self.workers:
            w.close(linger=0)
        self.front.close()


@pytest.fixture
def rig(ctx: zmq.Context[Any], sockdir: Path) -> Iterator[Rig]:
    r = Rig(ctx, sockdir)
    yield r
    r.close()


# --- the formulas the module documents --------------------------------------------------------


@pytest.mark.parametrize("max_frame, expected", [(1, 2), (65536, 131072), (4 << 20, (4 << 20) + 65536)])
def test_max_message_size_leaves_up_to_64_kib_over_max_frame(max_frame: int, expected: int) -> None:
    assert max_message_size(max_frame) == expected


def test_receive_slack_is_rcvhwm_queued_plus_one_held_plus_one_read_per_socket() -> None:
    assert RCVHWM == 2
    assert receive_slack(1, 100) == (2 + 1 + 1) * 100
    assert receive_slack(64, 500_000) == 64 * 4 * 500_000
    assert receive_slack(0, 500_000) == 0


def test_resolve_group() -> None:
    assert resolve_group("") is None
    assert resolve_group("0") == 0
    assert resolve_group("4242") == 4242
    assert resolve_group("root") == 0
    with pytest.raises(SocketAccessError, match="socket_group 'no-such-group-mcb': no such group on this host"):
        resolve_group("no-such-group-mcb")


# --- binding an ipc path ------------------------------------------------------------------------


def test_ipc_socket_gets_its_mode_and_a_0750_directory_that_close_removes(rig: Rig, sockdir: Path) -> None:
    st = os.stat(rig.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE(os.stat(rig.path.parent).st_mode) == DIR_MODE == 0o750
    assert (rig.path.parent / DIR_MARKER).exists()
    assert rig.front.created_dirs == [str(rig.path.parent)]
    rig.close()
    assert not rig.path.exists() and not rig.path.parent.exists()
    assert sockdir.exists()  # not created by the broker: left alone


def test_a_directory_that_was_there_is_kept_on_close(ctx: zmq.Context[Any], sockdir: Path) -> None:
    (sockdir / "run").mkdir()
    r = Rig(ctx, sockdir, socket_mode=0o600)
    assert stat.S_IMODE(os.stat(r.path).st_mode) == 0o600
    assert r.front.created_dirs == []
    r.close()
    assert not r.path.exists() and (sockdir / "run").is_dir()


def test_a_directory_left_by_a_killed_broker_is_known_by_its_marker(ctx: zmq.Context[Any], sockdir: Path) -> None:
    run = sockdir / "run"
    run.mkdir()
    (run / DIR_MARKER).touch()
    r = Rig(ctx, sockdir)
    assert r.front.created_dirs == [str(run)]
    r.close()
    assert not run.exists()


def test_a_stale_socket_file_is_replaced(ctx: zmq.Context[Any], sockdir: Path) -> None:
    run = sockdir / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / "broker.sock"))
    stale.close()  # the file stays, nobody listens
    r = Rig(ctx, sockdir)
    try:
        w = r.worker(b"w")
        w.send(b"hello")
        assert r.take(1) == [(b"w", b"hello")]
    finally:
        r.close()


def test_a_live_brokers_path_is_refused(ctx: zmq.Context[Any], sockdir: Path) -> None:
    r = Rig(ctx, sockdir)
    try:
        with pytest.raises(AddressInUse, match=f"another process is already listening on ipc://{r.path}"):
            Front(ctx, (r.url,), MAX_FRAME)
        # The running one still serves.
        w = r.worker(b"w")
        w.send(b"still here")
        assert r.take(1) == [(b"w", b"still here")]
    finally:
        r.close()


def test_a_path_that_is_not_a_socket_is_refused_and_kept(ctx: zmq.Context[Any], sockdir: Path) -> None:
    run = sockdir / "run"
    run.mkdir()
    (run / "broker.sock").write_text("not a socket")
    with pytest.raises(AddressInUse, match="exists and is not a socket"):
        Front(ctx, (f"ipc://{run / 'broker.sock'}",), MAX_FRAME)
    assert (run / "broker.sock").read_text() == "not a socket"


def test_a_second_address_in_use_closes_the_first(ctx: zmq.Context[Any], sockdir: Path) -> None:
    first = Rig(ctx, sockdir)
    try:
        other = sockdir / "other" / "b.sock"
        with pytest.raises(AddressInUse):
            Front(ctx, (f"ipc://{other}", first.url), MAX_FRAME)
        assert not other.exists() and not other.parent.exists()
    finally:
        first.close()


# --- frames in ------------------------------------------------------------------------------------


def test_frames_come_as_identity_and_data_pairs_in_order(rig: Rig) -> None:
    a, b = rig.worker(b"a"), rig.worker(b"b")
    a.send(b"a1")
    got = rig.take(1)
    b.send(b"b1")
    got += rig.take(1)
    assert got == [(b"a", b"a1"), (b"b", b"b1")]
    assert rig.front.recv_batch(rig.sock, 10, 1 << 20) == []  # never waits


def test_recv_batch_takes_at_most_limit_frames(rig: Rig) -> None:
    w = rig.worker(b"w")
    w.setsockopt(zmq.SNDHWM, 100)
    for i in range(3):
        w.send(b"%d" % i)
    wait_for(lambda: rig.sock.poll(10, zmq.POLLIN), "a frame")
    first = rig.front.recv_batch(rig.sock, 1, 1 << 20)
    assert first == [(b"w", b"0")]
    rest = rig.take(2)
    assert rest == [(b"w", b"1"), (b"w", b"2")]


def test_recv_batch_stops_once_max_bytes_were_read(rig: Rig) -> None:
    w = rig.worker(b"w")
    frames = [b"x" * 100, b"y" * 100, b"z" * 100]
    for f in frames:
        w.send(f)
    got: list[tuple[bytes, bytes]] = []
    batches: list[int] = []

    def more() -> bool:
        if rig.sock.poll(10, zmq.POLLIN):
            batch = rig.front.recv_batch(rig.sock, 100, 150)
            batches.append(len(batch))
            got.extend(batch)
        return len(got) == 3

    wait_for(more, "three frames")
    # The frame that reaches 150 bytes is the last of its batch: never more than 2 per call.
    assert [d for _, d in got] == frames and max(batches) <= 2
    assert rig.front.frames_read == 3


def test_a_message_of_more_than_one_part_is_dropped_and_counted(rig: Rig) -> None:
    w = rig.worker(b"w")
    w.send_multipart([b"part1", b"part2"])
    w.send(b"good")
    assert rig.take(1) == [(b"w", b"good")]
    assert rig.front.bad_envelopes == 1
    assert rig.front.frames_read == 1  # the frames handed out only


# --- replies --------------------------------------------------------------------------------------


def test_a_reply_reaches_the_worker_that_sent_the_frame(rig: Rig) -> None:
    a, b = rig.worker(b"a"), rig.worker(b"b")
    a.send(b"ping")
    b.send(b"ping")
    got = rig.take(2)
    for ident, _ in got:
        assert rig.front.send(rig.sock, ident, b"reply to " + ident) is True
    assert a.poll(int(WAIT * 1000)) and a.recv() == b"reply to a"
    assert b.poll(int(WAIT * 1000)) and b.recv() == b"reply to b"


def test_a_reply_to_a_worker_that_is_gone_is_dropped_without_an_error(rig: Rig) -> None:
    assert rig.front.send(rig.sock, b"nobody", b"reply") is False
    assert rig.front.send(rig.sock, b"nobody", b"x" * LARGE_REPLY) is False
    assert rig.front.reply_bytes == 0


def test_a_large_reply_is_counted_until_zeromq_has_sent_it(rig: Rig) -> None:
    w = rig.worker(b"w")
    w.send(b"ping")
    rig.take(1)
    big = b"v" * LARGE_REPLY
    assert rig.front.send(rig.sock, b"w", big) is True
    assert w.poll(int(WAIT * 1000)) and w.recv() == big

    def reaped() -> bool:
        rig.front.reap()
        return rig.front.reply_bytes == 0

    wait_for(reaped, "the large reply reaped")
    assert rig.front._peer_bytes == {}


def test_large_replies_past_the_per_worker_limit_are_dropped_and_counted(ctx: zmq.Context[Any], sockdir: Path) -> None:
    # A worker that does not read: its large replies wait in ZeroMQ, counted in bytes.
    r = Rig(ctx, sockdir, reply_limit=LARGE_REPLY * 3)
    try:
        w = r.worker(b"w")
        w.setsockopt(zmq.RCVHWM, 1)
        w.send(b"ping")
        r.take(1)
        # The limit for one worker is at least 64 MiB or 4 x max_frame, but never more than the
        # limit for all.
        assert r.front.peer_reply_limit == LARGE_REPLY * 3
        sent = [r.front.send(r.sock, b"w", b"v" * LARGE_REPLY) for _ in range(20)]
        held = r.front.reply_bytes
        assert held <= LARGE_REPLY * 3
        assert sent.count(False) == r.front.replies_over_limit >= 1
    finally:
        r.close()


def test_set_reply_limit_gives_each_worker_the_larger_of_64_mib_and_4_max_frames_within_the_total(rig: Rig) -> None:
    f = rig.front
    f.set_reply_limit(1 << 30, 1 << 20)
    assert (f.reply_limit, f.peer_reply_limit) == (1 << 30, 64 << 20)
    f.set_reply_limit(1 << 30, 32 << 20)
    assert f.peer_reply_limit == 128 << 20
    f.set_reply_limit(16 << 20, 1 << 20)
    assert f.peer_reply_limit == 16 << 20


# --- worker connections and max_clients --------------------------------------------------------


def test_workers_are_counted_as_they_connect_and_leave(rig: Rig) -> None:
    a = rig.worker(b"a")
    rig.worker(b"b")
    wait_for(lambda: rig.front.poll_workers() == 2, "two workers")
    rig.drop(a)
    wait_for(lambda: rig.front.poll_workers() == 1, "one worker left")
    assert rig.front.workers == 1


def test_past_max_clients_a_new_connection_is_refused_when_admitted(ctx: zmq.Context[Any], sockdir: Path) -> None:
    r = Rig(ctx, sockdir, max_clients=1)
    try:
        first = r.worker(b"first")
        first.send(b"hello")
        assert r.take(1) == [(b"first", b"hello")]
        wait_for(lambda: r.front.poll_workers() == 1, "the first worker")
        second = r.worker(b"second")
        r.settle(lambda: r.front._pending, "the second connection pending")
        r.front.admit()
        assert r.front.clients_refused == 1 and r.front.workers == 1
        # The served worker still gets its replies.
        assert r.front.send(r.sock, b"first", b"reply") is True
        assert first.poll(int(WAIT * 1000)) and first.recv() == b"reply"
        r.drop(second)
    finally:
        r.close()


def test_a_pending_connection_gets_a_slot_freed_before_admit(ctx: zmq.Context[Any], sockdir: Path) -> None:
    r = Rig(ctx, sockdir, max_clients=1)
    try:
        first = r.worker(b"first")
        wait_for(lambda: r.front.poll_workers() == 1, "the first worker")
        r.worker(b"second")
        r.settle(lambda: r.front._pending, "the second connection pending")
        r.drop(first)
        # The first one's disconnect comes before admit() settles the second: it takes the slot.
        r.settle(lambda: not r.front._live, "the first worker gone")
        r.front.admit()
        assert r.front.clients_refused == 0 and r.front.workers == 1
    finally:
        r.close()


def test_a_descriptor_reused_on_another_socket_keeps_its_slot_whatever_order_the_monitors_are_read(rig: Rig) -> None:
    # Each listening socket has its own monitor. A worker on the ipc socket (0) closes; its
    # descriptor 7 is reused at once by a worker accepted on the tcp socket (1); poll_workers can
    # read socket 1's accept before socket 0's disconnect. Seen once in test_max_clients: a late
    # disconnect keyed by the descriptor alone freed the served worker's slot, and a ninth worker
    # past max_clients = 8 was served.
    f = rig.front
    f.connection_event(0, zmq.EVENT_ACCEPTED, 7)
    f.connection_event(1, zmq.EVENT_ACCEPTED, 7)
    f.connection_event(0, zmq.EVENT_DISCONNECTED, 7)
    assert f.workers == 1
    # The usual order counts the same.
    f.connection_event(0, zmq.EVENT_ACCEPTED, 8)
    f.connection_event(0, zmq.EVENT_DISCONNECTED, 8)
    f.connection_event(1, zmq.EVENT_ACCEPTED, 8)
    assert f.workers == 2
    f.connection_event(1, zmq.EVENT_DISCONNECTED, 7)
    f.connection_event(1, zmq.EVENT_DISCONNECTED, 8)
    assert f.workers == 0


def test_admit_skips_a_pending_connection_whose_peer_closed_and_still_settles_the_next(ctx: zmq.Context[Any], sockdir: Path) -> None:
    # Two connections wait for admit() with every slot taken: the older one's peer has closed
    # (its disconnect event not read yet), the newer one is open. The closed one is skipped and
    # the open one is still refused: it must not be left unsettled behind the closed one.
    r = Rig(ctx, sockdir, max_clients=1)
    closed_a, closed_b = socket.socketpair()
    open_a, open_b = socket.socketpair()
    try:
        closed_b.close()
        f = r.front
        f.connection_event(0, zmq.EVENT_ACCEPTED, 1_000_000)  # the served one (no such descriptor)
        f.connection_event(0, zmq.EVENT_ACCEPTED, closed_a.fileno())
        f.connection_event(0, zmq.EVENT_ACCEPTED, open_a.fileno())
        assert list(f._pending) == [(0, closed_a.fileno()), (0, open_a.fileno())]
        f.admit()
        # Refused (counted; the socketpair is not accepted on the listener, so it is not shut down).
        assert f.clients_refused == 1 and f.workers == 1 and not f._pending
        assert open_b.send(b"x") == 1
    finally:
        for s in (closed_a, open_a, open_b):
            s.close()
        r.close()


def test_monitors_are_one_per_socket(rig: Rig) -> None:
    assert len(rig.front.monitors) == len(rig.front.sockets) == 1
    assert isinstance(rig.front.monitors, tuple)


def test_front_module_names_its_limits() -> None:
    # The figures the README's flood section rests on.
    assert front_mod.SNDHWM == 1_000 and front_mod.LARGE_REPLY == 65536 and front_mod.PEER_REPLY_BYTES == 64 << 20


# --- socket_group: the group of the socket and of its directory ------------------------------------


def test_socket_group_is_given_to_the_socket_and_the_directory_it_creates(ctx: zmq.Context[Any], sockdir: Path) -> None:
    # A numeric group needs no entry in /etc/group (as chgrp takes it); root may give any group.
    r = Rig(ctx, sockdir, socket_group="4242")
    try:
        assert (os.stat(r.path).st_gid, os.stat(r.path).st_uid) == (4242, os.getuid())  # the owner stays
        assert (os.stat(r.path.parent).st_gid, os.stat(r.path.parent).st_uid) == (4242, os.getuid())
        assert stat.S_IMODE(os.stat(r.path).st_mode) == 0o660
        assert os.stat(sockdir).st_gid != 4242  # a directory it did not create keeps its group
    finally:
        r.close()


def test_every_directory_it_created_is_removed_on_close(ctx: zmq.Context[Any], sockdir: Path) -> None:
    urls = (f"ipc://{sockdir / 'one' / 'a.sock'}", f"ipc://{sockdir / 'two' / 'b.sock'}")
    f = Front(ctx, urls, MAX_FRAME)
    assert sorted(f.created_dirs) == [str(sockdir / "one"), str(sockdir / "two")]
    f.close()
    assert sorted(os.listdir(sockdir)) == []


def test_nested_directories_it_creates_all_get_the_mode_and_group(ctx: zmq.Context[Any], sockdir: Path) -> None:
    path = sockdir / "a" / "b" / "broker.sock"
    f = Front(ctx, (f"ipc://{path}",), MAX_FRAME, socket_group="4242")
    try:
        for d in (sockdir / "a", sockdir / "a" / "b"):
            st = os.stat(d)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (DIR_MODE, 4242)
        assert f.created_dirs == [str(sockdir / "a" / "b"), str(sockdir / "a")]  # innermost first
    finally:
        f.close()
    assert not (sockdir / "a").exists()


def _reach_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "socket_group cannot reach" in r.getMessage()]


@pytest.mark.parametrize(
    "dir_mode, group, warned",
    [
        (0o700, "", True),  # nobody but the owner may enter
        (0o701, "", False),  # others may enter
        (0o710, "", False),  # the group may enter, and the socket keeps the directory's group
        (0o710, "4242", True),  # the group may enter, but it is not the socket's group
        (0o750, "4242", True),
    ],
)
def test_a_directory_the_socket_group_cannot_enter_is_warned_about(
    ctx: zmq.Context[Any], sockdir: Path, caplog: pytest.LogCaptureFixture, dir_mode: int, group: str, warned: bool
) -> None:
    run = sockdir / "run"
    run.mkdir()
    os.chmod(run, dir_mode)
    with caplog.at_level(logging.WARNING, logger="mcbroker.front"):
        f = Front(ctx, (f"ipc://{run / 'b.sock'}",), MAX_FRAME, socket_group=group)
    f.close()
    got = _reach_warnings(caplog)
    if not warned:
        assert got == []
        return
    gid = os.stat(run).st_gid
    assert got == [
        f"socket_group cannot reach {run / 'b.sock'}: its directory {run} is mode {dir_mode:04o} group {gid} (needs group x)"
    ]


def test_a_directory_of_the_socket_group_that_it_may_enter_is_fine(
    ctx: zmq.Context[Any], sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = sockdir / "run"
    run.mkdir()
    os.chown(run, -1, 4242)
    os.chmod(run, 0o710)
    with caplog.at_level(logging.WARNING, logger="mcbroker.front"):
        f = Front(ctx, (f"ipc://{run / 'b.sock'}",), MAX_FRAME, socket_group="4242")
    f.close()
    assert _reach_warnings(caplog) == []


# --- tcp -----------------------------------------------------------------------------------------------


def test_a_tcp_listener_serves_and_a_second_one_on_its_port_is_refused(ctx: zmq.Context[Any]) -> None:
    f = Front(ctx, ("tcp://127.0.0.1:*",), MAX_FRAME)
    try:
        endpoint = f.sockets[0].getsockopt_string(zmq.LAST_ENDPOINT)
        assert f.created_dirs == []
        w = ctx.socket(zmq.DEALER)
        w.setsockopt(zmq.IDENTITY, b"t")
        w.setsockopt(zmq.LINGER, 0)
        w.connect(endpoint)
        w.send(b"over tcp")
        got: list[tuple[bytes, bytes]] = []

        def more() -> bool:
            if f.sockets[0].poll(10, zmq.POLLIN):
                got.extend(f.recv_batch(f.sockets[0], 10, 1 << 20))
            return bool(got)

        wait_for(more, "a frame over tcp")
        assert got == [(b"t", b"over tcp")]
        w.close(linger=0)
        with pytest.raises(AddressInUse, match=f"^another process is already listening on {endpoint}$"):
            Front(ctx, (endpoint,), MAX_FRAME)
    finally:
        f.close()


# --- replies: the byte bounds of large replies, exactly --------------------------------------------


class _Tracker:
    def __init__(self) -> None:
        self.done = False


class _HeldSocket:
    """A worker socket whose large replies ZeroMQ has not written yet (their trackers stay not
    done until the test says so): only the arithmetic of the bounds is under test here."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.trackers: list[_Tracker] = []

    def send(self, data: bytes, flags: int = 0, copy: bool = True, track: bool = False) -> _Tracker | None:
        self.sent.append((data[:8], len(data)))
        if track:
            t = _Tracker()
            self.trackers.append(t)
            return t
        return None


def test_large_replies_are_bounded_per_worker_and_in_all_exactly(rig: Rig) -> None:
    f = rig.front
    n = LARGE_REPLY
    f.peer_reply_limit = 3 * n
    f.reply_limit = 5 * n
    sock: Any = _HeldSocket()
    big = b"v" * n
    # Up to the bound itself is allowed; one byte more is not.
    assert [f.send(sock, b"a", big) for _ in range(4)] == [True, True, True, False]
    assert (f.reply_bytes, f._peer_bytes, f.replies_over_limit) == (3 * n, {b"a": 3 * n}, 1)
    assert [f.send(sock, b"b", big) for _ in range(3)] == [True, True, False]  # 5 n in all
    assert (f.reply_bytes, f._peer_bytes[b"b"], f.replies_over_limit) == (5 * n, 2 * n, 2)
    # One of a's written: its bytes are free again, for a and in all.
    sock.trackers[0].done = True
    f.reap()
    assert (f.reply_bytes, f._peer_bytes) == (4 * n, {b"a": 2 * n, b"b": 2 * n})
    assert f.send(sock, b"a", big) is True
    assert f._peer_bytes[b"a"] == 3 * n
    for t in sock.trackers:
        t.done = True
    f.reap()
    assert (f.reply_bytes, f._peer_bytes) == (0, {})
    # A reply just under LARGE_REPLY is a small one: neither tracked nor counted.
    assert f.send(sock, b"a", b"s" * (n - 1)) is True
    assert f.reply_bytes == 0


def test_a_large_reply_already_written_when_sent_is_not_counted(rig: Rig) -> None:
    f = rig.front

    class Written(_HeldSocket):
        def send(self, data: bytes, flags: int = 0, copy: bool = True, track: bool = False) -> _Tracker | None:
            t = super().send(data, flags, copy, track)
            if t is not None:
                t.done = True
            return t

    assert f.send(Written(), b"a", b"v" * LARGE_REPLY) is True  # type: ignore[arg-type]
    assert (f.reply_bytes, f._peer_bytes, f._large) == (0, {}, [])


# --- replies to workers that are gone or do not read ---------------------------------------------------


def test_replies_to_a_worker_that_does_not_read_are_dropped_never_blocking(rig: Rig) -> None:
    w = rig.worker(b"slow")
    w.setsockopt(zmq.RCVHWM, 1)
    w.send(b"ping")
    rig.take(1)
    # SNDHWM (1,000) replies wait for a worker; past that (and what the sockets buffer), dropped.
    results = [rig.front.send(rig.sock, b"slow", b"r" * 1000) for _ in range(5000)]
    assert results.count(False) > 0 and results[0] is True


def test_a_reply_to_a_worker_that_is_gone_is_not_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mcbroker.front"):
        assert rig.front.send(rig.sock, b"gone", b"reply") is False
        assert rig.front.send(rig.sock, b"gone", b"v" * LARGE_REPLY) is False
    assert [r for r in caplog.records if "reply dropped" in r.getMessage()] == []


def test_every_bad_envelope_is_counted(rig: Rig) -> None:
    w = rig.worker(b"w")
    for i in range(3):
        w.send_multipart([b"x%d" % i, b"y"])
    w.send(b"good")
    got = rig.take(1)
    assert got == [(b"w", b"good")]
    assert rig.front.bad_envelopes == 3


# --- max_clients: refusals, logged once per interval ----------------------------------------------------


def test_each_refusal_is_counted_and_logged_with_the_cap(
    ctx: zmq.Context[Any], sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = Rig(ctx, sockdir, max_clients=1)
    try:
        r.worker(b"first")
        wait_for(lambda: r.front.poll_workers() == 1, "the first worker")
        with caplog.at_level(logging.WARNING, logger="mcbroker.front"):
            for n in (2, 3):
                # A refused DEALER reconnects after 100 ms: a test thread held off the CPU that long
                # would find the reconnect pending too, and count three refusals.
                r.worker(b"extra%d" % n, reconnect=False)
                r.settle(lambda: r.front._pending, "a connection pending")
                r.front.admit()
        assert r.front.clients_refused == 2 and r.front.workers == 1
        lines = [rec.getMessage() for rec in caplog.records if "max_clients" in rec.getMessage()]
        # The second within the rate limit's interval is held back, not logged.
        assert lines == [
            "max_clients (1) reached: new worker connections are shut down, their calls time out; clients_refused 1"
        ]
        # Each refused connection's own disconnect is taken and leaves the served one counted.
        r.settle(lambda: not r.front._refusing, "the refused connections gone")
        assert r.front.workers == 1
    finally:
        r.close()


def test_an_admitted_connection_is_counted_until_it_leaves(ctx: zmq.Context[Any], sockdir: Path) -> None:
    r = Rig(ctx, sockdir, max_clients=1)
    try:
        first = r.worker(b"first")
        wait_for(lambda: r.front.poll_workers() == 1, "the first worker")
        gone = r.worker(b"gone")
        r.settle(lambda: len(r.front._pending) == 1, "one pending")
        later = r.worker(b"later")
        r.settle(lambda: len(r.front._pending) == 2, "two pending")
        r.drop(gone)
        r.drop(first)
        r.settle(lambda: not r.front._live, "the first worker gone")
        # The pending connection that closed leaves the queue with its disconnect event.
        r.settle(lambda: len(r.front._pending) == 1, "one pending left")
        r.front.admit()
        # The slot the first one freed goes to the one still waiting.
        assert r.front.workers == 1 and r.front.clients_refused == 0
        r.drop(later)
        wait_for(lambda: r.front.poll_workers() == 0, "no worker left")
    finally:
        r.close()
