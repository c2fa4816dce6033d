"""The scenarios, the services each one needs, and one round of one path.

A scenario starts its own services (fresh memcached servers, the delay proxy when it adds round
trip, nutcracker when twemproxy is compared, one broker per broker path), preloads known values,
runs its paths interleaved round by round (bench/cli.py), and stops everything by PID.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .paths import BROKER_PATHS, FLOOR_PATHS, GUARDED_FLOOR_FLAGS, WorkerSpec, batches_of, value_for
from .procs import (
    BenchError, Broker, BrokerRejectedConfig, DelayProxy, EchoServer, FloorServer, Nutcracker, Proc, StatsConn,
    cpu_seconds, ensure_nutcracker, rss_bytes, split_address, start_memcached, tcp_connections,
)
from .workers import hold_dealers, run_workers

STATS_INTERVAL_S = 0.1
SETTLE_TIMEOUT_S = 2.0
LATENCY_SAMPLE_CAP = 400_000
ZIPF_DRAWS = 20_000
BATCHES_PER_WORKER = 64
SET_KEYS_PER_WORKER = 100
GET_PATHS = ("direct", "twemproxy", "broker", "floor", "zmq-echo")
# The scenarios of the targets that the plain floor meets in some runs and the broker misses
# (bench/README, eighteenth round) also run the floor with the guarantees' work added.
GUARDED_GET_PATHS = ("direct", "twemproxy", "broker", "floor", "floor-guarded", "zmq-echo")
COALESCE_PATHS = ("broker-coalesce-on", "broker-coalesce-off")


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    op: str = "get"              # get | get_many | set | rss
    workers: int = 1
    batch: int = 1
    keyset: str = "uniform"      # uniform: 1,000 keys; hot: one key; zipf: s = 1.0 over `keys`
    keys: int = 1000
    servers: int = 1
    delay_ms: float = 0.0        # added to every round trip to memcached, by the delay proxy
    paths: tuple[str, ...] = GET_PATHS
    pace_ms: float = 0.0         # 0: back to back; else one call per pace_ms per worker
    latency: bool = False        # keep every latency sample (p999 needs them)
    quick_workers: int | None = None


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("get-1", "single get (100-byte hit), 1 worker", workers=1),
    Scenario("get-8", "single get, 8 workers", workers=8),
    Scenario("get-32", "single get, 32 workers", workers=32, paths=GUARDED_GET_PATHS, quick_workers=8),
    Scenario("get-64", "single get, 64 workers", workers=64, quick_workers=8),
    Scenario("set-8", "set (100 bytes, noreply=False), 8 workers", op="set", workers=8,
             paths=("direct", "twemproxy", "broker")),
    Scenario("getmany-8", "get_many(100), 8 workers; raw = one socket pipelining 100 mg per write",
             op="get_many", workers=8, batch=100, paths=(*GUARDED_GET_PATHS, "raw")),
    Scenario("getmany-32", "get_many(100), 32 workers", op="get_many", workers=32, batch=100,
             paths=(*GUARDED_GET_PATHS, "raw"), quick_workers=8),
    Scenario("latency-b2b", "1 worker, single gets back to back; latency percentiles", latency=True),
    Scenario("latency-paced", "1 worker, one single get per ms; latency percentiles", pace_ms=1.0, latency=True),
    Scenario("rtt1ms-16", "single get, 16 workers, every round trip to memcached +1 ms (delay proxy)",
             workers=16, delay_ms=1.0, paths=("direct", "twemproxy", "broker", "floor"), quick_workers=8),
    Scenario("multi4-0ms", "4 memcached servers, get_many(100), 8 workers", op="get_many", workers=8, batch=100,
             servers=4, paths=("hashclient", "twemproxy", "broker", "floor")),
    Scenario("multi4-1ms", "4 memcached servers, get_many(100), 8 workers, +1 ms round trip", op="get_many",
             workers=8, batch=100, servers=4, delay_ms=1.0, paths=("hashclient", "twemproxy", "broker", "floor")),
    Scenario("rss-256", "broker RSS with 256 connected idle workers (DEALERs: connect, one PING, idle)",
             op="rss", workers=256, paths=("broker",), quick_workers=32),
    Scenario("hotkey-32", "32 workers reading one key; coalescing on / off", workers=32, keyset="hot",
             paths=("direct", "twemproxy", *COALESCE_PATHS), quick_workers=8),
    Scenario("zipf-32", "32 workers, Zipf s=1.0 over 10,000 keys; coalescing on / off", workers=32,
             keyset="zipf", keys=10_000, paths=("direct", "twemproxy", *COALESCE_PATHS), quick_workers=8),
)
BY_NAME = {s.name: s for s in SCENARIOS}


def key_names(n: int) -> list[str]:
    return [f"bench:{i:06d}" for i in range(n)]


@functools.lru_cache(maxsize=4)
def _zipf_cumulative(n_keys: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (r ** s) for r in range(1, n_keys + 1)))


def zipf_draws(n_keys: int, draws: int, rng: random.Random, s: float = 1.0) -> list[int]:
    """Indices drawn from a Zipf distribution over ranks 1..n_keys (rank r has weight 1 / r**s);
    index 0 is the hottest key."""
    return rng.choices(range(n_keys), cum_weights=_zipf_cumulative(n_keys, s), k=draws)


# --- services of one scenario ------------------------------------------------------------------


@dataclass
class Env:
    sc: Scenario
    tmpdir: Path
    memcached: list[Proc]
    addresses: list[str]               # real memcached servers
    upstreams: list[str]               # what paths connect to: the delay proxy's ports, or the servers
    stats: list[StatsConn]
    proxy: DelayProxy | None = None
    nutcracker: Nutcracker | None = None
    brokers: dict[str, Broker] = field(default_factory=dict)
    floors: dict[str, FloorServer] = field(default_factory=dict)  # by path: floor, floor-guarded
    paths: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    proxy_account: dict[str, Any] = field(default_factory=dict)

    def curr_connections(self) -> int:
        return sum(s.curr_connections() for s in self.stats)

    def gets_served(self) -> int:
        """Client gets that reached memcached. Every key a scenario reads is preloaded, so these
        are memcached's get_hits; the broker's fences (`mg` of a key never stored, one per write
        to memcached) are misses and stay out (their cost shows in memcached's CPU per op)."""
        return sum(int(s.stats()["get_hits"]) for s in self.stats)

    def pools(self) -> dict[str, int]:
        """Connections each proxy holds to memcached now (broker stats, twemproxy stats)."""
        out = {name: b.connections() for name, b in self.brokers.items()}
        for name, floor in self.floors.items():
            out[name] = floor.connections
        if self.nutcracker is not None:
            out["twemproxy"] = self.nutcracker.server_connections()
        return out


def _preload(addresses: Sequence[str], names: Sequence[str], size: int) -> None:
    """Every key on every server, so any placement (rendezvous, ketama) finds its value."""
    from pymemcache.client.base import Client as PmcClient

    for address in addresses:
        host, _, port = address.rpartition(":")
        client = PmcClient((host, int(port)), connect_timeout=2.0, timeout=2.0)
        try:
            for i in range(0, len(names), 100):
                failed = client.set_many({k: value_for(k, size) for k in names[i:i + 100]}, noreply=False)
                if failed:
                    raise BenchError(f"preload: {address} did not store {failed[:3]}")
            for i in range(0, len(names), 100):
                chunk = names[i:i + 100]
                got = client.get_many(chunk)
                if got != {k: value_for(k, size) for k in chunk}:
                    raise BenchError(f"preload: {address} does not read back what was stored")
        finally:
            client.close()


@contextlib.contextmanager
def environment(sc: Scenario, value_size: int, coalesce: str, say: Callable[[str], None]) -> Iterator[Env]:
    tmpdir = Path(tempfile.mkdtemp(prefix=f"mcb-bench-{sc.name}-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmpdir, True)
        procs: list[Proc] = []
        addresses: list[str] = []
        for i in range(sc.servers):
            proc, address = start_memcached(tmpdir, str(i))
            stack.callback(proc.stop)
            procs.append(proc)
            addresses.append(address)
        stats = [StatsConn(a) for a in addresses]
        for s in stats:
            stack.callback(s.close)
        env = Env(sc, tmpdir, procs, addresses, list(addresses), stats)
        if sc.delay_ms:
            env.proxy = DelayProxy(tmpdir, addresses, sc.delay_ms)
            proxy = env.proxy

            def stop_proxy() -> None:
                env.proxy_account = proxy.stop()
            stack.callback(stop_proxy)
            env.upstreams = list(env.proxy.listen)
        if sc.op != "rss":
            _preload(addresses, key_names(sc.keys), value_size)
        paths = list(sc.paths)
        if "twemproxy" in paths:
            env.nutcracker = Nutcracker(tmpdir, ensure_nutcracker(say), env.upstreams)
            stack.callback(env.nutcracker.stop)
        if any(p in COALESCE_PATHS for p in paths):
            wanted = [p for p in COALESCE_PATHS if coalesce in ("both", p.rsplit("-", 1)[1])]
            paths = [p for p in paths if p not in COALESCE_PATHS or p in wanted]
            for p in wanted:
                try:
                    broker = Broker(tmpdir, p, env.upstreams, {"coalesce_reads": p.endswith("-on")})
                except BrokerRejectedConfig as exc:
                    if "coalesce_reads" not in exc.log:
                        raise
                    env.notes.append("coalescing on/off comparison: PENDING BROKER SUPPORT (the broker refused "
                                     "`coalesce_reads`; ran `broker` with the key omitted instead)")
                    paths = [q for q in paths if q not in COALESCE_PATHS]
                    paths.append("broker")
                    break
                stack.callback(broker.stop)
                env.brokers[p] = broker
        for p in FLOOR_PATHS:
            if p in paths:
                floor = FloorServer(tmpdir, env.upstreams, flags=GUARDED_FLOOR_FLAGS if p == "floor-guarded" else (), tag=p)
                stack.callback(floor.stop)
                env.floors[p] = floor
        for p in paths:
            if p == "broker" and p not in env.brokers:
                broker = Broker(tmpdir, p, env.upstreams, {})
                stack.callback(broker.stop)
                env.brokers[p] = broker
        env.paths = tuple(paths)
        yield env


# --- one round of one path ---------------------------------------------------------------------


def _specs(env: Env, sc: Scenario, path: str, rnd: int, seconds: float, value_size: int,
           echo_url: str, reply_bytes: int) -> list[WorkerSpec]:
    if path in env.brokers:
        targets: tuple[str, ...] = (env.brokers[path].url,)
    elif path == "twemproxy":
        assert env.nutcracker is not None
        targets = (env.nutcracker.address,)
    elif path in env.floors:
        targets = (env.floors[path].url,)
    elif path == "zmq-echo":
        targets = (echo_url,)
    elif path == "hashclient":
        targets = tuple(env.upstreams)
    else:
        targets = (env.upstreams[0],)
    workers = 1 if path == "raw" else sc.workers
    names = key_names(sc.keys)
    specs = []
    for w in range(workers):
        rng = random.Random(rnd * 100_003 + w)
        if sc.op == "set":
            keys: tuple[str, ...] = tuple(f"set:{w}:{i}" for i in range(SET_KEYS_PER_WORKER))
        elif sc.keyset == "hot":
            keys = (names[0],)
        elif sc.keyset == "zipf":
            keys = tuple(names[i] for i in zipf_draws(sc.keys, ZIPF_DRAWS, rng))
        else:
            order = names[:]
            rng.shuffle(order)
            keys = tuple(order) if sc.op == "get" else batches_of(order, sc.batch, BATCHES_PER_WORKER, 0)
        specs.append(WorkerSpec(
            path=path, targets=targets, op=sc.op, keys=keys, batch=sc.batch, value_size=value_size,
            seconds=seconds, pace_s=sc.pace_ms / 1e3,
            sample_cap=LATENCY_SAMPLE_CAP if sc.latency else 4096, reply_bytes=reply_bytes, worker_id=w,
        ))
    return specs


def _reply_bytes(sc: Scenario, value_size: int) -> int:
    """Size of the broker's reply to one call of this scenario (for the echo server to send)."""
    from clientlib.wire import encode_reply

    value = b"v" * value_size
    if sc.batch > 1:
        return len(encode_reply(1 << 50, [value] * sc.batch))  # a GET_MANY's hits: bare values
    return len(encode_reply(1 << 50, [[0, value, 0]]))


def _settle(env: Env) -> dict[str, int]:
    """Wait (bounded) until memcached holds only the proxies' pools, so a round never counts
    connections the previous one closed a moment ago. Returns the pools."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        pools = env.pools()
        if env.curr_connections() <= sum(pools.values()) or time.monotonic() > deadline:
            return pools
        time.sleep(0.02)


def run_round(env: Env, path: str, rnd: int, seconds: float, value_size: int) -> dict[str, Any]:
    sc = env.sc
    if sc.op == "rss":
        return _rss_round(env, path, rnd)
    _settle(env)
    echo: EchoServer | None = None
    reply_bytes = _reply_bytes(sc, value_size)
    try:
        if path == "zmq-echo":
            echo = EchoServer(env.tmpdir, str(rnd), reply_bytes)
        specs = _specs(env, sc, path, rnd, seconds, value_size, echo.url if echo else "", reply_bytes)
        pids = {
            # A floor's CPU goes in the broker column of its row: it stands where the broker does.
            "broker": env.brokers[path].pid if path in env.brokers else env.floors[path].pid if path in env.floors else None,
            "twemproxy": env.nutcracker.pid if env.nutcracker and path == "twemproxy" else None,
            "echo": echo.pid if echo else None,
            "proxy": env.proxy.pid if env.proxy else None,
        }
        mc_pids = [p.pid for p in env.memcached]
        before: dict[str, Any] = {}
        conns = [0]  # the most upstream connections this path's processes held at one sample
        upstream_ports = [split_address(a)[1] for a in env.upstreams]
        owner = [p for p in (pids["broker"], pids["twemproxy"]) if p]

        def snapshot() -> dict[str, Any]:
            snap = {k: cpu_seconds(p) for k, p in pids.items() if p}
            snap["memcached"] = sum(cpu_seconds(p) for p in mc_pids)
            snap["gets"] = env.gets_served()
            if path in env.brokers:
                bs = env.brokers[path].stats()
                snap["writes"] = bs.get("backend_writes", 0)
                snap["written"] = bs.get("requests_written", 0)
            return snap

        def count(worker_pids: list[int]) -> None:
            # Counted by owner (the broker, the floor or nutcracker, else the workers themselves),
            # not as memcached's count less the other paths' pools: those are each proxy's own
            # word, read at another moment (nutcracker's every 100 ms), and once in a full suite
            # run that subtraction counted 4 of a direct round's 8 connections.
            if path != "zmq-echo":
                conns[0] = max(conns[0], tcp_connections(owner or worker_pids, upstream_ports))

        def before_start(worker_pids: list[int]) -> None:
            # Once while every worker is connected and waiting for the start: a quick round's
            # window can be over, and its workers gone, before a loaded machine runs `during`.
            count(worker_pids)
            before.update(snapshot())

        def during(end: float, worker_pids: list[int]) -> None:
            while True:
                count(worker_pids)
                if time.monotonic() + STATS_INTERVAL_S >= end:
                    return
                time.sleep(STATS_INTERVAL_S)

        results, wall = run_workers(specs, seconds, during, before_start)
        after = snapshot()
    finally:
        if echo is not None:
            echo.stop()

    keys = sum(r["keys"] for r in results)
    calls = sum(r["calls"] for r in results)
    if keys <= 0:
        raise BenchError(f"{sc.name} {path}: no call completed")
    per = 1e6 / keys

    def us(name: str) -> float | None:
        return round((after[name] - before[name]) * per, 2) if name in before else None

    row: dict[str, Any] = {
        "scenario": sc.name, "path": path, "round": rnd,
        "ops_per_s": sum(r["keys"] / r["elapsed"] for r in results),
        "calls_per_s": sum(r["calls"] / r["elapsed"] for r in results),
        "calls": calls, "keys": keys, "workers": len(specs),
        "worker_cpu_us": round(sum(r["cpu"] for r in results) * per, 2),
        "broker_cpu_us": us("broker"), "twemproxy_cpu_us": us("twemproxy"), "echo_cpu_us": us("echo"),
        "proxy_cpu_us": us("proxy"), "mc_cpu_us": us("memcached") if path != "zmq-echo" else None,
        # The most connections to memcached (or the delay proxy in front of it) this path's
        # processes held at once during the run.
        "mc_conns": conns[0] if path != "zmq-echo" else None,
        "upstream_per_get": round((after["gets"] - before["gets"]) / keys, 4) if sc.op != "set" and path != "zmq-echo" else None,
        "req_per_write": round((after["written"] - before["written"]) / (after["writes"] - before["writes"]), 2)
        if path in env.brokers and after.get("writes", 0) > before.get("writes", 0) else None,
        "wall_s": round(wall, 3),
        "samples": [x for r in results for x in r["samples"]],
    }
    return row


def _rss_round(env: Env, path: str, rnd: int) -> dict[str, Any]:
    broker = env.brokers[path]
    rss0 = rss_bytes(broker.pid)
    n = env.sc.workers
    holders = min(8, n)
    counts = [n // holders + (1 if i < n % holders else 0) for i in range(holders)]
    sampled: dict[str, int] = {}

    def measure() -> None:
        time.sleep(0.3)  # the broker has answered every PING; let its allocations settle
        sampled["rss"] = rss_bytes(broker.pid)
        sampled["pools"] = broker.connections()

    connected = hold_dealers(broker.url, counts, measure)
    rss1 = sampled["rss"]
    return {
        "scenario": env.sc.name, "path": path, "round": rnd, "workers": connected,
        "rss_before_mib": round(rss0 / 2**20, 2), "rss_mib": round(rss1 / 2**20, 2),
        "rss_per_worker_kib": round((rss1 - rss0) / 1024 / max(1, connected), 2),
        "mc_conns": env.curr_connections(), "samples": [],
    }


def quick(sc: Scenario) -> Scenario:
    return replace(sc, workers=sc.quick_workers or sc.workers)
