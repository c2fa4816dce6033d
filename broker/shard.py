"""Key -> server placement: rendezvous (pymemcache HashClient) and ketama (uhashring/twemproxy).

Pure and precomputed: every table is built in __init__. With several servers, make_placement wraps
the placement in a `Memo` of the answers for the last keys seen (at most MEMO_KEYS), because a
rendezvous lookup hashes the key once per server (1 us per key at 4 servers, 3.4 us at 20) and a
ketama lookup costs 0.8 us, where a dict lookup costs 0.03 us.
Servers are given as a sequence of (canonical name, weight); lookups return an index into it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_right
from collections.abc import Sequence
from itertools import chain
from typing import Protocol

import mmh3

_mmh3_32 = mmh3.hash

__all__ = ["Placement", "Rendezvous", "Ketama", "Memo", "make_placement", "murmur3_32", "pymemcache_node_name"]

# Keys whose server a Memo remembers. Each entry keeps its key alive: at most 16,384 keys of at most
# 250 bytes, about 5 MB: 4.4 MiB of keys and 0.6 MiB of table (README, "Bounded memory").
MEMO_KEYS = 16_384



class Placement(Protocol):
    def lookup(self, key: bytes) -> int: ...
    def lookup_many(self, keys: list[bytes]) -> list[int]: ...
    def lookup_excluding(self, key: bytes, down: frozenset[int]) -> int | None: ...


def _validated(servers: Sequence[tuple[str, int]]) -> tuple[list[str], list[int]]:
    if not servers:
        raise ValueError("placement needs at least one server")
    names = [name for name, _ in servers]
    weights = [weight for _, weight in servers]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate server names in {names!r}")
    for name, weight in servers:
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError(f"server {name!r}: weight must be an int >= 1, got {weight!r}")
    return names, weights


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86_32 of `data` (unsigned), by the mmh3 package's C code: the hash pymemcache's
    HashClient uses (its murmur3_32, pure Python, gives the same values: tests/unit/test_shard.py)."""
    return _mmh3_32(data, seed, False)


def pymemcache_node_name(name: str) -> str:
    """The node string HashClient hashes for a server given as `name` (normalize_server_spec
    then "%s:%s" % (host, port)): "unix:/p" -> "/p", "[::1]:11211" -> "::1:11211", "h" -> "h:11211"."""
    if name.startswith("unix:"):
        return name[5:]
    if name.startswith("/"):
        return name
    if ":" not in name or name.endswith("]"):
        host, port = name, 11211
    else:
        host, port_s = name.rsplit(":", 1)
        port = int(port_s)
    if host.startswith("["):
        host = host.strip("[]")
    return f"{host}:{port}"


def _pymemcache_key_bytes(key: bytes) -> bytes:
    # HashClient hashes the caller's str key, and pymemcache's murmur3 keeps only the low byte
    # of each code point. The broker sees the UTF-8 encoding: for ASCII that is the same bytes.
    if key.isascii():
        return key
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return key  # not from a str key; no pymemcache mapping to honour
    return bytes(ord(c) & 0xFF for c in text)


