"""The client's transport without a broker: request ids, stale replies, deadlines, framing, fail-fast,
fork reset and error mapping, driven through a scripted stand-in for the ZeroMQ socket.

The stand-in replaces only the DEALER socket object (send / recv / setsockopt / poll); everything
above it is the real Transport and Client code. The end-to-end behaviour against a real broker is
in tests/integration/test_client_faults.py and test_client_fail_fast.py.
"""

from __future__ import annotations

import os
import tempfile
import threading
import types
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

from clientlib import Client
from clientlib import transport as transport_mod
from clientlib.errors import (
    BrokerOverloaded, BrokerTimeout, BrokerUnavailable, MemcacheClientError, MemcacheError,
    MemcacheIllegalInputError, MemcacheServerError, MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError, ProtocolMismatch, ServerUnavailable,
)
from clientlib.transport import GRACE, MAX_OPS_PER_FRAME, Transport, build_frames, gather
from clientlib.wire import NOREPLY, Code, Op, encode_error, encode_reply

pytestmark = pytest.mark.unit

# README "Errors" and wire.py's Code comments: which exception each failure code is.
RAISES: dict[Code, type[MemcacheError]] = {
    Code.SERVER_ERROR: MemcacheServerError,
    Code.CLIENT_ERROR: MemcacheClientError,
    Code.UNKNOWN_COMMAND: MemcacheUnknownCommandError,
    Code.CONNECTION_ERROR: MemcacheUnexpectedCloseError,
    Code.TIMEOUT: BrokerTimeout,
    Code.OVERLOADED: BrokerOverloaded,
    Code.SERVER_DOWN: ServerUnavailable,
    Code.BAD_REQUEST: MemcacheClientError,
    Code.UNSUPPORTED_VERSION: ProtocolMismatch,
    Code.SHUTTING_DOWN: BrokerUnavailable,
}


class FakeSocket:
    """A DEALER stand-in: records decoded frames; answers with `responder(frame)` (a list of reply
    bytes, possibly for other ids) or from `replies`; recv with nothing queued is a timeout."""

    def __init__(self, responder: Callable[[list[Any]], list[bytes]] | None = None) -> None:
        self.sent: list[list[Any]] = []
        self.replies: deque[bytes] = deque()
        self.responder = responder
        self.closed = False
        self.rcvtimeo: int | None = None
        self.setsockopt_calls = 0
        self.send_again = 0  # the next n sends raise zmq.Again (no connection up)
        self.send_error: Exception | None = None
        self.reconnects = 0
        self.polls = 0

    def send(self, data: bytes, flags: int = 0, copy: bool = True) -> None:
        if self.send_error is not None:
            raise self.send_error
        if self.send_again:
            self.send_again -= 1
            raise zmq.Again()
        frame = msgpack.unpackb(data)
        self.sent.append(frame)
        if self.responder is not None:
            self.replies.extend(self.responder(frame))

    def recv(self, flags: int = 0, copy: bool = True) -> bytes:
        if not self.replies:
            raise zmq.Again()  # what RCVTIMEO expiring looks like
        return self.replies.popleft()

    def setsockopt(self, option: int, value: int) -> None:
        self.setsockopt_calls += 1
        if option == zmq.RCVTIMEO:
            self.rcvtimeo = value

    def poll(self, timeout: int, flags: int) -> int:
        self.polls += 1
        return 1  # writable: the next send decides

    def disconnect(self, url: str) -> None:
        self.reconnects += 1

    def connect(self, url: str) -> None:
        pass

    def close(self, linger: int | None = None) -> None:
        self.closed = True


def each_op(ops: list[list[Any]]) -> list[list[Any]]:
    """The schema's rule (clientlib/wire.py): a lone GET_MANY op is answered as one GET per key."""
    if len(ops) == 1 and ops[0][0] == Op.GET_MANY:
        return [[Op.GET, key] for key in ops[0][1]]
    return ops


def echo_hits(frame: list[Any]) -> list[bytes]:
    """A broker where every GET hits with the key as value and everything else is OK."""
    _, rid, _, flags, ops = frame
    ops = each_op(ops)
    if flags & NOREPLY:
        return []
    return [encode_reply(rid, [[Code.OK, op[1], 0] if op[0] == Op.GET else [Code.OK] for op in ops])]


@pytest.fixture
def url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mcb-unit-") as d:
        yield f"ipc://{d}/nobody.sock"


