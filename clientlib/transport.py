"""The worker's one seam to the broker: ZeroMQ DEALER sockets, frames, request ids, deadlines,
fork safety, fail-fast and error translation, for `Client` (blocking) and `AsyncClient` (asyncio).

Everything above this module deals in wire ops and results (lists); everything about ZeroMQ,
threads, event loops and fork lives here, and this is the only clientlib module that does I/O.

- Frames are encoded and decoded in one place: `build_frames` / `wire.pack_request` on the way
  out, `wire.unpack_reply` on the way back.
- Blocking: one DEALER socket per thread (ZeroMQ sockets are not thread-safe), one context per
  process. asyncio: one DEALER per event loop, shared by concurrent calls, whose replies a reader
  task hands to the waiting call by request id.
- Every request carries a fresh id; a reply with any other id (a late answer to a call that timed
  out) is discarded, so it can never become the answer to a later call.
- Fork safety is one pid check in one place per transport; `os.register_at_fork` runs the same
  reset eagerly in the child. Objects inherited from the parent are never touched in the child
  (closing them there could disturb the parent's connection), only dropped from use.
- Fail fast: with IMMEDIATE set a send would block when no broker connection is up; only then the
  OS is asked whether anything listens at the address (`_Probe`), so a call fails at once when
  nothing does and waits (up to its deadline) for a broker that is there but slow.
- Errors are translated once, at this edge (`_ErrorMap`): nothing from zmq, msgpack or socket
  leaves; wire failure codes become exceptions in `errors.error_for`.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import random
import socket
import stat
import threading
import time
import weakref
from typing import Any, Callable

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.asyncio

from .curve import CurveKeys
from .errors import (
    BrokerTimeout,
    BrokerUnavailable,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheUnknownError,
    ProtocolMismatch,
    error_for,
)
from .wire import NOREPLY, Op as _WireOp, WireError, pack_request, unpack_reply

Op = list[Any]
Result = Any  # [code, ...], or (a GET_MANY's hit with client flags 0) the value alone, bytes

MAX_OPS_PER_FRAME = 10_000
_U64 = (1 << 64) - 1
_OK = 0
_GET_MANY = int(_WireOp.GET_MANY)
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's enum flags cost more than the call
_RCVTIMEO = int(zmq.RCVTIMEO)
_POLLOUT = int(zmq.POLLOUT)
RCVTIMEO_SLACK_MS = 5

# How long a verdict of the OS check "is anything listening at the address?" is reused. The check
# costs microseconds (a stat and a non-blocking connect) and runs only when a send would block;
# reusing it briefly bounds its rate in a tight loop of failing calls.
PROBE_TTL = 0.01
# While a call waits for a connection to a broker that listens, the check runs again after slices
# growing from PROBE_TTL to this: a broker that goes away is noticed within one, and a broker
# that sheds connections past max_clients (each check is a connection it accepts) is not flooded.
PROBE_SLICE_MAX = 0.2

# How often an asyncio call retries a send while its socket (re)connects to a broker that is there.
ASYNC_RETRY = 0.002

# The broker answers TIMEOUT at the call's deadline; waiting a little longer lets that clear
# answer arrive, while a broker that is stopped or gone still fails close to the deadline.
GRACE = 0.05

_context: zmq.Context[Any] | None = None
_context_pid = 0
_context_lock = threading.Lock()
_async_context: zmq.asyncio.Context | None = None
_async_shadowed: zmq.Context[Any] | None = None
_inherited: list[Any] = []  # parent's ZeroMQ objects, kept alive in a forked child, never used
_transports: "weakref.WeakSet[Transport | AsyncTransport]" = weakref.WeakSet()


def context() -> zmq.Context[Any]:
    """This process's ZeroMQ context (a new one after fork, or after someone closed it)."""
    global _context, _context_pid
    pid = os.getpid()
    ctx = _context
    if ctx is None or _context_pid != pid or ctx.closed:
        with _context_lock:
            ctx = _context
            if ctx is None or _context_pid != pid or ctx.closed:
                if ctx is not None and _context_pid != pid:
                    _inherited.append(ctx)
                ctx = _context = zmq.Context(io_threads=1)
                _context_pid = pid
    return ctx


