"""Hostile frames on the broker's worker socket: garbage, lies about lengths, wrong versions,
multi-part envelopes, empty and deeply nested frames, oversize frames.

The broker must never crash or stall (it keeps answering ping), must answer an error whenever the
request id can be read, must drop silently (and count) what it cannot attribute, and must keep
serving well-behaved workers all along.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from brokerproc import BrokerProcess
from clientlib import AsyncClient, Client
from clientlib.errors import MemcacheError
from clientlib.wire import Code, Op, ReplyFrame, decode_reply, encode_request

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(90)]

MAX_FRAME = 65536  # small, so oversize frames are cheap to build
QUIET = 0.3  # how long to wait to be sure no reply is coming
FENCE_ID = 0x7EEDBEEF  # a request id no template below carries


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def nested(depth: int, inner: Any = None) -> bytes:
    """msgpack for `depth` one-element arrays around `inner`, built without recursion."""
    return b"\x91" * depth + pack(inner)


class Hostile:
    """A raw DEALER socket that sends whatever bytes it is given."""

    def __init__(self, url: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def send(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))

    def reply(self, wait: float = 5.0) -> ReplyFrame:
        assert self.sock.poll(int(wait * 1000)), "no reply from the broker"
        return decode_reply(self.sock.recv())

    def silent(self, wait: float = QUIET) -> bool:
        return not self.sock.poll(int(wait * 1000))

    def fence(self) -> ReplyFrame:
        """Send a ping and return the first reply after it. The broker reads one socket's frames
        in order and answers a ping, or a frame it cannot decode, as it reads it: when the ping's
        answer comes, everything sent before it has been read and counted, and every undecodable
        frame among them answered or dropped. (A frame routed to memcached may be answered later.)"""
        self.send(encode_request(FENCE_ID, [[Op.PING]]))
        return self.reply(wait=30.0)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def hostile_broker(broker_factory, memcached) -> BrokerProcess:
    # A private memcached: corrupted frames can turn into valid ops (cache_memlimit, flush_all).
    return broker_factory([memcached.address], max_frame_bytes=MAX_FRAME, max_value_bytes=MAX_FRAME - 4096)


@pytest.fixture
def hostile(hostile_broker) -> Iterator[Hostile]:
    h = Hostile(hostile_broker.url)
    yield h
    h.close()


def assert_alive(broker: BrokerProcess) -> None:
    assert broker.running, f"the broker died:\n{broker.log()}"
    c = Client(broker.url, timeout=3.0)
    try:
        assert c.broker_ping() == "PONG"
        assert c.set("alive", b"yes") is True and c.get("alive") == b"yes"
    finally:
        c.disconnect_all()


def counters(broker: BrokerProcess) -> dict[str, int]:
    s = broker.stats()
    return {k: s[k] for k in ("bad_frames", "dropped_frames", "bad_envelopes", "frames")}


# Frames whose request id cannot be read: dropped without a reply, counted as bad and dropped.
UNATTRIBUTABLE: dict[str, bytes] = {
    "empty": b"",
    "not msgpack": b"\xc1\xc1\xc1 hello, broker",
    "text": b"GET /index.html HTTP/1.1\r\n\r\n",
    "truncated": pack([1, 7, 0, 0, [[Op.GET, b"key"]]])[:-3],
    "trailing bytes": pack([1, 7, 0, 0, [[Op.PING]]]) + b"\x00",
    "bin32 claims 4 GiB": b"\xc6\xff\xff\xff\xff" + b"x" * 16,
    "str32 claims 4 GiB": b"\xdb\xff\xff\xff\xff" + b"x" * 16,
    "array32 claims 4G items": b"\xdd\xff\xff\xff\xff" + b"\x01" * 16,
    "map32 claims 4G items": b"\xdf\xff\xff\xff\xff" + b"\x01" * 16,
    "frame is a map": pack({"version": 1, "req_id": 7}),
    "frame is an int": pack(1),
    "frame too short": pack([1]),
    "req id negative": pack([1, -5, 0, 0, [[Op.PING]]]),
    "req id a string": pack([1, "7", 0, 0, [[Op.PING]]]),
    "req id a float": pack([1, 7.0, 0, 0, [[Op.PING]]]),
    "ext type": pack([1, 7, 0, 0, [[Op.PING]]])[:-1] + b"\xd4\x01\x00",
    "10k-deep nesting": nested(10_000),
    "10k-deep nesting in ops": b"\x95\x01\x07\x00\x00" + nested(10_000),
    "bin claims more than the frame": b"\x95\x01\x07\x00\x00\x91\x92\x01\xc6\x00\x10\x00\x00abc",
}

# Frames whose request id is readable: each must get an error reply under that id.
ATTRIBUTABLE: dict[str, tuple[bytes, Code, int]] = {
    "version 2": (pack([2, 11, 0, 0, [[Op.PING]]]), Code.UNSUPPORTED_VERSION, 11),
    "version 0": (pack([0, 12, 0, 0, [[Op.PING]]]), Code.UNSUPPORTED_VERSION, 12),
    "version as text": (pack(["1", 13, 0, 0, [[Op.PING]]]), Code.UNSUPPORTED_VERSION, 13),
    "six fields": (pack([1, 14, 0, 0, [[Op.PING]], 0]), Code.BAD_REQUEST, 14),
    "three fields": (pack([1, 15, 0]), Code.BAD_REQUEST, 15),
    "no ops": (pack([1, 16, 0, 0, []]), Code.BAD_REQUEST, 16),
    "ops not a list": (pack([1, 17, 0, 0, b"ops"]), Code.BAD_REQUEST, 17),
    "unknown op": (pack([1, 18, 0, 0, [[999]]]), Code.BAD_REQUEST, 18),
    "empty op": (pack([1, 19, 0, 0, [[]]]), Code.BAD_REQUEST, 19),
    "op is a string": (pack([1, 20, 0, 0, ["GET"]]), Code.BAD_REQUEST, 20),
    "get without key": (pack([1, 21, 0, 0, [[Op.GET]]]), Code.BAD_REQUEST, 21),
    "key is text": (pack([1, 22, 0, 0, [[Op.GET, "key"]]]), Code.BAD_REQUEST, 22),
    "empty key": (pack([1, 23, 0, 0, [[Op.GET, b""]]]), Code.BAD_REQUEST, 23),
    "key of 251 bytes": (pack([1, 24, 0, 0, [[Op.GET, b"k" * 251]]]), Code.BAD_REQUEST, 24),
    "set with 3 args": (pack([1, 25, 0, 0, [[Op.SET, b"k", b"v", 0]]]), Code.BAD_REQUEST, 25),
    "ttl is bool": (pack([1, 26, 0, 0, [[Op.TOUCH, b"k", True]]]), Code.BAD_REQUEST, 26),
    "negative timeout": (pack([1, 27, -1, 0, [[Op.PING]]]), Code.BAD_REQUEST, 27),
    "timeout of days": (pack([1, 28, 10**12, 0, [[Op.PING]]]), Code.BAD_REQUEST, 28),
    "unknown flags": (pack([1, 29, 0, 6, [[Op.PING]]]), Code.BAD_REQUEST, 29),
    "stats args not bytes": (pack([1, 30, 0, 0, [[Op.STATS, ["items"]]]]), Code.BAD_REQUEST, 30),
    "largest req id": (pack([1, (1 << 64) - 1, 0, 0, [[999]]]), Code.BAD_REQUEST, (1 << 64) - 1),
    # Nesting deep enough to pass msgpack's own limit but not Python's repr() of it.
    "deep nesting as op": (b"\x95\x01\x1f\x00\x00\x91" + nested(1_000), Code.BAD_REQUEST, 31),
    "deep nesting as op code": (b"\x95\x01\x20\x00\x00\x91\x91" + nested(1_000), Code.BAD_REQUEST, 32),
    "deep nesting as flags": (b"\x95\x01\x21\x00" + nested(1_000) + b"\x91\x91\x28", Code.BAD_REQUEST, 33),
    "deep nesting as timeout": (b"\x95\x01\x22" + nested(1_000) + b"\x00\x91\x91\x28", Code.BAD_REQUEST, 34),
    "deep nesting as version": (b"\x95" + nested(1_000, 1) + b"\x23\x00\x00\x91\x91\x28", Code.UNSUPPORTED_VERSION, 35),
    "version is a long string": (pack(["v" * 50_000, 36, 0, 0, [[Op.PING]]]), Code.UNSUPPORTED_VERSION, 36),
    "op code is a long string": (pack([1, 37, 0, 0, [["o" * 50_000]]]), Code.BAD_REQUEST, 37),
}


# Frames msgpack cannot decode whole, whose first bytes still hold a request id: they are answered
# under that id (a bogus id, as in the array32 case, reaches only the sender, which discards it).
PEEKABLE = ["truncated", "trailing bytes", "array32 claims 4G items", "ext type", "10k-deep nesting in ops", "bin claims more than the frame"]


def readable_id(data: bytes) -> int:
    """The request id as the schema places it (clientlib/wire.py's docstring: a frame is an array
    [version, req_id, ...]), read with msgpack's own streaming Unpacker: the array header, then
    the first two elements, and nothing after them. Independent of the broker's peek."""
    u = msgpack.Unpacker(raw=False)
    u.feed(data)
    u.read_array_header()
    u.skip()  # the version
    rid = u.unpack()
    assert type(rid) is int and 0 <= rid < 1 << 64, rid
    return rid


