"""Issue 11, logging: one key=value line per event on stderr, level from config or flag, no
per-request lines at info, a repeated failure rate-limited to one line per server per interval, and
a refused connect said as such (it was logged as "read from ...")."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from clientlib import Client
from harness import free_port

pytestmark = pytest.mark.integration

LINE = re.compile(r'ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warning|error|critical) logger=[\w.]+ msg=("([^"\\]|\\.)*"|\S+)( exc=.*)?')


def _serve(tmp_path, *args: str, seconds: float, calls: int = 0) -> str:
    url = f"ipc://{tmp_path}/b.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--listen", url, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        client = Client(url, timeout=1.0)
        while True:
            try:
                client.broker_ping()
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
        for i in range(calls):
            client.get(f"k{i}")
        time.sleep(seconds)
        client.disconnect_all()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert out == ""  # logs go to stderr only
    return err


def test_every_line_is_key_value_and_no_line_per_request(tmp_path, mc):
    err = _serve(tmp_path, "--server", mc.address, seconds=0.2, calls=300)
    lines = err.splitlines()
    assert lines and all(LINE.fullmatch(line) for line in lines), err
    # Starting, ready, the server's item size, draining, stopped: nothing per request.
    assert len(lines) < 10, err


def test_a_refused_server_is_logged_as_a_refused_connect_once_per_interval(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    # Probes every 100 ms for 2.5 s: about 25 failed connects, one line (REPEAT_INTERVAL is 10 s).
    err = _serve(tmp_path, "--server", dead, seconds=2.5)
    closing = [line for line in err.splitlines() if "closing connection" in line and dead in line]
    assert closing and f"connect to {dead}: Connection refused" in closing[0], err
    assert "read from" not in err
    assert len(closing) == 1, err
    marked = [line for line in err.splitlines() if "marked down" in line]
    assert len(marked) == 1, err


def test_log_level_flag_overrides_the_config(tmp_path, mc):
    err = _serve(tmp_path, "--server", mc.address, "--log-level", "warning", seconds=0.1)
    assert "level=info" not in err and "mcbroker ready" not in err
    err = _serve(tmp_path, "--server", mc.address, seconds=0.1)
    assert "mcbroker ready" in err
