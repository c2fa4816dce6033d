"""32 worker processes x 2,000 mixed operations through one broker, with self-verifying values.

Every value names its key, writer and sequence number, so a response delivered to the wrong
request shows up as a mismatch; each worker also knows exactly what its own keys must hold.
"""

from __future__ import annotations

import multiprocessing
import random
import socket
import time

import pytest

from clientlib import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 32
OPS = 2_000
OWN_KEYS = 40
SHARED_KEYS = 20


def _value(key: str, writer: int, seq: int) -> bytes:
    return f"{key}|{writer}|{seq}".encode()


class _StatsConn:
    """One persistent connection: a fresh one per poll would leave the previous one counted
    in curr_connections until memcached notices it closed."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)

    def curr_connections(self) -> int:
        self.sock.sendall(b"stats\r\n")
        buf = b""
        while not buf.endswith(b"END\r\n"):
            buf += self.sock.recv(65536)
        for line in buf.split(b"\r\n"):
            if line.startswith(b"STAT curr_connections "):
                return int(line.split()[2])
        raise AssertionError("no curr_connections in stats")

    def close(self) -> None:
        self.sock.close()


def _worker(url: str, writer: int, out: "multiprocessing.Queue[tuple[int, int, list[str]]]") -> None:
    rng = random.Random(writer)
    client = Client(url, timeout=10.0)
    expected: dict[str, bytes | None] = {}
    counter_key = f"w{writer}:ctr"
    counter = 0
    mismatches: list[str] = []
    done = 0
    deadline = time.monotonic() + 120

    def own() -> str:
        return f"w{writer}:k{rng.randrange(OWN_KEYS)}"

    def check(key: str, got: bytes | None) -> None:
        if key.startswith("shared:"):
            if got is not None and got.split(b"|", 1)[0] != key.encode():
                mismatches.append(f"{key}: got {got!r}")
        elif got != expected.get(key):
            mismatches.append(f"{key}: expected {expected.get(key)!r}, got {got!r}")

    for seq in range(OPS):
        if time.monotonic() > deadline:
            break
        r = rng.random()
        if r < 0.30:
            key = own()
            value = _value(key, writer, seq)
            assert client.set(key, value) is True
            expected[key] = value
        elif r < 0.40:
            key = f"shared:{rng.randrange(SHARED_KEYS)}"
            client.set(key, _value(key, writer, seq))
        elif r < 0.65:
            key = own() if rng.random() < 0.7 else f"shared:{rng.randrange(SHARED_KEYS)}"
            check(key, client.get(key))
        elif r < 0.80:
            keys = [own() for _ in range(15)] + [f"shared:{rng.randrange(SHARED_KEYS)}" for _ in range(5)]
            keys = list(dict.fromkeys(keys))
            got = client.get_many(keys)
            for key in keys:
                check(key, got.get(key))
        elif r < 0.90:
            key = own()
            client.delete(key)
            expected[key] = None
        else:
            if counter == 0:
                client.set(counter_key, b"0")
            delta = rng.randrange(1, 10)
            counter += delta
            got_n = client.incr(counter_key, delta)
            if got_n != counter:
                mismatches.append(f"{counter_key}: expected {counter}, got {got_n}")
        done += 1
    out.put((writer, done, mismatches[:20]))


@pytest.mark.timeout(300)
def test_32_workers_mixed_ops_zero_mismatches(memcached, broker_factory):
    conn = _StatsConn(memcached.host, memcached.port)
    baseline = conn.curr_connections()
    broker = broker_factory([memcached.address], connections_per_server=2)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(broker.url, w, out)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    peak = 0
    results = []
    deadline = time.monotonic() + 240
    while len(results) < WORKERS and time.monotonic() < deadline:
        peak = max(peak, conn.curr_connections())
        try:
            results.append(out.get(timeout=0.2))
        except Exception:
            pass
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert len(results) == WORKERS, "some workers did not report"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    mismatches = [m for _, _, ms in results for m in ms]
    assert mismatches == []
    assert sum(done for _, done, _ in results) == WORKERS * OPS

    # The broker is the only other client: at most its configured connections (our stats
    # connection is in the baseline).
    conn.close()
    assert 0 < peak - baseline <= 2, (peak, baseline)

    stats = broker.stats()
    assert stats["errors"] == 0 and stats["timeouts"] == 0
    # Counters reconcile; the broker_stats request itself is the one op still open.
    assert stats["ops"] == stats["ok"] + stats["miss"] + stats["errors"] + stats["timeouts"] + 1
    print(f"\nrequests per backend write: {stats['requests_per_write']} "
          f"({stats['requests_written']} requests in {stats['backend_writes']} writes)")
    assert stats["requests_per_write"] > 1
