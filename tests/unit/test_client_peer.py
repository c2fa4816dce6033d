"""Client and AsyncClient result mapping against an in-process ZeroMQ ROUTER peer.

The peer is not a broker: it reads each frame as clientlib/wire.py's docstring lays the schema out
(`[version, req_id, timeout_ms, flags, ops]`, msgpack) and answers every op with a scripted result
(`[version, req_id, OK, results]`), so the real client, transport and wire code run unchanged. It
decodes with msgpack itself rather than with clientlib.wire: an independent reading of the schema,
and no code under test runs in its thread (mutmut's recording of which test reaches which function
is not thread-safe: a peer thread calling mutated code crashed its stats run). Expected return values are pymemcache's documented ones (its
Client.get / gets / gat / gats / get_many docstrings); the failure table is README "Errors".
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import msgpack
import pytest
import zmq

from clientlib import AsyncClient, Client
from clientlib.errors import BrokerTimeout, MemcacheError, MemcacheServerError, ServerUnavailable
from clientlib.wire import Code, Op

pytestmark = pytest.mark.unit

Answer = Callable[[list[Any]], list[Any]]
GET_MANY = 6  # the schema's number, written out: the peer reads the schema on its own


class Frame(NamedTuple):
    req_id: int
    timeout_ms: int
    flags: int
    ops: list[list[Any]]


class Peer:
    """A ROUTER on an ipc socket in a temporary directory, answering in a thread until closed."""

    def __init__(self, answer: Answer, curve_secret: bytes | None = None, knows_get_many: bool = True) -> None:
        self.answer = answer
        # False: answer a GET_MANY op as a broker older than it does (the whole frame refused).
        self.knows_get_many = knows_get_many
        self.ops: list[list[Any]] = []
        self.frames: list[Any] = []
        self.sizes: list[int] = []
        self.idents: list[bytes] = []  # the ZeroMQ identity of each frame's socket
        self.refused: list[Any] = []  # the GET_MANY ops refused (knows_get_many=False)
        self.sent: list[Any] = []  # each frame's ops as sent
        self.frame_error: str | None = None  # set: every frame is refused whole, BAD_REQUEST with it
        self._dir = tempfile.TemporaryDirectory(prefix="mcb-unit-")
        self.url = f"ipc://{self._dir.name}/peer.sock"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        if curve_secret is not None:  # CURVE without a ZAP handler: any client key pair is let in
            self._sock.curve_server = True
            self._sock.curve_secretkey = curve_secret
        self._sock.bind(self.url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            ident, data = self._sock.recv_multipart()
            version, req_id, timeout_ms, flags, ops = msgpack.unpackb(data)
            assert version == 1, version
            self.sent.append(ops)
            if self.frame_error is not None:
                reply = [1, req_id, int(Code.BAD_REQUEST), self.frame_error]
                self._sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)])
                continue
            if len(ops) == 1 and ops[0][0] == GET_MANY:
                if not self.knows_get_many:
                    # What the broker before GET_MANY (0e3e15a) answered: a small frame reached
                    # its op check, a larger one its bounded decoder's array limit first.
                    self.refused.append(ops)
                    message = f"unknown op {GET_MANY}" if len(data) <= 256 else "undecodable frame: ValueError: 100 exceeds max_array_len(16)"
                    reply = [1, req_id, int(Code.BAD_REQUEST), message]
                    self._sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)])
                    continue
                # The schema's rule: one GET_MANY is answered as one GET per key.
                ops = [[int(Op.GET), key] for key in ops[0][1]]
            req = Frame(req_id, timeout_ms, flags, ops)
            self.ops.extend(req.ops)
            self.frames.append(req)
            self.sizes.append(len(data))
            self.idents.append(ident)
            if not req.flags & 1:  # NOREPLY
                reply = [1, req_id, 0, [[int(x) for x in r[:1]] + list(r[1:]) for r in map(self.answer, ops)]]
                self._sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()
        self._dir.cleanup()


@pytest.fixture
def peer() -> Iterator[Callable[[Answer], Peer]]:
    peers: list[Peer] = []

    def start(answer: Answer, knows_get_many: bool = True) -> Peer:
        peers.append(Peer(answer, knows_get_many=knows_get_many))
        return peers[-1]

    yield start
    for p in peers:
        p.close()


def store(values: dict[bytes, tuple[bytes, int, int]]) -> Answer:
    """Reads answered from `values` {key: (value, client flags, cas)}; a key b"down*" fails as
    its server being down; everything else is OK."""

    def answer(op: list[Any]) -> list[Any]:
        code, key = op[0], op[1] if len(op) > 1 else b""
        if key.startswith(b"down"):
            return [Code.SERVER_DOWN, "server mc1:11211 is down"]
        if code in (Op.GET, Op.GETS, Op.GAT, Op.GATS):
            if key not in values:
                return [Code.MISS]
            value, flags, cas = values[key]
            return [Code.OK, value, flags, cas] if code in (Op.GETS, Op.GATS) else [Code.OK, value, flags]
        return [Code.OK]

    return answer


def flagged(key: Any, value: bytes, flags: int) -> tuple[Any, bytes, int]:
    """pymemcache's legacy deserializer signature: what the client hands it, unchanged."""
    return key, value, flags


