"""clientlib's own cost per get: `Client.get` against a raw DEALER sending the same frame.

    python -m bench.client_overhead [--calls 5000] [--rounds 5] [--value-size 100] [--keys 1]

With --keys N (N > 1) both paths read N keys per call (`Client.get_many` against a raw frame of N
GET ops, unpacked), and every figure is per key.

Starts its own memcached and broker (stopped by PID in a finally), stores one key, then in each
round runs the two paths back to back on one thread, one call at a time:

    raw     a bare zmq DEALER: msgpack.packb the request frame (fresh id), send, recv, unpackb
    client  clientlib.Client.get on the same broker, same key

and reports per get the wall time, this process's CPU time (all threads: ZeroMQ's I/O thread
included) and the calling thread's CPU time, median / min / max over rounds, and client minus raw:
what clientlib adds on top of the socket round trip (issue 9: at most ~5 us). Both paths pay the
same broker and memcached, so the difference is clientlib's; the calling thread's CPU time is the
steadiest figure on a shared machine (wall time carries the broker's and the machine's noise).

Last, both paths run again with the socket replaced by an in-memory stand-in that answers at once:
the Python of a call alone, with warm caches. On a busy 2-vCPU machine the same Python costs
several times more in the real loop, where each call resumes from a blocking receive.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clientlib import Client  # noqa: E402
from clientlib.wire import VERSION, Op  # noqa: E402

READY_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


def memcached_up(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"version\r\n")
        return s.recv(100).startswith(b"VERSION")


def measure(fn: Callable[[], object], calls: int) -> tuple[float, float, float]:
    """(wall, process CPU, calling thread's CPU) in us per call over `calls` calls."""
    w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(calls):
        fn()
    w1, c1, t1 = time.perf_counter(), time.process_time(), time.thread_time()
    return (w1 - w0) / calls * 1e6, (c1 - c0) / calls * 1e6, (t1 - t0) / calls * 1e6


def frame_ops(names: list[str]) -> list[list[object]]:
    """The ops clientlib sends for a get of `names`: one GET, or one GET_MANY of them all."""
    if len(names) == 1:
        return [[int(Op.GET), names[0].encode()]]
    return [[int(Op.GET_MANY), [k.encode() for k in names]]]


def first_value(reply: bytes) -> object:
    """The first key's value in a reply frame: a GET_MANY's hit is its value alone, a GET's
    result is [code, value, flags]."""
    first = msgpack.unpackb(reply)[3][0]
    return first if type(first) is bytes else first[1]


class StubSocket:
    """Stands in for the DEALER: answers each GET at once with the same reply the broker sends.
    Measures the Python of a call with no I/O at all (warm caches, no wake-ups)."""

    closed = False

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.reply = b""

    def send(self, data: bytes, flags: int = 0, copy: bool = True) -> None:
        frame = msgpack.unpackb(data)
        ops = frame[4]
        if len(ops) == 1 and ops[0][0] == Op.GET_MANY:
            results: list[Any] = [self.value] * len(ops[0][1])  # one per key, each hit its value alone
        else:
            results = [[0, self.value, 0]] * len(ops)
        self.reply = msgpack.packb([VERSION, frame[1], 0, results])

    def recv(self, flags: int = 0, copy: bool = True) -> bytes:
        return self.reply

    def setsockopt(self, option: int, value: int) -> None:
        pass


def python_only(url: str, value: bytes, calls: int, rounds: int, nkeys: int = 1) -> tuple[list[float], list[float]]:
    """(client us, raw us) per key with the socket replaced by a StubSocket on both paths."""
    client = Client(url, timeout=2.0)
    transport = client._transport
    transport._socket()  # type: ignore[attr-defined]  # make this thread's state, then swap its socket
    stub = StubSocket(value)
    transport._state().sock = stub  # type: ignore[attr-defined]
    rid = [0]
    names = key_names(nkeys)
    op = frame_ops(names)

    def raw_get() -> object:
        rid[0] += 1
        stub.send(msgpack.packb([VERSION, rid[0], 1950, 0, op]))
        return first_value(stub.recv())

    client_get = (lambda: client.get(names[0])) if nkeys == 1 else (lambda: client.get_many(names))
    assert raw_get() == value
    assert client_get() == (value if nkeys == 1 else dict.fromkeys(names, value))
    out_client: list[float] = []
    out_raw: list[float] = []
    for _ in range(rounds):
        out_raw.append(measure(raw_get, calls)[2] / nkeys)
        out_client.append(measure(client_get, calls)[2] / nkeys)
    return out_client, out_raw


def key_names(n: int) -> list[str]:
    return ["bench:k"] if n == 1 else [f"bench:k{i}" for i in range(n)]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5000, help="gets per path per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--keys", type=int, default=1, help="keys per call: 1 = get, N > 1 = get_many of N keys")
    args = p.parse_args(argv)
    if not 1 <= args.keys <= 10_000:
        p.error("--keys must be in 1..10000")
    nkeys = args.keys
    if shutil.which("memcached") is None:
        print("memcached is not installed", file=sys.stderr)
        return 2

    tmp = tempfile.mkdtemp(prefix="mcb-overhead-")
    url = f"ipc://{tmp}/b.sock"
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # memcached refuses to run as root without being told which user.
        as_root = ["-u", "root"] if os.geteuid() == 0 else []
        procs.append(subprocess.Popen(
            ["memcached", "-U", "0", "-l", "127.0.0.1", "-p", str(port), "-t", "2", "-m", "64", *as_root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        wait_for(lambda: memcached_up(port), "memcached")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--listen", url, "--server", f"127.0.0.1:{port}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        client = Client(url, timeout=2.0)
        wait_for(lambda: client.broker_ping() == "PONG", "the broker")
        value = b"v" * args.value_size
        names = key_names(nkeys)
        assert client.set_many(dict.fromkeys(names, value)) == [] and client.get(names[0]) == value

        ctx = zmq.Context.instance()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.RCVTIMEO, 2000)
        raw.connect(url)
        rid = [0]
        op = frame_ops(names)
        packb, send, recv = msgpack.packb, raw.send, raw.recv

        def raw_get() -> object:
            rid[0] += 1
            send(packb([VERSION, rid[0], 1950, 0, op]))
            return first_value(recv())

        assert raw_get() == value
        get, get_many = client.get, client.get_many

        def client_get() -> object:
            return get(names[0]) if nkeys == 1 else get_many(names)

        assert client_get() == (value if nkeys == 1 else dict.fromkeys(names, value))

        paths = {"raw": raw_get, "client": client_get}
        for fn in paths.values():  # warm-up
            measure(fn, min(500, args.calls))
        kinds = ("wall", "cpu", "thread cpu")
        got_all: dict[tuple[str, str], list[float]] = {(n, k): [] for n in (*paths, "client-raw") for k in kinds}
        for r in range(args.rounds):
            # Alternate which path goes first, so neither always runs on a warmer machine.
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            got = {name: tuple(x / nkeys for x in measure(paths[name], args.calls)) for name in order}
            for i, kind in enumerate(kinds):
                for name in paths:
                    got_all[(name, kind)].append(got[name][i])
                got_all[("client-raw", kind)].append(got["client"][i] - got["raw"][i])
            print(f"round {r + 1}/{args.rounds}: " + "; ".join(
                f"{name} {got[name][0]:.1f} us wall, {got[name][1]:.1f} us cpu, {got[name][2]:.1f} us thread cpu"
                for name in paths), file=sys.stderr)
        raw.close()
        stub_client, stub_raw = python_only(url, value, args.calls, args.rounds, nkeys)
        for name, values in (("client", stub_client), ("raw", stub_raw)):
            got_all[(f"{name} no I/O", "thread cpu")] = values
        got_all[("client-raw no I/O", "thread cpu")] = [c - r for c, r in zip(stub_client, stub_raw)]

        unit = "get" if nkeys == 1 else "key"
        call = "gets" if nkeys == 1 else f"get_many({nkeys}) calls"
        print(f"{args.calls} {call} x {args.rounds} rounds, {args.value_size}-byte value, one thread; us per {unit}")
        print(f"{'path':<24}{'median':>8} {'min':>8} {'max':>8}")
        for name in (*paths, "client-raw"):
            for kind in kinds:
                print(f"{name + ' ' + kind:<24}{summary(got_all[(name, kind)])}")
        print("the same Python with the socket replaced by an in-memory stand-in (no I/O, warm caches):")
        for name in ("raw no I/O", "client no I/O", "client-raw no I/O"):
            print(f"{name + ' thread cpu':<32}{summary(got_all[(name, 'thread cpu')])}")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