for _name in PEEKABLE:
    _data = UNATTRIBUTABLE.pop(_name)
    ATTRIBUTABLE[_name] = (_data, Code.BAD_REQUEST, readable_id(_data))


@pytest.mark.parametrize("name", list(UNATTRIBUTABLE))
def test_unattributable_frame_is_dropped_and_counted(hostile_broker, hostile, name):
    before = counters(hostile_broker)
    hostile.send(UNATTRIBUTABLE[name])
    assert hostile.fence().req_id == FENCE_ID, "a frame without a readable id got a reply"
    after = counters(hostile_broker)
    assert after["bad_frames"] == before["bad_frames"] + 1
    assert after["dropped_frames"] == before["dropped_frames"] + 1
    assert_alive(hostile_broker)


@pytest.mark.parametrize("name", list(ATTRIBUTABLE))
def test_attributable_bad_frame_gets_an_error_reply(hostile_broker, hostile, name):
    data, code, req_id = ATTRIBUTABLE[name]
    before = counters(hostile_broker)
    hostile.send(data)
    if hostile.silent(5.0):
        assert hostile_broker.running, f"the broker died:\n{hostile_broker.log()}"
        pytest.fail("no error reply to a frame with a readable request id")
    reply = hostile.reply()
    assert (reply.req_id, reply.code) == (req_id, code), reply
    # An error message names the problem; it does not echo a hostile frame back in bulk.
    assert isinstance(reply.payload, str) and 0 < len(reply.payload) <= 1000, reply.payload[:200]
    after = counters(hostile_broker)
    assert after["bad_frames"] == before["bad_frames"] + 1
    assert after["dropped_frames"] == before["dropped_frames"]
    assert_alive(hostile_broker)


