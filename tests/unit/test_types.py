"""clientlib and broker type-check clean with mypy, and ships its hints (py.typed, PEP 561).

MYPY_TARGETS lists what is checked: both packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MYPY_TARGETS = ["clientlib", "broker"]
# --strict except warn_return_any: msgpack ships no type hints, so every decoded value is Any.
MYPY_FLAGS = ["--strict", "--no-warn-return-any"]


@pytest.mark.timeout(300)
def test_mypy_finds_no_errors(tmp_path: Path) -> None:
    # A private cache directory: nothing is written into the checkout.
    r = subprocess.run(
        [sys.executable, "-m", "mypy", *MYPY_FLAGS, "--cache-dir", str(tmp_path / "cache"), *MYPY_TARGETS],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout


def test_clientlib_ships_py_typed() -> None:
    assert (ROOT / "clientlib" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'clientlib = ["py.typed"]' in pyproject
