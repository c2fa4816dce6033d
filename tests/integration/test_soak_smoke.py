"""A ten-second run of the soak (bench/soak.py; the real thing runs for minutes, outside CI): it
starts, injects a broker kill, a memcached kill and a corrupted stream, and reports PASS with 0
misdelivered, 0 acknowledged writes lost and its counters reconciled."""

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
        [sys.executable, "-m", "bench.soak", "--minutes", "0.2", "--fault-every", "2", "--procs", "2",
         "--threads", "2", "--faults", "broker_kill,truncate,mc_kill"],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    out = run.stdout
    print(out, run.stderr[-3000:])
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert "RESULT: PASS" in out
    assert re.search(r"^misdelivered: 0$", out, re.M)
    assert re.search(r"^acknowledged writes lost: 0 ", out, re.M)
    assert "MISMATCH" not in out and out.count(": ok") >= 7
    assert re.search(r"broker_kill 1", out) and re.search(r"mc_kill 1", out), out
    assert int(re.search(r"^operations: (\d+) calls", out, re.M).group(1)) > 100
