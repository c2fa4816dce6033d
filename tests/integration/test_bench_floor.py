"""bench/floor.py as a user meets it: its help, large values in pieces, several servers, frames it
does not serve, and a memcached that goes away. Real memcached processes, the floor as the bench
starts it (bench.procs.FloorServer), clientlib and a raw DEALER as its workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
from fakemc import FakeMemcached, Fault  # noqa: E402
from bench.procs import FloorServer  # noqa: E402

from clientlib import Client  # noqa: E402
from clientlib.errors import MemcacheError  # noqa: E402

BAD_REQUEST = 23  # clientlib.wire.Code.BAD_REQUEST


@pytest.fixture
def servers() -> Iterator[list[harness.Memcached]]:
    started = [harness.Memcached().start(["-I", "4m"]) for _ in range(3)]
    try:
        yield started
    finally:
        for s in started:
            s.cleanup()


# The floor as the bench runs it, and with every guarantee's work its options add (each request's
# opaque and `s` checked, a fence per write, mcbroker's receive bound): every test holds for both.
CHECKED = ("--rcvhwm", "2", "--opaques", "--fence")


@pytest.fixture(params=[(), CHECKED], ids=["plain", "checked"])
def floor(servers: list[harness.Memcached], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FloorServer]:
    f = FloorServer(tmp_path, [s.address for s in servers], flags=request.param)
    try:
        yield f
    finally:
        f.stop()


def _store_everywhere(servers: list[harness.Memcached], items: dict[str, bytes]) -> None:
    from pymemcache.client.base import Client as PmcClient

    for s in servers:
        host, _, port = s.address.rpartition(":")
        c = PmcClient((host, int(port)), timeout=5)
        try:
            for k, v in items.items():
                assert c.set(k, v, noreply=False)
        finally:
            c.close()


def _wait_until_stopped(floor: FloorServer, timeout: float = 10.0) -> None:
    """Wait (bounded) for the floor's process to end; the caller asserts that it did."""
    deadline = time.monotonic() + timeout
    while floor.proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_help_runs_and_names_every_option() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.floor", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--url", "--server", "--connections", "--max-seconds", "--rcvhwm", "--opaques", "--fence"):
        assert option in proc.stdout


def test_a_fence_without_opaques_is_refused_with_the_reason() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.floor", "--url", "ipc:///tmp/unused-floor.sock", "--server",
                           "127.0.0.1:1", "--fence"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--fence needs --opaques" in proc.stderr, proc.stderr


@pytest.mark.timeout(60)
def test_the_checked_floor_ends_when_the_fence_is_answered_as_a_hit(
    servers: list[harness.Memcached], tmp_path: Path
) -> None:
    # The fence's answer is read and checked in its place, not skipped: with the fence's key stored,
    # memcached answers it `HD O<n>`, which no request of the floor's may get, and the floor stops.
    # (The get's own answer came first and was right; its reply may or may not leave before the
    # floor's context closes with linger 0, so either outcome of the call is allowed here.)
    _store_everywhere(servers, {"k": b"v", "_mcbroker_fence_": b"x"})
    f = FloorServer(tmp_path, [s.address for s in servers], flags=CHECKED)
    client = Client(f.url, timeout=1)
    try:
        try:
            assert client.get("k") == b"v"
        except MemcacheError:
            pass
        _wait_until_stopped(f)
        assert not f.proc.alive(), "the floor served on past a wrong answer to its fence"
        assert "unexpected answer from memcached: b'HD O" in f.proc.log_tail(), f.proc.log_tail()
    finally:
        client.disconnect_all()
        f.stop()


@pytest.mark.timeout(60)
def test_large_values_in_pieces_and_values_holding_crlf_across_servers(
    servers: list[harness.Memcached], floor: FloorServer
) -> None:
    big = os.urandom(3_000_000)  # arrives in many reads
    items = {f"k{i}": b"v%d" % i for i in range(300)}
    items["big"] = big
    items["crlf"] = b"a\r\nEN\r\nVA 3 f0\r\nxyz\r\n"  # looks like answers
    _store_everywhere(servers, items)
    client = Client(floor.url, timeout=10)
    try:
        assert client.get("big") == big
        assert client.get("crlf") == items["crlf"]
        keys = list(items) + ["never-stored"]
        got = client.get_many(keys)
        assert got == items  # every value right, the miss left out
    finally:
        client.disconnect_all()


