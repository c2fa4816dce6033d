"""clientlib through a real broker returns what pymemcache returns talking to memcached directly.

Each scripted sequence runs twice, on two memcached servers that start out identical: once through
clientlib -> broker -> server A, once through pymemcache -> server B. Every step's outcome (return
value, or exception class name) must be the same. cas tokens differ between servers, so each
script uses its own client's tokens and records only that they are digit strings.

pymemcache defaults to default_noreply=True and clientlib to False; the comparison clients use
False on both sides and noreply is exercised explicitly, per call.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymemcache import serde as pm_serde
from pymemcache.client.base import Client as PmClient

import clientlib
from clientlib import Client, MockClient, serde as cl_serde
from clientlib.errors import MemcacheError
from harness import Memcached
from brokerproc import BrokerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# memcached runs with -I 2m (tests/harness.py); the broker gets the same item limit.
ITEM_LIMIT = 2 << 20

State = dict[str, Any]
Step = tuple[str, Callable[[Any, State], Any]]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Memcached, Memcached]]:
    a, b = Memcached(), Memcached()
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


@pytest.fixture(scope="module")
def module_broker(servers: tuple[Memcached, Memcached]) -> Iterator[BrokerProcess]:
    b = BrokerProcess([servers[0].address], max_value_bytes=ITEM_LIMIT, max_frame_bytes=ITEM_LIMIT * 2)
    try:
        b.start()
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def pair(servers: tuple[Memcached, Memcached], module_broker: BrokerProcess) -> Iterator[Callable[..., tuple[Client, PmClient]]]:
    """factory(**client_kwargs) -> (clientlib Client via broker to A, pymemcache Client direct to B)."""
    a, b = servers
    for s in servers:
        if s.paused:
            s.resume()
        s.flush_all()
    made: list[Any] = []

    def factory(**kwargs: Any) -> tuple[Client, PmClient]:
        ours = Client(module_broker.url, timeout=5.0, **kwargs)
        theirs = PmClient(b.address, **{"default_noreply": False, "timeout": 5.0, "connect_timeout": 5.0, **kwargs})
        made.extend((ours, theirs))
        return ours, theirs

    try:
        yield factory
    finally:
        for c in made:
            c.close()


# --- running scripts -------------------------------------------------------------------------


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except Exception as exc:  # the class name is the outcome; both libraries share the names
        return ("raise", type(exc).__name__)


def run(client: Any, steps: list[Step]) -> list[tuple[str, tuple[str, Any]]]:
    st: State = {}
    return [(label, outcome(lambda: fn(client, st))) for label, fn in steps]


def compatible(ours: tuple[str, Any], theirs: tuple[str, Any]) -> bool:
    """Equal outcomes; or clientlib raised a subclass of pymemcache's exception (same names).

    clientlib checks some numbers memcached would reject (a delta past 64 bits, a negative one)
    before sending and raises MemcacheIllegalInputError, a MemcacheClientError, where pymemcache
    relays memcached's CLIENT_ERROR: code catching what pymemcache raises catches it too.
    """
    if ours == theirs:
        return True
    if ours[0] == theirs[0] == "raise":
        mine, want = getattr(clientlib.errors, ours[1], None), getattr(clientlib.errors, theirs[1], None)
        return mine is not None and want is not None and issubclass(mine, want)
    return False


def assert_same(ours: list[tuple[str, tuple[str, Any]]], theirs: list[tuple[str, tuple[str, Any]]]) -> None:
    diffs = [(o[0], o[1], t[1]) for o, t in zip(ours, theirs) if o[0] != t[0] or not compatible(o[1], t[1])]
    assert not diffs, "\n".join(f"{label}: clientlib {o!r} != pymemcache {t!r}" for label, o, t in diffs)
    assert len(ours) == len(theirs)


def cas_token(st: State, name: str, result: tuple[Any, Any]) -> tuple[Any, str | None]:
    """Keep the client's own cas token for later steps; record only its shape."""
    value, cas = result
    if cas is None:
        return value, None
    assert isinstance(cas, bytes) and cas.isdigit(), cas
    st[name] = cas
    return value, "<cas>"


