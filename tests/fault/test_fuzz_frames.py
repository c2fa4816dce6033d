"""Frame fuzzing against the broker's worker socket (issue 13, hostile workers).

test_hostile_frames.py pins one answer per hand-made frame; test_wire_bounds.py bounds the decode
cost of one frame. This file throws many generated frames at a running broker while a
well-behaved worker (its own process) keeps calling it, and checks what the whole run must show:
no crash (the broker runs and counts no internal error), the well-behaved worker's calls all
succeed (100%) within their deadline, its canary keys are never flushed or changed (injected
protocol text never reaches memcached as a command), every reply that comes back is well formed,
and the broker's memory stays bounded. Bounded in frames and time (CI: well under 30 s).

Kinds of frames: random bytes, truncated msgpack, huge declared lengths, deep nesting, wrong
types, unknown ops, wrong versions, oversize frames (just over the limit: an error reply; far
over: the sender's connection is dropped), and keys or stats arguments carrying protocol text
(`foo\\r\\nflush_all`, spaces, control bytes) sent straight in frames. The figures are printed;
run with -s to see them.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from brokerproc import BrokerProcess
from clientlib import Client
from clientlib.errors import MemcacheError
from clientlib.wire import Code, Op, decode_reply, encode_request
from harness import Memcached, rss_bytes

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(90)]

MiB = 1 << 20
MAX_FRAME = 65536
CALL_TIMEOUT = 2.0
TOLERANCE = 1.0
FUZZ_FRAMES = 12_000
FUZZ_SECONDS = 12.0
SOCKETS = 8
CANARIES = 50
RSS_GROWTH_LIMIT = 64 * MiB
# Ops that legitimately change what every worker sees; a fuzzer that sends them well formed
# would "find" a flush that memcached was asked for.
DESTRUCTIVE = {int(Op.FLUSH_ALL), int(Op.CACHE_MEMLIMIT)}
KNOWN_OPS = [int(o) for o in Op if int(o) not in DESTRUCTIVE]

INJECTIONS = [
    b"foo\r\nflush_all", b"foo\r\nflush_all\r\n", b"foo flush_all", b"k\nflush_all", b"k\rflush_all",
    b"k\r\nms canary:0 1 T0\r\nX", b"k\r\nmn", b"\r\n", b" ", b"k v", b"k\x00", b"\x00", b"k\x7f",
    b"k\tflush_all", b"mg canary:0 v", b"k\x1b[2J", "ключ".encode(), b"k" * 251, b"\r\nflush_all 0\r\n" * 10,
]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def canary_value(i: int) -> bytes:
    return b"canary|%d|" % i + b"c" * 40


# --- the well-behaved worker -------------------------------------------------------------------


def _good_worker(url: str, stop: Any, out: Any) -> None:
    """Reads the canaries (must be exactly as set) and writes/reads its own keys, until stopped."""
    c = Client(url, timeout=CALL_TIMEOUT)
    calls = 0
    failures: list[str] = []
    latencies: list[float] = []
    keys = [f"canary:{i}" for i in range(CANARIES)]
    try:
        while not stop.is_set():
            t = time.monotonic()
            try:
                got = c.get_many(keys[calls % 5 :: 5])
                want = {k: canary_value(int(k.split(":")[1])) for k in keys[calls % 5 :: 5]}
                if got != want:
                    failures.append(f"call {calls}: canaries {sorted(set(want) - set(got))[:3]} missing or changed")
                key = f"good:{calls % 20}"
                value = b"%s|%d" % (key.encode(), calls)
                if c.set(key, value) is not True or c.get(key) != value:
                    failures.append(f"call {calls}: own write not read back")
            except MemcacheError as exc:
                failures.append(f"call {calls}: {type(exc).__name__}: {exc}")
            latencies.append(time.monotonic() - t)
            calls += 1
            time.sleep(0.005)
    finally:
        c.disconnect_all()
        out.put((calls, failures[:10], len(failures), latencies))


class Run:
    """The broker under test, its canaries, the good worker and an RSS sampler."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        c = Client(broker.url, timeout=5.0)
        try:
            assert c.set_many({f"canary:{i}": canary_value(i) for i in range(CANARIES)}) == []
        finally:
            c.disconnect_all()
        self.baseline = rss_bytes(broker.pid)
        self.peak = self.baseline
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.out: Any = ctx.Queue()
        self.worker = ctx.Process(target=_good_worker, args=(broker.url, self.stop, self.out))
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self._sampling:
            try:
                self.peak = max(self.peak, rss_bytes(self.broker.pid))
            except (OSError, AssertionError):
                return
            time.sleep(0.02)

    def __enter__(self) -> "Run":
        self._sampler.start()
        self.worker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        try:
            self.calls, self.failure_sample, self.failures, self.latencies = self.out.get(timeout=30)
        finally:
            self.worker.join(10)
            if self.worker.is_alive():
                self.worker.kill()
                self.worker.join()
            self._sampling = False
            self._sampler.join()

    def check(self, memcached: Memcached, label: str, sent: int) -> None:
        stats = self.broker.stats()
        worst = max(self.latencies) if self.latencies else 0.0
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
        growth = self.peak - self.baseline
        mc_stats = memcached.stats()
        print(
            f"\n{label}: {sent} frames sent; broker alive {self.broker.running}, internal errors "
            f"{stats['internal_errors']}, bad frames {stats['bad_frames']}, dropped {stats['dropped_frames']}, "
            f"bad envelopes {stats['bad_envelopes']}; good worker {self.calls} calls, "
            f"{self.calls - self.failures}/{self.calls} succeeded, p99 {p99 * 1000:.0f} ms, worst stall "
            f"{worst * 1000:.0f} ms; broker RSS {self.baseline / MiB:.1f} -> peak {self.peak / MiB:.1f} MiB "
            f"(+{growth / MiB:.1f}); memcached cmd_flush {mc_stats['cmd_flush']}"
        )
        assert self.broker.running, self.broker.log()
        assert stats["internal_errors"] == 0, self.broker.log()
        assert self.calls >= 20
        assert self.failures == 0, self.failure_sample
        assert worst <= CALL_TIMEOUT + TOLERANCE
        assert growth <= RSS_GROWTH_LIMIT
        assert mc_stats["cmd_flush"] == "0"
        # And the canaries are there, as set, straight from memcached.
        c = Client(self.broker.url, timeout=5.0)
        try:
            assert c.get_many([f"canary:{i}" for i in range(CANARIES)]) == {
                f"canary:{i}": canary_value(i) for i in range(CANARIES)
            }
        finally:
            c.disconnect_all()


