"""The sockets around the pipelines: one memcached server's connections, their I/O, health and pins.

This module owns the memcached sockets and nothing else does. Each `Connection` drives one
`Pipeline` (pipeline.py, sans-I/O): it connects, writes the pipeline's bytes in one `send` per
loop turn, feeds what it reads into the pipeline, and when the pipeline reports the stream out
of step, closes the socket, fails what was in flight and reconnects.

On every new connection the first request is `stats settings`, so the server's real item size
limit (`item_size_max`, `-I`) and `cas_enabled` are known per server (memcached may be restarted
with other settings) rather than assumed.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import deque
from typing import Any, Callable, Protocol

from clientlib.address import ServerAddress
from clientlib.limits import DEFAULT_ITEM_SIZE_MAX
from clientlib.wire import Code, Op

from . import meta
from .health import Health, State, backoff
from .logfmt import RateLimit
from .stats import LatencyWindow
from .meta import Status
from .pipeline import TEXT, Batch, OutOfStep, Pipeline

log = logging.getLogger("mcbroker.pipeline")
# A server that stays down fails a connect or probe every 100 ms: one line per server per interval.
FAILURE_LINES = RateLimit()

READ_SIZE = 256 * 1024
_READ_BUFFER = bytearray(READ_SIZE)  # one loop thread reads every connection, one at a time
_READ_VIEW = memoryview(_READ_BUFFER)
MAX_READS_PER_EVENT = 8
# memcached's largest item (-I 1024m): the bound on a VA before the server said its own limit.
MAX_ITEM_SIZE = 1 << 30

_SETTINGS = meta.encode(meta.Stats((b"settings",)))
_STATS_EXPECT = frozenset({Status.STATS})


class Budget:
    """Broker-wide bounds shared by every connection, so no queue grows without limit."""

    __slots__ = ("inflight", "buffered", "max_inflight", "max_buffered")

    def __init__(self, max_inflight: int, max_buffered: int) -> None:
        self.inflight = 0
        self.buffered = 0
        self.max_inflight = max_inflight
        self.max_buffered = max_buffered


class ServerStats:
    __slots__ = ("requests", "errors", "timeouts", "resets", "writes", "written")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.timeouts = 0
        self.resets = 0
        self.writes = 0
        self.written = 0


# Connection states
DISCONNECTED = 0
CONNECTING = 1
READY = 2


class IO(Protocol):
    """What a connection needs from the loop: poll registration and the write-soon list."""

    def watch(self, conn: "Connection") -> None: ...

    def unwatch(self, conn: "Connection") -> None: ...

    def dirty(self, conn: "Connection") -> None: ...


class _Settings:
    """Receives the `stats settings` answer that opens every connection. It is also the probe of
    a server marked down: any answer proves it alive."""

    done = False

    def __init__(self, conn: "Connection") -> None:
        self.conn = conn

    def deliver(self, index: int, result: list[Any]) -> None:
        conn = self.conn
        server = conn.server
        if result[0] == Code.OK:
            server.learn_settings(result[1], conn)
        if conn.probe:
            conn.probe = False
            server.probe_succeeded(server.now)

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        for index, result in zip(indices, results):
            self.deliver(index, result)

    def fail(self, index: int, code: Code, message: str) -> None:
        pass


class Connection:
    __slots__ = (
        "server", "sock", "state", "pipeline", "since", "connect_started", "reconnect_at", "attempt",
        "want_write", "probe", "no", "marks", "sent_n", "answered_n",
    )

    def __init__(self, server: "Server", no: int = 0) -> None:
        self.server = server
        self.no = no  # its index among the server's connections: part of its reads' tags
        self.sock: socket.socket | None = None
        self.state = DISCONNECTED
        self.pipeline = Pipeline(MAX_ITEM_SIZE, server.unpin, server.reads, server.joiners, no)
        self.since = 0.0  # last progress: a read, or the first request after idle
        self.connect_started = 0.0
        self.reconnect_at = 0.0
        self.attempt = 0
        self.want_write = False
        self.probe = False
        # Latency per write (pipeline batch): (time written, requests written through it); a
        # write's latency is taken when the answers count reaches its mark (FIFO order).
        self.marks: deque[tuple[float, int]] = deque()
        self.sent_n = 0
        self.answered_n = 0

    @property
    def fd(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    @property
    def depth(self) -> int:
        return self.pipeline.inflight

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
        # The settings answer comes first and sets the exact bound; until then, the last one known.
        self.pipeline = Pipeline(
            self.server.item_size_max or MAX_ITEM_SIZE, self.server.unpin, self.server.reads, self.server.joiners, self.no
        )
        self.push(Batch(_Settings(self), [0], [int(Op.STATS)], None, TEXT, _STATS_EXPECT), _SETTINGS, now, internal=True)
        try:
            rc = sock.connect_ex(target)
        except OSError as exc:
            # A host name that does not resolve (socket.gaierror) at start, reload or reconnect is
            # a failed connect of that server, never the broker's end. (The lookup blocks the loop:
            # give servers as addresses where that matters.)
            self.server.io.watch(self)
            self.failed(now, f"connect to {addr.name}: {exc.strerror or exc}", Code.CONNECTION_ERROR)
            return
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
            # An idle connection that memcached closed (idle_timeout, a restart) is routine.
            level = logging.WARNING if count or self.pipeline.inflight else logging.INFO
            if not count and level == logging.INFO:
                log.info("%s: closing connection: %s (%d in flight)", server.address.name, reason, self.pipeline.inflight)
            else:
                held = FAILURE_LINES.allow(server.address.name, now)
                if held is not None:
                    more = f"; {held} more failures like it in the last {FAILURE_LINES.interval:g}s" if held else ""
                    log.log(level, "%s: closing connection: %s (%d in flight)%s", server.address.name, reason, self.pipeline.inflight, more)
        self.close()
        self.fail_inflight(code, reason)
        if count:
            self.attempt += 1
            self.reconnect_at = now + backoff(self.attempt - 1, 0.02, 2.0)
        else:
            # The server answered: it is alive, only this stream is spoiled (or it closed an idle
            # connection). Reconnect at once, or requests would fail for want of a connection.
            self.reconnect_at = now
        if self.probe:
            self.probe = False
            server.health.probe_failed(now, reason)
        elif count:
            server.record_failure(now, reason)

    def fail_inflight(self, code: Code, reason: str) -> None:
        pipeline = self.pipeline
        budget = self.server.budget
        budget.buffered -= len(pipeline.out)
        n = pipeline.fail_all(code, reason)
        budget.inflight -= n
        self.server.inflight_n -= n
        self.marks.clear()
        self.sent_n = self.answered_n = 0

    # --- requests ------------------------------------------------------------------------------

    def push(self, batch: Batch, data: bytes, now: float, *, internal: bool = False, reserved: bool = False) -> None:
        """Queue a batch for the next write. `internal`: the broker's own (not counted as
        requests); `reserved`: its requests were counted in flight when admitted (Router.handle)."""
        pipeline = self.pipeline
        n = len(batch.indices)
        server = self.server
        if not reserved:
            if not pipeline.inflight:
                self.since = now
            server.budget.inflight += n
            server.inflight_n += n
        pipeline.submit(batch, data, reserved=reserved)
        server.budget.buffered += len(data)
        if not internal:
            server.stats.requests += n
        if self.state == READY and not self.want_write:
            server.io.dirty(self)

    def extend(self, batch: Batch, index: int, read: bytes | None, data: bytes) -> None:
        """Add one admitted plain get to `batch`, this connection's open batch (see
        Pipeline.extend). The push that queued the batch has put the connection up for the write
        that will carry both."""
        self.pipeline.extend(batch, index, read, data)
        server = self.server
        server.budget.buffered += len(data)
        server.stats.requests += 1

    def seal(self) -> None:
        """Fence what is queued now (each write ends with one; a text command gets one before it,
        so no value waits on a reply that carries no opaque to prove it)."""
        pipeline = self.pipeline
        before = len(pipeline.out)
        pipeline.seal()
        self.server.budget.buffered += len(pipeline.out) - before

    def flush(self, now: float) -> None:
        pipeline = self.pipeline
        if self.state != READY or not (pipeline.out or pipeline.unfenced):
            return
        self.seal()
        budget = self.server.budget
        try:
            n = self.sock.send(pipeline.out)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            # memcached's answers to what was written before may wait in the socket still (it
            # answered, then closed or crashed): they are read first and reach their requests,
            # as they would had this write come after the turn's reads.
            sock = self.sock
            self.on_readable(time.monotonic())  # after this turn's writes, as the loop's reads
            if self.sock is sock:
                self.failed(now, f"write to {self.server.address.name}: {exc.strerror or exc}", Code.CONNECTION_ERROR)
            return
        if n:
            # The clock now, not the loop turn's start: handling a large frame can take the loop
            # 100+ ms, which is neither the server's latency nor its silence.
            t = time.monotonic()
            stats = self.server.stats
            stats.writes += 1
            if pipeline.unflushed:
                if pipeline.inflight <= pipeline.unflushed:
                    self.since = t  # all in flight goes out now: any silence starts here
                stats.written += pipeline.unflushed
                self.sent_n += pipeline.unflushed
                self.marks.append((t, self.sent_n))
            pipeline.sent(n)
            budget.buffered -= n
        want = bool(pipeline.out)
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
            self.want_write = bool(self.pipeline.out)
            self.server.io.watch(self)
            if self.pipeline.inflight:
                self.since = now
        self.flush(now)

    def on_readable(self, now: float) -> None:
        sock = self.sock
        server = self.server
        view = _READ_VIEW
        for _ in range(MAX_READS_PER_EVENT):
            try:
                # Into one preallocated buffer: recv(256 KiB) allocates (and trims) 256 KiB per
                # call, which costs more than the rest of a small read's handling.
                got = sock.recv_into(_READ_BUFFER)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                verb = "connect to" if self.state == CONNECTING else "read from"
                self.failed(now, f"{verb} {server.address.name}: {exc.strerror or exc}", Code.CONNECTION_ERROR)
                return
            data = bytes(view[:got])
            if not data:
                # An idle connection closed by memcached (a restart, an idle timeout) says nothing
                # about the server's health: reconnect at once without counting a failure.
                idle = not self.pipeline.inflight and self.state == READY and not self.pipeline.out
                self.failed(now, f"{server.address.name} closed the connection", Code.CONNECTION_ERROR, count=not idle)
                return
            self.since = now
            server.now = now
            pipeline = self.pipeline
            busy = pipeline.inflight
            try:
                matched = pipeline.receive(data)
            except OutOfStep as exc:
                server.budget.inflight -= busy - pipeline.inflight
                server.inflight_n -= busy - pipeline.inflight
                self.failed(now, f"{server.address.name}: {exc}; pipeline reset", Code.CONNECTION_ERROR, count=not exc.answered)
                return
            server.budget.inflight -= busy - pipeline.inflight
            server.inflight_n -= busy - pipeline.inflight
            if matched:
                # Only answers to data requests count as health: a server that answers `stats
                # settings` on every new connection and garbles every request must still go down.
                self.attempt = 0
                if server.health.failures and not self.probe:
                    server.health.record_success()
            if pipeline.inflight < busy:
                self.answered_n += busy - pipeline.inflight
                marks = self.marks
                while marks and marks[0][1] <= self.answered_n:
                    server.latency.record(now - marks.popleft()[0], now)
            if self.sock is not sock or len(data) < READ_SIZE:
                return

    def check_timers(self, now: float, connect_timeout: float, io_timeout: float) -> None:
        if self.state == CONNECTING and now - self.connect_started > connect_timeout:
            self.failed(now, f"connect to {self.server.address.name} timed out", Code.CONNECTION_ERROR)
        elif self.state == READY and self.pipeline.queue and now - self.since > io_timeout:
            self.failed(now, f"{self.server.address.name} silent for {now - self.since:.1f}s with requests in flight", Code.TIMEOUT)


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


class Server:
    """One memcached server: its connections, health, key pinning, settings and counters."""

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
        on_down: Callable[["Server"], None] | None = None,
    ) -> None:
        self.address = address
        self.name = address.name
        self.io = io
        self.budget = budget
        self.health = health
        self.max_inflight_conn = max_inflight_conn
        self.max_inflight_server = max_inflight_server
        self.stats = ServerStats()
        self.latency = LatencyWindow()  # per write: written -> its last answer parsed
        self.inflight_n = 0  # requests in flight on all its connections (admitted and not answered)
        # Learned from `stats settings` on each new connection; memcached's defaults until then.
        self.item_size_max: int | None = None
        self.cas_enabled = True
        self.now = 0.0
        # Read coalescing (pipeline.py, `tag_of`): key -> tag of the plain get of it in flight that
        # later plain gets may join; tag -> the waiters that joined it.
        self.reads: dict[bytes, int] = {}
        self.joiners: dict[int, list[Any]] = {}
        self.conns = [Connection(self, no) for no in range(connections)]
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
    def item_limit(self) -> int:
        return self.item_size_max or DEFAULT_ITEM_SIZE_MAX

    def learn_settings(self, settings: dict[str, str], conn: Connection) -> None:
        size = settings.get("item_size_max", "")
        if size.isdigit():
            if self.item_size_max != int(size):
                log.info("%s: item_size_max %s bytes", self.name, size)
            self.item_size_max = int(size)
            conn.pipeline.parser.set_max_value_len(self.item_size_max)
        self.cas_enabled = settings.get("cas_enabled", "yes") != "no"

    @property
    def inflight(self) -> int:
        return self.inflight_n

    def silent_for(self, now: float) -> float:
        """How long the server has answered nothing while requests waited on it (0 if none wait)."""
        waits = [now - c.since for c in self.conns if c.pipeline.inflight]
        return min(waits) if waits else 0.0

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
                if c.sock is not None and (best is None or c.pipeline.inflight < best.pipeline.inflight):
                    best = c
                    if not c.pipeline.inflight:
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
            # Written requests may have been applied: CONNECTION_ERROR (indeterminate), never
            # SERVER_DOWN, which promises that nothing was sent (a client may retry on it).
            conn.fail_inflight(Code.CONNECTION_ERROR, f"{self.name} is down: {reason}")
        self.pinned.clear()
        if self._on_down is not None:
            self._on_down(self)

    def probe_succeeded(self, now: float) -> None:
        log.warning("%s is back up", self.name)
        FAILURE_LINES.reset(self.name)
        self.health.probe_succeeded(now)
        for conn in self.conns:
            conn.attempt = 0
            if conn.sock is None:
                conn.open(now)
        if self._on_down is not None:
            self._on_down(self)

    def tick(self, now: float, connect_timeout: float, io_timeout: float) -> None:
        """Timers: connect/io timeouts, reconnects, probes."""
        self.now = now
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
            conn.open(now)  # its `stats settings` is the probe

    def close(self, reason: str, code: Code = Code.CONNECTION_ERROR) -> None:
        for conn in self.conns:
            conn.close()
            conn.fail_inflight(code, reason)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "state": self.health.state.value,
            "connections": sum(1 for c in self.conns if c.state == READY),
            "depth": self.inflight,
            "item_size_max": self.item_limit,
            "requests": s.requests,
            "errors": s.errors,
            "timeouts": s.timeouts,
            "resets": s.resets,
            "ejections": self.health.ejections,
            "writes": s.writes,
            "requests_written": s.written,
            "requests_per_write": round(s.written / s.writes, 2) if s.writes else 0.0,
            "latency_avg_us": round(self.latency.total / self.latency.count * 1e6, 1) if self.latency.count else 0.0,
            **self.latency_snapshot(),
        }

    def latency_snapshot(self, now: float | None = None) -> dict[str, Any]:
        """p50/p99/p999 in microseconds over the last 10-20 s (None without samples)."""
        (p50, p99, p999), n = self.latency.percentiles((0.5, 0.99, 0.999), time.monotonic() if now is None else now)
        return {"latency_p50_us": _us(p50), "latency_p99_us": _us(p99), "latency_p999_us": _us(p999), "latency_samples": n}
