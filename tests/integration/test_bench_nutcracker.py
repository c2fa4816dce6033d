"""bench/procs.py's Nutcracker: free_port() only names a port that was free, and another process
can take it before nutcracker binds it (seen once with three test suites at once: nutcracker exited
1). The bench then starts it again on new ports; when it cannot, the error carries nutcracker's own
log."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import procs
from harness import Memcached

pytestmark = pytest.mark.integration


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port some other process listens on."""
    with socket.socket() as s:
        s.bind((procs.HOST, 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def test_a_listen_port_taken_first_is_replaced(
    tmp_path: Path, mc: Memcached, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[int] = []
    real = procs.free_port

    def first_taken() -> int:
        handed.append(taken if not handed else real())
        return handed[-1]

    monkeypatch.setattr(procs, "free_port", first_taken)
    n = procs.Nutcracker(tmp_path, procs.ensure_nutcracker(lambda _: None), [mc.address])
    try:
        assert n.address != f"{procs.HOST}:{taken}" and handed[0] == taken and len(handed) == 4
        assert procs.text_request(n.address, b"get bench:ready\r\n", b"END\r\n", 5.0) == b"END\r\n"
    finally:
        n.stop()


def test_when_every_attempt_fails_the_error_carries_nutcrackers_log(
    tmp_path: Path, mc: Memcached, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procs, "free_port", lambda: taken)
    with pytest.raises(procs.BenchError, match=r"(?s)nutcracker exited with .*nutcracker's log:\n.*nutcracker-\d"):
        procs.Nutcracker(tmp_path, procs.ensure_nutcracker(lambda _: None), [mc.address])
