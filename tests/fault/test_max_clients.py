"""max_clients: the broker's memory bound does not grow with the number of worker sockets that try to
connect (issue 13 item 1, the part test_flood.py could not close: ZeroMQ's receive queues are per
worker socket).

A broker with max_clients = 8 serves 8 well-behaved Clients (one thread each). Then 40 raw DEALER
sockets in 4 processes flood it with large sets and never read. The broker shuts each of them down
as it accepts it (clients_refused), so:
- each connection the broker holds past the 8 served (counted by the kernel, /proc/net/unix or
  /proc/net/tcp, not by the broker) is gone within a loop turn (LIFETIME allows a loaded machine's
  turn: connections accepted during one turn wait in their handshake, no frame, until the next),
  the 8 keep theirs, and the broker's own count never exceeds 8;
- its RSS grows by at most the bound computed from its config (README "Bounded memory"):
  max_buffered_bytes + max_clients x (RCVHWM + 2) x max_message_size(max_frame_bytes) + replies
  + a fixed slack for the heap (the transient connections never get a frame in: the broker shuts
  them down while their handshake waits for its ZAP answer);
- the 8 keep succeeding (every call, each within its deadline plus tests/timing.py's LATE);
- a ninth Client's calls end with BrokerTimeout within their deadline (never a hang), and once one
  of the 8 disconnects it is served.

Without the cap (max_clients far above 48) the broker holds all 48 connections and their queues:
the connection check fails (all 40 held for the whole flood), and the RSS one with these frame sizes too (+120 MiB against
a bound of 99 MiB in one run; see the line printed with -s).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from typing import Any

import pytest

from bench.procs import socket_inodes
from broker import front
from brokerproc import BrokerProcess
from clientlib import AsyncClient, Client
from clientlib.errors import BrokerTimeout, MemcacheError
from flood import flood
from harness import free_port, rss_bytes
from pool import direct, wait_for
from timing import LATE

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20
MAX_CLIENTS = 8
FLOODERS = 40
PROCS = 4
MAX_FRAME = 1 * MiB
VALUE = 900_000  # close to max_frame_bytes, and within memcached's default 1 MiB item size
BUDGET = 16 * MiB  # max_buffered_bytes
CALL_TIMEOUT = 3.0
FLOOD_SECONDS = 6.0
# Connections the broker may hold past max_clients for a moment: those ZeroMQ's I/O thread accepted
# since the loop last took its accept events (at the latest when their ZAP request arrives), each
# shut down in its handshake, so the connects that arrive within one loop turn. When the flood
# starts, all 40 sockets connect at once and may all be held for that turn (measured: up to 19
# past max_clients); after BURST_SECONDS they reconnect at random moments, every 100-200 ms
# (ZeroMQ's default interval), a few hundred connects a second. How many wait at once is the
# connect rate times the loop's turn, which a loaded machine stretches: medians of 19 and 26 held
# (11 and 18 past max_clients) were seen in full suite runs, and once a loop kept off the CPU for
# 200 ms let all 40 wait at once (RSS +2.2 MiB: no frame gets in). So the count is not what the test
# checks. It checks how long each connection past the 8 served lives (its socket inode, from its
# first sample to its last): each is shut down within a loop turn, where without the cap all 40
# stay for the whole flood. LIFETIME is that turn with room for a loaded machine, a third of the
# flood. The broker's own count (connected_workers) is checked against max_clients.
BURST_SECONDS = 1.0
LIFETIME = FLOOD_SECONDS / 3
# The broker's own heap churn (Python objects, allocator fragmentation) over its baseline, as in
# test_flood.py.
FIXED_SLACK = 48 * MiB
# A set's reply is a few dozen bytes; SNDHWM of them may wait per connection (broker/front.py).
REPLY_BYTES = 64
ABORT_RSS = 2048 * MiB
# What a connection in its handshake costs the broker's process: ZeroMQ's engine with its 8 KiB
# batch buffers, a session, the greeting (generous).
HANDSHAKE_BYTES = 64 << 10


def connection_inodes(pid: int, url: str) -> set[str]:
    """The worker connections process `pid` (the broker) holds on `url`, as the kernel counts them
    (their socket inodes): its sockets that are, for ipc, connected unix sockets named by the path
    (/proc/net/unix, state 03), for tcp, established sockets whose local port is the port
    (/proc/net/tcp, state 01). Connections still in the listen backlog are not the broker's yet
    and are not counted."""
    mine = socket_inodes([pid])
    found = set()
    if url.startswith("ipc://"):
        path = url[len("ipc://"):]
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and parts[5] == "03" and parts[6] in mine:
                    found.add(parts[6])
        return found
    port = int(url.rpartition(":")[2])
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[1].rpartition(":")[2], 16) == port and parts[3] == "01" and parts[9] in mine:
                found.add(parts[9])
    return found


def connections_on(pid: int, url: str) -> int:
    return len(connection_inodes(pid, url))


def memory_bound(max_clients: int, transient: int) -> int:
    """README "Bounded memory", from the broker's config: its budget, plus per served connection
    ZeroMQ's receive slack of (RCVHWM + 2) frames of max_message_size(max_frame_bytes) and SNDHWM
    small replies, plus per connection not yet shut down ZeroMQ's handshake state (no frame: its
    handshake waits for the ZAP answer, which comes after the shutdown), plus the fixed slack."""
    frame = front.max_message_size(MAX_FRAME)
    served = BUDGET + front.receive_slack(max_clients, frame) + max_clients * front.SNDHWM * REPLY_BYTES
    return served + transient * HANDSHAKE_BYTES + FIXED_SLACK


class Sampler(threading.Thread):
    """Peak broker RSS and peak connections held, every 10 ms."""

    def __init__(self, pid: int, url: str, stop: Any) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.url = url
        self.stop_flood = stop
        self.peak_rss = 0
        self.peak_conns = 0  # after the first second
        self.burst_conns = 0  # in the first second, when every flooding socket connects at once
        self.steady: list[int] = []  # the samples after the first second
        # Each connection's socket inode: when it was first and last seen held (monotonic seconds).
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.is_set():
            try:
                r = rss_bytes(self.pid)
                inodes = connection_inodes(self.pid, self.url)
            except (OSError, AssertionError):
                return
            now = time.monotonic()
            for inode in inodes:
                self.first_seen.setdefault(inode, now)
                self.last_seen[inode] = now
            c = len(inodes)
            self.peak_rss = max(self.peak_rss, r)
            if time.monotonic() - start < BURST_SECONDS:
                self.burst_conns = max(self.burst_conns, c)
            else:
                self.peak_conns = max(self.peak_conns, c)
                self.steady.append(c)
            if r > ABORT_RSS:
                self.stop_flood.set()
            time.sleep(0.01)


    def lifetimes(self, but: set[str]) -> list[float]:
        """How long each connection not in `but` was seen held, in seconds, longest first."""
        return sorted((self.last_seen[i] - self.first_seen[i] for i in self.first_seen if i not in but), reverse=True)


class Good(threading.Thread):
    """A well-behaved worker on its own socket (a Client's socket belongs to the thread that uses
    it): warms up, waits for `go`, then sets and gets its own keys, each checked, until `stop`;
    then keeps its connection until `release`."""

    def __init__(self, url: str, n: int, go: threading.Event, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.n = n
        self.go = go
        self.stop = stop
        self.ready = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.served_seen: list[int] = []  # connected_workers, as the broker counts, now and then
        self.warm_error: str | None = None
        self.failures: list[str] = []
        self.latencies: list[float] = []

    def run(self) -> None:
        client = Client(self.url, timeout=CALL_TIMEOUT)
        try:
            try:
                assert client.set(f"good:{self.n}:warm", b"1") is True
            except (MemcacheError, AssertionError) as exc:
                self.warm_error = repr(exc)
            self.ready.set()
            if not self.go.wait(60):
                return
            i = 0
            while not self.stop.is_set() and i < 100_000:
                key = f"good:{self.n}:{i % 20}"
                value = f"{key}|{i}".encode()
                t = time.monotonic()
                try:
                    ok = client.set(key, value)
                    got = client.get(key)
                    if ok is not True or got != value:
                        self.failures.append(f"call {i}: set {ok!r}, get {got!r}")
                except MemcacheError as exc:
                    self.failures.append(f"call {i}: {type(exc).__name__}: {exc}")
                self.latencies.append(time.monotonic() - t)
                if self.n == 0 and i % 5 == 0:
                    try:
                        self.served_seen.append(client.broker_stats()["connected_workers"])
                    except MemcacheError as exc:
                        self.failures.append(f"stats {i}: {type(exc).__name__}: {exc}")
                self.calls += 1
                i += 1
                time.sleep(0.01)
            self.release.wait(60)
        finally:
            client.disconnect_all()


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))] if s else 0.0


@pytest.fixture(params=["ipc", "tcp"])
def capped(request, memcached):
    """A broker with max_clients = MAX_CLIENTS, and the address the workers use: its ipc socket, or
    a loopback TCP port it listens on beside it (max_clients counts both)."""
    broker = BrokerProcess(
        [memcached.address], max_clients=MAX_CLIENTS, max_frame_bytes=MAX_FRAME, max_buffered_bytes=BUDGET,
        timeout_ms=int(CALL_TIMEOUT * 1000),
    )
    url = broker.url
    if request.param == "tcp":
        url = f"tcp://127.0.0.1:{free_port()}"
        broker.write_config(listen=[broker.url, url])
    try:
        broker.start()
        yield broker, url
    finally:
        broker.cleanup()


# serial: the 8 good workers' calls are checked against their deadline beside a flood this test
# makes (scripts/test runs it alone; beside other workers' tests they once timed out).
@pytest.mark.serial
def test_max_clients_bounds_connections_and_memory_under_a_flood_of_sockets(memcached, capped):
    broker, url = capped
    go, stop_good = threading.Event(), threading.Event()
    workers = [Good(url, i, go, stop_good) for i in range(MAX_CLIENTS)]
    extra = Client(url, timeout=1.0)
    flood_procs: list[Any] = []
    try:
        for w in workers:
            w.start()
        for w in workers:
            assert w.ready.wait(30) and w.warm_error is None, w.warm_error
        wait_for(lambda: connections_on(broker.pid, url) == MAX_CLIENTS, 10, "the 8 served")
        served = connection_inodes(broker.pid, url)
        # Full: a ninth Client is refused, and its call ends at its deadline, never hangs.
        t = time.monotonic()
        with pytest.raises(BrokerTimeout):
            extra.get("good:0:warm")
        assert time.monotonic() - t <= 1.0 + LATE
        baseline = rss_bytes(broker.pid)

        mp = multiprocessing.get_context("fork")
        stop_flood = mp.Event()
        sent = mp.Value("q", 0)
        flood_procs = [
            mp.Process(target=flood, args=(url, FLOODERS // PROCS, FLOOD_SECONDS, stop_flood, sent, VALUE))
            for _ in range(PROCS)
        ]
        sampler = Sampler(broker.pid, url, stop_flood)
        sampler.start()
        for p in flood_procs:
            p.start()
        go.set()
        # Meanwhile the ninth keeps trying: every call ends with BrokerTimeout within its deadline.
        extra_outcomes: list[tuple[str, float]] = []
        end = time.monotonic() + FLOOD_SECONDS - 1.0
        while time.monotonic() < end and len(extra_outcomes) < 20:
            t = time.monotonic()
            try:
                extra.get("good:0:warm")
                extra_outcomes.append(("served", time.monotonic() - t))
            except MemcacheError as exc:
                extra_outcomes.append((f"{type(exc).__name__}: {exc}", time.monotonic() - t))
        time.sleep(max(0.0, end - time.monotonic()))  # the flood lasts its time whatever the ninth got
        stop_good.set()
        stop_flood.set()
        for p in flood_procs:
            p.join(15)
        time.sleep(0.3)
        sampler.done.set()
        sampler.join()

        growth = sampler.peak_rss - baseline
        bound = memory_bound(MAX_CLIENTS, FLOODERS)
        calls = sum(w.calls for w in workers)
        failures = [f for w in workers for f in w.failures]
        latencies = [x for w in workers for x in w.latencies]
        print(
            f"\nmax_clients {MAX_CLIENTS}: {FLOODERS} flooding sockets queued {sent.value} frames of {VALUE} B; "
            f"connections held: first second {sampler.burst_conns}, then peak {sampler.peak_conns}, median "
            f"{sorted(sampler.steady)[len(sampler.steady) // 2] if sampler.steady else None} (not checked: it is "
            f"the connect rate times the loop's turn); served as the broker counts: at most "
            f"{max(workers[0].served_seen, default=None)}; broker RSS "
            f"baseline {baseline / MiB:.1f} MiB, peak {sampler.peak_rss / MiB:.1f} MiB (+{growth / MiB:.1f} MiB, "
            f"bound {bound / MiB:.1f} MiB); good workers: {calls} calls, {len(failures)} failed, p99 "
            f"{p99(latencies) * 1000:.0f} ms, worst {max(latencies, default=0) * 1000:.0f} ms; the ninth: "
            f"{len(extra_outcomes)} calls, outcomes {sorted({o.split(':')[0] for o, _ in extra_outcomes})}, worst "
            f"{max((d for _, d in extra_outcomes), default=0) * 1000:.0f} ms"
        )
        lived = sampler.lifetimes(but=served)
        print(
            f"connections past the 8 served: {len(lived)} seen, longest held {lived[0] if lived else 0:.2f} s "
            f"(allowed {LIFETIME:.1f} s), 10 longest {[round(x, 2) for x in lived[:10]]}"
        )
        assert broker.running, broker.log()
        # (Most are shut down before a 10 ms sample sees them; clients_refused, checked below,
        # counts them all.)
        assert not lived or lived[0] <= LIFETIME, lived[:10]
        # The 8 served kept their connections throughout.
        assert served <= set(sampler.last_seen) and all(
            sampler.last_seen[i] - sampler.first_seen[i] >= FLOOD_SECONDS - 2.0 for i in served
        ), {i: sampler.last_seen.get(i, 0) - sampler.first_seen.get(i, 0) for i in served}
        served_seen = workers[0].served_seen
        assert served_seen and max(served_seen) <= MAX_CLIENTS, served_seen
        # Not one flood frame got in: a refused connection never finishes its handshake.
        mc = direct(memcached)
        try:
            assert mc.get_many([f"flood:{i}" for i in range(FLOODERS // PROCS)]) == {}
        finally:
            mc.close()
        assert growth <= bound, f"RSS grew {growth / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
        assert calls >= MAX_CLIENTS * 5 and not failures, failures[:5]
        assert max(latencies) <= CALL_TIMEOUT + LATE
        assert extra_outcomes and all(o.startswith("BrokerTimeout") for o, _ in extra_outcomes), extra_outcomes[:3]
        assert max(d for _, d in extra_outcomes) <= 1.0 + LATE
        # At least one of its timeouts says why (the hint needs the connection down at the deadline,
        # which a refused socket is nearly all the time).
        assert any("max_clients" in o for o, _ in extra_outcomes), extra_outcomes[:3]

        # A slot frees: the ninth is served (its next call asks for a connection at once).
        workers[-1].release.set()
        workers[-1].join(10)
        # The released one's connection goes. (Not "7 held": the ninth's reconnect, accepted and
        # waiting for its ZAP answer, may be counted already and take the slot at once.)
        wait_for(lambda: not served <= connection_inodes(broker.pid, url), 10, "a slot freed")
        extra.timeout = CALL_TIMEOUT  # to be served is the point here; the time is checked below
        t = time.monotonic()
        try:
            assert extra.get("good:0:warm") == b"1"
        except MemcacheError as exc:
            raise AssertionError(f"not served once a slot freed: {exc}\n{broker.log()}") from exc
        assert time.monotonic() - t <= 1.0 + LATE
        stats = extra.broker_stats()
        print(
            f"clients_refused {stats['clients_refused']}, connected_workers {stats['connected_workers']}, "
            f"frames the broker received {stats['frames']} (the 8's calls: {calls * 2})"
        )
        # Every flooding socket was refused at least once (clientlib's checks while it waits for
        # a connection, each a connection too, add to the count).
        assert stats["clients_refused"] >= FLOODERS
        assert stats["connected_workers"] == MAX_CLIENTS
        # The frames the broker received: the 8's warm-up sets and calls (a set and a get each, and
        # the first one's stats), the ninth's get and stats, and the start's ping(s): none from a
        # refused socket.
        known = 2 * calls + len(workers[0].served_seen) + MAX_CLIENTS + 2
        assert known < stats["frames"] <= known + 5, (stats["frames"], known)
    finally:
        go.set()
        stop_good.set()
        for w in workers:
            w.release.set()
        for p in flood_procs:
            if p.is_alive():
                p.kill()
            p.join()
        for w in workers:
            w.join(10)
        extra.disconnect_all()


def test_max_clients_is_reloadable_and_an_async_client_refused_times_out_then_is_served(memcached, broker_factory):
    """SIGHUP with a higher max_clients serves a waiting Client; an AsyncClient past the cap gets
    BrokerTimeout within its deadline (never a hang), and is served once a slot frees."""
    broker: BrokerProcess = broker_factory([memcached.address], max_clients=1)
    holder = Client(broker.url, timeout=CALL_TIMEOUT)
    waiting = Client(broker.url, timeout=0.5)
    try:
        assert holder.set("cap:k", b"v") is True
        with pytest.raises(BrokerTimeout):
            waiting.get("cap:k")
        # Refused, its socket goes on retrying in the background: left open, it races the
        # AsyncClient for the one slot the holder frees below (and won that race now and then on a
        # loaded machine, so the AsyncClient was never served). Its next call opens a new socket.
        waiting.disconnect_all()

        async def refused_then_served() -> tuple[float, str, bytes | None]:
            c = AsyncClient(broker.url, timeout=0.5)
            try:
                t = time.monotonic()
                try:
                    await c.get("cap:k")
                    raise AssertionError("an AsyncClient past max_clients was served")
                except BrokerTimeout as exc:
                    took, message = time.monotonic() - t, str(exc)
                holder.disconnect_all()  # a slot frees
                got = None
                for _ in range(10):  # its next calls ask for a connection at once
                    try:
                        got = await c.get("cap:k")
                        break
                    except BrokerTimeout:
                        await asyncio.sleep(0.1)
                return took, message, got
            finally:
                await c.close()

        took, message, got = asyncio.run(refused_then_served())
        assert took <= 0.5 + LATE, took
        print(f"\nAsyncClient past max_clients: {took * 1000:.0f} ms, {message}")
        assert got == b"v"
        # The AsyncClient holds the one slot now; raising the cap serves the waiting Client.
        broker.write_config(max_clients=2)
        broker.reload()
        wait_for(lambda: "config reloaded" in broker.log(), 10, "the reload")
        waiting.timeout = CALL_TIMEOUT  # a new socket's handshake, on a loaded machine
        assert waiting.get("cap:k") == b"v"
        stats = waiting.broker_stats()
        assert stats["max_clients"] == 2 and stats["clients_refused"] >= 2
    finally:
        holder.disconnect_all()
        waiting.disconnect_all()