class Rendezvous:
    """Highest-random-weight placement, identical to pymemcache's HashClient (RendezvousHash,
    murmur3_32 seed 0 over "<node>-<key>", ties to the greater node name) when all weights are
    equal. With unequal weights it is weighted rendezvous (logarithmic method): the score is
    weight / -ln(u) with u = murmur3 mapped into (0, 1), so a server's expected share is
    weight / total and removing a server still moves only its own keys. pymemcache has no weights.

    Compatibility caveat: HashClient hashes the key object the application passed; for str keys
    that matches this (ASCII, or UTF-8 decoded), but a bytes key is hashed as its repr "b'...'"."""

    def __init__(self, servers: Sequence[tuple[str, int]]) -> None:
        names, weights = _validated(servers)
        self._n = len(names)
        nodes = [pymemcache_node_name(name) for name in names]
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"servers {names!r} name the same pymemcache node twice")
        # str node names compare as pymemcache's tie-break does; rank = position in that order
        order = sorted(range(self._n), key=lambda i: nodes[i])
        rank = [0] * self._n
        for r, i in enumerate(order):
            rank[i] = r
        self._rank_bits = max(1, (self._n - 1).bit_length())
        self._rank_mask = (1 << self._rank_bits) - 1
        self._index_of_rank = order
        # equal weights (whatever the value) keep the plain, pymemcache-identical integer scores
        self._weight_of_rank = [weights[i] for i in order] if len(set(weights)) > 1 else None
        # HashClient hashes "<node>-<key>"; pymemcache's murmur3 keeps the low byte of each char.
        prefixes = [bytes(ord(c) & 0xFF for c in f"{node}-") for node in nodes]
        self._prefix_rank = list(zip(prefixes, rank))

    def _all_scores(self, key: bytes) -> list[int]:
        """Per server (in the given order): (murmur3_32(node + "-" + key) << rank_bits) | rank, so
        max() breaks a tie to the greater node name, as HashClient does. One C hash per server:
        about 0.3 us each, where a pure-Python murmur3 cost several microseconds per key."""
        kb = _pymemcache_key_bytes(key)
        bits = self._rank_bits
        h = _mmh3_32
        return [(h(p + kb, 0, False) << bits) | r for p, r in self._prefix_rank]

    def _weighted(self, score: int) -> tuple[float, int]:
        rank = score & self._rank_mask
        u = ((score >> self._rank_bits) + 0.5) / 4294967296.0  # in (0, 1): log is finite, nonzero
        assert self._weight_of_rank is not None
        return (self._weight_of_rank[rank] / -math.log(u), rank)

    def _best(self, scores: Sequence[int]) -> int:
        best = max(scores) if self._weight_of_rank is None else max(scores, key=self._weighted)
        return self._index_of_rank[best & self._rank_mask]

    def lookup(self, key: bytes) -> int:
        if self._n == 1:
            return 0
        return self._best(self._all_scores(key))

    def lookup_many(self, keys: list[bytes]) -> list[int]:
        """`[lookup(k) for k in keys]`: the same scores and tie-break, for a get_many's keys at once."""
        if self._n == 1:
            return [0] * len(keys)
        if self._weight_of_rank is not None:
            return [self.lookup(k) for k in keys]
        kbs = keys if b"".join(keys).isascii() else list(map(_pymemcache_key_bytes, keys))
        h = _mmh3_32
        bits = self._rank_bits
        mask = self._rank_mask
        of_rank = self._index_of_rank
        pr = self._prefix_rank
        # _best(_all_scores(key)) inlined: the calls per key cost more than the hashing.
        return [of_rank[max([(h(p + kb, 0, False) << bits) | r for p, r in pr]) & mask] for kb in kbs]

    def lookup_excluding(self, key: bytes, down: frozenset[int]) -> int | None:
        if not down:
            return self.lookup(key)
        of_rank, rmask = self._index_of_rank, self._rank_mask
        up = [s for s in self._all_scores(key) if of_rank[s & rmask] not in down]
        return self._best(up) if up else None


