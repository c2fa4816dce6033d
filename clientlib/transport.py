"""The worker's one seam to the broker: ZeroMQ DEALER sockets, request ids, deadlines, fork safety.

Everything above this module deals in wire frames (bytes) and `ReplyFrame`s; everything about
ZeroMQ, threads and fork lives here.

- One DEALER socket per thread (ZeroMQ sockets are not thread-safe), one context per process.
- Fork safety is one pid check in one place (`_sock`); `os.register_at_fork` runs the same reset
  eagerly in the child. Objects inherited from the parent are never touched in the child (closing
  them there could disturb the parent's connection), only dropped from use.
- Every request carries a fresh id; a reply with any other id (a late answer to a call that timed
  out) is discarded, so it can never become the answer to a later call.
"""

from __future__ import annotations

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

import msgpack
import zmq

from .errors import BrokerTimeout, BrokerUnavailable, MemcacheError, MemcacheUnknownError, ProtocolMismatch
from .wire import ReplyFrame, WireError, decode_reply

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's enum flags cost more than the call
_RCVTIMEO = int(zmq.RCVTIMEO)
RCVTIMEO_SLACK_MS = 5

# How long a verdict of the OS check "is anything listening at the address?" is reused. The check
# costs microseconds (a stat and a non-blocking connect) and runs only when a send would block;
# reusing it briefly bounds its rate in a tight loop of failing calls.
PROBE_TTL = 0.01

# The broker answers TIMEOUT at the call's deadline; waiting a little longer lets that clear
# answer arrive, while a broker that is stopped or gone still fails close to the deadline.
GRACE = 0.05

_context: zmq.Context | None = None
_context_pid = 0
_context_lock = threading.Lock()
_inherited: list[Any] = []  # parent's ZeroMQ objects, kept alive in a forked child, never used
_transports: "weakref.WeakSet[Transport]" = weakref.WeakSet()


def context() -> zmq.Context:
    """This process's ZeroMQ context (a new one after fork)."""
    global _context, _context_pid
    pid = os.getpid()
    if _context is None or _context_pid != pid or _context.closed:
        # closed: someone terminated it (zmq.Context.instance().term() in user code, a test);
        # a new one lets calls go on instead of failing forever.
        with _context_lock:
            if _context is None or _context_pid != pid or _context.closed:
                if _context is not None and _context_pid != pid:
                    _inherited.append(_context)
                _context = zmq.Context(io_threads=1)
                _context_pid = pid
    return _context


class _ErrorMap:
    """`with self._errors:` around everything that touches ZeroMQ or the OS: the one place where
    their exceptions become clientlib's (httpcore's map_exceptions). Nothing from zmq, msgpack or
    socket leaves the transport. A class rather than a generator context manager: it is entered
    on every call, and this costs a fraction of a microsecond."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, MemcacheError) or not isinstance(exc, Exception):
            return False  # ours already, or KeyboardInterrupt / CancelledError: let it through
        raise translate(exc, self.url) from exc


def translate(exc: BaseException, url: str) -> MemcacheError:
    """clientlib's exception for one raised by ZeroMQ, msgpack or the OS while talking to `url`."""
    if isinstance(exc, zmq.Again):
        return BrokerTimeout(f"no reply from the broker at {url} in time")
    if isinstance(exc, zmq.ContextTerminated):
        return BrokerUnavailable(f"the ZeroMQ context for the broker at {url} was terminated")
    if isinstance(exc, zmq.ZMQError):
        return BrokerUnavailable(f"cannot talk to the broker at {url}: {exc} (ZeroMQ errno {exc.errno})")
    if isinstance(exc, OSError):
        return BrokerUnavailable(f"cannot reach the broker at {url}: {exc}")
    if isinstance(exc, (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, WireError)):
        return ProtocolMismatch(f"malformed reply from the broker at {url}: {exc}")
    return MemcacheUnknownError(f"unexpected {type(exc).__name__} talking to the broker at {url}: {exc}")


class _ThreadState(threading.local):
    sock: zmq.Socket | None = None
    gen = -1
    next_id = 0
    rcvtimeo = -2
    saw_down = False  # this thread's socket last found nobody listening


