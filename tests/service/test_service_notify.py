"""Issue 11, sd_notify against a real unix datagram socket set as NOTIFY_SOCKET (as systemd does for
Type=notify): READY=1 once bound and each server was tried, WATCHDOG=1 while WATCHDOG_USEC is set,
RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM. And sd_notify itself: one datagram,
never raises, nothing outside systemd."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from brokerproc import BrokerProcess
from broker.service import sd_notify, watchdog_interval
from harness import free_port

pytestmark = pytest.mark.integration


class Listener:
    """What systemd's notify socket receives: one message per datagram."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.got: list[tuple[float, str]] = []

    def wait_for(self, text: str, timeout: float) -> float:
        """Read datagrams until one contains `text`; when it came."""
        deadline = time.monotonic() + timeout
        while True:
            for t, m in self.got:
                if text in m.split("\n"):
                    return t
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} within {timeout}s; got {[m for _, m in self.got]}")
            self.sock.settimeout(left)
            try:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass

    def wait_for_count(self, text: str, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.messages().count(text) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"fewer than {n} {text!r} within {timeout}s; got {self.messages()}")
            self.sock.settimeout(left)
            try:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass

    def messages(self) -> list[str]:
        return [m for _, m in self.got]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path, monkeypatch):
    listener = Listener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    yield listener
    listener.close()


def test_ready_watchdog_reload_stopping(request, notify, mc, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4s: a ping every 0.2 s
    refused = f"127.0.0.1:{free_port()}"  # nothing listens: tried and not answering
    b = BrokerProcess([mc.address, refused])
    request.addfinalizer(b.cleanup)
    b.start()
    notify.wait_for("READY=1", 10)
    assert Path(b.url[len("ipc://"):]).exists(), "READY=1 before the socket was bound"
    ready_line = [line for line in b.log().splitlines() if "mcbroker ready" in line]
    assert ready_line and f"answered: {mc.address}" in ready_line[0] and f"not answering: {refused}" in ready_line[0]
    # READY=1 once, then pings from the loop while it runs (every 0.2 s: 3 within a generous 10 s).
    notify.wait_for_count("WATCHDOG=1", 3, 10)
    assert notify.messages().count("READY=1") == 1
    notify.got.clear()
    b.reload()
    notify.wait_for("RELOADING=1", 10)
    reloading = [m for m in notify.messages() if m.startswith("RELOADING=1")][0]
    assert "MONOTONIC_USEC=" in reloading  # what Type=notify-reload needs too
    notify.wait_for("READY=1", 10)
    order = [m.split("\n")[0] for m in notify.messages() if m != "WATCHDOG=1"]
    assert order == ["RELOADING=1", "READY=1"], order
    notify.got.clear()
    b.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", 10)
    assert b.proc is not None and b.proc.wait(10) == 0


def test_no_watchdog_pings_unless_asked(request, notify, mc, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    b = BrokerProcess([mc.address])
    request.addfinalizer(b.cleanup)
    b.start()
    notify.wait_for("READY=1", 10)
    time.sleep(0.5)
    b.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", 10)
    assert "WATCHDOG=1" not in notify.messages()
    assert b.proc is not None and b.proc.wait(10) == 0


# --- sd_notify itself -----------------------------------------------------------------------------


def test_sd_notify_sends_one_datagram(notify):
    assert sd_notify("READY=1") is True
    notify.wait_for("READY=1", 2)
    assert notify.messages() == ["READY=1"]


def test_sd_notify_does_nothing_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


@pytest.mark.parametrize("where", ["/nonexistent/notify.sock", "@mcbroker-test-nobody-listens", "relative", "\0bad"])
def test_sd_notify_never_raises(monkeypatch, where):
    monkeypatch.setenv("NOTIFY_SOCKET", where) if "\0" not in where else monkeypatch.setattr(os, "environ", {"NOTIFY_SOCKET": where})
    assert sd_notify("READY=1") is False


def test_sd_notify_abstract_namespace(monkeypatch):
    name = f"mcbroker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1") is True
        s.settimeout(2)
        assert s.recv(100) == b"STOPPING=1"


@pytest.mark.parametrize(
    "usec, pid, expect",
    [("400000", None, 0.2), ("0", None, None), ("", None, None), ("x", None, None), ("1000000", "self", 0.5), ("1000000", "1", None)],
)
def test_watchdog_interval(monkeypatch, usec, pid, expect):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert watchdog_interval() == expect