def install(t: Transport, sock: FakeSocket, first_id: int = 1000) -> FakeSocket:
    st = t._state()
    st.sock = sock  # type: ignore[assignment]
    st.gen = t._gen
    st.next_id = first_id
    st.rcvtimeo = -2
    return sock


# --- request ids and replies ------------------------------------------------------------------


def test_ids_advance_by_one_per_frame(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits), first_id=1000)
    for key in (b"a", b"b", b"c"):
        assert t.request1([Op.GET, key], 900, 1.0) == [[Code.OK, key, 0]]
    assert [f[1] for f in sock.sent] == [1001, 1002, 1003]
    assert t.request([[Op.GET, b"x"], [Op.GET, b"y"]], 900, 1.0) == [[Code.OK, b"x", 0], [Code.OK, b"y", 0]]
    assert sock.sent[-1][1] == 1004


def test_ids_wrap_at_64_bits(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits), first_id=(1 << 64) - 1)
    t.request1([Op.GET, b"a"], 900, 1.0)
    assert sock.sent[0][1] == 0


def test_each_thread_has_its_own_socket_and_ids(url: str) -> None:
    t = Transport(url)
    main = install(t, FakeSocket(echo_hits), first_id=1)
    other = FakeSocket(echo_hits)

    def work() -> None:
        install(t, other, first_id=500)
        t.request1([Op.GET, b"b"], 900, 1.0)

    th = threading.Thread(target=work)
    th.start()
    th.join()
    t.request1([Op.GET, b"a"], 900, 1.0)
    assert [f[1] for f in main.sent] == [2] and [f[1] for f in other.sent] == [501]


def test_a_new_socket_starts_at_a_random_48_bit_id(url: str) -> None:
    firsts = set()
    for _ in range(5):
        t = Transport(url)
        sock, st = t._socket()  # a real DEALER, connecting to nothing
        firsts.add(st.next_id)
        assert 0 <= st.next_id < 1 << 48
        t.close()
    assert len(firsts) > 1


def test_a_late_reply_to_an_earlier_call_is_discarded(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(), first_id=10)
    with pytest.raises(BrokerTimeout):
        t.request1([Op.GET, b"first"], 900, 0.01)  # nothing answers: id 11 gives up
    # The broker now answers both: the stale reply to 11 arrives first.
    sock.responder = lambda f: [encode_reply(11, [[Code.OK, b"stale", 0]]), *echo_hits(f)]
    assert t.request1([Op.GET, b"second"], 900, 1.0) == [[Code.OK, b"second", 0]]
    assert t.request([[Op.GET, b"m1"], [Op.GET, b"m2"]], 900, 1.0) == [[Code.OK, b"m1", 0], [Code.OK, b"m2", 0]]


def test_malformed_reply_for_our_id_is_a_protocol_mismatch(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(lambda f: [msgpack.packb([1, f[1], 0, "not a list"])]))
    with pytest.raises(ProtocolMismatch):
        t.request1([Op.GET, b"a"], 900, 1.0)
    sock.responder = lambda f: [msgpack.packb([1, f[1], 0, [[Code.OK], [Code.OK]]])]  # 2 results for 1 op
    with pytest.raises(ProtocolMismatch):
        t.request1([Op.GET, b"a"], 900, 1.0)


def test_malformed_reply_for_nobody_is_skipped(url: str) -> None:
    t = Transport(url)
    install(t, FakeSocket(lambda f: [b"\xc1garbage", msgpack.packb([9, 1]), *echo_hits(f)]))
    assert t.request1([Op.GET, b"a"], 900, 1.0) == [[Code.OK, b"a", 0]]


@pytest.mark.parametrize("code", [c for c in Code if c >= Code.SERVER_ERROR], ids=lambda c: c.name)
def test_a_refused_frame_raises_its_error(url: str, code: Code) -> None:
    t = Transport(url)
    install(t, FakeSocket(lambda f: [encode_error(f[1], code, f"refused {code.name}")]))
    with pytest.raises(MemcacheError) as info:
        t.request1([Op.GET, b"a"], 900, 1.0)
    assert type(info.value) is RAISES[code] and code.name in str(info.value)
    with pytest.raises(RAISES[code]):
        t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 1.0)


# --- deadlines ---------------------------------------------------------------------------------


