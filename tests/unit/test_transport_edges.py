"""The transport's edges that test_transport.py's scripted socket does not reach: the fail-fast
probe (is anything listening at a tcp or ipc address?), the reconnect backoff after refused
connections and the hint a timeout gets, the process's ZeroMQ context and the fork reset, and the
asyncio transport's one socket per event loop.

In-process only: loopback TCP and unix sockets, ZeroMQ over ipc (test_client_peer.py's ROUTER peer),
no subprocess. Expected values come from the rules written in clientlib/transport.py's comments
and docstrings (quoted where used) and from the OS (strerror), not from the code's output.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from clientlib import transport as transport_mod
from clientlib.errors import BrokerTimeout, BrokerUnavailable, MemcacheServerError, ProtocolMismatch
from clientlib.transport import (
    BACKOFF_RESET, build_frames, PROBE_SLICE_MAX, PROBE_TTL, RECONNECT_IVL, RECONNECT_IVL_MAX, AsyncTransport, Transport,
    _Backoff, _ErrorMap, _Probe,
)
from clientlib.wire import Code, Op, encode_reply
from test_client_peer import VALUES, Answer, Peer, peer, store  # noqa: F401 - the peer fixture, shared
from test_transport import FakeSocket, echo_hits, install
from timing import FAST, FAST_DEADLINE, LATE

pytestmark = pytest.mark.unit

# The words of REFUSED_HINT that say what happened (the rest is advice).
DOWN_AT_DEADLINE = "the connection to the broker was down at the deadline"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def tmpdir_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mcb-unit-") as d:
        yield d


def closed_tcp_port(host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET) -> int:
    """A loopback port where nothing listens (bound once, then released)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


# --- the probe: is anything listening? ---------------------------------------------------------


def test_tcp_probe_names_the_address_where_nothing_listens() -> None:
    port = closed_tcp_port()
    reason = _Probe(f"tcp://127.0.0.1:{port}").down_reason()
    assert reason is not None
    assert "nothing listens" in reason and f"127.0.0.1 port {port}" in reason
    assert os.strerror(errno.ECONNREFUSED).lower() in reason  # the OS's word, as a clause


def test_tcp_probe_finds_a_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert _Probe(f"tcp://127.0.0.1:{port}").down_reason() is None


def test_tcp_probe_takes_a_bracketed_ipv6_address() -> None:
    # ZeroMQ's tcp endpoints write an IPv6 address in brackets: tcp://[::1]:port.
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as srv:
        port = srv.getsockname()[1]
        assert _Probe(f"tcp://[::1]:{port}").down_reason() is None
    port = closed_tcp_port("::1", socket.AF_INET6)
    reason = _Probe(f"tcp://[::1]:{port}").down_reason()
    assert reason is not None and f"::1 port {port}" in reason and "[" not in reason


