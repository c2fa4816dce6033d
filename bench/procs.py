"""The processes the bench starts and stops: memcached, mcbroker, nutcracker (twemproxy), the delay
proxy and the ZeroMQ echo server. Each is started in its own session, on loopback, and stopped by
PID (SIGTERM, then SIGKILL after a bounded wait). Also the /proc readers (CPU time, RSS) and the
two stats readers (memcached's text `stats`, twemproxy's JSON stats port).

This is the only bench module that starts service processes; workers live in bench/workers.py.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# Control calls between rounds (stats, pings, memcached's and nutcracker's counters): a wait, not a
# measurement. In a fresh-clone suite run, with other tests beside the quick bench, an idle
# broker's stats reply once took over 2 s (the quick run failed in latency-b2b's settle).
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0  # a wait, not a measurement: a broker starting on a loaded 2-core machine (load 17) once took over 10 s
STOP_GRACE_S = 5.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """The bench cannot go on: a service did not start, a worker failed or read a wrong value."""


# --- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of a whole process (all its threads), in seconds; 0.0 if gone. From each thread's
    /proc/<pid>/task/<tid>/schedstat (nanoseconds on the CPU), so a short quick-mode window does
    not read as 0; /proc/<pid>/stat's utime + stime (10 ms ticks) where schedstat is missing."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
        if total:
            return total / 1e9
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # After "pid (comm)", state is index 0, so utime (field 14) and stime (field 15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc/<pid>/statm; 0 if gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def socket_inodes(pids: Sequence[int]) -> set[str]:
    """The inodes of the sockets the processes `pids` hold open (from /proc/PID/fd; a process
    that has ended counts none)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # a process that ended meanwhile
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def tcp_connections(pids: Sequence[int], ports: Sequence[int]) -> int:
    """Established TCP connections that processes `pids` hold to any of `ports` on loopback, as
    the kernel counts them: the sockets among their file descriptors (by inode) that
    /proc/net/tcp lists in state 01 with one of the ports as the remote end. Counting by owner
    leaves out what other processes hold, which memcached's curr_connections cannot (and other
    proxies' own counts, read at another moment, only roughly could). Sockets this process holds
    too are left out: forked workers inherit its connections (its stats connections to memcached).
    Each socket counts once, by its inode: /proc/net/tcp is read in pieces while other processes
    open and close connections, and the kernel then lists some sockets twice (a suite run counted
    12 connections for the floor's 8, which it opens once and never reopens)."""
    inodes = socket_inodes(pids) - socket_inodes([os.getpid()])
    with open("/proc/net/tcp") as f:
        return established_to(f.readlines()[1:], ports, inodes)


def established_to(lines: Sequence[str], ports: Sequence[int], inodes: set[str]) -> int:
    """How many distinct sockets among `inodes` the lines of /proc/net/tcp (its header left out)
    list as established (state 01) with one of `ports` as the remote end."""
    wanted = {f"{port:04X}" for port in ports}
    seen: set[str] = set()
    for line in lines:
        parts = line.split()
        if parts[3] == "01" and parts[2].rpartition(":")[2] in wanted and parts[9] in inodes:
            seen.add(parts[9])
    return len(seen)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- a started process -------------------------------------------------------------------------


class Proc:
    """One process we started; `stop()` ends it by PID and is safe to call twice."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None,
                 stdout_pipe: bool = False, stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            list(argv), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return _tail(self.log_path, n)

    def read_line(self, timeout: float) -> str:
        """One line from the process's stdout (needs stdout_pipe), bounded by `timeout`."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.popen.stdout.fileno()
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.alive() and not select.select([fd], [], [], 0)[0]:
                break
            if select.select([fd], [], [], min(remaining, 0.1))[0]:
                chunk = os.read(fd, 1)
                if not chunk:
                    break
                buf += chunk
        return buf.decode(errors="replace").strip()

    def stop(self) -> None:
        if self.popen.poll() is None:
            with _suppress_gone():
                os.kill(self.pid, self.stop_signal)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with _suppress_gone():
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_GRACE_S)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


