"""Two broker trees, same load, interleaved: what a change costs the 32-worker single get (or,
with --many N, get_many of N keys).

    python -m bench.ab_broker --before DIR [--after DIR] [--rounds 8] [--seconds 1.5] [--workers 32] [--many N]
                              [--servers N] [--own-keys | --pool N]
    python -m bench.ab_broker --before-floor FLAGS --after-floor FLAGS ...   # what a guarantee costs

DIR is a checkout (or `git archive REV | tar -x -C DIR`) whose `broker` package is run as
`python -m broker serve` with DIR as its working directory; --after defaults to this checkout. One
memcached (or --servers N), one broker per tree, the same forked workers (this checkout's clientlib), and rounds in
ABBA order (before/after, after/before, ...), so drift and noise on a shared machine fall on both.
Each round reports gets/s (keys/s with --many), the CPU per get (per key with --many; /proc) of the
broker and of memcached (every server), and the requests each write to memcached carried (the
broker's own count, `backend_writes` and `requests_written`: `mg` requests, not fences), and per
frame the wake-ups of the server's ZeroMQ I/O thread and the preemptions of its loop thread
(voluntary and involuntary context switches, /proc); the summary gives the median of the
per-pair ratios after/before. Issue 11 asks that the stats work cost at most 3% of
this throughput; on a loaded 2-vCPU machine single pairs scatter by +-25%, so read the median of
many rounds, and the CPU per get (steadier) beside it.

Workers ask the same keys by default (single gets: the same 64 keys in step, so many of them join a
read in flight, which a floor does not do: use --pool to compare with one); with --own-keys each
worker asks keys of its own; with --pool N each worker draws its keys (single gets) or batches
(get_many) from a shared pool of N keys in an order of its own (the bench's scenarios: N = 1000).
Which keys overlap mattered for get_many while its keys joined reads in flight (trees before
79b2376, where same keys made the broker parse fewer answers than keys it served); since 79b2376
every key of a get_many is read from memcached whatever the keys.

Either side may be bench/floor.py instead of a broker tree (--before-floor, --after-floor, with the
floor's flags: --rcvhwm 2, --opaques, --fence), so each of the guarantees mcbroker pays for can be
priced alone, and the floor with all of them set against the broker. A floor counts no writes: its
requests per write show as "-".

Every worker loop is bounded by time and call count; memcached and both brokers are stopped by PID.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

from .paths import batches_of
from .procs import ROOT, BenchError, Proc, start_ready, cpu_seconds, start_memcached
from .scenarios import BATCHES_PER_WORKER

MAX_CALLS = 20_000_000
KEYS = 64


def _worker(conn: Any) -> None:
    from clientlib import Client

    clients: dict[str, Any] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        url, seconds, many, base, pool = msg
        client = clients.get(url) or clients.setdefault(url, Client(url, timeout=5.0))
        n = 0
        end = time.monotonic() + seconds
        if many:
            if pool:
                # As the bench's get_many scenarios draw them: this worker's own order of the shared
                # pool, in BATCHES_PER_WORKER consecutive batches.
                order = ["ab%d" % i for i in range(pool)]
                random.Random(base).shuffle(order)
                flat = batches_of(order, many, BATCHES_PER_WORKER, 0)
                batches = [list(flat[j : j + many]) for j in range(0, len(flat), many)]
            else:
                batches = [["ab%d" % (base + i) for i in range(many)]]
            calls = 0
            while n < MAX_CALLS and time.monotonic() < end:
                if len(client.get_many(batches[calls % len(batches)])) != many:
                    raise BenchError("a preloaded key read as a miss")
                n += many
                calls += 1
        if not many:
            # Without --pool every worker walks the same KEYS keys in step, so many of its gets join
            # one in flight (read coalescing); with --pool N each walks its own order of N keys.
            keys = ["ab%d" % i for i in range(pool or KEYS)]
            if pool:
                random.Random(base).shuffle(keys)
        while not many and n < MAX_CALLS and time.monotonic() < end:
            if client.get(keys[n % len(keys)]) is None:
                raise BenchError("a preloaded key read as a miss")
            n += 1
        conn.send(n)


class Row(NamedTuple):
    """One tree's round: calls (keys with --many) per second, CPU per call of the broker and of
    every memcached (microseconds), and requests per write to memcached (None: not counted)."""

    rate: float
    broker_us: float
    memcached_us: float
    per_write: float | None
    io_wakeups: float  # the server's ZeroMQ I/O threads' voluntary context switches per call
    preempted: float  # its main (loop) thread's involuntary context switches per call


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary context switches of the process's ZeroMQ I/O threads, involuntary ones of its
    main thread) so far, from /proc/<pid>/task/*/status; (0, 0) for what cannot be read."""
    io = main = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue  # a thread that ended meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if name.startswith("ZMQbg/IO"):
            io += int(fields.get("voluntary_ctxt_switches", "0"))
        if tid == str(pid):
            main += int(fields.get("nonvoluntary_ctxt_switches", "0"))
    return io, main