def test_tcp_probe_of_a_name_that_does_not_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    # No DNS on these machines: the resolver's failure is scripted (socket.gaierror, an OSError).
    def no_such_name(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    reason = _Probe("tcp://broker.invalid:5555").down_reason()
    assert reason is not None and "cannot resolve broker.invalid" in reason


def test_tcp_probe_tries_every_address_of_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name with several addresses (say IPv6 and IPv4 for localhost): something listening at any
    # one of them may be the broker; only when none answers is nobody there.
    refused = closed_tcp_port()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        listening = srv.getsockname()[1]

        def addresses(*ports: int) -> Callable[..., Any]:
            def fake(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
                assert host == "broker.example" and port == 5555 and kwargs.get("type") == socket.SOCK_STREAM
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in ports]
            return fake

        monkeypatch.setattr(socket, "getaddrinfo", addresses(refused, listening))
        assert _Probe("tcp://broker.example:5555").down_reason() is None
        monkeypatch.setattr(socket, "getaddrinfo", addresses(listening, refused))
        assert _Probe("tcp://broker.example:5555").down_reason() is None
    monkeypatch.setattr(socket, "getaddrinfo", addresses(refused, closed_tcp_port()))
    reason = _Probe("tcp://broker.example:5555").down_reason()
    assert reason is not None and "nothing listens on broker.example port 5555" in reason


def test_probe_of_a_transport_it_cannot_check_never_says_down() -> None:
    # inproc:// (and any other scheme): the OS cannot be asked, so the call gets its deadline.
    assert _Probe("inproc://mcbroker").down_reason() is None


def test_ipc_probe_reads_the_path_after_the_scheme(tmpdir_path: str) -> None:
    path = os.path.join(tmpdir_path, "b.sock")
    reason = _Probe(f"ipc://{path}").down_reason()
    assert reason is not None and reason.startswith(f"{path} does not exist")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen(1)
        assert _Probe(f"ipc://{path}").down_reason() is None


def test_probe_checks_on_first_use_and_again_after_its_ttl(tmpdir_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]  # 0.0 + PROBE_TTL - 0.0 == PROBE_TTL exactly
    monkeypatch.setattr(transport_mod, "time", _FakeTime(clock))
    probe = _Probe(f"ipc://{tmpdir_path}/b.sock")
    checks: list[int] = []
    real = probe._check
    probe._check = lambda: checks.append(1) or real()
    assert probe.down_reason() is not None and len(checks) == 1  # the first call checks
    assert probe.down_reason() is not None and len(checks) == 1  # reused within PROBE_TTL
    clock[0] += PROBE_TTL
    assert probe.down_reason() is not None and len(checks) == 2  # "reused for PROBE_TTL", not longer


class _FakeTime:
    """Stands in for the `time` module inside clientlib.transport: monotonic() reads `clock[0]`."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def monotonic(self) -> float:
        return self.clock[0]


# --- backoff after refused connections ---------------------------------------------------------


class BackoffSocket:
    """What _Backoff touches on a socket: EVENTS, RECONNECT_IVL, disconnect / connect."""

    def __init__(self, events: int = 0) -> None:
        self.closed = False
        self.events = events
        self.calls: list[tuple[Any, ...]] = []

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS
        return self.events

    def setsockopt(self, option: int, value: int) -> None:
        self.calls.append(("setsockopt", option, value))

    def disconnect(self, url: str) -> None:
        self.calls.append(("disconnect", url))

    def connect(self, url: str) -> None:
        self.calls.append(("connect", url))


URL = "ipc:///run/mcbroker/mcbroker.sock"


def test_backoff_doubles_up_to_the_max_and_reconnects_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # transport.py: "its reconnect interval doubles, up to RECONNECT_IVL_MAX"; "reconnect for it to
    # apply". Intervals written out from the rule: 50 ms doubled, and on.
    clock = [500.0]
    monkeypatch.setattr(transport_mod, "time", _FakeTime(clock))
    b, sock = _Backoff(), BackoffSocket(events=zmq.POLLIN)  # readable but not writable: no connection up
    got = []
    for _ in range(7):
        hint = b.after_timeout(sock, URL)  # type: ignore[arg-type]
        assert DOWN_AT_DEADLINE in hint
        got.append(b.ivl)
        assert sock.calls == [("setsockopt", zmq.RECONNECT_IVL, b.ivl), ("disconnect", URL), ("connect", URL)]
        sock.calls.clear()
        clock[0] += 1.0
    assert got == [100, 200, 400, 800, 1000, 1000, 1000]
    assert RECONNECT_IVL == 50 and RECONNECT_IVL_MAX == 1000


def test_backoff_starts_again_when_the_last_timeout_is_older_than_the_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    # "starts again from RECONNECT_IVL when the last such timeout is older than BACKOFF_RESET"
    clock = [500.0]
    monkeypatch.setattr(transport_mod, "time", _FakeTime(clock))
    b, sock = _Backoff(), BackoffSocket()
    b.after_timeout(sock, URL)  # type: ignore[arg-type]
    clock[0] += BACKOFF_RESET  # exactly BACKOFF_RESET later: not older, so it doubles on
    b.after_timeout(sock, URL)  # type: ignore[arg-type]
    assert b.ivl == 200
    clock[0] += BACKOFF_RESET + 0.5
    b.after_timeout(sock, URL)  # type: ignore[arg-type]
    assert b.ivl == 100


def test_backoff_leaves_a_connected_or_closed_socket_alone() -> None:
    # Writable (POLLOUT, with IMMEDIATE: a connection is up): "the broker is slow, not refusing".
    b = _Backoff()
    sock = BackoffSocket(events=zmq.POLLOUT | zmq.POLLIN)
    assert b.after_timeout(sock, URL) == "" and sock.calls == [] and b.ivl == 0  # type: ignore[arg-type]
    sock.closed = True
    sock.events = 0
    assert b.after_timeout(sock, URL) == "" and sock.calls == [] and b.ivl == 0  # type: ignore[arg-type]


# --- the error map: a timeout's hint -------------------------------------------------------------


class Owner:
    def __init__(self, hint: str = "; HINT", fail: bool = False) -> None:
        self.hint, self.fail, self.calls = hint, fail, 0

    def on_timeout(self) -> str:
        self.calls += 1
        if self.fail:
            raise RuntimeError("hint failed")
        return self.hint


def test_a_timeout_gets_the_hint_appended_and_other_errors_do_not() -> None:
    o = Owner()
    m = _ErrorMap(URL, o.on_timeout)
    with pytest.raises(BrokerTimeout) as info:
        with m:
            raise zmq.Again()
    assert str(info.value).endswith("; HINT") and URL in str(info.value)
    assert isinstance(info.value.__cause__, zmq.Again)
    ours = BrokerTimeout("deadline", "second")
    with pytest.raises(BrokerTimeout) as info:
        with m:
            raise ours
    assert info.value is ours and ours.args == ("deadline; HINT", "second")
    with pytest.raises(BrokerUnavailable) as unavailable:
        with m:
            raise zmq.ZMQError(errno.EINVAL)
    assert "HINT" not in str(unavailable.value)
    with pytest.raises(MemcacheServerError):
        with m:
            raise MemcacheServerError("boom")
    assert o.calls == 2


@pytest.mark.parametrize("args", [(), (5,)], ids=["no-args", "not-text"])
def test_a_timeout_without_a_text_message_is_raised_unchanged(args: tuple[Any, ...]) -> None:
    o = Owner()
    err = BrokerTimeout(*args)
    with pytest.raises(BrokerTimeout) as info:
        with _ErrorMap(URL, o.on_timeout):
            raise err
    assert info.value is err and err.args == args


@pytest.mark.parametrize("kind", [{"hint": ""}, {"fail": True}], ids=["empty-hint", "hint-fails"])
def test_a_hint_never_replaces_or_changes_the_timeout_when_it_has_nothing(kind: dict[str, Any]) -> None:
    owner = Owner(**kind)
    with pytest.raises(BrokerTimeout) as info:
        with _ErrorMap(URL, owner.on_timeout):
            raise BrokerTimeout("no reply")
    assert info.value.args == ("no reply",) and owner.calls == 1


def test_the_error_map_holds_its_owner_weakly() -> None:
    # _ErrorMap: "Held weakly ... a strong reference back to it would make a cycle that keeps a
    # dropped Client's socket ... open until the cyclic garbage collector runs".
    o = Owner()
    m = _ErrorMap(URL, o.on_timeout)
    ref = weakref.ref(o)
    del o
    assert ref() is None
    with pytest.raises(BrokerTimeout) as info:
        with m:
            raise BrokerTimeout("no reply")
    assert info.value.args == ("no reply",)


def test_a_dropped_transport_is_freed_without_the_cycle_collector(tmpdir_path: str) -> None:
    gc.collect()
    gc.disable()
    try:
        t = Transport(f"ipc://{tmpdir_path}/b.sock")
        sock, _ = t._socket()
        ref = weakref.ref(t)
        del t
        assert ref() is None
    finally:
        gc.enable()
    sock.close(linger=0)


# --- the blocking transport's timeout: backoff and hint ------------------------------------------


class EventsSocket(FakeSocket):
    """test_transport.py's scripted DEALER, with EVENTS (POLLOUT while a connection is up)."""

    def __init__(self, responder: Any = None, connected: bool = True) -> None:
        super().__init__(responder)
        self.connected = connected
        self.ivl: int | None = None

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLOUT if self.connected else 0

    def setsockopt(self, option: int, value: int) -> None:
        super().setsockopt(option, value)
        if option == zmq.RECONNECT_IVL:
            self.ivl = value


def test_a_timeout_with_no_connection_up_backs_off_and_says_so(tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, EventsSocket(connected=False))
    with pytest.raises(BrokerTimeout) as info:
        t.request1([Op.GET, b"a"], 900, 0.01)
    assert DOWN_AT_DEADLINE in str(info.value)
    assert sock.ivl == 2 * RECONNECT_IVL and sock.reconnects == 1
    with pytest.raises(BrokerTimeout) as info:
        t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 0.01)
    assert DOWN_AT_DEADLINE in str(info.value) and sock.ivl == 4 * RECONNECT_IVL


