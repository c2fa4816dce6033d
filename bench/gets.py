"""Gets per second: N worker processes straight to memcached (pymemcache) vs through the broker.

    python -m bench.gets [--workers 1,8,32] [--seconds 3] [--rounds 3] [--keys 1000]
                         [--value-size 100] [--mode get,get_many] [--batch 100] [--json]

Starts its own memcached and its own broker (`python -m broker serve`), preloads keys, then for
every call mode and worker count runs the two paths interleaved in each round (direct, broker,
direct, broker, ...) so that noise from a shared machine falls on both alike. Each scenario forks
N processes that loop gets for a fixed wall time. Per scenario it reports the median over rounds
of total gets/s, the broker/direct ratio, sampled per-call latency, memcached's
`curr_connections` while the workers run, and the broker's requests per backend write.
See bench/README.md for the columns.

Everything started here is stopped by PID in a finally block; every wait is bounded by time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
VIAS: tuple[str, ...] = ("direct", "broker")
MODES: tuple[str, ...] = ("get", "get_many")

CALL_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 30.0     # all workers connected and warmed up
START_DELAY_S = 0.05       # lets every worker see the start time before it arrives
RESULT_GRACE_S = 15.0      # after the run window, for the last call and the result message
STATS_INTERVAL_S = 0.1     # curr_connections sampling while workers run
SAMPLE_CAP = 4096          # latency samples kept per worker (stride doubles when full)
BATCHES_PER_WORKER = 64    # distinct get_many key lists each worker cycles through
SETTLE_TIMEOUT_S = 2.0     # for connections closed by the previous scenario to leave memcached


class BenchError(RuntimeError):
    """The benchmark could not run (a service did not start, a worker failed to connect)."""


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    workers: tuple[int, ...] = (1, 8, 32)
    seconds: float = 3.0
    rounds: int = 3
    keys: int = 1000
    value_size: int = 100
    modes: tuple[str, ...] = MODES
    batch: int = 100
    start_method: str = "fork"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"need one or more positive integers: {text!r}")
    return values


def _mode_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in MODES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)} (comma-separated): {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gets", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=_int_list, default=Settings.workers, help="worker counts, comma-separated (default 1,8,32)")
    p.add_argument("--seconds", type=float, default=Settings.seconds, help="wall time of each scenario run (default 3)")
    p.add_argument("--rounds", type=int, default=Settings.rounds, help="rounds per scenario; the median is reported (default 3)")
    p.add_argument("--keys", type=int, default=Settings.keys, help="distinct keys preloaded and read (default 1000)")
    p.add_argument("--value-size", type=int, default=Settings.value_size, help="bytes per value (default 100)")
    p.add_argument("--mode", type=_mode_list, default=Settings.modes, help="get, get_many or both comma-separated (default both)")
    p.add_argument("--batch", type=int, default=Settings.batch, help="keys per get_many call (default 100)")
    p.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=Settings.start_method)
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    p.add_argument("--save", metavar="FILE", help="also write the machine-readable results to FILE")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    if not 0 < args.seconds <= 600:
        raise BenchError("--seconds must be in (0, 600]")
    if args.rounds < 1 or args.keys < 1 or args.value_size < 0 or args.batch < 1:
        raise BenchError("--rounds, --keys and --batch must be >= 1, --value-size >= 0")
    if args.batch > args.keys:
        raise BenchError("--batch cannot exceed --keys (a get_many would repeat keys)")
    return Settings(
        workers=args.workers, seconds=args.seconds, rounds=args.rounds, keys=args.keys,
        value_size=args.value_size, modes=args.mode, batch=args.batch, start_method=args.start_method,
    )


def key_names(n: int) -> list[str]:
    return [f"bench:{i:06d}" for i in range(n)]


# --- pure summaries --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


@dataclass(frozen=True)
class RoundResult:
    """One run of one scenario: N workers for `seconds` via one path."""

    mode: str
    workers: int
    via: str
    round: int
    gets_per_s: float          # keys fetched per second, all workers
    calls_per_s: float         # client calls per second (= gets_per_s for mode get)
    calls: int
    misses: int
    errors: int
    mc_connections: int        # max curr_connections seen during the run, minus our stats socket
    requests_per_write: float  # broker only: memcached requests per socket write in this run
    broker_cpu_pct: float      # broker only: CPU time / wall time over the run window
    memcached_cpu_pct: float
    worker_cpu_us_per_call: float  # CPU time of the worker processes per call
    latencies_us: tuple[int, ...] = field(repr=False, default=())


@dataclass(frozen=True)
class Summary:
    """The rounds of one scenario, reduced."""

    mode: str
    workers: int
    via: str
    gets_per_s: float
    calls_per_s: float
    ratio_to_direct: float | None
    p50_us: float
    p99_us: float
    mc_connections: int
    requests_per_write: float | None
    broker_cpu_pct: float | None
    memcached_cpu_pct: float
    worker_cpu_us_per_call: float
    calls: int
    misses: int
    errors: int
    rounds_gets_per_s: tuple[float, ...]


def summarize(rounds: Sequence[RoundResult]) -> list[Summary]:
    """Median over rounds per (mode, workers, via); latencies pooled over rounds; ratio broker/direct."""
    groups: dict[tuple[str, int, str], list[RoundResult]] = {}
    for r in rounds:
        groups.setdefault((r.mode, r.workers, r.via), []).append(r)
    medians = {k: statistics.median(r.gets_per_s for r in rs) for k, rs in groups.items()}
    out: list[Summary] = []
    for (mode, workers, via), rs in groups.items():
        lat = sorted(x for r in rs for x in r.latencies_us)
        direct = medians.get((mode, workers, "direct"))
        is_broker = via == "broker"
        out.append(Summary(
            mode=mode, workers=workers, via=via,
            gets_per_s=round(medians[(mode, workers, via)], 1),
            calls_per_s=round(statistics.median(r.calls_per_s for r in rs), 1),
            ratio_to_direct=round(medians[(mode, workers, via)] / direct, 3) if is_broker and direct else None,
            p50_us=percentile(lat, 50), p99_us=percentile(lat, 99),
            mc_connections=max(r.mc_connections for r in rs),
            requests_per_write=round(statistics.median(r.requests_per_write for r in rs), 2) if is_broker else None,
            broker_cpu_pct=round(statistics.median(r.broker_cpu_pct for r in rs), 1) if is_broker else None,
            memcached_cpu_pct=round(statistics.median(r.memcached_cpu_pct for r in rs), 1),
            worker_cpu_us_per_call=round(statistics.median(r.worker_cpu_us_per_call for r in rs), 1),
            calls=sum(r.calls for r in rs), misses=sum(r.misses for r in rs), errors=sum(r.errors for r in rs),
            rounds_gets_per_s=tuple(round(r.gets_per_s, 1) for r in rs),
        ))
    return out


def render_table(summaries: Sequence[Summary]) -> str:
    headers = ("mode", "workers", "via", "gets/s", "broker/direct", "p50 us", "p99 us",
               "mc conns", "req/write", "broker cpu%", "mc cpu%", "worker cpu us/call", "errors+misses")
    rows = [headers]
    for s in summaries:
        rows.append((
            s.mode, str(s.workers), s.via, f"{s.gets_per_s:,.0f}",
            "" if s.ratio_to_direct is None else f"{s.ratio_to_direct:.2f}",
            f"{s.p50_us:,.0f}", f"{s.p99_us:,.0f}", str(s.mc_connections),
            "" if s.requests_per_write is None else f"{s.requests_per_write:.2f}",
            "" if s.broker_cpu_pct is None else f"{s.broker_cpu_pct:.0f}",
            f"{s.memcached_cpu_pct:.0f}", f"{s.worker_cpu_us_per_call:,.0f}", str(s.errors + s.misses),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) if i >= 3 or i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" if i >= 3 or i == 1 else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


# --- processes we start ----------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads) from /proc; 0.0 where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # After "pid (comm)", field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _memcached_version(address: str, timeout: float) -> str:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(b"version\r\n")
        buf = b""
        while not buf.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
    return buf.decode("ascii").strip().removeprefix("VERSION ")


@dataclass
class Memcached:
    address: str
    pid: int
    stop: Callable[[], None]


def _start_memcached_with_harness(tmpdir: Path) -> Memcached | None:
    """tests/harness.py's Memcached (same flags as the test suite) when it is importable."""
    tests_dir = str(ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    try:
        import harness  # type: ignore[import-not-found]
    except ImportError:
        return None
    server = harness.Memcached()
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return Memcached(server.address, server.pid, server.cleanup)


def _start_memcached_alone(tmpdir: Path) -> Memcached:
    binary = shutil.which("memcached")
    if binary is None:
        raise BenchError("memcached is not on PATH")
    address = f"{HOST}:{_free_port()}"
    argv = [binary, "-U", "0", "-t", "2", "-m", "64", "-c", "4096", "-l", HOST, "-p", address.rpartition(":")[2]]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    with open(tmpdir / "memcached.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)

    deadline = time.monotonic() + 5.0
    while True:
        try:
            _memcached_version(address, 0.2)
            return Memcached(address, proc.pid, stop)
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop()
                raise BenchError(f"memcached did not start: {exc}") from None
            time.sleep(0.02)


class BrokerProcess:
    """`python -m broker serve` on a private ipc socket, stopped by PID."""

    def __init__(self, tmpdir: Path, server: str) -> None:
        from clientlib import Client

        self.url = f"ipc://{tmpdir}/b.sock"
        self.log_path = tmpdir / "broker.log"
        self.client = Client(self.url, timeout=CALL_TIMEOUT_S)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "serve", "--listen", self.url, "--server", server],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 10.0) -> None:
        from clientlib.errors import MemcacheError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.broker_ping() == "PONG":
                    return
            except MemcacheError:
                time.sleep(0.05)
        raise BenchError(f"broker did not answer ping within {timeout}s:\n{self.log()}")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.client.broker_stats()
        return stats

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.client.disconnect_all()
        if self.proc.poll() is None:
            # SIGTERM drains; nothing is in flight by now, so it exits at once.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(5)