class Ketama:
    """The ketama continuum as uhashring (hash_fn="ketama") and twemproxy build it: server i
    gets floor(40 * n * w_i / sum(w)) md5 digests of "<name>-<v>", 4 little-endian points each
    (160 points for equal weights). Names are hashed verbatim; libmemcached/pylibmc instead drop
    ":11211" for the default port, so match them by naming such servers without the port.
    A key maps to the first point strictly above md5(key)[:4] (as uhashring bisects), wrapping
    around; on a point collision the later server in the list owns it (uhashring's dict order)."""

    def __init__(self, servers: Sequence[tuple[str, int]]) -> None:
        names, weights = _validated(servers)
        n, total = len(names), sum(weights)
        owner: dict[int, int] = {}
        for i, (name, weight) in enumerate(zip(names, weights)):
            for v in range(40 * n * weight // total):
                digest = hashlib.md5(f"{name}-{v}".encode("utf-8"), usedforsecurity=False).digest()
                for point in struct.unpack("<4I", digest):
                    owner[point] = i
        self._points = sorted(owner)
        # a trailing copy of the first owner makes the wrap-around a plain index
        self._owners = [owner[p] for p in self._points] + [owner[self._points[0]]]
        self._all = frozenset(range(n))

    def lookup(self, key: bytes) -> int:
        digest = hashlib.md5(key, usedforsecurity=False).digest()
        return self._owners[bisect_right(self._points, int.from_bytes(digest[:4], "little"))]

    def lookup_many(self, keys: list[bytes]) -> list[int]:
        """`[lookup(k) for k in keys]`."""
        return [self.lookup(k) for k in keys]

    def lookup_excluding(self, key: bytes, down: frozenset[int]) -> int | None:
        if not down:
            return self.lookup(key)
        if down >= self._all:
            return None
        digest = hashlib.md5(key, usedforsecurity=False).digest()
        pos = bisect_right(self._points, int.from_bytes(digest[:4], "little"))
        owners = self._owners
        for i in chain(range(pos, len(owners) - 1), range(pos)):
            if owners[i] not in down:
                return owners[i]
        return None  # every server still up has no points (weight too small for a point)


class Memo:
    """`inner`'s answers for the keys it was asked about lately: the same answers, without hashing
    a key again while it is remembered. At most `capacity` keys: when full, it forgets them all
    at once (no per-lookup bookkeeping), so a working set larger than that costs one dict lookup
    and one insert per key (about 0.1 us) on top of the placement itself. lookup_excluding, used
    only while a server is down, is not remembered. A placement never changes: a new server list
    is a new placement, with a new Memo."""

    __slots__ = ("inner", "_seen", "_capacity")

    def __init__(self, inner: Placement, capacity: int = MEMO_KEYS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.inner = inner
        self._seen: dict[bytes, int] = {}
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._seen)

    def lookup(self, key: bytes) -> int:
        server = self._seen.get(key)
        if server is None:
            server = self.inner.lookup(key)
            if len(self._seen) >= self._capacity:
                self._seen.clear()
            self._seen[key] = server
        return server

    def lookup_many(self, keys: list[bytes]) -> list[int]:
        seen = self._seen
        out: list[int | None] = list(map(seen.get, keys))
        misses = out.count(None)
        if not misses:
            return out  # type: ignore[return-value]  # no None in it
        if misses == len(keys):
            placed = self.inner.lookup_many(keys)
            self._remember(keys, placed)
            return placed
        # Some remembered, some not: the others are placed in one call.
        where = [i for i, s in enumerate(out) if s is None]
        missing = [keys[i] for i in where]
        placed = self.inner.lookup_many(missing)
        for i, server in zip(where, placed):
            out[i] = server
        self._remember(missing, placed)
        return out  # type: ignore[return-value]  # every None was replaced above

    def _remember(self, keys: list[bytes], servers: list[int]) -> None:
        seen = self._seen
        if len(seen) + len(keys) > self._capacity:
            seen.clear()
            if len(keys) > self._capacity:
                return
        seen.update(zip(keys, servers))

    def lookup_excluding(self, key: bytes, down: frozenset[int]) -> int | None:
        return self.inner.lookup_excluding(key, down)


def make_placement(kind: str, servers: Sequence[tuple[str, int]]) -> Placement:
    """The placement `kind` ("rendezvous" or "ketama") over `servers`, wrapped in a Memo when
    there are several (with one, every lookup is 0 without hashing)."""
    inner: Placement
    if kind == "rendezvous":
        inner = Rendezvous(servers)
    elif kind == "ketama":
        inner = Ketama(servers)
    else:
        raise ValueError(f"unknown placement kind {kind!r} (expected 'rendezvous' or 'ketama')")
    return Memo(inner) if len(servers) > 1 else inner
