"""A flooding worker process for the memory-bound tests (tests/fault/test_flood.py,
test_max_clients.py): raw DEALERs (ZeroMQ's defaults: reconnect every 100 ms) sending large sets
as fast as they can, never reading a reply."""

from __future__ import annotations

import time
from typing import Any

import zmq

from clientlib.wire import Op, encode_request


def flood(url: str, sockets: int, seconds: float, stop: Any, sent: Any, value_bytes: int) -> None:
    """`sockets` DEALERs to `url`, each sending sets of `value_bytes` until `seconds` pass or `stop`
    (a multiprocessing Event) is set; adds the frames sent to `sent` (a multiprocessing Value)."""
    ctx = zmq.Context()
    socks = []
    for _ in range(sockets):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 4)  # bounds this process's memory, not the broker's
        s.connect(url)
        socks.append(s)
    value = b"f" * value_bytes
    frames = [encode_request(i, [[Op.SET, b"flood:%d" % i, value, 0, 0]]) for i in range(sockets)]
    n = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and not stop.is_set():
            progressed = False
            for s, data in zip(socks, frames):
                try:
                    s.send(data, zmq.NOBLOCK, copy=False)
                    n += 1
                    progressed = True
                except zmq.Again:
                    pass
            if not progressed:
                time.sleep(0.001)
    finally:
        with sent.get_lock():
            sent.value += n
        for s in socks:
            s.close(linger=0)
        ctx.term()