def async_context() -> zmq.asyncio.Context:
    """The asyncio view of this process's context: one ZeroMQ I/O thread serves both clients."""
    global _async_context, _async_shadowed
    ctx = context()
    if _async_context is None or _async_shadowed is not ctx:
        _async_context = zmq.asyncio.Context.shadow(ctx)
        _async_shadowed = ctx
    return _async_context


def _configure(sock: zmq.Socket[Any], url: str, curve: CurveKeys | None = None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
    # Queue nothing for a broker that is not connected: a send fails at once instead of
    # delivering a stale request to a broker that comes up much later.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX)
    sock.connect(url)


# A broker serving its max_clients worker sockets shuts a new connection down as it accepts it,
# and the DEALER reconnects after RECONNECT_IVL: libzmq starts every reconnect after a connection
# that was up from RECONNECT_IVL again (RECONNECT_IVL_MAX only spaces out failed connects). So a
# call that times out while its socket has no connection up backs that socket off: its reconnect
# interval doubles, up to RECONNECT_IVL_MAX, and starts again from RECONNECT_IVL when the last
# such timeout is older than BACKOFF_RESET. A call that finds no connection up still asks for one
# at once (the next call after a slot frees, or after a broker restart, is not held back).
RECONNECT_IVL = 50
RECONNECT_IVL_MAX = 1000
BACKOFF_RESET = 10.0
REFUSED_HINT = (
    "; the connection to the broker was down at the deadline: a broker serving its max_clients worker"
    " sockets shuts new connections down (its clients_refused counts them), or it restarted"
)


class _Backoff:
    """One socket's reconnect backoff after refused connections (see RECONNECT_IVL above)."""

    __slots__ = ("ivl", "at")

    def __init__(self) -> None:
        self.ivl = 0  # 0: never backed off; else the RECONNECT_IVL set on the socket (ms)
        self.at = -math.inf

    def after_timeout(self, sock: zmq.Socket[Any], url: str) -> str:
        """At a call's timeout: when the socket has no connection up (with IMMEDIATE, nothing
        to send to), back it off and reconnect; return the hint for the error message."""
        if sock.closed or int(sock.getsockopt(zmq.EVENTS)) & _POLLOUT:
            return ""  # connected: the broker is slow, not refusing
        now = time.monotonic()
        fresh = not self.ivl or now - self.at > BACKOFF_RESET
        self.ivl = 2 * RECONNECT_IVL if fresh else min(2 * self.ivl, RECONNECT_IVL_MAX)
        self.at = now
        # The interval is read when a connection is made: reconnect for it to apply (this also
        # makes one attempt at once).
        sock.setsockopt(zmq.RECONNECT_IVL, self.ivl)
        sock.disconnect(url)
        sock.connect(url)
        return REFUSED_HINT


# --- errors ------------------------------------------------------------------------------------


class _ErrorMap:
    """`with self._errors:` around everything that touches ZeroMQ or the OS: the one place where
    their exceptions become clientlib's (httpcore's map_exceptions). Nothing from zmq, msgpack or
    socket leaves the transport. A class rather than a generator context manager: it is entered
    on every call, and this costs a fraction of a microsecond."""

    __slots__ = ("url", "on_timeout")

    def __init__(self, url: str, on_timeout: Callable[[], str] | None = None) -> None:
        self.url = url
        # Called on a BrokerTimeout only: what to add to its message (and a chance to back off).
        # Held weakly: the transport owns this map, and a strong reference back to it would make
        # a cycle that keeps a dropped Client's socket (and its broker slot, max_clients) open
        # until the cyclic garbage collector runs, or for ever under gc.disable().
        self.on_timeout = weakref.WeakMethod(on_timeout) if on_timeout is not None else None

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or not isinstance(exc, Exception):
            return  # KeyboardInterrupt / CancelledError: let it through
        err = exc if isinstance(exc, MemcacheError) else translate(exc, self.url)
        on_timeout = self.on_timeout() if isinstance(err, BrokerTimeout) and self.on_timeout is not None else None
        if on_timeout is not None:
            try:
                hint = on_timeout()
            except Exception:  # a hint must never replace the timeout itself
                hint = ""
            if hint and err.args and isinstance(err.args[0], str):
                err.args = (err.args[0] + hint,) + err.args[1:]
        if err is exc:
            return  # ours already: let it through
        raise err from exc


def translate(exc: BaseException, url: str) -> MemcacheError:
    """clientlib's exception for one raised by ZeroMQ, msgpack or the OS while talking to `url`."""
    if isinstance(exc, (zmq.Again, TimeoutError)):
        # A blocking receive that hit its timeout (RCVTIMEO), or asyncio's wait_for: the deadline.
        return BrokerTimeout(f"no reply from the broker at {url} before the call's deadline")
    if isinstance(exc, zmq.ContextTerminated):
        return BrokerUnavailable(f"the ZeroMQ context for the broker at {url} was terminated")
    if isinstance(exc, zmq.ZMQError):
        return BrokerUnavailable(f"cannot talk to the broker at {url}: {exc} (ZeroMQ errno {exc.errno})")
    if isinstance(exc, OSError):
        return BrokerUnavailable(f"cannot reach the broker at {url}: {exc}")
    if isinstance(exc, (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, WireError)):
        return ProtocolMismatch(f"malformed reply from the broker at {url}: {exc}")
    return MemcacheUnknownError(f"unexpected {type(exc).__name__} talking to the broker at {url}: {exc}")


_ACCESS_FIX = (
    "the broker's socket_group setting (etc/mcbroker.toml; socket_mode, default 0660) names the group "
    "whose members may connect: add this user to that group, or set socket_group to one of its groups"
)


def _ipc_down_reason(path: str) -> str | None:
    """Why nothing can accept a connection on the unix socket `path`, or None when something may."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (is the broker running?)"
    except PermissionError:
        return (
            f"access denied to {path}: it exists, but this user (uid {os.geteuid()}) may not enter its "
            f"directory; {_ACCESS_FIX}"
        )
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        err = s.connect_ex(path)
    finally:
        s.close()
    if err in (0, errno.EAGAIN, errno.EINPROGRESS):
        return None  # listening (EAGAIN: its accept queue is full, so it is there but busy)
    if err == errno.ECONNREFUSED:
        return f"nothing listens on {path} (connection refused: a broker that was killed leaves its socket file behind)"
    if err in (errno.EACCES, errno.EPERM):
        return f"access denied to {path}: it exists, but this user (uid {os.geteuid()}) may not connect to it; {_ACCESS_FIX}"
    if err == errno.ENOENT:
        return f"{path} does not exist (is the broker running?)"
    return f"cannot connect to {path}: {os.strerror(err)}"


def _tcp_down_reason(host: str, port: int) -> str | None:
    """Why nothing can accept a TCP connection at host:port, or None when something may."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    reason = None
    for family, type_, proto, _, sockaddr in infos:
        s = socket.socket(family, type_, proto)
        try:
            s.settimeout(PROBE_TTL)
            err = s.connect_ex(sockaddr)
        finally:
            s.close()
        if err not in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EACCES):
            return None  # connected, or slow to answer: something may be there
        reason = f"nothing listens on {host} port {port} ({os.strerror(err).lower()})"
    return reason