VALUES = {b"a": (b"1", 3, 41), b"b": (b"2", 0, 42)}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_async_reads_hand_key_value_and_flags_to_the_deserializer(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))

    async def calls() -> list[Any]:
        c = AsyncClient(p.url, timeout=5, deserializer=flagged)
        return [
            await c.get("a"), await c.gets("a"), await c.gat("a", 10), await c.gats("a", 10),
            await c.get_many(["a", "b", "zz"]), await c.gets_many(["b"]),
        ]

    got = run(calls())
    assert got == [
        ("a", b"1", 3), (("a", b"1", 3), b"41"), ("a", b"1", 3), (("a", b"1", 3), b"41"),
        {"a": ("a", b"1", 3), "b": ("b", b"2", 0)}, {"b": (("b", b"2", 0), b"42")},
    ]
    assert [op[0] for op in p.ops[:4]] == [Op.GET, Op.GETS, Op.GAT, Op.GATS]
    assert p.ops[2][2] == 10 and p.ops[3][2] == 10  # the TTL of gat / gats


def test_async_misses_return_the_defaults(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store({}))

    async def calls() -> list[Any]:
        c = AsyncClient(p.url, timeout=5)
        return [
            await c.get("zz"), await c.get("zz", default="d"), await c.gets("zz"),
            await c.gets("zz", default="d", cas_default="c"), await c.gat("zz", 1, default="d"),
            await c.gats("zz", 1, default="d", cas_default="c"), await c.get_many(["zz"]),
        ]

    assert run(calls()) == [None, "d", (None, None), ("d", "c"), "d", ("d", "c"), {}]


def test_async_failed_reads_raise_unless_ignore_exc(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))

    async def strict() -> None:
        c = AsyncClient(p.url, timeout=5)
        for call in (c.get("down"), c.gets("down"), c.gat("down", 1), c.gats("down", 1)):
            with pytest.raises(ServerUnavailable, match="mc1:11211"):
                await call

    async def lenient() -> list[Any]:
        c = AsyncClient(p.url, timeout=5, ignore_exc=True)
        return [
            await c.get("down", default="d"), await c.gets("down", default="d", cas_default="c"),
            await c.gat("down", 1, default="d"), await c.gats("down", 1, default="d", cas_default="c"),
            await c.get_many(["a", "down"]),
        ]

    run(strict())
    assert run(lenient()) == ["d", ("d", "c"), "d", ("d", "c"), {"a": b"1"}]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_get_many_with_failed_keys_raises_the_first_failure_with_what_was_answered(
    peer: Callable[[Answer], Peer], client: str
) -> None:
    # MemcacheError's docstring: the first failure is raised; `partial` holds the answered keys
    # as the call would have returned them, `failed` {key: exception} for the failed ones.
    p = peer(store(VALUES))
    keys = ["a", "down1", "zz", "down2", "b"]
    if client == "sync":
        with pytest.raises(MemcacheError) as info:
            Client(p.url, timeout=5).get_many(keys)
    else:
        async def call() -> Any:
            return await AsyncClient(p.url, timeout=5).get_many(keys)

        with pytest.raises(MemcacheError) as info:
            run(call())
    exc = info.value
    assert type(exc) is ServerUnavailable and "mc1:11211 is down" in str(exc)
    assert exc.partial == {"a": b"1", "b": b"2"}
    assert exc.failed is not None and list(exc.failed) == ["down1", "down2"]
    assert exc.failed["down1"] is exc
    assert all(type(e) is ServerUnavailable and "mc1:11211 is down" in str(e) for e in exc.failed.values())


def test_gets_many_partial_failure_keeps_the_cas_tokens(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))
    with pytest.raises(ServerUnavailable) as info:
        Client(p.url, timeout=5).gets_many(["down", "b"])
    assert info.value.partial == {"b": (b"2", b"42")}