def _writes(url: str) -> tuple[int, int]:
    """The broker's (writes to memcached, requests they carried) so far, from its own stats; (0, 0)
    from a tree that does not count them."""
    from clientlib import Client

    client = Client(url, timeout=5.0)
    try:
        stats = client.broker_stats()
    finally:
        client.close()
    return int(stats.get("backend_writes", 0)), int(stats.get("requests_written", 0))


def _result(pipe: Any) -> int:
    """A worker's count of calls, or BenchError when it died (its traceback is on stderr)."""
    try:
        return int(pipe.recv())
    except EOFError:
        raise BenchError("a worker exited before reporting (its error is above)") from None


def _start_broker(tmp: Path, tag: str, tree: Path, servers: list[str]) -> tuple[Proc, str]:
    from clientlib import Client
    from clientlib.errors import MemcacheError

    url = f"ipc://{tmp}/{tag}.sock"
    argv = [sys.executable, "-m", "broker", "serve", "--listen", url]
    for server in servers:
        argv += ["--server", server]
    proc = Proc(f"broker-{tag}", argv, tmp / f"broker-{tag}.log", cwd=tree)
    client = Client(url, timeout=0.5)
    deadline = time.monotonic() + 30
    while True:
        if not proc.alive():
            raise BenchError(f"broker {tag} exited:\n{proc.log_tail()}")
        try:
            client.broker_ping()
            return proc, url
        except MemcacheError:
            if time.monotonic() > deadline:
                proc.stop()
                raise BenchError(f"broker {tag} did not answer within 30 s:\n{proc.log_tail()}")
            time.sleep(0.05)


