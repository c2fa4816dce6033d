"""memcached's own CPU per get, by how the gets reach it: one request per write on many
connections (the direct path), or batches of N on one connection (a broker's writes).

    python -m bench.memcached_cost [--seconds 2] [--rounds 3] [--connections 32] [--value-size 100]

Issue 9's memcached target is "memcached CPU per get at 32 workers: broker / direct <= 0.2". What
memcached spends per get depends on how many requests each of its reads finds, so this drives one
memcached (started as the bench starts it: bench.procs.start_memcached) from this process with
plain sockets, one load after another, each for --seconds, and reads memcached's CPU time from
/proc around each:

    direct-like  --connections sockets, each with one classic `get <key>` in flight at a time, the
                 next sent as soon as its answer is in: pymemcache's workers, one connection and
                 one request per write each
    meta N       one socket, each write N `mg <key> v f s O<n>` requests and mcbroker's fence
                 (`mg _mcbroker_fence_ O<n>`), the next write once the fence's answer is in: the
                 broker's writes of a loop turn's gets, N = 1, 2, 4, 8, 16, 32, 100
    classic N    one socket, each write one classic `get <key 1> ... <key N>` (N = 4, 16, 100):
                 the same batches in the text protocol's multi-key form

Every answer is read whole and its end checked (`END` of a classic get, the fence's `EN O<n>`);
every key is stored first, so every get is a hit of --value-size bytes. The table gives each
load's gets per second, memcached's CPU per get (median of --rounds, with min and max) and its
ratio to direct-like's in the same round (the median of those ratios). This process's own speed
bounds the gets per second, not memcached's CPU per get, which is what is measured; the bench's
get-32 scenario measures the real paths (broker: about 4 requests per write at 32 workers).
Nothing here starts a broker.
"""

from __future__ import annotations

import argparse
import functools
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import cpu_seconds, split_address, start_memcached  # noqa: E402

FENCE_KEY = b"_mcbroker_fence_"  # broker/pipeline.py's: a key the broker never stores
META_SIZES = (1, 2, 4, 8, 16, 32, 100)
CLASSIC_SIZES = (4, 16, 100)
POOL = 1000  # keys stored and read in turn


def keys_of(pool: int) -> list[bytes]:
    return [b"cost:%06d" % i for i in range(pool)]


def meta_write(keys: list[bytes], first: int) -> tuple[bytes, bytes]:
    """The broker's write of gets of `keys` with opaques first, first + 1, ... and its fence; and
    the fence's answer, which ends memcached's answers to the write."""
    fence = first + len(keys)
    data = b"".join(b"mg %b v f s O%d\r\n" % (k, first + i) for i, k in enumerate(keys))
    return data + b"mg %b O%d\r\n" % (FENCE_KEY, fence), b"EN O%d\r\n" % fence


def classic_write(keys: list[bytes]) -> tuple[bytes, bytes]:
    """One classic multi-key get of `keys`, and the end of its answer."""
    return b"get " + b" ".join(keys) + b"\r\n", b"END\r\n"


