"""broker/service.py in-process: systemd's notify and watchdog protocol, the open-files limit, the
poll timeout, signals (recorded by the handler, acted on by the loop: drain on SIGTERM, exit on the
second, reload on SIGHUP), reload itself, the stats snapshot, and the loop run for real in this
process: a PING answered, SIGTERM, a frame after it refused, the sockets closed.

The broker's memcached server is a closed loopback port (connections are refused), so no process
is started; what needs a live memcached is tested through broker processes elsewhere.
"""

from __future__ import annotations

import heapq
import re
import logging
import os
import resource
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import config as config_mod
from broker import service
from broker.service import IDLE_POLL_MS, TIMER_INTERVAL, Broker, ensure_fd_limit, sd_notify, watchdog_interval
from clientlib.wire import Code, Op, decode_reply, encode_request
from timing import LATE

pytestmark = pytest.mark.unit


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mcb-svc-") as d:
        yield Path(d)


class Made:
    def __init__(self, workdir: Path, **settings: Any) -> None:
        self.path = workdir / "mcbroker.toml"
        self.url = f"ipc://{workdir}/run/b.sock"
        self.settings = {"listen": [self.url], "servers": [f"127.0.0.1:{closed_port()}"], **settings}
        self.write()
        self.broker = Broker(config_mod.load(str(self.path)), config_path=str(self.path))

    def write(self, **changes: Any) -> None:
        self.settings.update(changes)
        lines = []
        for k, v in self.settings.items():
            if isinstance(v, list):
                lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            else:
                lines.append(f"{k} = {v}")
        self.path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def made(workdir: Path) -> Iterator[Made]:
    m = Made(workdir)
    yield m
    if m.broker.ctx.closed is False:
        m.broker.close()


# --- systemd's protocols ------------------------------------------------------------------------


def test_sd_notify_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_sends_one_datagram(monkeypatch: pytest.MonkeyPatch, workdir: Path, abstract: bool) -> None:
    # sd_notify(3): $NOTIFY_SOCKET names an AF_UNIX datagram socket; "@" starts an abstract name.
    name = f"@mcb-notify-{os.getpid()}" if abstract else str(workdir / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name[1:] if abstract else name)
    rx.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sd_notify("READY=1") is True
        assert rx.recv(4096) == b"READY=1"
        assert sd_notify("STOPPING=1") is True
        assert rx.recv(4096) == b"STOPPING=1"
    finally:
        rx.close()


