"""A worker's noreply write is never overtaken by its own next read of that key, nor a noreply
flush_all by its next read of any key.

With two connections per server, a later request could be sent on the other, idle connection
and reach memcached first; the broker keeps later requests for a key on the connection that
still has earlier ones in flight. Other threads keep both connections busy meanwhile.
"""

import threading
import time

import pytest

from clientlib import Client
from clientlib.errors import BrokerTimeout

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(120)
def test_noreply_write_then_read_sees_the_write(mc, broker_factory):
    broker = broker_factory([mc.address], connections_per_server=2)
    stop = threading.Event()

    def background(n: int) -> None:
        c = Client(broker.url, timeout=5.0)
        keys = [f"bg{n}:{i}" for i in range(50)]
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            c.set_many({k: b"x" * 200 for k in keys})
            c.get_many(keys)

    threads = [threading.Thread(target=background, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        client = Client(broker.url, timeout=5.0)
        stale = []
        for i in range(3000):
            key = f"order:{i % 7}"
            value = b"v%d" % i
            assert client.set(key, value, noreply=True) is True
            got = client.get(key)
            if got != value:
                stale.append((key, value, got))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert stale == []
    stats = broker.stats()
    assert stats["errors"] == 0
    assert stats["noreply"] >= 3000


@pytest.mark.timeout(120)
def test_noreply_flush_all_then_read_sees_the_flush(mc, broker_factory):
    # flush_all touches every key, so no key pin keeps the read behind it: each of the server's
    # connections carries the flush instead (tests/unit/test_router_edges.py checks the streams).
    broker = broker_factory([mc.address], connections_per_server=2)
    stop = threading.Event()

    def background(n: int) -> None:
        # Load only: a call that a loaded machine times out (seen with three suites at once) is
        # not what this test checks, so the load goes on after it.
        c = Client(broker.url, timeout=5.0)
        keys = [f"bg{n}:{i}" for i in range(200)]
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                c.set_many({k: b"x" * 200 for k in keys})
                while not stop.is_set() and time.monotonic() < deadline:
                    c.get_many(keys)
            except BrokerTimeout:
                pass

    threads = [threading.Thread(target=background, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        client = Client(broker.url, timeout=5.0)
        stale = []
        deadline = time.monotonic() + 40
        calls = 0
        for i in range(600):
            if time.monotonic() > deadline:
                break
            assert client.set("k", b"v%d" % i) is True
            client.flush_all(noreply=True)
            got = client.get("k")
            calls += 1
            if got is not None:
                stale.append((i, got))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert calls >= 100 and stale == []
    assert broker.stats()["errors"] == 0
