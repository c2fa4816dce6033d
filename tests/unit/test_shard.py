"""broker/shard.py: placement identical to pymemcache's HashClient and uhashring's ketama ring."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import string
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymemcache.client.hash import HashClient
from pymemcache.client.murmur3 import murmur3_32 as pymemcache_murmur3_32
from uhashring import HashRing

from broker.shard import MEMO_KEYS, Ketama, Memo, Rendezvous, make_placement, murmur3_32, pymemcache_node_name

pytestmark = pytest.mark.unit

N_KEYS = 10_000

# Names of assorted lengths so every len("<node>-") % 4 occurs; the 10-server list also has an
# IPv6 and a unix-socket server, whose pymemcache node names differ from the canonical ones.
SERVER_LISTS: dict[int, list[str]] = {
    1: ["127.0.0.1:11211"],
    3: ["10.0.0.1:11211", "10.0.0.12:11211", "cache-b.example:11300"],
    10: [
        "10.0.0.1:11211",
        "10.0.0.2:11212",
        "10.0.0.13:11211",
        "10.0.1.140:11211",
        "mc1:11211",
        "memcache-two.internal:9000",
        "[::1]:11211",
        "[fe80::1:2]:22122",
        "unix:/run/memcached/mc.sock",
        "192.168.100.200:11211",
    ],
}


def _keys(n: int, seed: int) -> list[str]:
    """Memcached-legal str keys (no whitespace or control characters), some non-ASCII."""
    rng = random.Random(seed)
    ascii_chars = string.ascii_letters + string.digits + string.punctuation
    wide_chars = "éß漢字ж😀"
    keys = []
    for i in range(n):
        size = rng.choice([rng.randint(1, 12), rng.randint(13, 40), rng.randint(41, 250)])
        chars = ascii_chars + wide_chars if i % 10 == 0 else ascii_chars
        key = "".join(rng.choice(chars) for _ in range(size))
        keys.append(key[: 250 // 4] if not key.isascii() else key)
    return keys


KEYS = _keys(N_KEYS, seed=20240611)


def test_murmur3_known_vectors() -> None:
    assert murmur3_32(b"") == 0
    assert murmur3_32(b"hello") == 0x248BFA47
    assert murmur3_32(b"The quick brown fox jumps over the lazy dog") == 0x2E4FF723
    assert murmur3_32(b"hello", seed=1) == 0xBB4ABCAD


def test_murmur3_matches_pymemcache_on_random_inputs() -> None:
    rng = random.Random(7)
    for i in range(5_000):
        # pymemcache hashes str code points keeping the low byte of each; wide ones test that
        top = 0xFF if i % 2 else 0x10FFFF
        text = "".join(chr(rng.randint(0, top)) for _ in range(rng.randint(0, 70)))
        seed = rng.choice([0, 1, rng.getrandbits(32)])
        data = bytes(ord(c) & 0xFF for c in text)
        assert murmur3_32(data, seed) == pymemcache_murmur3_32(text, seed), (text, seed)


@pytest.mark.parametrize(
    "name", ["10.0.0.1:11211", "h:1", "mc1", "[::1]:11211", "[fe80::1]", "unix:/tmp/m.sock", "/tmp/m.sock"]
)
def test_pymemcache_node_name_is_the_one_hashclient_adds(name: str) -> None:
    client = HashClient([name], use_pooling=False)
    assert list(client.clients) == [pymemcache_node_name(name)]
    assert client.hasher.nodes == [pymemcache_node_name(name)]


@pytest.mark.parametrize("n", sorted(SERVER_LISTS))
@pytest.mark.parametrize("weight", [1, 3])
def test_rendezvous_equals_hashclient(n: int, weight: int) -> None:
    servers = SERVER_LISTS[n]
    client = HashClient(servers, use_pooling=False)  # never connects: we only ask its hasher
    index_of_node = {node: i for i, node in enumerate(client.clients)}
    assert len(index_of_node) == n
    placement = Rendezvous([(name, weight) for name in servers])
    got = [placement.lookup(key.encode("utf-8")) for key in KEYS]
    expected = [index_of_node[client.hasher.get_node(key)] for key in KEYS]
    mismatches = [k for k, g, e in zip(KEYS, got, expected) if g != e]
    assert len(got) == N_KEYS
    assert mismatches == []
    assert placement.lookup_many([key.encode("utf-8") for key in KEYS]) == expected  # a get_many's way
    assert set(got) == set(range(n))  # the comparison covered every server


@pytest.mark.parametrize("n", sorted(SERVER_LISTS))
@pytest.mark.parametrize("weighted", [False, True])
def test_ketama_equals_uhashring(n: int, weighted: bool) -> None:
    servers = SERVER_LISTS[n]
    weights = [1 + (i * 7) % 5 if weighted else 1 for i in range(n)]
    if weighted:
        ring = HashRing(dict(zip(servers, weights)), hash_fn="ketama")
    else:
        ring = HashRing(servers, hash_fn="ketama")
    placement = Ketama(list(zip(servers, weights)))
    got = [servers[placement.lookup(key.encode("utf-8"))] for key in KEYS]
    expected = [ring.get_node(key) for key in KEYS]
    mismatches = [k for k, g, e in zip(KEYS, got, expected) if g != e]
    assert len(got) == N_KEYS
    assert mismatches == []
    assert set(got) == set(servers)


def test_ketama_weights_shift_load() -> None:
    placement = Ketama([("a:1", 1), ("b:1", 4)])
    counts = Counter(placement.lookup(key.encode()) for key in KEYS)
    assert 3.0 < counts[1] / counts[0] < 5.5


def test_weighted_rendezvous_shifts_load() -> None:
    placement = Rendezvous([("a:1", 1), ("b:1", 4)])
    counts = Counter(placement.lookup(key.encode()) for key in KEYS)
    assert 3.0 < counts[1] / counts[0] < 5.5


def test_make_placement_kinds_and_errors() -> None:
    assert isinstance(make_placement("rendezvous", [("a:1", 1)]), Rendezvous)
    assert isinstance(make_placement("ketama", [("a:1", 1)]), Ketama)
    # Several servers: the placement behind a Memo of MEMO_KEYS keys.
    for kind, cls in (("rendezvous", Rendezvous), ("ketama", Ketama)):
        placement = make_placement(kind, [("a:1", 1), ("b:1", 1)])
        assert isinstance(placement, Memo) and isinstance(placement.inner, cls)
        assert placement._capacity == MEMO_KEYS == 16_384
    with pytest.raises(ValueError, match="unknown placement kind"):
        make_placement("modulo", [("a:1", 1)])
    for kind in ("rendezvous", "ketama"):
        with pytest.raises(ValueError, match="at least one server"):
            make_placement(kind, [])
        with pytest.raises(ValueError, match="duplicate"):
            make_placement(kind, [("a:1", 1), ("a:1", 2)])
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValueError, match="weight"):
                make_placement(kind, [("a:1", bad)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="same pymemcache node"):
        Rendezvous([("mc1", 1), ("mc1:11211", 1)])


# "mc46898:11211-k" and "mc61399:11211-k" have the same murmur3_32 (238262087): a score tie.
# pymemcache's RendezvousHash.get_node gives a tie to max(str(node), str(winner)): the greater name.
TIE = ("mc46898:11211", "mc61399:11211")


def test_the_tie_is_a_tie() -> None:
    assert murmur3_32(b"mc46898:11211-k") == murmur3_32(b"mc61399:11211-k") == 238262087


@pytest.mark.parametrize("order", [TIE, TIE[::-1]], ids=["lesser-first", "greater-first"])
def test_rendezvous_score_tie_goes_to_the_greater_node_name_as_hashclient_places_it(order: tuple[str, str]) -> None:
    placement = Rendezvous([(name, 1) for name in order])
    assert order[placement.lookup(b"k")] == "mc61399:11211"
    assert HashClient(list(order), use_pooling=False).hasher.get_node("k") == "mc61399:11211"
    # With the winner down, the other takes the key; with the loser down, nothing moves.
    assert order[placement.lookup_excluding(b"k", frozenset({order.index("mc61399:11211")}))] == "mc46898:11211"  # type: ignore[index]
    assert order[placement.lookup_excluding(b"k", frozenset({order.index("mc46898:11211")}))] == "mc61399:11211"  # type: ignore[index]
    # A third server that scores lower on "k" ("mc14:11211-k" -> 230625222) leaves the tie's
    # outcome alone, wherever it is listed.
    assert murmur3_32(b"mc14:11211-k") == 230625222
    for names in (["mc14:11211", *order], [*order, "mc14:11211"], [order[0], "mc14:11211", order[1]]):
        assert names[Rendezvous([(name, 1) for name in names]).lookup(b"k")] == "mc61399:11211"
        assert names[Rendezvous([(name, 1) for name in names]).lookup_many([b"k", b"k"])[1]] == "mc61399:11211"


def test_lookup_excluding_when_everything_is_down() -> None:
    for kind in ("rendezvous", "ketama"):
        placement = make_placement(kind, [(name, 1) for name in SERVER_LISTS[3]])
        assert placement.lookup_excluding(b"k", frozenset({0, 1, 2})) is None
        assert placement.lookup_excluding(b"k", frozenset()) == placement.lookup(b"k")


# --- properties -------------------------------------------------------------------------------

_names = st.lists(
    st.one_of(
        st.builds(
            "{}:{}".format,
            st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
            st.integers(1, 65535),
        ),
        st.builds("unix:/{}".format, st.from_regex(r"[a-z0-9/._-]{1,40}", fullmatch=True)),
    ),
    min_size=1,
    max_size=8,
    unique=True,
)
_weights = st.integers(1, 5)
_key_lists = st.lists(st.binary(min_size=1, max_size=250), min_size=1, max_size=40)
_kinds = st.sampled_from(["rendezvous", "ketama"])


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, names=_names, data=st.data(), keys=_key_lists)
def test_lookup_is_deterministic_and_in_range(
    kind: str, names: list[str], data: st.DataObject, keys: list[bytes]
) -> None:
    servers = [(name, data.draw(_weights)) for name in names]
    first, second = make_placement(kind, servers), make_placement(kind, servers)
    for key in keys:
        index = first.lookup(key)
        assert 0 <= index < len(servers)
        assert first.lookup(key) == index == second.lookup(key)


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, names=_names, data=st.data(), keys=_key_lists | st.lists(st.text(min_size=1, max_size=20).map(str.encode)))
def test_lookup_many_places_each_key_as_lookup(kind: str, names: list[str], data: st.DataObject, keys: list[bytes]) -> None:
    # Weighted or not, ASCII, UTF-8 (pymemcache's low byte per code point) or any bytes.
    equal = data.draw(st.booleans())
    placement = make_placement(kind, [(name, 1 if equal else data.draw(_weights)) for name in names])
    assert placement.lookup_many(keys) == [placement.lookup(key) for key in keys]


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, names=_names, data=st.data(), keys=_key_lists)
def test_down_servers_remap_like_removal(
    kind: str, names: list[str], data: st.DataObject, keys: list[bytes]
) -> None:
    """Removing servers moves only their keys, and auto-ejecting them is the same as removal.
    Ketama gets equal weights: with unequal ones, removal rescales everyone's point count."""
    weights = [1] * len(names) if kind == "ketama" else [data.draw(_weights) for _ in names]
    full = make_placement(kind, list(zip(names, weights)))
    down = frozenset(data.draw(st.sets(st.integers(0, len(names) - 1), min_size=1)))
    up = [i for i in range(len(names)) if i not in down]
    reduced = make_placement(kind, [(names[i], weights[i]) for i in up]) if up else None
    for key in keys:
        before = full.lookup(key)
        after = full.lookup_excluding(key, down)
        if reduced is None:
            assert after is None
            continue
        assert after is not None and after not in down
        assert after == up[reduced.lookup(key)]
        if before not in down:
            assert after == before


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, names=_names, data=st.data(), keys=_key_lists)
def test_lookup_excluding_never_returns_a_down_server(
    kind: str, names: list[str], data: st.DataObject, keys: list[bytes]
) -> None:
    # weights 1..5 with at most 8 servers give every ketama server points, so None means all down
    servers = [(name, data.draw(_weights)) for name in names]
    placement = make_placement(kind, servers)
    down = frozenset(data.draw(st.sets(st.integers(0, len(names) + 2))))  # may name unknown indices
    all_down = all(i in down for i in range(len(servers)))
    for key in keys:
        result = placement.lookup_excluding(key, down)
        if all_down:
            assert result is None
        else:
            assert result is not None and 0 <= result < len(servers) and result not in down


