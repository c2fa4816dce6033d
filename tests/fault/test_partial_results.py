"""One of three memcached servers dead: get_many keeps what the healthy servers answered.

The broker's reply always carried the healthy servers' keys; the Client used to raise for the
whole call. Now the raised exception carries them (`partial`, and `failed` per key), and
ignore_exc=True returns them with the dead server's keys as misses (issue 13). The outage
behaviour side by side with pymemcache's HashClient, mcrouter and twemproxy is in the README.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from clientlib import AsyncClient, Client
from clientlib.errors import MemcacheError, MemcacheUnexpectedCloseError, ServerUnavailable
from pool import owners, value_of, wait_for
from timing import LATE

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(120)]

KEYS = [f"part:{i}" for i in range(60)]


def _setup(memcached_factory, broker_factory):
    servers = memcached_factory(3)
    addresses = [s.address for s in servers]
    broker = broker_factory(addresses, failure_limit=3, probe_interval_ms=100, timeout_ms=2000)
    where = owners(addresses, KEYS)
    assert set(where.values()) == set(addresses)
    c = Client(broker.url, timeout=5.0)
    assert c.set_many({k: value_of(k) for k in KEYS}) == []
    assert c.get_many(KEYS) == {k: value_of(k) for k in KEYS}
    return servers, broker, where, c


def test_dead_server_get_many_raises_with_the_healthy_keys_and_ignore_exc_returns_them(memcached_factory, broker_factory):
    servers, broker, where, c = _setup(memcached_factory, broker_factory)
    dead = servers[1]
    theirs = {k for k in KEYS if where[k] == dead.address}
    healthy = {k: value_of(k) for k in KEYS if k not in theirs}
    dead.kill()
    lenient = Client(broker.url, timeout=2.0, ignore_exc=True)
    seen_kinds = set()
    # The first calls meet the dead connection (closed / refused), later ones the mark-down
    # (fail fast): each kind of failure carries the healthy keys.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and ServerUnavailable not in seen_kinds:
        t0 = time.monotonic()
        with pytest.raises(MemcacheError) as info:
            c.get_many(KEYS)
        assert time.monotonic() - t0 < 2.0 + LATE  # within the call's deadline (tests/timing.py)
        exc = info.value
        seen_kinds.add(type(exc))
        assert isinstance(exc, (ServerUnavailable, MemcacheUnexpectedCloseError)), exc
        assert exc.partial == healthy
        assert exc.failed is not None and set(exc.failed) == theirs
        assert all(isinstance(e, MemcacheError) for e in exc.failed.values())
        assert lenient.get_many(KEYS) == healthy
        time.sleep(0.05)
    assert ServerUnavailable in seen_kinds, seen_kinds
    # gets_many: the same, with cas tokens.
    with pytest.raises(ServerUnavailable) as info:
        c.gets_many(KEYS)
    assert info.value.partial is not None and set(info.value.partial) == set(healthy)
    assert all(v[0] == healthy[k] and v[1].isdigit() for k, v in info.value.partial.items())
    # Single-key calls are not affected by this: a healthy key reads, a dead one raises.
    k_ok = next(iter(healthy))
    assert c.get(k_ok) == healthy[k_ok]
    with pytest.raises(ServerUnavailable) as single:
        c.get(next(iter(theirs)))
    assert single.value.partial is None and single.value.failed is None

    # AsyncClient: the same rule.
    async def run():
        a = AsyncClient(broker.url, timeout=2.0)
        b = AsyncClient(broker.url, timeout=2.0, ignore_exc=True)
        try:
            with pytest.raises(ServerUnavailable) as ainfo:
                await a.get_many(KEYS)
            return ainfo.value.partial, await b.get_many(KEYS)
        finally:
            await a.disconnect_all()
            await b.disconnect_all()

    partial, lenient_async = asyncio.run(run())
    assert partial == healthy and lenient_async == healthy

    # Back: the restarted server is empty, the others kept theirs; nothing raises.
    dead.restart()
    wait_for(lambda: broker.stats()["servers"][dead.address]["state"] == "up", 10.0, "server back up")
    assert c.get_many(KEYS) == healthy


def test_nothing_answered_partial_is_empty(memcached_factory, broker_factory):
    """A get_many whose every key failed still raises; partial is the empty answer."""
    servers, broker, where, c = _setup(memcached_factory, broker_factory)
    for s in servers:
        s.kill()
    with pytest.raises(MemcacheError) as info:
        c.get_many(KEYS)
    assert info.value.partial == {} and set(info.value.failed or ()) == set(KEYS)
    assert Client(broker.url, timeout=2.0, ignore_exc=True).get_many(KEYS) == {}
