"""Worker processes: N forked processes that connect, warm up, start at one common instant, loop
calls for a fixed wall time (and at most MAX_CALLS calls), verify what they read, and report.

A worker's CPU time is its process CPU clock (time.process_time: every thread of the process, so
ZeroMQ's I/O thread counts for clientlib, in nanoseconds rather than /proc's 10 ms ticks, which
read 0 for a short quick-mode window) at the start and the end of its measured window.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .paths import WorkerSpec, open_path
from .procs import BenchError

READY_TIMEOUT_S = 30.0   # every worker connected and warmed up
START_DELAY_S = 0.05     # lets every worker see the start time before it arrives
RESULT_GRACE_S = 15.0    # after the window: the last call, the write check and the result message
MAX_CALLS = 20_000_000   # a count bound on every loop, far above any rate seen


def _worker(spec: WorkerSpec, outbox: Any, go: Any, start_at: Any) -> None:
    pid = os.getpid()
    close: Callable[[], None] = lambda: None
    try:
        op, check, close = open_path(spec)
        op(0)  # opens the connection before the clock starts, and checks the first value
    except BaseException as exc:
        outbox.put(("error", pid, f"{spec.path} worker setup: {type(exc).__name__}: {exc}"))
        close()
        return
    outbox.put(("ready", pid, None))
    try:
        if not go.wait(READY_TIMEOUT_S):
            return
        start = start_at.value
        end = start + spec.seconds
        while (now := time.monotonic()) < start:
            time.sleep(min(0.001, start - now))
        pace = spec.pace_s
        cap = spec.sample_cap
        samples: list[int] = []
        stride = 1
        calls = keys = 0
        cpu0 = time.process_time()
        t = time.monotonic()
        # At least one call, even by a worker the scheduler woke after `end`: on a loaded machine
        # a quick run's 0.15 s window can pass before a worker runs, and a path with no call
        # completed fails the run.
        while (t < end or calls == 0) and calls < MAX_CALLS:
            if pace:
                slot = start + calls * pace
                if slot > t:
                    time.sleep(slot - t)
                t = time.monotonic()
            keys += op(calls + 1)
            t2 = time.monotonic()
            if calls % stride == 0:
                samples.append(int((t2 - t) * 1e6))
                if len(samples) >= cap:
                    # Keep coverage of the whole window: halve the samples, double the stride.
                    samples = samples[::2]
                    stride *= 2
            calls += 1
            t = t2
        cpu1 = time.process_time()
        check()
        outbox.put(("result", pid, {
            "calls": calls, "keys": keys, "elapsed": max(t - start, 1e-9), "cpu": cpu1 - cpu0, "samples": samples,
        }))
    except BaseException as exc:
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        outbox.put(("error", pid, f"{spec.path} worker: {type(exc).__name__}: {exc} [{tb}]"))
    finally:
        try:
            close()
        except Exception:
            pass


def _collect(outbox: Any, kind: str, n: int, deadline: float, procs: Sequence[Any]) -> list[Any]:
    """n messages of `kind` before `deadline`; any worker error or death fails at once."""
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


def run_workers(specs: Sequence[WorkerSpec], seconds: float, during: Callable[[float, list[int]], None],
                before_start: Callable[[list[int]], None]) -> tuple[list[dict[str, Any]], float]:
    """Fork one process per spec, call `before_start(pids)` (the workers' PIDs) once all are
    ready (connected, waiting for the start), start them together, call `during(end, pids)` while
    they run (it must return by `end`), and return their results and the wall time from start to
    the last result."""
    ctx = multiprocessing.get_context("fork")
    outbox = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = []
    try:
        for spec in specs:
            p = ctx.Process(target=_worker, args=(spec, outbox, go, start_at), daemon=True)
            p.start()
            procs.append(p)
        _collect(outbox, "ready", len(specs), time.monotonic() + READY_TIMEOUT_S, procs)
        pids = [p.pid for p in procs if p.pid is not None]
        before_start(pids)
        start = time.monotonic() + START_DELAY_S
        start_at.value = start
        go.set()
        end = start + seconds
        during(end, pids)
        results = _collect(outbox, "result", len(specs), end + RESULT_GRACE_S, procs)
        wall = time.monotonic() - start
        for p in procs:
            p.join(RESULT_GRACE_S)
        return results, wall
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2)
        outbox.cancel_join_thread()
        outbox.close()


def _dealers(url: str, count: int, outbox: Any, release: Any) -> None:
    """Open `count` DEALERs to the broker, one PING each, then idle until released."""
    import zmq

    from clientlib.wire import Op, decode_reply, encode_request

    ctx = zmq.Context(io_threads=1)
    socks = []
    try:
        for i in range(count):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 5000)
            s.connect(url)
            s.send(encode_request(i + 1, [[int(Op.PING)]], 2000))
            reply = decode_reply(s.recv())
            if reply.req_id != i + 1 or reply.payload != [[0, "PONG"]]:
                raise BenchError(f"PING answered {reply}")
            socks.append(s)
        outbox.put(("ready", os.getpid(), len(socks)))
        release.wait(READY_TIMEOUT_S)
    except BaseException as exc:
        outbox.put(("error", os.getpid(), f"idle DEALERs: {type(exc).__name__}: {exc}"))
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def hold_dealers(url: str, counts: Sequence[int], measure: Callable[[], None]) -> int:
    """sum(counts) idle DEALERs connected to `url` (one process per count); `measure()` runs while
    all of them are connected and have had their PING answered. Returns how many connected."""
    ctx = multiprocessing.get_context("fork")
    outbox = ctx.Queue()
    release = ctx.Event()
    procs = [ctx.Process(target=_dealers, args=(url, c, outbox, release), daemon=True) for c in counts]
    try:
        for p in procs:
            p.start()
        got = _collect(outbox, "ready", len(procs), time.monotonic() + READY_TIMEOUT_S, procs)
        measure()
        release.set()
        for p in procs:
            p.join(RESULT_GRACE_S)
        return int(sum(got))
    finally:
        release.set()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2)
        outbox.cancel_join_thread()
        outbox.close()