# --- the ring's ends and the weighted score (mutation testing found these unguarded) -----------


def _ketama_point(key: bytes) -> int:
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little")


def _keys_at_the_ring_end(points: list[int]) -> tuple[bytes, bytes]:
    """A key hashing above the last point (it wraps to the first) and one between the last two."""
    above = between = None
    for i in range(200_000):
        key = f"end-{i}".encode()
        h = _ketama_point(key)
        if h >= points[-1] and above is None:
            above = key
        elif points[-2] <= h < points[-1] and between is None:
            between = key
        if above is not None and between is not None:
            return above, between
    raise AssertionError("no key found near the ring's end")


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 2, 3)], ids=["equal", "weighted"])
def test_ketama_lookup_excluding_walks_clockwise_across_the_ring_end_as_uhashring(weights: tuple[int, ...]) -> None:
    # uhashring's iterate_nodes walks the continuum clockwise from the key's point, wrapping past
    # the last point to the first: the first server in that walk that is not down takes the key.
    servers = ["a:1", "b:1", "c:1"]
    ring = HashRing(dict(zip(servers, weights)), hash_fn="ketama")
    placement = Ketama(list(zip(servers, weights)))
    points = [p for p, _ in ring.get_points()]
    owners = [node for _, node in ring.get_points()]
    assert owners[0] != owners[-1]  # so the walk past the last point shows which point it took
    keys = [*_keys_at_the_ring_end(points), *(k.encode() for k in KEYS[:200])]
    checked = 0
    for size in (1, 2):
        for down_set in itertools.combinations(range(3), size):
            down = frozenset(down_set)
            for key in keys:
                walk = list(ring.iterate_nodes(key.decode()))
                expected = next(servers.index(node) for node in walk if servers.index(node) not in down)
                assert placement.lookup_excluding(key, down) == expected, (key, down)
                checked += 1
    assert checked == 6 * len(keys)