def cas_tokens(st: State, result: dict[Any, tuple[Any, Any]]) -> dict[Any, tuple[Any, str | None]]:
    return {k: cas_token(st, f"many:{k!r}", v) for k, v in result.items()}


def setitem(c: Any, key: Any, value: Any) -> None:
    c[key] = value


def delitem(c: Any, key: Any) -> None:
    del c[key]


def core_steps() -> list[Step]:
    big = bytes(range(256)) * 400  # 100 KiB, every byte value
    return [
        # reads of nothing
        ("get miss", lambda c, st: c.get("a")),
        ("get miss default", lambda c, st: c.get("a", default=b"dflt")),
        ("get_many miss", lambda c, st: c.get_many(["a", "b"])),
        ("gets miss", lambda c, st: c.gets("a")),
        ("gets miss defaults", lambda c, st: c.gets("a", default=b"d", cas_default=b"0")),
        ("gets_many miss", lambda c, st: c.gets_many(["a"])),
        # stores
        ("set", lambda c, st: c.set("a", b"1")),
        ("get", lambda c, st: c.get("a")),
        ("get by bytes key", lambda c, st: c.get(b"a")),
        ("set overwrite", lambda c, st: c.set("a", b"one")),
        ("add existing", lambda c, st: c.add("a", b"2")),
        ("add new", lambda c, st: c.add("b", b"2")),
        ("replace existing", lambda c, st: c.replace("a", b"3")),
        ("replace missing", lambda c, st: c.replace("zz", b"3")),
        ("append", lambda c, st: c.append("a", b"-tail")),
        ("append missing", lambda c, st: c.append("zz", b"x")),
        ("prepend", lambda c, st: c.prepend("a", b"head-")),
        ("prepend missing", lambda c, st: c.prepend("zz", b"x")),
        ("get after append/prepend", lambda c, st: c.get("a")),
        ("set with flags", lambda c, st: c.set("fl", b"v", flags=12345)),
        ("append keeps value", lambda c, st: c.append("fl", b"w", flags=7)),
        ("get flagged", lambda c, st: c.get("fl")),
        ("set str value", lambda c, st: c.set("s", "text")),
        ("get str value", lambda c, st: c.get("s")),
        ("set int value", lambda c, st: c.set("i", 42)),
        ("get int value", lambda c, st: c.get("i")),
        ("set non-ascii str value", lambda c, st: c.set("u", "caf\u00e9")),
        ("set empty value", lambda c, st: c.set("empty", b"")),
        ("get empty value", lambda c, st: c.get("empty")),
        ("set big value", lambda c, st: c.set("big", big)),
        ("get big value", lambda c, st: c.get("big") == big),
        ("set binary-ish key", lambda c, st: c.set(b"k\xc3\xa9y", b"bin")),
        ("get binary-ish key", lambda c, st: c.get(b"k\xc3\xa9y")),
        ("set 250-byte key", lambda c, st: c.set("k" * 250, b"long")),
        ("get 250-byte key", lambda c, st: c.get("k" * 250)),
        ("set 251-byte key", lambda c, st: c.set("k" * 251, b"long")),
        ("get key with space", lambda c, st: c.get("a b")),
        ("set key with newline", lambda c, st: c.set("a\nb", b"x")),
        ("set non-ascii key", lambda c, st: c.set("caf\u00e9", b"x")),
        ("set over the item limit", lambda c, st: c.set("huge", b"x" * (ITEM_LIMIT + 1))),
        ("get after failed set", lambda c, st: c.get("huge")),
        ("bad expire type", lambda c, st: c.set("a", b"x", expire="10")),
        ("bad cas token", lambda c, st: c.cas("a", b"x", "12a")),
        # cas
        ("gets", lambda c, st: cas_token(st, "a", c.gets("a"))),
        ("cas match", lambda c, st: c.cas("a", b"cas1", st["a"])),
        ("cas stale token", lambda c, st: c.cas("a", b"cas2", st["a"])),
        ("get after cas", lambda c, st: c.get("a")),
        ("gets again", lambda c, st: cas_token(st, "a", c.gets("a"))),
        ("cas with str token", lambda c, st: c.cas("a", b"cas3", st["a"].decode())),
        ("gets for int token", lambda c, st: cas_token(st, "a", c.gets("a"))),
        ("cas with int token", lambda c, st: c.cas("a", b"cas4", int(st["a"]))),
        ("cas missing key", lambda c, st: c.cas("zz", b"x", b"1")),
        ("get after cas chain", lambda c, st: c.get("a")),
        # many
        ("get_many", lambda c, st: c.get_many(["a", "b", "zz"])),
        ("get_many empty", lambda c, st: c.get_many([])),
        ("get_multi", lambda c, st: c.get_multi(["a", "b"])),
        ("get_many duplicate keys", lambda c, st: c.get_many(["a", "a", "b"])),
        ("gets_many", lambda c, st: cas_tokens(st, c.gets_many(["a", "b", "zz"]))),
        ("gets_many empty", lambda c, st: c.gets_many([])),
        ("set_many", lambda c, st: c.set_many({"m1": b"1", "m2": b"2", "m3": b"3"})),
        ("set_multi", lambda c, st: c.set_multi({"m4": b"4", "m5": b"5"})),
        ("set_many empty", lambda c, st: c.set_many({})),
        ("set_many one too large", lambda c, st: c.set_many({"m6": b"6", "m7": b"y" * (ITEM_LIMIT + 1)})),
        ("set_many bad key", lambda c, st: c.set_many({"m8": b"8", "bad key": b"9"})),
        ("get_many after set_many", lambda c, st: c.get_many(["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"])),
        ("delete hit", lambda c, st: c.delete("m1")),
        ("delete miss", lambda c, st: c.delete("m1")),
        ("delete_many", lambda c, st: c.delete_many(["m2", "zz"])),
        ("delete_multi", lambda c, st: c.delete_multi(["m3", "m4"])),
        ("delete_many empty", lambda c, st: c.delete_many([])),
        ("get_many after deletes", lambda c, st: c.get_many(["m1", "m2", "m3", "m4", "m5"])),
        # arithmetic
        ("incr missing", lambda c, st: c.incr("n", 1)),
        ("decr missing", lambda c, st: c.decr("n", 1)),
        ("set counter", lambda c, st: c.set("n", b"10")),
        ("incr", lambda c, st: c.incr("n", 5)),
        ("decr to fewer digits", lambda c, st: c.decr("n", 6)),
        ("get counter padded in place", lambda c, st: c.get("n")),
        ("incr padded value", lambda c, st: c.incr("n", 1)),
        ("incr by zero", lambda c, st: c.incr("n", 0)),
        ("decr below zero", lambda c, st: c.decr("n", 1000)),
        ("set counter max", lambda c, st: c.set("n", b"18446744073709551615")),
        ("incr wraps", lambda c, st: c.incr("n", 2)),
        ("incr large delta", lambda c, st: c.incr("n", 2**64 - 1)),
        ("incr non-numeric", lambda c, st: c.incr("a", 1)),
        ("still usable after client error", lambda c, st: c.get("n")),
        ("incr delta over 64 bits", lambda c, st: c.incr("n", 2**64)),
        ("incr negative delta", lambda c, st: c.incr("n", -1)),
        ("incr float delta", lambda c, st: c.incr("n", 1.0)),
        ("set int for incr", lambda c, st: c.set("n2", 7)),
        ("incr int-written value", lambda c, st: c.incr("n2", 3)),
        # touch and expiry
        ("touch hit", lambda c, st: c.touch("a", 100)),
        ("touch miss", lambda c, st: c.touch("zz", 100)),
        ("touch to expire", lambda c, st: c.touch("b", -1)),
        ("get touched-expired", lambda c, st: c.get("b")),
        ("set already expired", lambda c, st: c.set("e", b"v", expire=-1)),
        ("get already expired", lambda c, st: c.get("e")),
        ("add over expired", lambda c, st: c.add("e", b"w")),
        ("get added", lambda c, st: c.get("e")),
        ("set absolute past expiry", lambda c, st: c.set("e2", b"v", expire=60 * 60 * 24 * 31)),
        ("get absolute past expiry", lambda c, st: c.get("e2")),
        ("set long expiry", lambda c, st: c.set("e3", b"v", expire=3600)),
        ("get long expiry", lambda c, st: c.get("e3")),
        # noreply, per call
        ("set noreply", lambda c, st: c.set("nr", b"1", noreply=True)),
        ("get after set noreply", lambda c, st: c.get("nr")),
        ("add existing noreply", lambda c, st: c.add("nr", b"2", noreply=True)),
        ("get after add noreply", lambda c, st: c.get("nr")),
        ("replace noreply", lambda c, st: c.replace("nr", b"3", noreply=True)),
        ("append noreply", lambda c, st: c.append("nr", b"a", noreply=True)),
        ("prepend noreply", lambda c, st: c.prepend("nr", b"p", noreply=True)),
        ("get after concat noreply", lambda c, st: c.get("nr")),
        ("gets for cas noreply", lambda c, st: cas_token(st, "nr", c.gets("nr"))),
        ("cas noreply", lambda c, st: c.cas("nr", b"c", st["nr"], noreply=True)),
        ("get after cas noreply", lambda c, st: c.get("nr")),
        ("set counter for noreply", lambda c, st: c.set("nrn", b"5")),
        ("incr noreply", lambda c, st: c.incr("nrn", 3, noreply=True)),
        ("decr noreply", lambda c, st: c.decr("nrn", 1, noreply=True)),
        ("get after arith noreply", lambda c, st: c.get("nrn")),
        ("touch noreply", lambda c, st: c.touch("nr", 50, noreply=True)),
        ("touch missing noreply", lambda c, st: c.touch("zz", 50, noreply=True)),
        ("delete noreply", lambda c, st: c.delete("nr", noreply=True)),
        ("delete missing noreply", lambda c, st: c.delete("nr", noreply=True)),
        ("get after delete noreply", lambda c, st: c.get("nr")),
        ("set_many noreply", lambda c, st: c.set_many({"q1": b"1", "q2": b"2"}, noreply=True)),
        ("get_many after set_many noreply", lambda c, st: c.get_many(["q1", "q2"])),
        ("delete_many noreply", lambda c, st: c.delete_many(["q1", "q2"], noreply=True)),
        ("get_many after delete_many noreply", lambda c, st: c.get_many(["q1", "q2"])),
        # mapping protocol
        ("setitem", lambda c, st: setitem(c, "d", b"dv")),
        ("getitem", lambda c, st: c["d"]),
        ("getitem missing", lambda c, st: c["zz"]),
        ("delitem", lambda c, st: delitem(c, "d")),
        ("getitem after delitem", lambda c, st: c["d"]),
        ("delitem missing", lambda c, st: delitem(c, "d")),
        # server-wide
        ("version", lambda c, st: c.version()),
        ("cache_memlimit", lambda c, st: c.cache_memlimit(64)),
        ("cache_memlimit bad type", lambda c, st: c.cache_memlimit("64")),
        ("flush_all with delay", lambda c, st: c.flush_all(delay=300)),
        ("get after delayed flush", lambda c, st: c.get("a")),
        ("flush_all", lambda c, st: c.flush_all()),
        ("get after flush", lambda c, st: c.get("a")),
        ("get_many after flush", lambda c, st: c.get_many(["a", "i", "s", "n"])),
        ("flush_all bad delay", lambda c, st: c.flush_all(delay="1")),
        # connection management: the same object keeps working
        ("set before close", lambda c, st: c.set("cl", b"1")),
        ("close", lambda c, st: c.close()),
        ("get after close", lambda c, st: c.get("cl")),
        ("close twice", lambda c, st: c.close()),
        ("quit", lambda c, st: c.quit()),
        ("get after quit", lambda c, st: c.get("cl")),
        ("disconnect_all", lambda c, st: c.disconnect_all()),
        ("get after disconnect_all", lambda c, st: c.get("cl")),
        ("set after disconnect_all", lambda c, st: c.set("cl", b"2")),
        ("get after reconnect", lambda c, st: c.get("cl")),
        ("flush_all noreply", lambda c, st: c.flush_all(noreply=True)),
        ("version last", lambda c, st: c.version()),
    ]


