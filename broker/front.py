"""The worker-facing side: ZeroMQ ROUTER sockets. Receive frames in bounded batches, send replies
without ever blocking the loop.

This is the one seam between the broker and its worker transport: the rest of the broker sees
(peer, ident, bytes) in and `send(peer, ident, bytes) -> bool` out.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import grp
import stat
import time
from typing import Any

import zmq
from zmq.utils import monitor as zmq_monitor

from .access import Access
from .logfmt import RateLimit

log = logging.getLogger("mcbroker.front")

# pyzmq's flag constants are enum members; combining them on every call costs more than the
# call itself, so the hot path uses plain ints.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE_DONTWAIT = int(zmq.SNDMORE | zmq.DONTWAIT)
_DONTWAIT = int(zmq.DONTWAIT)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# ZeroMQ's queues are bounded in messages, not bytes, and per worker socket, outside the broker's
# budget (max_buffered_bytes). So they are kept short:
# - receive: RCVHWM frames of at most MAXMSGSIZE bytes per worker socket wait to be read, plus the
#   one ZeroMQ's I/O thread holds once that queue is full (receive_slack). A flood of 500 KB frames
#   from 64 sockets that never read cost 3.9 GB with 100 here; a worker with many calls in flight
#   (AsyncClient) just waits in its own send queue instead (measured: no loss of throughput).
# - send: SNDHWM replies waiting for a worker that does not read; past that its replies are
#   dropped and counted. Lower would drop the replies of an AsyncClient burst before the I/O
#   thread sends them. Replies of LARGE_REPLY bytes or more are also counted in bytes until
#   ZeroMQ has written them (Front._send_large): at most peer_reply_limit per worker socket and
#   reply_limit (max_buffered_bytes) in all wait for workers, the rest is dropped and counted. So
#   a worker that stopped reading holds at most SNDHWM small replies (< 64 KiB each) plus
#   peer_reply_limit bytes of large ones.
# Per worker socket, then, what the broker may hold beyond its budget is receive_slack plus
# SNDHWM small replies; the large replies are bounded in all. The worker sockets served at once are
# capped (max_clients, memcached's -c): a connection accepted past the cap is shut down while its
# handshake waits for the ZAP handler (Front.admit, refuse_connection, broker/access.py), so it
# never queues a frame, and the slack is max_clients x (receive_slack + SNDHWM small replies),
# whatever the number of sockets that try.
SNDHWM = 1_000
RCVHWM = 2
# Replies this large go without a copy, tracked until sent (copying costs more than tracking here).
LARGE_REPLY = 65536
# What the large replies waiting for one worker may hold, at least: a worker reading slowly gets
# this much ahead before its replies are dropped (4 x max_frame_bytes when that is more).
PEER_REPLY_BYTES = 64 << 20


def max_message_size(max_frame: int) -> int:
    """ZeroMQ's MAXMSGSIZE for the worker sockets: a frame a little above max_frame still gets the
    decoder's clear "exceeds" answer; a larger one costs its sender the connection."""
    return max_frame + min(max_frame, 65536)


def receive_slack(workers: int, frame_bytes: int) -> int:
    """The most the worker sockets' receive queues hold outside the broker's budget, in bytes, when
    `workers` sockets send frames of `frame_bytes` (at most max_message_size(max_frame_bytes)):
    per socket RCVHWM queued frames, the one its I/O thread holds once the queue is full, and one
    being read (measured: 2.5 frames per socket with RCVHWM 1, 5.5 with 4)."""
    return workers * (RCVHWM + 2) * frame_bytes


