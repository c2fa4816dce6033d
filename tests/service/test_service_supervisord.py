"""Issue 11, supervisord: a real supervisord (the supervisor package) runs memcached and the broker
from etc/supervisord.conf with its paths filled in; a client works; the broker is SIGKILLed and
supervisord restarts it; the same Client recovers; `supervisorctl stop` drains and the broker exits 0.

Filled in: the virtualenv (this checkout's .venv, installed by scripts/test), the config, log and
run directories (under the test's temporary directory) and memcached's port (a free one). The
`user=` lines are dropped: the test runs as whoever runs the suite, and the service accounts
(memcache, mcbroker) may not exist here (as root, memcached is told `-u nobody`, which it needs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokerproc import toml_value
from clientlib import Client
from clientlib.errors import MemcacheError
from harness import free_port, memcached_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SUPERVISORD = BIN / "supervisord"
SUPERVISORCTL = BIN / "supervisorctl"


def _fill(text: str, tmp: Path, port: int) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("user="):
            continue
        line = (
            line.replace("/opt/mcbroker/bin/mcbroker", str(BIN / "mcbroker"))
            .replace("/etc/mcbroker/mcbroker.toml", str(tmp / "mcbroker.toml"))
            .replace("/var/log/mcbroker", str(tmp / "log"))
            .replace("/run/mcbroker-supervisor", str(tmp / "sv"))
            .replace("/usr/bin/memcached", memcached_binary() or "memcached")
            .replace("-p 11211", f"-p {port}" + (" -u nobody" if os.geteuid() == 0 else ""))
        )
        out.append(line)
    return "\n".join(out) + "\n"


def _ctl(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SUPERVISORCTL), "-c", str(conf), *args], capture_output=True, text=True, timeout=60)


def _broker_pid(conf: Path) -> int:
    r = _ctl(conf, "pid", "mcbroker")
    return int(r.stdout.strip()) if r.stdout.strip().isdigit() else 0


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_supervisord_runs_restarts_and_stops_the_broker(tmp_path):
    if not SUPERVISORD.exists():
        pytest.fail("supervisord missing: the test extra installs supervisor (scripts/test)")
    port = free_port()
    (tmp_path / "log").mkdir()
    (tmp_path / "sv").mkdir()
    url = f"ipc://{tmp_path}/run/mcbroker.sock"
    settings = {"listen": [url], "servers": [f"127.0.0.1:{port}"], "drain_timeout_ms": 5000}
    (tmp_path / "mcbroker.toml").write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
    conf = tmp_path / "supervisord.conf"
    conf.write_text(_fill((ROOT / "etc" / "supervisord.conf").read_text(), tmp_path, port))
    sv = subprocess.Popen(
        [str(SUPERVISORD), "-n", "-c", str(conf)], stdout=(tmp_path / "sv.out").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = Client(url, timeout=2.0)

        def served() -> bool:
            try:
                client.set("sv", b"up")
                return client.get("sv") == b"up"
            except MemcacheError:
                return False

        _until(served, 30, f"never served:\n{_ctl(conf, 'status').stdout}\n{(tmp_path / 'sv.out').read_text()}")
        first = _broker_pid(conf)
        assert first
        os.kill(first, signal.SIGKILL)
        _until(lambda: _broker_pid(conf) not in (0, first), 30, "supervisord did not restart the broker")
        # The same Client, not a new one, recovers once the new broker listens.
        _until(served, 30, "the Client did not recover after the restart")

        stopped = _ctl(conf, "stop", "mcbroker")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        log = (tmp_path / "log" / "supervisord.log").read_text()
        assert "stopped: mcbroker (exit status 0)" in log, log
        assert not (tmp_path / "run").exists(), "the broker must remove its socket and runtime directory"
        broker_log = (tmp_path / "log" / "mcbroker.log").read_text()
        assert "mcbroker stopped" in broker_log and "level=info" in broker_log, broker_log
    finally:
        if sv.poll() is None:
            sv.send_signal(signal.SIGTERM)  # supervisord stops its programs (memcached) on the way out
            try:
                sv.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(sv.pid, signal.SIGKILL)
                sv.wait()