@pytest.fixture
def fuzz_broker(broker_factory, memcached) -> BrokerProcess:
    # A private memcached: the fuzzer's writes land there, and its flush counter is checked.
    return broker_factory(
        [memcached.address], max_frame_bytes=MAX_FRAME, max_value_bytes=MAX_FRAME - 4096,
        timeout_ms=int(CALL_TIMEOUT * 1000),
    )


# --- a bounded random generator ----------------------------------------------------------------


def _valid_op(rng: random.Random) -> list[Any]:
    key = b"fz:%d" % rng.randrange(1000)
    code = rng.choice(KNOWN_OPS)
    if code in (Op.GET, Op.GETS, Op.DELETE):
        return [code, key]
    if code in (Op.GAT, Op.GATS, Op.TOUCH):
        return [code, key, rng.randrange(0, 100)]
    if code in (Op.INCR, Op.DECR):
        return [code, key, rng.randrange(0, 1 << 20)]
    if code == Op.CAS:
        return [code, key, b"v" * rng.randrange(0, 200), 0, 0, rng.randrange(1 << 32)]
    if code in (Op.SET, Op.ADD, Op.REPLACE, Op.APPEND, Op.PREPEND):
        return [code, key, b"v" * rng.randrange(0, 200), rng.randrange(1 << 16), rng.randrange(0, 100)]
    if code == Op.STATS:
        return [code, [rng.choice([b"items", b"slabs", b"settings"])]]
    return [code]


def _valid_frame(rng: random.Random, rid: int) -> bytes:
    return encode_request(rid, [_valid_op(rng) for _ in range(rng.randint(1, 5))], rng.choice([0, 50, 500]))


def _wrong_value(rng: random.Random) -> Any:
    return rng.choice([None, True, False, 1.5, -1, -(1 << 63), (1 << 64) - 1, "text", b"bin", [], {}, {"a": 1}, [[1]], "\r\nflush_all"])


def gen_random_bytes(rng: random.Random, rid: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))


def gen_truncated(rng: random.Random, rid: int) -> bytes:
    data = _valid_frame(rng, rid)
    return data[: rng.randrange(len(data))]


def gen_huge_length(rng: random.Random, rid: int) -> bytes:
    header = rng.choice([b"\xc6\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff",
                         b"\xc5\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff", b"\xdd\x00\x01\x86\xa0" * 50])
    data = _valid_frame(rng, rid)
    at = rng.randrange(len(data))
    return data[:at] + header + data[at:]