def bound_address(endpoint: str) -> tuple[str, object]:
    """What getsockname() of a connection accepted on a bound ZeroMQ endpoint (its LAST_ENDPOINT,
    "tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://0.0.0.0:5555", "ipc:///path") returns,
    as ("ipc", path) or ("tcp", (host or None for a wildcard bind, port))."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        # An abstract socket ("ipc://@name") is named with a leading NUL byte.
        return ("ipc", "\0" + path[1:] if path.startswith("@") else path)
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        host = host[1:-1] if host.startswith("[") else host
        return ("tcp", (None if host in ("0.0.0.0", "::", "*") else host, int(port)))
    raise ValueError(f"not a tcp or ipc endpoint: {endpoint!r}")


def is_accepted_on(sock: socket.socket, local: tuple[str, object]) -> bool:
    """Whether `sock` is a connection accepted on the bound address `local` (bound_address): its
    own address is that one and it has a peer. A listener has no peer, and the broker's memcached
    sockets and ZeroMQ's internal ones have other local addresses, so a file descriptor number
    that was reused meanwhile is never taken for a worker's connection."""
    try:
        if sock.type != socket.SOCK_STREAM:
            return False
        name = sock.getsockname()
        sock.getpeername()  # a listener, or a connection already gone: ENOTCONN
    except OSError:
        return False
    kind, want = local
    if kind == "ipc":
        if sock.family != socket.AF_UNIX:
            return False
        got = name.decode("latin-1") if isinstance(name, bytes) else name
        return bool(got) and got == want
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(want, tuple):
        return False
    host, port = want
    if name[1] != port:
        return False
    if host is None:
        return True
    got_host = name[0]
    if got_host.startswith("::ffff:") and sock.family == socket.AF_INET6 and ":" not in host:
        got_host = got_host[len("::ffff:"):]
    return bool(got_host == host)


def peer_closed(fd: int) -> bool:
    """Whether the peer of the connection on `fd` has closed it (the end of the stream is all
    that is left to read). Peeks on a duplicate: nothing is consumed, the owner's descriptor is
    untouched; a descriptor that is no longer a connected socket counts as closed."""
    try:
        dup = os.dup(fd)
    except OSError:
        return True
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return True
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read now
    except OSError:
        return True
    finally:
        s.close()


def refuse_connection(fd: int, local: tuple[str, object]) -> bool:
    """Shut down the worker connection on file descriptor `fd` (ZeroMQ's accept event names it),
    if it still is a connection accepted on `local`; True when it was shut down.

    Only a duplicate of the descriptor is closed here: ZeroMQ's I/O thread owns `fd`, reads the
    end of the stream, and closes its own descriptor (its disconnect event follows). The peer
    sees the connection end; a DEALER reconnects by itself after its reconnect interval."""
    try:
        dup = os.dup(fd)
    except OSError:
        return False  # closed meanwhile: its disconnect event is on its way
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)  # not a socket (the number was reused)
        return False
    try:
        if not is_accepted_on(s, local):
            return False
        s.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        s.close()


# The ipc socket's directory: its group may enter (to reach the socket), nobody else.
DIR_MODE = 0o750
# In a socket directory the broker created: it removes that directory on exit.
DIR_MARKER = ".created-by-mcbroker"


class AddressInUse(RuntimeError):
    pass


class SocketAccessError(RuntimeError):
    pass


def resolve_group(name: str) -> int | None:
    """The gid for `socket_group` ("" -> None: the broker's own group)."""
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SocketAccessError(f"socket_group {name!r}: no such group on this host") from None


def _make_dir(directory: str, gid: int | None) -> list[str]:
    """Create the socket's directory (and missing parents) 0750, group `gid`; return the ones
    this broker owns, innermost first, so close() removes exactly those.

    The socket's directory gets a marker file, so a broker restarted after a SIGKILL (which left
    the directory behind) still knows the directory is a broker's to remove, and never removes
    one an operator made."""
    created: list[str] = []
    d = os.path.abspath(directory)
    while not os.path.isdir(d):
        created.append(d)
        d = os.path.dirname(d)
    for path in reversed(created):
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DIR_MODE)  # mkdir's mode passes through the umask
        if gid is not None:
            os.chown(path, -1, gid)
    marker = os.path.join(os.path.abspath(directory), DIR_MARKER)
    if created:
        with open(marker, "wb"):
            pass
    elif os.path.exists(marker):
        created.append(os.path.abspath(directory))
    return created


