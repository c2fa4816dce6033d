"""Overload: a broker with tiny bounds in front of a server that stopped answering.

Requests past a bound are refused at once with "overloaded" (nothing queued, nothing sent), the
broker's memory stays flat however hard it is flooded, and workers whose keys live on a healthy
server keep being served by the same broker throughout.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from typing import Any

import pytest
import zmq

from clientlib import AsyncClient, Client
from clientlib.errors import BrokerOverloaded, BrokerTimeout, MemcacheError
from clientlib.wire import Code, Op, decode_reply, encode_request
from fakemc import keys_held_by, pause_fully
from harness import Memcached, rss_bytes
from timing import FAST_DEADLINE, LATE

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(120)]

# Tiny bounds, consistent with config.py's rules: per connection <= per server <= total, and
# max_buffered_bytes >= max_frame_bytes >= max_value_bytes + 4096. The total leaves room for a
# second server once the stuck one has used up its share.
BOUNDS: dict[str, Any] = {
    "connections_per_server": 2,
    "max_inflight_per_connection": 64,
    "max_inflight_per_server": 128,
    "max_inflight_total": 256,
    "max_frame_bytes": 65536,
    "max_value_bytes": 32768,
    "max_buffered_bytes": 1 << 20,
    # Keep the stuck server up and its connections open: this is about bounds, not mark-down.
    "failure_limit": 1000,
    "io_timeout_ms": 60000,
}
FLOOD_PROCS = 4
FLOOD_FRAMES = 40
FLOOD_KEYS = 400
# An overloaded answer comes back without waiting for the call's deadline (tests/timing.py: the
# deadline less LATE, so a loaded machine's pauses do not fail it and a waited call cannot pass).
# With a 3 s deadline that left 1.5 s, and 300 refusals took 2.1-2.2 s beside another suite.
CALL_TIMEOUT = FAST_DEADLINE
FAST = FAST_DEADLINE - LATE
RSS_GROWTH_LIMIT = 100 << 20
# The 300 large sets start their clocks together, so the last refusal's time includes the broker
# reading the ~19 MB sent before it (RCVHWM 2): 2.1-2.2 s beside another suite here, more on a
# slower machine. A deadline this long leaves room for that; a set that waited it out still fails.
SET_FLOOD_DEADLINE = 15.0


def value_of(key: str) -> bytes:
    return b"value-of:" + key.encode()


def split_keys(client: Client, stuck: Memcached, n: int) -> tuple[list[str], list[str]]:
    keys = [f"ov{i}" for i in range(n)]
    # Small batches: a frame of more ops than the per-connection bound would itself be refused.
    for start in range(0, n, 50):
        assert client.set_many({k: value_of(k) for k in keys[start : start + 50]}) == []
    on_stuck = keys_held_by(stuck, keys)
    return [k for k in keys if k in on_stuck], [k for k in keys if k not in on_stuck]


def _flood(url: str, keys: list[str], out: "multiprocessing.Queue[list[tuple[str, float]]]") -> None:
    """One flooding worker: get frames of many keys, sent raw so each key's result is visible."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    seen: list[tuple[str, float]] = []
    stop_at = time.monotonic() + 40
    try:
        for i in range(FLOOD_FRAMES):
            if time.monotonic() > stop_at:
                break
            ops = [[Op.GET, keys[(i * 37 + j) % len(keys)].encode()] for j in range(FLOOD_KEYS)]
            start = time.monotonic()
            sock.send(encode_request(i, ops, int(CALL_TIMEOUT * 1000)))
            if not sock.poll(int(CALL_TIMEOUT * 1000) + 2000):
                seen.append(("no reply", time.monotonic() - start))
                continue
            reply = decode_reply(sock.recv())
            elapsed = time.monotonic() - start
            if reply.req_id != i or reply.code != Code.OK:
                seen.append((f"frame {reply.req_id} {reply.code!r}", elapsed))
                continue
            codes = {r[0] for r in reply.payload}
            if codes == {Code.OVERLOADED}:
                kind = "refused"
            elif codes <= {Code.OVERLOADED, Code.TIMEOUT}:
                kind = "admitted"  # some keys went out and waited for the deadline
            else:
                kind = f"codes {sorted(codes)}"
            seen.append((kind, elapsed))
    finally:
        sock.close(linger=0)
        ctx.term()
    out.put(seen)


