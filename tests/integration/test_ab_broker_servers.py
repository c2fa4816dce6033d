"""bench.ab_broker with --servers N against a tree that places keys otherwise.

A "before" tree is any checkout; with several servers its placement may differ from this one's
(here: a copy of this tree whose default hash is ketama). The loader must store every key where
either broker will look, and a worker that fails must end the run with its reason, not hang it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120


def _ketama_tree(dest: Path) -> Path:
    for pkg in ("broker", "clientlib"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    config = dest / "broker" / "config.py"
    text = config.read_text()
    assert '"hash": "rendezvous",' in text
    config.write_text(text.replace('"hash": "rendezvous",', '"hash": "ketama",', 1))
    return dest


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("many, own", [(0, []), (0, ["--pool", "50"]), (20, []), (20, ["--own-keys"]), (20, ["--pool", "50"])])
def test_several_servers_and_a_before_tree_that_places_keys_otherwise(tmp_path: Path, many: int, own: list[str]) -> None:
    # With --own-keys the two workers ask 40 keys between them, with --pool 50 batches drawn from
    # 50; a worker raises on any miss.
    before = _ketama_tree(tmp_path / "before")
    argv = [sys.executable, "-m", "bench.ab_broker", "--before", str(before), "--servers", "3",
            "--rounds", "1", "--seconds", "0.3", "--workers", "2", "--many", str(many), *own]
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        # subprocess.run kills the child on timeout; its forked workers are daemonic and die with it
        # when their pipes close.
        pytest.fail(f"ab_broker still running after {RUN_TIMEOUT_S} s:\n{(exc.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for row in _summary_rows(proc.stdout):
        # Every call reached memcached through the broker: both did work, and each write carried
        # at least one request (the broker's own count, read from its stats).
        assert float(row[3]) >= 1.0, row


def _summary_rows(stdout: str) -> list[list[str]]:
    """The before and after rows of ab_broker's summary table, as cells (calls/s, CPU per call of
    the server, of memcached, requests per write, I/O thread wake-ups per call, loop thread
    preemptions per call), the first three checked positive. Every call's frame crossed the
    server's ZeroMQ I/O thread, which sleeps between frames at this light load: it woke."""
    rows = []
    for tag in ("before", "after"):
        line = next((line for line in stdout.splitlines() if line.startswith(f"| {tag} |")), None)
        assert line is not None, stdout
        cells = [cell.strip() for cell in line.split("|")[2:8]]
        assert all(float(c.replace(",", "")) > 0 for c in cells[:3]), line
        assert float(cells[4]) > 0 and float(cells[5]) >= 0, line
        rows.append(cells)
    return rows


def test_a_worker_that_dies_ends_the_run_with_an_error_not_a_wait() -> None:
    # Found in review: the parent kept the worker's end of each pipe open, so a worker that raised
    # left recv() waiting for ever (and memcached and both brokers running).
    import multiprocessing

    from bench.ab_broker import _result
    from bench.procs import BenchError

    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    w = ctx.Process(target=b.close, daemon=True)  # exits at once, reporting nothing
    w.start()
    b.close()
    w.join(10)
    with pytest.raises(BenchError, match="a worker exited before reporting"):
        _result(a)


@pytest.mark.parametrize("bad", [["--many", "-5"], ["--many", "20", "--pool", "-10"], ["--many", "20", "--pool", "10"],
                                 ["--pool", "50", "--own-keys"]])
def test_counts_of_keys_are_checked_before_anything_starts(bad: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.ab_broker", "--before", str(ROOT), *bad],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and ("--many and --pool take a count" in proc.stderr or "--pool needs" in proc.stderr), proc.stderr


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_two_floors_side_by_side_each_serving_every_key() -> None:
    # Pricing a guarantee: the plain floor against one with every guarantee's work added, over 3
    # servers with get_many frames (a worker raises on any miss or wrong count). A floor keeps no
    # count of writes, so its requests per write show as "-".
    argv = [sys.executable, "-m", "bench.ab_broker", "--before-floor", "", "--after-floor=--rcvhwm 2 --opaques --fence",
            "--servers", "3", "--rounds", "1", "--seconds", "0.3", "--workers", "2", "--many", "20", "--pool", "50"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for row in _summary_rows(proc.stdout):
        assert row[3] == "-", row


@pytest.mark.parametrize("args, message", [
    (["--rounds", "1"], "give one of --before DIR and --before-floor FLAGS"),
    (["--before", str(ROOT), "--before-floor", ""], "give one of --before DIR and --before-floor FLAGS"),
])
def test_a_before_side_must_be_one_tree_or_one_floor(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.ab_broker", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