def test_every_method_matches_pymemcache(pair: Callable[..., tuple[Client, PmClient]]) -> None:
    ours, theirs = pair()
    steps = core_steps()
    mine = run(ours, steps)
    assert_same(mine, run(theirs, steps))
    # The comparison is not vacuous: the script exercised hits, misses and errors.
    kinds = {o[1][0] for o in mine}
    assert kinds == {"ok", "raise"}
    assert ("get after append/prepend", ("ok", b"head-3-tail")) in mine
    assert ("get counter padded in place", ("ok", b"9 ")) in mine


def test_mock_client_matches_pymemcache_too(pair: Callable[..., tuple[Client, PmClient]]) -> None:
    # The in-memory MockClient runs the same script; only the version string is its own.
    _, theirs = pair()
    steps = [s for s in core_steps() if not s[0].startswith("version")]
    mock = MockClient(item_size_max=ITEM_LIMIT)
    assert_same(run(mock, steps), run(theirs, steps))
    assert MockClient().version() == clientlib.mock.MOCK_VERSION.encode()


def test_default_noreply_true_matches(pair: Callable[..., tuple[Client, PmClient]]) -> None:
    # Both sides with pymemcache's default: writes return their noreply values, reads still read.
    ours, theirs = pair(default_noreply=True)
    steps: list[Step] = [
        ("set", lambda c, st: c.set("a", b"1")),
        ("add existing", lambda c, st: c.add("a", b"2")),
        ("replace missing", lambda c, st: c.replace("zz", b"2")),
        ("append", lambda c, st: c.append("a", b"x")),
        ("prepend missing", lambda c, st: c.prepend("zz", b"x")),
        ("get", lambda c, st: c.get("a")),
        ("set_many", lambda c, st: c.set_many({"b": b"2", "c": b"3"})),
        ("get_many", lambda c, st: c.get_many(["a", "b", "c"])),
        ("touch missing", lambda c, st: c.touch("zz", 10)),
        ("delete missing", lambda c, st: c.delete("zz")),
        ("delete", lambda c, st: c.delete("a")),
        ("get deleted", lambda c, st: c.get("a")),
        ("delete_many", lambda c, st: c.delete_many(["b", "c"])),
        ("get_many deleted", lambda c, st: c.get_many(["b", "c"])),
        # incr/decr and cas default to waiting for the reply, whatever default_noreply says.
        ("set counter", lambda c, st: c.set("n", b"1")),
        ("incr", lambda c, st: c.incr("n", 1)),
        ("gets", lambda c, st: cas_token(st, "n", c.gets("n"))),
        ("cas stale", lambda c, st: c.cas("n", b"x", int(st["n"]) + 1000)),
        ("cas missing", lambda c, st: c.cas("zz", b"x", 1)),
        ("noreply=False overrides", lambda c, st: c.add("n", b"y", noreply=False)),
        ("flush_all", lambda c, st: c.flush_all()),
        ("version", lambda c, st: c.version()),
    ]
    assert_same(run(ours, steps), run(theirs, steps))


