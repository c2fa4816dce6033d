"""broker.meta against a real memcached (1.6.18, started by the harness with -I 2m).

Every request the codec can encode goes over a plain blocking socket and its response comes
back through ResponseParser: each mg flag, each ms mode (cas and invalidate too), md, ma with
auto-vivify, mn, the text commands, awkward values, base64 keys, the codec's boundary values,
and a pipeline of 1,000 mixed requests written at once.

A few tests send hand-written bytes to pin down the memcached facts the codec's limits rest on
(opaque length, 32-bit TTLs, cache_memlimit bounds): if memcached changes, those fail first.
"""

from __future__ import annotations

import base64
import random
import socket
import time
from collections.abc import Iterator

import pytest

from broker.meta import (
    MAX_BINARY_KEY_LEN,
    MAX_KEY_LEN,
    MAX_OPAQUE_LEN,
    META_REQUESTS,
    Arith,
    ArithMode,
    CacheMemlimit,
    Delete,
    FlushAll,
    Get,
    NoOp,
    ProtocolError,
    Request,
    RequestError,
    Response,
    ResponseParser,
    Set,
    SetMode,
    Stats,
    Status,
    Verbosity,
    Version,
    encode,
)
from harness import Memcached

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

I32_MAX = 2**31 - 1
I32_MIN = -(2**31)
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
MiB = 1 << 20