def test_a_server_error_result_without_a_message_still_raises(peer: Callable[[Answer], Peer]) -> None:
    # A failure code is what decides the exception; the message is only carried along.
    p = peer(lambda op: [Code.SERVER_ERROR])
    c = Client(p.url, timeout=5)
    with pytest.raises(MemcacheServerError) as info:
        c.get_many(["a", "b"])
    assert info.value.failed is not None and set(info.value.failed) == {"a", "b"}
    with pytest.raises(MemcacheServerError):
        c.get("a")


def test_async_timeout_of_a_silent_peer_is_broker_timeout(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store({}))
    p._stop.set()  # the peer stops answering (its socket stays bound)
    p._thread.join(5)

    async def call() -> Any:
        return await AsyncClient(p.url, timeout=0.2).get("a")

    with pytest.raises(BrokerTimeout):
        run(call())


# --- every call of Client and AsyncClient: the op it sends (wire.py's schema) and what it returns
# (pymemcache's documented return values) --------------------------------------------------------

V = b"1.6.18"


def scripted(op: list[Any]) -> list[Any]:
    """A server: key b"ns" is never stored (NOT_STORED), b"ex" has changed (EXISTS), b"nf" and
    every incr/decr of b"nf" are absent (NOT_FOUND); a lease read wins with cas 5."""
    code, key = op[0], op[1] if len(op) > 1 and isinstance(op[1], bytes) else b""
    if code in (Op.GET, Op.GETS, Op.GAT, Op.GATS):
        return [Code.OK, b"val", 0, 9] if code in (Op.GETS, Op.GATS) else [Code.OK, b"val", 0]
    if code == Op.LEASE_GET:
        return [Code.OK, b"", 0, 5, 1]  # LEASE_WON: the caller computes
    if key == b"ns":
        return [Code.NOT_STORED]
    if key == b"ex":
        return [Code.EXISTS]
    if key == b"nf":
        return [Code.NOT_FOUND]
    if code in (Op.INCR, Op.DECR):
        return [Code.OK, 7 if code == Op.INCR else 3]
    if code == Op.VERSION:
        return [Code.OK, {"mc1:11211": V.decode()}]
    if code == Op.STATS:
        return [Code.OK, {"mc1:11211": {"curr_items": "2"}}]
    if code in (Op.FLUSH_ALL, Op.CACHE_MEMLIMIT):
        return [Code.OK, {"mc1:11211": True}]
    if code == Op.PING:
        return [Code.OK, "PONG"]
    if code == Op.BROKER_STATS:
        return [Code.OK, {"uptime": 1}]
    return [Code.OK]


