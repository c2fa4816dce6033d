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

import os
import random
import threading
import time
import weakref
from typing import Any, Callable

import zmq

from .errors import BrokerTimeout, BrokerUnavailable, ProtocolMismatch
from .wire import ReplyFrame, WireError, decode_reply

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's enum flags cost more than the call
_RCVTIMEO = int(zmq.RCVTIMEO)
RCVTIMEO_SLACK_MS = 5

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
    if _context is None or _context_pid != pid:
        with _context_lock:
            if _context is None or _context_pid != pid:
                if _context is not None:
                    _inherited.append(_context)
                _context = zmq.Context(io_threads=1)
                _context_pid = pid
    return _context


class _ThreadState(threading.local):
    sock: zmq.Socket | None = None
    gen = -1
    next_id = 0
    rcvtimeo = -2


class Transport:
    def __init__(self, url: str) -> None:
        self.url = url
        self._pid = os.getpid()
        self._gen = 0
        self._local = _ThreadState()
        self._sockets: "weakref.WeakSet[zmq.Socket]" = weakref.WeakSet()
        self._lock = threading.Lock()
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
        if sock is None or st.gen != self._gen:
            if sock is not None:
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

    def _send(self, sock: zmq.Socket, data: bytes, deadline: float) -> None:
        try:
            sock.send(data, _NOBLOCK, copy=len(data) < 65536)
            return
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise BrokerUnavailable(f"cannot send to the broker at {self.url}: {exc}") from None
        # No connected broker yet (a new socket, or the broker restarting): wait for one.
        remaining = deadline - time.monotonic()
        if remaining > 0 and sock.poll(max(1, int(remaining * 1000)), zmq.POLLOUT):
            try:
                sock.send(data, _NOBLOCK, copy=len(data) < 65536)
                return
            except zmq.ZMQError:
                pass
        raise BrokerUnavailable(f"no broker is accepting requests at {self.url}")

    def next_id(self) -> int:
        """A fresh request id for this thread's socket."""
        _, st = self._sock()
        st.next_id = rid = (st.next_id + 1) & 0xFFFFFFFFFFFFFFFF
        return rid

    def send_only(self, frames: list[bytes], timeout: float) -> None:
        sock, _ = self._sock()
        deadline = time.monotonic() + timeout
        for data in frames:
            self._send(sock, data, deadline)

    def call_one(self, make_frame: Callable[[int], bytes], timeout: float) -> ReplyFrame:
        """One frame, one reply: the common case, without call()'s bookkeeping."""
        sock, st = self._sock()
        st.next_id = rid = (st.next_id + 1) & 0xFFFFFFFFFFFFFFFF
        data = make_frame(rid)
        start = time.monotonic()
        self._send(sock, data, start + timeout)
        return self._wait(sock, st, {rid}, start + timeout + GRACE, timeout)[rid]

    def call(self, frames: list[tuple[int, bytes]], timeout: float) -> dict[int, ReplyFrame]:
        """Send frames, wait for exactly their replies (by id) until the deadline."""
        sock, st = self._sock()
        start = time.monotonic()
        deadline = start + timeout + GRACE
        for _, data in frames:
            self._send(sock, data, start + timeout)
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
