"""`pip install .` into a fresh virtualenv gives both packages and a working `mcbroker` command."""

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_pip_install_into_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds,
    # and the test suite must leave the checkout as it found it.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"),
    )
    had_build = (ROOT / "build").exists()
    subprocess.run([py, "-m", "pip", "install", "-qq", str(src)], check=True, timeout=540)
    assert (ROOT / "build").exists() == had_build, "the install wrote build/ into the checkout"
    out = subprocess.run(
        [py, "-c", "import broker, clientlib; print(broker.__file__); print(clientlib.Client.__name__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout
    assert str(env_dir) in out and "Client" in out
    # PEP 561: type checkers see clientlib's hints in the installed package.
    installed = subprocess.run(
        [py, "-c", "import clientlib, pathlib; print(pathlib.Path(clientlib.__file__).parent)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout.strip()
    assert (Path(installed) / "py.typed").is_file()
    help_text = subprocess.run([env_dir / "bin" / "mcbroker", "--help"], check=True, capture_output=True, text=True).stdout
    assert "serve" in help_text and "check-config" in help_text
    check = subprocess.run(
        [env_dir / "bin" / "mcbroker", "check-config", "--config", str(ROOT / "etc" / "mcbroker.toml")],
        capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr
    assert "127.0.0.1:11211" in check.stdout