class _Probe:
    """Asks the OS, cheaply, whether anything listens at the broker's address.

    ZeroMQ cannot tell "nobody is there" from "still connecting": with IMMEDIATE set, a send just
    would block in both cases. The transport asks this only when a send would block, so a call to
    an address where nothing listens fails in microseconds instead of waiting out its deadline,
    while a broker that is there but slow to accept still gets the whole deadline.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._check: Callable[[], str | None]
        if url.startswith("ipc://"):
            path = url[len("ipc://"):]
            self._check = lambda: _ipc_down_reason(path)
        elif url.startswith("tcp://"):
            host, _, port = url[len("tcp://"):].rpartition(":")
            host = host[1:-1] if host.startswith("[") else host
            self._check = lambda: _tcp_down_reason(host, int(port))
        else:
            self._check = lambda: None
        self._reason: str | None = None
        self._checked_at = -math.inf

    def down_reason(self) -> str | None:
        """None when something may be listening; else why nothing is (reused for PROBE_TTL)."""
        now = time.monotonic()
        if now - self._checked_at >= PROBE_TTL:
            self._reason = self._check()
            self._checked_at = time.monotonic()
        return self._reason


def _curve_hint(curve: CurveKeys | None) -> str:
    if curve is None:
        return ""
    return f" (CURVE: is this client's public key {curve.public.decode()} in the broker's curve_allowed_clients?)"


# --- frames --------------------------------------------------------------------------------------


def build_frames(
    ops: list[Op], timeout_ms: int, flags: int, max_frame_bytes: int, new_id: Callable[[], int]
) -> list[tuple[int, bytes, int]]:
    """Split ops into request frames of at most MAX_OPS_PER_FRAME ops and max_frame_bytes bytes; a
    lone GET_MANY op (`[GET_MANY, keys]`) into GET_MANY frames of at most as many keys.

    Returns (request id, frame bytes, number of results it asks for) per frame, in op order.
    Raises MemcacheIllegalInputError when one op (or key) alone exceeds max_frame_bytes (the
    Client checks store values before they get here, so this is for pathological settings)."""
    if len(ops) == 1 and ops[0][0] == _GET_MANY:
        keys = ops[0][1]

        def pack(rid: int, start: int, end: int) -> bytes:
            return pack_request(rid, [[_GET_MANY, keys[start:end]]], timeout_ms, flags)

        return _split(len(keys), pack, max_frame_bytes, new_id)
    return _split(len(ops), lambda rid, start, end: pack_request(rid, ops[start:end], timeout_ms, flags),
                  max_frame_bytes, new_id)


def _split(
    total: int, pack: Callable[[int, int, int], bytes], max_frame_bytes: int, new_id: Callable[[], int]
) -> list[tuple[int, bytes, int]]:
    out: list[tuple[int, bytes, int]] = []
    start = 0
    while start < total:
        rid = new_id()
        end = min(total, start + MAX_OPS_PER_FRAME)
        data = pack(rid, start, end)
        while len(data) > max_frame_bytes:
            if end - start == 1:
                raise MemcacheIllegalInputError(
                    f"request of {len(data)} bytes exceeds the broker's frame limit of {max_frame_bytes} bytes"
                )
            end = start + (end - start) // 2
            data = pack(rid, start, end)
        out.append((rid, data, end - start))
        start = end
    return out


def gather(frames: list[tuple[int, bytes, int]], replies: dict[int, tuple[int, Any]]) -> list[Result]:
    """The per-op results of all frames, in op order; a frame the broker refused raises its error."""
    if len(frames) == 1:
        rid, _, n = frames[0]
        return _results(*replies[rid], n)
    results: list[Result] = []
    for rid, _, n in frames:
        results.extend(_results(*replies[rid], n))
    return results


def _results(code: int, payload: Any, n: int) -> list[Result]:
    if code != _OK:
        raise error_for(code, payload)
    if len(payload) != n:
        raise ProtocolMismatch(f"broker answered {len(payload)} results for {n} ops")
    return payload


# --- blocking ------------------------------------------------------------------------------------


class _ThreadState:
    """One thread's socket and its bookkeeping. A plain object held by a threading.local: its
    attributes are read several times per call, and slots are cheaper than the local's own."""

    __slots__ = ("sock", "gen", "next_id", "rcvtimeo", "saw_down", "backoff")

    def __init__(self) -> None:
        self.sock: zmq.Socket[Any] | None = None
        self.gen = -1
        self.next_id = 0
        self.rcvtimeo = -2
        self.saw_down = False  # this thread's socket last found nobody listening
        self.backoff = _Backoff()