def test_key_prefix_and_unicode_keys_match(pair: Callable[..., tuple[Client, PmClient]]) -> None:
    ours, theirs = pair(key_prefix=b"pfx:", allow_unicode_keys=True)
    steps: list[Step] = [
        ("set unicode key", lambda c, st: c.set("caf\u00e9", b"1")),
        ("get unicode key", lambda c, st: c.get("caf\u00e9")),
        ("get utf-8 bytes key", lambda c, st: c.get("caf\u00e9".encode())),
        ("set 246-char key (250 with prefix)", lambda c, st: c.set("k" * 246, b"2")),
        ("set 247-char key (251 with prefix)", lambda c, st: c.set("k" * 247, b"2")),
        ("set 123 two-byte chars (250 bytes with prefix)", lambda c, st: c.set("\u00e9" * 123, b"3")),
        ("set 124 two-byte chars (252 bytes with prefix)", lambda c, st: c.set("\u00e9" * 124, b"3")),
        ("get_many keeps caller's keys", lambda c, st: c.get_many(["caf\u00e9", "k" * 246, "zz"])),
        ("gets_many keeps caller's keys", lambda c, st: cas_tokens(st, c.gets_many(["caf\u00e9", "zz"]))),
        ("set_many", lambda c, st: c.set_many({"\u00fcber": b"u", "plain": b"p"})),
        ("get_many after set_many", lambda c, st: c.get_many(["\u00fcber", "plain"])),
        ("incr via prefix", lambda c, st: (c.set("ctr", b"1"), c.incr("ctr", 9))),
        ("delete unicode", lambda c, st: c.delete("\u00fcber")),
        ("touch", lambda c, st: c.touch("plain", 100)),
        ("key with space still rejected", lambda c, st: c.get("a b")),
    ]
    assert_same(run(ours, steps), run(theirs, steps))
    # The prefix is really applied on the server: the raw key is absent, the prefixed one present.
    raw, _ = pair()
    assert raw.get("plain") is None
    assert raw.get("pfx:plain") == b"p"