def test_no_answer_is_a_broker_timeout_with_the_deadline_as_receive_timeout(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clock stands still: a pause of the test process between the transport's clock reads
    # would otherwise shorten the receive timeout by the pause.
    monkeypatch.setattr(transport_mod, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    t = Transport(url)
    sock = install(t, FakeSocket())
    with pytest.raises(BrokerTimeout) as info:
        t.request1([Op.GET, b"a"], 900, 0.5)
    assert isinstance(info.value, TimeoutError)
    assert sock.rcvtimeo is not None and abs(sock.rcvtimeo - (0.5 + GRACE) * 1000) <= 5
    with pytest.raises(BrokerTimeout):
        t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 0.5)


def test_receive_timeout_is_not_reset_on_every_call(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The transport's clock stands still, so every call has the same time left: a pause of the
    # test process over RCVTIMEO_SLACK_MS (5 ms) between two clock reads, which a loaded machine
    # gives, rightly resets the timeout (and once more the call after), and is not what is counted.
    monkeypatch.setattr(transport_mod, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits))
    for _ in range(50):
        t.request1([Op.GET, b"a"], 900, 1.0)
    assert sock.setsockopt_calls <= 2  # set once, kept while within a few ms of the deadline


def test_the_broker_is_told_a_slightly_earlier_deadline(url: str) -> None:
    # So its explicit TIMEOUT answer (with partial results of a fan-out) beats the client's own.
    c = Client(url, timeout=1.0)
    sock = install(c._transport, FakeSocket(echo_hits))  # type: ignore[arg-type]
    c.get("a")
    c.timeout = 0.1
    c.get("a")
    c.timeout = 10
    c.get("a")
    assert [f[2] for f in sock.sent] == [975, 95, 9975]


# --- framing -----------------------------------------------------------------------------------


def test_frames_split_by_size_and_op_count_and_results_come_back_in_order() -> None:
    ids = iter(range(1, 1000))
    ops = [[Op.SET, b"k%d" % i, b"x" * 1000, 0, 0] for i in range(40)]
    frames = build_frames(ops, 900, 0, 8000, ids.__next__)
    assert len(frames) > 1 and all(len(data) <= 8000 for _, data, _ in frames)
    assert sum(n for _, _, n in frames) == 40
    sent_ops = [op for _, data, _ in frames for op in msgpack.unpackb(data)[4]]
    assert sent_ops == [[int(o[0]), *o[1:]] for o in ops]
    many = build_frames([[Op.GET, b"k"]] * (MAX_OPS_PER_FRAME + 1), 900, 0, 1 << 30, iter(range(5)).__next__)
    assert [n for _, _, n in many] == [MAX_OPS_PER_FRAME, 1]
    replies = {rid: (0, [[Code.OK, b"%d" % rid, 0]] * n) for rid, _, n in frames}
    assert [r[1] for r in gather(frames, replies)] == [b"%d" % rid for rid, _, n in frames for _ in range(n)]


def test_a_get_many_splits_into_get_many_frames_by_key_count_and_size() -> None:
    keys = [b"key-%05d" % i for i in range(MAX_OPS_PER_FRAME + 5)]
    by_count = build_frames([[Op.GET_MANY, keys]], 900, 0, 1 << 30, iter(range(1, 99)).__next__)
    assert [n for _, _, n in by_count] == [MAX_OPS_PER_FRAME, 5]
    by_size = build_frames([[Op.GET_MANY, keys[:300]]], 900, 0, 1000, iter(range(1, 99)).__next__)
    assert len(by_size) > 1 and all(len(data) <= 1000 for _, data, _ in by_size)
    sent = []
    for rid, data, n in by_count + by_size:
        version, req_id, timeout_ms, flags, ops = msgpack.unpackb(data)
        assert (version, req_id, timeout_ms, flags, len(ops), ops[0][0], len(ops[0][1])) == (1, rid, 900, 0, 1, Op.GET_MANY, n)
        sent += ops[0][1]
    assert sent == keys + keys[:300]
    with pytest.raises(MemcacheIllegalInputError, match="frame limit"):
        build_frames([[Op.GET_MANY, [b"k" * 200, b"j" * 200]]], 900, 0, 150, iter(range(5)).__next__)


def test_one_op_over_the_frame_limit_is_refused() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="frame limit"):
        build_frames([[Op.SET, b"k", b"x" * 5000, 0, 0]], 900, 0, 4000, iter(range(5)).__next__)


def test_request_splits_and_gathers(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits))
    keys = [b"key-%03d" % i for i in range(300)]
    got = t.request([[Op.GET, k] for k in keys], 900, 1.0, max_frame_bytes=1024)
    assert got == [[Code.OK, k, 0] for k in keys]
    assert len(sock.sent) > 1


def test_noreply_returns_at_once_and_says_so_in_the_frame(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits))
    assert t.request([[Op.SET, b"k", b"v", 0, 0]], 900, 1.0, noreply=True) is None
    assert sock.sent[0][3] == NOREPLY and not sock.replies