class StatsConn:
    """One persistent connection for `stats`: a new one per sample would itself linger in the
    count until memcached notices it closed. It counts itself, so callers subtract one."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_S)

    def curr_connections(self) -> int:
        self.sock.sendall(b"stats\r\n")
        buf = b""
        while not buf.endswith(b"END\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("memcached closed the stats connection")
            buf += chunk
        for line in buf.split(b"\r\n"):
            if line.startswith(b"STAT curr_connections "):
                return int(line.split()[2])
        raise BenchError("memcached stats has no curr_connections")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Services:
    memcached: Memcached
    broker: BrokerProcess
    stats: StatsConn
    version: str


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """memcached + broker + a stats connection; all stopped by PID on the way out."""
    tmpdir = Path(tempfile.mkdtemp(prefix="mcb-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmpdir, True)
        mc = _start_memcached_with_harness(tmpdir) or _start_memcached_alone(tmpdir)
        stack.callback(mc.stop)
        broker = BrokerProcess(tmpdir, mc.address)
        stack.callback(broker.stop)
        broker.wait_ready()
        stats = StatsConn(mc.address)
        stack.callback(stats.close)
        yield Services(mc, broker, stats, _memcached_version(mc.address, CALL_TIMEOUT_S))


def preload(address: str, names: Sequence[str], value_size: int) -> None:
    from pymemcache.client.base import Client as PmcClient

    host, _, port = address.rpartition(":")
    client = PmcClient((host, int(port)), connect_timeout=CALL_TIMEOUT_S, timeout=CALL_TIMEOUT_S)
    try:
        value = b"x" * value_size
        for i in range(0, len(names), 100):
            failed = client.set_many({k: value for k in names[i : i + 100]}, noreply=False)
            if failed:
                raise BenchError(f"preload: memcached did not store {failed[:3]}")
        found = sum(len(client.get_many(names[i : i + 100])) for i in range(0, len(names), 100))
        if found != len(names):
            raise BenchError(f"preload: {found} of {len(names)} keys readable")
    finally:
        client.close()


# --- workers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    via: str
    target: str      # memcached host:port (direct) or broker URL
    mode: str
    keys: int
    batch: int
    seconds: float
    seed: int


def _make_client(spec: WorkerSpec) -> Any:
    if spec.via == "direct":
        from pymemcache.client.base import Client as PmcClient

        host, _, port = spec.target.rpartition(":")
        # One socket per worker, as a prefork app has today; no_delay gives direct its best case.
        return PmcClient((host, int(port)), connect_timeout=CALL_TIMEOUT_S, timeout=CALL_TIMEOUT_S, no_delay=True)
    from clientlib import Client

    return Client(spec.target, timeout=CALL_TIMEOUT_S)


def _close_client(client: Any, via: str) -> None:
    with contextlib.suppress(Exception):
        if via == "direct":
            client.close()
        else:
            client.disconnect_all()


def _worker(spec: WorkerSpec, outbox: Any, go: Any, start_at: Any) -> None:
    """Connect, warm up, report ready, then loop calls from start_at for spec.seconds."""
    try:
        names = key_names(spec.keys)
        random.Random(spec.seed).shuffle(names)
        client = _make_client(spec)
        if spec.mode == "get":
            args: list[Any] = names
            call = client.get
            expected = 1
        else:
            args = [[names[(j * spec.batch + i) % len(names)] for i in range(spec.batch)] for j in range(BATCHES_PER_WORKER)]
            call = client.get_many
            expected = spec.batch
        call(args[0])  # opens the connection before the clock starts
    except Exception as exc:
        outbox.put(("error", os.getpid(), f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(("ready", os.getpid(), ""))
    try:
        if not go.wait(READY_TIMEOUT_S):
            return
        start = start_at.value
        end = start + spec.seconds
        while (now := time.monotonic()) < start:
            time.sleep(min(0.001, start - now))
        calls = misses = errors = 0
        first_error = ""
        samples: list[int] = []
        stride = 1
        n_args = len(args)
        cpu0 = os.times()
        t = time.monotonic()
        while t < end:
            try:
                got = call(args[calls % n_args])
                if spec.mode == "get":
                    misses += got is None
                else:
                    misses += expected - len(got)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
            t2 = time.monotonic()
            if calls % stride == 0:
                samples.append(int((t2 - t) * 1e6))
                if len(samples) >= SAMPLE_CAP:
                    # Keep coverage of the whole window: halve the samples, double the stride.
                    samples = samples[::2]
                    stride *= 2
            calls += 1
            t = t2
        cpu1 = os.times()
        elapsed = max(t - start, 1e-9)
        outbox.put(("result", os.getpid(), {
            # The whole process (all threads): for clientlib that includes ZeroMQ's I/O thread.
            "cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "calls": calls, "keys": calls * expected, "elapsed": elapsed, "misses": misses,
            "errors": errors, "first_error": first_error, "samples": samples,
        }))
    finally:
        _close_client(client, spec.via)


def _collect(outbox: Any, kind: str, n: int, deadline: float, procs: Sequence[Any]) -> list[Any]:
    """n messages of `kind` from the workers before `deadline`; a worker error or death fails fast."""
    import queue

    got: list[Any] = []
    while len(got) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"only {len(got)} of {n} workers sent {kind!r} in time")
        try:
            what, pid, payload = outbox.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            dead = [p.pid for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise BenchError(f"workers {dead} died before sending {kind!r}") from None
            continue
        if what == "error":
            raise BenchError(f"worker {pid}: {payload}")
        got.append(payload)
    return got


def settle(svc: Services, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Wait (bounded) until memcached holds only the broker's pool and our stats socket, so a
    scenario's count never includes connections the previous one closed a moment ago."""
    pool = sum(s["connections"] for s in svc.broker.stats()["servers"].values())
    deadline = time.monotonic() + timeout
    while svc.stats.curr_connections() - 1 > pool and time.monotonic() < deadline:
        time.sleep(0.01)


