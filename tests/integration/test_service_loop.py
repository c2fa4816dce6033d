"""broker/service.py's signal, reload and drain logic in this process: a real Broker object (its
ZeroMQ front end bound to a private ipc path, its memcached connections pointed at a loopback port
where nothing listens), no subprocess.

The rules (README "Signals", service.py's docstring): a signal handler only records the signal;
the loop then drains on the first SIGTERM/SIGINT (new frames get "broker is shutting down",
requests in flight finish, the loop ends when none is left or at the drain deadline), exits at
once on the second, and reloads on SIGHUP (an invalid config is rejected and the old one kept).
"""

from __future__ import annotations

import os
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
from broker.service import IDLE_POLL_MS, Broker
from clientlib.wire import Code, Op, decode_reply, encode_request

pytestmark = pytest.mark.integration  # in-process, but with real ZeroMQ and TCP sockets


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def made() -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mcb-svc-") as d:
        url = f"ipc://{d}/b.sock"
        path = Path(d) / "mcbroker.toml"
        port = closed_port()
        path.write_text(f'listen = ["{url}"]\nservers = ["127.0.0.1:{port}"]\ntimeout_ms = 1000\n')
        c = config_mod.load(str(path))
        b = Broker(c, config_path=str(path))
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            yield {"broker": b, "url": url, "path": path, "port": port}
        finally:
            if not b.ctx.closed:
                b.close()
            for s, h in handlers.items():
                signal.signal(s, h)


def test_a_signal_handler_only_records(made: dict[str, Any]) -> None:
    b: Broker = made["broker"]
    b._on_signal(signal.SIGTERM, None)
    b._on_signal(signal.SIGHUP, None)
    assert b._signals == [signal.SIGTERM, signal.SIGHUP]
    assert not b.router.draining and b._drain_deadline is None and not b._stop


def test_first_sigterm_drains_with_a_deadline_and_the_second_stops(made: dict[str, Any]) -> None:
    b: Broker = made["broker"]
    b._signals = [signal.SIGTERM]
    b._handle_signals(50.0)
    drain = b.config.drain_timeout_ms / 1000
    assert b.router.draining and b._drain_deadline == 50.0 + drain and not b._stop
    assert b._signals == []
    b._signals = [signal.SIGINT]
    b._handle_signals(51.0)
    assert b._stop and b._drain_deadline == 50.0 + drain


def test_sighup_reloads_the_config_file_and_an_invalid_one_is_rejected(made: dict[str, Any]) -> None:
    b: Broker = made["broker"]
    path: Path = made["path"]
    text = path.read_text()
    path.write_text(text.replace("timeout_ms = 1000", "timeout_ms = 250"))
    b._signals = [signal.SIGHUP]
    b._handle_signals(1.0)
    assert b.router.default_timeout == 0.25 and b.config.timeout_ms == 250
    assert not b.router.draining
    path.write_text(text.replace("timeout_ms = 1000", "timeout_ms = -5"))
    b._signals = [signal.SIGHUP]
    b._handle_signals(2.0)
    assert b.router.default_timeout == 0.25 and b.config.timeout_ms == 250  # kept


def test_reload_keeps_unchanged_servers_and_retires_removed_ones(made: dict[str, Any]) -> None:
    b: Broker = made["broker"]
    path: Path = made["path"]
    old_name = next(iter(b.servers))
    kept = b.servers[old_name]
    other = closed_port()
    path.write_text(path.read_text().replace(f'servers = ["{old_name}"]', f'servers = ["{old_name}", "127.0.0.1:{other}"]'))
    b.reload()
    assert b.servers[old_name] is kept and len(b.servers) == 2 and b.retiring == []
    path.write_text(path.read_text().replace(f'"{old_name}", ', ""))
    b.reload()
    assert list(b.servers) == [f"127.0.0.1:{other}"] and b.retiring == [kept] and kept.retired


def test_poll_timeout_is_zero_with_writes_pending_and_bounded_by_the_next_deadline(made: dict[str, Any]) -> None:
    b: Broker = made["broker"]
    b._timers_busy = False
    # Each new connection's `stats settings` is in flight: timers every 5 x TIMER_INTERVAL.
    assert b.budget.inflight > 0 and b._poll_timeout(0.0) == round(service.TIMER_INTERVAL * 5 * 1000)
    inflight, b.budget.inflight = b.budget.inflight, 0
    assert b._poll_timeout(0.0) == IDLE_POLL_MS  # idle: the long poll
    b.budget.inflight = inflight
    b._dirty.append(next(iter(b.servers.values())).conns[0])
    assert b._poll_timeout(0.0) == 0
    b._dirty.clear()
    # A frame whose deadline is 30 ms away: the poll wakes for it (rounded up to whole ms).
    b.router.handle(b.front.sockets[0], b"nobody", encode_request(1, [[Op.GET, b"k"]], 30), 10.0)
    assert b._poll_timeout(10.0) in (30, 31)
    assert b._poll_timeout(10.5) == 0


