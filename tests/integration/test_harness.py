"""The test harness itself: real memcached processes start, answer, pause, stop."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

import harness
from harness import Memcached, MemcachedError, MemcachedFactory
from timing import LATE

pytestmark = pytest.mark.integration

PAUSE_PROBE_S = 0.2


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _set_get(server: Memcached, key: str, value: bytes) -> bytes:
    """Store and read back one item with the text protocol over a plain socket."""
    harness.request(
        server.address,
        b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value),
        b"\r\n",
    )
    return harness.request(server.address, b"get %s\r\n" % key.encode(), b"END\r\n")


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other process is already listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((harness.HOST, 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_free_port_is_bindable() -> None:
    port = harness.free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((harness.HOST, port))


def test_memcached_fixture_answers_version(memcached: Memcached) -> None:
    assert memcached.address == f"127.0.0.1:{memcached.port}"
    assert memcached.version().startswith("1.")
    assert _pid_exists(memcached.pid)


def test_memcached_is_started_with_the_documented_settings(memcached: Memcached) -> None:
    stats = memcached.stats()
    assert stats["pid"] == str(memcached.pid)
    assert stats["threads"] == "2"
    assert stats["max_connections"] == "4096"
    settings = harness.request(memcached.address, b"stats settings\r\n", b"END\r\n").decode()
    assert "STAT item_size_max 2097152\r\n" in settings
    assert "STAT maxbytes 67108864\r\n" in settings
    assert "STAT udpport 0\r\n" in settings


def test_unix_socket_fixture_works(memcached_unix: Memcached) -> None:
    assert memcached_unix.address.startswith("unix:/")
    assert memcached_unix.unix_path is not None
    assert os.stat(memcached_unix.unix_path).st_mode & 0o777 == 0o700
    assert memcached_unix.version().startswith("1.")
    assert _set_get(memcached_unix, "k", b"over-unix") == b"VALUE k 0 9\r\nover-unix\r\nEND\r\n"


def test_factory_makes_distinct_servers_and_stops_them_all(
    memcached_factory: MemcachedFactory,
) -> None:
    servers = memcached_factory(3)
    assert len({s.port for s in servers}) == 3
    assert len({s.pid for s in servers}) == 3
    # Separate servers: data written to one is absent from the others.
    assert _set_get(servers[0], "only0", b"x") == b"VALUE only0 0 1\r\nx\r\nEND\r\n"
    assert harness.request(servers[1].address, b"get only0\r\n", b"END\r\n") == b"END\r\n"
    unix = memcached_factory(1, unix=True)[0]
    assert unix.version().startswith("1.")


def test_factory_passes_extra_args(memcached_factory: MemcachedFactory) -> None:
    (server,) = memcached_factory(1, extra_args=["-R", "7"])
    settings = harness.request(server.address, b"stats settings\r\n", b"END\r\n").decode()
    assert "STAT reqs_per_event 7\r\n" in settings


def test_mc_is_the_shared_server_flushed(
    shared_memcached: Memcached, request: pytest.FixtureRequest
) -> None:
    assert _set_get(shared_memcached, "left-over", b"1") == b"VALUE left-over 0 1\r\n1\r\nEND\r\n"
    mc = request.getfixturevalue("mc")
    assert mc is shared_memcached
    assert harness.request(mc.address, b"get left-over\r\n", b"END\r\n") == b"END\r\n"


def test_mc_resumes_a_paused_shared_server(
    shared_memcached: Memcached, request: pytest.FixtureRequest
) -> None:
    shared_memcached.pause()
    mc = request.getfixturevalue("mc")
    assert not mc.paused
    assert mc.version().startswith("1.")


def test_mc_revives_a_shared_server_a_test_broke(
    shared_memcached: Memcached, request: pytest.FixtureRequest
) -> None:
    port = shared_memcached.port
    shared_memcached.kill()
    revived = request.getfixturevalue("mc")
    assert revived.port == port
    assert revived.version().startswith("1.")


def test_pause_silences_and_resume_restores(memcached: Memcached) -> None:
    memcached.pause()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        memcached.version(timeout=PAUSE_PROBE_S)
    assert time.monotonic() - started < PAUSE_PROBE_S + LATE
    memcached.resume()
    assert memcached.version(timeout=2.0).startswith("1.")


def test_stop_leaves_no_process(memcached: Memcached) -> None:
    pid = memcached.pid
    memcached.stop()
    assert not memcached.running
    assert not _pid_exists(pid)
    with pytest.raises(OSError):
        memcached.version(timeout=0.5)
    memcached.stop()  # idempotent


def test_graceful_stop_exits_cleanly(memcached: Memcached) -> None:
    proc = memcached._proc
    assert proc is not None
    memcached.stop(graceful=True)
    assert proc.returncode == 0
    assert not _pid_exists(proc.pid)


@pytest.mark.parametrize("graceful", [False, True])
def test_stop_works_on_a_paused_server(memcached: Memcached, graceful: bool) -> None:
    pid = memcached.pid
    memcached.pause()
    started = time.monotonic()
    memcached.stop(graceful=graceful)
    # SIGTERM alone stays pending on a stopped process; the grace period must not be hit.
    assert time.monotonic() - started < 3.0
    assert not _pid_exists(pid)


def test_kill_leaves_no_process(memcached: Memcached) -> None:
    pid = memcached.pid
    memcached.kill()
    assert not _pid_exists(pid)


def test_restart_keeps_the_port_and_loses_the_data(memcached: Memcached) -> None:
    port, pid = memcached.port, memcached.pid
    assert _set_get(memcached, "k", b"v") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    memcached.restart()
    assert memcached.port == port
    assert memcached.pid != pid
    assert not _pid_exists(pid)
    assert harness.request(memcached.address, b"get k\r\n", b"END\r\n") == b"END\r\n"


def test_restart_after_a_crash(memcached: Memcached) -> None:
    memcached.kill()
    memcached.restart()
    assert memcached.version().startswith("1.")


def test_a_fixed_port_in_use_fails_with_memcached_output(held_port: int) -> None:
    server = Memcached(port=held_port)
    try:
        with pytest.raises(MemcachedError, match="already in use"):
            server.start()
        assert not server.running
    finally:
        server.cleanup()


def test_a_lost_port_race_is_retried_on_a_fresh_port(
    held_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_free_port = harness.free_port
    handed_out: list[int] = []

    def racy_free_port() -> int:
        # The first "free" port is already taken, as when another process won the race.
        port = held_port if not handed_out else real_free_port()
        handed_out.append(port)
        return port

    monkeypatch.setattr(harness, "free_port", racy_free_port)
    server = Memcached()
    try:
        server.start()
        assert handed_out[0] == held_port
        assert server.port == handed_out[-1] != held_port
        assert server.version().startswith("1.")
    finally:
        server.cleanup()


def test_bad_arguments_fail_fast_with_a_clear_error() -> None:
    server = Memcached()
    try:
        started = time.monotonic()
        with pytest.raises(MemcachedError, match="failed to start"):
            server.start(["--no-such-option"])
        assert time.monotonic() - started < 3.0
        assert not server.running
    finally:
        server.cleanup()


def test_stop_all_stops_everything_started(
    memcached_factory: MemcachedFactory, shared_memcached: Memcached
) -> None:
    servers = memcached_factory(2)
    pids = [s.pid for s in servers] + [shared_memcached.pid]
    harness.stop_all()
    assert not any(_pid_exists(pid) for pid in pids)
    assert not harness._live
    # Leave the session's shared server as later tests expect to find it.
    shared_memcached.restart()