def test_error_replies_carry_the_request_id(hostile_broker, hostile):
    # Several bad frames in a row, each answered under its own id.
    ids = [3, 1 << 40, (1 << 64) - 1, 0]
    for rid in ids:
        hostile.send(pack([1, rid, 0, 0, [[999]]]))
    got = sorted(hostile.reply().req_id for _ in ids)
    assert got == sorted(ids)
    # And a good frame on the same socket after them is answered normally.
    hostile.send(encode_request(77, [[Op.PING]]))
    reply = hostile.reply()
    assert reply.req_id == 77 and reply.code == Code.OK and reply.payload == [[Code.OK, "PONG"]]


@pytest.mark.parametrize("parts", [
    [pack([1, 5, 0, 0, [[Op.PING]]]), b"extra"],
    [b"", pack([1, 5, 0, 0, [[Op.PING]]])],
    [b"", b""],
    [b"a", b"b", b"c", b"d"],
], ids=["valid+extra", "empty+valid", "two empty", "four parts"])
def test_multipart_message_is_dropped_and_counted(hostile_broker, hostile, parts):
    before = counters(hostile_broker)
    hostile.send(*parts)
    assert hostile.fence().req_id == FENCE_ID, "a multi-part message got a reply"
    after = counters(hostile_broker)
    assert after["bad_envelopes"] == before["bad_envelopes"] + 1
    assert_alive(hostile_broker)