def test_a_timeout_with_a_connection_up_is_a_slow_broker(tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, EventsSocket(connected=True))
    with pytest.raises(BrokerTimeout) as info:
        t.request1([Op.GET, b"a"], 900, 0.01)
    assert DOWN_AT_DEADLINE not in str(info.value) and sock.ivl is None and sock.reconnects == 0


def test_no_hint_from_a_thread_without_a_socket_or_after_fork(tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    got: list[str] = []
    th = threading.Thread(target=lambda: got.append(t._on_timeout()))  # a thread that never called
    th.start()
    th.join(10)
    assert got == [""]
    t._state()  # this thread's state, no socket yet
    assert t._on_timeout() == ""
    sock = install(t, EventsSocket(connected=False))
    t._pid = os.getpid() + 1  # a socket inherited from the parent: never touched in the child
    assert t._on_timeout() == "" and sock.ivl is None and sock.reconnects == 0
    t._pid = os.getpid()
    assert DOWN_AT_DEADLINE in t._on_timeout()


def test_after_a_backoff_the_next_blocked_send_asks_for_a_connection_at_once(
    tmpdir_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _Backoff: "A call that finds no connection up still asks for one at once".
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, EventsSocket(echo_hits, connected=False))
    monkeypatch.setattr(t._probe, "down_reason", lambda: None)  # something listens
    sock.send_again = 1  # not connected yet: the first send would block
    assert t.request1([Op.GET, b"a"], 900, 1.0) == [[Code.OK, b"a", 0]]
    assert sock.reconnects == 0  # never backed off, never saw it down: ZeroMQ is connecting
    sock.responder = None
    with pytest.raises(BrokerTimeout):
        t.request1([Op.GET, b"a"], 900, 0.01)  # backs off (one reconnect)
    sock.responder = echo_hits
    sock.send_again = 1
    assert t.request1([Op.GET, b"b"], 900, 1.0) == [[Code.OK, b"b", 0]]
    assert sock.reconnects == 2


# --- the blocking send while no connection is up -------------------------------------------------


class SlowClock:
    """The transport's clock, advanced by each poll's timeout (a socket that never becomes writable)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.polls: list[int] = []

    def monotonic(self) -> float:
        return self.now

    def poll(self, timeout: int, flags: int) -> int:
        assert flags == zmq.POLLOUT
        self.polls.append(timeout)
        self.now += timeout / 1000
        return 0


def test_a_blocked_send_waits_in_slices_growing_to_the_max_then_times_out(
    tmpdir_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "the check runs again after slices growing from PROBE_TTL to [PROBE_SLICE_MAX]"; the whole
    # wait ends at the call's deadline.
    clock = SlowClock()
    monkeypatch.setattr(transport_mod, "time", clock)
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(echo_hits))
    sock.send_again = 10**9
    monkeypatch.setattr(sock, "poll", clock.poll)
    probes: list[float] = []
    monkeypatch.setattr(t._probe, "down_reason", lambda: probes.append(clock.now) and None)
    with pytest.raises(BrokerTimeout, match="listens but took no request") as info:
        t.request1([Op.GET, b"a"], 900, 1.0)
    assert str(info.value).endswith("before the call's deadline")  # no CURVE, no hint: nothing more to say
    ms = clock.polls
    assert ms[0] == PROBE_TTL * 1000 and max(ms) == PROBE_SLICE_MAX * 1000
    assert all(a <= b for a, b in zip(ms, ms[1:-1]))  # growing (the last one: what was left)
    assert 1000 <= sum(ms) <= 1001  # the deadline (ceil of float ms)
    assert len(probes) == 1 + len(ms)  # once before waiting, then after every slice


def test_a_blocked_send_fails_when_the_broker_goes_away_during_the_wait(
    tmpdir_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SlowClock()
    monkeypatch.setattr(transport_mod, "time", clock)
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(echo_hits))
    sock.send_again = 10**9
    monkeypatch.setattr(sock, "poll", clock.poll)
    verdicts = iter([None, None, None, "gone"])
    monkeypatch.setattr(t._probe, "down_reason", lambda: next(verdicts))
    with pytest.raises(BrokerUnavailable, match="gone"):
        t.request1([Op.GET, b"a"], 900, 10.0)
    assert len(clock.polls) == 3 and t._state().saw_down


def test_a_send_refused_again_after_poll_is_retried(tmpdir_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # poll said writable, yet the send would block (the connection dropped in between): wait on.
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(echo_hits))
    monkeypatch.setattr(t._probe, "down_reason", lambda: None)
    sock.send_again = 3
    assert t.request1([Op.GET, b"a"], 900, 1.0) == [[Code.OK, b"a", 0]]
    assert sock.polls == 3


def test_a_call_past_its_deadline_raises_without_waiting(tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(lambda f: []))
    with pytest.raises(BrokerTimeout, match="within"):
        t.request1([Op.GET, b"a"], 900, -GRACE_PLUS)
    with pytest.raises(BrokerTimeout, match="within"):
        t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, -GRACE_PLUS)
    assert sock.rcvtimeo is None  # never waited on a receive


GRACE_PLUS = transport_mod.GRACE + 0.01


# --- the blocking transport against a real socket: listening but not a broker -----------------


def unix_listener(path: str) -> socket.socket:
    """Something that listens on `path` and never speaks ZeroMQ (a broker stuck before its handshake)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    return s


def test_blocking_call_to_a_listener_that_never_answers_gets_its_deadline(tmpdir_path: str) -> None:
    path = os.path.join(tmpdir_path, "b.sock")
    with unix_listener(path):
        t = Transport(f"ipc://{path}")
        start = time.monotonic()
        with pytest.raises(BrokerTimeout) as info:
            t.request1([Op.GET, b"a"], 900, 0.3)
        elapsed = time.monotonic() - start
        t.close()
    assert "listens but took no request" in str(info.value) and DOWN_AT_DEADLINE in str(info.value)
    assert 0.3 <= elapsed <= 0.3 + LATE


def test_blocking_call_fails_fast_when_the_listener_goes_away(tmpdir_path: str) -> None:
    path = os.path.join(tmpdir_path, "b.sock")
    s = unix_listener(path)

    def away() -> None:
        s.close()
        os.unlink(path)

    timer = threading.Timer(0.2, away)
    timer.start()
    try:
        t = Transport(f"ipc://{path}")
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="does not exist"):
            t.request1([Op.GET, b"a"], 900, FAST_DEADLINE)
        assert time.monotonic() - start <= FAST
        t.close()
    finally:
        timer.join(10)