class Transport:
    """The blocking seam: `request1` for one op (the common case, kept lean), `request` for any
    number of ops in one or more frames. Thread-safe: each thread uses its own socket."""

    def __init__(self, url: str, curve: CurveKeys | None = None) -> None:
        self.url = url
        self.curve = curve
        self._pid = os.getpid()
        self._gen = 0
        self._tls = threading.local()
        self._sockets: "weakref.WeakSet[zmq.Socket[Any]]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._probe = _Probe(url)
        self._errors = _ErrorMap(url, self._on_timeout)
        _transports.add(self)

    def _on_timeout(self) -> str:
        st = getattr(self._tls, "st", None)
        if st is None or st.sock is None or self._pid != os.getpid():
            return ""
        return st.backoff.after_timeout(st.sock, self.url)

    # --- sockets -------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """Forget every socket inherited from the parent; the child opens its own on first use."""
        _inherited.extend(self._sockets)
        self._sockets = weakref.WeakSet()
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _socket(self) -> tuple[zmq.Socket[Any], _ThreadState]:
        """This thread's socket; the one pid check of the blocking transport."""
        if self._pid != os.getpid():
            self._after_fork()
        st = self._state()
        sock = st.sock
        if sock is None or st.gen != self._gen or sock.closed:
            sock = self._new_socket(st)
        return sock, st

    def _state(self) -> _ThreadState:
        """This thread's state (made on its first call)."""
        try:
            return self._tls.st
        except AttributeError:
            st = self._tls.st = _ThreadState()
            return st

    def _new_socket(self, st: _ThreadState) -> zmq.Socket[Any]:
        old = st.sock
        if old is not None and not old.closed:
            old.close(linger=0)
        sock = context().socket(zmq.DEALER)
        _configure(sock, self.url, self.curve)
        st.sock = sock
        st.gen = self._gen
        st.next_id = random.getrandbits(48)
        st.rcvtimeo = -2
        st.saw_down = False
        st.backoff = _Backoff()
        with self._lock:
            self._sockets.add(sock)
        return sock

    def close(self) -> None:
        """Close this process's sockets; each thread opens a new one on its next call."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        with self._errors:
            with self._lock:
                self._gen += 1
                self._sockets = weakref.WeakSet()
            st = self._state()
            if st.sock is not None:
                st.sock.close(linger=0)
                st.sock = None
            # Other threads' sockets are closed by their own threads on next use (gen changed);
            # ZeroMQ sockets must not be closed from a thread that may be using them.

    # --- calls ---------------------------------------------------------------------------------

    def request1(self, op: Op, timeout_ms: int, timeout: float) -> list[Result]:
        """Send one op in one frame; return its one-element result list. `timeout_ms` goes to the
        broker; `timeout` (seconds) bounds the whole call here."""
        with self._errors:
            sock, st = self._socket()
            st.next_id = rid = (st.next_id + 1) & _U64
            data = pack_request(rid, [op], timeout_ms)
            deadline = time.monotonic() + timeout
            try:
                # Zero-copy only pays for large frames (a set of a big value).
                sock.send(data, _NOBLOCK, copy=len(data) < 65536)
            except zmq.Again:
                self._send_slow(sock, st, data, deadline)
            while True:
                # setsockopt costs more than the rest of the call's Python: keep the previous
                # receive timeout while it overshoots the deadline by at most a few ms.
                ms = int((deadline + GRACE - time.monotonic()) * 1000 + 0.5)
                if ms <= 0:
                    raise BrokerTimeout(f"no reply from the broker at {self.url} within {timeout:.3f}s")
                if not 0 <= st.rcvtimeo - ms <= RCVTIMEO_SLACK_MS:
                    sock.setsockopt(_RCVTIMEO, ms)
                    st.rcvtimeo = ms
                reply = sock.recv()  # zmq.Again at the receive timeout: _ErrorMap makes it BrokerTimeout
                try:
                    got, code, payload = unpack_reply(reply)
                except WireError as exc:
                    if exc.req_id == rid:
                        raise ProtocolMismatch(f"malformed reply from the broker: {exc}") from None
                    continue
                if got == rid:
                    if code == _OK and len(payload) == 1:
                        return payload
                    return _results(code, payload, 1)
                # else: a late reply to an earlier call that gave up; it answers nobody now.

    def request(
        self, ops: list[Op], timeout_ms: int, timeout: float, *, noreply: bool = False,
        max_frame_bytes: int = 1 << 30,
    ) -> list[Result] | None:
        """Send ops in as many frames as the limits need; return their results in op order, or
        None at once with `noreply` (the broker then answers nothing)."""
        with self._errors:
            sock, st = self._socket()

            def new_id() -> int:
                st.next_id = (st.next_id + 1) & _U64
                return st.next_id

            frames = build_frames(ops, timeout_ms, NOREPLY if noreply else 0, max_frame_bytes, new_id)
            deadline = time.monotonic() + timeout
            for _, data, _ in frames:
                try:
                    sock.send(data, _NOBLOCK, copy=len(data) < 65536)
                except zmq.Again:
                    self._send_slow(sock, st, data, deadline)
            if noreply:
                return None
            return gather(frames, self._wait(sock, st, {f[0] for f in frames}, deadline + GRACE, timeout))

    def _send_slow(self, sock: zmq.Socket[Any], st: _ThreadState, data: bytes, deadline: float) -> None:
        # IMMEDIATE: no connection to a broker is up. Either nothing listens (fail now), or the
        # socket is (re)connecting to a broker that is there (wait for it, up to the deadline).
        reason = self._probe.down_reason()
        if reason is not None:
            st.saw_down = True
            raise BrokerUnavailable(f"no broker at {self.url}: {reason}")
        if st.saw_down or st.backoff.ivl:
            # The broker is back. ZeroMQ retries with a growing interval (up to RECONNECT_IVL_MAX);
            # a fresh connect attempts at once, so the first call after the broker's return works.
            # Likewise after refused connections (_Backoff): the call asks for a slot at once.
            st.saw_down = False
            sock.disconnect(self.url)
            sock.connect(self.url)
        copy = len(data) < 65536
        slice_s = PROBE_TTL
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Something listens there (the probe found it): a broker that is stopped or too
                # busy to finish the handshake is slow, not absent.
                raise BrokerTimeout(f"the broker at {self.url} listens but took no request before the call's deadline{_curve_hint(self.curve)}")
            # Growing slices (PROBE_SLICE_MAX): a broker that goes away meanwhile is noticed within one.
            if sock.poll(max(1, math.ceil(min(remaining, slice_s) * 1000)), _POLLOUT):
                try:
                    sock.send(data, _NOBLOCK, copy=copy)
                    return
                except zmq.Again:
                    continue
            slice_s = min(2 * slice_s, PROBE_SLICE_MAX)
            reason = self._probe.down_reason()
            if reason is not None:
                st.saw_down = True
                raise BrokerUnavailable(f"no broker at {self.url}: {reason}")

    def _wait(
        self, sock: zmq.Socket[Any], st: _ThreadState, waiting: set[int], deadline: float, timeout: float
    ) -> dict[int, tuple[int, Any]]:
        replies: dict[int, tuple[int, Any]] = {}
        while waiting:
            ms = int((deadline - time.monotonic()) * 1000 + 0.5)
            if ms <= 0:
                raise BrokerTimeout(f"no reply from the broker at {self.url} within {timeout:.3f}s")
            if not 0 <= st.rcvtimeo - ms <= RCVTIMEO_SLACK_MS:
                sock.setsockopt(_RCVTIMEO, ms)
                st.rcvtimeo = ms
            data = sock.recv()  # zmq.Again at the receive timeout: _ErrorMap makes it BrokerTimeout
            try:
                rid, code, payload = unpack_reply(data)
            except WireError as exc:
                if exc.req_id is not None and exc.req_id in waiting:
                    raise ProtocolMismatch(f"malformed reply from the broker: {exc}") from None
                continue
            if rid in waiting:
                waiting.discard(rid)
                replies[rid] = (code, payload)
            # else: a late reply to an earlier call that gave up; it answers nobody now.
        return replies


# --- asyncio -------------------------------------------------------------------------------------


class AsyncTransport:
    """The asyncio seam: the same `request1` / `request` as coroutines. One DEALER per event loop
    (a new one when the client is used from another loop or process); concurrent calls share it
    and are pipelined; a reader task hands each reply to the call waiting for its id."""

    def __init__(self, url: str, curve: CurveKeys | None = None) -> None:
        self.url = url
        self.curve = curve
        self._pid = 0
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self._next_id = 0
        self._saw_down = False
        self._backoff = _Backoff()
        self._probe = _Probe(url)
        self._errors = _ErrorMap(url, self._on_timeout)
        self._closer: weakref.finalize[Any, Any] | None = None
        _transports.add(self)

    def _on_timeout(self) -> str:
        if self._sock is None or self._pid != os.getpid():
            return ""
        return self._backoff.after_timeout(self._sock, self.url)

    def _after_fork(self) -> None:
        if self._sock is not None:
            _inherited.append(self._sock)
        self._sock = None
        self._reader = None
        self._waiters = {}
        self._pid = 0

    def _ensure(self) -> zmq.asyncio.Socket:
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            self._after_fork()
        sock, reader = self._sock, self._reader
        if sock is None or reader is None or reader.get_loop() is not loop or reader.done() or sock.closed:
            if sock is not None and not sock.closed:
                sock.close(linger=0)
            sock = async_context().socket(zmq.DEALER)
            _configure(sock, self.url, self.curve)
            self._sock = sock
            self._pid = os.getpid()
            self._waiters = {}
            self._next_id = random.getrandbits(48)
            self._saw_down = False
            self._backoff = _Backoff()
            self._reader = loop.create_task(_read_replies(sock, self._waiters))
            # The reader holds the socket, not this transport: a dropped AsyncClient is freed at
            # once, and this closes its socket then, so its broker slot (max_clients) goes too.
            if self._closer is not None:
                self._closer.detach()
            self._closer = weakref.finalize(self, _close_quietly, sock)
        return sock

    def _new_id(self) -> int:
        self._next_id = rid = (self._next_id + 1) & _U64
        return rid

    async def request1(self, op: Op, timeout_ms: int, timeout: float) -> list[Result]:
        """Coroutine form of Transport.request1."""
        results = await self.request([op], timeout_ms, timeout)
        assert results is not None
        return results

    async def request(
        self, ops: list[Op], timeout_ms: int, timeout: float, *, noreply: bool = False,
        max_frame_bytes: int = 1 << 30,
    ) -> list[Result] | None:
        """Coroutine form of Transport.request."""
        with self._errors:
            sock = self._ensure()
            frames = build_frames(ops, timeout_ms, NOREPLY if noreply else 0, max_frame_bytes, self._new_id)
            loop = asyncio.get_running_loop()
            futs: dict[int, asyncio.Future[tuple[int, Any]]] = {}
            if not noreply:
                for rid, _, _ in frames:
                    futs[rid] = self._waiters[rid] = loop.create_future()
            try:
                deadline = time.monotonic() + timeout
                for _, data, _ in frames:
                    await self._send(sock, data, deadline)
                if noreply:
                    return None
                remaining = deadline + GRACE - time.monotonic()
                # TimeoutError at the deadline: _ErrorMap makes it BrokerTimeout.
                waiting = asyncio.gather(*futs.values())
                # Cancelled (a caller's own wait_for) or timed out, the gather still ends with an
                # exception: mark it read, or asyncio logs "exception was never retrieved".
                waiting.add_done_callback(_read_outcome)
                done = await asyncio.wait_for(waiting, max(remaining, 0.001))
            finally:
                for rid in futs:
                    self._waiters.pop(rid, None)
            return gather(frames, dict(zip(futs, done)))

    async def _send(self, sock: zmq.asyncio.Socket, data: bytes, deadline: float) -> None:
        try:
            await sock.send(data, _NOBLOCK)
            return
        except zmq.Again as exc:
            # pyzmq keeps the exception of a refused send (on a future it holds for the socket):
            # its traceback would keep this frame, and so this transport, alive with the socket.
            exc.__traceback__ = None
        # As Transport._send_slow, without blocking the event loop.
        reason = self._probe.down_reason()
        if reason is not None:
            self._saw_down = True
            raise BrokerUnavailable(f"no broker at {self.url}: {reason}")
        if self._saw_down or self._backoff.ivl:
            self._saw_down = False
            sock.disconnect(self.url)
            sock.connect(self.url)
        slice_s = PROBE_TTL / 2
        probe_at = time.monotonic() + PROBE_TTL
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Something listens there (the probe found it): a broker that is stopped or too
                # busy to finish the handshake is slow, not absent.
                raise BrokerTimeout(f"the broker at {self.url} listens but took no request before the call's deadline{_curve_hint(self.curve)}")
            # A short sleep, not sock.poll: a burst of calls on a socket still connecting would
            # each build a poller (measured: 300 concurrent sets took 20x longer to be answered).
            await asyncio.sleep(min(remaining, ASYNC_RETRY))
            try:
                await sock.send(data, _NOBLOCK)
                return
            except zmq.Again as exc:
                exc.__traceback__ = None  # as above
            now = time.monotonic()
            if now < probe_at:
                continue
            slice_s = min(2 * slice_s, PROBE_SLICE_MAX)
            probe_at = now + slice_s
            reason = self._probe.down_reason()
            if reason is not None:
                self._saw_down = True
                raise BrokerUnavailable(f"no broker at {self.url}: {reason}")

    async def close(self) -> None:
        """Close this loop's socket; the next call opens a new one."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        with self._errors:
            if self._reader is not None:
                self._reader.cancel()
                self._reader = None
            if self._sock is not None:
                self._sock.close(linger=0)
            self._sock = None


async def _read_replies(sock: zmq.asyncio.Socket, waiters: dict[int, "asyncio.Future[tuple[int, Any]]"]) -> None:
    """An AsyncTransport's reader: each reply to the future waiting for its id, until the socket
    closes (calls still waiting then time out)."""
    while True:
        try:
            data = await sock.recv()
        except Exception:  # socket closed or context gone: calls waiting time out
            return
        try:
            rid, code, payload = unpack_reply(data)
        except WireError as exc:
            fut = waiters.pop(exc.req_id, None) if exc.req_id is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(ProtocolMismatch(f"malformed reply from the broker: {exc}"))
            continue
        fut = waiters.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result((code, payload))


def _close_quietly(sock: zmq.Socket[Any]) -> None:
    """Close a socket whose owner is gone (a finalizer: it must not raise)."""
    try:
        sock.close(linger=0)
    except Exception:
        pass


def _reset_all_after_fork() -> None:
    global _context, _context_pid, _async_context, _async_shadowed
    if _context is not None:
        _inherited.append(_context)
    _context = None
    _context_pid = 0
    _async_context = None
    _async_shadowed = None
    for t in list(_transports):
        t._after_fork()


os.register_at_fork(after_in_child=_reset_all_after_fork)


def _read_outcome(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()