def run_scenario(settings: Settings, svc: Services, mode: str, workers: int, via: str, rnd: int) -> RoundResult:
    settle(svc)
    ctx = multiprocessing.get_context(settings.start_method)
    outbox = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    target = svc.memcached.address if via == "direct" else svc.broker.url
    procs = []
    try:
        for i in range(workers):
            spec = WorkerSpec(via, target, mode, settings.keys, settings.batch, settings.seconds, seed=rnd * 1000 + i)
            p = ctx.Process(target=_worker, args=(spec, outbox, go, start_at), daemon=True)
            p.start()
            procs.append(p)
        _collect(outbox, "ready", workers, time.monotonic() + READY_TIMEOUT_S, procs)

        before = svc.broker.stats() if via == "broker" else {}
        cpu0 = _cpu_seconds(svc.broker.pid), _cpu_seconds(svc.memcached.pid)
        start = time.monotonic() + START_DELAY_S
        start_at.value = start
        go.set()
        end = start + settings.seconds
        conns = 0
        while True:
            conns = max(conns, svc.stats.curr_connections() - 1)
            if time.monotonic() + STATS_INTERVAL_S >= end:
                break
            time.sleep(STATS_INTERVAL_S)
        results = _collect(outbox, "result", workers, end + RESULT_GRACE_S, procs)
        wall = time.monotonic() - start
        cpu1 = _cpu_seconds(svc.broker.pid), _cpu_seconds(svc.memcached.pid)
        after = svc.broker.stats() if via == "broker" else {}
        for p in procs:
            p.join(RESULT_GRACE_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2)
        outbox.cancel_join_thread()
        outbox.close()

    rpw = 0.0
    if via == "broker":
        writes = after["backend_writes"] - before["backend_writes"]
        rpw = (after["requests_written"] - before["requests_written"]) / writes if writes else 0.0
    samples = tuple(x for r in results for x in r["samples"])
    errors = sum(r["errors"] for r in results)
    if errors:
        first = next(r["first_error"] for r in results if r["first_error"])
        print(f"  warning: {errors} failed calls ({first})", file=sys.stderr)
    return RoundResult(
        mode=mode, workers=workers, via=via, round=rnd,
        gets_per_s=sum(r["keys"] / r["elapsed"] for r in results),
        calls_per_s=sum(r["calls"] / r["elapsed"] for r in results),
        calls=sum(r["calls"] for r in results), misses=sum(r["misses"] for r in results), errors=errors,
        mc_connections=conns, requests_per_write=round(rpw, 2),
        broker_cpu_pct=round(100 * (cpu1[0] - cpu0[0]) / wall, 1) if via == "broker" else 0.0,
        memcached_cpu_pct=round(100 * (cpu1[1] - cpu0[1]) / wall, 1),
        worker_cpu_us_per_call=round(1e6 * sum(r["cpu"] for r in results) / max(1, sum(r["calls"] for r in results)), 1),
        latencies_us=samples,
    )