@pytest.mark.timeout(60)
def test_frames_it_does_not_serve_get_a_clear_error_and_it_keeps_serving(
    servers: list[harness.Memcached], floor: FloorServer
) -> None:
    _store_everywhere(servers, {"k": b"v"})
    client = Client(floor.url, timeout=5)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(floor.url)
    try:
        with pytest.raises(Exception, match="plain gets only"):
            client.set("x", b"y", noreply=False)
        # Frames with a request id: each gets BAD_REQUEST back.
        for req_id, frame in enumerate([
            [1, 7, 0, 0, [[1]]],               # a GET without its key
            [1, 8, 0, 0, [[1, "str key"]]],    # a key that is not bytes
            [1, 9, 0, 0, []],                  # no ops
            [1, 10, 0, 0],                     # no ops field
            [1, 11, 0, 0, [[3, b"k", b"v", 0, 0]]],  # a set
        ], start=7):
            dealer.send(msgpack.packb(frame))
            try:
                reply = msgpack.unpackb(dealer.recv())
            except zmq.Again:
                pytest.fail(f"no reply to {frame!r}; alive: {floor.proc.alive()}; log:\n{floor.proc.log_tail()}")
            assert reply[:3] == [1, req_id, BAD_REQUEST], (frame, reply)
        # Frames with nothing to answer to (not msgpack, not an array): dropped, not a crash.
        for junk in (b"\xc1not msgpack", msgpack.packb({"a": 1}), msgpack.packb(5)):
            dealer.send(junk)
        assert floor.proc.alive(), floor.proc.log_tail()
        assert client.get("k") == b"v"
        assert floor.proc.alive(), floor.proc.log_tail()
    finally:
        dealer.close()
        ctx.term()
        client.disconnect_all()


@pytest.mark.timeout(60)
def test_a_memcached_that_goes_away_ends_the_floor_with_its_reason(
    servers: list[harness.Memcached], floor: FloorServer
) -> None:
    _store_everywhere(servers, {"k": b"v"})
    servers[1].stop()
    client = Client(floor.url, timeout=1)
    try:
        # A get_many touches every server; its connection to the stopped one reads end of file.
        with pytest.raises(Exception):
            client.get_many([f"k{i}" for i in range(50)])
        _wait_until_stopped(floor)
        assert not floor.proc.alive(), "the floor kept running without one of its servers"
        assert floor.proc.popen.returncode != 0
        assert "memcached closed the connection" in floor.proc.log_tail()
    finally:
        client.disconnect_all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key, fault", [
    ("k", Fault.WRONG_OPAQUE),        # a hit carrying another request's opaque
    ("absent", Fault.WRONG_OPAQUE),   # a miss carrying another request's opaque
    ("k", Fault.WRONG_SIZE),          # a hit whose `s` is not its value's size
])
def test_the_checked_floor_stops_at_an_answer_that_is_not_its_requests(tmp_path: Path, key: str, fault: Fault) -> None:
    # Answers a real memcached never gives, from the suite's scripted one (tests/fakemc.py).
    with FakeMemcached() as fake:
        fake.store[b"k"] = (b"v", 0, 1)
        f = FloorServer(tmp_path, [fake.address], flags=("--opaques",))
        client = Client(f.url, timeout=1)
        try:
            fake.inject(fault)
            with pytest.raises(MemcacheError):
                client.get(key)  # never answered: the floor stops instead
            _wait_until_stopped(f)
            assert not f.proc.alive(), "the checked floor passed on an answer that was not its request's"
            assert "was due" in f.proc.log_tail(), f.proc.log_tail()
        finally:
            client.disconnect_all()
            f.stop()
