"""A Client or AsyncClient that is dropped gives its broker connection (and so its max_clients
slot) back at once, by reference counting alone: no cycle may keep its socket open until the
cyclic garbage collector runs, which prefork servers often disable (gc.disable / gc.freeze).
Found by a QA pass: a loop of Client(...); get; close() held a slot per Client, and with
max_clients = 20 a third of its calls timed out."""

from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from clientlib import AsyncClient, Client

pytestmark = pytest.mark.integration

CLIENTS = 30


def _settle(admin: Client, want: int, within: float = 10.0) -> int:
    """The broker's connected_workers once it reads `want`, or its last reading at the deadline
    (the broker counts from ZeroMQ's monitor events, which follow a close by a few ms)."""
    end = time.monotonic() + within
    while True:
        n = int(admin.broker_stats()["connected_workers"])
        if n == want or time.monotonic() > end:
            return n
        time.sleep(0.05)


@pytest.fixture
def no_gc() -> Any:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def test_dropped_clients_give_their_connections_back(memcached: Any, broker_factory: Any, no_gc: None) -> None:
    broker = broker_factory([memcached.address])
    admin = Client(broker.url, timeout=5)
    base = _settle(admin, 1)
    for i in range(CLIENTS):
        c = Client(broker.url, timeout=5)
        assert c.get(f"k{i}") is None
        c.close()
        del c
    assert _settle(admin, base) == base


def test_dropped_async_clients_give_their_connections_back(memcached: Any, broker_factory: Any, no_gc: None) -> None:
    broker = broker_factory([memcached.address])
    admin = Client(broker.url, timeout=5)
    # The admin reads from one thread of its own (a Client has a socket per thread).
    with ThreadPoolExecutor(1) as reader:
        base = reader.submit(_settle, admin, 1).result()

        async def churn() -> int:
            for i in range(CLIENTS):
                a = AsyncClient(broker.url, timeout=5)
                assert await a.get(f"k{i}") is None
                await a.close()
                del a
            # Still inside the running loop: the sockets must go without waiting for it to end.
            return await asyncio.wrap_future(reader.submit(_settle, admin, base))

        assert asyncio.run(churn()) == base
