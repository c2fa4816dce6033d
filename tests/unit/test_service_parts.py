"""broker/service.py in-process, part by part: each setting of the config reaches the part that
applies it, at start and on reload (README: "SIGHUP reloads the config"; what changes only on
restart is logged), the open-files limit raised when max_clients grows, the timers (retired servers
closed once empty, WATCHDOG=1 once per interval, the metrics published once a second), READY=1 and
its log line, and close() releasing the metrics endpoint.

The memcached servers are closed loopback ports (no process); the loop itself is not run here (see
test_service_running.py for the loop in front of real memcached).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from broker import config as config_mod
from broker import service
from broker.connection import READY
from broker.service import Broker
from test_service_inprocess import Made, _datagrams, closed_port, made, nofile, notify, workdir  # noqa: F401 - fixtures, shared

pytestmark = pytest.mark.unit


def free_port() -> int:
    return closed_port()


# --- settings at start ----------------------------------------------------------------------------


SETTINGS = dict(
    timeout_ms=2345, max_frame_bytes=3 << 20, max_value_bytes=100_000, on_server_down="remap",
    coalesce_reads=True, max_inflight_total=5000, max_buffered_bytes=7 << 20, max_clients=77,
    failure_limit=5, probe_interval_ms=250, probe_max_interval_ms=9000, max_inflight_per_connection=111,
    max_inflight_per_server=222, connections_per_server=3,
)


def test_every_setting_reaches_its_part_at_start(workdir: Path) -> None:
    m = Made(workdir, **SETTINGS)
    b = m.broker
    try:
        r = b.router
        assert (r.default_timeout, r.max_frame, r.max_value, r.remap, r.coalesce) == (2.345, 3 << 20, 100_000, True, True)
        assert (b.budget.max_inflight, b.budget.max_buffered) == (5000, 7 << 20)
        assert b.front.max_clients == 77 and b.front.reply_limit == 7 << 20
        (server,) = b.servers.values()
        assert len(server.conns) == 3
        assert (server.max_inflight_conn, server.max_inflight_server) == (111, 222)
        h = server.health
        assert (h.failure_limit, h._base, h._cap) == (5, 0.25, 9.0)
        assert server.budget is b.budget and server.io is b
        assert b.router.servers == [server]
        # The ZAP handler lets a connection in only after the front has counted it.
        assert b.access.before_answer == b.front.admit
        assert b.ctx.get(zmq.IO_THREADS) == 1
        assert b.config_path == str(m.path) and b.overrides == {}
        assert b._ready is False and b._stop is False and b._drain_deadline is None and b._timers_busy is True
    finally:
        b.close()


def test_on_server_down_fail_does_not_remap(workdir: Path) -> None:
    m = Made(workdir, on_server_down="fail", coalesce_reads=False)
    try:
        assert m.broker.router.remap is False and m.broker.router.coalesce is False
    finally:
        m.broker.close()


def test_the_open_files_limit_is_raised_for_max_clients_at_start(workdir: Path, nofile: tuple[int, int]) -> None:
    _, hard = nofile
    need = 900 + 2 * 4 + service.FD_HEADROOM  # two servers of 4 connections
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"this test needs a hard open-files limit of {need}, the machine has {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))
    m = Made(workdir, max_clients=900, connections_per_server=4,
             servers=[f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"])
    m.broker.close()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == need


def test_a_listener_that_cannot_bind_leaves_nothing_bound(workdir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    first = free_port()
    try:
        with pytest.raises(Exception):
            Made(workdir, listen=[f"tcp://127.0.0.1:{first}", f"tcp://127.0.0.1:{taken.getsockname()[1]}"])
        # The first address was bound and is free again.
        with socket.socket() as s:
            s.bind(("127.0.0.1", first))
    finally:
        taken.close()


def test_overrides_hold_across_a_reload(workdir: Path) -> None:
    path = workdir / "mcbroker.toml"
    url = f"ipc://{workdir}/run/b.sock"
    path.write_text(f'listen = ["{url}"]\nservers = ["127.0.0.1:{closed_port()}"]\ntimeout_ms = 1000\n')
    overrides = {"timeout_ms": 4321}
    b = Broker(config_mod.load(str(path), overrides), config_path=str(path), overrides=overrides)
    try:
        assert b.router.default_timeout == 4.321
        path.write_text(path.read_text().replace("timeout_ms = 1000", "timeout_ms = 1500\nmax_clients = 55"))
        b.reload()
        assert b.front.max_clients == 55  # the file was read again
        assert b.config.timeout_ms == 4321 and b.router.default_timeout == 4.321  # the flag still wins
    finally:
        b.close()


# --- reload -----------------------------------------------------------------------------------------


def test_reload_applies_every_reloadable_setting(made: Made) -> None:
    b = made.broker
    (name,) = b.servers
    server = b.servers[name]
    made.write(**{k: v for k, v in SETTINGS.items() if k != "connections_per_server"})
    b.reload()
    r = b.router
    assert (r.default_timeout, r.max_frame, r.max_value, r.remap, r.coalesce) == (2.345, 3 << 20, 100_000, True, True)
    assert (b.budget.max_inflight, b.budget.max_buffered) == (5000, 7 << 20)
    assert b.front.max_clients == 77
    # The large replies' bounds: all of max_buffered_bytes, and per worker at most 4 frames' worth.
    assert b.front.reply_limit == 7 << 20
    assert b.servers[name] is server
    assert (server.max_inflight_conn, server.max_inflight_server) == (111, 222)
    h = server.health
    assert (h.failure_limit, h._base, h._cap) == (5, 0.25, 9.0)
    assert b.config.timeout_ms == 2345
    # And back: every one follows the file, none is stuck at its first value.
    made.write(on_server_down="fail", coalesce_reads=False)
    b.reload()
    assert (r.remap, r.coalesce) == (False, False)


def test_reload_sets_the_per_worker_reply_bound_from_the_new_frame_size(made: Made) -> None:
    b = made.broker
    made.write(max_buffered_bytes=1 << 30, max_frame_bytes=32 << 20)
    b.reload()
    assert b.front.reply_limit == 1 << 30
    # front.py: a worker's share is max(PEER_REPLY_BYTES, 4 x max_frame_bytes), within the whole.
    from broker.front import PEER_REPLY_BYTES

    assert PEER_REPLY_BYTES < 128 << 20 and b.front.peer_reply_limit == 128 << 20


def test_reload_raises_the_open_files_limit_only_when_max_clients_grows(made: Made, nofile: tuple[int, int]) -> None:
    _, hard = nofile
    need = 2000 + 2 + service.FD_HEADROOM
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"this test needs a hard open-files limit of {need}, the machine has {hard}")
    b = made.broker
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    made.write(max_clients=b.front.max_clients)  # unchanged: the limit is left alone
    b.reload()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 300
    made.write(max_clients=2000)
    b.reload()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == need  # 2000 + 1 server x 2 + headroom


def test_reload_warns_only_about_what_did_change_and_needs_a_restart(made: Made, caplog: pytest.LogCaptureFixture) -> None:
    b = made.broker
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        made.write(timeout_ms=1200)
        b.reload()
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        made.write(metrics_listen=f"127.0.0.1:{free_port()}")
        b.reload()
    assert b.metrics is None  # not started by a reload
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["metrics_listen changes only on restart; keeping none"]


def test_reload_says_when_it_happened_in_systemd_s_clock(made: Made, notify: socket.socket) -> None:
    made.write(timeout_ms=1500)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    made.broker.reload()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = _datagrams(notify)
    reloading, usec = got[0].split(b"\n")
    assert reloading == b"RELOADING=1" and usec.startswith(b"MONOTONIC_USEC=")
    assert before <= int(usec.split(b"=")[1]) <= after  # sd_notify(3): CLOCK_MONOTONIC, in microseconds


def test_reload_logs_the_servers_and_hash_it_now_uses(made: Made, caplog: pytest.LogCaptureFixture) -> None:
    b = made.broker
    (old,) = b.servers
    added = f"127.0.0.1:{closed_port()}"
    made.write(servers=[old, added], hash="ketama")
    with caplog.at_level(logging.INFO, logger="mcbroker"):
        b.reload()
    assert f"config reloaded: servers {old}, {added}, hash ketama" in [r.getMessage() for r in caplog.records]
    assert b.snapshot()["hash"] == "ketama"


@pytest.fixture
def keys(workdir: Path) -> dict[str, Any]:
    allowed = workdir / "allowed"
    allowed.mkdir()
    _, secret = zmq.auth.create_certificates(str(workdir), "broker")
    a_pub, _ = zmq.auth.create_certificates(str(workdir), "a")
    b_pub, _ = zmq.auth.create_certificates(str(workdir), "b")
    os.rename(a_pub, allowed / "a.key")
    return {"secret": secret, "allowed": allowed, "a": zmq.auth.load_certificate(str(allowed / "a.key"))[0],
            "b_file": b_pub, "b": zmq.auth.load_certificate(b_pub)[0]}


def test_reload_rereads_the_allowed_curve_clients(workdir: Path, keys: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    m = Made(workdir, curve_secret_key_file=keys["secret"], curve_allowed_clients=str(keys["allowed"]))
    b = m.broker
    try:
        assert b.access.curve is not None and b.access.curve.allowed == frozenset({keys["a"]})
        public = b.access.curve.public
        os.rename(keys["b_file"], keys["allowed"] / "b.key")
        b.reload()
        assert b.access.curve.allowed == frozenset({keys["a"], keys["b"]})
        assert b.access.curve.public == public
        # A key file that cannot be read: the allowed clients stay, and the log says why.
        (keys["allowed"] / "junk.key").write_text("not a key\n")
        with caplog.at_level(logging.ERROR, logger="mcbroker"):
            b.reload()
        assert b.access.curve.allowed == frozenset({keys["a"], keys["b"]})
        (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert msg.startswith("CURVE keys not reloaded, keeping the allowed clients: ") and "junk.key" in msg
    finally:
        b.close()


# --- timers ------------------------------------------------------------------------------------------


def test_a_retired_server_closes_only_once_nothing_is_in_flight_on_it(made: Made, caplog: pytest.LogCaptureFixture) -> None:
    b = made.broker
    (old,) = b.servers
    server = b.servers[old]
    made.write(servers=[f"127.0.0.1:{closed_port()}"])
    b.reload()
    assert b.retiring == [server] and server.retired is True
    server.inflight_n = 1  # one request of it still in flight
    with caplog.at_level(logging.INFO, logger="mcbroker"):
        b._timers(time.monotonic())
        assert b.retiring == [server]
        server.inflight_n = 0
        b._timers(time.monotonic())
    assert b.retiring == []
    assert all(c.sock is None for c in server.conns)
    assert f"{old} closed" in [r.getMessage() for r in caplog.records]


def test_the_watchdog_is_pinged_once_per_interval(
    workdir: Path, notify: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")  # a ping every 2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    m = Made(workdir)
    b = m.broker
    try:
        b._ready = True  # (READY=1 is another test's)
        t = 1000.0
        b._timers(t)
        b._timers(t + 1.0)
        b._timers(t + 1.999)
        assert _datagrams(notify) == [b"WATCHDOG=1"]
        b._timers(t + 2.0)
        assert _datagrams(notify) == [b"WATCHDOG=1"]
    finally:
        b.close()


def test_the_metrics_are_published_once_a_second_and_closed_with_the_broker(workdir: Path) -> None:
    port = free_port()
    m = Made(workdir, metrics_listen=f"127.0.0.1:{port}", max_clients=321)
    b = m.broker
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert b.metrics is not None
        t = 1000.0
        b._timers(t)
        first = b.metrics.latest
        assert first["max_clients"] == 321
        b._timers(t + 0.999)
        assert b.metrics.latest is first  # not rebuilt within the second
        b._timers(t + 1.0)
        assert b.metrics.latest is not first
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert "mcbroker_max_clients 321.0" in resp.read().decode()
    finally:
        b.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=10)


# --- READY=1 ------------------------------------------------------------------------------------------


def test_ready_waits_while_a_server_is_still_connecting(workdir: Path, notify: socket.socket) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    m = Made(workdir, servers=[f"127.0.0.1:{listener.getsockname()[1]}"])
    b = m.broker
    try:
        (server,) = b.servers.values()
        assert all(c.state != READY and not c.attempt for c in server.conns)
        b._check_ready()
        assert b._ready is False and _datagrams(notify) == []
    finally:
        b.close()
        listener.close()


@pytest.mark.parametrize("answering", [True, False], ids=["all-answered", "none-answered"])
def test_ready_names_the_servers_that_answered_and_those_that_did_not(
    workdir: Path, notify: socket.socket, caplog: pytest.LogCaptureFixture, answering: bool
) -> None:
    urls = [f"ipc://{workdir}/run/a.sock", f"ipc://{workdir}/run/b.sock"]
    m = Made(workdir, listen=urls, servers=[f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"])
    b = m.broker
    try:
        names = ", ".join(b.servers)
        for server in b.servers.values():
            if answering:
                server.conns[0].state = READY  # as once its connect completed
            else:
                server.conns[0].attempt = 1  # as once its connect failed
        with caplog.at_level(logging.INFO, logger="mcbroker"):
            b._check_ready()
        assert b._ready is True and _datagrams(notify) == [b"READY=1"]
    finally:
        b.close()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mcbroker ready")]
    answered, silent = (names, "none") if answering else ("none", names)
    assert line == (
        f"mcbroker ready: listening on {urls[0]}, {urls[1]}; memcached answered: {answered}; "
        f"not answering: {silent}; pid {os.getpid()}"
    )


# --- the open-files limit's edges, and signals queued together ------------------------------------------


def test_a_soft_limit_exactly_what_is_needed_is_enough(nofile: tuple[int, int], caplog: pytest.LogCaptureFixture) -> None:
    _, hard = nofile
    need = 500 + 4 + service.FD_HEADROOM
    if hard != resource.RLIM_INFINITY and hard <= need:
        pytest.fail(f"this test needs a hard open-files limit above {need}, the machine has {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        service.ensure_fd_limit(500, 4)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (need, hard)
    assert caplog.records == []


def test_the_fd_limit_warning_says_the_hard_limit_and_what_to_do(
    nofile: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, hard = nofile
    if hard == resource.RLIM_INFINITY:
        pytest.fail("this test needs a finite hard open-files limit")
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        service.ensure_fd_limit(hard, 2)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg == (
        f"max_clients {hard} needs about {hard + 2 + service.FD_HEADROOM} open files, the limit is {hard} "
        f"(hard {hard}): raise LimitNOFILE= (systemd) or ulimit -n, or lower max_clients"
    )


def test_signals_queued_together_are_handled_in_the_order_they_came(
    made: Made, notify: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    b = made.broker
    made.write(timeout_ms=1700)
    b._signals.extend([signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
    with caplog.at_level(logging.INFO, logger="mcbroker"):
        b._handle_signals(100.0)
    assert b._signals == []
    assert b.config.timeout_ms == 1700  # reloaded
    assert b.router.draining is True and b._drain_deadline == 100.0 + b.config.drain_timeout_ms / 1000
    assert b._stop is True
    got = _datagrams(notify)
    assert [d.split(b"\n")[0] for d in got] == [b"RELOADING=1", b"READY=1", b"STOPPING=1"]
    msgs = [r.getMessage() for r in caplog.records]
    drain = f"SIGTERM: draining {b.budget.inflight} requests in flight, then exiting"
    assert msgs.index(drain) < msgs.index("second SIGINT: exiting now")


def test_reload_names_every_listen_address_it_keeps(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    urls = [f"ipc://{workdir}/run/a.sock", f"ipc://{workdir}/run/b.sock"]
    m = Made(workdir, listen=urls)
    try:
        m.write(listen=[f"ipc://{workdir}/run/c.sock"])
        with caplog.at_level(logging.WARNING, logger="mcbroker"):
            m.broker.reload()
    finally:
        m.broker.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"listen addresses change only on restart; keeping {urls[0]}, {urls[1]}"
    ]


def test_uptime_is_seconds_since_start_to_the_millisecond(made: Made) -> None:
    b = made.broker
    b.started = time.time() - 1.2345  # as if started that long ago
    uptime = b.snapshot()["uptime"]
    assert 1.234 <= uptime < 1.234 + 60 and uptime == round(uptime, 3) and type(uptime) is float


def test_timers_stay_busy_while_a_connection_is_connecting(workdir: Path) -> None:
    # A listener that never accepts: the connects stay pending (CONNECTING) until the loop sees them.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    m = Made(workdir, servers=[f"127.0.0.1:{listener.getsockname()[1]}"])
    b = m.broker
    try:
        (server,) = b.servers.values()
        assert server.health.is_up and b.retiring == []
        b._timers(time.monotonic())
        assert b._timers_busy is True
        assert b._poll_timeout(time.monotonic()) == round(service.TIMER_INTERVAL * 5 * 1000)
    finally:
        b.close()
        listener.close()


def test_a_failed_notify_is_logged_once_in_full(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(workdir / "nobody")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(service, "_notify_warned", False)
    with caplog.at_level(logging.WARNING, logger="mcbroker"):
        assert service.sd_notify("READY=1") is False
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"sd_notify to {path} failed: ") and "No such file or directory" in msg
    assert msg.endswith(" (further failures are not logged)")


def test_a_closed_connection_leaves_the_poll_set(workdir: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    m = Made(workdir, servers=[f"127.0.0.1:{listener.getsockname()[1]}"])
    b = m.broker
    try:
        (server,) = b.servers.values()
        fds = [c.fd for c in server.conns]
        polled = {obj for obj, _ in b.poller.sockets}
        assert all(fd in polled and b._fds[fd] is c for fd, c in zip(fds, server.conns))
        for c in server.conns:
            c.close()
        polled = {obj for obj, _ in b.poller.sockets}
        assert not any(fd in polled or fd in b._fds for fd in fds)  # a closed fd left there would wake every poll
    finally:
        b.close()
        listener.close()


def test_the_loop_polls_exactly_its_sockets_each_for_what_it_waits_on(workdir: Path) -> None:
    # The loop wakes for: a frame on each listener, a handshake on the ZAP socket, an accept or
    # disconnect on each listener's monitor, a signal's byte on the wake-up socket (all POLLIN),
    # and each memcached connection: POLLIN, plus POLLOUT while it connects or has bytes to write.
    # Anything polled for POLLOUT that is always writable (a ROUTER, stdout) would make every poll
    # return at once; anything missing would leave its events waiting for some other wake-up.
    # Only the listeners are polled as ZeroMQ sockets (zmq_poll pays two system calls per ZeroMQ
    # socket per call); the ZAP socket and the monitors by their ZMQ_FD descriptors.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    urls = [f"ipc://{workdir}/run/a.sock", f"ipc://{workdir}/run/b.sock"]
    m = Made(workdir, listen=urls, servers=[f"127.0.0.1:{listener.getsockname()[1]}"])
    b = m.broker
    try:
        (server,) = b.servers.values()
        assert len(b.front.sockets) == 2 and len(b.front.monitors) == 2
        expected: dict[Any, int] = {sock: zmq.POLLIN for sock in b.front.sockets}
        expected[b.access.zap.getsockopt(zmq.FD)] = zmq.POLLIN
        expected.update({mon.getsockopt(zmq.FD): zmq.POLLIN for mon in b.front.monitors})
        expected[b._wake_r.fileno()] = zmq.POLLIN
        # The connects are pending (the listener never accepts): read and write.
        expected.update({c.fd: zmq.POLLIN | zmq.POLLOUT for c in server.conns})
        assert len(b.poller.sockets) == len(expected)
        assert dict(b.poller.sockets) == expected
    finally:
        b.close()
        listener.close()


def test_the_ipc_listener_gets_the_configured_mode_and_group(workdir: Path) -> None:
    # socket_mode and socket_group reach the front: the socket file's permissions say who may
    # connect (README, "Configuration"). A group other than ours, given by number, so no group
    # database is needed; root (these tests' user) may give any.
    gid = os.getgid() + 1 if os.geteuid() == 0 else os.getgid()
    m = Made(workdir, socket_mode="0600", socket_group=str(gid))
    try:
        st = os.stat(m.url[len("ipc://"):])
        assert (st.st_mode & 0o777, st.st_gid) == (0o600, gid)
    finally:
        m.broker.close()