class _suppress_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        return typ is ProcessLookupError


def _wait_until(what: str, proc: Proc, check: Any, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{what} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            if check():
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.02)
    raise BenchError(f"{what} not ready within {timeout}s ({last}):\n{proc.log_tail()}")


# --- memcached ---------------------------------------------------------------------------------


def text_request(address: str, payload: bytes, terminator: bytes, timeout: float = CALL_TIMEOUT_S) -> bytes:
    with socket.create_connection(split_address(address), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while not buf.endswith(terminator):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"{address} closed after {len(buf)} bytes")
            buf += chunk
    return buf


def start_memcached(tmpdir: Path, tag: str) -> tuple[Proc, str]:
    binary = shutil.which("memcached")
    if binary is None:
        raise BenchError("memcached is not on PATH (scripts/test installs it: apt-get install memcached)")
    port = free_port()
    address = f"{HOST}:{port}"
    # The test suite's flags (tests/harness.py): 2 threads for a 2-vCPU machine, small memory.
    argv = [binary, "-U", "0", "-t", "2", "-m", "64", "-c", "4096", "-l", HOST, "-p", str(port)]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    # SIGKILL: a bench memcached holds nothing worth a graceful stop, which takes it ~0.7 s.
    proc = Proc(f"memcached-{tag}", argv, tmpdir / f"memcached-{tag}.log", stop_signal=signal.SIGKILL)
    try:
        _wait_until("memcached", proc, lambda: text_request(address, b"version\r\n", b"\r\n", 0.2).startswith(b"VERSION"))
    except BaseException:
        proc.stop()
        raise
    return proc, address


class StatsConn:
    """One persistent connection for memcached's `stats` (a new one per sample would itself
    linger in curr_connections). It counts itself, so `curr_connections()` subtracts one."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.create_connection(split_address(address), timeout=CALL_TIMEOUT_S)

    def stats(self) -> dict[str, str]:
        self.sock.sendall(b"stats\r\n")
        buf = b""
        while not buf.endswith(b"END\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError(f"memcached {self.address} closed the stats connection")
            buf += chunk
        out: dict[str, str] = {}
        for line in buf.decode("ascii", "replace").split("\r\n"):
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] == "STAT":
                out[parts[1]] = parts[2]
        return out

    def curr_connections(self) -> int:
        return int(self.stats()["curr_connections"]) - 1

    def close(self) -> None:
        self.sock.close()


# --- mcbroker ----------------------------------------------------------------------------------


class BrokerRejectedConfig(BenchError):
    """The broker refused its config (exit status 2); `log` says which key."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


class Broker:
    """`python -m broker serve --config FILE`, on a private ipc socket."""

    def __init__(self, tmpdir: Path, tag: str, servers: Sequence[str], extra: Mapping[str, Any]) -> None:
        from clientlib import Client

        self.tag = tag
        self.url = f"ipc://{tmpdir}/broker-{tag}.sock"
        config = {
            "listen": [self.url], "servers": list(servers), "hash": "rendezvous",
            "connections_per_server": 2, "log_level": "warning", **extra,
        }
        self.config_path = tmpdir / f"broker-{tag}.toml"
        self.config_path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        self.proc = Proc(f"broker-{tag}", [sys.executable, "-m", "broker", "serve", "--config", str(self.config_path)],
                         tmpdir / f"broker-{tag}.log", cwd=ROOT)
        self.pid = self.proc.pid
        self.client = Client(self.url, timeout=CALL_TIMEOUT_S)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        from clientlib.errors import MemcacheError

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.proc.popen.poll()
            if code == 2:
                raise BrokerRejectedConfig(f"broker refused its config: {self.proc.log_tail().strip()}", self.proc.log_tail())
            if code is not None:
                raise BenchError(f"broker exited with {code}:\n{self.proc.log_tail()}")
            try:
                if self.client.broker_ping() == "PONG":
                    return
            except MemcacheError:
                time.sleep(0.05)
        raise BenchError(f"broker did not answer ping within {START_TIMEOUT_S}s:\n{self.proc.log_tail()}")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.client.broker_stats()
        return stats

    def connections(self) -> int:
        servers = self.stats().get("servers", {})
        return sum(int(s.get("connections", 0)) for s in servers.values())

    def stop(self) -> None:
        try:
            self.client.disconnect_all()
        finally:
            self.proc.stop()