def test_sd_notify_to_nobody_never_raises_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(workdir / "nobody"))
    monkeypatch.setattr(service, "_notify_warned", False)
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        assert sd_notify("WATCHDOG=1") is False
        assert sd_notify("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(warnings) == 1 and str(workdir / "nobody") in warnings[0].getMessage()


@pytest.mark.parametrize(
    "usec, pid, expected",
    [
        (None, None, None),
        ("0", None, None),
        ("abc", None, None),
        ("-5", None, None),
        ("10000000", None, 5.0),  # half of WatchdogSec=10s
        ("3000000", "own", 1.5),
        ("3000000", "other", None),  # meant for another process
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_when_meant_for_us(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    # sd_watchdog_enabled(3): WATCHDOG_USEC, and WATCHDOG_PID when set must be our pid.
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", {"own": str(os.getpid()), "other": "1"}.get(pid or ""))):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert watchdog_interval() == expected


# --- the open-files limit -----------------------------------------------------------------------


@pytest.fixture
def nofile() -> Iterator[tuple[int, int]]:
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_the_soft_limit_is_raised_to_what_max_clients_needs(nofile: tuple[int, int]) -> None:
    _, hard = nofile
    need = 1000 + 8 + service.FD_HEADROOM
    if hard != resource.RLIM_INFINITY and hard < need + 10:
        pytest.fail(f"this test needs a hard open-files limit above {need + 10}, the machine has {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    ensure_fd_limit(1000, 8)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (need, hard)
    # Already enough: left as it is.
    ensure_fd_limit(10, 2)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (need, hard)


def test_a_hard_limit_too_low_is_used_whole_and_logged(nofile: tuple[int, int], caplog: pytest.LogCaptureFixture) -> None:
    _, hard = nofile
    if hard == resource.RLIM_INFINITY:
        pytest.fail("this test needs a finite hard open-files limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        ensure_fd_limit(hard, 8)  # needs hard + 8 + FD_HEADROOM
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    (record,) = [r for r in caplog.records if "max_clients" in r.getMessage()]
    msg = record.getMessage()
    assert f"needs about {hard + 8 + service.FD_HEADROOM} open files" in msg and f"the limit is {hard}" in msg
    assert "LimitNOFILE=" in msg


# --- the poll timeout ---------------------------------------------------------------------------


class _Job:
    done = False


def test_poll_timeout_idle_busy_dirty_and_deadline(made: Made) -> None:
    b = made.broker
    now = time.monotonic()
    b._timers_busy = False
    b.budget.inflight = 0  # (the connects to the closed port count while they last)
    assert b._poll_timeout(now) == IDLE_POLL_MS == 250
    b.budget.inflight = 1
    assert b._poll_timeout(now) == round(TIMER_INTERVAL * 5 * 1000) == 50
    b.budget.inflight = 0
    b._timers_busy = True
    assert b._poll_timeout(now) == 50
    # A deadline sooner than that: woken for it, rounded up to the next millisecond.
    heapq.heappush(b.router._deadlines, (now + 0.0071, 0, _Job()))
    assert b._poll_timeout(now) == 8
    # One already past: no wait.
    assert b._poll_timeout(now + 1.0) == 0
    b._dirty.append(b.servers[next(iter(b.servers))].conns[0])
    assert b._poll_timeout(now) == 0
    b._dirty.clear()


# --- signals and reload ---------------------------------------------------------------------------


def test_sigterm_drains_and_a_second_one_exits(made: Made) -> None:
    b = made.broker
    now = 1000.0
    b._signals.append(signal.SIGTERM)
    b._handle_signals(now)
    assert b.router.draining is True
    assert b._drain_deadline == now + b.config.drain_timeout_ms / 1000
    assert b._stop is False
    b._signals.append(signal.SIGINT)
    b._handle_signals(now + 1)
    assert b._stop is True
    assert b._drain_deadline == now + b.config.drain_timeout_ms / 1000  # unchanged


def test_the_handler_only_records(made: Made) -> None:
    b = made.broker
    b._on_signal(signal.SIGHUP, None)
    assert b._signals == [signal.SIGHUP] and b.router.draining is False


def test_sighup_reloads_the_file(made: Made) -> None:
    b = made.broker
    made.write(timeout_ms=2500, max_clients=99, coalesce_reads=True, max_frame_bytes=1 << 20)
    b._signals.append(signal.SIGHUP)
    b._handle_signals(time.monotonic())
    assert b.config.timeout_ms == 2500
    assert b.router.default_timeout == 2.5
    assert b.router.coalesce is True
    assert b.router.max_frame == 1 << 20
    assert b.front.max_clients == 99
    assert b._drain_deadline is None and b.router.draining is False


def test_a_bad_config_on_reload_keeps_the_running_one(made: Made, caplog: pytest.LogCaptureFixture) -> None:
    b = made.broker
    before = b.config
    made.write(timeout_ms=-1)
    with caplog.at_level(logging.ERROR, logger="mcbroker"):
        b.reload()
    assert b.config is before
    assert any("reload rejected, keeping the running config" in r.getMessage() and "timeout_ms" in r.getMessage()
               for r in caplog.records)


def test_reload_keeps_servers_that_stay_adds_new_ones_and_retires_the_rest(made: Made) -> None:
    b = made.broker
    (old_name,) = b.servers
    kept = b.servers[old_name]
    added = f"127.0.0.1:{closed_port()}"
    made.write(servers=[old_name, added], failure_limit=7, max_inflight_per_connection=300, max_inflight_per_server=700)
    b.reload()
    assert list(b.servers) == [old_name, added]
    assert b.servers[old_name] is kept
    assert (kept.max_inflight_conn, kept.max_inflight_server, kept.health.failure_limit) == (300, 700, 7)
    made.write(servers=[added])
    b.reload()
    assert list(b.servers) == [added]
    assert b.retiring == [kept] and kept.retired is True


def test_reload_warns_about_what_changes_only_on_restart(made: Made, caplog: pytest.LogCaptureFixture) -> None:
    b = made.broker
    made.write(listen=[made.url.replace("b.sock", "other.sock")])
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        b.reload()
    assert any("listen addresses change only on restart; keeping " + made.url in r.getMessage() for r in caplog.records)
    assert b.front.urls == (made.url,)


# --- the snapshot (stats) -----------------------------------------------------------------------


def test_snapshot_says_what_the_broker_is(made: Made) -> None:
    s = made.broker.snapshot()
    assert s["pid"] == os.getpid()
    assert s["hash"] == "rendezvous"
    assert s["connected_workers"] == 0
    assert s["max_clients"] == 1024
    assert s["inflight"] == made.broker.budget.inflight and s["buffered_bytes"] == made.broker.budget.buffered
    assert s["backend_writes"] == 0 and s["requests_written"] == 0 and s["requests_per_write"] == 0.0
    assert s["draining"] is False
    assert list(s["servers"]) == list(made.broker.servers)
    assert s["rss_bytes"] > 0 and s["uptime"] >= 0
    assert made.broker._local(Op.PING) == "PONG"
    assert made.broker._local(Op.BROKER_STATS)["pid"] == os.getpid()


# --- the loop, run in this process ------------------------------------------------------------------


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    signal.set_wakeup_fd(-1)


def _call(sock: zmq.Socket[Any], req_id: int, op: list[Any]) -> Any:
    sock.send(encode_request(req_id, [op], 5000))
    if not sock.poll(10_000):
        raise AssertionError(f"no reply to request {req_id} within 10 s")
    return decode_reply(sock.recv())


def test_the_loop_answers_then_drains_on_sigterm_and_refuses_what_comes_after(
    made: Made, restore_signals: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing is in flight, so the drain ends on the loop's first turn after SIGTERM and close()
    # answers frames only until none came for CLOSE_QUIET_MS: the worker thread's second frame
    # must arrive within that, on a machine that may keep a thread off the CPU for LATE.
    monkeypatch.setattr(service, "CLOSE_QUIET_MS", int(2 * LATE * 1000))
    monkeypatch.setattr(service, "CLOSE_LINGER_MS", 30_000)
    b = made.broker
    ctx: zmq.Context[Any] = zmq.Context()
    replies: dict[str, Any] = {}
    errors: list[BaseException] = []

    def worker() -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(made.url)
            replies["ping"] = _call(sock, 1, [Op.PING])
            os.kill(os.getpid(), signal.SIGTERM)
            replies["after"] = _call(sock, 2, [Op.PING])
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            sock.close(linger=0)

    t = threading.Thread(target=worker)
    t.start()
    started = time.monotonic()
    try:
        b.run()  # returns once drained: nothing was in flight
    finally:
        t.join(15)
        ctx.destroy(linger=0)
    assert not errors, errors
    assert time.monotonic() - started < 60
    ping = replies["ping"]
    assert (ping.req_id, ping.code, ping.payload) == (1, Code.OK, [[Code.OK, "PONG"]])
    after = replies["after"]
    assert after.req_id == 2 and after.code == Code.SHUTTING_DOWN and "shutting down" in after.payload
    assert b.router.draining is True
    assert b.ctx.closed is True
    assert not os.path.exists(made.url[len("ipc://"):])


# --- the snapshot against the README's Stats table, and the signals' notices -------------------------


def _documented_stats() -> tuple[set[str], set[str]]:
    """The field names of the README's "## Stats" table: (broker-wide, per server)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Stats\n", 1)[1].split("\n## ", 1)[0]
    top: set[str] = set()
    per_server: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        for name in re.findall(r"`([^`]+)`", first_cell):
            if name.startswith("servers.<host:port>."):
                per_server.add(name[len("servers.<host:port>."):])
            elif name.startswith("."):
                per_server.add(name[1:])
            else:
                top.add(name)
    return top, per_server


def test_the_snapshot_has_exactly_the_fields_the_readme_documents(made: Made) -> None:
    top, per_server = _documented_stats()
    s = made.broker.snapshot()
    assert set(s) - {"servers"} == top
    (server,) = s["servers"].values()
    assert set(server) == per_server


def test_snapshot_values_follow_their_definitions(made: Made) -> None:
    b = made.broker
    server = next(iter(b.servers.values()))
    server.stats.writes, server.stats.written = 4, 10
    b.front.bad_envelopes, b.front.reply_bytes, b.front.replies_over_limit = 3, 70000, 2
    b.front.clients_refused = 5
    s = b.snapshot()
    assert (s["backend_writes"], s["requests_written"], s["requests_per_write"]) == (4, 10, 2.5)
    server.stats.writes, server.stats.written = 3, 10
    assert b.snapshot()["requests_per_write"] == 3.33  # rounded to 2 places
    assert (s["bad_envelopes"], s["reply_bytes_pending"], s["replies_over_limit"], s["clients_refused"]) == (3, 70000, 2, 5)
    assert (s["curve_accepted"], s["curve_refused"]) == (b.access.accepted, b.access.refused) == (0, 0)
    assert 0 <= s["uptime"] < 60 and s["uptime"] == round(s["uptime"], 3)
    assert s["version"] == service.VERSION


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> Iterator[socket.socket]:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(workdir / "notify"))
    rx.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(workdir / "notify"))
    yield rx
    rx.close()


def _datagrams(rx: socket.socket) -> list[bytes]:
    out = []
    rx.setblocking(False)
    try:
        while True:
            out.append(rx.recv(4096))
    except BlockingIOError:
        return out
    finally:
        rx.settimeout(5)


def test_sigterm_tells_systemd_stopping_and_logs_the_drain(
    made: Made, notify: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    b = made.broker
    b.budget.inflight = 3
    with caplog.at_level(logging.INFO, logger="mcbroker"):
        b._signals.append(signal.SIGTERM)
        b._handle_signals(10.0)
        b._signals.append(signal.SIGINT)
        b._handle_signals(11.0)
    b.budget.inflight = 0
    assert _datagrams(notify) == [b"STOPPING=1"]  # sd_notify(3): once, when the drain starts
    lines = [r.getMessage() for r in caplog.records]
    assert "SIGTERM: draining 3 requests in flight, then exiting" in lines
    assert "second SIGINT: exiting now" in lines


def test_reload_tells_systemd_reloading_then_ready(made: Made, notify: socket.socket) -> None:
    made.write(timeout_ms=1500)
    made.broker.reload()
    got = _datagrams(notify)
    # sd_notify(3): RELOADING=1 with MONOTONIC_USEC (the time of the reload), then READY=1.
    assert len(got) == 2 and got[1] == b"READY=1"
    first = got[0].split(b"\n")
    assert first[0] == b"RELOADING=1" and first[1].startswith(b"MONOTONIC_USEC=")
    usec = int(first[1].split(b"=")[1])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 60_000_000


def test_a_rejected_reload_tells_systemd_nothing(made: Made, notify: socket.socket) -> None:
    made.write(hash="no-such-hash")
    made.broker.reload()
    assert _datagrams(notify) == []
