"""The broker's single-threaded event loop: poll, read frames, route, flush, timers, signals.

Signal handlers only record the signal (and wake the poll through a socketpair); the loop does
the work: drain on SIGTERM/SIGINT, reload on SIGHUP.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import time
from importlib import metadata
from typing import Any

import zmq

from clientlib.wire import Code, Op

from . import config as config_mod
from . import shard
from .config import Config
from .access import Access, AccessError, load_curve
from .front import Front
from .health import Health
from .connection import CONNECTING, READY, Budget, Connection, Server
from .router import Router
from .stats import rss_bytes

try:
    VERSION = metadata.version("mcbroker")
except metadata.PackageNotFoundError:
    VERSION = "unknown"

log = logging.getLogger("mcbroker")

TIMER_INTERVAL = 0.01
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_POLLIN_ERR = int(zmq.POLLIN | zmq.POLLERR)
_POLLERR = int(zmq.POLLERR)
IDLE_POLL_MS = 250
TURN_BYTES = 4 << 20
CLOSE_LINGER_MS = 500
CLOSE_QUIET_MS = 100
# File descriptors besides the worker connections: memcached connections, ZeroMQ's own (listeners,
# mailboxes), the metrics server, logs.
FD_HEADROOM = 256


def ensure_fd_limit(max_clients: int, memcached_connections: int) -> None:
    """Raise the soft open-files limit to what max_clients needs (as memcached does for -c), up to
    the hard limit; log when even that is too low (then accept() fails before max_clients is
    reached, and ZeroMQ retries it)."""
    need = max_clients + memcached_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "max_clients %d needs about %d open files, the limit is %d (hard %s): raise LimitNOFILE= "
            "(systemd) or ulimit -n, or lower max_clients",
            max_clients, need, soft, "unlimited" if hard == resource.RLIM_INFINITY else hard,
        )


def sd_notify(state: str) -> bool:
    """Send `state` ("READY=1", ...) to systemd as one datagram to $NOTIFY_SOCKET (sd_notify(3)).

    Does nothing outside systemd (no NOTIFY_SOCKET) and never raises: a service must not die
    because its supervisor is not listening. Returns whether the datagram was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
        return True
    except Exception as exc:
        global _notify_warned
        if not _notify_warned:  # a watchdog ping fails every few seconds: say it once
            _notify_warned = True
            log.warning("sd_notify to %s failed: %s (further failures are not logged)", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


_notify_warned = False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of systemd's WatchdogSec), or None when systemd did
    not ask for them (sd_watchdog_enabled(3): WATCHDOG_USEC, and WATCHDOG_PID if set is ours)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Broker:
    def __init__(self, config: Config, *, config_path: str | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.started = time.time()
        self.ctx = zmq.Context(io_threads=1)
        self.poller = zmq.Poller()
        self._fds: dict[int, Connection] = {}
        self._dirty: list[Connection] = []
        self._signals: list[int] = []
        self._stop = False
        self._drain_deadline: float | None = None
        self._timers_busy = True  # connections are being opened
        self._ready = False  # READY=1 sent: the front is bound and each server was tried
        self._watchdog = watchdog_interval()
        self._next_watchdog = 0.0
        self.budget = Budget(config.max_inflight_total, config.max_buffered_bytes)
        ensure_fd_limit(config.max_clients, len(config.servers) * config.connections_per_server)
        try:
            # The ZAP handler: CURVE keys when configured, and max_clients for every listener.
            self.access = Access(
                self.ctx, load_curve(config.curve_secret_key_file, config.curve_allowed_clients) if config.curve else None
            )
            self.front = Front(
                self.ctx, config.listen_urls(), config.max_frame_bytes, config.socket_mode, config.socket_group,
                access=self.access, reply_limit=config.max_buffered_bytes, max_clients=config.max_clients,
            )
        except BaseException:
            # Whatever was bound already (several listen addresses) closes with the context.
            self.ctx.destroy(linger=0)
            raise
        for sock in self.front.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.access.before_answer = self.front.admit
        # The ZAP handler's socket (handshakes) and the monitors' (accept and disconnect events,
        # counted as they come; the ZAP handler takes them too, before it lets a handshake finish)
        # are polled by their ZMQ_FD, a plain descriptor that turns readable when the socket has
        # work, not as ZeroMQ sockets: zmq_poll asks each ZeroMQ socket it polls for ZMQ_EVENTS on
        # every call, a poll() and a getpid() system call each (4-8 us a turn on this machine
        # kind, for sockets idle but for a worker's connect). ZMQ_FD is edge-triggered: their
        # handlers read until nothing is left (on_zap until Again, poll_workers until ZMQ_EVENTS
        # has no POLLIN), so no event waits unseen behind a descriptor already read.
        self._zap_fd = int(self.access.zap.getsockopt(zmq.FD))
        self.poller.register(self._zap_fd, zmq.POLLIN)
        self._monitor_fds = frozenset(int(mon.getsockopt(zmq.FD)) for mon in self.front.monitors)
        for fd in self._monitor_fds:
            self.poller.register(fd, zmq.POLLIN)
        # A monitor's first events make its ZMQ_FD readable only once it has been read (libzmq
        # wakes a pipe's reader only after the reader has found it empty): read them now, so the
        # descriptor speaks for every event after this one (and not only the first turn's timers).
        self.front.poll_workers()
        self.router = Router(
            budget=self.budget,
            send=self.front.send,
            default_timeout=config.timeout_ms / 1000,
            max_frame=config.max_frame_bytes,
            max_value=config.max_value_bytes,
            remap=config.on_server_down == "remap",
            local=self._local,
            coalesce=config.coalesce_reads,
        )
        self.servers: dict[str, Server] = {}
        self.retiring: list[Server] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._apply_servers(config, time.monotonic())
        self.metrics: Any = None
        self._next_publish = 0.0
        if config.metrics_listen:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(config.metrics_listen)

    # --- the IO protocol the pipeline uses -----------------------------------------------------

    def watch(self, conn: Connection) -> None:
        fd = conn.fd
        flags = _POLLIN
        if conn.want_write or conn.state == CONNECTING:
            flags |= _POLLOUT
        self.poller.register(fd, flags)
        self._fds[fd] = conn

    def unwatch(self, conn: Connection) -> None:
        fd = conn.fd
        if self._fds.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)

    # --- servers and reload --------------------------------------------------------------------

    def _make_server(self, sc: config_mod.ServerConfig, c: Config, now: float) -> Server:
        server = Server(
            sc.address,
            connections=c.connections_per_server,
            io=self,
            budget=self.budget,
            health=Health(c.failure_limit, c.probe_interval_ms / 1000, c.probe_max_interval_ms / 1000),
            max_inflight_conn=c.max_inflight_per_connection,
            max_inflight_server=c.max_inflight_per_server,
            on_down=self.router.refresh_down,
        )
        server.start(now)
        return server

    def _apply_servers(self, c: Config, now: float) -> None:
        placement = shard.make_placement(c.hash, [(s.address.hash_key, s.weight) for s in c.servers])
        new: dict[str, Server] = {}
        for sc in c.servers:
            old = self.servers.get(sc.address.name)
            if old is None:
                old = self._make_server(sc, c, now)
            else:
                # A kept server follows the new limits too (its connection count does not change).
                old.health.configure(c.failure_limit, c.probe_interval_ms / 1000, c.probe_max_interval_ms / 1000)
                old.max_inflight_conn = c.max_inflight_per_connection
                old.max_inflight_server = c.max_inflight_per_server
            new[sc.address.name] = old
        for name, server in self.servers.items():
            if name not in new:
                server.retired = True
                self.retiring.append(server)
                log.info("%s removed: finishing %d requests in flight, then closing", name, server.inflight)
        self.servers = new
        self.router.set_servers(list(new.values()), placement)

    def reload(self) -> None:
        try:
            c = config_mod.load(self.config_path, self.overrides)
        except config_mod.ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        if c.metrics_listen != self.config.metrics_listen:
            log.warning("metrics_listen changes only on restart; keeping %s", self.config.metrics_listen or "none")
        if c.listen_urls() != self.config.listen_urls():
            log.warning("listen addresses change only on restart; keeping %s", ", ".join(self.config.listen_urls()))
        now = time.monotonic()
        r = self.router
        r.default_timeout = c.timeout_ms / 1000
        r.max_frame = c.max_frame_bytes
        r.max_value = c.max_value_bytes
        r.remap = c.on_server_down == "remap"
        r.coalesce = c.coalesce_reads
        self.budget.max_inflight = c.max_inflight_total
        self.budget.max_buffered = c.max_buffered_bytes
        self.front.set_reply_limit(c.max_buffered_bytes, c.max_frame_bytes)
        if c.max_clients > self.front.max_clients:
            ensure_fd_limit(c.max_clients, len(c.servers) * c.connections_per_server)
        self.front.max_clients = c.max_clients  # connections served now stay; new ones see the new cap
        if self.access.curve is not None and c.curve:
            try:
                self.access.set_allowed(load_curve(c.curve_secret_key_file, c.curve_allowed_clients))
            except AccessError as exc:
                log.error("CURVE keys not reloaded, keeping the allowed clients: %s", exc)
        self.config = c
        self._apply_servers(c, now)
        log.info("config reloaded: servers %s, hash %s", ", ".join(self.servers), c.hash)
        sd_notify("READY=1")

    # --- local ops -----------------------------------------------------------------------------

    def _local(self, op: int) -> Any:
        if op == Op.PING:
            return "PONG"
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        servers = {name: s.snapshot() for name, s in self.servers.items()}
        writes = sum(s.stats.writes for s in self.servers.values())
        written = sum(s.stats.written for s in self.servers.values())
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "rss_bytes": rss_bytes(),
            "connected_workers": self.front.poll_workers(),
            "max_clients": self.front.max_clients,
            "clients_refused": self.front.clients_refused,
            "hash": self.config.hash,
            "inflight": self.budget.inflight,
            "buffered_bytes": self.budget.buffered,
            "backend_writes": writes,
            "requests_written": written,
            "requests_per_write": round(written / writes, 2) if writes else 0.0,
            "bad_envelopes": self.front.bad_envelopes,
            "reply_bytes_pending": self.front.reply_bytes,
            "replies_over_limit": self.front.replies_over_limit,
            "curve_accepted": self.access.accepted,
            "curve_refused": self.access.refused,
            "draining": self.router.draining,
            **self.router.stats.snapshot(),
            "servers": servers,
        }

    # --- the loop ------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _handle_signals(self, now: float) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                self.reload()
            elif self._drain_deadline is None:
                log.info("%s: draining %d requests in flight, then exiting", signal.Signals(sig).name, self.budget.inflight)
                sd_notify("STOPPING=1")
                self.router.draining = True
                self._drain_deadline = now + self.config.drain_timeout_ms / 1000
            else:
                log.info("second %s: exiting now", signal.Signals(sig).name)
                self._stop = True

    def _poll_timeout(self, now: float) -> int:
        if self._dirty:
            return 0
        # Timers (io timeouts, connects, probes) need a turn every few tens of ms only while
        # something is in flight or pending; _timers says which (not recomputed every turn).
        t = TIMER_INTERVAL * 5 if self.budget.inflight or self._timers_busy else IDLE_POLL_MS / 1000
        d = self.router.next_deadline()
        if d is not None and d - now < t:
            t = max(0.0, d - now)
        return int(t * 1000 + 0.999)

    def run(self, ready_message: bool = True) -> None:
        self._install_signals()
        log.info(
            "mcbroker starting: listening on %s; memcached %s; hash %s; pid %d",
            ", ".join(self.front.urls), ", ".join(self.servers), self.config.hash, os.getpid(),
        )
        next_timer = 0.0
        front = self.front
        router = self.router
        fds = self._fds
        wake_fd = self._wake_r.fileno()
        zap_fd = self._zap_fd
        monitor_fds = self._monitor_fds
        limit = self.config.max_batch_per_turn
        # Bytes of frames read per turn: enough for a full turn of small frames, while a flood of
        # large ones cannot keep the loop from flushing memcached and reading its answers.
        turn_bytes = max(self.config.max_frame_bytes, TURN_BYTES)
        try:
            while not self._stop:
                now = time.monotonic()
                events = self.poller.poll(self._poll_timeout(now))
                now = time.monotonic()
                if self._signals:
                    # First, before this turn's frames: a frame read after SIGTERM was recorded is
                    # refused ("shutting down"), not served.
                    self._handle_signals(now)
                for server in self.servers.values():
                    server.batch_conn = None
                readable = []
                ready: list[tuple[Connection, int, int]] = []
                for obj, ev in events:
                    if type(obj) is not int:
                        readable.append(obj)  # a worker socket
                        continue
                    conn = fds.get(obj)
                    if conn is None:
                        if obj == zap_fd:
                            self.access.on_zap()
                        elif obj in monitor_fds:
                            front.poll_workers()
                        elif obj == wake_fd:
                            try:
                                self._wake_r.recv(4096)
                            except BlockingIOError:
                                pass
                        continue
                    if ev & _POLLERR or not conn.pipeline.inflight:
                        # Nothing to join here, and maybe a close (memcached's idle timeout, a
                        # restart) or a failed connect: handled before this turn's frames, so none
                        # is routed to a connection about to be reset (its requests would fail
                        # unsent, and the reset would count against the server's health).
                        self._on_conn(conn, obj, ev, now)
                    else:
                        ready.append((conn, obj, ev))
                # Workers' frames before the answers of busy connections: a get that came in while
                # a read of its key is in flight joins that read even when the read's answer is
                # already waiting in the socket (answered in this same turn), where the other
                # order let the answer end the read first and sent the get upstream anew.
                # zmq_poll reports a ROUTER as readable for as long as frames wait, so sockets
                # it did not report need no (exception-raising) empty read.
                for sock in readable:
                    for ident, data in front.recv_batch(sock, limit, turn_bytes):
                        try:
                            router.handle(sock, ident, data, now)
                        except Exception:
                            # One bad frame must never take down the service for every worker.
                            router.stats.internal_errors += 1
                            log.exception("internal error handling a frame; frame dropped")
                read_now = now
                if self._dirty:
                    # Written before the busy connections' answers are read: memcached serves
                    # these requests while this thread parses those answers and replies.
                    self._flush_dirty(now)
                    # A write's time (its latency's start) is the clock at the write: the reads
                    # below take theirs after it. Deadlines and timers keep the turn's `now`:
                    # answers that arrived while this turn routed frames are read next turn, and
                    # that time must not count as the server's silence.
                    read_now = time.monotonic()
                for conn, obj, ev in ready:
                    self._on_conn(conn, obj, ev, read_now)
                if self._dirty:
                    self._flush_dirty(now)
                router.expire(now)
                if now >= next_timer:
                    next_timer = now + TIMER_INTERVAL
                    self._timers(now)
                if self._drain_deadline is not None and (self.budget.inflight == 0 or now >= self._drain_deadline):
                    break
        finally:
            self.close()

    def _on_conn(self, conn: Connection, obj: int, ev: int, now: float) -> None:
        """One memcached connection's poll events. The frames routed since the poll may have
        reached a connection whose socket was replaced: its event is stale then (the new socket is
        polled next turn)."""
        try:
            if ev & _POLLIN_ERR and conn.sock is not None and conn.fd == obj:
                conn.on_readable(now)
            if ev & _POLLOUT and conn.sock is not None and conn.fd == obj:
                conn.on_writable(now)
        except Exception:
            self._internal_error(conn, now)

    def _flush_dirty(self, now: float) -> None:
        """Write what each connection made dirty since the last call holds (a failed write
        reads the answers waiting in its socket first: the parser and deliveries run here too)."""
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush(now)
            except Exception:
                self._internal_error(conn, now)

    def _internal_error(self, conn: Connection, now: float) -> None:
        # A bug must cost one connection (its requests get errors), not the service.
        self.router.stats.internal_errors += 1
        log.exception("internal error on a memcached connection; resetting it")
        conn.failed(now, "internal error in the broker", Code.CONNECTION_ERROR, count=False)

    def _check_ready(self) -> None:
        """READY=1 once every server was tried: connected, or its connect failed or timed out."""
        answered, silent = [], []
        for name, server in self.servers.items():
            if any(c.state == READY for c in server.conns):
                answered.append(name)
            elif any(c.attempt for c in server.conns) or not server.health.is_up:
                silent.append(name)
            else:
                return  # still connecting
        self._ready = True
        log.info(
            "mcbroker ready: listening on %s; memcached answered: %s; not answering: %s; pid %d",
            ", ".join(self.front.urls), ", ".join(answered) or "none", ", ".join(silent) or "none", os.getpid(),
        )
        sd_notify("READY=1")

    def _timers(self, now: float) -> None:
        self.front.reap()
        self.front.poll_workers()
        if self.metrics is not None and now >= self._next_publish:
            self._next_publish = now + 1.0
            self.metrics.publish(self.snapshot)
        if not self._ready:
            self._check_ready()
        if self._watchdog is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog
            sd_notify("WATCHDOG=1")
        self._timers_busy = bool(
            self.retiring
            or any(c.state == CONNECTING for c in self._fds.values())
            or any(not s.health.is_up for s in self.servers.values())
        )
        c = self.config
        connect_timeout = c.connect_timeout_ms / 1000
        io_timeout = c.io_timeout_ms / 1000
        for server in self.servers.values():
            server.tick(now, connect_timeout, io_timeout)
        if self.retiring:
            for server in list(self.retiring):
                server.tick(now, connect_timeout, io_timeout)
                if server.inflight == 0:
                    server.close("server removed from the config")
                    self.retiring.remove(server)
                    log.info("%s closed", server.name)

    def close(self) -> None:
        # Every request in flight gets its answer now ("broker is shutting down" for what memcached
        # did not answer), and so does every frame already received: none is left unread.
        self.router.draining = True
        for server in list(self.servers.values()) + self.retiring:
            server.close("broker is shutting down", Code.SHUTTING_DOWN)
        # A worker may send until its connection drops, and a frame that arrives after the last
        # read is lost with the socket: its call would wait out its whole deadline. So frames keep
        # getting "broker is shutting down" until none came for CLOSE_QUIET_MS (at most
        # CLOSE_LINGER_MS); the replies leave meanwhile.
        poller = zmq.Poller()
        for sock in self.front.sockets:
            poller.register(sock, zmq.POLLIN)
        # Handshakes go on meanwhile (a worker connecting now gets "shutting down" too).
        poller.register(self.access.zap, zmq.POLLIN)
        start = now = time.monotonic()
        quiet_until = now + CLOSE_QUIET_MS / 1000
        while True:
            self.access.on_zap()
            for sock in self.front.sockets:
                for ident, data in self.front.recv_batch(sock, 1 << 20, 1 << 40):
                    self.router.handle(sock, ident, data, now)
                    quiet_until = now + CLOSE_QUIET_MS / 1000
            wait = min(quiet_until, start + CLOSE_LINGER_MS / 1000) - now
            if wait <= 0:
                break
            poller.poll(int(wait * 1000) + 1)
            now = time.monotonic()
        # Replies queued in ZeroMQ get a moment to reach their workers (linger 0 discarded them).
        self.front.close(linger_ms=CLOSE_LINGER_MS)
        self.access.close()
        self.ctx.term()
        if self.metrics is not None:
            self.metrics.close()
        signal.set_wakeup_fd(-1)
        self._wake_r.close()
        self._wake_w.close()
        # Every frame taken off the worker sockets is accounted for here (frames received =
        # replies sent + dropped + noreply frames + frames with no request id; a frame lost on the
        # way, to an internal error say, breaks the sum), so a worker's call that got no answer
        # can be told from a frame the broker never received (sent into its closing connection).
        st = self.router.stats
        log.info(
            "mcbroker stopped: %d frames received, %d replies sent, %d dropped, %d noreply, %d unanswerable",
            self.front.frames_read, st.replies, st.replies_dropped, st.noreply, st.dropped_frames,
        )