def _start_floor(tmp: Path, tag: str, flags: str, servers: list[str]) -> tuple[Proc, str]:
    """bench/floor.py (this checkout's) with `flags` (e.g. "--rcvhwm 2 --opaques") in place of a broker tree."""
    url = f"ipc://{tmp}/{tag}.sock"
    argv = [sys.executable, "-m", "bench.floor", "--url", url, *shlex.split(flags)]
    for server in servers:
        argv += ["--server", server]
    return start_ready(f"floor-{tag}", argv, tmp / f"floor-{tag}.log"), url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_broker", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path)
    p.add_argument("--after", type=Path, default=ROOT)
    p.add_argument("--before-floor", metavar="FLAGS",
                   help='instead of --before: bench/floor.py with these flags ("" for none; write --before-floor="--opaques" when they start with a dash), to price what one adds')
    p.add_argument("--after-floor", metavar="FLAGS", help="instead of --after: bench/floor.py with these flags")
    p.add_argument("--rounds", type=int, default=8, help="ABBA pairs (default 8)")
    p.add_argument("--seconds", type=float, default=1.5, help="seconds per path per round (default 1.5)")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--many", type=int, default=0, help="get_many of this many keys per call (default: single gets)")
    p.add_argument("--servers", type=int, default=1, help="memcached servers (default 1)")
    p.add_argument("--own-keys", action="store_true", help="with --many: each worker asks keys of its own (no key shared between workers)")
    p.add_argument("--pool", type=int, default=0,
                   help="keys drawn from a shared pool of this many, in an order of each worker's own: with --many, "
                        "64 consecutive batches of it (the bench's get_many scenarios use 1000); single gets walk it "
                        "whole (default: every worker walks the same 64 keys in step, so many gets join one in flight)")
    args = p.parse_args(argv)
    if not 1 <= args.servers <= 32:
        p.error("--servers must be 1..32")
    if args.many < 0 or args.pool < 0:
        p.error("--many and --pool take a count of keys (0: not used)")
    if args.pool and (args.own_keys or args.pool < max(args.many, 1) or args.pool > 100_000):
        p.error("--pool needs no --own-keys, and --many <= N <= 100000")
    if (args.before is None) == (args.before_floor is None):
        p.error("give one of --before DIR and --before-floor FLAGS")
    for tree, floor in ((args.before, args.before_floor), (args.after, args.after_floor)):
        if floor is None and not (tree / "broker" / "__main__.py").is_file():
            p.error(f"{tree} has no broker package")

    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mcb-ab-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        addresses, memcached = [], []
        for i in range(args.servers):
            mc, address = start_memcached(tmp, f"ab{i}")
            stack.callback(mc.stop)
            addresses.append(address)
            memcached.append(mc)
        brokers: dict[str, tuple[Proc, str]] = {}
        for tag, tree, floor in (("before", args.before, args.before_floor), ("after", args.after, args.after_floor)):
            if floor is not None:
                brokers[tag] = _start_floor(tmp, tag, floor, addresses)
            else:
                brokers[tag] = _start_broker(tmp, tag, tree.resolve(), addresses)
            stack.callback(brokers[tag][0].stop)
        floors = {"before": args.before_floor is not None, "after": args.after_floor is not None}
        # Every key on every server, so both trees find it whatever their placement.
        from pymemcache.client.base import Client as PmcClient

        span = args.pool or args.many * (args.workers if args.own_keys else 1)
        names = ["ab%d" % i for i in range(max(KEYS, span))]
        # A worker's base: its first key (--own-keys), or its shuffle's seed (--pool).
        bases = [w * args.many if args.own_keys else w if args.pool else 0 for w in range(args.workers)]
        for address in addresses:
            host, _, port = address.rpartition(":")
            loader = PmcClient((host, int(port)), connect_timeout=5.0, timeout=5.0)
            try:
                for i in range(0, len(names), 100):
                    if loader.set_many({k: b"v" * 100 for k in names[i:i + 100]}, noreply=False):
                        raise BenchError(f"{address} did not store the preloaded keys")
            finally:
                loader.close()
        pipes, procs = [], []
        for _ in range(args.workers):
            a, b = ctx.Pipe()
            w = ctx.Process(target=_worker, args=(b,), daemon=True)
            w.start()
            b.close()  # the worker's end: when it dies, recv here raises EOFError instead of waiting
            pipes.append(a)
            procs.append(w)

        def stop_workers() -> None:
            for a in pipes:
                try:
                    a.send(None)
                except OSError:
                    pass
            for w in procs:
                w.join(10)
                if w.is_alive():
                    w.kill()

        stack.callback(stop_workers)
        for tag in ("before", "after"):  # connect every worker to both, untimed
            for a, base in zip(pipes, bases):
                a.send((brokers[tag][1], 0.05, args.many, base, args.pool))
            for a in pipes:
                _result(a)
        unit = "key" if args.many else "get"
        mc_pids = [mc.pid for mc in memcached]
        rows: dict[str, list[Row]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for tag in (("before", "after") if r % 2 == 0 else ("after", "before")):
                proc, url = brokers[tag]
                w0 = _writes(url) if not floors[tag] else (0, 0)
                m0 = sum(cpu_seconds(pid) for pid in mc_pids)
                s0 = _switches(proc.pid)
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                for a, base in zip(pipes, bases):
                    a.send((url, args.seconds, args.many, base, args.pool))
                n = sum(_result(a) for a in pipes)
                dt, c1 = time.monotonic() - t0, cpu_seconds(proc.pid)
                s1 = _switches(proc.pid)
                m1 = sum(cpu_seconds(pid) for pid in mc_pids)
                w1 = _writes(url) if not floors[tag] else (0, 0)
                per_write = (w1[1] - w0[1]) / (w1[0] - w0[0]) if w1[0] > w0[0] else None
                calls = max(n // (args.many or 1), 1)  # the I/O threads and the loop see frames, not keys
                row = Row(n / dt, (c1 - c0) / max(n, 1) * 1e6, (m1 - m0) / max(n, 1) * 1e6, per_write,
                          (s1[0] - s0[0]) / calls, (s1[1] - s0[1]) / calls)
                rows[tag].append(row)
                shown = f"{per_write:5.1f}" if per_write is not None else "    -"
                print(f"round {r + 1}/{args.rounds} {tag:6} {row.rate:10,.0f} {unit}s/s  broker {row.broker_us:6.1f} "
                      f"us CPU/{unit}  memcached {row.memcached_us:5.1f} us CPU/{unit}  {shown} requests/write  "
                      f"{row.io_wakeups:4.2f} I/O wake-ups, {row.preempted:4.2f} loop preemptions per call",
                      file=sys.stderr, flush=True)
        pairs = list(zip(rows["after"], rows["before"]))
        ratio = [a.rate / b.rate for a, b in pairs]
        cpu = [a.broker_us / b.broker_us for a, b in pairs if b.broker_us]
        mc_cpu = [a.memcached_us / b.memcached_us for a, b in pairs if b.memcached_us]
        print(f"| tree | {unit}s/s median | broker us CPU/{unit} median | memcached us CPU/{unit} median "
              f"| requests per write median | I/O thread wake-ups per call | loop thread preemptions per call |"
              f"\n|---|---|---|---|---|---|---|")
        for tag in ("before", "after"):
            per = [x.per_write for x in rows[tag] if x.per_write is not None]
            print(f"| {tag} | {statistics.median(x.rate for x in rows[tag]):,.0f} "
                  f"| {statistics.median(x.broker_us for x in rows[tag]):.1f} "
                  f"| {statistics.median(x.memcached_us for x in rows[tag]):.1f} "
                  f"| {f'{statistics.median(per):.1f}' if per else '-'} "
                  f"| {statistics.median(x.io_wakeups for x in rows[tag]):.2f} "
                  f"| {statistics.median(x.preempted for x in rows[tag]):.2f} |")
        print(f"\nafter/before, median of {len(ratio)} pairs: throughput {statistics.median(ratio):.3f} "
              f"(pairs {min(ratio):.2f}..{max(ratio):.2f}); broker CPU per {unit} {statistics.median(cpu):.3f}; "
              f"memcached CPU per {unit} {statistics.median(mc_cpu) if mc_cpu else float('nan'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