class Healthy(threading.Thread):
    """A worker whose keys live on the healthy server: reads and writes them in a loop."""

    def __init__(self, url: str, keys: list[str], broker_pid: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(url, timeout=CALL_TIMEOUT)
        self.keys = keys
        self.broker_pid = broker_pid
        self.stop = threading.Event()
        self.calls = 0
        self.failures: list[str] = []
        self.max_latency = 0.0
        self.max_rss = 0

    def run(self) -> None:
        deadline = time.monotonic() + 60
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline and self.calls < 20_000:
            key = self.keys[i % len(self.keys)]
            i += 1
            start = time.monotonic()
            try:
                if i % 5 == 0:
                    ok = self.client.set(key, value_of(key)) is True
                else:
                    ok = self.client.get(key) == value_of(key)
                if not ok:
                    self.failures.append(f"{key}: wrong answer")
            except MemcacheError as exc:
                self.failures.append(f"{key}: {exc!r}")
            self.max_latency = max(self.max_latency, time.monotonic() - start)
            self.calls += 1
            if i % 50 == 0:
                self.max_rss = max(self.max_rss, rss_bytes(self.broker_pid))
            time.sleep(0.002)


def test_flooded_stuck_server_answers_overloaded_fast_and_spares_the_healthy_one(memcached_factory, broker_factory):
    stuck, healthy = memcached_factory(2)
    broker = broker_factory([stuck.address, healthy.address], **BOUNDS)
    setup = Client(broker.url, timeout=5.0)
    on_stuck, on_healthy = split_keys(setup, stuck, 1500)
    assert len(on_stuck) > FLOOD_KEYS and len(on_healthy) > 100
    rss_before = rss_bytes(broker.pid)

    pause_fully(stuck)
    try:
        ctx = multiprocessing.get_context("fork")
        out: "multiprocessing.Queue[list[tuple[str, float]]]" = ctx.Queue()
        procs = [ctx.Process(target=_flood, args=(broker.url, on_stuck, out)) for _ in range(FLOOD_PROCS)]
        for p in procs:
            p.start()
        worker = Healthy(broker.url, on_healthy, broker.pid)
        worker.start()
        try:
            seen = [out.get(timeout=90) for _ in procs]
        finally:
            worker.stop.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
            worker.join(10)
        assert all(p.exitcode == 0 for p in procs)
        during = broker.stats()
        rss_after = rss_bytes(broker.pid)
    finally:
        stuck.resume()

    calls = [c for per_proc in seen for c in per_proc]
    kinds = {kind for kind, _ in calls}
    assert len(calls) == FLOOD_PROCS * FLOOD_FRAMES
    # A paused server answers nothing: each key either went out (and timed out) or was refused.
    assert kinds <= {"refused", "admitted"}, kinds
    # A frame replies once: one with keys in flight waits for the deadline. Every frame refused
    # outright must be answered at once.
    overloaded = [t for kind, t in calls if kind == "refused"]
    assert len(overloaded) >= len(calls) * 3 // 4, f"only {len(overloaded)} of {len(calls)} refused"
    assert max(overloaded) < FAST, f"slowest overloaded answer took {max(overloaded):.3f}s"

    stuck_stats = during["servers"][stuck.address]
    assert stuck_stats["depth"] <= BOUNDS["max_inflight_per_server"]
    assert during["inflight"] <= BOUNDS["max_inflight_total"]
    assert during["overloaded"] >= len(overloaded) * FLOOD_KEYS // 2

    assert max(worker.max_rss, rss_after) - rss_before < RSS_GROWTH_LIMIT
    assert worker.failures == [], worker.failures[:5]
    assert worker.calls >= 50, f"the healthy worker made only {worker.calls} calls"
    assert worker.max_latency < FAST, f"the healthy worker waited {worker.max_latency:.3f}s"

    # The stuck server resumed: its late answers are swallowed and it serves correctly again.
    sample = on_stuck[:50]
    deadline = time.monotonic() + 10
    while True:
        try:
            got = setup.get_many(sample)
            break
        except MemcacheError:
            assert time.monotonic() < deadline, "the stuck server never recovered"
            time.sleep(0.1)
    assert got == {k: value_of(k) for k in sample}


def test_buffered_bytes_bound_refuses_writes_to_a_stuck_server(memcached, broker_factory):
    # Large sets to a paused server: once the kernel's socket buffers are full, bytes pile up in
    # the broker; past max_buffered_bytes it must refuse instead of buffering more.
    limit = 1 << 20
    broker = broker_factory(
        [memcached.address],
        max_frame_bytes=131072, max_value_bytes=100_000, max_buffered_bytes=limit,
        failure_limit=1000, io_timeout_ms=60000,
    )
    value = b"x" * 65536
    sets = 300  # ~19 MB, far more than the socket buffers and the bound together
    assert Client(broker.url, timeout=3.0).set("probe", b"1") is True
    rss_before = rss_bytes(broker.pid)

    async def flood() -> list[tuple[object, float]]:
        client = AsyncClient(broker.url, timeout=SET_FLOOD_DEADLINE, max_frame_bytes=131072)

        async def one(i: int) -> tuple[object, float]:
            start = time.monotonic()
            try:
                out: object = await client.set(f"big{i}", value)
            except MemcacheError as exc:
                out = exc
            return out, time.monotonic() - start

        try:
            return await asyncio.gather(*(one(i) for i in range(sets)))
        finally:
            await client.disconnect_all()

    pause_fully(memcached)
    try:
        outcomes = asyncio.run(flood())
        stats = broker.stats()
        rss_after = rss_bytes(broker.pid)
    finally:
        memcached.resume()

    refused = [t for o, t in outcomes if isinstance(o, BrokerOverloaded)]
    others = [o for o, _ in outcomes if not isinstance(o, BrokerOverloaded)]
    assert refused, "no set was refused"
    assert all(isinstance(o, BrokerTimeout) for o in others), {type(o).__name__ for o in others}
    assert max(refused) < SET_FLOOD_DEADLINE - LATE, f"slowest refusal took {max(refused):.3f}s"
    # The check runs before each push, so the bound can be passed by at most one request.
    assert stats["buffered_bytes"] <= limit + len(value) + 1024
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    # Once memcached has drained the backlog, writes are accepted again.
    client = Client(broker.url, timeout=5.0)
    deadline = time.monotonic() + 20
    while True:
        try:
            assert client.set("after", b"ok") is True
            break
        except BrokerOverloaded:
            assert time.monotonic() < deadline, "the buffer never drained"
            time.sleep(0.1)
    assert client.get("after") == b"ok"