# --- nutcracker (twemproxy) --------------------------------------------------------------------

_NUTCRACKER_PLACES = ("/usr/sbin/nutcracker", "/usr/bin/nutcracker", "/usr/local/sbin/nutcracker")


def _find_nutcracker() -> str | None:
    found = shutil.which("nutcracker")
    if found:
        return found
    return next((p for p in _NUTCRACKER_PLACES if os.access(p, os.X_OK)), None)


def _pids_named(name: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        pids.add(int(entry))
            except OSError:
                pass
    return pids


def ensure_nutcracker(say: Any) -> str:
    """The nutcracker binary; installs Debian's package (as root, via apt-get) when it is missing.

    Debian's package may start a system service on install; the bench never uses it: a nutcracker
    process that appeared during our install is stopped by its PID, and the bench runs its own
    nutcracker with its own config on a free loopback port.
    """
    found = _find_nutcracker()
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("nutcracker (twemproxy) is not installed and the bench is not root; "
                         "install it with: sudo apt-get install nutcracker")
    if shutil.which("apt-get") is None:
        raise BenchError("nutcracker (twemproxy) is not installed and apt-get is not available to install it")
    before = _pids_named("nutcracker")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say("nutcracker missing: apt-get update && apt-get install -y nutcracker")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nutcracker"]):
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{' '.join(argv)} did not finish within 300 s") from None
        if done.returncode != 0:
            raise BenchError(f"cannot install nutcracker: {' '.join(argv)} exited {done.returncode}:\n"
                             f"{(done.stderr or done.stdout)[-2000:]}")
    for pid in _pids_named("nutcracker") - before:
        say(f"stopping the nutcracker system service the package started (pid {pid}); the bench runs its own")
        with _suppress_gone():
            os.kill(pid, signal.SIGTERM)
    found = _find_nutcracker()
    if not found:
        raise BenchError("apt-get installed nutcracker but no nutcracker binary was found")
    return found


class Nutcracker:
    """twemproxy with our own config: the same servers, 2 server connections, ketama over
    fnv1a_64 (twemproxy's documented memcached setup), loopback listen, a private stats port."""

    START_ATTEMPTS = 3

    def __init__(self, tmpdir: Path, binary: str, servers: Sequence[str]) -> None:
        # free_port() only names a port that was free: another process (a test beside the bench,
        # another bench) can take it first, and nutcracker then exits at start (seen once, three
        # test suites at once). A new pair of ports is tried; nutcracker's own log (-o) goes into
        # the error.
        for attempt in range(1, self.START_ATTEMPTS + 1):
            out = tmpdir / f"nutcracker-{attempt}.out"
            try:
                self._start(tmpdir, binary, servers, out)
                return
            except BenchError as exc:
                if attempt == self.START_ATTEMPTS:
                    raise BenchError(f"{exc}\nnutcracker's log:\n{_tail(out)}") from None

    def _start(self, tmpdir: Path, binary: str, servers: Sequence[str], out: Path) -> None:
        self.address = f"{HOST}:{free_port()}"
        self.stats_port = free_port()
        conf = tmpdir / "nutcracker.yml"
        lines = [
            "bench:", f"  listen: {self.address}", "  hash: fnv1a_64", "  distribution: ketama",
            "  timeout: 2000", "  server_connections: 2", "  auto_eject_hosts: false", "  servers:",
        ]
        lines += [f"   - {s}:1" for s in servers]
        conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc("nutcracker", [binary, "-c", str(conf), "-s", str(self.stats_port), "-a", HOST, "-i", "100",
                                        "-o", str(out)], tmpdir / "nutcracker.log")
        self.pid = self.proc.pid
        try:
            _wait_until("nutcracker", self.proc,
                        lambda: text_request(self.address, b"get bench:ready\r\n", b"END\r\n", 0.5) == b"END\r\n")
            # Its stats port names it: an answer on the listen port alone could be another server's.
            with socket.create_connection((HOST, self.stats_port), timeout=CALL_TIMEOUT_S) as s:
                stats = s.recv(65536)
            if b'"service":"nutcracker"' not in stats or not self.proc.alive():
                raise BenchError(f"nutcracker at {self.address} did not start (stats port: {stats[:200]!r})")
        except BaseException:
            self.proc.stop()
            raise

    def server_connections(self) -> int:
        """Connections nutcracker holds to memcached now, from its stats port."""
        with socket.create_connection((HOST, self.stats_port), timeout=CALL_TIMEOUT_S) as s:
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        pool = json.loads(buf).get("bench", {})
        return sum(int(v.get("server_connections", 0)) for v in pool.values() if isinstance(v, dict))

    def stop(self) -> None:
        self.proc.stop()


# --- the delay proxy, the ZeroMQ echo server and the floor (programs in this package) ----------


def start_ready(name: str, argv: list[str], log_path: Path) -> Proc:
    """Start one of this package's programs and wait (bounded) for the READY line it prints once
    it serves; BenchError, with its log, when it does not."""
    proc = Proc(name, argv, log_path, cwd=ROOT, stdout_pipe=True)
    line = proc.read_line(START_TIMEOUT_S)
    if line != "READY":
        proc.stop()
        raise BenchError(f"{name} did not start ({line!r}):\n{proc.log_tail()}")
    return proc


class DelayProxy:
    """bench/delayproxy.py: one single-threaded process in front of every memcached server."""

    def __init__(self, tmpdir: Path, upstreams: Sequence[str], delay_ms: float) -> None:
        self.stats_path = tmpdir / "delayproxy.json"
        self.listen = [f"{HOST}:{free_port()}" for _ in upstreams]
        argv = [sys.executable, "-m", "bench.delayproxy", "--delay-ms", str(delay_ms), "--stats-file", str(self.stats_path)]
        for front, up in zip(self.listen, upstreams):
            argv += ["--map", f"{front}={up}"]
        self.proc = start_ready("delayproxy", argv, tmpdir / "delayproxy.log")
        self.pid = self.proc.pid

    def stop(self) -> dict[str, Any]:
        """Stop it and return its own account: chunks, bytes, measured added delay."""
        self.proc.stop()
        try:
            stats: dict[str, Any] = json.loads(self.stats_path.read_text())
            return stats
        except (OSError, ValueError):
            return {}


class EchoServer:
    """bench/echo.py: a bare ZeroMQ ROUTER that answers each message with `reply_bytes` bytes."""

    def __init__(self, tmpdir: Path, tag: str, reply_bytes: int) -> None:
        self.url = f"ipc://{tmpdir}/echo-{tag}.sock"
        argv = [sys.executable, "-m", "bench.echo", "--url", self.url, "--reply-bytes", str(reply_bytes)]
        self.proc = start_ready("echo", argv, tmpdir / f"echo-{tag}.log")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.stop()


class FloorServer:
    """bench/floor.py: the least Python a broker of this design runs, in front of the servers."""

    def __init__(self, tmpdir: Path, upstreams: Sequence[str], connections: int = 2, flags: Sequence[str] = (),
                 tag: str = "floor") -> None:
        """`flags`: the floor's options that add a guarantee's work (--rcvhwm N, --opaques, --fence);
        `tag` names its socket and log in `tmpdir` (one per floor of a scenario)."""
        self.url = f"ipc://{tmpdir}/{tag}.sock"
        self.connections = connections * len(upstreams)
        argv = [sys.executable, "-m", "bench.floor", "--url", self.url, "--connections", str(connections), *flags]
        for up in upstreams:
            argv += ["--server", up]
        self.proc = start_ready(tag, argv, tmpdir / f"{tag}.log")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.stop()
