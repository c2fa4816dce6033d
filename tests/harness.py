"""Real memcached processes for tests: start on a free loopback port, stop by PID.

Plain sockets only (no pymemcache), so the harness tests nothing but itself and
stays usable while the client library is broken.

Every started server is tracked in a module-level registry; `stop_all()` runs
from the session finalizer in conftest and from atexit, so a crashing test
cannot leave a memcached behind. Servers start in their own session
(start_new_session=True): a Ctrl-C aimed at pytest does not kill them under a
running test, and the finalizer still stops them by PID.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

HOST = "127.0.0.1"

# Fixed per the project's test conventions: small memory, 2 threads (the test
# machines have 2 vCPUs), 2 MiB items so large-value tests can exceed the 1 MiB
# default, and enough connections for fan-out tests.
BASE_ARGS: tuple[str, ...] = ("-U", "0", "-t", "2", "-m", "64", "-I", "2m", "-c", "4096")

_START_ATTEMPTS = 5
_STOP_GRACE_S = 5.0

_live: set[Memcached] = set()


class MemcachedError(RuntimeError):
    """memcached did not start, or answered something unexpected."""


def memcached_binary() -> str | None:
    return shutil.which("memcached")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before memcached binds; `Memcached.start`
    retries with a fresh port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def request(address: str, payload: bytes, terminator: bytes, timeout: float = 5.0) -> bytes:
    """Send `payload` to a memcached address and read until the reply ends with `terminator`.

    Raises TimeoutError (socket.timeout) if the whole exchange exceeds `timeout`,
    ConnectionError if the server closes first.
    """
    deadline = time.monotonic() + timeout
    with _connect(address, timeout) as sock:
        sock.sendall(payload)
        buf = bytearray()
        while not buf.endswith(terminator):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"{address}: no complete reply within {timeout}s")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{address}: closed after {len(buf)} bytes")
            buf += chunk
        return bytes(buf)


def version(address: str, timeout: float = 5.0) -> str:
    """The server's version string; raises on timeout or an unexpected reply."""
    reply = request(address, b"version\r\n", b"\r\n", timeout)
    if not reply.startswith(b"VERSION "):
        raise MemcachedError(f"{address}: unexpected reply to version: {reply!r}")
    return reply[len(b"VERSION ") : -2].decode("ascii")


def stats(address: str, timeout: float = 5.0) -> dict[str, str]:
    reply = request(address, b"stats\r\n", b"END\r\n", timeout)
    out: dict[str, str] = {}
    for line in reply.decode("ascii").split("\r\n"):
        if line.startswith("STAT "):
            _, name, value = line.split(" ", 2)
            out[name] = value
    return out


def flush_all(address: str, timeout: float = 5.0) -> None:
    reply = request(address, b"flush_all\r\n", b"\r\n", timeout)
    if reply != b"OK\r\n":
        raise MemcachedError(f"{address}: unexpected reply to flush_all: {reply!r}")


def _connect(address: str, timeout: float) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = address[len("unix:") :]
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