def test_serde_results_match(pair: Callable[..., tuple[Client, PmClient]]) -> None:
    ours = Client(pair()[0].broker_url, timeout=5.0, serde=cl_serde.PickleSerde())
    _, theirs = pair(serde=pm_serde.pickle_serde)
    values: dict[str, Any] = {
        "bytes": b"\x00\xff raw", "str": "t\u00ebxt", "int": 12345678901234567890, "neg": -5,
        "float": 1.5, "bool": True, "none": None, "list": [1, "two", b"3"], "dict": {"a": (1, 2)},
        "set": frozenset({1, 2}),
    }
    steps: list[Step] = [(f"set {k}", lambda c, st, k=k, v=v: c.set(k, v)) for k, v in values.items()]
    steps += [(f"get {k}", lambda c, st, k=k: c.get(k, default="<miss>")) for k in values]
    steps += [
        ("get_many", lambda c, st: c.get_many(list(values))),
        ("gets_many", lambda c, st: {k: v for k, (v, _) in c.gets_many(list(values)).items()}),
        ("incr an int value", lambda c, st: c.incr("neg", 1)),
        ("incr a big int value", lambda c, st: c.incr("int", 1)),
        ("get incremented", lambda c, st: c.get("int")),
    ]
    mine = run(ours, steps)
    assert_same(mine, run(theirs, steps))
    assert ("get dict", ("ok", {"a": (1, 2)})) in mine


