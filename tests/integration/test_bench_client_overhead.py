"""bench/client_overhead.py: a short run of each form (get, get_many) completes, checks every reply
it times against the stored value, and prints every row with numbers that can be true (never a
timing bound)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from bench import client_overhead
from clientlib.wire import VERSION

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_first_value_reads_a_get_and_a_get_many_reply() -> None:
    # A GET's result is [code, value, flags]; a GET_MANY's hit with flags 0 is its value alone.
    assert client_overhead.first_value(msgpack.packb([VERSION, 1, 0, [[0, b"v", 0]]])) == b"v"
    assert client_overhead.first_value(msgpack.packb([VERSION, 1, 0, [b"v", b"w"]])) == b"v"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", [1, 5])
def test_a_short_run_prints_every_row(keys: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.client_overhead", "--keys", str(keys), "--calls", "20", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(re.findall(r"^(\S.*?)\s+(-?[0-9.]+)\s+-?[0-9.]+\s+-?[0-9.]+$", proc.stdout, re.M))
    for path in ("raw", "client"):
        for kind in ("wall", "cpu", "thread cpu"):
            assert float(rows[f"{path} {kind}"]) > 0, proc.stdout
        assert float(rows[f"{path} no I/O thread cpu"]) > 0, proc.stdout
    assert "client-raw thread cpu" in rows, proc.stdout
    unit = "get" if keys == 1 else "key"
    assert f"us per {unit}" in proc.stdout, proc.stdout