def gen_deep_nesting(rng: random.Random, rid: int) -> bytes:
    depth = rng.choice([100, 1000, 5000, 20000])
    inner = rng.choice([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"])
    prefix = rng.choice([b"", b"\x95\x01" + msgpack.packb(rid) + b"\x00\x00", b"\x95\x01" + msgpack.packb(rid) + b"\x00\x00\x91"])
    return prefix + inner * depth + b"\xc0"


def gen_wrong_types(rng: random.Random, rid: int) -> bytes:
    frame: list[Any] = [1, rid, 0, 0, [_valid_op(rng)]]
    where = rng.randrange(6)
    if where < 4:
        frame[where] = _wrong_value(rng)
    elif where == 4:
        frame[4] = _wrong_value(rng)
    else:
        op = frame[4][0]
        if len(op) > 1:
            op[rng.randrange(1, len(op))] = _wrong_value(rng)
        else:
            op.append(_wrong_value(rng))
    return pack(frame)


def gen_unknown_op(rng: random.Random, rid: int) -> bytes:
    code = rng.choice([0, -1, 5, 16, 24, 34, 39, 42, 99, 255, 65535, (1 << 64) - 1, -(1 << 63)])
    return pack([1, rid, 0, 0, [[code, b"fz:k"]] + [_valid_op(rng) for _ in range(rng.randint(0, 2))]])


def gen_wrong_version(rng: random.Random, rid: int) -> bytes:
    return pack([rng.choice([0, 2, 3, 255, -1, "1", 1.0, None, b"\x01"]), rid, 0, 0, [_valid_op(rng)]])


def gen_oversize(rng: random.Random, rid: int) -> bytes:
    if rng.random() < 0.9:
        # Just over the limit: the decoder answers "exceeds".
        return encode_request(rid, [[Op.SET, b"fz:big", b"x" * (MAX_FRAME + rng.randrange(1, 1000)), 0, 0]])
    # Far over ZeroMQ's MAXMSGSIZE: ZeroMQ drops the sender's connection (it reconnects).
    return b"\x00" * (MAX_FRAME * 3)


def gen_injected(rng: random.Random, rid: int) -> bytes:
    text = rng.choice(INJECTIONS)
    kind = rng.randrange(6)
    if kind == 0:
        ops: list[Any] = [[Op.SET, text, b"v", 0, 0]]
    elif kind == 1:
        ops = [[rng.choice([Op.GET, Op.GETS, Op.DELETE]), text]]
    elif kind == 2:
        ops = [[rng.choice([Op.TOUCH, Op.GAT, Op.INCR]), text, 1]]
    elif kind == 3:
        ops = [[Op.STATS, [rng.choice([b"items", text]), text]]]
    elif kind == 4:
        # Protocol text in a value is just data: stored and read back as is.
        ops = [[Op.SET, b"fz:val", b"x\r\nflush_all\r\n" + text, 0, 0], [Op.GET, b"fz:val"]]
    else:
        ops = [[Op.GET, b"fz:%d" % i] for i in range(3)] + [[Op.SET, text, b"v", 0, 0]]
    return pack([1, rid, 0, 0, ops])


GENERATORS = {
    "random bytes": gen_random_bytes,
    "truncated msgpack": gen_truncated,
    "huge declared lengths": gen_huge_length,
    "deep nesting": gen_deep_nesting,
    "wrong types": gen_wrong_types,
    "unknown ops": gen_unknown_op,
    "wrong version": gen_wrong_version,
    "oversize": gen_oversize,
    "injected protocol text": gen_injected,
    "valid": lambda rng, rid: _valid_frame(rng, rid),
}


def test_random_hostile_frames_never_hurt_the_broker_or_other_workers(fuzz_broker, memcached):
    rng = random.Random(13)
    ctx = zmq.Context()
    socks = []
    for _ in range(SOCKETS):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 64)
        s.connect(fuzz_broker.url)
        socks.append(s)
    sent: Counter[str] = Counter()
    replies = 0
    names = list(GENERATORS)
    try:
        with Run(fuzz_broker) as run:
            end = time.monotonic() + FUZZ_SECONDS
            i = 0
            while i < FUZZ_FRAMES and time.monotonic() < end:
                name = names[i % len(names)]
                data = GENERATORS[name](rng, i)
                s = socks[i % SOCKETS]
                try:
                    s.send(data, zmq.NOBLOCK)
                    sent[name] += 1
                except zmq.Again:
                    time.sleep(0.001)
                i += 1
                if i % 200 == 0:
                    for s in socks:
                        while s.poll(0):
                            reply = decode_reply(s.recv())  # every reply is well formed
                            assert isinstance(reply.code, Code)
                            replies += 1
            time.sleep(0.5)
        for s in socks:
            while s.poll(100):
                reply = decode_reply(s.recv())
                assert isinstance(reply.code, Code)
                replies += 1
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    total = sum(sent.values())
    print("\nfrom the generator: " + ", ".join(f"{k} {v}" for k, v in sent.items()) + f"; {replies} replies")
    run.check(memcached, "random fuzz", total)
    assert total >= 2000 and all(sent[name] > 0 for name in names)


# --- hypothesis ----------------------------------------------------------------------------------

def _destructive(code: Any) -> bool:
    return isinstance(code, (int, float)) and code in DESTRUCTIVE


_leaf = (
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=True)
    | st.binary(max_size=40) | st.text(max_size=20) | st.sampled_from(INJECTIONS)
)
_any = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=20)
_key = st.binary(min_size=0, max_size=260) | st.sampled_from(INJECTIONS) | st.text(max_size=10)
_op = st.one_of(
    st.tuples(st.sampled_from(KNOWN_OPS), _key).map(list),
    st.tuples(st.sampled_from(KNOWN_OPS), _key, _any).map(list),
    st.tuples(st.sampled_from(KNOWN_OPS), _key, _any, _any, _any).map(list),
    st.tuples(st.integers(-(1 << 63), (1 << 64) - 1).filter(lambda c: c not in DESTRUCTIVE), _any).map(list),
    st.lists(_any, max_size=7).filter(lambda op: not op or not _destructive(op[0])),
)
_frame = st.one_of(
    st.tuples(
        st.just(1) | _any, st.integers(0, (1 << 64) - 1) | _any, st.integers(0, 5000) | _any,
        st.integers(0, 3) | _any, st.lists(_op, min_size=0, max_size=6) | _any,
    ).map(lambda t: pack(list(t))),
    st.lists(_any, max_size=8).map(pack),
    st.binary(max_size=300),
)


