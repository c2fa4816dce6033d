"""The gets benchmark runs end to end: a short smoke run of `python -m bench.gets --json`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_smoke_run_reports_both_paths() -> None:
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gets", "--workers", "1,2", "--seconds", "0.5", "--rounds", "1",
         "--keys", "200", "--batch", "20", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
    )
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 30, f"smoke run took {elapsed:.1f}s"
    report = json.loads(proc.stdout)

    results = {(r["mode"], r["workers"], r["via"]): r for r in report["results"]}
    assert set(results) == {(m, w, v) for m in ("get", "get_many") for w in (1, 2) for v in ("direct", "broker")}
    for (mode, workers, via), r in results.items():
        assert r["gets_per_s"] > 0 and r["calls"] > 0, r
        # Every key was preloaded: a miss or an error means a wrong answer somewhere.
        assert r["errors"] == 0 and r["misses"] == 0, r
        assert 0 < r["p50_us"] <= r["p99_us"], r
        if mode == "get_many":
            assert r["gets_per_s"] == pytest.approx(20 * r["calls_per_s"], rel=1e-3), r
        if via == "broker":
            assert r["ratio_to_direct"] > 0, r
            assert r["requests_per_write"] >= 1.0, r
            # The broker's own pool (2 connections) is all memcached sees, whatever the worker count.
            assert r["mc_connections"] == 2, r
        else:
            # One connection per worker, plus the broker's idle pool.
            assert r["mc_connections"] == workers + 2, r

    assert len(report["rounds"]) == 8
    assert report["machine"]["memcached"].startswith("1.")