# --- the process's context and the fork reset ------------------------------------------------------


@pytest.fixture
def own_context(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The module's context globals, fresh for this test and restored after it; yields the list
    of objects the transport set aside as inherited (all closed at the end)."""
    inherited: list[Any] = []
    for name, value in [("_context", None), ("_context_pid", 0), ("_async_context", None),
                        ("_async_shadowed", None), ("_inherited", inherited),
                        ("_transports", weakref.WeakSet())]:
        monkeypatch.setattr(transport_mod, name, value)
    yield inherited
    made = [transport_mod._context, *inherited]
    for obj in made:
        if isinstance(obj, zmq.Socket) and not obj.closed:
            obj.close(linger=0)
    for obj in made:
        if isinstance(obj, zmq.Context) and not obj.closed:
            obj.destroy(linger=0)


def test_one_context_per_process_replaced_when_closed_or_inherited(own_context: list[Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a = transport_mod.context()
    assert transport_mod.context() is a and not a.closed
    a.term()
    b = transport_mod.context()  # "or after someone closed it"
    assert b is not a and not b.closed and own_context == []
    # A child forked without Python's at-fork hooks (the pid check is the one place that must
    # catch it): this process's pid changes under the module.
    parent_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent_pid + 1)
    c = transport_mod.context()  # "a new one after fork"
    assert c is not b and not c.closed
    assert own_context == [b] and not b.closed  # the parent's: kept, never touched
    assert transport_mod.context() is c


def test_the_asyncio_context_shadows_the_current_context(own_context: list[Any]) -> None:
    a = transport_mod.async_context()
    assert a.underlying == transport_mod.context().underlying and transport_mod.async_context() is a
    transport_mod.context().term()
    b = transport_mod.async_context()
    assert b is not a and b.underlying == transport_mod.context().underlying


def test_the_fork_reset_sets_every_transport_and_the_context_aside(own_context: list[Any], tmpdir_path: str) -> None:
    # Module docstring: "os.register_at_fork runs the same reset eagerly in the child. Objects
    # inherited from the parent are never touched in the child ... only dropped from use." Called
    # here in this process, as the child would call it.
    url = f"ipc://{tmpdir_path}/b.sock"
    t, a = Transport(url), AsyncTransport(url)
    sock, _ = t._socket()
    ctx = transport_mod.context()
    transport_mod.async_context()
    a_sock = ctx.socket(zmq.DEALER)
    a._sock, a._pid, a._waiters = a_sock, os.getpid(), {1: None}  # type: ignore[assignment, dict-item]
    transport_mod._reset_all_after_fork()
    assert transport_mod._context is None and transport_mod._context_pid == 0
    assert transport_mod._async_context is None and transport_mod._async_shadowed is None
    assert ctx in own_context and sock in own_context and a_sock in own_context
    assert not ctx.closed and not sock.closed and not a_sock.closed
    assert a._sock is None and a._reader is None and a._waiters == {} and a._pid == 0
    new, _ = t._socket()  # the child's own socket, on its own context
    assert new is not sock and transport_mod._context is not ctx and t._pid == os.getpid()


def test_a_blocking_transport_used_after_fork_opens_its_own_socket(own_context: list[Any], tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    old, _ = t._socket()
    held = t._lock
    held.acquire()  # a parent's thread held it at fork: the child must not wait for it
    t._pid = os.getpid() + 1
    got: list[Any] = []
    th = threading.Thread(target=lambda: got.append(t._socket()[0]))  # the child's first call
    th.start()
    th.join(10)
    held.release()
    assert got and got[0] is not old and not got[0].closed
    assert own_context == [old] and not old.closed and t._pid == os.getpid()
    assert list(t._sockets) == [got[0]]
    got[0].close(linger=0)


# --- the asyncio transport -------------------------------------------------------------------------


def test_async_request1_returns_the_one_result(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))

    async def call() -> Any:
        t = AsyncTransport(p.url)
        got = await t.request1([Op.GET, b"a"], 900, 5.0)
        await t.close()
        return got

    assert run(call()) == [[Code.OK, b"1", 3]]
    assert [(f.timeout_ms, f.ops) for f in p.frames] == [(900, [[Op.GET, b"a"]])]


def test_async_calls_on_one_loop_share_one_socket_with_ids_one_apart(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))

    async def calls() -> Any:
        t = AsyncTransport(p.url)
        # Connected first: before its connection is up (IMMEDIATE) each call's send waits and
        # retries on its own, and 20 of them then went out in another order on a loaded machine.
        got = [await t.request([[Op.GET, b"b"]], 900, 5.0)]
        got += await asyncio.gather(*(t.request([[Op.GET, b"a"]], 900, 5.0) for _ in range(20)))
        got.append(await t.request([[Op.GET, b"b"]], 900, 5.0))
        await t.close()
        return got

    got = run(calls())
    assert got == [[[Code.OK, b"2", 0]]] + [[[Code.OK, b"1", 3]]] * 20 + [[[Code.OK, b"2", 0]]]
    assert len(set(p.idents)) == 1 and {f.timeout_ms for f in p.frames} == {900}
    ids = sorted(f.req_id for f in p.frames)
    assert ids == list(range(ids[0], ids[0] + 22)) and ids[0] <= (1 << 48)  # random 48-bit start, +1 per frame
    assert [f.req_id for f in p.frames] == ids  # in the order sent (as the blocking transport's)


def test_async_transport_has_a_socket_per_loop_and_after_close(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))
    t = AsyncTransport(p.url)

    async def get() -> Any:
        return await t.request([[Op.GET, b"a"]], 900, 5.0)

    assert run(get()) == [[Code.OK, b"1", 3]]
    first = t._sock
    assert run(get()) == [[Code.OK, b"1", 3]]  # another event loop: another socket
    assert first is not None and first.closed and t._sock is not first

    async def twice() -> Any:
        a = await t.request([[Op.GET, b"a"]], 900, 5.0)
        open_sock = t._sock
        await t.close()
        assert t._sock is None and open_sock is not None and open_sock.closed
        b = await t.request([[Op.GET, b"b"]], 900, 5.0)
        await t.close()
        return a, b

    assert run(twice()) == ([[Code.OK, b"1", 3]], [[Code.OK, b"2", 0]])
    i = p.idents
    assert len(i) == 4 and len(set(i)) == 4


def test_async_transport_replaces_a_socket_closed_under_it(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))

    async def calls() -> Any:
        t = AsyncTransport(p.url)
        a = await t.request([[Op.GET, b"a"]], 900, 5.0)
        assert t._sock is not None
        t._sock.close(linger=0)  # its reader ends: the next call opens a new socket
        await asyncio.sleep(0)
        b = await t.request([[Op.GET, b"b"]], 900, 5.0)
        await t.close()
        return a, b

    assert run(calls()) == ([[Code.OK, b"1", 3]], [[Code.OK, b"2", 0]])
    assert len(set(p.idents)) == 2


def test_async_transport_used_after_fork_leaves_the_parents_socket(peer: Callable[[Answer], Peer],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    p = peer(store(VALUES))
    inherited: list[Any] = []
    monkeypatch.setattr(transport_mod, "_inherited", inherited)

    async def calls() -> Any:
        t = AsyncTransport(p.url)
        a = await t.request([[Op.GET, b"a"]], 900, 5.0)
        parent = t._sock
        t._pid = os.getpid() + 1  # as if the socket came from the parent
        b = await t.request([[Op.GET, b"b"]], 900, 5.0)
        assert parent is not None and inherited == [parent] and not parent.closed and t._sock is not parent
        await t.close()
        parent.close(linger=0)
        t._pid = os.getpid() + 1
        await t.close()  # in a child: forgets the parent's socket, closes nothing
        assert t._sock is None and t._pid == 0
        return a, b

    assert run(calls()) == ([[Code.OK, b"1", 3]], [[Code.OK, b"2", 0]])


def test_async_nobody_listening_fails_fast_and_the_return_reconnects_at_once(
    peer: Callable[[Answer], Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Module docstring: "a call fails at once when nothing [listens]"; _send_slow: "a fresh connect
    # attempts at once, so the first call after the broker's return works".
    p = peer(store(VALUES))
    path = p.url[len("ipc://"):]
    # ZeroMQ's own retries 10 s apart: only the transport's reconnect can answer the second call
    # within its deadline (and ZeroMQ cannot race it on a loaded machine).
    monkeypatch.setattr(transport_mod, "RECONNECT_IVL", 10_000)
    monkeypatch.setattr(transport_mod, "RECONNECT_IVL_MAX", 10_000)
    disconnects: list[str] = []
    real = zmq.asyncio.Socket.disconnect
    monkeypatch.setattr(zmq.asyncio.Socket, "disconnect",
                        lambda self, url: disconnects.append(url) or real(self, url))

    async def calls() -> Any:
        t = AsyncTransport(p.url)
        os.rename(path, path + ".away")  # the broker's socket file is gone
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="does not exist"):
            await t.request([[Op.GET, b"a"]], 900, FAST_DEADLINE)
        assert time.monotonic() - start <= FAST and t._saw_down
        await asyncio.sleep(2 * PROBE_TTL)  # the probe's verdict is reused for PROBE_TTL
        os.rename(path + ".away", path)  # back
        got = await t.request([[Op.GET, b"a"]], 900, FAST_DEADLINE)
        assert not t._saw_down
        await t.close()
        return got

    assert run(calls()) == [[Code.OK, b"1", 3]]
    assert disconnects == [p.url]


def test_async_call_to_a_listener_that_never_answers_gets_its_deadline_and_backs_off(tmpdir_path: str) -> None:
    path = os.path.join(tmpdir_path, "b.sock")

    async def call() -> Any:
        t = AsyncTransport(f"ipc://{path}")
        start = time.monotonic()
        with pytest.raises(BrokerTimeout) as info:
            await t.request([[Op.GET, b"a"]], 900, 0.3)
        elapsed = time.monotonic() - start
        ivl = t._backoff.ivl
        await t.close()
        return str(info.value), elapsed, ivl

    with unix_listener(path):
        message, elapsed, ivl = run(call())
    assert "listens but took no request" in message and DOWN_AT_DEADLINE in message
    assert 0.3 <= elapsed <= 0.3 + LATE and ivl == 2 * RECONNECT_IVL


def test_async_call_fails_fast_when_the_listener_goes_away(tmpdir_path: str) -> None:
    path = os.path.join(tmpdir_path, "b.sock")
    s = unix_listener(path)

    async def call() -> float:
        t = AsyncTransport(f"ipc://{path}")

        def away() -> None:
            s.close()
            os.unlink(path)

        asyncio.get_running_loop().call_later(0.2, away)
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="does not exist"):
            await t.request([[Op.GET, b"a"]], 900, FAST_DEADLINE)
        elapsed = time.monotonic() - start
        assert t._saw_down
        await t.close()
        return elapsed

    assert run(call()) <= FAST


def test_async_timeout_of_a_connected_silent_peer_is_not_a_refusal(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store({}))

    async def call() -> Any:
        t = AsyncTransport(p.url)
        await t.request([[Op.GET, b"a"]], 900, 5.0)  # connected
        p._stop.set()  # the peer stops answering; its socket stays bound, the connection up
        p._thread.join(5)
        with pytest.raises(BrokerTimeout) as info:
            await t.request([[Op.GET, b"a"]], 900, 0.5)
        ivl = t._backoff.ivl
        await t.close()
        return str(info.value), ivl

    message, ivl = run(call())
    assert DOWN_AT_DEADLINE not in message and ivl == 0


class Scripted:
    """A socket for the reader: recv returns the scripted frames, then fails as a closed socket."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)

    async def recv(self) -> bytes:
        if self.frames:
            return self.frames.pop(0)
        raise zmq.ZMQError(errno.ENOTSOCK)


def test_async_reader_hands_each_reply_to_the_call_waiting_for_its_id() -> None:
    # Module docstring: "a reply with any other id ... is discarded"; a malformed reply that names
    # a waiting call's id fails that call (ProtocolMismatch), one naming nobody is skipped; the
    # reader ends when the socket closes ("calls still waiting then time out").
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        hit, broken, waiting, gave_up = (loop.create_future() for _ in range(4))
        gave_up.cancel()  # a call that timed out: its late reply answers nobody
        waiters = {1: hit, 2: broken, 3: waiting, 4: gave_up}
        sock = Scripted([
            b"\xc1garbage", encode_reply(9, [[Code.OK]]), msgpack.packb([1, 8, 0, "not a list"]),
            encode_reply(1, [[Code.OK, b"v", 0]]), msgpack.packb([1, 2, 0, "not a list"]),
            encode_reply(4, [[Code.OK]]),
        ])
        await transport_mod._read_replies(sock, waiters)  # type: ignore[arg-type]
        assert hit.result() == (Code.OK, [[Code.OK, b"v", 0]])
        assert isinstance(broken.exception(), ProtocolMismatch)
        assert not waiting.done() and waiters == {3: waiting}

    run(scenario())


def test_closing_an_unused_async_transport_is_a_no_op() -> None:
    async def close() -> None:
        t = AsyncTransport("ipc:///nonexistent/mcbroker.sock")
        await t.close()
        await t.close()

    run(close())


def test_async_errors_name_the_broker_address_and_frames_carry_the_broker_timeout(
    peer: Callable[[Answer], Peer],
) -> None:
    p = peer(store(VALUES))

    async def calls() -> Any:
        t = AsyncTransport(p.url)
        got = await t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 5.0)
        p._stop.set()  # silent from now on
        p._thread.join(5)
        with pytest.raises(BrokerTimeout) as info:
            await t.request([[Op.GET, b"a"]], 900, 0.1)
        leftover = dict(t._waiters)
        await t.close()
        return got, str(info.value), leftover

    got, message, leftover = run(calls())
    assert got == [[Code.OK, b"1", 3], [Code.OK, b"2", 0]]
    assert p.url in message
    assert leftover == {}  # a call that gave up leaves no waiter behind (its late reply answers nobody)
    assert [f.timeout_ms for f in p.frames] == [900]


