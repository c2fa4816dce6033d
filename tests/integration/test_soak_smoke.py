"""A twenty-four-second run of the soak (bench/soak.py; the real thing runs for minutes, outside CI): it
starts, injects a broker kill, a memcached kill and a corrupted stream, and reports PASS with 0
misdelivered, 0 acknowledged writes lost and its counters reconciled.

The soak starts a fault only while one more interval still fits before its end, and each fault
takes its own time (a broker restart took 2.6 s under a loaded suite), so the order and the length
leave room: the two kills first (about 1-3 s each), then the 4 s corrupted stream, which still
starts if the kills took up to 14 s more than that (a machine 3-4 times slower than this one)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke():
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "0.4", "--fault-every", "2", "--procs", "2",
         "--threads", "2", "--faults", "broker_kill,mc_kill,truncate"],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    out = run.stdout
    print(out, run.stderr[-3000:])
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert "RESULT: PASS" in out
    assert re.search(r"^misdelivered: 0$", out, re.M)
    assert re.search(r"^acknowledged writes lost: 0 ", out, re.M)
    assert "MISMATCH" not in out and out.count(": ok") >= 7
    injected = dict(re.findall(r"(\w+) (\d+)", re.search(r"^faults injected: (.*)$", out, re.M).group(1)))
    assert {name: int(n) >= 1 for name, n in injected.items()} == {"broker_kill": True, "mc_kill": True, "truncate": True}, out
    assert int(re.search(r"^operations: (\d+) calls", out, re.M).group(1)) > 100