# (method, args, kwargs, the ops sent, the return value)
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], list[list[Any]], Any]] = [
    ("get", ("k",), {}, [[Op.GET, b"k"]], b"val"),
    ("gets", ("k",), {}, [[Op.GETS, b"k"]], (b"val", b"9")),
    ("gat", ("k", 10), {}, [[Op.GAT, b"k", 10]], b"val"),
    ("gats", ("k", 10), {}, [[Op.GATS, b"k", 10]], (b"val", b"9")),
    ("get_many", (["a", "b"],), {}, [[Op.GET, b"a"], [Op.GET, b"b"]], {"a": b"val", "b": b"val"}),
    ("gets_many", (["a"],), {}, [[Op.GETS, b"a"]], {"a": (b"val", b"9")}),
    ("set", ("k", b"v"), {"expire": 10, "flags": 3}, [[Op.SET, b"k", b"v", 3, 10]], True),
    ("set_many", ({"a": b"1", "ns": b"2"},), {"expire": 10, "flags": 3},
     [[Op.SET, b"a", b"1", 3, 10], [Op.SET, b"ns", b"2", 3, 10]], ["ns"]),  # the keys not stored
    ("add", ("k", b"v"), {"expire": 10, "flags": 3}, [[Op.ADD, b"k", b"v", 3, 10]], True),
    ("add", ("ns", b"v"), {}, [[Op.ADD, b"ns", b"v", 0, 0]], False),
    ("replace", ("k", b"v"), {"expire": 10, "flags": 3}, [[Op.REPLACE, b"k", b"v", 3, 10]], True),
    ("replace", ("ns", b"v"), {}, [[Op.REPLACE, b"ns", b"v", 0, 0]], False),
    ("append", ("k", b"v"), {"expire": 10, "flags": 3}, [[Op.APPEND, b"k", b"v", 3, 10]], True),
    ("append", ("ns", b"v"), {}, [[Op.APPEND, b"ns", b"v", 0, 0]], False),
    ("prepend", ("k", b"v"), {"expire": 10, "flags": 3}, [[Op.PREPEND, b"k", b"v", 3, 10]], True),
    ("prepend", ("ns", b"v"), {}, [[Op.PREPEND, b"ns", b"v", 0, 0]], False),
    ("cas", ("k", b"v", b"17"), {"expire": 10, "flags": 3}, [[Op.CAS, b"k", b"v", 3, 10, 17]], True),
    ("cas", ("ex", b"v", 17), {}, [[Op.CAS, b"ex", b"v", 0, 0, 17]], False),
    ("cas", ("nf", b"v", 17), {}, [[Op.CAS, b"nf", b"v", 0, 0, 17]], None),
    ("delete", ("k",), {}, [[Op.DELETE, b"k"]], True),
    ("delete", ("nf",), {}, [[Op.DELETE, b"nf"]], False),
    ("delete_many", (["a", "nf"],), {}, [[Op.DELETE, b"a"], [Op.DELETE, b"nf"]], True),
    ("incr", ("k", 2), {}, [[Op.INCR, b"k", 2]], 7),
    ("incr", ("nf", 2), {}, [[Op.INCR, b"nf", 2]], None),
    ("decr", ("k", 2), {}, [[Op.DECR, b"k", 2]], 3),
    ("decr", ("nf", 2), {}, [[Op.DECR, b"nf", 2]], None),
    ("touch", ("k", 10), {}, [[Op.TOUCH, b"k", 10]], True),
    ("touch", ("nf", 10), {}, [[Op.TOUCH, b"nf", 10]], False),
    ("invalidate", ("k", 20), {}, [[Op.INVALIDATE, b"k", 20]], True),
    ("invalidate", ("nf", 20), {}, [[Op.INVALIDATE, b"nf", 20]], False),
    ("get_or_set", ("k", lambda: b"computed", 10), {"lease_ttl": 7, "recache_ttl": 3},
     [[Op.LEASE_GET, b"k", 7, 3], [Op.CAS, b"k", b"computed", 0, 10, 5]], b"computed"),
    ("version", (), {}, [[Op.VERSION]], V),
    ("stats", ("items",), {}, [[Op.STATS, [b"items"]]], {b"curr_items": 2}),
    ("flush_all", (5,), {}, [[Op.FLUSH_ALL, 5]], True),
    ("cache_memlimit", (100,), {}, [[Op.CACHE_MEMLIMIT, 100]], True),
    ("broker_ping", (), {}, [[Op.PING]], "PONG"),
    ("broker_stats", (), {}, [[Op.BROKER_STATS]], {"uptime": 1}),
]


def call_all(c: Any, p: Peer, awaiting: bool) -> list[tuple[Any, list[list[Any]]]]:
    async def each() -> list[tuple[Any, list[list[Any]]]]:
        out = []
        for name, args, kwargs, _, _ in CALLS:
            before = len(p.ops)
            try:
                result = getattr(c, name)(*args, **kwargs)
                if awaiting:
                    result = await result
            except MemcacheError as exc:
                result = type(exc).__name__
            out.append((result, p.ops[before:]))
        return out

    return asyncio.run(each())


@pytest.mark.parametrize("client", ["sync", "async"])
def test_each_call_sends_its_op_and_returns_pymemcaches_value(peer: Callable[[Answer], Peer], client: str) -> None:
    p = peer(scripted)
    c = Client(p.url, timeout=5) if client == "sync" else AsyncClient(p.url, timeout=5)
    got = call_all(c, p, awaiting=client == "async")
    for (name, args, _, ops, expected), (result, sent) in zip(CALLS, got):
        assert sent == ops, (name, args)
        assert result == expected, (name, args)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_noreply_calls_send_noreply_frames_and_return_at_once(peer: Callable[[Answer], Peer], client: str) -> None:
    # pymemcache: with noreply, set/add/replace/append/prepend/delete/touch return True, incr/decr
    # None, set_many [] (nothing is known about failures).
    p = peer(scripted)
    c: Any = Client(p.url, timeout=5) if client == "sync" else AsyncClient(p.url, timeout=5)
    calls: list[tuple[str, tuple[Any, ...], Any]] = [
        ("set", ("ns", b"v"), True), ("add", ("ns", b"v"), True), ("replace", ("ns", b"v"), True),
        ("append", ("ns", b"v"), True), ("prepend", ("ns", b"v"), True), ("delete", ("nf",), True),
        ("touch", ("nf", 1), True), ("incr", ("nf", 1), None), ("decr", ("nf", 1), None),
        ("set_many", ({"ns": b"v"},), []), ("delete_many", (["nf"],), True), ("invalidate", ("nf",), True),
        ("cas", ("ex", b"v", 1), True), ("flush_all", (), True),
    ]

    async def each() -> list[Any]:
        out = []
        for name, args, _ in calls:
            r = getattr(c, name)(*args, noreply=True)
            out.append(await r if client == "async" else r)
        last = c.get("k")  # a round trip: every earlier frame has reached the peer
        out.append(await last if client == "async" else last)
        return out

    assert asyncio.run(each()) == [want for _, _, want in calls] + [b"val"]
    assert [f.flags & 1 for f in p.frames] == [1] * len(calls) + [0]


