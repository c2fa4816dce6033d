"""Issue 11, deployment: install the project into a fresh virtualenv the way README's "Deploying"
section says (`python3 -m venv DIR && DIR/bin/pip install <checkout>`), then start the broker from
the systemd unit's ExecStart and from the supervisord program's command line, with the install
prefix (/opt/mcbroker in the shipped files: the one place to change) and the config path filled in.
And `systemd-analyze verify` on the unit.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from brokerproc import toml_value
from clientlib import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "mcbroker.service"
PROGRAM = ROOT / "etc" / "supervisord.conf"
PREFIX = "/opt/mcbroker"
CONFIG = "/etc/mcbroker/mcbroker.toml"


def _unit_value(key: str) -> str:
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]
    assert len(lines) == 1, f"{key}= must appear once in the unit"
    return lines[0].split("=", 1)[1]


def _program_command() -> str:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(PROGRAM)
    return parser.get("program:mcbroker", "command")


def test_unit_and_program_name_the_same_venv_binary():
    exec_start = _unit_value("ExecStart")
    assert exec_start == _program_command()
    assert shlex.split(exec_start)[0] == f"{PREFIX}/bin/mcbroker"


def test_unit_settings_the_issue_asks_for():
    for key, value in {
        "Type": "notify", "RuntimeDirectory": "mcbroker", "RuntimeDirectoryMode": "0750", "UMask": "0007",
        "User": "mcbroker", "Group": "mcbroker", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "", "Restart": "on-failure",
    }.items():
        assert _unit_value(key) == value, key
    # TimeoutStopSec (seconds) above the default drain_timeout_ms, with room for the final replies.
    from broker.config import DEFAULTS

    assert int(_unit_value("TimeoutStopSec")) * 1000 > int(DEFAULTS["drain_timeout_ms"]) + 1000  # type: ignore[call-overload]


def _install(tmp_path: Path) -> Path:
    prefix = tmp_path / "opt-mcbroker"
    venv.create(prefix, with_pip=True)
    # From a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"),
    )
    subprocess.run([prefix / "bin" / "pip", "install", "-qq", str(src)], check=True, timeout=540)
    return prefix


def _run_command_line(command: str, prefix: Path, config: Path, url: str, tmp_path: Path) -> None:
    argv = [a.replace(PREFIX, str(prefix)).replace(CONFIG, str(config)) for a in shlex.split(command)]
    log = (tmp_path / "broker.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        client = Client(url, timeout=2.0)
        for _ in range(200):
            try:
                client.set("deployed", b"yes")
                break
            except Exception:
                assert proc.poll() is None, (tmp_path / "broker.log").read_text()
                time.sleep(0.05)
        assert client.get("deployed") == b"yes"
        client.disconnect_all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(900)
def test_install_as_readme_says_and_start_from_unit_and_program(tmp_path, mc):
    readme = (ROOT / "README.md").read_text()
    assert "## Deploying" in readme and f"python3 -m venv {PREFIX}" in readme and f"{PREFIX}/bin/pip install" in readme
    prefix = _install(tmp_path)
    version = subprocess.run([prefix / "bin" / "mcbroker", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("mcbroker ")
    url = f"ipc://{tmp_path}/run/mcbroker.sock"
    config = tmp_path / "mcbroker.toml"
    config.write_text(f"listen = {toml_value([url])}\nservers = {toml_value([mc.address])}\n")
    check = subprocess.run([prefix / "bin" / "mcbroker", "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    _run_command_line(_unit_value("ExecStart"), prefix, config, url, tmp_path)
    _run_command_line(_program_command(), prefix, config, url, tmp_path)
    # systemd-analyze verify checks that ExecStart= names an executable, so it verifies the
    # unit with the install prefix this test used (the one line an operator would change).
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    unit = tmp_path / "mcbroker.service"
    unit.write_text(UNIT.read_text().replace(PREFIX, str(prefix)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mcbroker.service" not in r.stderr, r.stderr


def test_systemd_analyze_verify_the_shipped_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # The unit as shipped, with ExecStart pointing at this checkout's venv (verify requires an
    # executable there; the deployment test above does the same with a fresh install).
    unit = tmp_path / "mcbroker.service"
    unit.write_text(UNIT.read_text().replace(f"{PREFIX}/bin/mcbroker", str(Path(sys.executable).parent / "mcbroker")))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mcbroker.service" not in r.stderr, r.stderr
    # And it does catch a broken unit: a misspelled setting is reported.
    bad = tmp_path / "bad.service"
    bad.write_text(UNIT.read_text().replace("Type=notify", "Type=notfy"))
    r = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "notfy" in r.stderr