def test_a_dropped_async_transport_closes_its_socket_at_once(peer: Callable[[Answer], Peer]) -> None:
    # AsyncTransport._ensure: "a dropped AsyncClient is freed at once, and this closes its socket
    # then, so its broker slot (max_clients) goes too."
    p = peer(store(VALUES))

    async def call() -> Any:
        t = AsyncTransport(p.url)
        await t.request([[Op.GET, b"a"]], 900, 5.0)
        sock = t._sock
        assert sock is not None and not sock.closed
        del t
        return sock.closed

    gc.disable()
    try:
        assert run(call()) is True
    finally:
        gc.enable()


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_reply_after_the_deadline_but_within_grace_is_taken(
    peer: Callable[[Answer], Peer], monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    # transport.GRACE: "The broker answers TIMEOUT at the call's deadline; waiting a little longer
    # lets that clear answer arrive." GRACE is widened here so that a loaded machine cannot blur
    # the two sides: the reply comes 0.3 s after a 0.05 s deadline, well inside a 2 s grace.
    monkeypatch.setattr(transport_mod, "GRACE", 2.0)

    def late(op: list[Any]) -> list[Any]:
        time.sleep(0.3)
        return [Code.OK, b"late", 0]

    p = peer(late)
    # Each transport is connected by a first call with a long deadline: a 0.05 s call made while
    # its connection is still being set up waits for it on the send side and timed out there
    # (under -n 4 beside another suite), which is not the case this test is about.
    if client == "sync":
        t = Transport(p.url)
        assert t.request1([Op.GET, b"a"], 900, 5.0) == [[Code.OK, b"late", 0]]
        assert t.request1([Op.GET, b"a"], 900, 0.05) == [[Code.OK, b"late", 0]]
        assert t.request([[Op.GET, b"a"]], 900, 0.05) == [[Code.OK, b"late", 0]]
        t.close()
    else:
        async def call() -> Any:
            t = AsyncTransport(p.url)
            assert await t.request([[Op.GET, b"a"]], 900, 5.0) == [[Code.OK, b"late", 0]]
            got = await t.request([[Op.GET, b"a"]], 900, 0.05)
            await t.close()
            return got

        assert run(call()) == [[Code.OK, b"late", 0]]


# --- more of the blocking transport: frames, errors, sockets ---------------------------------------


class FlagSocket(EventsSocket):
    """Records each send's flags and each (dis)connect's address."""

    def __init__(self, responder: Any = None) -> None:
        super().__init__(responder, connected=True)
        self.flags: list[int] = []
        self.addresses: list[tuple[str, str]] = []

    def send(self, data: bytes, flags: int = 0, copy: bool = True) -> None:
        self.flags.append(flags)
        super().send(data, flags, copy)

    def disconnect(self, url: str) -> None:
        super().disconnect(url)
        self.addresses.append(("disconnect", url))

    def connect(self, url: str) -> None:
        self.addresses.append(("connect", url))


def test_sends_never_block_and_a_reconnect_is_to_the_brokers_address(
    tmpdir_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline bounds the call: every send is non-blocking (a blocking send on a socket
    # whose connection dropped would wait past it).
    url = f"ipc://{tmpdir_path}/b.sock"
    t = Transport(url)
    sock = install(t, FlagSocket(echo_hits))
    monkeypatch.setattr(t._probe, "down_reason", lambda: None)
    t._state().saw_down = True  # the last call found nobody; now something listens
    sock.send_again = 2
    assert t.request1([Op.GET, b"a"], 900, 1.0) == [[Code.OK, b"a", 0]]
    sock.send_again = 1
    assert t.request([[Op.GET, b"b"]], 900, 1.0) == [[Code.OK, b"b", 0]]
    assert len(sock.flags) == 5 and all(f & zmq.NOBLOCK for f in sock.flags)
    assert sock.addresses == [("disconnect", url), ("connect", url)]


def test_request_frames_carry_the_broker_timeout_and_a_malformed_reply_for_them_fails(tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(lambda f: [msgpack.packb([1, f[1], 0, "not a list"])]))
    with pytest.raises(ProtocolMismatch, match="malformed"):
        t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 750, 1.0)
    with pytest.raises(ProtocolMismatch, match="malformed"):
        t.request1([Op.GET, b"a"], 750, 1.0)
    assert [f[2] for f in sock.sent] == [750, 750]


def test_request_keeps_its_receive_timeout_across_calls(tmpdir_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A still clock, as in test_transport.py's request1 case: the machine's pauses are not counted.
    monkeypatch.setattr(transport_mod, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(echo_hits))
    for _ in range(50):
        t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 1.0)
    assert sock.setsockopt_calls <= 2  # as request1 (test_transport.py): set once, kept


def test_a_refused_frame_with_a_one_character_message_still_raises(tmpdir_path: str) -> None:
    from clientlib.wire import encode_error

    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    install(t, FakeSocket(lambda f: [encode_error(f[1], Code.SERVER_ERROR, "x")]))
    with pytest.raises(MemcacheServerError):
        t.request1([Op.GET, b"a"], 900, 1.0)


def test_two_frames_gather_both(tmpdir_path: str) -> None:
    t = Transport(f"ipc://{tmpdir_path}/b.sock")
    sock = install(t, FakeSocket(echo_hits))
    keys = [b"k%02d" % i for i in range(8)]
    one = len(msgpack.packb([1, 1 << 40, 900, 0, [[int(Op.GET), k] for k in keys[:4]]]))
    got = t.request([[Op.GET, k] for k in keys], 900, 1.0, max_frame_bytes=one + 2)
    assert len(sock.sent) == 2 and got == [[Code.OK, k, 0] for k in keys]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_silent_broker_times_out_at_the_deadline(peer: Callable[[Answer], Peer], client: str) -> None:
    # A real socket, connected, never answered: BrokerTimeout within the deadline plus GRACE and
    # the machine's tolerance (tests/timing.py).
    p = peer(store({}))
    p._stop.set()
    p._thread.join(5)
    timeout = 0.3
    if client == "sync":
        for one in (True, False):  # each on a new socket (its first receive timeout)
            t = Transport(p.url)
            start = time.monotonic()
            with pytest.raises(BrokerTimeout):
                if one:
                    t.request1([Op.GET, b"a"], 900, timeout)
                else:
                    t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, timeout)
            assert time.monotonic() - start <= timeout + transport_mod.GRACE + LATE
            t.close()
    else:
        async def call() -> float:
            t = AsyncTransport(p.url)
            start = time.monotonic()
            with pytest.raises(BrokerTimeout):
                await t.request([[Op.GET, b"a"]], 900, timeout)
            await t.close()
            return time.monotonic() - start

        assert run(call()) <= timeout + transport_mod.GRACE + LATE


def test_close_closes_this_threads_socket_and_each_close_renews_the_others(peer: Callable[[Answer], Peer]) -> None:
    # Client.disconnect_all: "Close this process's sockets to the broker; the next call opens new
    # ones" - every time it is called.
    p = peer(store(VALUES))
    t = Transport(p.url)
    mine, _ = t._socket()
    t.close()
    assert mine.closed
    from concurrent.futures import ThreadPoolExecutor

    theirs: list[Any] = []
    with ThreadPoolExecutor(max_workers=1) as other:  # one other thread, the same for each call
        for _ in range(3):
            theirs.append(other.submit(lambda: t._socket()[0]).result(10))
            t.close()
    assert len(theirs) == 3 and len({id(s) for s in theirs}) == 3


def test_a_socket_replaced_after_another_threads_close_is_closed(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))
    t = Transport(p.url)
    assert t.request1([Op.GET, b"a"], 900, 5.0) == [[Code.OK, b"1", 3]]
    old, _ = t._socket()
    th = threading.Thread(target=t.close)  # another thread's disconnect_all
    th.start()
    th.join(10)
    assert not old.closed  # never closed from another thread ...
    assert t.request1([Op.GET, b"a"], 900, 5.0) == [[Code.OK, b"1", 3]]
    assert old.closed and t._socket()[0] is not old  # ... but by its own on its next call
    t.close()