def test_the_mapping_protocol(peer: Callable[[Answer], Peer]) -> None:
    # pymemcache's Client: c[k] = v is set(noreply=True), c[k] is get raising KeyError on a
    # miss, del c[k] is delete(noreply=True).
    p = peer(lambda op: [Code.MISS] if op[1] == b"zz" else scripted(op))
    c = Client(p.url, timeout=5)
    c["k"] = b"v"
    del c["k"]
    assert c["k"] == b"val"
    with pytest.raises(KeyError) as info:
        c["zz"]
    assert info.value.args == ("zz",)
    assert [(f.flags & 1, f.ops) for f in p.frames] == [
        (1, [[Op.SET, b"k", b"v", 0, 0]]), (1, [[Op.DELETE, b"k"]]), (0, [[Op.GET, b"k"]]), (0, [[Op.GET, b"zz"]]),
    ]


def test_async_get_or_set_awaits_a_coroutine_fn(peer: Callable[[Answer], Peer]) -> None:
    p = peer(scripted)

    async def fn() -> bytes:
        return b"awaited"

    async def call() -> Any:
        return await AsyncClient(p.url, timeout=5).get_or_set("k", fn, expire=10)

    assert run(call()) == b"awaited"
    assert p.ops == [[Op.LEASE_GET, b"k", 30, 0], [Op.CAS, b"k", b"awaited", 0, 10, 5]]


def test_sync_misses_return_the_defaults(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store({}))
    c = Client(p.url, timeout=5)
    assert [
        c.get("zz"), c.get("zz", default="d"), c.gets("zz"), c.gets("zz", default="d", cas_default="c"),
        c.gat("zz", 1, default="d"), c.gats("zz", 1, default="d", cas_default="c"), c.get_many(["zz"]),
    ] == [None, "d", (None, None), ("d", "c"), "d", ("d", "c"), {}]


def test_defaults_of_the_write_calls(peer: Callable[[Answer], Peer]) -> None:
    # The signatures' defaults (pymemcache's): expire 0 (never), noreply None (default_noreply),
    # flags from the serde (0 for bytes); invalidate's stale_ttl 30 s; get_or_set's lease_ttl
    # 30 s (clientlib.lease.DEFAULT_LEASE_TTL) and no recache window.
    p = peer(scripted)
    c = Client(p.url, timeout=5)
    c.set_many({"a": b"1"})
    c.touch("k")
    c.gat("k")
    c.gats("k")
    c.invalidate("k")
    c.get_or_set("k", lambda: b"v")
    assert p.ops == [
        [Op.SET, b"a", b"1", 0, 0], [Op.TOUCH, b"k", 0], [Op.GAT, b"k", 0], [Op.GATS, b"k", 0],
        [Op.INVALIDATE, b"k", 30], [Op.LEASE_GET, b"k", 30, 0], [Op.CAS, b"k", b"v", 0, 0, 5],
    ]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_get_or_set_polls_a_pending_lease_until_the_value_arrives(peer: Callable[[Answer], Peer], client: str) -> None:
    # lease.py: another caller holds the lease on an empty item (Z, b"", flags 0): poll, then use
    # the value it stored. Bounded: at most two reads, a 10 ms poll between them.
    answers = [[Code.OK, b"", 0, 7, 4], [Code.OK, b"theirs", 0, 8, 0]]  # 4: LEASE_TAKEN
    p = peer(lambda op: answers.pop(0) if answers else [Code.OK])
    fn = lambda: pytest.fail("another caller computes")  # noqa: E731
    if client == "sync":
        got = Client(p.url, timeout=5).get_or_set("k", fn, wait=5)
    else:
        async def call() -> Any:
            return await AsyncClient(p.url, timeout=5).get_or_set("k", fn, wait=5)

        got = run(call())
    assert got == b"theirs"
    assert p.ops == [[Op.LEASE_GET, b"k", 30, 0]] * 2


