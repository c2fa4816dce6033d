"""Key placement end to end: what the broker stores lands on the memcached the reference clients pick.

10,000 keys are set through a real broker (hash = rendezvous | ketama) in front of 1, 3 or 10
real memcached servers, then every server is read directly with pymemcache: each key must be on
exactly the server pymemcache's HashClient (rendezvous) or uhashring (ketama, also weighted)
names, and nowhere else. This checks the whole path (clientlib -> wire -> router -> shard ->
pipeline), not just broker/shard.py, which tests/unit/test_shard.py covers alone.

Keys are str: HashClient hashes the key object it is given, so bytes keys would be hashed as
their repr. Known gap, not exercised here: HashClient hashes the key *before* its key_prefix is
applied, while the broker only ever sees (and places by) the prefixed key, so clients that use
key_prefix place keys differently from HashClient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from pymemcache.client.base import Client as PlainClient
from pymemcache.client.hash import HashClient
from uhashring import HashRing

import harness
from brokerproc import BrokerProcess
from clientlib import Client
from harness import Memcached

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

N_KEYS = 10_000
BATCH = 500


def _keys() -> list[str]:
    # Mixed shapes and lengths (1..~120 bytes), all valid memcached keys.
    out = []
    for i in range(N_KEYS):
        r = i % 4
        if r == 0:
            out.append(f"k{i}")
        elif r == 1:
            out.append(f"user:{i}:profile")
        elif r == 2:
            out.append(f"session/{i:08d}/" + "x" * (i % 90))
        else:
            out.append(f"{i * 2654435761 % 4294967296:x}-{i}")
    assert len(set(out)) == N_KEYS
    return out


KEYS = _keys()


def _value(key: str) -> bytes:
    return f"value-of:{key}".encode()


@pytest.fixture(scope="module")
def pool() -> Iterator[list[Memcached]]:
    """Ten servers shared by this module's tests (flushed per test): starting 10 per test is waste."""
    servers = harness.start_many(10)
    try:
        yield servers
    finally:
        harness.stop_all(servers)


def _expected_rendezvous(addresses: list[str]) -> dict[str, str]:
    hc = HashClient(addresses, use_pooling=False)  # never connects: only its hasher is used
    return {key: hc.hasher.get_node(key) for key in KEYS}


def _expected_ketama(addresses: list[str], weights: list[int]) -> dict[str, str]:
    ring = HashRing(dict(zip(addresses, weights)), hash_fn="ketama")
    return {key: ring.get_node(key) for key in KEYS}


def _set_all(url: str) -> None:
    client = Client(url, timeout=20.0)
    try:
        for start in range(0, N_KEYS, BATCH):
            batch = {k: _value(k) for k in KEYS[start : start + BATCH]}
            assert client.set_many(batch) == []
    finally:
        client.disconnect_all()


def _where(servers: list[Memcached]) -> dict[str, list[str]]:
    """For every key, the addresses of the servers that hold it, read directly (no broker)."""
    found: dict[str, list[str]] = {k: [] for k in KEYS}
    for server in servers:
        direct = PlainClient((server.host, server.port), timeout=10.0, connect_timeout=5.0)
        try:
            for start in range(0, N_KEYS, 1000):
                got = direct.get_many(KEYS[start : start + 1000])
                for key, value in got.items():
                    assert value == _value(key), f"{key} on {server.address} holds {value!r}"
                    found[key].append(server.address)
        finally:
            direct.close()
    return found


CASES = [
    pytest.param("rendezvous", 1, False, id="rendezvous-1"),
    pytest.param("rendezvous", 3, False, id="rendezvous-3"),
    pytest.param("rendezvous", 10, False, id="rendezvous-10"),
    pytest.param("ketama", 1, False, id="ketama-1"),
    pytest.param("ketama", 3, False, id="ketama-3"),
    pytest.param("ketama", 3, True, id="ketama-3-weighted"),
    pytest.param("ketama", 10, True, id="ketama-10-weighted"),
]


@pytest.mark.parametrize(("hash_name", "n", "weighted"), CASES)
def test_each_key_lands_on_the_reference_clients_server(
    pool: list[Memcached], broker_factory: Callable[..., BrokerProcess], hash_name: str, n: int, weighted: bool
) -> None:
    servers = pool[:n]
    for s in pool:
        s.flush_all()
    addresses = [s.address for s in servers]
    weights = [1 + (i * 7) % 5 if weighted else 1 for i in range(n)]
    if weighted:
        assert len(set(weights)) > 1
        config_servers: list[object] = [{"address": a, "weight": w} for a, w in zip(addresses, weights)]
    else:
        config_servers = list(addresses)
    broker = broker_factory(config_servers, hash=hash_name)

    if hash_name == "rendezvous":
        expected = _expected_rendezvous(addresses)
    else:
        expected = _expected_ketama(addresses, weights)
    assert set(expected.values()) == set(addresses)  # every server owns some keys

    _set_all(broker.url)
    found = _where(pool)  # all ten: a key must not have leaked onto a server outside the config

    wrong = {k: (found[k], expected[k]) for k in KEYS if found[k] != [expected[k]]}
    assert not wrong, f"{len(wrong)} keys misplaced, e.g. {list(wrong.items())[:5]}"

    # The broker's own per-server request counts agree with where the keys went.
    stats = broker.stats()["servers"]
    for a in addresses:
        owned = sum(1 for k in KEYS if expected[k] == a)
        assert stats[a]["requests"] == owned
        assert stats[a]["errors"] == 0 and stats[a]["state"] == "up"


def test_weights_shift_keys_toward_heavier_servers(pool: list[Memcached], broker_factory: Callable[..., BrokerProcess]) -> None:
    """Ketama weights are honoured by the running broker, not only by the shard module."""
    servers = pool[:2]
    for s in servers:
        s.flush_all()
    light, heavy = servers[0].address, servers[1].address
    broker = broker_factory([{"address": light, "weight": 1}, {"address": heavy, "weight": 4}], hash="ketama")
    _set_all(broker.url)
    counts = {s.address: int(s.stats()["curr_items"]) for s in servers}
    assert counts[light] + counts[heavy] == N_KEYS
    # expected shares 20% / 80%; a wide band, the exact mapping is checked above
    assert 0.10 * N_KEYS < counts[light] < 0.30 * N_KEYS
