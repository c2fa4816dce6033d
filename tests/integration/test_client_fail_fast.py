"""No outage amplification (issue 8, item 3): with nothing listening at the broker's address a call
fails with BrokerUnavailable at once, not after its timeout; it keeps failing at once while the
broker stays away; the first call after the broker is back succeeds on the same Client; a broker
that is there but slow still gets the whole deadline.

Timing (tests/timing.py): calls have a FAST_DEADLINE (5 s) timeout and "at once" is asserted as
within FAST_DEADLINE - LATE, which a call that waited for its deadline cannot meet and a loaded
machine's pauses (up to LATE) cannot break.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clientlib import Client
from clientlib.errors import BrokerTimeout, BrokerUnavailable
from brokerproc import BrokerProcess
from harness import free_port
from timing import FAST, FAST_DEADLINE

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(120)]

TIMEOUT = FAST_DEADLINE


def failure(fn: Callable[[], Any]) -> tuple[float, BaseException]:
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the caller asserts on it
        return time.monotonic() - t0, exc
    raise AssertionError("the call succeeded")


def assert_fails_fast(c: Client, calls: int = 50) -> list[float]:
    """Every call raises BrokerUnavailable, each well before the timeout. Returns the times."""
    times = []
    for n in range(calls):
        elapsed, exc = failure(lambda: c.get(f"k{n}"))
        assert isinstance(exc, BrokerUnavailable), repr(exc)
        assert elapsed < FAST, (n, elapsed)
        times.append(elapsed)
    return times


@pytest.fixture
def tmpdir_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mcb-ff-") as d:
        yield Path(d)


def test_missing_ipc_path_fails_at_once(tmpdir_path: Path) -> None:
    c = Client(f"ipc://{tmpdir_path}/no-broker.sock", timeout=TIMEOUT)
    elapsed, exc = failure(lambda: c.get("a"))
    assert isinstance(exc, BrokerUnavailable) and elapsed < FAST, (exc, elapsed)
    assert "does not exist" in str(exc) and str(tmpdir_path) in str(exc)
    assert_fails_fast(c)
    # Every kind of call, not just get.
    for call in (lambda: c.set("a", b"1"), lambda: c.get_many(["a", "b"]), lambda: c.set("a", b"1", noreply=True),
                 lambda: c.stats(), lambda: c.delete_many(["a"])):
        elapsed, exc = failure(call)
        assert isinstance(exc, BrokerUnavailable) and elapsed < FAST, (exc, elapsed)


def test_ipc_path_that_refuses_fails_at_once(tmpdir_path: Path) -> None:
    # A socket file nobody listens on: what a broker killed with SIGKILL leaves behind.
    path = tmpdir_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    assert stat.S_ISSOCK(path.stat().st_mode)
    c = Client(f"ipc://{path}", timeout=TIMEOUT)
    elapsed, exc = failure(lambda: c.get("a"))
    assert isinstance(exc, BrokerUnavailable) and elapsed < FAST, (exc, elapsed)
    assert "refused" in str(exc)
    assert_fails_fast(c)


def test_refused_tcp_port_fails_at_once() -> None:
    port = free_port()  # free: nothing listens there
    c = Client(f"tcp://127.0.0.1:{port}", timeout=TIMEOUT)
    elapsed, exc = failure(lambda: c.get("a"))
    assert isinstance(exc, BrokerUnavailable) and elapsed < FAST, (exc, elapsed)
    assert "refused" in str(exc) and str(port) in str(exc)
    assert_fails_fast(c)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_broker_gone_fails_at_once_and_first_call_after_return_succeeds(broker: Any, how: str) -> None:
    c = Client(broker.url, timeout=TIMEOUT)
    assert c.set("survives", b"in memcached") is True
    if how == "kill":
        broker.kill()  # SIGKILL: the socket file stays, connect() is refused
    else:
        broker.stop()  # SIGTERM: drains and removes its socket file
    # ZeroMQ notices the closed connection asynchronously; the first call may still have been
    # queued on it and wait for its deadline. From then on every call fails at once.
    deadline = time.monotonic() + 3 * TIMEOUT  # room for one call that waits its deadline
    while True:
        elapsed, exc = failure(lambda: c.get("survives"))
        assert isinstance(exc, (BrokerUnavailable, BrokerTimeout)), repr(exc)
        if elapsed < FAST or time.monotonic() > deadline:
            break
    assert isinstance(exc, BrokerUnavailable) and elapsed < FAST, (exc, elapsed)
    assert_fails_fast(c)

    broker.start()  # same config, same address; start() returns once a ping is answered
    # The very first call on the old Client succeeds: no retry loop, no new Client.
    assert c.get("survives") == b"in memcached"
    for n in range(20):
        assert c.set(f"after:{n}", b"%d" % n) is True
        assert c.get(f"after:{n}") == b"%d" % n


@pytest.fixture
def tcp_broker(mc: Any) -> Iterator[BrokerProcess]:
    url = f"tcp://127.0.0.1:{free_port()}"
    b = BrokerProcess([mc.address], listen=[url])
    b.url = url  # start() waits for a ping at this address
    try:
        yield b.start()
    finally:
        b.cleanup()


def test_tcp_broker_back_first_call_succeeds(tcp_broker: BrokerProcess) -> None:
    b = tcp_broker
    url = b.url
    c = Client(url, timeout=TIMEOUT)
    assert c.set("k", b"v") is True
    b.kill()
    deadline = time.monotonic() + 3 * TIMEOUT  # room for one call that waits its deadline
    while True:
        elapsed, exc = failure(lambda: c.get("k"))
        if isinstance(exc, BrokerUnavailable) and elapsed < FAST or time.monotonic() > deadline:
            break
    assert_fails_fast(c, calls=20)
    b.start()
    assert c.get("k") == b"v"


def test_client_made_while_broker_away_works_when_it_comes(broker: Any) -> None:
    url = broker.url
    broker.stop()
    c = Client(url, timeout=TIMEOUT)
    assert_fails_fast(c, calls=10)
    broker.start()
    assert c.get("nothing-here") is None


def test_broker_there_but_slow_gets_the_whole_deadline(broker: Any) -> None:
    timeout = 0.3
    connected = Client(broker.url, timeout=FAST_DEADLINE)
    assert connected.get("a") is None  # its connection is up
    connected.timeout = timeout
    broker.pause()  # SIGSTOP: it still listens (the kernel accepts), it just does not answer
    try:
        fresh = Client(broker.url, timeout=timeout)
        for c in (connected, fresh):
            elapsed, exc = failure(lambda: c.get("a"))
            # Slow, not absent: a timeout, for a Client with a connection and for a new one.
            assert isinstance(exc, BrokerTimeout), repr(exc)
            assert elapsed >= timeout, elapsed  # not cut short by the probe
    finally:
        broker.resume()
    connected.timeout = FAST_DEADLINE  # behind the two late replies, on a loaded machine
    assert connected.get("a") is None


def _call_as_nobody(url: str) -> tuple[float, str]:
    """Call the broker from a forked child that dropped to user nobody; (seconds, error text)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            c = Client(url, timeout=TIMEOUT)
            t0 = time.monotonic()
            try:
                c.get("a")
                out = "0\nno error"
            except BrokerUnavailable as exc:
                out = f"{time.monotonic() - t0:.6f}\n{exc}"
            os.write(write_fd, out.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    elapsed, message = data.split("\n", 1)
    return float(elapsed), message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
@pytest.mark.parametrize("denied", ["socket", "directory"])
def test_access_denied_is_said_clearly(broker: Any, denied: str) -> None:
    path = broker.url[len("ipc://"):]
    directory = os.path.dirname(path)
    if denied == "socket":
        os.chmod(directory, 0o755)
        os.chmod(path, 0o700)  # connect() needs write permission on the socket
    else:
        os.chmod(directory, 0o700)
    elapsed, message = _call_as_nobody(broker.url)
    assert elapsed < FAST, elapsed
    assert path in message and "access denied" in message, message


def test_async_client_fails_fast_and_recovers(broker: Any) -> None:
    import asyncio

    from clientlib import AsyncClient

    async def main() -> tuple[list[float], Any]:
        c = AsyncClient(broker.url, timeout=TIMEOUT)
        try:
            assert await c.set("k", b"v") is True
            broker.kill()
            times = []
            deadline = time.monotonic() + 3 * TIMEOUT  # room for one call that waits its deadline
            while len(times) < 20 and time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    await c.get("k")
                except BrokerUnavailable:
                    times.append(time.monotonic() - t0)
                except BrokerTimeout:
                    pass  # sent on the dying connection before ZeroMQ noticed: waits its deadline
            broker.start()
            return times, await c.get("k")
        finally:
            await c.disconnect_all()

    times, after = asyncio.run(main())
    assert len(times) == 20 and max(times) < FAST, times
    assert after == b"v"
