"""Every exception that leaves clientlib is one of its own documented types (issue 8, item 4).

Walks the failure paths with real processes: no broker, a broker stopped (SIGSTOP) and killed, a
bad address, the ZeroMQ context closed (in a forked child too), a socket closed under the client,
an oversize frame; for Client and AsyncClient. Each failure must be a MemcacheError subclass from
clientlib.errors (TypeError/ValueError only for a programming error in the call), never one from
zmq, msgpack or socket.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import clientlib.errors
from clientlib import AsyncClient, Client
from clientlib import transport
from clientlib.errors import BrokerTimeout, BrokerUnavailable, MemcacheError

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(120)]

DOCUMENTED = {getattr(clientlib.errors, name) for name in clientlib.errors.__all__}


def outcome(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the caller checks the type
        return exc
    return None


def assert_ours(exc: BaseException | None, *allowed: type[MemcacheError]) -> None:
    assert exc is not None, "the call did not fail"
    assert type(exc) in DOCUMENTED, f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    if allowed:
        assert isinstance(exc, allowed), repr(exc)


CALLS: dict[str, Callable[[Any], Any]] = {
    "get": lambda c: c.get("a"),
    "set": lambda c: c.set("a", b"1"),
    "set noreply": lambda c: c.set("a", b"1", noreply=True),
    "get_many": lambda c: c.get_many(["a", "b"]),
    "set_many": lambda c: c.set_many({"a": b"1", "b": b"2"}),
    "incr": lambda c: c.incr("n", 1),
    "stats": lambda c: c.stats(),
    "version": lambda c: c.version(),
}


@pytest.fixture
def nowhere() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mcb-err-") as d:
        yield f"ipc://{d}/no-broker.sock"


def run_async(url: str, name: str, timeout: float = 0.3) -> BaseException | None:
    async def main() -> BaseException | None:
        c = AsyncClient(url, timeout=timeout)
        try:
            try:
                await CALLS[name](c)
            except BaseException as exc:  # noqa: BLE001
                return exc
            return None
        finally:
            await c.disconnect_all()

    return asyncio.run(main())


@pytest.mark.parametrize("name", list(CALLS))
def test_no_broker(nowhere: str, name: str) -> None:
    assert_ours(outcome(lambda: CALLS[name](Client(nowhere, timeout=0.3))), BrokerUnavailable)
    assert_ours(run_async(nowhere, name), BrokerUnavailable)


def test_broker_stopped_and_killed(broker: Any) -> None:
    c = Client(broker.url, timeout=0.2)
    # The first call also connects: on a loaded machine that alone can outlast 0.2 s.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert c.set("a", b"1") is True
            break
        except BrokerTimeout:
            assert time.monotonic() < deadline, "the broker never answered a set within 0.2 s"
    broker.pause()
    try:
        for name in CALLS:
            if name != "set noreply":  # queued in the broker's socket: it does not fail
                assert_ours(outcome(lambda: CALLS[name](c)), BrokerTimeout)
                assert_ours(run_async(broker.url, name, 0.2), BrokerTimeout, BrokerUnavailable)
    finally:
        broker.resume()
    broker.kill()
    for name in CALLS:
        assert_ours(outcome(lambda: CALLS[name](c)), BrokerTimeout, BrokerUnavailable)
        assert_ours(run_async(broker.url, name, 0.2), BrokerTimeout, BrokerUnavailable)


def test_bad_address_is_a_value_error_at_construction() -> None:
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError):
            make("127.0.0.1:11211")


def test_context_closed_under_the_client(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A context of this test's own: the process's context also holds the sockets of every client
    # earlier tests in this process left open, and those of AsyncClients (made on a shadow of it,
    # which destroy() does not see). destroy() then waited for ever for them to close (zmq_ctx_term),
    # once, after another file's tests on the same xdist worker; every later test there failed.
    monkeypatch.setattr(transport, "_context", None)
    c = Client(broker.url, timeout=2.0)
    assert c.set("a", b"1") is True
    transport.context().destroy(linger=0)  # e.g. user code tearing ZeroMQ down
    # The transport notices the closed context and socket and opens new ones.
    assert c.get("a") == b"1"


def test_socket_closed_under_the_client(broker: Any) -> None:
    c = Client(broker.url, timeout=2.0)
    assert c.set("a", b"1") is True
    c._transport._state().sock.close(linger=0)
    assert c.get("a") == b"1"


def test_context_closed_in_a_forked_child(broker: Any) -> None:
    c = Client(broker.url, timeout=2.0)
    assert c.set("a", b"parent") is True
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            results = []
            results.append(repr(c.get("a")))
            transport.context().destroy(linger=0)  # the child's own context, closed
            for fn in (lambda: c.get("a"), lambda: c.set("a", b"child"), lambda: c.get("a")):
                try:
                    results.append(repr(fn()))
                except BaseException as exc:  # noqa: BLE001
                    results.append(f"{type(exc).__module__}.{type(exc).__name__}")
            os.write(write_fd, "|".join(results).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        got = f.read().decode().split("|")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == ["b'parent'", "b'parent'", "True", "b'child'"], got
    assert c.get("a") == b"child"  # the parent's client is untouched by the child's teardown


def test_oversize_frame(broker: Any) -> None:
    c = Client(broker.url, timeout=2.0, max_frame_bytes=1 << 16)
    for fn in (lambda: c.add("a", b"x" * (1 << 17)), lambda: c.set("a", b"x" * (1 << 17))):
        assert_ours(outcome(fn))

    async def main() -> BaseException | None:
        ac = AsyncClient(broker.url, timeout=2.0, max_frame_bytes=1 << 16)
        try:
            await ac.add("a", b"x" * (1 << 17))
        except BaseException as exc:  # noqa: BLE001
            return exc
        finally:
            await ac.disconnect_all()
        return None

    assert_ours(asyncio.run(main()))
