"""broker.shard.Memo gives exactly its placement's answers, whatever the keys, weights and calls.

tests/unit/test_shard.py checks the Memo with ASCII keys and equal weights; this adds weighted
servers, non-ASCII and non-UTF-8 keys (rendezvous hashes those differently), duplicate keys within
one get_many, equal keys arriving as distinct objects, batches larger than the capacity, lookups
that exclude down servers in between, the router's own placement over a new server list, and the
memory a full Memo holds."""

from __future__ import annotations

import sys
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from broker.shard import MEMO_KEYS, Ketama, Memo, Rendezvous, make_placement

pytestmark = pytest.mark.unit

_NAMES = [f"10.0.0.{i}:11211" for i in range(1, 9)]
# Keys as the broker sees them (1..250 bytes, any byte): ASCII, UTF-8 of non-ASCII text, and bytes
# that are not UTF-8 at all, drawn from a small pool so that keys repeat.
_POOL = [b"k%d" % i for i in range(12)] + [("ключ%d" % i).encode() for i in range(6)] + [
    b"\xff\xfe%d" % i for i in range(6)] + [b"x" * 250, "é".encode() * 125, b"\x80" * 250]
_KEYS = st.sampled_from(_POOL)
_CALL = st.one_of(
    st.tuples(st.just("one"), st.lists(_KEYS, min_size=1, max_size=6)),
    st.tuples(st.just("many"), st.lists(_KEYS, min_size=1, max_size=40)),  # duplicates included
    st.tuples(st.just("excluding"), st.lists(_KEYS, min_size=1, max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["rendezvous", "ketama"]), n=st.integers(2, 8),
       weights=st.lists(st.integers(1, 5), min_size=8, max_size=8), capacity=st.integers(1, 20),
       calls=st.lists(_CALL, min_size=1, max_size=15), down=st.frozensets(st.integers(0, 7), max_size=3))
def test_memo_answers_as_its_placement_with_weights_and_any_key_bytes(
    kind: str, n: int, weights: list[int], capacity: int, calls: list[tuple[str, list[bytes]]], down: frozenset[int]
) -> None:
    servers = [(name, w) for name, w in zip(_NAMES[:n], weights)]
    inner = Rendezvous(servers) if kind == "rendezvous" else Ketama(servers)
    memo = Memo(inner, capacity)
    fresh = Rendezvous(servers) if kind == "rendezvous" else Ketama(servers)  # never asked before
    for what, keys in calls:
        # Equal keys as distinct objects: the memo must match them by value.
        copies = [bytes(bytearray(k)) for k in keys]
        if what == "one":
            assert [memo.lookup(k) for k in keys] == [fresh.lookup(k) for k in keys]
            assert [memo.lookup(k) for k in copies] == [fresh.lookup(k) for k in keys]
        elif what == "many":
            assert memo.lookup_many(keys) == [fresh.lookup(k) for k in keys]
            assert memo.lookup_many(copies) == fresh.lookup_many(keys)
        else:
            d = frozenset(i for i in down if i < n)
            assert [memo.lookup_excluding(k, d) for k in keys] == [fresh.lookup_excluding(k, d) for k in keys]
            # Remapping while a server is down leaves the key's home as it was.
            assert [memo.lookup(k) for k in keys] == [fresh.lookup(k) for k in keys]
        assert len(memo) <= capacity


def test_a_new_server_list_is_a_new_memo_with_the_new_answers() -> None:
    """A reload builds a new placement (broker/service.py `_apply_servers`): nothing remembered
    under the old list may answer for the new one, weights included."""
    keys = [b"key:%d" % i for i in range(2000)]
    for kind in ("rendezvous", "ketama"):
        old = make_placement(kind, [(name, 1) for name in _NAMES[:4]])
        assert old.lookup_many(keys) == [old.lookup(k) for k in keys]
        for servers in ([(name, 1) for name in _NAMES[:5]], [(_NAMES[0], 3)] + [(name, 1) for name in _NAMES[1:4]]):
            new = make_placement(kind, servers)
            plain = Rendezvous(servers) if kind == "rendezvous" else Ketama(servers)
            assert new is not old
            assert new.lookup_many(keys) == plain.lookup_many(keys)
            assert [new.lookup(k) for k in keys] == [plain.lookup(k) for k in keys]
            assert new.lookup_many(keys) != old.lookup_many(keys)  # the change is visible at all


def test_a_full_memo_of_the_longest_keys_holds_a_few_megabytes() -> None:
    """MEMO_KEYS keys of MAX_KEY_LEN (250) bytes, then as many new ones again (a clear in
    between): the memo holds at most about 6 MB, whatever passes through it."""
    inner = Rendezvous([(name, 1) for name in _NAMES[:4]])
    memo = Memo(inner)
    tracemalloc.start()
    try:
        for round_ in range(3):
            keys = [b"%d:%06d:" % (round_, i) + b"x" * 240 for i in range(MEMO_KEYS)]
            memo.lookup_many(keys[: MEMO_KEYS // 2])
            for k in keys[MEMO_KEYS // 2 :]:
                memo.lookup(k)
            del keys
            held, _peak = tracemalloc.get_traced_memory()
            assert len(memo) <= MEMO_KEYS
            assert held <= 7 * 2**20, f"round {round_}: {held / 2**20:.1f} MiB held"
    finally:
        tracemalloc.stop()
    assert sys.getsizeof(memo._seen) < 2 * 2**20