class MetaConn:
    """One blocking socket to memcached, speaking only through broker.meta."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.parser = ResponseParser()

    def close(self) -> None:
        self.sock.close()

    def send(self, *requests: Request) -> None:
        self.send_raw(b"".join(encode(r) for r in requests))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int = 1) -> list[Response]:
        """Exactly n responses; fails on timeout or if memcached closes the connection."""
        out: list[Response] = []
        deadline = time.monotonic() + self.timeout
        while True:
            while len(out) < n and (resp := self.parser.next_response()) is not None:
                out.append(resp)
            if len(out) == n:
                return out
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(out)} of {n} responses within {self.timeout}s"
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(1 << 20)
            assert chunk, f"memcached closed the connection after {len(out)} of {n} responses"
            self.parser.feed(chunk)

    def call(self, request: Request) -> Response:
        self.send(request)
        return self.recv(1)[0]

    def raw(self, data: bytes) -> Response:
        self.send_raw(data)
        return self.recv(1)[0]

    def in_sync(self) -> None:
        """A fence: the stream is still aligned, nothing stray is buffered."""
        assert self.call(NoOp()) == R(Status.NOOP)
        assert self.parser.buffered == 0


def R(status: Status, flags: dict[str, bytes] | None = None, value: bytes | None = None, **kw: object) -> Response:
    return Response(status, flags or {}, value, **kw)  # type: ignore[arg-type]


@pytest.fixture
def conn(mc: Memcached) -> Iterator[MetaConn]:
    c = MetaConn(mc.address)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def own(memcached: Memcached) -> Iterator[MetaConn]:
    """A connection to a memcached of this test alone, for commands that change server state."""
    c = MetaConn(memcached.address)
    try:
        yield c
    finally:
        c.close()


def cas_of(conn: MetaConn, key: bytes) -> int:
    resp = conn.call(Get(key, value=False, client_flags=False, cas=True))
    assert resp.status is Status.OK
    return int(resp.flags["c"])


# --- mg ------------------------------------------------------------------------------------------


def test_mg_each_flag(conn: MetaConn) -> None:
    assert conn.call(Set(b"foo", b"bar", client_flags=5)) == R(Status.OK)
    assert conn.call(Get(b"foo")) == R(Status.VALUE, {"f": b"5"}, b"bar")
    assert conn.call(Get(b"foo", opaque=7)) == R(Status.VALUE, {"f": b"5", "O": b"7"}, b"bar")
    assert conn.call(Get(b"foo", opaque=b"tok-1")) == R(Status.VALUE, {"f": b"5", "O": b"tok-1"}, b"bar")
    assert conn.call(Get(b"foo", client_flags=False)) == R(Status.VALUE, {}, b"bar")
    assert conn.call(Get(b"foo", value=False)) == R(Status.OK, {"f": b"5"})
    assert conn.call(Get(b"foo", value=False, client_flags=False)) == R(Status.OK)
    assert conn.call(Get(b"foo", client_flags=False, return_key=True)) == R(Status.VALUE, {"k": b"foo"}, b"bar")
    assert conn.call(Get(b"foo", client_flags=False, ttl=True)) == R(Status.VALUE, {"t": b"-1"}, b"bar")
    resp = conn.call(Get(b"foo", cas=True, opaque=1))
    assert resp.status is Status.VALUE and resp.value == b"bar" and resp.opaque == b"1"
    assert int(resp.flags["c"]) > 0
    everything = conn.call(Get(b"foo", opaque=9, cas=True, ttl=True, return_key=True))
    assert everything.value == b"bar"
    assert set(everything.flags) == {"f", "c", "t", "k", "O"}
    assert everything.flags["k"] == b"foo" and everything.flags["O"] == b"9"


def test_mg_miss_echoes_opaque_and_key(conn: MetaConn) -> None:
    assert conn.call(Get(b"nope")) == R(Status.MISS)
    assert conn.call(Get(b"nope", opaque=3, return_key=True)) == R(Status.MISS, {"k": b"nope", "O": b"3"})


def test_mg_touch_and_gat(conn: MetaConn) -> None:
    conn.call(Set(b"t", b"v"))
    # A pure touch: no value, no flags, just the new TTL.
    assert conn.call(Get(b"t", value=False, client_flags=False, touch=100, opaque=1)) == R(Status.OK, {"O": b"1"})
    ttl = int(conn.call(Get(b"t", value=False, client_flags=False, ttl=True)).flags["t"])
    assert 90 <= ttl <= 100
    # gat: the value and the touch in one request.
    assert conn.call(Get(b"t", client_flags=False, touch=500)) == R(Status.VALUE, {}, b"v")
    ttl = int(conn.call(Get(b"t", value=False, client_flags=False, ttl=True)).flags["t"])
    assert 490 <= ttl <= 500
    assert conn.call(Get(b"missing", value=False, client_flags=False, touch=10)) == R(Status.MISS)
    # A negative TTL means "already expired", as in the text protocol.
    assert conn.call(Get(b"t", value=False, client_flags=False, touch=-1)) == R(Status.OK)
    assert conn.call(Get(b"t")) == R(Status.MISS)


def test_mg_vivify_and_recache_win_flags(conn: MetaConn) -> None:
    # The first miss with N wins (W) and gets an empty placeholder; the next sees Z.
    assert conn.call(Get(b"viv", client_flags=False, vivify=30)) == R(Status.VALUE, {"W": b""}, b"")
    assert conn.call(Get(b"viv", client_flags=False, vivify=30)) == R(Status.VALUE, {"Z": b""}, b"")
    conn.call(Set(b"rc", b"new", ttl=100))
    # R: a remaining TTL below the token wins the recache.
    assert conn.call(Get(b"rc", client_flags=False, recache=200)) == R(Status.VALUE, {"W": b""}, b"new")
    assert conn.call(Get(b"rc", client_flags=False, recache=200)) == R(Status.VALUE, {"Z": b""}, b"new")


# --- ms ------------------------------------------------------------------------------------------


def test_ms_each_mode(conn: MetaConn) -> None:
    k = b"mode"
    assert conn.call(Set(k, b"b", mode=SetMode.REPLACE, opaque=1)) == R(Status.NOT_STORED, {"O": b"1"})
    assert conn.call(Set(k, b"b", mode=SetMode.APPEND)) == R(Status.NOT_STORED)
    assert conn.call(Set(k, b"b", mode=SetMode.PREPEND)) == R(Status.NOT_STORED)
    assert conn.call(Set(k, b"b", mode=SetMode.ADD, opaque=2)) == R(Status.OK, {"O": b"2"})
    assert conn.call(Set(k, b"x", mode=SetMode.ADD)) == R(Status.NOT_STORED)
    assert conn.call(Set(k, b"c", mode=SetMode.APPEND)) == R(Status.OK)
    assert conn.call(Set(k, b"a", mode=SetMode.PREPEND)) == R(Status.OK)
    assert conn.call(Get(k, client_flags=False)).value == b"abc"
    assert conn.call(Set(k, b"r", mode=SetMode.REPLACE, client_flags=9)) == R(Status.OK)
    assert conn.call(Get(k)) == R(Status.VALUE, {"f": b"9"}, b"r")
    assert conn.call(Set(k, b"s", mode=SetMode.SET)) == R(Status.OK)
    assert conn.call(Get(k)) == R(Status.VALUE, {"f": b"0"}, b"s")


def test_ms_client_flags_and_ttl(conn: MetaConn) -> None:
    assert conn.call(Set(b"f", b"v", client_flags=U32_MAX)) == R(Status.OK)
    assert conn.call(Get(b"f")).flags == {"f": b"4294967295"}
    conn.call(Set(b"t", b"v", ttl=100))
    assert 90 <= int(conn.call(Get(b"t", ttl=True)).flags["t"]) <= 100
    conn.call(Set(b"gone", b"v", ttl=-1))
    assert conn.call(Get(b"gone")) == R(Status.MISS)
    # The largest TTL the codec accepts: an absolute time in 2038, still in the future.
    conn.call(Set(b"far", b"v", ttl=I32_MAX))
    assert int(conn.call(Get(b"far", ttl=True)).flags["t"]) > 0


def test_ms_cas(conn: MetaConn) -> None:
    assert conn.call(Set(b"c", b"v", cas=1, opaque=1)) == R(Status.NOT_FOUND, {"O": b"1"})
    conn.call(Set(b"c", b"v1"))
    old = cas_of(conn, b"c")
    assert conn.call(Set(b"c", b"v2", cas=old, opaque=2)) == R(Status.OK, {"O": b"2"})
    assert conn.call(Set(b"c", b"v3", cas=old, opaque=3)) == R(Status.EXISTS, {"O": b"3"})
    assert conn.call(Get(b"c", client_flags=False)).value == b"v2"
    assert cas_of(conn, b"c") != old
    assert conn.call(Set(b"c", b"v4", cas=U64_MAX)) == R(Status.EXISTS)


def test_ms_invalidate_stores_a_stale_item(conn: MetaConn) -> None:
    conn.call(Set(b"inv", b"v1"))
    old = cas_of(conn, b"inv")
    conn.call(Set(b"inv", b"v2"))
    # With I, an older cas does not fail: the item is stored but marked stale (X), and the
    # first reader is told to recache (W).
    assert conn.call(Set(b"inv", b"v0", cas=old, invalidate=True)) == R(Status.OK)
    resp = conn.call(Get(b"inv", client_flags=False))
    assert resp.value == b"v0"
    assert resp.flags == {"X": b"", "W": b""}
    assert conn.call(Get(b"inv", client_flags=False)).flags == {"Z": b"", "X": b""}


@pytest.mark.parametrize(
    "value",
    [b"", b"\r\nmn\r\n", b"MN\r\nEND\r\nVA 3\r\n", b"\r\n", bytes(range(256)), b"\x00" * 100, b"x"],
    ids=["empty", "mn inside", "responses inside", "crlf", "all bytes", "nuls", "one byte"],
)
def test_awkward_values_round_trip(conn: MetaConn, value: bytes) -> None:
    assert conn.call(Set(b"val", value, opaque=1)) == R(Status.OK, {"O": b"1"})
    assert conn.call(Get(b"val", opaque=2)) == R(Status.VALUE, {"f": b"0", "O": b"2"}, value)
    conn.in_sync()


@pytest.mark.parametrize("size", [MiB - 1, MiB, MiB + MiB // 2])
def test_large_values_round_trip(conn: MetaConn, size: int) -> None:
    value = (b"\r\nmn\r\n" + bytes(range(256)) * (size // 256 + 1))[:size]
    assert len(value) == size
    assert conn.call(Set(b"big", value, opaque=1)) == R(Status.OK, {"O": b"1"})
    assert conn.call(Get(b"big", opaque=2)) == R(Status.VALUE, {"f": b"0", "O": b"2"}, value)
    conn.in_sync()


def test_too_large_value_is_a_server_error_for_that_request_only(conn: MetaConn) -> None:
    conn.send(Set(b"huge", b"x" * (3 * MiB), opaque=1), Get(b"huge", opaque=2))
    first, second = conn.recv(2)
    assert first.status is Status.SERVER_ERROR and b"too large" in first.text
    assert second == R(Status.MISS, {"O": b"2"})
    conn.in_sync()


# --- md, ma, mn ----------------------------------------------------------------------------------


def test_md(conn: MetaConn) -> None:
    assert conn.call(Delete(b"d", opaque=1)) == R(Status.NOT_FOUND, {"O": b"1"})
    conn.call(Set(b"d", b"v"))
    c = cas_of(conn, b"d")
    assert conn.call(Delete(b"d", cas=c + 1, opaque=2)) == R(Status.EXISTS, {"O": b"2"})
    assert conn.call(Delete(b"d", cas=c, opaque=3)) == R(Status.OK, {"O": b"3"})
    assert conn.call(Get(b"d")) == R(Status.MISS)
    conn.call(Set(b"d", b"v"))
    assert conn.call(Delete(b"d")) == R(Status.OK)
    assert conn.call(Delete(b"d")) == R(Status.NOT_FOUND)


def test_ma_incr_decr_and_vivify(conn: MetaConn) -> None:
    assert conn.call(Arith(b"n", opaque=1)) == R(Status.NOT_FOUND, {"O": b"1"})
    assert conn.call(Arith(b"n", vivify=0, initial=10, opaque=2)) == R(Status.VALUE, {"O": b"2"}, b"10")
    assert conn.call(Arith(b"n")) == R(Status.VALUE, {}, b"11")
    assert conn.call(Arith(b"n", delta=9)) == R(Status.VALUE, {}, b"20")
    assert conn.call(Arith(b"n", mode=ArithMode.DECR, delta=5)) == R(Status.VALUE, {}, b"15")
    assert conn.call(Arith(b"n", mode=ArithMode.DECR, delta=100)) == R(Status.VALUE, {}, b"0")  # clamps at 0
    assert conn.call(Arith(b"n", value=False, delta=0, opaque=3)) == R(Status.OK, {"O": b"3"})
    # An existing counter ignores the initial value.
    assert conn.call(Arith(b"n", vivify=0, initial=99)) == R(Status.VALUE, {}, b"1")
    assert conn.call(Arith(b"top", vivify=0, initial=U64_MAX)) == R(Status.VALUE, {}, b"18446744073709551615")
    assert conn.call(Arith(b"top")) == R(Status.VALUE, {}, b"0")  # 64-bit wrap
    assert conn.call(Arith(b"top", delta=U64_MAX)) == R(Status.VALUE, {}, b"18446744073709551615")
    # The counter is an ordinary item: mg reads it, ms resets it.
    # memcached rewrites a shrinking counter in place, padded with spaces ("1 " after "15").
    assert conn.call(Get(b"n", client_flags=False)).value.rstrip(b" ") == b"1"  # type: ignore[union-attr]
    conn.call(Set(b"n", b"41"))
    assert conn.call(Arith(b"n")) == R(Status.VALUE, {}, b"42")


def test_ma_on_a_non_number_is_a_client_error(conn: MetaConn) -> None:
    conn.call(Set(b"word", b"abc"))
    resp = conn.call(Arith(b"word", opaque=1))
    assert resp.status is Status.CLIENT_ERROR and b"non-numeric" in resp.text
    assert resp.opaque is None  # error lines carry no opaque
    conn.in_sync()


def test_mn(conn: MetaConn) -> None:
    assert conn.call(NoOp()) == R(Status.NOOP)
    # mn takes no flags: memcached 1.6.18 accepts an opaque but does not echo it.
    assert conn.call(NoOp(12345)) == R(Status.NOOP)
    assert NoOp not in META_REQUESTS


# --- text commands -------------------------------------------------------------------------------


def test_version(conn: MetaConn, mc: Memcached) -> None:
    resp = conn.call(Version())
    assert resp.status is Status.VERSION
    assert resp.text.decode() == mc.version()
    assert resp.text.startswith(b"1.")


def test_stats(conn: MetaConn) -> None:
    conn.call(Set(b"s", b"v"))
    general = conn.call(Stats())
    assert general.status is Status.STATS and general.stats is not None
    assert int(general.stats["pid"]) > 0 and int(general.stats["curr_items"]) >= 1
    settings = conn.call(Stats((b"settings",))).stats
    assert settings is not None
    assert settings["item_size_max"] == str(2 * MiB) and settings["cas_enabled"] == "yes"
    items = conn.call(Stats((b"items",))).stats
    assert items is not None and any(k.endswith(":number") for k in items)
    slabs = conn.call(Stats((b"slabs",))).stats
    assert slabs is not None and "active_slabs" in slabs
    conn.in_sync()


def test_stats_cachedump_reset_and_detail(own: MetaConn) -> None:
    own.call(Set(b"dumped", b"abc"))
    items = own.call(Stats((b"items",))).stats
    assert items is not None
    (slab_class,) = [k.split(":")[1] for k, v in items.items() if k.endswith(":number") and v == "1"]
    # cachedump lists the COLD LRU only; memcached's LRU maintainer moves a new item there from
    # HOT on its own schedule, so poll (bounded) until it shows up.
    deadline = time.monotonic() + 10
    while True:
        dump = own.call(Stats((b"cachedump", slab_class.encode(), b"0")))
        assert dump.status is Status.STATS and dump.stats is not None
        if dump.stats or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert dump.stats == {"dumped": dump.stats["dumped"]}
    assert dump.stats["dumped"].startswith("[3 b;")
    assert own.call(Stats((b"cachedump", b"63", b"0"))) == R(Status.STATS, stats={})
    assert own.call(Stats((b"reset",))) == R(Status.RESET)
    assert own.call(Stats((b"detail", b"on"))) == R(Status.TEXT_OK)
    assert own.call(Stats((b"detail", b"off"))) == R(Status.TEXT_OK)
    own.in_sync()


def test_flush_all(own: MetaConn) -> None:
    own.call(Set(b"a", b"1"))
    assert own.call(FlushAll()) == R(Status.TEXT_OK)
    assert own.call(Get(b"a")) == R(Status.MISS)
    own.call(Set(b"a", b"1"))
    assert own.call(FlushAll(0)) == R(Status.TEXT_OK)
    assert own.call(Get(b"a")) == R(Status.MISS)
    # The largest delay the codec accepts is honoured as a delay: nothing goes now.
    own.call(Set(b"a", b"1"))
    assert own.call(FlushAll(I32_MAX)) == R(Status.TEXT_OK)
    assert own.call(Get(b"a", client_flags=False)) == R(Status.VALUE, {}, b"1")


def test_verbosity(own: MetaConn) -> None:
    assert own.call(Verbosity(1)) == R(Status.TEXT_OK)
    assert own.call(Stats((b"settings",))).stats["verbosity"] == "1"  # type: ignore[index]
    assert own.call(Verbosity(0)) == R(Status.TEXT_OK)
    assert own.call(Stats((b"settings",))).stats["verbosity"] == "0"  # type: ignore[index]
    assert own.call(Verbosity(U32_MAX)) == R(Status.TEXT_OK)
    own.call(Verbosity(0))


def test_cache_memlimit(own: MetaConn) -> None:
    assert own.call(CacheMemlimit(8)) == R(Status.TEXT_OK)
    assert own.call(Stats((b"settings",))).stats["maxbytes"] == str(8 * MiB)  # type: ignore[index]
    assert own.call(CacheMemlimit(1_000_000_000)) == R(Status.TEXT_OK)
    assert own.call(CacheMemlimit(64)) == R(Status.TEXT_OK)
    assert own.call(Stats((b"settings",))).stats["maxbytes"] == str(64 * MiB)  # type: ignore[index]


# --- keys ----------------------------------------------------------------------------------------

BINARY_KEYS = [b"a b", b"\x00", b"\x7f", b"tab\there", b"line\r\nmn\r\n", b" " * MAX_BINARY_KEY_LEN, bytes(range(33))]


@pytest.mark.parametrize("key", BINARY_KEYS, ids=lambda k: repr(k)[:30])
def test_binary_keys_store_and_read_back(conn: MetaConn, key: bytes) -> None:
    wire = base64.b64encode(key)
    assert conn.call(Set(key, b"val:" + key, client_flags=3, opaque=1)) == R(Status.OK, {"O": b"1"})
    assert conn.call(Get(key, opaque=2)) == R(Status.VALUE, {"f": b"3", "O": b"2"}, b"val:" + key)
    # memcached hands the key back base64, marked with b.
    assert conn.call(Get(key, value=False, client_flags=False, return_key=True)) == R(
        Status.OK, {"k": wire, "b": b""}
    )
    assert conn.call(Set(key, b"+", mode=SetMode.APPEND)) == R(Status.OK)
    assert conn.call(Get(key, client_flags=False)).value == b"val:" + key + b"+"
    assert conn.call(Delete(key, opaque=3)) == R(Status.OK, {"O": b"3"})
    assert conn.call(Get(key)) == R(Status.MISS)
    assert conn.call(Arith(key, vivify=0, initial=5)) == R(Status.VALUE, {}, b"5")
    assert conn.call(Arith(key, mode=ArithMode.DECR, delta=2)) == R(Status.VALUE, {}, b"3")
    conn.in_sync()


def test_distinct_binary_keys_are_distinct_items(conn: MetaConn) -> None:
    keys = [b"a b", b"a\tb", b"a\x00b", b"a\x7fb", b"YSBi"]  # the last is "a b" in base64, as a raw key
    conn.send(*(Set(k, k) for k in keys))
    assert conn.recv(len(keys)) == [R(Status.OK)] * len(keys)
    conn.send(*(Get(k, client_flags=False) for k in keys))
    assert [r.value for r in conn.recv(len(keys))] == keys


@pytest.mark.parametrize(
    "key", [b"foo", b"k" * MAX_BINARY_KEY_LEN, "ключ".encode(), b"\x80\xff"], ids=lambda k: repr(k)[:20]
)
def test_a_valid_key_sent_base64_is_the_same_item_as_its_raw_form(conn: MetaConn, key: bytes) -> None:
    b64 = base64.b64encode(key)
    # Hand-written, since the codec sends valid keys raw: stored through base64...
    assert conn.raw(b"ms %b 3 b O1\r\nb64\r\n" % b64) == R(Status.OK, {"O": b"1"})
    # ...read through the codec's raw key...
    assert conn.call(Get(key, client_flags=False)) == R(Status.VALUE, {}, b"b64")
    # ...and the other way round.
    assert conn.call(Set(key, b"raw")) == R(Status.OK)
    assert conn.raw(b"mg %b b v O2\r\n" % b64) == R(Status.VALUE, {"O": b"2"}, b"raw")
    conn.in_sync()


def test_longest_keys(conn: MetaConn) -> None:
    raw, binary = b"r" * MAX_KEY_LEN, bytes(range(MAX_BINARY_KEY_LEN))
    for key in (raw, binary):
        assert conn.call(Set(key, b"v")) == R(Status.OK)
        assert conn.call(Get(key, client_flags=False)) == R(Status.VALUE, {}, b"v")
    for key in (raw + b"r", binary + b"\x00"):
        with pytest.raises(RequestError):
            encode(Get(key))
    conn.in_sync()


# --- the codec's limits are memcached's --------------------------------------------------------

BOUNDARY_REQUESTS: list[tuple[str, Request]] = [
    ("mg every flag", Get(b"bk", opaque=1, cas=True, ttl=True, return_key=True, touch=100, vivify=30, recache=5)),
    ("mg ttl max", Get(b"bk", touch=I32_MAX)),
    ("mg ttl min", Get(b"bk", touch=I32_MIN)),
    ("mg vivify max", Get(b"bk2", vivify=I32_MAX)),
    ("mg recache max", Get(b"bk", recache=I32_MAX)),
    ("opaque longest int", NoOp(10**MAX_OPAQUE_LEN - 1)),
    ("opaque longest bytes", Get(b"bk", opaque=b"!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"[:MAX_OPAQUE_LEN])),
    ("ms every flag", Set(b"bk", b"v", opaque=2, mode=SetMode.REPLACE, client_flags=U32_MAX, ttl=I32_MAX, cas=U64_MAX, invalidate=True)),
    ("ms add every flag", Set(b"bk3", b"v", opaque=3, mode=SetMode.ADD, client_flags=1, ttl=I32_MIN)),
    ("md cas max", Delete(b"bk", cas=U64_MAX, opaque=4)),
    ("ma every flag", Arith(b"bk4", opaque=5, mode=ArithMode.DECR, delta=U64_MAX, initial=U64_MAX, vivify=I32_MAX)),
    ("ma no value", Arith(b"bk4", value=False)),
    ("stats sizes", Stats((b"sizes",))),
]


@pytest.mark.parametrize("request_", [r for _, r in BOUNDARY_REQUESTS], ids=[n for n, _ in BOUNDARY_REQUESTS])
def test_every_boundary_value_the_codec_accepts_memcached_accepts(conn: MetaConn, request_: Request) -> None:
    conn.call(Set(b"bk", b"v"))
    resp = conn.call(request_)
    assert resp.status not in (Status.ERROR, Status.CLIENT_ERROR, Status.SERVER_ERROR), resp
    conn.in_sync()


def test_fact_opaque_limit_is_31_bytes(conn: MetaConn) -> None:
    assert conn.raw(b"mg nokey v O" + b"x" * MAX_OPAQUE_LEN + b"\r\n") == R(Status.MISS, {"O": b"x" * MAX_OPAQUE_LEN})
    resp = conn.raw(b"mg nokey v O" + b"x" * (MAX_OPAQUE_LEN + 1) + b"\r\n")
    assert resp.status is Status.CLIENT_ERROR and b"opaque" in resp.text
    with pytest.raises(RequestError):
        encode(NoOp(b"x" * (MAX_OPAQUE_LEN + 1)))


def test_fact_ttl_past_int32_expires_at_once(conn: MetaConn) -> None:
    # memcached wraps 2**31 to a negative TTL: the item would vanish, so the codec refuses it.
    assert conn.raw(b"ms wrap 1 T2147483648\r\nx\r\n") == R(Status.OK)
    assert conn.call(Get(b"wrap")) == R(Status.MISS)
    with pytest.raises(RequestError):
        encode(Set(b"wrap", b"x", ttl=I32_MAX + 1))


def test_fact_flush_all_delay_past_int32_flushes_at_once(own: MetaConn) -> None:
    own.call(Set(b"a", b"1"))
    assert own.raw(b"flush_all 2147483648\r\n") == R(Status.TEXT_OK)
    assert own.call(Get(b"a")) == R(Status.MISS)
    with pytest.raises(RequestError):
        encode(FlushAll(I32_MAX + 1))


@pytest.mark.parametrize("mb", [7, 1_000_000_001])
def test_fact_cache_memlimit_out_of_bounds_gets_an_unparsable_line(own: MetaConn, mb: int) -> None:
    own.send_raw(b"cache_memlimit %d\r\n" % mb)
    with pytest.raises(ProtocolError):
        own.recv(1)
    with pytest.raises(RequestError):
        encode(CacheMemlimit(mb))


def test_fact_binary_flag_before_the_length_breaks_ms(conn: MetaConn) -> None:
    # Why the codec writes `ms <key> <len> b`: with `b` first memcached reads "b" as the length,
    # answers CLIENT_ERROR, then runs the data line as a command.
    conn.send_raw(b"ms YSBi b 3\r\nxyz\r\n")
    first, second = conn.recv(2)
    assert first.status is Status.CLIENT_ERROR and second.status is Status.ERROR
    assert encode(Set(b"a b", b"xyz")) == b"ms YSBi 3 b\r\nxyz\r\n"


# --- a pipeline ----------------------------------------------------------------------------------


def test_pipeline_of_1000_mixed_requests_in_order(conn: MetaConn) -> None:
    rng = random.Random(20240611)
    model: dict[bytes, bytes] = {}
    requests: list[Request] = []
    expected: list[Response] = []
    for i in range(1000):
        key = b"p%d" % rng.randrange(40)
        kind = rng.randrange(10) if i < 999 else 9
        o = {"O": b"%d" % i}
        if kind == 0:
            value = b"v%d\r\nmn\r\n" % i
            requests.append(Set(key, value, opaque=i))
            expected.append(R(Status.OK, o))
            model[key] = value
        elif kind == 1:
            requests.append(Set(key, b"add%d" % i, opaque=i, mode=SetMode.ADD))
            expected.append(R(Status.NOT_STORED if key in model else Status.OK, o))
            model.setdefault(key, b"add%d" % i)
        elif kind == 2:
            requests.append(Delete(key, opaque=i))
            expected.append(R(Status.OK if key in model else Status.NOT_FOUND, o))
            model.pop(key, None)
        elif kind == 3:
            requests.append(Set(key, b"+", opaque=i, mode=SetMode.APPEND))
            expected.append(R(Status.OK if key in model else Status.NOT_STORED, o))
            if key in model:
                model[key] += b"+"
        elif kind == 4:
            ckey = b"ctr%d" % rng.randrange(5)
            requests.append(Arith(ckey, opaque=i, vivify=0, initial=0, delta=2))
            before = int(model[ckey]) if ckey in model else None
            model[ckey] = b"%d" % (0 if before is None else before + 2)
            expected.append(R(Status.VALUE, o, model[ckey]))
        elif kind == 5:
            requests.append(Version())
            expected.append(None)  # type: ignore[arg-type]  # checked by status below
        else:
            requests.append(Get(key, opaque=i, client_flags=False))
            expected.append(R(Status.VALUE, o, model[key]) if key in model else R(Status.MISS, o))
    conn.send_raw(b"".join(encode(r) for r in requests))
    responses = conn.recv(len(requests))
    assert len(responses) == 1000
    for i, (req, got, want) in enumerate(zip(requests, responses, expected)):
        if want is None:
            assert got.status is Status.VERSION, (i, req, got)
        else:
            assert got == want, (i, req)
            assert got.opaque == b"%d" % i
    conn.in_sync()