def test_hypothesis_frames_never_hurt_the_broker_or_other_workers(fuzz_broker, memcached):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(fuzz_broker.url)
    count = [0]
    stalls: list[float] = []
    ping_id = iter(range(1 << 60, 1 << 61))

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_frame)
    def one(data: bytes) -> None:
        # The frame, then a ping on the same socket: the broker must answer it, whatever the frame.
        s.send(data)
        count[0] += 1
        rid = next(ping_id)
        t = time.monotonic()
        s.send(encode_request(rid, [[Op.PING]]))
        while True:
            assert s.poll(int((CALL_TIMEOUT + TOLERANCE) * 1000)), f"no answer to a ping after {data[:80]!r}"
            reply = decode_reply(s.recv())
            assert isinstance(reply.code, Code)
            if reply.req_id == rid:
                assert reply.code == Code.OK
                break
        stalls.append(time.monotonic() - t)

    try:
        with Run(fuzz_broker) as run:
            one()
    finally:
        s.close(linger=0)
        ctx.term()
    print(f"\nhypothesis: worst ping after a fuzz frame {max(stalls) * 1000:.0f} ms")
    run.check(memcached, "hypothesis fuzz", count[0])


# --- what the fuzzer found, pinned -------------------------------------------------------------


def test_crlf_value_then_an_incr_of_text_fails_nobody(broker_factory, memcached):
    # The random fuzzer's first finding: a get of a value holding CRLF followed, on the same
    # connection, by an incr of a non-number (memcached's CLIENT_ERROR carries no opaque) reset
    # the connection and failed every request in flight on it, other workers' included. Both are
    # ordinary calls; now the error line waits with the value for the fence's proof.
    broker = broker_factory([memcached.address], connections_per_server=1)
    c = Client(broker.url, timeout=CALL_TIMEOUT)
    try:
        assert c.set("crlf", b"line one\r\nline two") is True and c.set("text", b"abc") is True
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(broker.url)
        try:
            for rid in range(50):
                s.send(encode_request(rid, [[Op.GET, b"crlf"], [Op.INCR, b"text", 1]] + [[Op.GET, b"text"]] * 3))
            for _ in range(50):
                assert s.poll(int((CALL_TIMEOUT + TOLERANCE) * 1000))
                reply = decode_reply(s.recv())
                assert reply.code == Code.OK
                value, incr, *texts = reply.payload
                assert value == [Code.OK, b"line one\r\nline two", 0]
                assert incr[0] == Code.CLIENT_ERROR and "non-numeric" in incr[1]
                assert texts == [[Code.OK, b"abc", 0]] * 3
        finally:
            s.close(linger=0)
            ctx.term()
        assert c.get("crlf") == b"line one\r\nline two"
    finally:
        c.disconnect_all()
    assert broker.stats()["servers"][memcached.address]["resets"] == 0
