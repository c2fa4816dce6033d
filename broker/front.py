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
from typing import Any

import zmq
from zmq.utils import monitor as zmq_monitor

log = logging.getLogger("mcbroker.front")

# pyzmq's flag constants are enum members; combining them on every call costs more than the
# call itself, so the hot path uses plain ints.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE_DONTWAIT = int(zmq.SNDMORE | zmq.DONTWAIT)
_DONTWAIT = int(zmq.DONTWAIT)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# ZeroMQ's queues are bounded in messages, not bytes, so these bound the broker's memory per
# worker: at most RCVHWM frames of max_frame_bytes waiting to be read, and SNDHWM replies waiting
# for a worker that does not read (past that its replies are dropped and counted). A synchronous
# client has one frame outstanding; an AsyncClient a few hundred.
SNDHWM = 1_000
RCVHWM = 100

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
    ) -> None:
        self.sockets: list["zmq.Socket[Any]"] = []
        self.urls = urls
        self.bad_envelopes = 0
        # Directories this broker created for its sockets, removed again by close().
        self.created_dirs: list[str] = []
        # Worker connections, from ZeroMQ's socket monitor (accepted minus disconnected).
        self.workers = 0
        self._monitors: list["zmq.Socket[Any]"] = []
        gid = resolve_group(socket_group)
        for url in urls:
            path = url[len("ipc://"):] if url.startswith("ipc://") else None
            if path is not None:
                self.created_dirs += _make_dir(os.path.dirname(path) or ".", gid)
                _claim_ipc_path(path)
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
            sock.setsockopt(zmq.LINGER, 0)
            # ZeroMQ disconnects a peer that sends more than this; the decoder rejects frames
            # above max_frame with an error reply, so leave room for that clear answer.
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame * 2)
            if path is not None:
                # Born with the final mode (no moment where it is wider), then chmod/chown'd and
                # checked. Nothing else runs yet, so the process-wide umask is safe to borrow.
                old_umask = os.umask(0o777 & ~socket_mode)
                try:
                    sock.bind(url)
                finally:
                    os.umask(old_umask)
                self.sockets.append(sock)
                _set_access(path, socket_mode, gid)
            else:
                sock.bind(url)
                self.sockets.append(sock)
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
        return out

    def poll_workers(self) -> int:
        """Count the worker connections opened and closed since the last call (never waits)."""
        for mon in self._monitors:
            while int(mon.getsockopt(_EVENTS)) & _POLLIN:
                event = zmq_monitor.recv_monitor_message(mon, _NOBLOCK)
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self.workers += 1
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    self.workers -= 1
        return self.workers

    @staticmethod
    def send(sock: "zmq.Socket[Any]", ident: bytes, data: bytes) -> bool:
        try:
            sock.send(ident, _SNDMORE_DONTWAIT)
            sock.send(data, _DONTWAIT, copy=len(data) < 65536)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the worker is gone. EAGAIN: it is not reading. Either way, drop.
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                log.warning("reply dropped: %s", exc)
            return False

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