def _claim_ipc_path(path: str) -> None:
    """Refuse to take over a live broker's socket; clear a stale one.

    ZeroMQ would silently steal an ipc path from a running broker, leaving its workers talking to
    nobody. A unix connect() tells a live listener from a stale file.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise
    else:
        raise AddressInUse(f"another process is already listening on ipc://{path}")
    finally:
        probe.close()


def _set_access(path: str, mode: int, gid: int | None) -> None:
    """Give the bound socket its mode and group, then check they hold (a file system that ignores
    chmod/chown, or a group this user may not give, must stop the start, not surprise a worker)."""
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise SocketAccessError(f"cannot set mode {mode:04o} / group {gid} on {path}: {exc.strerror}") from None
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != mode or (gid is not None and st.st_gid != gid):
        raise SocketAccessError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o} group {st.st_gid} after setting {mode:04o} group {gid}"
        )
    d = os.stat(os.path.dirname(path))
    group_enters = d.st_mode & 0o010 and (gid is None or d.st_gid == gid)
    if not (d.st_mode & 0o001 or group_enters):
        log.warning(
            "socket_group cannot reach %s: its directory %s is mode %04o group %d (needs group x)",
            path, os.path.dirname(path), stat.S_IMODE(d.st_mode), d.st_gid,
        )


class Front:
    def __init__(
        self,
        ctx: "zmq.Context[Any]",
        urls: tuple[str, ...],
        max_frame: int,
        socket_mode: int = 0o660,
        socket_group: str = "",
        access: Access | None = None,
        reply_limit: int = 1 << 28,
        max_clients: int = 1024,
    ) -> None:
        self.sockets: list["zmq.Socket[Any]"] = []
        self.urls = urls
        self.bad_envelopes = 0
        # Frames recv_batch handed out (bad envelopes not among them): counted where they leave
        # the sockets, so the stop line can show that each got its answer.
        self.frames_read = 0
        # Directories this broker created for its sockets, removed again by close().
        self.created_dirs: list[str] = []
        # Worker connections served now, from ZeroMQ's socket monitor (accepted minus
        # disconnected, less the refused ones): (socket, file descriptor), at most max_clients.
        # The socket is part of the key because each listening socket has its own monitor: a
        # descriptor closed on one and reused by an accept on another can be read in either
        # order, and keyed by descriptor alone the late disconnect took the new connection's slot.
        self.workers = 0
        self.max_clients = max_clients
        self.clients_refused = 0
        self._live: set[tuple[int, int]] = set()
        # Connections accepted while max_clients were served, waiting for admit(), oldest first.
        self._pending: dict[tuple[int, int], None] = {}
        # Connections shut down past max_clients whose disconnect event has not come yet.
        self._refusing: set[tuple[int, int]] = set()
        self._refusals = RateLimit()
        self._monitors: list["zmq.Socket[Any]"] = []
        # Per socket, the address its accepted connections have (bound_address).
        self._local: list[tuple[str, object]] = []
        # Large replies ZeroMQ still holds (see _send_large): (tracker, worker, bytes).
        self._large: list[tuple[Any, bytes, int]] = []
        self._peer_bytes: dict[bytes, int] = {}
        self.reply_bytes = 0
        self.replies_over_limit = 0
        self.set_reply_limit(reply_limit, max_frame)
        gid = resolve_group(socket_group)
        try:
            for url in urls:
                self._listen(ctx, url, max_frame, socket_mode, gid, access)
        except BaseException:
            self.close()  # the addresses bound before the one that failed, and their ipc paths
            raise

    def _listen(
        self, ctx: "zmq.Context[Any]", url: str, max_frame: int, socket_mode: int, gid: int | None,
        access: Access | None,
    ) -> None:
        path = url[len("ipc://"):] if url.startswith("ipc://") else None
        if path is not None:
            # Before the directory is taken as this broker's: a live broker's path and its
            # directory stay untouched.
            _claim_ipc_path(path)
            self.created_dirs += _make_dir(os.path.dirname(path) or ".", gid)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.LINGER, 0)
        # ZeroMQ disconnects a peer that sends more than this; the decoder rejects frames
        # above max_frame with an error reply, so leave room for that clear answer.
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size(max_frame))
        if access is not None:
            # The ZAP handler: CURVE for tcp when configured (ipc stays guarded by the file
            # system), and for every socket the moment where max_clients is enforced.
            access.guard(sock, tcp=path is None)
        try:
            if path is not None:
                # Born with the final mode (no moment where it is wider), then chmod/chown'd and
                # checked. Nothing else runs yet, so the process-wide umask is safe to borrow.
                old_umask = os.umask(0o777 & ~socket_mode)
                try:
                    sock.bind(url)
                finally:
                    os.umask(old_umask)
            else:
                sock.bind(url)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"another process is already listening on {url}") from None
            raise
        self.sockets.append(sock)
        self._local.append(bound_address(sock.getsockopt_string(zmq.LAST_ENDPOINT)))
        if path is not None:
            _set_access(path, socket_mode, gid)
        self._monitors.append(sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED))

    def recv_batch(self, sock: "zmq.Socket[Any]", limit: int, max_bytes: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (ident, frame) pairs that are ready now, stopping once `max_bytes` of
        frames were read, so one loop turn stays short however large the frames; never waits.
        Call it for a socket the poll reported readable."""
        out: list[tuple[bytes, bytes]] = []
        recv = sock.recv
        getopt = sock.getsockopt
        taken = 0
        for _ in range(limit):
            # ZMQ_EVENTS rather than a read that raises Again: an exception costs more than the
            # rest of a small frame's handling.
            if taken >= max_bytes or (out and not int(getopt(_EVENTS)) & _POLLIN):
                break
            try:
                ident = recv(_NOBLOCK)
            except zmq.Again:
                break
            # A ROUTER message has at least two parts (its peer's identity first), and a
            # multipart message arrives whole, so the second part is there without asking.
            data = recv(_NOBLOCK)
            if getopt(_RCVMORE):
                # A DEALER sends exactly one part per request; anything else is not ours.
                while getopt(_RCVMORE):
                    recv(_NOBLOCK)
                self.bad_envelopes += 1
                continue
            out.append((ident, data))
            taken += len(data)
        self.frames_read += len(out)
        return out

    def poll_workers(self) -> int:
        """Take the worker connections opened and closed since the last call (never waits).
        Returns the connections served now.

        A connection accepted while a slot is free is served at once. One accepted while
        max_clients are served waits (pending) for admit(), which the ZAP handler runs before it
        answers a handshake: by then a connection that held a slot only for a moment (clientlib's
        "is anything listening" check connects and closes at once) has gone and freed it."""
        for i, mon in enumerate(self._monitors):
            while int(mon.getsockopt(_EVENTS)) & _POLLIN:
                event = zmq_monitor.recv_monitor_message(mon, _NOBLOCK)
                self.connection_event(i, event["event"], int(event["value"]))
        return self.workers

    def connection_event(self, socket_index: int, kind: int, fd: int) -> None:
        """Count one monitor event of the listening socket `socket_index` (its place in `urls`):
        zmq.EVENT_ACCEPTED or zmq.EVENT_DISCONNECTED of the connection on descriptor `fd`."""
        conn = (socket_index, fd)
        if kind == zmq.EVENT_ACCEPTED:
            if len(self._live) < self.max_clients:
                self._live.add(conn)
            else:
                self._pending[conn] = None
        elif kind == zmq.EVENT_DISCONNECTED:
            # In exactly one of these, or none (a pending one whose peer had closed).
            self._live.discard(conn)
            self._pending.pop(conn, None)
            self._refusing.discard(conn)
        self.workers = len(self._live)

    def admit(self) -> None:
        """Serve or refuse the connections waiting for a slot (the ZAP handler calls this before
        each answer, so a connection's fate is settled before its handshake can finish).

        Every ZeroMQ connection asks the ZAP handler once, after its accept event: the one asking
        now is among those taken by poll_workers. A waiting connection whose peer has already
        closed is skipped (its disconnect event follows); the others get the free slots, oldest
        first, and the rest are shut down (refuse_connection), so none of them ever delivers a
        frame."""
        self.poll_workers()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for conn in pending:
            if peer_closed(conn[1]):
                continue
            if len(self._live) < self.max_clients:
                self._live.add(conn)
            else:
                self._refuse(conn)
        self.workers = len(self._live)

    def _refuse(self, conn: tuple[int, int]) -> None:
        # Remembered even when it was gone already (refuse_connection False): its disconnect
        # event is still to come and must not free a served connection's slot.
        self._refusing.add(conn)
        refuse_connection(conn[1], self._local[conn[0]])
        self.clients_refused += 1
        held = self._refusals.allow("max_clients", time.monotonic())
        if held is not None:
            more = f" ({held} more refused since the last line)" if held else ""
            log.warning(
                "max_clients (%d) reached: new worker connections are shut down, their calls time out; "
                "clients_refused %d%s",
                self.max_clients, self.clients_refused, more,
            )

    @property
    def monitors(self) -> tuple["zmq.Socket[Any]", ...]:
        """The monitor sockets: readable when a worker connection was accepted or closed."""
        return tuple(self._monitors)

    def set_reply_limit(self, reply_limit: int, max_frame: int) -> None:
        """Bytes of large replies that may wait for the workers in all (max_buffered_bytes), and
        for one worker socket."""
        self.reply_limit = reply_limit
        self.peer_reply_limit = min(reply_limit, max(PEER_REPLY_BYTES, 4 * max_frame))

    def send(self, sock: "zmq.Socket[Any]", ident: bytes, data: bytes) -> bool:
        if len(data) >= LARGE_REPLY:
            return self._send_large(sock, ident, data)
        try:
            sock.send(ident, _SNDMORE_DONTWAIT)
            sock.send(data, _DONTWAIT)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the worker is gone. EAGAIN: it is not reading. Either way, drop.
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                log.warning("reply dropped: %s", exc)
            return False

    def _send_large(self, sock: "zmq.Socket[Any]", ident: bytes, data: bytes) -> bool:
        """A reply of LARGE_REPLY bytes or more: sent without a copy and tracked until ZeroMQ has
        written it to the worker's socket, so the bytes waiting for workers that do not read are
        bounded per worker (peer_reply_limit) and in all (reply_limit); past either, dropped."""
        n = len(data)
        self.reap()
        held = self._peer_bytes.get(ident, 0)
        if held + n > self.peer_reply_limit or self.reply_bytes + n > self.reply_limit:
            self.replies_over_limit += 1
            return False
        try:
            sock.send(ident, _SNDMORE_DONTWAIT)
            tracker = sock.send(data, _DONTWAIT, copy=False, track=True)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                log.warning("reply dropped: %s", exc)
            return False
        if tracker is not None and not tracker.done:
            self._large.append((tracker, ident, n))
            self._peer_bytes[ident] = held + n
            self.reply_bytes += n
        return True

    def reap(self) -> None:
        """Forget the large replies ZeroMQ has sent (called per large reply and by the timers)."""
        if not self._large:
            return
        keep = []
        peer = self._peer_bytes
        for entry in self._large:
            tracker, ident, n = entry
            if tracker.done:
                self.reply_bytes -= n
                left = peer[ident] - n
                if left:
                    peer[ident] = left
                else:
                    del peer[ident]
            else:
                keep.append(entry)
        self._large = keep

    def close(self, linger_ms: int = 0) -> None:
        """Close the sockets (replies still queued get `linger_ms` to go out) and remove the ipc
        paths this broker created."""
        for sock, mon in zip(self.sockets, self._monitors):
            sock.disable_monitor()
            mon.close(linger=0)
        self._monitors = []
        for url, sock in zip(self.urls, self.sockets):
            sock.close(linger=linger_ms)
            if url.startswith("ipc://"):
                try:
                    os.unlink(url[len("ipc://"):])
                except OSError:
                    pass
        for d in self.created_dirs:
            try:
                os.unlink(os.path.join(d, DIR_MARKER))
            except OSError:
                pass
            try:
                os.rmdir(d)  # only if empty: never another program's files
            except OSError:
                pass
        self.created_dirs = []
