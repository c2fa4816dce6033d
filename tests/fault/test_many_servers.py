"""Several memcached servers behind one broker, one of them failing: fan-out, deadlines, mark-down,
probes and remap, checked at the wire (per-key results) and through clientlib.Client.

Which server owns a key is taken from pymemcache's HashClient (the broker's default rendezvous
placement must equal it; tests/integration/test_placement.py checks that for 10,000 keys).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from brokerproc import BrokerProcess
from clientlib import Client, transport, wire
from clientlib.errors import BrokerTimeout, MemcacheError, ServerUnavailable
from clientlib.wire import Code, Op
from harness import Memcached, MemcachedFactory
from pool import direct, owners, value_of, wait_for
from timing import EARLY, FAST, FAST_DEADLINE, LATE

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(120)]

_ids = itertools.count(1)


class Wire:
    """A bare DEALER socket speaking the wire schema: per-op results, no clientlib in between."""

    def __init__(self, url: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def call(self, ops: list[list[Any]], timeout_ms: int, wait: float) -> tuple[wire.ReplyFrame, float]:
        rid = next(_ids)
        start = time.monotonic()
        self.sock.send(wire.encode_request(rid, ops, timeout_ms))
        while True:
            left = start + wait - time.monotonic()
            assert left > 0, f"no reply within {wait}s"
            if self.sock.poll(int(left * 1000) + 1):
                reply = wire.decode_reply(self.sock.recv())
                if reply.req_id == rid:
                    return reply, time.monotonic() - start

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def server_stats(broker: BrokerProcess, address: str) -> dict[str, Any]:
    return broker.stats()["servers"][address]


# --- fan-out -----------------------------------------------------------------------------------

FAN_KEYS = [f"fan:{i}" for i in range(100)]


def _fanout_setup(memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess], **config: Any) -> tuple[list[Memcached], BrokerProcess, dict[str, str]]:
    servers = memcached_factory(4)
    addresses = [s.address for s in servers]
    broker = broker_factory(addresses, **config)
    where = owners(addresses, FAN_KEYS)
    per_server = Counter(where.values())
    assert set(per_server) == set(addresses) and min(per_server.values()) >= 10
    client = Client(broker.url, timeout=5.0)
    assert client.set_many({k: value_of(k) for k in FAN_KEYS}) == []
    client.disconnect_all()
    return servers, broker, where


def test_get_many_fans_out_to_four_servers(memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]) -> None:
    servers, broker, where = _fanout_setup(memcached_factory, broker_factory)
    client = Client(broker.url, timeout=5.0)
    assert client.get_many(FAN_KEYS) == {k: value_of(k) for k in FAN_KEYS}
    for s in servers:
        mine = [k for k in FAN_KEYS if where[k] == s.address]
        d = direct(s)
        assert d.get_many(FAN_KEYS) == {k: value_of(k) for k in mine}
        d.close()
    # A connection's opening `stats settings` (the broker's own request) counts in depth until
    # answered, and the loop routes a turn's frames, this stats call's too, before it reads
    # memcached's answers: on a loaded machine the snapshot can see it, so wait for none in flight.
    wait_for(lambda: all(s["depth"] == 0 for s in broker.stats()["servers"].values()), 10, "nothing in flight")
    stats = broker.stats()["servers"]
    assert set(stats) == {s.address for s in servers}
    per_server = Counter(where.values())
    for a, n in per_server.items():
        assert {
            "state", "connections", "depth", "requests", "errors", "timeouts", "ejections", "resets", "latency_avg_us"
        } <= set(stats[a])
        assert stats[a]["connections"] == 2 and stats[a]["depth"] == 0
        # the set and the get of each of its keys, nothing else
        assert stats[a]["requests"] == 2 * n
        assert stats[a]["errors"] == 0 and stats[a]["state"] == "up"
        assert 0 < stats[a]["latency_avg_us"] < 1e6


def test_stopped_server_costs_only_its_own_keys(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP one of four: the others' keys still come back at the deadline, the stopped server's
    keys read TIMEOUT. failure_limit is high so the server stays in rotation throughout."""
    # The broker answers at the deadline and the client waits GRACE (50 ms) more for that answer.
    # A loaded machine once delivered it later than that, and the lenient call below then timed
    # out as a whole ({}): right for the client, but not what is tested here, which is how the
    # broker's per-key answer reaches the caller. So the client waits up to LATE for it.
    monkeypatch.setattr(transport, "GRACE", LATE)
    servers, broker, where = _fanout_setup(memcached_factory, broker_factory, failure_limit=1000, io_timeout_ms=30000)
    stopped = servers[1]
    theirs = {k for k in FAN_KEYS if where[k] == stopped.address}
    others = {k: value_of(k) for k in FAN_KEYS if k not in theirs}
    stopped.pause()
    try:
        w = Wire(broker.url)
        try:
            reply, took = w.call([[Op.GET, k.encode()] for k in FAN_KEYS], timeout_ms=1000, wait=10.0)
        finally:
            w.close()
        assert reply.code == Code.OK
        assert 1.0 - EARLY <= took <= 1.0 + LATE  # answered at the deadline (tests/timing.py)
        for key, result in zip(FAN_KEYS, reply.payload):
            if key in theirs:
                assert result[0] == Code.TIMEOUT, (key, result)
                assert stopped.address in result[1]
            else:
                assert result == [Code.OK, value_of(key), 0], (key, result)

        # Client level: ignore_exc turns the stopped server's keys into misses...
        lenient = Client(broker.url, timeout=1.0, ignore_exc=True)
        start = time.monotonic()
        assert lenient.get_many(FAN_KEYS) == others
        assert time.monotonic() - start <= 1.0 + LATE
        # ...without it, the first failed key raises (pymemcache raises for a failed server too).
        strict = Client(broker.url, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(BrokerTimeout):
            strict.get_many(FAN_KEYS)
        assert time.monotonic() - start <= 1.0 + LATE
        # A key on a healthy server is unaffected meanwhile (a deadline of its own, not the one
        # the stopped server's keys are timed against: this call's speed is not what is tested).
        healthy_key = next(iter(others))
        assert Client(broker.url, timeout=5.0).get(healthy_key) == others[healthy_key]

        s = server_stats(broker, stopped.address)
        assert s["timeouts"] == 3 * len(theirs)
        assert s["errors"] == 3  # one failure per timed-out frame, not one per key
        assert s["ejections"] == 0 and s["state"] == "up"
        for other in servers:
            if other is not stopped:
                o = server_stats(broker, other.address)
                assert o["timeouts"] == 0 and o["errors"] == 0
    finally:
        stopped.resume()
    # The late answers to the timed-out gets are swallowed; fresh gets see every key again.
    client = Client(broker.url, timeout=5.0)
    assert client.get_many(FAN_KEYS) == {k: value_of(k) for k in FAN_KEYS}
    totals = broker.stats()
    assert totals["timeouts"] == 3 * len(theirs)


def test_stopped_server_is_marked_down_then_fails_fast_and_returns(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]
) -> None:
    servers, broker, where = _fanout_setup(
        memcached_factory, broker_factory, failure_limit=2, probe_interval_ms=200, probe_max_interval_ms=500, io_timeout_ms=5000
    )
    stopped = servers[2]
    theirs = {k for k in FAN_KEYS if where[k] == stopped.address}
    others = {k: value_of(k) for k in FAN_KEYS if k not in theirs}
    lenient = Client(broker.url, timeout=1.0, ignore_exc=True)
    strict = Client(broker.url, timeout=1.0)
    stopped.pause()
    try:
        # Two frames time out on it: two consecutive failures, the limit.
        for _ in range(2):
            start = time.monotonic()
            assert lenient.get_many(FAN_KEYS) == others
            assert time.monotonic() - start >= 1.0 - EARLY
        assert server_stats(broker, stopped.address)["state"] in ("down", "probing")

        w = Wire(broker.url)
        try:
            reply, took = w.call([[Op.GET, k.encode()] for k in FAN_KEYS], timeout_ms=int(FAST_DEADLINE * 1000), wait=10.0)
        finally:
            w.close()
        assert took < FAST, "a marked-down server must fail fast, not wait for the deadline"
        for key, result in zip(FAN_KEYS, reply.payload):
            if key in theirs:
                assert result[0] == Code.SERVER_DOWN, (key, result)
            else:
                assert result == [Code.OK, value_of(key), 0], (key, result)
        patient = Client(broker.url, timeout=FAST_DEADLINE)
        start = time.monotonic()
        with pytest.raises(ServerUnavailable):
            patient.get_many(FAN_KEYS)
        assert time.monotonic() - start < FAST
        assert lenient.get_many(FAN_KEYS) == others

        s = server_stats(broker, stopped.address)
        assert s["ejections"] == 1 and s["depth"] <= 1  # at most the probe is in flight
        # The probe connects (the kernel accepts for a stopped process) and waits for `version`.
        wait_for(lambda: server_stats(broker, stopped.address)["state"] == "probing", 3.0, "probing")
        s = server_stats(broker, stopped.address)
        assert s["connections"] == 1 and s["depth"] == 1
    finally:
        stopped.resume()
    # Back within the probe backoff (at most probe_max_interval_ms, 0.5 s) plus LATE for the probe
    # and LATE for the call that saw it.
    back = wait_for(lambda: lenient.get_many(FAN_KEYS) == {k: value_of(k) for k in FAN_KEYS}, 10.0, "stopped server back")
    assert back < 0.5 + 2 * LATE
    s = server_stats(broker, stopped.address)
    assert s["state"] == "up" and s["ejections"] == 1
    assert strict.get_many(FAN_KEYS) == {k: value_of(k) for k in FAN_KEYS}