def _read_until(sock: socket.socket, end: bytes, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(end):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer ending {end!r} from memcached in time")
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("memcached closed the connection")
        buf += chunk
    return buf


def batches(sock: socket.socket, keys: list[bytes], n: int, seconds: float, classic: bool) -> int:
    """Writes of `n` gets, one after another on `sock`, for `seconds`; the gets answered. Each
    answer is checked: every key a hit of the stored size."""
    sent = 0
    opaque = 1
    stop = time.monotonic() + seconds
    at = 0
    while time.monotonic() < stop:
        batch = [keys[(at + i) % len(keys)] for i in range(n)]
        at += n
        data, end = classic_write(batch) if classic else meta_write(batch, opaque)
        opaque += n + 1
        sock.sendall(data)
        answer = _read_until(sock, end, stop + 10)
        hits = answer.count(b"VALUE ") if classic else answer.count(b"VA ")
        if hits != n:
            raise RuntimeError(f"{hits} hits for {n} gets: {answer[:200]!r}")
        sent += n
    return sent


def one_each(socks: list[socket.socket], keys: list[bytes], seconds: float) -> int:
    """One classic `get <key>` in flight on each socket at a time, for `seconds`; the gets answered."""
    poller = select.poll()
    bufs: dict[int, bytes] = {}
    by_fd = {s.fileno(): s for s in socks}
    at = 0
    for s in socks:
        s.sendall(b"get %b\r\n" % keys[at % len(keys)])
        at += 1
        bufs[s.fileno()] = b""
        poller.register(s, select.POLLIN)
    done = 0
    stop = time.monotonic() + seconds
    while True:
        now = time.monotonic()
        if now > stop + 10:
            raise TimeoutError("memcached did not answer in time")
        for fd, _ in poller.poll(100):
            s = by_fd[fd]
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("memcached closed the connection")
            buf = bufs[fd] + chunk
            if not buf.endswith(b"END\r\n"):
                bufs[fd] = buf
                continue
            if not buf.startswith(b"VALUE "):
                raise RuntimeError(f"a miss or an error: {buf[:200]!r}")
            done += 1
            bufs[fd] = b""
            if time.monotonic() < stop:
                s.sendall(b"get %b\r\n" % keys[at % len(keys)])
                at += 1
            else:
                poller.unregister(fd)
                del by_fd[fd]
        if not by_fd:
            return done


def _connect(address: str) -> socket.socket:
    s = socket.create_connection(split_address(address), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def measure(pid: int, load: Callable[[], int]) -> tuple[float, float]:
    """(gets per second, memcached CPU seconds per get) of one run of `load`."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    gets = load()
    c1, t1 = cpu_seconds(pid), time.monotonic()
    if gets <= 0:
        raise RuntimeError("no get answered")
    return gets / (t1 - t0), (c1 - c0) / gets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memcached_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per load per round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (default 3)")
    p.add_argument("--connections", type=int, default=32, help="direct-like's connections (default 32)")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or not 1 <= args.connections <= 1000 or not 0 <= args.value_size <= 1 << 20:
        p.error("--seconds must be positive, --rounds at least 1, --connections 1..1000, --value-size 0..1 MiB")
    keys = keys_of(POOL)
    value = b"v" * args.value_size
    loads = ["direct-like"] + [f"meta {n}" for n in META_SIZES] + [f"classic {n}" for n in CLASSIC_SIZES]
    rates: dict[str, list[float]] = {name: [] for name in loads}
    costs: dict[str, list[float]] = {name: [] for name in loads}
    ratios: dict[str, list[float]] = {name: [] for name in loads}
    with tempfile.TemporaryDirectory(prefix="mcbroker-mccost-") as tmp:
        mc, address = start_memcached(Path(tmp), "cost")
        try:
            with _connect(address) as s:
                s.sendall(b"".join(b"set %b 0 0 %d noreply\r\n%b\r\n" % (k, len(value), value) for k in keys))
                s.sendall(b"mn\r\n")
                _read_until(s, b"MN\r\n", time.monotonic() + 30)
            socks = [_connect(address) for _ in range(args.connections)]
            one = _connect(address)
            try:
                for rnd in range(args.rounds):
                    for name in loads:
                        kind, _, size = name.partition(" ")
                        if kind == "direct-like":
                            load = functools.partial(one_each, socks, keys, args.seconds)
                        else:
                            load = functools.partial(batches, one, keys, int(size), args.seconds, kind == "classic")
                        rate, cost = measure(mc.pid, load)
                        rates[name].append(rate)
                        costs[name].append(cost)
                    for name in loads:
                        ratios[name].append(costs[name][-1] / costs["direct-like"][-1])
                    print(f"round {rnd + 1}/{args.rounds}: direct-like {costs['direct-like'][-1] * 1e6:.1f} us, "
                          f"meta 4 {costs['meta 4'][-1] * 1e6:.1f} us, meta 100 {costs['meta 100'][-1] * 1e6:.2f} us "
                          "of memcached CPU per get", file=sys.stderr)
            finally:
                for s in [*socks, one]:
                    s.close()
        finally:
            mc.stop()
    print(f"memcached CPU per get by load, {args.value_size}-byte hits, {args.seconds:g} s per load, "
          f"median of {args.rounds} round(s) (min-max):")
    print("| load | gets/s | memcached us per get | min-max | / direct-like |")
    print("|---|---:|---:|---:|---:|")
    for name in loads:
        c = costs[name]
        print(f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(c) * 1e6:.2f} | "
              f"{min(c) * 1e6:.2f}-{max(c) * 1e6:.2f} | {statistics.median(ratios[name]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
