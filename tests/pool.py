"""Helpers for tests with several memcached servers behind one broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pymemcache.client.base import Client as PlainClient
from pymemcache.client.hash import HashClient

from harness import Memcached


def owners(addresses: list[str], keys: list[str]) -> dict[str, str]:
    """key -> address, as pymemcache's HashClient (the broker's rendezvous) places it."""
    hc = HashClient(addresses, use_pooling=False)  # never connects: only its hasher is used
    return {k: hc.hasher.get_node(k) for k in keys}


def value_of(key: str, seq: int = 0) -> bytes:
    # Self-verifying: names its key, so a value delivered to the wrong request is caught.
    return f"{key}|{seq}".encode()


def direct(server: Memcached) -> PlainClient:
    """A plain pymemcache client straight to one server, bypassing the broker."""
    return PlainClient((server.host, server.port), timeout=5.0, connect_timeout=5.0)


def connect(client: Any, wait: float = 10.0) -> None:
    """Connect the calling thread's socket of a clientlib Client (each thread has its own) before
    a timed part: on a loaded machine the handshake of a first call can outlast a short timeout."""
    from clientlib.errors import BrokerTimeout

    give_up = time.monotonic() + wait
    while True:
        try:
            client.broker_ping()
            return
        except BrokerTimeout:
            assert time.monotonic() < give_up, "the broker never answered a ping"


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> float:
    """Poll until cond() holds; returns the time it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start
