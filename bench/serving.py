"""What the bench's own servers (bench/echo.py, bench/floor.py) share: a loopback-only address, a
stop flag that SIGTERM and SIGINT only set (the loop checks it), a ROUTER bound with linger 0."""

from __future__ import annotations

import argparse
import signal
from typing import Any

import zmq


def check_url(parser: argparse.ArgumentParser, url: str) -> None:
    """Exit with a usage error unless `url` is ipc:// or tcp:// on 127.0.0.1."""
    if not url.startswith(("ipc://", "tcp://127.0.0.1:")):
        parser.error("--url must be ipc:// or tcp://127.0.0.1:PORT")


class StopFlag:
    """Set by SIGTERM or SIGINT once installed; the handler does nothing else."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.set = True


def bound_router(ctx: zmq.Context[Any], url: str, rcvhwm: int = 0) -> zmq.Socket[Any]:
    """A ROUTER bound to `url` that drops what it could not send when it closes (linger 0);
    `rcvhwm` frames queued per peer at most (0: ZeroMQ's default, 1000)."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    if rcvhwm:
        router.setsockopt(zmq.RCVHWM, rcvhwm)
    router.bind(url)
    return router
