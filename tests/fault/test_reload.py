"""Reloading the server list (SIGHUP) under load: nothing lost, nothing misdelivered, requests in
flight on a removed server finish, and an invalid config is rejected while the old one serves.

Values are self-verifying (they name their key and the writer's sequence number) and each worker
owns its keys, so it knows exactly what a read must return.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from brokerproc import BrokerProcess
from clientlib import Client
from clientlib.errors import MemcacheError
from harness import MemcachedFactory
from pool import connect, direct, owners, value_of, wait_for

# Calls each worker completes before and after a reload (a count, not a rate).
PROGRESS = 50

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(120)]


def servers_in_stats(broker: BrokerProcess) -> set[str]:
    return set(broker.stats()["servers"])


@dataclass
class Log:
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _worker(url: str, keys: list[str], moved: set[str], stop: threading.Event, log: Log, max_ops: int) -> None:
    """set then get each own key; a read returns the last value written, or (only for a key whose
    server changed in the reload) a miss."""
    client = Client(url, timeout=5.0)
    last: dict[str, bytes] = {}
    try:
        for seq in range(max_ops):
            if stop.is_set():
                return
            key = keys[seq // 2 % len(keys)]
            log.ops += 1
            try:
                if seq % 2 == 0:
                    v = value_of(key, seq)
                    if client.set(key, v) is not True:
                        log.errors.append(f"set {key}: not stored")
                    last[key] = v
                else:
                    got = client.get(key)
                    if got is None:
                        if key not in moved:
                            log.mismatches.append(f"{key}: miss, but its server did not change")
                    elif got != last.get(key):
                        log.mismatches.append(f"{key}: expected {last.get(key)!r}, got {got!r}")
            except MemcacheError as exc:
                log.errors.append(f"{key}: {type(exc).__name__}: {exc}")
    finally:
        client.disconnect_all()


def test_reload_adds_and_removes_servers_under_load(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]
) -> None:
    a, b, c = memcached_factory(3)
    broker = broker_factory([a.address, b.address])
    workers = 4
    keys = {w: [f"rl:{w}:{i}" for i in range(40)] for w in range(workers)}
    every = [k for ks in keys.values() for k in ks]
    before = owners([a.address, b.address], every)
    after = owners([b.address, c.address], every)
    moved = {k for k in every if before[k] != after[k]}
    # the reload moves keys every which way: A->B, A->C, B->C; B->B stays
    assert {(before[k], after[k]) for k in every} == {
        (a.address, b.address), (a.address, c.address), (b.address, c.address), (b.address, b.address)
    }

    stop = threading.Event()
    logs = [Log() for _ in range(workers)]
    threads = [
        threading.Thread(target=_worker, args=(broker.url, keys[w], moved, stop, logs[w], 50_000), daemon=True)
        for w in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        # Progress, not a rate (rates belong to bench/): every worker is under way before the
        # reload, and every worker completes PROGRESS more calls after it was applied.
        wait_for(lambda: all(log.ops >= PROGRESS for log in logs), 60.0, "workers under way")
        ops_before = sum(log.ops for log in logs)
        broker.write_config(servers=[b.address, c.address])
        broker.reload()
        wait_for(lambda: servers_in_stats(broker) == {b.address, c.address}, 5.0, "reload applied")
        applied = [log.ops for log in logs]
        wait_for(lambda: all(log.ops >= n + PROGRESS for log, n in zip(logs, applied)), 60.0, "workers after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    errors = [e for log in logs for e in log.errors]
    mismatches = [m for log in logs for m in log.mismatches]
    assert not errors, errors[:10]
    assert not mismatches, mismatches[:10]
    total = sum(log.ops for log in logs)
    assert ops_before >= workers * PROGRESS and total - ops_before >= workers * PROGRESS, (ops_before, total)

    # The retired server got nothing more once the reload was applied: writes all land on B and C,
    # on exactly the server HashClient([B, C]) names.
    a_sets = int(a.stats()["cmd_set"])
    client = Client(broker.url, timeout=5.0)
    assert client.set_many({k: value_of(k, -1) for k in every}) == []
    assert int(a.stats()["cmd_set"]) == a_sets
    for server in (b, c):
        d = direct(server)
        held = {k for k, v in d.get_many(every).items() if v == value_of(k, -1)}
        d.close()
        assert held == {k for k in every if after[k] == server.address}

    stats = broker.stats()
    assert stats["errors"] == 0 and stats["timeouts"] == 0
    assert set(stats["servers"]) == {b.address, c.address}
    assert "removed: finishing" in broker.log() and f"{a.address} closed" in broker.log()


def test_requests_in_flight_on_a_removed_server_finish(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]
) -> None:
    """Requests already sent to a server that a reload removes get their real answers."""
    a, b = memcached_factory(2)
    broker = broker_factory([a.address, b.address], io_timeout_ms=20000)
    keys = [f"fin:{i}" for i in range(200)]
    on_a = [k for k, s in owners([a.address, b.address], keys).items() if s == a.address]
    assert len(on_a) > 30
    client = Client(broker.url, timeout=10.0)
    assert client.set_many({k: value_of(k, 0) for k in keys}) == []

    results: dict[str, Any] = {}

    def reader() -> None:
        try:
            results["get_many"] = Client(broker.url, timeout=10.0).get_many(on_a[1:])
        except Exception as exc:  # recorded, asserted below
            results["get_many"] = exc

    def writer() -> None:
        # a key the reader does not read: the two threads' requests reach A in either order
        try:
            results["set"] = Client(broker.url, timeout=10.0).set(on_a[0], value_of(on_a[0], 1))
        except Exception as exc:
            results["set"] = exc

    a.pause()
    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    try:
        for t in threads:
            t.start()
        # Bounds on progress, not assertions of speed: generous for a loaded machine.
        wait_for(lambda: broker.stats()["servers"][a.address]["depth"] >= len(on_a), 30.0, "requests in flight on A")
        broker.write_config(servers=[b.address])
        broker.reload()
        wait_for(lambda: servers_in_stats(broker) == {b.address}, 30.0, "reload applied")
        time.sleep(0.2)
        assert all(t.is_alive() for t in threads)  # still waiting for the stopped server
    finally:
        a.resume()
    for t in threads:
        t.join(15)
    assert results["get_many"] == {k: value_of(k, 0) for k in on_a[1:]}
    assert results["set"] is True
    d = direct(a)
    assert d.get(on_a[0]) == value_of(on_a[0], 1)  # the in-flight write reached A
    d.close()
    wait_for(lambda: f"{a.address} closed" in broker.log(), 5.0, "retired server closed")
    # A's keys now live on B: misses there, and new writes go to B.
    assert client.get_many(on_a) == {}
    assert client.set(on_a[0], value_of(on_a[0], 2)) is True
    d = direct(b)
    assert d.get(on_a[0]) == value_of(on_a[0], 2)
    d.close()
    stats = broker.stats()
    assert stats["errors"] == 0 and stats["timeouts"] == 0


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param({"servers": []}, "servers: at least one server is required", id="no-servers"),
        pytest.param({"hash": "md5"}, "hash: 'md5' is not one of", id="bad-hash"),
        pytest.param({"failure_limit": 0}, "failure_limit: 0 is out of range", id="out-of-range"),
        pytest.param(None, "not valid TOML", id="broken-toml"),
    ],
)
def test_invalid_config_is_rejected_and_the_old_one_keeps_serving(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess], bad: dict[str, Any] | None, reason: str
) -> None:
    a, b = memcached_factory(2)
    broker = broker_factory([a.address])
    good_text = broker.config_path.read_text()
    stop = threading.Event()
    log = Log()
    keys = [f"inv:{i}" for i in range(20)]
    t = threading.Thread(target=_worker, args=(broker.url, keys, set(), stop, log, 50_000), daemon=True)
    t.start()
    try:
        wait_for(lambda: log.ops >= PROGRESS, 60.0, "worker under way")
        if bad is None:
            broker.config_path.write_text(good_text + "servers = [\n")
        else:
            broker.write_config(**{"servers": [a.address, b.address], **bad})
        broker.reload()
        wait_for(lambda: "reload rejected" in broker.log(), 5.0, "rejection logged")
        rejected_at = log.ops
        wait_for(lambda: log.ops >= rejected_at + PROGRESS, 60.0, "worker served after the rejection")
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert log.ops >= 2 * PROGRESS and not log.errors and not log.mismatches, (log.errors[:5], log.mismatches[:5])
    lines = [line for line in broker.log().splitlines() if "reload rejected" in line]
    assert len(lines) == 1 and reason in lines[0], lines
    assert servers_in_stats(broker) == {a.address}  # B was not added
    assert broker.running

    # The rejection wedged nothing: a corrected config is applied by the next SIGHUP.
    for key in bad or {}:
        if key != "servers":
            del broker.settings[key]
    broker.write_config(servers=[a.address, b.address])
    broker.reload()
    wait_for(lambda: servers_in_stats(broker) == {a.address, b.address}, 5.0, "corrected config applied")


def test_reload_applies_health_settings_to_servers_it_keeps(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]
) -> None:
    """failure_limit and the probe intervals of a reloaded config govern the servers that stay, not
    only the ones it adds."""
    a, b = memcached_factory(2)
    broker = broker_factory(
        [a.address, b.address], failure_limit=1000, probe_interval_ms=60_000, probe_max_interval_ms=60_000,
        io_timeout_ms=20000,
    )
    keys = [f"hs:{i}" for i in range(50)]
    on_a = [k for k, s in owners([a.address, b.address], keys).items() if s == a.address]
    client = Client(broker.url, timeout=0.5, ignore_exc=True)
    # Connected before the test starts: a first call that spent its 0.5 s on the handshake would
    # send nothing, and ignore_exc would hide that.
    connect(client)
    broker.write_config(failure_limit=1, probe_interval_ms=100, probe_max_interval_ms=200)
    broker.reload()
    wait_for(lambda: "config reloaded" in broker.log(), 5.0, "reload applied")
    a.pause()
    try:
        assert client.get_many(on_a) == {}  # one timed-out frame: one failure, now the limit
        # The client may give up (its clock) a little before the broker times the frame out (its
        # own), so the ejection is waited for, not read at once.
        wait_for(lambda: broker.stats()["servers"][a.address]["ejections"] == 1, 10, "ejected")
        assert broker.stats()["servers"][a.address]["state"] != "up"
    finally:
        a.resume()
    # The new config's probe interval brings it back; the old one would wait 30 s at least
    # (equal jitter: half of 60 s fixed).
    wait_for(lambda: broker.stats()["servers"][a.address]["state"] == "up", 10, "back up")


def test_a_server_whose_name_does_not_resolve_is_a_down_server_not_a_dead_broker(
    memcached_factory: MemcachedFactory, broker_factory: Callable[..., BrokerProcess]
) -> None:
    # Found by a fresh user: check-config accepts a host name, the reload looked it up inside
    # connect_ex, and socket.gaierror ended the broker.
    (mc,) = memcached_factory(1)
    broker = broker_factory([mc.address], failure_limit=1)
    bad = "nosuchhost.invalid:11211"
    broker.write_config(servers=[mc.address, bad], failure_limit=1)
    broker.reload()
    wait_for(lambda: broker.stats()["servers"].get(bad, {}).get("state") not in (None, "up"), 10, "the bad server marked down")
    assert broker.running
    keys = [f"k{i}" for i in range(40)]
    good = [k for k, owner in owners([mc.address, bad], keys).items() if owner == mc.address]
    client = Client(broker.url, timeout=5.0)
    for k in good:
        assert client.set(k, value_of(k)) is True
        assert client.get(k) == value_of(k)
    assert good, "no key placed on the good server"