class TagSerde:
    """A serde whose output names itself, so the test sees it was the one used."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return b"S:" + str(value).encode(), 7

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        return ("D", key, value, flags)


def both(client: str, make: Callable[[], Any], calls: Callable[[Any], list[Any]]) -> list[Any]:
    """Run `calls(c)` on a Client, or on an AsyncClient awaiting each result."""
    c = make()
    if client == "sync":
        return calls(c)

    async def each() -> list[Any]:
        return [await r for r in calls(c)]

    return run(each())


@pytest.mark.parametrize("client", ["sync", "async"])
def test_constructor_options_reach_the_calls(peer: Callable[[Answer], Peer], client: str) -> None:
    p = peer(store(VALUES))
    cls = Client if client == "sync" else AsyncClient
    url = p.url

    def ops_of(make: Callable[[], Any], calls: Callable[[Any], list[Any]]) -> tuple[list[Any], list[list[Any]]]:
        before = len(p.ops)
        got = both(client, make, calls)
        return got, p.ops[before:]

    got, ops = ops_of(lambda: cls(url, timeout=5, serde=TagSerde()), lambda c: [c.set("k", 1), c.get("a")])
    assert got == [True, ("D", "a", b"1", 3)] and ops[0] == [Op.SET, b"k", b"S:1", 7, 0]
    got, ops = ops_of(lambda: cls(url, timeout=5, serializer=TagSerde().serialize, deserializer=TagSerde().deserialize),
                      lambda c: [c.set("k", 1), c.get("a")])
    assert got == [True, ("D", "a", b"1", 3)] and ops[0] == [Op.SET, b"k", b"S:1", 7, 0]
    got, ops = ops_of(lambda: cls(url, timeout=5, key_prefix="p:"), lambda c: [c.get("k")])
    assert ops == [[Op.GET, b"p:k"]]
    got, ops = ops_of(lambda: cls(url, timeout=5, allow_unicode_keys=True), lambda c: [c.get("caf\u00e9")])
    assert ops == [[Op.GET, "caf\u00e9".encode()]]
    got, ops = ops_of(lambda: cls(url, timeout=5, encoding="utf-8"), lambda c: [c.set("k", "caf\u00e9")])
    assert ops == [[Op.SET, b"k", "caf\u00e9".encode(), 0, 0]]
    got, _ = ops_of(lambda: cls(url, timeout=5, ignore_exc=True), lambda c: [c.get("down", default="d")])
    assert got == ["d"]
    got, _ = ops_of(lambda: cls(url, timeout=5, default_noreply=True), lambda c: [c.set("k", b"v"), c.get("a")])
    assert got == [True, b"1"] and p.frames[-2].flags & 1
    c = cls(url, timeout=2.5, connect_timeout=1.5, no_delay=True, socket_module=object(), socket_keepalive=object(),
            tls_context=object())
    assert (c.timeout, c.connect_timeout) == (2.5, 1.5)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_requests_are_split_at_max_frame_bytes(peer: Callable[[Answer], Peer], client: str) -> None:
    # Client's docstring: "larger requests are split" at max_frame_bytes (bytes).
    p = peer(store({}))
    keys = ["k%040d" % n for n in range(60)]  # about 2.7 kB of GET ops
    cls = Client if client == "sync" else AsyncClient
    got = both(client, lambda: cls(p.url, timeout=5, max_frame_bytes=1024),
               lambda c: [c.get_many(keys), c.set_many({k: b"v" for k in keys}, noreply=True), c.get("last")])
    assert got == [{}, [], None]
    assert len(p.sizes) > 3 and max(p.sizes) <= 1024
    assert [op[1] for op in p.ops if op[0] == Op.GET] == [k.encode() for k in keys] + [b"last"]
    assert [op[1] for op in p.ops if op[0] == Op.SET] == [k.encode() for k in keys]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_empty_batches_send_nothing(peer: Callable[[Answer], Peer], client: str) -> None:
    p = peer(store({}))
    cls = Client if client == "sync" else AsyncClient
    got = both(client, lambda: cls(p.url, timeout=5),
               lambda c: [c.get_many([]), c.gets_many([]), c.set_many({}), c.delete_many([])])
    assert got == [{}, {}, [], True]
    assert p.ops == []


@pytest.mark.parametrize("client", ["sync", "async"])
def test_get_or_set_whose_fn_fails_deletes_its_placeholder_and_raises(peer: Callable[[Answer], Peer], client: str) -> None:
    p = peer(scripted)  # the lease read wins an empty placeholder (b"", flags 0)

    def fn() -> bytes:
        raise ZeroDivisionError("db down")

    cls = Client if client == "sync" else AsyncClient
    with pytest.raises(ZeroDivisionError):
        both(client, lambda: cls(p.url, timeout=5), lambda c: [c.get_or_set("k", fn)])
    assert p.ops == [[Op.LEASE_GET, b"k", 30, 0], [Op.DELETE, b"k"]]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_get_or_set_checks_recache_against_expire(peer: Callable[[Answer], Peer], client: str) -> None:
    from clientlib.errors import MemcacheIllegalInputError

    p = peer(scripted)
    cls = Client if client == "sync" else AsyncClient
    with pytest.raises(MemcacheIllegalInputError, match="recache_ttl"):
        both(client, lambda: cls(p.url, timeout=5), lambda c: [c.get_or_set("k", lambda: b"v", expire=10, recache_ttl=10)])
    assert p.ops == []


def test_sync_get_hands_the_key_to_the_deserializer(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(VALUES))
    assert Client(p.url, timeout=5, deserializer=flagged).get("a") == ("a", b"1", 3)


def test_async_defaults_of_the_write_calls(peer: Callable[[Answer], Peer]) -> None:
    p = peer(scripted)

    async def calls() -> None:
        c = AsyncClient(p.url, timeout=5)
        await c.set("k", b"v")
        await c.set_many({"a": b"1"})
        await c.touch("k")
        await c.gat("k")
        await c.gats("k")
        await c.invalidate("k")
        await c.flush_all()
        await c.get_or_set("k", lambda: b"v")

    run(calls())
    assert p.ops == [
        [Op.SET, b"k", b"v", 0, 0], [Op.SET, b"a", b"1", 0, 0], [Op.TOUCH, b"k", 0], [Op.GAT, b"k", 0],
        [Op.GATS, b"k", 0], [Op.INVALIDATE, b"k", 30], [Op.FLUSH_ALL, 0], [Op.LEASE_GET, b"k", 30, 0],
        [Op.CAS, b"k", b"v", 0, 0, 5],
    ]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_curve_keys_reach_the_socket(client: str) -> None:
    # A peer that speaks only CURVE answers a client that was given the keys (a client without
    # them cannot finish the handshake and would time out).
    server_public, server_secret = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    p = Peer(store(VALUES), curve_secret=server_secret)
    try:
        cls = Client if client == "sync" else AsyncClient
        got = both(client, lambda: cls(p.url, timeout=5, curve_secretkey=secret, curve_publickey=public,
                                       curve_serverkey=server_public), lambda c: [c.get("a")])
        assert got == [b"1"]
    finally:
        p.close()


def test_disconnect_all_gives_every_thread_a_new_socket(peer: Callable[[Answer], Peer]) -> None:
    # Client.disconnect_all: "Close this process's sockets to the broker; the next call opens new
    # ones" - in this thread at once, in another thread on its next call.
    from concurrent.futures import ThreadPoolExecutor

    p = peer(store(VALUES))
    c = Client(p.url, timeout=5)
    with ThreadPoolExecutor(max_workers=1) as worker:  # one other thread, the same for each call
        c.get("a")
        assert worker.submit(c.get, "a").result(10) == b"1"
        c.get("a")
        c.disconnect_all()
        c.get("a")
        assert worker.submit(c.get, "a").result(10) == b"1"
        c.get("a")
    first, thread1, same, new, thread2, new_again = p.idents
    assert same == first and new == new_again
    assert len({first, thread1, new, thread2}) == 4
    c.quit()  # as disconnect_all
    c.get("a")
    assert p.idents[-1] not in {first, thread1, new, thread2}


# --- get_many as one GET_MANY op, and with a broker older than the op ----------------------------

MANY = {b"k%d" % i: (b"v%d" % i, 0, i) for i in range(50)}


def test_get_many_sends_its_keys_as_one_get_many_op(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(MANY))
    c = Client(p.url, timeout=5)
    keys = ["k%d" % i for i in range(60)]
    assert c.get_many(keys) == {"k%d" % i: b"v%d" % i for i in range(50)}
    assert p.sent == [[[GET_MANY, [k.encode() for k in keys]]]]
    assert c.get_many(["k1"]) == {"k1": b"v1"}  # one key: a plain GET
    assert c.gets_many(["k1", "k2"]) == {"k1": (b"v1", b"1"), "k2": (b"v2", b"2")}  # GETS stay ops
    assert p.sent[1:] == [[[Op.GET, b"k1"]], [[Op.GETS, b"k1"], [Op.GETS, b"k2"]]]
    c.close()


@pytest.mark.parametrize("count", [3, 50], ids=["small frame: unknown op", "large frame: undecodable"])
def test_a_broker_older_than_get_many_gets_one_get_per_key_from_then_on(peer: Callable[[Answer], Peer], count: int) -> None:
    p = peer(store(MANY), knows_get_many=False)
    c = Client(p.url, timeout=5)
    keys = ["k%d" % i for i in range(count - 1)] + ["nope"]
    assert c.get_many(keys) == {k: MANY[k.encode()][0] for k in keys[:-1]}
    assert c.get_many(["k3", "k4"]) == {"k3": b"v3", "k4": b"v4"}
    assert p.refused == [[[GET_MANY, [k.encode() for k in keys]]]]  # refused once, never sent again
    assert p.sent[1:] == [[[Op.GET, k.encode()] for k in keys], [[Op.GET, b"k3"], [Op.GET, b"k4"]]]
    c.close()


def test_async_get_many_falls_back_the_same_way(peer: Callable[[Answer], Peer]) -> None:
    new, old = peer(store(MANY)), peer(store(MANY), knows_get_many=False)

    async def calls(url: str) -> list[Any]:
        c = AsyncClient(url, timeout=5)
        try:
            return [await c.get_many(["k1", "k2"]), await c.get_many(["k3", "k4"])]
        finally:
            await c.close()

    expected = [{"k1": b"v1", "k2": b"v2"}, {"k3": b"v3", "k4": b"v4"}]
    assert run(calls(new.url)) == expected
    assert new.sent == [[[GET_MANY, [b"k1", b"k2"]]], [[GET_MANY, [b"k3", b"k4"]]]]
    assert run(calls(old.url)) == expected
    assert len(old.refused) == 1 and old.sent[1:] == [[[Op.GET, b"k1"], [Op.GET, b"k2"]], [[Op.GET, b"k3"], [Op.GET, b"k4"]]]


def test_other_bad_request_errors_are_not_taken_for_an_old_broker(peer: Callable[[Answer], Peer]) -> None:
    def refuse(op: list[Any]) -> list[Any]:
        return [Code.BAD_REQUEST, "unknown op 6"]  # a per-key result, not the frame's refusal

    p = peer(refuse)
    c = Client(p.url, timeout=5)
    with pytest.raises(MemcacheError, match="unknown op 6"):
        c.get_many(["a", "b"])
    assert c.get_many_op  # still sending GET_MANY
    c.close()


def test_a_frame_refused_for_another_reason_is_not_taken_for_an_old_broker(peer: Callable[[Answer], Peer]) -> None:
    p = peer(store(MANY))
    p.frame_error = "frame of 5000000 bytes exceeds the 4194304 limit"
    c = Client(p.url, timeout=5)
    with pytest.raises(MemcacheError, match="exceeds the 4194304 limit"):
        c.get_many(["k1", "k2"])
    assert c.get_many_op and p.sent == [[[GET_MANY, [b"k1", b"k2"]]]]  # no second frame
    c.close()


@pytest.mark.parametrize("client_class", ["Client", "AsyncClient"])
def test_an_old_broker_refusing_a_get_many_split_into_several_frames(peer: Callable[[Answer], Peer], client_class: str) -> None:
    """A get_many too large for one frame goes as several GET_MANY frames; a broker older than the
    op refuses each: the client resends the keys one GET per key, and the refusals of the other
    frames (still arriving) answer nothing else."""
    p = peer(store(MANY), knows_get_many=False)
    keys = ["k%d" % (i % 50) for i in range(300)]
    want = {k: MANY[k.encode()][0] for k in keys}

    async def calls_async() -> list[Any]:
        c = AsyncClient(p.url, timeout=5, max_frame_bytes=512)
        try:
            return [await c.get_many(keys), await c.get_many(["k3", "k4"]), await c.get("k5")]
        finally:
            await c.close()

    if client_class == "Client":
        c = Client(p.url, timeout=5, max_frame_bytes=512)
        got = [c.get_many(keys), c.get_many(["k3", "k4"]), c.get("k5")]
        c.close()
    else:
        got = run(calls_async())
    assert got == [want, {"k3": b"v3", "k4": b"v4"}, b"v5"]
    assert len(p.refused) >= 2  # several frames, each refused
    assert all(len(ops) == 1 and ops[0][0] == GET_MANY for ops in p.refused)
    assert all(op[0] == Op.GET for ops in p.sent[len(p.refused):] for op in ops)