class Memcached:
    """One memcached process on 127.0.0.1:<port>, or on a unix socket.

    A port or socket path is chosen at construction and kept across
    `restart()`, so clients configured with `.address` reconnect to the same
    server.
    """

    def __init__(self, port: int | None = None, *, unix: bool = False) -> None:
        self.host = HOST
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        # A short private dir: sun_path is limited to 107 bytes, which pytest's
        # tmp_path can exceed. Also holds the stderr log.
        self._dir = Path(tempfile.mkdtemp(prefix="mcb-mc-"))
        self.unix_path: str | None = str(self._dir / "mc.sock") if unix else None
        self._extra_args: tuple[str, ...] = ()
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- identity -------------------------------------------------------------

    @property
    def address(self) -> str:
        if self.unix_path is not None:
            return "unix:" + self.unix_path
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise MemcachedError("memcached is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc is not None else "stopped"
        return f"<Memcached {self.address} {state}>"

    # -- lifecycle ------------------------------------------------------------

    def argv(self) -> list[str]:
        binary = memcached_binary()
        if binary is None:
            raise MemcachedError("memcached is not installed (not on PATH)")
        argv = [binary, *BASE_ARGS]
        if self.unix_path is not None:
            argv += ["-s", self.unix_path, "-a", "0700"]
        else:
            argv += ["-l", self.host, "-p", str(self.port)]
        if os.geteuid() == 0:
            # memcached refuses to run as root without being told which user.
            argv += ["-u", "root"]
        argv += list(self._extra_args)
        return argv

    def start(self, extra_args: Sequence[str] = (), timeout: float = 5.0) -> Memcached:
        """Start the server and wait until it answers `version`."""
        if self.running:
            raise MemcachedError(f"{self!r} is already running")
        self._extra_args = tuple(extra_args)
        for attempt in range(_START_ATTEMPTS):
            try:
                self._spawn()
                self.wait_ready(timeout)
                return self
            except MemcachedError as exc:
                log = self._log_tail()
                self.kill()
                # Only a port we picked ourselves may be swapped for another: a
                # lost race for a free port shows as "Address already in use".
                retry = (
                    not self._fixed_port
                    and self.unix_path is None
                    and "already in use" in log
                    and attempt + 1 < _START_ATTEMPTS
                )
                if not retry:
                    raise MemcachedError(
                        f"memcached failed to start ({exc}): {' '.join(self.argv())}\n{log}"
                    ) from None
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        # cleanup() may have removed the private dir of a server that is now restarted.
        self._dir.mkdir(parents=True, exist_ok=True)
        if self.unix_path is not None and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)
        log = open(self._dir / "stderr.log", "wb")
        try:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._paused = False
        _live.add(self)

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Poll until the server answers `version`; raise MemcachedError if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        # Short probes first: a listener that is not memcached (a lost port race) would
        # otherwise hold each probe for its whole timeout.
        probe = 0.05
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise MemcachedError(f"memcached exited (code {code}) before answering")
            try:
                version(self.address, timeout=min(probe, max(0.01, deadline - time.monotonic())))
                return
            except (OSError, MemcachedError) as exc:
                last = exc
                probe = min(probe * 2, 0.5)
                time.sleep(0.01)
        raise MemcachedError(f"{self.address} did not answer version within {timeout}s: {last!r}")

    def stop(self, graceful: bool = False) -> None:
        """Stop the process and reap it. Idempotent.

        SIGKILL by default: memcached acts on SIGTERM only at its next once-a-second
        clock tick, and holds nothing worth a graceful exit, so a kill saves each test
        up to a second. graceful=True sends SIGTERM (SIGKILL if it lingers).
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if graceful:
                proc.send_signal(signal.SIGTERM)
                if self._paused:
                    # A stopped process keeps SIGTERM pending until it runs again.
                    proc.send_signal(signal.SIGCONT)
                try:
                    proc.wait(_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash would; reaps the process. Same mechanics as stop()."""
        self.stop(graceful=False)

    def restart(self, extra_args: Sequence[str] | None = None, timeout: float = 5.0) -> Memcached:
        """Stop and start again on the same port or socket path (contents are lost)."""
        self.stop()
        # The port is ours now: never move to another one on restart.
        self._fixed_port = True
        return self.start(self._extra_args if extra_args is None else extra_args, timeout)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing answers. Returns once the
        process is stopped: kill() returns before that (measured: still running 10 ms later on
        a loaded machine, time enough to answer a request sent after pause())."""
        self._signal(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] in ("T", "t"):
                        return
            except OSError:
                return
            time.sleep(0.001)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running:
            raise MemcachedError(f"{self!r} is not running")
        assert self._proc is not None
        self._proc.send_signal(sig)

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._paused = False
        _live.discard(self)

    def cleanup(self) -> None:
        """Stop the server and remove its private directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            return (self._dir / "stderr.log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    # -- talking to it ----------------------------------------------------------

    def version(self, timeout: float = 5.0) -> str:
        return version(self.address, timeout)

    def stats(self, timeout: float = 5.0) -> dict[str, str]:
        return stats(self.address, timeout)

    def flush_all(self, timeout: float = 5.0) -> None:
        flush_all(self.address, timeout)


class StatsConnection:
    """One connection to a server kept open for repeated `stats`: watching curr_connections and
    total_connections through it adds exactly one connection for the whole watch, and no
    close of an earlier probe can still be in flight when the next one counts."""

    def __init__(self, address: str, timeout: float = 2.0) -> None:
        self._sock = _connect(address, timeout)
        self._timeout = timeout

    def stats(self) -> dict[str, str]:
        self._sock.sendall(b"stats\r\n")
        buf = bytearray()
        deadline = time.monotonic() + self._timeout
        while not buf.endswith(b"END\r\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"no complete stats reply within {self._timeout}s")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} bytes")
            buf += chunk
        out: dict[str, str] = {}
        for line in buf.decode("ascii").split("\r\n"):
            if line.startswith("STAT "):
                _, name, value = line.split(" ", 2)
                out[name] = value
        return out

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> StatsConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What the memcached_factory fixture hands out: factory(n=1, extra_args=(), unix=False).
MemcachedFactory = Callable[..., "list[Memcached]"]


def start_many(n: int, extra_args: Sequence[str] = ()) -> list[Memcached]:
    """Start `n` TCP servers; if one fails, the ones already started are stopped."""
    servers: list[Memcached] = []
    try:
        for _ in range(n):
            servers.append(Memcached().start(extra_args))
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: Iterable[Memcached] | None = None) -> None:
    """Stop the given servers, or every server this process started."""
    for server in list(_live if servers is None else servers):
        try:
            server.cleanup()
        except Exception:
            # One stuck server must not keep the others alive.
            pass


atexit.register(stop_all)


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` in bytes (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
