"""Pipelined connections to one memcached server: write batching, in-flight FIFO, opaque checks.

This module owns the memcached sockets and nothing else does. Every request written gets a slot at
the tail of its connection's FIFO; every parsed response belongs to the slot at the head. The
opaque token the broker put on the request must come back on the response, so a lost or extra
response is noticed at once; then the connection is closed and every request in flight on it fails
with an explicit error. A slot whose waiter gave up (deadline passed) stays in the FIFO as a
tombstone that swallows its late response.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import deque
from typing import Any, Callable, Protocol

from clientlib.address import ServerAddress
from clientlib.wire import Code

from . import meta
from .health import Health, State, backoff
from .meta import ProtocolError, Response, Status

log = logging.getLogger("mcbroker.pipeline")

READ_SIZE = 256 * 1024
MAX_READS_PER_EVENT = 8


class Waiter(Protocol):
    """Whoever is waiting for a response (a worker's frame, a fan-out gather, a probe)."""

    done: bool

    def deliver(self, index: int, op: int, resp: Response) -> None: ...

    def fail(self, index: int, code: Code, message: str) -> None: ...


class Budget:
    """Broker-wide bounds shared by every connection, so no queue grows without limit."""

    __slots__ = ("inflight", "buffered", "max_inflight", "max_buffered")

    def __init__(self, max_inflight: int, max_buffered: int) -> None:
        self.inflight = 0
        self.buffered = 0
        self.max_inflight = max_inflight
        self.max_buffered = max_buffered


class ServerStats:
    __slots__ = ("requests", "errors", "timeouts", "resets", "writes", "written", "latency_sum", "latency_n")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.timeouts = 0
        self.resets = 0
        self.writes = 0
        self.written = 0
        self.latency_sum = 0.0
        self.latency_n = 0


# Connection states
DISCONNECTED = 0
CONNECTING = 1
READY = 2

# A slot: (waiter, index, op, opaque token or None, key or None, accepted statuses for text commands)
Slot = tuple[Any, int, int, bytes | None, bytes | None, frozenset | None]


class Connection:
    __slots__ = (
        "server", "sock", "state", "out", "inflight", "parser", "seq", "since", "connect_started",
        "reconnect_at", "attempt", "unflushed", "want_write", "probe", "sample", "sample_t",
    )

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.sock: socket.socket | None = None
        self.state = DISCONNECTED
        self.out = bytearray()
        self.inflight: deque[Slot] = deque()
        self.parser = meta.ResponseParser(server.max_value_len)
        self.seq = 0
        self.since = 0.0  # last progress: a read, or the first request after idle
        self.connect_started = 0.0
        self.reconnect_at = 0.0
        self.attempt = 0
        self.unflushed = 0
        self.want_write = False
        self.probe = False
        # Latency is sampled: one slot at a time is timed from push to its response, so the hot
        # path pays one identity check per response (every request is timed when depth is 1).
        self.sample: Slot | None = None
        self.sample_t = 0.0

    @property
    def fd(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    @property
    def depth(self) -> int:
        return len(self.inflight)

    # --- lifecycle -----------------------------------------------------------------------------

    def open(self, now: float) -> None:
        addr = self.server.address
        if addr.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = addr.path
        else:
            family = socket.AF_INET6 if ":" in (addr.host or "") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            target = (addr.host, addr.port)
        sock.setblocking(False)
        self.sock = sock
        self.state = CONNECTING
        self.connect_started = now
        self.want_write = True
        self.parser = meta.ResponseParser(self.server.max_value_len)
        rc = sock.connect_ex(target)
        self.server.io.watch(self)
        if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.failed(now, f"connect to {addr.name}: {errno.errorcode.get(rc, rc)}", Code.CONNECTION_ERROR)

    def close(self) -> None:
        if self.sock is not None:
            self.server.io.unwatch(self)
            self.sock.close()
            self.sock = None
        self.state = DISCONNECTED
        self.want_write = False

    def failed(self, now: float, reason: str, code: Code, *, count: bool = True) -> None:
        """The connection can no longer be trusted: close it, fail everything on it, retry later."""
        server = self.server
        if self.sock is not None:
            server.stats.resets += 1
            log.warning("%s: closing connection: %s (%d in flight)", server.address.name, reason, len(self.inflight))
        self.close()
        self.fail_inflight(code, reason)
        if count:
            self.attempt += 1
            self.reconnect_at = now + backoff(self.attempt - 1, 0.02, 2.0)
        else:
            # The server answered (ERROR, CLIENT_ERROR): it is alive, only this stream is spoiled.
            # Reconnect at once, or requests would fail fast for want of a connection meanwhile.
            self.reconnect_at = now
        if self.probe:
            self.probe = False
            server.health.probe_failed(now, reason)
        elif count:
            server.record_failure(now, reason)

    def fail_inflight(self, code: Code, reason: str) -> None:
        budget = self.server.budget
        budget.buffered -= len(self.out)
        self.out.clear()
        self.unflushed = 0
        self.sample = None
        inflight = self.inflight
        self.inflight = deque()
        budget.inflight -= len(inflight)
        server = self.server
        for waiter, index, op, _opaque, key, _expect in inflight:
            if key is not None:
                server.unpin(key)
            if not waiter.done:
                waiter.fail(index, code, reason)

    # --- requests ------------------------------------------------------------------------------

    def next_opaque(self) -> int:
        self.seq = seq = (self.seq + 1) & 0xFFFFFFFF
        return seq

    def push(self, slot: Slot, data: bytes, now: float) -> None:
        if not self.inflight:
            self.since = now
        if self.sample is None:
            self.sample = slot
            self.sample_t = now
        self.inflight.append(slot)
        self.out += data
        self.unflushed += 1
        self.server.budget.inflight += 1
        self.server.budget.buffered += len(data)
        self.server.stats.requests += 1
        if self.state == READY and not self.want_write:
            self.server.io.dirty(self)

    def flush(self, now: float) -> None:
        if self.state != READY or not self.out:
            return
        try:
            n = self.sock.send(self.out)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self.failed(now, f"write to {self.server.address.name}: {exc.strerror or exc}", Code.CONNECTION_ERROR)
            return
        stats = self.server.stats
        if n:
            stats.writes += 1
            stats.written += self.unflushed
            self.unflushed = 0
            del self.out[:n]
            self.server.budget.buffered -= n
        want = bool(self.out)
        if want != self.want_write:
            self.want_write = want
            self.server.io.watch(self)

    # --- events --------------------------------------------------------------------------------

    def on_writable(self, now: float) -> None:
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
            if err:
                self.failed(now, f"connect to {self.server.address.name}: {errno.errorcode.get(err, err)}", Code.CONNECTION_ERROR)
                return
            self.state = READY
            self.want_write = bool(self.out)
            self.server.io.watch(self)
            if self.inflight:
                self.since = now
        self.flush(now)

    def on_readable(self, now: float) -> None:
        sock = self.sock
        for _ in range(MAX_READS_PER_EVENT):
            try:
                data = sock.recv(READ_SIZE)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.failed(now, f"read from {self.server.address.name}: {exc.strerror or exc}", Code.CONNECTION_ERROR)
                return
            if not data:
                self.failed(now, f"{self.server.address.name} closed the connection", Code.CONNECTION_ERROR)
                return
            self.since = now
            self.parser.feed(data)
            try:
                self._drain(now)
            except ProtocolError as exc:
                self.failed(now, f"protocol error from {self.server.address.name}: {exc}", Code.CONNECTION_ERROR)
                return
            if self.sock is not sock or len(data) < READ_SIZE:
                return

    def _drain(self, now: float) -> None:
        parser = self.parser
        inflight = self.inflight
        server = self.server
        while (resp := parser.next_response()) is not None:
            if not inflight:
                raise ProtocolError(f"response with nothing in flight: {resp.status.name}")
            head = inflight[0]
            waiter, index, op, opaque, key, expect = head
            status = resp.status
            if status is Status.ERROR or status is Status.CLIENT_ERROR:
                if opaque is None and waiter is not _PROBE:
                    # A text command the broker built from checked tokens (stats <arg>, flush_all) is
                    # one line answered by one line: ERROR to `stats <unknown>` is its own answer and
                    # the stream is still in step (the next meta response's opaque would show it if
                    # not). Resetting would let one worker's typo fail every request in flight.
                    inflight.popleft()
                    server.budget.inflight -= 1
                    if head is self.sample:
                        self.sample = None
                    if not waiter.done:
                        code = Code.CLIENT_ERROR if status is Status.CLIENT_ERROR else Code.UNKNOWN_COMMAND
                        waiter.fail(index, code, f"{status.value} {resp.text.decode('ascii', 'replace')}".strip())
                    if inflight:
                        self.since = now
                    continue
                # Which request it answers, and what memcached did with the rest of the stream, is
                # now unknowable: blame the head, fail the rest, start over.
                inflight.popleft()
                server.budget.inflight -= 1
                if key is not None:
                    server.unpin(key)
                code = Code.CLIENT_ERROR if status is Status.CLIENT_ERROR else Code.UNKNOWN_COMMAND
                if not waiter.done:
                    waiter.fail(index, code, f"{status.value} {resp.text.decode('ascii', 'replace')}".strip())
                self.failed(now, f"{status.value} from {server.address.name}; pipeline reset", Code.CONNECTION_ERROR, count=False)
                return
            if status is not Status.SERVER_ERROR:
                if opaque is not None:
                    if resp.flags.get("O") != opaque:
                        raise ProtocolError(f"opaque mismatch: expected {opaque!r}, got {resp.flags.get('O')!r}")
                elif expect is not None and status not in expect:
                    raise ProtocolError(f"unexpected {status.name} for a text command")
            inflight.popleft()
            server.budget.inflight -= 1
            if key is not None:
                server.unpin(key)
            if head is self.sample:
                self.sample = None
                server.stats.latency_sum += now - self.sample_t
                server.stats.latency_n += 1
            if self.probe:
                self.probe = False
                server.probe_succeeded(now)
            elif server.health.failures:
                server.health.record_success()
            if not waiter.done:
                try:
                    waiter.deliver(index, op, resp)
                except ValueError as exc:
                    # A well-framed response with unusable content (say, flags that are not
                    # numbers): this peer is not a memcached we can trust.
                    waiter.fail(index, Code.CONNECTION_ERROR, f"unusable response from {server.address.name}")
                    raise ProtocolError(f"unusable {status.name} response: {exc}") from None
            if inflight:
                self.since = now
        self.attempt = 0

    def check_timers(self, now: float, connect_timeout: float, io_timeout: float) -> None:
        if self.state == CONNECTING and now - self.connect_started > connect_timeout:
            self.failed(now, f"connect to {self.server.address.name} timed out", Code.CONNECTION_ERROR)
        elif self.state == READY and self.inflight and now - self.since > io_timeout:
            self.failed(now, f"{self.server.address.name} silent for {now - self.since:.1f}s with requests in flight", Code.TIMEOUT)


class IO(Protocol):
    """What a connection needs from the loop: poll registration and the write-soon list."""

    def watch(self, conn: Connection) -> None: ...

    def unwatch(self, conn: Connection) -> None: ...

    def dirty(self, conn: Connection) -> None: ...


class Server:
    """One memcached server: its connections, health, key pinning and counters."""

    def __init__(
        self,
        address: ServerAddress,
        *,
        connections: int,
        io: IO,
        budget: Budget,
        health: Health,
        max_inflight_conn: int,
        max_inflight_server: int,
        max_value_len: int,
        on_down: Callable[["Server"], None] | None = None,
    ) -> None:
        self.address = address
        self.name = address.name
        self.io = io
        self.budget = budget
        self.health = health
        self.max_inflight_conn = max_inflight_conn
        self.max_inflight_server = max_inflight_server
        self.max_value_len = max_value_len
        self.stats = ServerStats()
        self.conns = [Connection(self) for _ in range(connections)]
        # key -> [connection, requests in flight]: later requests for a key follow earlier ones, so
        # a worker's own writes are never overtaken by its own later reads on another connection.
        self.pinned: dict[bytes, list[Any]] = {}
        self.batch_conn: Connection | None = None
        self.retired = False
        self._on_down = on_down

    def start(self, now: float) -> None:
        for conn in self.conns:
            conn.open(now)

    @property
    def inflight(self) -> int:
        return sum(len(c.inflight) for c in self.conns)

    def silent_for(self, now: float) -> float:
        """How long the server has answered nothing while requests waited on it (0 if none wait)."""
        waits = [now - c.since for c in self.conns if c.inflight]
        return min(waits) if waits else 0.0

    def inflight_over(self) -> bool:
        conns = self.conns
        # Cheap bound first: the sum only matters once one connection is deep enough.
        if max(len(c.inflight) for c in conns) * len(conns) < self.max_inflight_server:
            return False
        return self.inflight >= self.max_inflight_server

    @property
    def state(self) -> State:
        return self.health.state

    def unpin(self, key: bytes) -> None:
        entry = self.pinned.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.pinned[key]

    def pick(self, key: bytes | None, now: float) -> Connection | None:
        """The connection for the next request (None if the server has none usable)."""
        if key is not None:
            entry = self.pinned.get(key)
            if entry is not None:
                entry[1] += 1
                return entry[0]
        conn = self.batch_conn
        if conn is None or conn.sock is None:
            # One connection takes the whole loop turn's batch: idle first, else the least deep.
            best = None
            for c in self.conns:
                if c.sock is not None and (best is None or len(c.inflight) < len(best.inflight)):
                    best = c
                    if not c.inflight:
                        break
            if best is None:
                for c in self.conns:
                    if c.sock is None and now >= c.reconnect_at and self.health.is_up:
                        c.open(now)
                        if c.sock is not None:
                            best = c
                            break
                if best is None:
                    return None
            self.batch_conn = conn = best
        if key is not None:
            self.pinned[key] = [conn, 1]
        return conn

    def record_failure(self, now: float, reason: str) -> None:
        self.stats.errors += 1
        if self.health.record_failure(now, reason):
            log.error("%s marked down after %d consecutive failures: %s", self.name, self.health.failures, reason)
            self.mark_down(now, reason)

    def mark_down(self, now: float, reason: str) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                conn.close()
            conn.fail_inflight(Code.SERVER_DOWN, f"{self.name} is down: {reason}")
        self.pinned.clear()
        if self._on_down is not None:
            self._on_down(self)

    def probe_succeeded(self, now: float) -> None:
        log.warning("%s is back up", self.name)
        self.health.probe_succeeded(now)
        for conn in self.conns:
            conn.attempt = 0
            if conn.sock is None:
                conn.open(now)
        if self._on_down is not None:
            self._on_down(self)

    def tick(self, now: float, connect_timeout: float, io_timeout: float) -> None:
        """Timers: connect/io timeouts, reconnects, probes."""
        health = self.health
        for conn in self.conns:
            if conn.sock is not None:
                conn.check_timers(now, connect_timeout, io_timeout)
            elif health.is_up and not self.retired and now >= conn.reconnect_at:
                conn.open(now)
        if health.probe_due(now) and not self.retired:
            health.start_probe()
            conn = self.conns[0]
            conn.probe = True
            conn.open(now)
            if conn.sock is not None:
                conn.push((_PROBE, 0, 0, None, None, _VERSION_OK), meta.encode(meta.Version()), now)

    def close(self, reason: str) -> None:
        for conn in self.conns:
            conn.close()
            conn.fail_inflight(Code.CONNECTION_ERROR, reason)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "state": self.health.state.value,
            "connections": sum(1 for c in self.conns if c.state == READY),
            "depth": self.inflight,
            "requests": s.requests,
            "errors": s.errors,
            "timeouts": s.timeouts,
            "resets": s.resets,
            "ejections": self.health.ejections,
            "writes": s.writes,
            "requests_written": s.written,
            "requests_per_write": round(s.written / s.writes, 2) if s.writes else 0.0,
            "latency_avg_us": round(s.latency_sum / s.latency_n * 1e6, 1) if s.latency_n else 0.0,
        }


class _ProbeWaiter:
    """A probe's `version` answer needs no delivery: receiving it is the whole point."""

    done = False

    def deliver(self, index: int, op: int, resp: Response) -> None:
        pass

    def fail(self, index: int, code: Code, message: str) -> None:
        pass


_PROBE = _ProbeWaiter()
_VERSION_OK = frozenset({Status.VERSION})
monotonic = time.monotonic