# --- no broker: fail fast, recover at once ----------------------------------------------------


def test_send_that_would_block_with_nobody_listening_fails_at_once(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits))
    sock.send_again = 1
    with pytest.raises(BrokerUnavailable, match="does not exist"):
        t.request1([Op.GET, b"a"], 900, 5.0)
    assert sock.polls == 0  # did not wait for the deadline
    assert t._state().saw_down


def test_when_the_broker_is_back_the_socket_reconnects_at_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits))
    sock.send_again = 1
    with pytest.raises(BrokerUnavailable):
        t.request1([Op.GET, b"a"], 900, 5.0)
    monkeypatch.setattr(t._probe, "down_reason", lambda: None)  # now something listens
    sock.send_again = 1
    assert t.request1([Op.GET, b"a"], 900, 5.0) == [[Code.OK, b"a", 0]]
    assert sock.reconnects == 1 and not t._state().saw_down


def test_a_broker_that_is_there_but_not_connected_gets_the_deadline(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket(echo_hits))
    monkeypatch.setattr(t._probe, "down_reason", lambda: None)
    sock.send_again = 10**9  # never connects
    monkeypatch.setattr(sock, "poll", lambda timeout, flags: 0)
    # Something listens (no down reason): slow, not absent, so a timeout (errors.py's BrokerTimeout).
    with pytest.raises(BrokerTimeout, match="before the call's deadline"):
        t.request1([Op.GET, b"a"], 900, 0.05)


def test_probe_verdict_is_reused_briefly(url: str) -> None:
    probe = transport_mod._Probe(url)
    calls = []
    real = probe._check

    def counted() -> str | None:
        calls.append(1)
        return real()

    probe._check = counted
    for _ in range(100):
        assert probe.down_reason() is not None
    assert len(calls) <= 3  # 100 calls within a few ms: one check per PROBE_TTL


# --- errors at the edge ------------------------------------------------------------------------


def test_a_zeromq_error_leaves_as_broker_unavailable(url: str) -> None:
    t = Transport(url)
    sock = install(t, FakeSocket())
    sock.send_error = zmq.ZMQError(zmq.EINVAL)
    with pytest.raises(BrokerUnavailable) as info:
        t.request1([Op.GET, b"a"], 900, 1.0)
    assert url in str(info.value)


def test_client_ignore_exc_turns_a_failed_get_into_the_default(url: str) -> None:
    c = Client(url, timeout=0.05, ignore_exc=True)
    install(c._transport, FakeSocket())  # type: ignore[arg-type]
    assert c.get("a", default=b"d") == b"d"
    assert c.get_many(["a", "b"]) == {}
    with pytest.raises(BrokerTimeout):
        c.set("a", b"1")  # writes still raise
    with pytest.raises(MemcacheIllegalInputError):
        c.get("bad key")


# --- fork ----------------------------------------------------------------------------------------


def test_a_forked_child_never_uses_the_parents_socket(url: str) -> None:
    t = Transport(url)
    parent_sock = install(t, FakeSocket(echo_hits))
    t.request1([Op.GET, b"a"], 900, 1.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            try:
                t.request1([Op.GET, b"child"], 900, 1.0)
                out = "answered"
            except BrokerUnavailable:
                out = "unavailable"  # its own new socket, to where nothing listens
            fresh = t._state().sock
            same = fresh is parent_sock
            os.write(w, f"{out} {same} {len(parent_sock.sent)} {t._pid == os.getpid()}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    assert got == "unavailable False 1 True"
    assert t.request1([Op.GET, b"b"], 900, 1.0) == [[Code.OK, b"b", 0]]  # the parent's is intact
    assert len(parent_sock.sent) == 2


def test_malformed_reply_for_an_earlier_call_is_skipped(url: str) -> None:
    # A malformed reply that names another request's id answers nobody waiting now: skipped, as a
    # late well-formed one is; only a malformed reply for our own id is a ProtocolMismatch.
    t = Transport(url)
    install(t, FakeSocket(lambda f: [msgpack.packb([1, f[1] - 1, 0, "not a list"]), *echo_hits(f)]), first_id=50)
    assert t.request1([Op.GET, b"a"], 900, 1.0) == [[Code.OK, b"a", 0]]
    assert t.request([[Op.GET, b"m1"], [Op.GET, b"m2"]], 900, 1.0) == [[Code.OK, b"m1", 0], [Code.OK, b"m2", 0]]