def _weighted_rendezvous(names: list[str], weights: list[int], key: bytes) -> int:
    """The documented weighted rendezvous, written out: score_i = w_i / -ln(u_i), u_i the murmur3
    of "<node>-<key>" (pymemcache's hash) taken to the middle of its 2**-32 step in (0, 1)."""
    best, best_score = -1, -1.0
    for i, (name, weight) in enumerate(zip(names, weights)):
        h = pymemcache_murmur3_32((pymemcache_node_name(name) + "-").encode().decode("latin-1") + key.decode("latin-1"))
        score = weight / -math.log((h + 0.5) / 2**32)
        if score > best_score:
            best, best_score = i, score
    return best


def test_weighted_rendezvous_places_each_key_by_the_documented_score() -> None:
    names, weights = ["a:11211", "b:11211", "c:11211"], [1, 2, 3]
    placement = Rendezvous(list(zip(names, weights)))
    got = Counter()
    for key in KEYS[:3000]:
        raw = key.encode("utf-8")
        if not raw.isascii():
            continue
        index = placement.lookup(raw)
        assert index == _weighted_rendezvous(names, weights, raw), key
        got[index] += 1
    # and the expected share of a server is weight / total weight (1/6, 2/6, 3/6), within 15%
    total = sum(got.values())
    for i, weight in enumerate(weights):
        assert abs(got[i] / total - weight / 6) < 0.15 * weight / 6, (i, got)


