"""GET_MANY frames sent raw to a real broker over real memcached (review of 8f5fcea..a9779f1):
each is answered exactly as the frame of one GET per key is, for keys clientlib would never send
(spaces and control bytes: base64 on the wire; bytes 0x80..0xff; 250 bytes; duplicates), for one
key and for thousands, and a malformed one gets BAD_REQUEST with its request id (never silence)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import zmq

from clientlib import Client
from clientlib.wire import Code, Op, decode_reply, encode_request

pytestmark = pytest.mark.integration


def call(url: str, data: bytes, req_id: int) -> Any:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    try:
        sock.send(data)
        assert sock.poll(10_000), "no reply"
        reply = decode_reply(sock.recv())
        assert reply.req_id == req_id, reply
        return reply
    finally:
        sock.close(linger=0)


def both(url: str, keys: list[bytes]) -> list[Any]:
    """The results of one GET per key, checked against the GET_MANY's: the same but for the
    shape of a hit with client flags 0, which a GET_MANY's reply carries as its value alone."""
    each = call(url, encode_request(5, [[Op.GET, k] for k in keys], 5000), 5)
    many = call(url, encode_request(6, [[Op.GET_MANY, keys]], 5000), 6)
    assert each.code == many.code == Code.OK, (each, many)
    assert not any(type(r) is list and r[0] == Code.OK and r[2] == 0 for r in many.payload), many
    assert [[Code.OK, r, 0] if type(r) is bytes else r for r in many.payload] == list(each.payload)
    return list(each.payload)


ODD = [b"a b", b"tab\tkey", b"nul\x00key", b"\x80\xff\xfe", b"x" * 250, b"plain", b"\x7f"]


def test_odd_keys_duplicates_and_sizes_answer_as_one_get_per_key(mc: Any, broker_factory: Any) -> None:
    broker = broker_factory([mc.address], connections_per_server=2)
    stored = {k: b"v-" + k for k in ODD[::2]}
    for k, v in stored.items():
        r = call(broker.url, encode_request(9, [[Op.SET, k, v, 3, 0]], 5000), 9)
        assert r.code == Code.OK and list(r.payload) == [[Code.OK]], r
    keys = ODD + ODD[::-1] + [b"plain", b"plain"]
    got = both(broker.url, keys)
    assert got == [[Code.OK, stored[k], 3] if k in stored else [Code.MISS] for k in keys]
    assert both(broker.url, [b"a b"]) == [[Code.OK, stored[b"a b"], 3]]
    big = [b"k-%d" % (i % 700) for i in range(3000)]
    Client(broker.url, timeout=5.0).set_many({k: k for k in big[:350]})
    assert both(broker.url, big) == [[Code.OK, k, 0] if int(k[2:]) < 350 else [Code.MISS] for k in big]


@pytest.mark.parametrize(
    "ops",
    [
        [[Op.GET_MANY, []]],
        [[Op.GET_MANY, [b"a", b""]]],
        [[Op.GET_MANY, [b"a", "str"]]],
        [[Op.GET, b"a"], [Op.GET_MANY, [b"b"]]],
        [[Op.GET_MANY, [b"k%05d" % i for i in range(100)] + [1]]],
    ],
    ids=["no keys", "empty key", "str key", "not alone", "long, an int key"],
)
def test_a_malformed_get_many_is_answered_bad_request(mc: Any, broker_factory: Any, ops: list[Any]) -> None:
    broker = broker_factory([mc.address])
    data = msgpack.packb([1, 41, 5000, 0, ops], use_bin_type=True)
    r = call(broker.url, data, 41)
    assert r.code == Code.BAD_REQUEST and "GET_MANY" in r.payload, r
    truncated = call(broker.url, data[:-1], 41)
    assert truncated.code == Code.BAD_REQUEST, truncated
    # The broker still serves.
    assert both(broker.url, [b"a", b"b"]) == [[Code.MISS], [Code.MISS]]
