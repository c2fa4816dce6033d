"""Client and AsyncClient result mapping against an in-process ZeroMQ ROUTER peer.

The peer is not a broker: it decodes each frame with the wire schema (`wire.decode_request`) and
answers every op with a scripted result (`wire.encode_reply`), so the real client, transport and
wire code run unchanged. Expected return values are pymemcache's documented ones (its
Client.get / gets / gat / gats / get_many docstrings); the failure table is README "Errors".
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from clientlib import AsyncClient, Client
from clientlib.errors import BrokerTimeout, MemcacheError, MemcacheServerError, ServerUnavailable
from clientlib.wire import Code, Op, decode_request, encode_reply

pytestmark = pytest.mark.unit

Answer = Callable[[list[Any]], list[Any]]


class Peer:
    """A ROUTER on an ipc socket in a temporary directory, answering in a thread until closed."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.ops: list[list[Any]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="mcb-unit-")
        self.url = f"ipc://{self._dir.name}/peer.sock"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(self.url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            ident, data = self._sock.recv_multipart()
            req = decode_request(data)
            self.ops.extend(req.ops)
            if not req.flags & 1:
                self._sock.send_multipart([ident, encode_reply(req.req_id, [self.answer(op) for op in req.ops])])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()
        self._dir.cleanup()


@pytest.fixture
def peer() -> Iterator[Callable[[Answer], Peer]]:
    peers: list[Peer] = []

    def start(answer: Answer) -> Peer:
        peers.append(Peer(answer))
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