def _key_hashing_to_zero(prefix: bytes) -> bytes:
    """4 bytes w with murmur3_32(prefix + w) == 0 (len(prefix) % 4 == 0), by running murmur3's last
    block and finalisation backwards: fmix32(0) == 0, so the state before it must equal the length."""
    m = 0xFFFFFFFF
    c1, c2, n1 = 0xCC9E2D51, 0x1B873593, 0xE6546B64
    state = 0
    for (w,) in struct.iter_unpack("<I", prefix):
        k = (w * c1) & m
        k = (((k << 15) | (k >> 17)) & m) * c2 & m
        state ^= k
        state = ((((state << 13) | (state >> 19)) & m) * 5 + n1) & m
    target = len(prefix) + 4
    rotated = ((target - n1) * pow(5, -1, 1 << 32)) & m  # rotl13(state ^ k)
    k = state ^ (((rotated >> 13) | (rotated << 19)) & m)
    x = (k * pow(c2, -1, 1 << 32)) & m  # rotl15(w * c1)
    w = ((((x >> 15) | (x << 17)) & m) * pow(c1, -1, 1 << 32)) & m
    return w.to_bytes(4, "little")


def test_weighted_rendezvous_places_a_key_whose_hash_is_zero() -> None:
    # u must stay inside (0, 1) for the logarithm even when murmur3 gives 0 for a server.
    for i in range(100):
        name = f"srv{i:02d}:1"  # "srvNN:1-": 8 bytes, whole blocks
        key = _key_hashing_to_zero(f"{name}-".encode())
        if key.isascii() or not _decodes_as_utf8(key):  # hashed as given (see _pymemcache_key_bytes)
            break
    else:
        raise AssertionError("no usable key")
    assert pymemcache_murmur3_32(f"{name}-".encode().decode("latin-1") + key.decode("latin-1")) == 0
    names, weights = [name, "other:1"], [3, 1]
    index = Rendezvous(list(zip(names, weights))).lookup(key)
    assert index == _weighted_rendezvous(names, weights, key) == 1  # a hash of 0 is the lowest score