def _stats_shape(stats: dict[bytes, Any]) -> dict[bytes, str]:
    # Slab ids ("items:5:number", "5:chunk_size") depend on each server's history; names and
    # value types must not.
    return {re.sub(rb"^(items:)?[0-9]+:", rb"\1N:", k): type(v).__name__ for k, v in stats.items()}


@pytest.mark.parametrize("args", [(), ("settings",), ("slabs",), ("items",), ("sizes",)])
def test_stats_match(pair: Callable[..., tuple[Client, PmClient]], args: tuple[str, ...]) -> None:
    ours, theirs = pair()
    for c in (ours, theirs):
        # The same items on both servers, so slab and item stats have the same keys.
        c.set_many({f"s{i}": b"v" * (i * 100) for i in range(10)})
        c.get("s1")
    mine, want = ours.stats(*args), theirs.stats(*args)
    assert _stats_shape(mine) == _stats_shape(want)
    if args == ():
        assert mine[b"version"] == want[b"version"] == ours.version()
        assert mine[b"cmd_set"] > 0 and want[b"cmd_set"] > 0
        assert isinstance(mine[b"rusage_user"], float)
    elif args == ("settings",):
        assert mine[b"item_size_max"] == want[b"item_size_max"] == ITEM_LIMIT
        assert mine[b"cas_enabled"] == want[b"cas_enabled"]
        assert mine[b"umask"] == want[b"umask"]
    elif args == ("items",):
        assert any(k.endswith(b":number") for k in mine)  # the items set above show up