def test_the_curve_hint_names_the_clients_public_key(tmpdir_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from clientlib.curve import CurveKeys

    server_public, _ = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    clock = SlowClock()
    monkeypatch.setattr(transport_mod, "time", clock)
    t = Transport(f"ipc://{tmpdir_path}/b.sock", curve=CurveKeys(secret=secret, public=public, server=server_public))
    sock = install(t, FakeSocket(echo_hits))
    sock.send_again = 10**9
    monkeypatch.setattr(sock, "poll", clock.poll)
    monkeypatch.setattr(t._probe, "down_reason", lambda: None)
    with pytest.raises(BrokerTimeout, match="curve_allowed_clients") as info:
        t.request1([Op.GET, b"a"], 900, 0.1)
    assert public.decode() in str(info.value)


def test_ipc_probe_tells_a_stale_socket_file_from_a_busy_listener(tmpdir_path: str) -> None:
    path = os.path.join(tmpdir_path, "b.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # the file a killed broker leaves behind: nothing listens
    stale.close()
    reason = _Probe(f"ipc://{path}").down_reason()
    assert reason is not None and "nothing listens" in reason and os.strerror(errno.ECONNREFUSED).lower() in reason
    os.unlink(path)
    # A listener whose accept queue is full is there, only busy: the probe must not wait for it.
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(path)
        busy.listen(0)
        queued = []
        for _ in range(4):
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            if c.connect_ex(path) != 0:
                c.close()
                break
            queued.append(c)
        done: list[Any] = []
        th = threading.Thread(target=lambda: done.append(_Probe(f"ipc://{path}").down_reason()), daemon=True)
        th.start()
        th.join(10)
        for c in queued:
            c.close()
        assert done == [None]


def test_no_asyncio_error_is_logged_for_a_timed_out_call(peer: Callable[[Answer], Peer],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # AsyncTransport.request: "mark it read, or asyncio logs 'exception was never retrieved'".
    p = peer(store({}))
    p._stop.set()
    p._thread.join(5)

    async def call() -> None:
        t = AsyncTransport(p.url)
        with pytest.raises(BrokerTimeout):
            await t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 0.1)
        await asyncio.sleep(0.01)  # let done callbacks run
        await t.close()

    async def cancelled() -> None:
        t = AsyncTransport(p.url)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(t.request([[Op.GET, b"a"], [Op.GET, b"b"]], 900, 5.0), 0.1)  # the caller's own
        await asyncio.sleep(0.01)
        await t.close()

    with caplog.at_level("ERROR", logger="asyncio"):
        run(call())
        run(cancelled())
        gc.collect()
    assert [r for r in caplog.records if r.name == "asyncio"] == []


def test_frames_split_at_the_limit_keep_the_timeout_and_flags_and_a_frame_may_be_exactly_the_limit() -> None:
    from clientlib.wire import NOREPLY

    ids = iter(range(1, 100))
    ops = [[Op.SET, b"k%d" % i, b"x" * 100, 0, 0] for i in range(6)]
    whole = build_frames(ops, 900, NOREPLY, 1 << 30, ids.__next__)
    exact = len(whole[0][1])
    assert [n for _, _, n in build_frames(ops, 900, NOREPLY, exact, ids.__next__)] == [6]  # "at most" the limit
    split = build_frames(ops, 900, NOREPLY, exact // 2, ids.__next__)
    assert len(split) > 1 and all(len(d) <= exact // 2 for _, d, _ in split)
    for rid, data, n in split:
        version, req_id, timeout_ms, flags, sent = msgpack.unpackb(data)
        assert (req_id, timeout_ms, flags, len(sent)) == (rid, 900, NOREPLY, n)


def test_a_later_op_alone_over_the_frame_limit_is_refused() -> None:
    from clientlib.errors import MemcacheIllegalInputError

    ops = [[Op.SET, b"small", b"x", 0, 0], [Op.SET, b"big", b"x" * 5000, 0, 0]]
    with pytest.raises(MemcacheIllegalInputError, match="frame limit"):
        build_frames(ops, 900, 0, 4000, iter(range(5)).__next__)


def test_async_transport_replaces_a_reader_cancelled_on_its_loop(peer: Callable[[Answer], Peer]) -> None:
    # A shutdown that cancels every task (a web server's) ends the reader; the transport is still
    # usable: the next call gets a socket with a reader again.
    p = peer(store(VALUES))

    async def calls() -> Any:
        t = AsyncTransport(p.url)
        a = await t.request([[Op.GET, b"a"]], 900, 5.0)
        assert t._reader is not None
        t._reader.cancel()
        await asyncio.sleep(0)
        b = await t.request([[Op.GET, b"b"]], 900, 5.0)
        await t.close()
        return a, b

    assert run(calls()) == ([[Code.OK, b"1", 3]], [[Code.OK, b"2", 0]])


def test_async_transport_used_from_a_second_live_loop_gets_its_own_socket(peer: Callable[[Answer], Peer]) -> None:
    # "a new one when the client is used from another loop": the first loop still open, its
    # reader still pending there.
    p = peer(store(VALUES))
    t = AsyncTransport(p.url)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(t.request([[Op.GET, b"a"]], 900, 5.0)) == [[Code.OK, b"1", 3]]
        assert second.run_until_complete(t.request([[Op.GET, b"b"]], 900, 5.0)) == [[Code.OK, b"2", 0]]
        second.run_until_complete(t.close())
    finally:
        for loop in (first, second):
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
    assert len(set(p.idents)) == 2


def test_a_new_async_socket_starts_at_a_random_48_bit_id(tmpdir_path: str) -> None:
    # As the blocking transport's (test_transport.py): random, below 2**48; 20 sockets, so that a
    # wider start is caught with certainty but for a 2**-20 chance.
    async def starts() -> list[int]:
        got = []
        for _ in range(20):
            t = AsyncTransport(f"ipc://{tmpdir_path}/b.sock")
            t._ensure()
            got.append(t._next_id)
            await t.close()
        return got

    ids = run(starts())
    assert all(0 <= i < 1 << 48 for i in ids) and len(set(ids)) > 1
