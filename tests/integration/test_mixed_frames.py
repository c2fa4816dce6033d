"""One frame mixing keyed ops and broadcasts (stats, version) keeps every answer with its op:
the broadcast fences each connection first, and the frame's keyed requests queued before it go
out before that fence (a fence takes the next opaque; a regression once shifted them all)."""

from __future__ import annotations

import time

import pytest
import zmq

from clientlib import Client
from clientlib.wire import Code, Op, decode_reply, encode_request

pytestmark = pytest.mark.integration


def call(url: str, ops: list[list[object]]) -> list[list[object]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    try:
        sock.send(encode_request(77, ops, 3000))
        assert sock.poll(5000), "no reply"
        reply = decode_reply(sock.recv())
        assert reply.req_id == 77 and reply.code == Code.OK, reply
        return list(reply.payload)
    finally:
        sock.close(linger=0)


def test_keyed_ops_around_broadcasts_in_one_frame(mc, broker_factory):
    broker = broker_factory([mc.address], connections_per_server=1)
    Client(broker.url, timeout=5.0).set_many({f"k{i}": b"v%d" % i for i in range(6)})
    ops: list[list[object]] = [
        [Op.GET, b"k0"], [Op.GET, b"k1"], [Op.STATS, []], [Op.GET, b"k2"], [Op.VERSION],
        [Op.SET, b"k3", b"new", 0, 0], [Op.GET, b"k3"], [Op.GET, b"missing"], [Op.STATS, [b"settings"]], [Op.GET, b"k5"],
    ]
    for _ in range(20):
        r = call(broker.url, ops)
        assert r[0] == [Code.OK, b"v0", 0] and r[1] == [Code.OK, b"v1", 0] and r[3] == [Code.OK, b"v2", 0]
        assert r[2][0] == Code.OK and int(r[2][1][mc.address]["curr_items"]) >= 6
        assert r[4][0] == Code.OK and r[4][1][mc.address].startswith("1.6")
        assert r[5] == [Code.OK] and r[6] == [Code.OK, b"new", 0] and r[7] == [Code.MISS]
        assert r[8][0] == Code.OK and "item_size_max" in r[8][1][mc.address]
        assert r[9] == [Code.OK, b"v5", 0]
    assert broker.stats()["servers"][mc.address]["resets"] == 0