# --- a server killed under load ----------------------------------------------------------------


@dataclass
class Outcome:
    server: str
    start: float
    took: float
    error: str | None  # exception class name, None for success


@dataclass
class WorkerLog:
    outcomes: list[Outcome] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _load_worker(
    url: str, keys: list[str], where: dict[str, str], dead: str, stop: threading.Event, log: WorkerLog, max_ops: int
) -> None:
    """set then get each of this worker's own keys in turn, until stopped (or max_ops)."""
    client = Client(url, timeout=3.0)
    last: dict[str, bytes] = {}
    try:
        for seq in range(max_ops):
            if stop.is_set():
                return
            key = keys[seq // 2 % len(keys)]
            server = where[key]
            start = time.monotonic()
            try:
                if seq % 2 == 0:
                    v = value_of(key, seq)
                    assert client.set(key, v) is True
                    last[key] = v
                else:
                    got = client.get(key)
                    if got is not None and got.split(b"|")[0] != key.encode():
                        log.mismatches.append(f"{key}: got {got!r}")
                    elif server != dead and got != last.get(key):
                        log.mismatches.append(f"{key}: expected {last.get(key)!r}, got {got!r}")
            except MemcacheError as exc:
                log.outcomes.append(Outcome(server, start, time.monotonic() - start, type(exc).__name__))
                continue
            log.outcomes.append(Outcome(server, start, time.monotonic() - start, None))
    finally:
        client.disconnect_all()


def test_killed_server_under_load(memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]) -> None:
    servers = memcached_factory(3)
    addresses = [s.address for s in servers]
    victim = servers[0]
    broker = broker_factory(addresses, failure_limit=3, probe_interval_ms=200, probe_max_interval_ms=500, timeout_ms=3000)
    workers = 4
    keys = [f"load:{w}:{i}" for w in range(workers) for i in range(30)]
    where = owners(addresses, keys)
    assert set(where.values()) == set(addresses)
    stop = threading.Event()
    logs = [WorkerLog() for _ in range(workers)]
    threads = [
        threading.Thread(
            target=_load_worker,
            args=(broker.url, [k for k in keys if k.startswith(f"load:{w}:")], where, victim.address, stop, logs[w], 40_000),
            daemon=True,
        )
        for w in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        # Progress, not rates (rates belong to bench/): counts of calls, each phase bounded in time.
        wait_for(lambda: all(len(log.outcomes) >= 50 for log in logs), 60.0, "workers under way")
        t_kill = time.monotonic()
        victim.kill()
        wait_for(lambda: server_stats(broker, victim.address)["state"] != "up", 5.0, "victim marked down")
        t_down = time.monotonic()
        wait_for(lambda: sum(1 for log in logs for o in list(log.outcomes) if o.server == victim.address and o.start >= t_down) >= 20,
                 30.0, "calls for the victim's keys while it is down")
        # Probes run every 100 ms: the server may be back in use before restart() returns (it
        # waits for memcached to answer), so "down" ends when the restart begins.
        t_restarting = time.monotonic()
        victim.restart()
        t_restart = time.monotonic()
        wait_for(lambda: server_stats(broker, victim.address)["state"] == "up", 5.0, "victim back up")
        t_up = time.monotonic()
        wait_for(lambda: sum(1 for log in logs for o in list(log.outcomes) if o.server == victim.address and o.start > t_up) > 20,
                 30.0, "calls for the victim's keys after it is back")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)

    outcomes = [o for log in logs for o in log.outcomes]
    mismatches = [m for log in logs for m in log.mismatches]
    assert not mismatches, mismatches[:10]
    healthy = [o for o in outcomes if o.server != victim.address]
    dead = [o for o in outcomes if o.server == victim.address]
    assert len(healthy) >= 100 and len(dead) >= 40, (len(healthy), len(dead))

    # The other two servers never noticed.
    assert [o for o in healthy if o.error] == []

    failures = [o for o in dead if o.error]
    assert failures, "killing a server must fail its requests"
    # Every failure was fast (timeout is 3 s): refused connections and a marked-down server answer
    # at once; nothing waited for its deadline (tests/timing.py: within the timeout less LATE).
    assert max(o.took for o in failures) < 3.0 - LATE, sorted(o.took for o in failures)[-5:]
    # While marked down: only fail-fast SERVER_DOWN, nothing was sent to it.
    while_down = [o for o in dead if t_down <= o.start and o.start + o.took <= t_restarting]
    assert while_down and all(o.error == "ServerUnavailable" for o in while_down), Counter(o.error for o in while_down)
    # Failures happen only between the kill and its return to rotation.
    assert all(o.start + o.took >= t_kill and o.start <= t_up for o in failures)
    # Back in rotation within the probe backoff (<= probe_max_interval_ms, 0.5 s) plus LATE for
    # the probe and LATE for the stats poll that saw it; then healthy.
    assert t_up - t_restart < 0.5 + 2 * LATE
    after = [o for o in dead if o.start > t_up]
    assert len(after) > 20 and not [o for o in after if o.error]

    # The broker's counters agree with what the clients saw.
    stats = broker.stats()
    per = stats["servers"]
    seen = Counter(o.server for o in outcomes)
    for a in addresses[1:]:
        s = per[a]
        assert s["state"] == "up"
        assert s["requests"] == seen[a]  # every client op on it, exactly once
        assert (s["errors"], s["timeouts"], s["ejections"], s["resets"]) == (0, 0, 0, 0)
        assert s["connections"] == 2 and s["latency_avg_us"] > 0
    v = per[victim.address]
    assert v["state"] == "up" and v["ejections"] == 1 and v["timeouts"] == 0
    assert v["errors"] >= 3 and v["resets"] >= 1
    assert v["requests"] >= sum(1 for o in dead if not o.error)
    assert stats["errors"] == len(failures)
    assert stats["timeouts"] == 0