def _run(b: Broker, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    # run() installs signal handlers and the wakeup fd, which only the main thread may do: run the
    # loop in a thread without them; the test records signals by calling _on_signal directly and
    # wakes the poll as signal.set_wakeup_fd would.
    monkeypatch.setattr(b, "_install_signals", lambda: None)
    monkeypatch.setattr(service.signal, "set_wakeup_fd", lambda *a, **k: -1)
    t = threading.Thread(target=b.run, kwargs={"ready_message": False}, daemon=True)
    t.start()
    return t


def _call(sock: zmq.Socket[Any], req_id: int, ops: list[list[Any]], timeout_ms: int) -> Any:
    sock.send(encode_request(req_id, ops, timeout_ms))
    assert sock.poll(10_000), f"no reply to {req_id}"
    return decode_reply(sock.recv())


def test_drain_refuses_new_frames_answers_the_held_one_then_the_loop_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that accepts connections (the kernel's backlog) and never answers: a get sent to it
    # stays in flight until its deadline, so the drain has something to wait for.
    with socket.socket() as silent, tempfile.TemporaryDirectory(prefix="mcb-svc-") as d:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"ipc://{d}/b.sock"
        c = config_mod.from_mapping({
            "listen": [url], "servers": [f"127.0.0.1:{silent.getsockname()[1]}"], "io_timeout_ms": 4000,
            "failure_limit": 1000,
        })
        b = Broker(c)
        t = _run(b, monkeypatch)
        ctx = zmq.Context.instance()
        held, fresh = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        try:
            for s in (held, fresh):
                s.setsockopt(zmq.LINGER, 0)
                s.connect(url)
            assert _call(fresh, 1, [[Op.PING]], 5000).payload == [[Code.OK, "PONG"]]
            # Deadline and io timeout (which runs from the broker's first write to the silent
            # server, at start) outlast what follows by more than LATE: the get must still be
            # in flight when the drain has begun and refused a new frame.
            held.send(encode_request(2, [[Op.GET, b"k"]], 4000))
            assert not held.poll(300)  # in flight, unanswered
            b._on_signal(signal.SIGTERM, None)
            os.write(b._wake_w.fileno(), b"\0")
            # The loop takes a signal at the end of a turn, after that turn's frames: a frame sent
            # before it has begun to drain may still be served. Wait for the drain to begin.
            end = time.monotonic() + 5
            while not b.router.draining and time.monotonic() < end:
                time.sleep(0.005)
            assert b.router.draining
            refused = _call(fresh, 3, [[Op.PING]], 5000)
            assert refused.req_id == 3 and refused.code == Code.SHUTTING_DOWN
            assert "shutting down" in str(refused.payload)
            assert t.is_alive()  # still draining: the held get has no answer yet
            assert held.poll(10_000)
            answer = decode_reply(held.recv())
            assert answer.req_id == 2 and answer.payload[0][0] == Code.TIMEOUT  # its one outcome
            t.join(c.drain_timeout_ms / 1000 + 10)
            assert not t.is_alive(), "the loop did not end after draining"
        finally:
            held.close(linger=0)
            fresh.close(linger=0)
            if t.is_alive():
                b._stop = True
                t.join(10)


def test_close_answers_every_frame_already_received_with_shutting_down(made: dict[str, Any]) -> None:
    b: Broker = made["broker"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(made["url"])
        sock.send(encode_request(9, [[Op.GET, b"k"]], 5000))
        front = b.front.sockets[0]
        # Received by the broker's socket, not yet read by the loop. The handshake waits for the
        # ZAP handler (max_clients), which the loop runs: answer it here, as the loop would.
        deadline = time.monotonic() + 10
        while not front.poll(10):
            assert time.monotonic() < deadline, "the frame never reached the broker's socket"
            b.access.on_zap()
        b.close()
        assert sock.poll(10_000)
        reply = decode_reply(sock.recv())
        assert reply.req_id == 9 and reply.code == Code.SHUTTING_DOWN
    finally:
        sock.close(linger=0)


def test_sd_notify_writes_the_state_to_the_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="mcb-sd-") as d:
        path = f"{d}/notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            service.sd_notify("READY=1")
            assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    service.sd_notify("READY=1")  # outside systemd: nothing, no error