# --- the run ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(), "platform": platform.platform(),
    }


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    info = machine()
    began = time.monotonic()
    rounds: list[RoundResult] = []
    with services() as svc:
        preload(svc.memcached.address, key_names(settings.keys), settings.value_size)
        progress(f"memcached {svc.version} at {svc.memcached.address}, broker at {svc.broker.url}")
        for mode in settings.modes:
            for workers in settings.workers:
                for rnd in range(settings.rounds):
                    # Interleaved: both paths see the same slice of a noisy machine.
                    for via in VIAS:
                        r = run_scenario(settings, svc, mode, workers, via, rnd)
                        rounds.append(r)
                        progress(f"{mode:8} workers={workers:<3} round={rnd} {via:6} {r.gets_per_s:12,.0f} gets/s  conns={r.mc_connections}")
        info["memcached"] = svc.version
    info["duration_s"] = round(time.monotonic() - began, 1)
    summaries = summarize(rounds)
    return {
        "settings": asdict(settings),
        "machine": info,
        "results": [asdict(s) for s in summaries],
        "rounds": [{k: v for k, v in asdict(r).items() if k != "latencies_us"} for r in rounds],
        "_summaries": summaries,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        quiet = bool(args.json)
        report = run(settings, lambda line: print(line, file=sys.stderr, flush=True) if not quiet else None)
    except BenchError as exc:
        print(f"bench.gets: {exc}", file=sys.stderr)
        return 1
    summaries = report.pop("_summaries")
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        print(f"\n{m['date']}  {m['cpus']} CPUs  load {m['loadavg_at_start']}  memcached {m['memcached']}  "
              f"python {m['python']}  {m['duration_s']} s")
        s = report["settings"]
        print(f"{s['rounds']} rounds x {s['seconds']} s, {s['keys']} keys of {s['value_size']} B, batch {s['batch']}\n")
        print(render_table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