# --- remap -------------------------------------------------------------------------------------


def test_remap_sends_a_dead_servers_keys_to_the_others(memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]) -> None:
    servers = memcached_factory(3)
    addresses = [s.address for s in servers]
    victim = servers[1]
    broker = broker_factory(
        addresses, on_server_down="remap", failure_limit=1, probe_interval_ms=200, probe_max_interval_ms=400
    )
    keys = [f"remap:{i}" for i in range(300)]
    where = owners(addresses, keys)
    survivors = [a for a in addresses if a != victim.address]
    where_without = owners(survivors, keys)
    moved = [k for k in keys if where[k] == victim.address]
    assert moved and all(where_without[k] != victim.address for k in keys)
    # Rendezvous: a server's removal moves only its own keys.
    assert all(where_without[k] == where[k] for k in keys if k not in moved)

    client = Client(broker.url, timeout=2.0)
    assert client.set_many({k: value_of(k) for k in keys}) == []
    victim.kill()
    wait_for(lambda: server_stats(broker, victim.address)["state"] != "up", 5.0, "victim marked down")

    # While it is down its keys live on the survivors, where HashClient without it would put them.
    assert client.set_many({k: value_of(k, 1) for k in moved}) == []
    got = client.get_many(keys)
    assert got == {k: value_of(k, 1) if k in moved else value_of(k) for k in keys}
    for s in servers:
        if s is victim:
            continue
        d = direct(s)
        held = d.get_many(keys)
        d.close()
        assert {k for k, v in held.items() if v == value_of(k, 1)} == {k for k in moved if where_without[k] == s.address}
        assert {k for k, v in held.items() if v == value_of(k)} == {k for k in keys if where[k] == s.address}

    # Restarted (empty), it takes its keys back: they read as misses, not the remapped copies.
    victim.restart()
    wait_for(lambda: server_stats(broker, victim.address)["state"] == "up", 5.0, "victim back up")
    got = client.get_many(keys)
    assert got == {k: value_of(k) for k in keys if k not in moved}