def _decodes_as_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- Memo: remembered answers are the placement's answers, in bounded memory ----------------------


class _Counting:
    """A placement that counts the keys it is asked to place (rendezvous underneath)."""

    def __init__(self, servers: list[tuple[str, int]]) -> None:
        self.real = Rendezvous(servers)
        self.asked: list[bytes] = []

    def lookup(self, key: bytes) -> int:
        self.asked.append(key)
        return self.real.lookup(key)

    def lookup_many(self, keys: list[bytes]) -> list[int]:
        self.asked.extend(keys)
        return self.real.lookup_many(keys)

    def lookup_excluding(self, key: bytes, down: frozenset[int]) -> int | None:
        self.asked.append(key)
        return self.real.lookup_excluding(key, down)


SERVERS4 = [(name, 1) for name in SERVER_LISTS[10][:4]]


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, names=_names, capacity=st.integers(1, 12),
       calls=st.lists(st.tuples(st.booleans(), st.lists(st.sampled_from([b"k%d" % i for i in range(30)]), min_size=1, max_size=20)),
                      min_size=1, max_size=12))
def test_memo_answers_what_the_placement_answers_whatever_it_remembers(
    kind: str, names: list[str], capacity: int, calls: list[tuple[bool, list[bytes]]]
) -> None:
    servers = [(name, 1) for name in names]
    plain = make_placement(kind, servers)
    inner = plain.inner if isinstance(plain, Memo) else plain
    memo = Memo(inner, capacity)
    for many, keys in calls:
        if many:
            assert memo.lookup_many(keys) == inner.lookup_many(keys)
        else:
            assert [memo.lookup(k) for k in keys] == [inner.lookup(k) for k in keys]
        assert len(memo) <= capacity


def test_memo_places_a_remembered_key_without_asking_the_placement_again() -> None:
    counting = _Counting(SERVERS4)
    memo = Memo(counting)
    keys = [b"key:%d" % i for i in range(100)]
    first = memo.lookup_many(keys)
    assert counting.asked == keys
    counting.asked.clear()
    # Remembered: answered from the memo alone, one by one or as a get_many's batch.
    assert memo.lookup_many(keys) == first and [memo.lookup(k) for k in keys] == first
    assert counting.asked == []
    # Half remembered: only the new half is placed, in one call, and the answers stay in order.
    mixed = [k for pair in zip(keys[:50], (b"new:%d" % i for i in range(50))) for k in pair]
    assert memo.lookup_many(mixed) == counting.real.lookup_many(mixed)
    assert counting.asked == [b"new:%d" % i for i in range(50)]


def test_memo_forgets_everything_when_full_and_never_holds_more_than_its_capacity() -> None:
    counting = _Counting(SERVERS4)
    memo = Memo(counting, capacity=10)
    for i in range(10):
        memo.lookup(b"k%d" % i)
    assert len(memo) == 10
    memo.lookup(b"k10")  # the 11th key: the ten are forgotten, this one remembered
    assert len(memo) == 1
    counting.asked.clear()
    memo.lookup(b"k0")
    assert counting.asked == [b"k0"]
    # A batch that would overflow clears first; a batch larger than the capacity is not remembered.
    memo.lookup_many([b"m%d" % i for i in range(9)])  # 2 held + 9 > 10: cleared, then the 9
    assert len(memo) == 9
    big = [b"b%d" % i for i in range(25)]
    assert memo.lookup_many(big) == counting.real.lookup_many(big)
    assert len(memo) == 0


def test_memo_does_not_remember_lookups_that_exclude_down_servers() -> None:
    counting = _Counting(SERVERS4)
    memo = Memo(counting)
    key = b"some:key"
    home = memo.lookup(key)
    elsewhere = memo.lookup_excluding(key, frozenset({home}))
    assert elsewhere is not None and elsewhere != home
    assert elsewhere == counting.real.lookup_excluding(key, frozenset({home}))
    # The key's remembered server is still its home, not the server it went to while home was down.
    assert memo.lookup(key) == home
    with pytest.raises(ValueError, match="capacity"):
        Memo(counting.real, 0)