def test_oversize_frame_is_refused(hostile_broker, hostile):
    # Above max_frame_bytes but within what ZeroMQ lets through: rejected by the decoder.
    big = encode_request(41, [[Op.SET, b"big", b"x" * MAX_FRAME, 0, 0]])
    assert MAX_FRAME < len(big) < 2 * MAX_FRAME
    before = counters(hostile_broker)
    hostile.send(big)
    reply = hostile.reply()
    assert reply.req_id == 41 and reply.code == Code.BAD_REQUEST
    assert "exceeds" in reply.payload
    assert counters(hostile_broker)["bad_frames"] == before["bad_frames"] + 1
    assert_alive(hostile_broker)
    assert Client(hostile_broker.url, timeout=2.0).get("big") is None


def test_far_oversize_frame_costs_only_its_sender_the_connection(hostile_broker, hostile):
    # Past ZeroMQ's MAXMSGSIZE the broker's socket drops the sender's connection outright.
    hostile.send(b"\x00" * (4 * MAX_FRAME))
    assert hostile.silent()
    assert_alive(hostile_broker)
    # The dropped DEALER reconnects by itself and is served again.
    deadline = time.monotonic() + 5
    while True:
        hostile.send(encode_request(5, [[Op.PING]]))
        if not hostile.silent(0.5):
            reply = hostile.reply()
            assert reply.req_id == 5 and reply.code == Code.OK
            break
        assert time.monotonic() < deadline, "the sender was never served again"


def test_random_garbage_storm_never_hurts_the_broker(hostile_broker):
    # Random bytes and randomly corrupted valid frames, interleaved with a good worker's calls.
    rng = random.Random(1234)
    good = Client(hostile_broker.url, timeout=3.0)
    assert good.set("steady", b"value") is True
    template = [
        encode_request(1, [[Op.GET, b"k1"], [Op.SET, b"k2", b"v" * 40, 3, 0]]),
        encode_request(2, [[Op.INCR, b"n", 5], [Op.STATS, [b"items"]], [Op.VERSION]]),
        encode_request(3, [[Op.CAS, b"k", b"v", 0, 0, 99], [Op.GAT, b"k", 10]]),
    ]
    senders = [Hostile(hostile_broker.url) for _ in range(4)]
    before = counters(hostile_broker)
    try:
        for i in range(2_000):
            if rng.random() < 0.4:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            else:
                frame = bytearray(rng.choice(template))
                for _ in range(rng.randint(1, 4)):
                    frame[rng.randrange(len(frame))] = rng.getrandbits(8)
                data = bytes(frame)
            senders[i % len(senders)].send(data)
            if i % 200 == 0:
                assert good.get("steady") == b"value"
        assert_alive(hostile_broker)
        # The broker reads at most RCVHWM frames ahead per worker (issue 13's flood bound), so
        # most of the storm may still wait in the senders' queues, and closing them with linger 0
        # would drop it: fence each sender before closing it.
        for s in senders:
            reply = s.fence()
            # Whatever came back is well-formed: replies decode, and carry a known code.
            while reply.req_id != FENCE_ID:
                assert isinstance(reply.code, Code)
                reply = s.reply(wait=30.0)
    finally:
        for s in senders:
            s.close()
    stats = counters(hostile_broker)
    assert stats["frames"] - before["frames"] >= 2_000 + len(senders)  # the storm all read
    assert stats["bad_frames"] - before["bad_frames"] > 1_000
    assert good.get("steady") == b"value"


def test_unknown_stats_argument_fails_alone(hostile_broker, memcached):
    # memcached answers `stats <unknown>` with a bare ERROR line. That is the answer to that one
    # command: it must not reset the connection under everybody else's requests in flight.
    setup = Client(hostile_broker.url, timeout=3.0)
    keys = [f"st{i}" for i in range(300)]
    assert setup.set_many({k: k.encode() for k in keys}) == []

    async def run() -> list[object]:
        client = AsyncClient(hostile_broker.url, timeout=3.0)
        try:
            calls = [client.get(k) for k in keys]
            for i in range(0, len(calls), 50):
                calls.insert(i, client.stats("no-such-stats-group"))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.disconnect_all()

    outcomes = asyncio.run(run())
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    values = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(errors) == 6 and all(isinstance(e, MemcacheError) for e in errors), errors
    assert sorted(values) == sorted(k.encode() for k in keys)
    assert hostile_broker.stats()["servers"][memcached.address]["resets"] == 0
    assert setup.stats("items") is not None and setup.get("st1") == b"st1"