def _ipc_down_reason(path: str) -> str | None:
    """Why nothing can accept a connection on the unix socket `path`, or None when something may."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (is the broker running?)"
    except PermissionError:
        return f"access denied to {path}: this user may not reach the broker's socket (check the directory's permissions)"
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
        return (
            f"access denied to {path}: this user may not connect to the broker's socket "
            "(check the socket's owner, group and mode, and this user's groups)"
        )
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


class Transport:
    def __init__(self, url: str) -> None:
        self.url = url
        self._pid = os.getpid()
        self._gen = 0
        self._local = _ThreadState()
        self._sockets: "weakref.WeakSet[zmq.Socket]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._probe = _Probe(url)
        self._errors = _ErrorMap(url)
        _transports.add(self)

    # --- sockets -------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """Forget every socket inherited from the parent; the child opens its own on first use."""
        _inherited.extend(self._sockets)
        self._sockets = weakref.WeakSet()
        self._local = _ThreadState()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _sock(self) -> tuple[zmq.Socket, _ThreadState]:
        if self._pid != os.getpid():
            self._after_fork()
        st = self._local
        sock = st.sock
        if sock is None or st.gen != self._gen or sock.closed:
            if sock is not None and not sock.closed:
                sock.close(linger=0)
            sock = context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue nothing for a broker that is not connected: a send fails at once instead of
            # delivering a stale request to a broker that comes up much later.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.connect(self.url)
            st.sock = sock
            st.gen = self._gen
            st.next_id = random.getrandbits(48)
            st.rcvtimeo = -2
            with self._lock:
                self._sockets.add(sock)
        return sock, st

    def close(self) -> None:
        """Close every socket of this process; each thread opens a new one on its next call."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        with self._errors:
            self._close()

    def _close(self) -> None:
        with self._lock:
            self._gen += 1
            socks = list(self._sockets)
            self._sockets = weakref.WeakSet()
        st = self._local
        if st.sock is not None:
            st.sock.close(linger=0)
            st.sock = None
        # Other threads' sockets are closed by their own threads on next use (gen changed);
        # ZeroMQ sockets must not be closed from a thread that may be using them.
        del socks

    # --- calls ---------------------------------------------------------------------------------

    def _send(self, sock: zmq.Socket, st: _ThreadState, data: bytes, deadline: float) -> None:
        copy = len(data) < 65536
        try:
            sock.send(data, _NOBLOCK, copy=copy)
            return
        except zmq.Again:
            pass
        # IMMEDIATE: no connection to a broker is up. Either nothing listens (fail now), or the
        # socket is (re)connecting to a broker that is there (wait for it, up to the deadline).
        reason = self._probe.down_reason()
        if reason is not None:
            st.saw_down = True
            raise BrokerUnavailable(f"no broker at {self.url}: {reason}")
        if st.saw_down:
            # The broker is back. ZeroMQ retries with a growing interval (up to RECONNECT_IVL_MAX);
            # a fresh connect attempts at once, so the first call after the broker's return works.
            st.saw_down = False
            sock.disconnect(self.url)
            sock.connect(self.url)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(f"no broker accepted a connection at {self.url} before the deadline")
            # Slices of PROBE_TTL: a broker that goes away meanwhile is noticed within one.
            if sock.poll(max(1, math.ceil(min(remaining, PROBE_TTL) * 1000)), zmq.POLLOUT):
                try:
                    sock.send(data, _NOBLOCK, copy=copy)
                    return
                except zmq.Again:
                    continue
            reason = self._probe.down_reason()
            if reason is not None:
                st.saw_down = True
                raise BrokerUnavailable(f"no broker at {self.url}: {reason}")

    def next_id(self) -> int:
        """A fresh request id for this thread's socket."""
        with self._errors:
            _, st = self._sock()
        st.next_id = rid = (st.next_id + 1) & 0xFFFFFFFFFFFFFFFF
        return rid

    def send_only(self, frames: list[bytes], timeout: float) -> None:
        with self._errors:
            sock, st = self._sock()
            deadline = time.monotonic() + timeout
            for data in frames:
                self._send(sock, st, data, deadline)

    def call_one(self, make_frame: Callable[[int], bytes], timeout: float) -> ReplyFrame:
        """One frame, one reply: the common case, without call()'s bookkeeping."""
        with self._errors:
            sock, st = self._sock()
            st.next_id = rid = (st.next_id + 1) & 0xFFFFFFFFFFFFFFFF
            data = make_frame(rid)
            start = time.monotonic()
            self._send(sock, st, data, start + timeout)
            return self._wait(sock, st, {rid}, start + timeout + GRACE, timeout)[rid]

    def call(self, frames: list[tuple[int, bytes]], timeout: float) -> dict[int, ReplyFrame]:
        """Send frames, wait for exactly their replies (by id) until the deadline."""
        with self._errors:
            sock, st = self._sock()
            start = time.monotonic()
            deadline = start + timeout + GRACE
            for _, data in frames:
                self._send(sock, st, data, start + timeout)
            return self._wait(sock, st, {rid for rid, _ in frames}, deadline, timeout)

    def _wait(self, sock: zmq.Socket, st: _ThreadState, waiting: set[int], deadline: float, timeout: float) -> dict[int, ReplyFrame]:
        replies: dict[int, ReplyFrame] = {}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerTimeout(f"no reply from the broker at {self.url} within {timeout:.3f}s")
            ms = max(1, int(remaining * 1000 + 0.5))
            # setsockopt on every call costs more than the rest of the call's Python: keep the
            # previous value while it overshoots the deadline by at most a few ms.
            if not 0 <= st.rcvtimeo - ms <= RCVTIMEO_SLACK_MS:
                sock.setsockopt(_RCVTIMEO, ms)
                st.rcvtimeo = ms
            try:
                data = sock.recv()
            except zmq.Again:
                raise BrokerTimeout(f"no reply from the broker at {self.url} within {timeout:.3f}s") from None
            try:
                reply = decode_reply(data)
            except WireError as exc:
                if exc.req_id is not None and exc.req_id in waiting:
                    raise ProtocolMismatch(f"malformed reply from the broker: {exc}") from None
                continue
            if reply.req_id in waiting:
                waiting.discard(reply.req_id)
                replies[reply.req_id] = reply
            # else: a late reply to an earlier call that gave up; it answers nobody now.
        return replies


def _reset_all_after_fork() -> None:
    global _context, _context_pid
    if _context is not None:
        _inherited.append(_context)
    _context = None
    _context_pid = 0
    for t in list(_transports):
        t._after_fork()


os.register_at_fork(after_in_child=_reset_all_after_fork)