def test_gat_and_gats_follow_memcached(pair: Callable[..., tuple[Client, PmClient]], servers: tuple[Memcached, Memcached]) -> None:
    """pymemcache has no gat/gats: check them against memcached's own view of the item's TTL."""
    ours, _ = pair()
    address = servers[0].address

    def ttl_left(key: str) -> int:
        # `mg <key> t` asks memcached directly for the seconds left (-1: no expiry).
        with socket.create_connection(_host_port(address), timeout=2.0) as s:
            s.sendall(b"mg " + key.encode() + b" t\r\n")
            line = s.makefile("rb").readline()
        assert line.startswith(b"HD"), line
        return int(line.split()[1][1:])

    assert ours.gat("g", 100) is None
    assert ours.gat("g", 100, default=b"d") == b"d"
    assert ours.gats("g", 100) == (None, None)
    assert ours.gats("g", 100, default=1, cas_default=2) == (1, 2)
    assert ours.set("g", b"v", expire=10) is True
    assert 0 < ttl_left("g") <= 10
    assert ours.gat("g", 1000) == b"v"
    assert 990 <= ttl_left("g") <= 1000
    value, cas = ours.gats("g", 0)
    assert value == b"v"
    assert ttl_left("g") == -1  # TTL 0: never expires
    # gats returns the same cas token gets does, and touching does not change it.
    assert ours.gets("g") == (b"v", cas)
    assert ours.cas("g", b"w", cas) is True
    assert ours.gat("g", -1) == b"w"  # returned, and expired by the touch
    assert ours.get("g") is None

    # Through a serde and a key prefix, gat reads like get.
    typed = Client(ours.broker_url, serde=cl_serde.PickleSerde(), key_prefix="p:", timeout=5.0)
    typed.set("obj", {"x": 1})
    assert typed.gat("obj", 50) == {"x": 1}
    assert 40 <= ttl_left("p:obj") <= 50
    assert typed.gats("obj", 50)[0] == {"x": 1}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- interop on one memcached ----------------------------------------------------------------

INTEROP_VALUES: dict[str, Any] = {
    "bytes": b"raw \x00\xff",
    "str": "\u00fcnic\u00f8de",
    "int": 7,
    "bigint": 2**80,
    "float": 3.25,
    "list": [1, [2, "3"], {"k": b"v"}],
    "dict": {"nested": {"a": [1.5, None]}},
    "tuple": (1, "a"),
    "bool": False,
    "text4k": "compressible " * 400,
    "blob4k": b"z" * 4096,
}


@pytest.mark.parametrize("kind", ["pickle", "compressed"])
def test_values_interoperate_with_pymemcache(
    kind: str, servers: tuple[Memcached, Memcached], module_broker: BrokerProcess, pair: Callable[..., Any]
) -> None:
    if kind == "pickle":
        ours_serde: Any = clientlib.PickleSerde()
        theirs_serde: Any = pm_serde.pickle_serde
    else:
        ours_serde = clientlib.CompressedSerde()
        theirs_serde = pm_serde.compressed_serde
    ours = Client(module_broker.url, timeout=5.0, serde=ours_serde)
    theirs = PmClient(servers[0].address, serde=theirs_serde, default_noreply=False, timeout=5.0)
    try:
        # pymemcache writes, clientlib reads (through the broker, same memcached) ...
        for k, v in INTEROP_VALUES.items():
            assert theirs.set("pm:" + k, v) is True
        for k, v in INTEROP_VALUES.items():
            assert ours.get("pm:" + k, default="<miss>") == v, k
        assert ours.get_many(["pm:" + k for k in INTEROP_VALUES]) == {"pm:" + k: v for k, v in INTEROP_VALUES.items()}
        # ... and the reverse.
        assert ours.set_many({"cl:" + k: v for k, v in INTEROP_VALUES.items()}) == []
        for k, v in INTEROP_VALUES.items():
            assert theirs.get("cl:" + k, default="<miss>") == v, k
        # Both wrote identical bytes and flags (compression included), so raw reads agree too.
        raw_ours = Client(module_broker.url, timeout=5.0)
        raw_theirs = PmClient(servers[0].address, default_noreply=False, timeout=5.0)
        for k in INTEROP_VALUES:
            assert raw_ours.get("cl:" + k) == raw_theirs.get("pm:" + k), k
        if kind == "compressed":
            assert len(raw_ours.get("cl:text4k")) < 1000  # really stored compressed
        raw_theirs.close()
    finally:
        theirs.close()


def test_errors_are_memcache_errors(pair: Callable[..., tuple[Client, PmClient]]) -> None:
    # Every failure clientlib raised in the scripts is catchable as MemcacheError, as in pymemcache.
    ours, _ = pair()
    for fn in (lambda: ours.incr("k" * 251, 1), lambda: ours.set("a", b"x" * (ITEM_LIMIT + 1))):
        with pytest.raises(MemcacheError):
            fn()
