"""`python -m bench --quick` runs end to end: every scenario, every path, right values.

Asserts that the runs completed and what was read was right; never a timing (speed is measured by
the bench itself, as ratios within one run). The bench installs nutcracker when it is missing; when
it cannot, the bench exits with the reason and this test fails showing it (no skip).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.paths import BROKER_PATHS, FLOOR_PATHS, WorkerSpec, WrongValue, open_path, value_for  # noqa: E402
from bench.report import TARGETS  # noqa: E402
from bench.scenarios import COALESCE_PATHS, SCENARIOS, quick  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"python -m bench --quick failed:\n{proc.stderr[-6000:]}\n{proc.stdout[-3000:]}"
    doc: dict = json.loads(out.read_text())
    doc["_stdout"] = proc.stdout
    return doc


@pytest.mark.timeout(300)
def test_every_scenario_ran_every_path(quick_run: dict) -> None:
    assert quick_run["failures"] == []
    assert quick_run["settings"]["quick"] and quick_run["settings"]["rounds"] == 1
    ran = {s["name"]: s for s in quick_run["scenarios"]}
    assert list(ran) == [s.name for s in SCENARIOS]
    for sc in map(quick, SCENARIOS):
        entry = ran[sc.name]
        assert entry["failed"] is None, entry
        expected = list(sc.paths)
        if any("PENDING BROKER SUPPORT" in n for n in entry["notes"]):
            # The broker refused coalesce_reads: the comparison is marked pending and `broker` ran instead.
            expected = [p for p in expected if p not in COALESCE_PATHS] + ["broker"]
        assert entry["paths"] == expected, sc.name
        summaries = {s["path"]: s for s in entry["summaries"]}
        assert list(summaries) == expected, sc.name
        for path, s in summaries.items():
            assert s["rounds"] == 1
            if sc.op == "rss":
                assert s["workers"] == sc.workers and s["rss_mib"] > 0
                continue
            assert s["calls"] > 0 and s["ops_median"] > 0, (sc.name, path)
            # Measured, and 0 allowed: a quick round's worker CPU can fall under the clock's
            # granularity on a loaded machine (seen: twemproxy get-64 at 0.0).
            assert s["worker_cpu_us"] is not None and s["worker_cpu_us"] >= 0, (sc.name, path)
            if path in BROKER_PATHS or path in FLOOR_PATHS:
                # A floor's CPU is in the broker column of its row, and it has the broker's ratios.
                assert s["broker_cpu_us"] is not None and s["broker_cpu_us"] > 0, (sc.name, path)
                assert "vs_" + ("hashclient" if sc.servers > 1 else "direct") in s, (sc.name, path)
            if path == "floor-guarded":
                # Its row carries its ratio to the plain floor: what the guarantees' work costs it.
                assert s["vs_floor"] > 0 and "vs_floor-guarded" not in summaries["floor"], sc.name


@pytest.mark.timeout(300)
def test_connections_and_upstream_counts_are_what_each_path_opens(quick_run: dict) -> None:
    for entry in quick_run["scenarios"]:
        sc = quick(next(s for s in SCENARIOS if s.name == entry["name"]))
        for s in entry["summaries"]:
            if sc.op == "rss":
                continue
            path = s["path"]
            if path in ("direct", "hashclient"):
                # One connection per worker per server: every worker connects before the clock starts.
                assert s["mc_conns"] == sc.workers * sc.servers, (sc.name, path, s["mc_conns"])
            elif path in BROKER_PATHS or path in FLOOR_PATHS:
                assert s["mc_conns"] == 2 * sc.servers, (sc.name, path, s["mc_conns"])
            elif path == "twemproxy":
                assert 1 <= s["mc_conns"] <= 2 * sc.servers, (sc.name, path, s["mc_conns"])
            elif path == "raw":
                assert s["mc_conns"] == 1
            if sc.op in ("get", "get_many") and path in ("direct", "twemproxy", "raw"):
                # Without coalescing every client get is one get at memcached: the counters are read right.
                assert s["upstream_per_get"] == pytest.approx(1.0, abs=0.01), (sc.name, path)


@pytest.mark.timeout(300)
def test_targets_table_has_a_verdict_for_every_target(quick_run: dict) -> None:
    statuses = {t["target"]: t["status"] for t in quick_run["targets"]}
    assert list(statuses) == [t.what for t in TARGETS]
    for name, status in statuses.items():
        assert status in ("pass", "FAIL", "FAIL (bound misses too)", "FAIL (floor misses too)", "FAIL (guarded floor misses too)",
                          "pending broker support"), (name, status)
    assert "## Targets" in quick_run["_stdout"] and "QUICK MODE" in quick_run["_stdout"]


@pytest.mark.timeout(60)
def test_a_wrong_value_fails_the_worker() -> None:
    """The check every worker runs can fail: a real memcached holding a value the bench did not
    store is reported as WrongValue, not counted as a hit."""
    sys.path.insert(0, str(ROOT / "tests"))
    import harness

    server = harness.Memcached()
    server.start()
    try:
        host, _, port = server.address.rpartition(":")
        good, bad = "bench:000000", "bench:000001"
        from pymemcache.client.base import Client as PmcClient

        c = PmcClient((host, int(port)))
        c.set(good, value_for(good, 100), noreply=False)
        c.set(bad, value_for(good, 100), noreply=False)  # another key's value
        c.close()
        for op, keys, batch in (("get", (good, bad), 1), ("get_many", (good, bad), 2)):
            spec = WorkerSpec(path="direct", targets=(server.address,), op=op, keys=keys, batch=batch,
                              value_size=100, seconds=1.0)
            call, _, close = open_path(spec)
            try:
                if op == "get":
                    assert call(0) == 1
                with pytest.raises(WrongValue):
                    call(1)
            finally:
                close()
    finally:
        server.cleanup()
