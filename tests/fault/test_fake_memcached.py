"""The broker in front of a memcached that misbehaves on purpose (tests/fakemc.py).

For every way a backend stream can go bad, the requests in flight on that connection must each get
an explicit error (never another request's answer), the connection must be reset (the fake sees a
new one; the server's `resets` counter moves), and the next request must get the right value.
Every value names its key, so an answer delivered to the wrong request cannot pass.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from brokerproc import BrokerProcess
from clientlib import AsyncClient, Client
from clientlib.errors import BrokerTimeout, MemcacheError, ServerUnavailable
from clientlib.wire import Code, Op, ReplyFrame, decode_reply, encode_request
from fakemc import Fault, FakeMemcached
from timing import EARLY, FAST, LATE

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(60)]

# The broker must notice a bad stream on its own; keep mark-down out of the way unless a test
# is about it.
NO_MARKDOWN = {"failure_limit": 1000}

# What the faulty request itself gets. None: its own answer arrived intact before the bad bytes.
NTH_RESULT: dict[Fault, Code | None] = {
    Fault.WRONG_OPAQUE: Code.CONNECTION_ERROR,
    Fault.TRAILING_GARBAGE: None,
    Fault.TRUNCATED_VALUE: Code.CONNECTION_ERROR,
    Fault.CLOSE_MID_RESPONSE: Code.CONNECTION_ERROR,
    Fault.EXTRA_RESPONSE: None,
    Fault.WRONG_SIZE: Code.CONNECTION_ERROR,
}
# A value leaves the broker only once the next response arrived whole and in its place (or the
# write's `mn` fence did): the answer just before a bad one is unproven (its data block may have
# swallowed what came next), so it fails too. Which request is the first to fail, counted from
# the faulty one: -1 where the faulty answer itself is bad, 0 where it arrived whole first.
FIRST_FAILED: dict[Fault, int] = {
    Fault.WRONG_OPAQUE: -1,
    Fault.TRAILING_GARBAGE: 0,
    Fault.TRUNCATED_VALUE: -1,
    Fault.CLOSE_MID_RESPONSE: -1,
    Fault.EXTRA_RESPONSE: 0,
    Fault.WRONG_SIZE: -1,
}
STREAM_FAULTS = list(NTH_RESULT)


def value_of(key: str) -> bytes:
    return b"value-of:" + key.encode()


class RawWorker:
    """A DEALER socket speaking wire frames directly, to see each op's result code."""

    def __init__(self, url: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.next_id = 1

    def call(self, ops: list[list[Any]], timeout_ms: int, wait: float = 10.0) -> ReplyFrame:
        rid = self.next_id
        self.next_id += 1
        self.sock.send(encode_request(rid, ops, timeout_ms))
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000) + 1), f"no reply to request {rid}"
            reply = decode_reply(self.sock.recv())
            if reply.req_id == rid:
                return reply

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def fake() -> Iterator[FakeMemcached]:
    with FakeMemcached() as server:
        yield server


@pytest.fixture
def raw() -> Iterator[Callable[[str], RawWorker]]:
    made: list[RawWorker] = []

    def factory(url: str) -> RawWorker:
        w = RawWorker(url)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.close()


def server_stats(broker: BrokerProcess, fake: FakeMemcached) -> dict[str, Any]:
    return broker.stats()["servers"][fake.address]


def start_broker(
    broker_factory: Callable[..., BrokerProcess], fake: FakeMemcached, conns: int = 1, **config: Any
) -> BrokerProcess:
    broker = broker_factory([fake.address], connections_per_server=conns, **{**NO_MARKDOWN, **config})
    assert fake.wait_for_connections(conns), "the broker never connected to the fake"
    return broker


def preload(client: Client, keys: list[str]) -> None:
    assert client.set_many({k: value_of(k) for k in keys}) == []


def assert_all_served(client: Client, keys: list[str]) -> None:
    assert client.get_many(keys) == {k: value_of(k) for k in keys}
    for k in keys[:3]:
        assert client.get(k) == value_of(k)


def test_fake_serves_the_broker_correctly(fake, broker_factory):
    # The baseline every fault test relies on: without faults, everything round-trips.
    broker = start_broker(broker_factory, fake, conns=2)
    c = Client(broker.url, timeout=3.0)
    keys = [f"k{i}" for i in range(50)]
    preload(c, keys)
    assert_all_served(c, keys)
    assert c.add("k1", b"x") is False
    assert c.replace("k1", b"new") is True and c.get("k1") == b"new"
    assert c.append("k1", b"+") is True and c.get("k1") == b"new+"
    value, cas = c.gets("k2")
    assert value == value_of("k2") and c.cas("k2", b"swapped", cas) is True and c.cas("k2", b"no", cas) is False
    c.set("n", b"5")
    assert c.incr("n", 3) == 8 and c.decr("n", 10) == 0
    assert c.delete("n") is True and c.get("n") is None
    assert c.version() == b"1.6.18-fake"
    assert server_stats(broker, fake)["resets"] == 0
    assert fake.accepted == 2
    # Every meta request the broker wrote carries an opaque token: that is what the fault tests
    # below rely on to catch a shifted stream.
    sent = fake.lines(1) + fake.lines(2)
    meta = [line for line in sent if line[:3] in (b"mg ", b"ms ", b"md ", b"ma ")]
    assert len(meta) >= 100 and all(b" O" in line for line in meta)


@pytest.mark.parametrize("fault", STREAM_FAULTS, ids=lambda f: f.value)
def test_fault_fails_exactly_the_requests_in_flight(fake, broker_factory, raw, fault):
    broker = start_broker(broker_factory, fake)
    client = Client(broker.url, timeout=3.0)
    keys = [f"key{i}" for i in range(20)]
    preload(client, keys)
    resets = server_stats(broker, fake)["resets"]
    accepted = fake.accepted

    nth = 8
    fake.inject(fault, nth=nth)
    start = time.monotonic()
    # One frame: every GET is pipelined on the one connection before any answer is read, so the
    # 8th and all after it are in flight when the stream goes bad.
    reply = raw(broker.url).call([[Op.GET, k.encode()] for k in keys], timeout_ms=5000)
    elapsed = time.monotonic() - start

    assert fake.faults_fired == [(fault, 1)]
    assert reply.code == Code.OK
    results = reply.payload
    assert len(results) == len(keys)
    for i, (key, r) in enumerate(zip(keys, results)):
        if i < nth - 1 + FIRST_FAILED[fault]:
            assert r == [Code.OK, value_of(key), 0], f"{key}: {r}"
        else:
            assert r[0] == Code.CONNECTION_ERROR, f"{key}: {r}"
        if r[0] >= Code.SERVER_ERROR:
            assert isinstance(r[1], str) and r[1]
    # A broken stream is an error at once, not a wait for the 5 s deadline (tests/timing.py).
    assert elapsed < FAST

    assert fake.wait_for_connections(accepted + 1), "the broker did not reconnect"
    assert server_stats(broker, fake)["resets"] == resets + 1
    assert_all_served(client, keys)
    # The bad connection is gone for good: only the new one is left.
    assert fake.live_connections() == [accepted + 1]


@pytest.mark.parametrize("fault", STREAM_FAULTS, ids=lambda f: f.value)
def test_concurrent_callers_get_their_own_value_or_an_error(fake, broker_factory, fault):
    broker = start_broker(broker_factory, fake)
    client = Client(broker.url, timeout=3.0)
    keys = [f"t{i}" for i in range(12)]
    preload(client, keys)
    for k in keys:  # every thread's socket is connected before the race starts
        assert client.get(k) == value_of(k)
    resets = server_stats(broker, fake)["resets"]
    accepted = fake.accepted

    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(len(keys))

    def call(key: str) -> None:
        barrier.wait(5)
        try:
            outcomes[key] = client.get(key)
        except MemcacheError as exc:
            outcomes[key] = exc

    fake.inject(fault, nth=3)
    threads = [threading.Thread(target=call, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)

    assert fake.faults_fired == [(fault, 1)]
    assert set(outcomes) == set(keys)
    for key, outcome in outcomes.items():
        assert outcome == value_of(key) or isinstance(outcome, MemcacheError), f"{key}: {outcome!r}"
    errors = [o for o in outcomes.values() if isinstance(o, MemcacheError)]
    if NTH_RESULT[fault] is not None:
        assert errors, "the request that got the bad answer must fail"
    assert fake.wait_for_connections(accepted + 1)
    assert server_stats(broker, fake)["resets"] == resets + 1
    assert_all_served(client, keys)


ASYNC_FAULTS = [Fault.WRONG_OPAQUE, Fault.TRUNCATED_VALUE]


@pytest.mark.parametrize("fault", ASYNC_FAULTS, ids=lambda f: f.value)
def test_async_pipelined_calls_get_their_own_value_or_an_error(fake, broker_factory, fault):
    broker = start_broker(broker_factory, fake)
    keys = [f"a{i}" for i in range(30)]
    preload(Client(broker.url, timeout=3.0), keys)
    accepted = fake.accepted

    async def run() -> list[object]:
        client = AsyncClient(broker.url, timeout=3.0)
        try:
            assert await client.get(keys[0]) == value_of(keys[0])
            fake.inject(fault, nth=5)
            return await asyncio.gather(*(client.get(k) for k in keys), return_exceptions=True)
        finally:
            await client.disconnect_all()

    outcomes = asyncio.run(run())
    for key, outcome in zip(keys, outcomes):
        assert outcome == value_of(key) or isinstance(outcome, MemcacheError), f"{key}: {outcome!r}"
    assert any(isinstance(o, MemcacheError) for o in outcomes)
    assert fake.wait_for_connections(accepted + 1)
    assert_all_served(Client(broker.url, timeout=3.0), keys)


def test_a_get_many_caller_sees_an_exception_not_a_partial_wrong_answer(fake, broker_factory):
    broker = start_broker(broker_factory, fake)
    client = Client(broker.url, timeout=3.0)
    keys = [f"m{i}" for i in range(40)]
    preload(client, keys)
    fake.inject(Fault.WRONG_OPAQUE, nth=20)
    with pytest.raises(MemcacheError):
        client.get_many(keys)
    assert fake.wait_for_connections(2)
    assert_all_served(client, keys)


def test_stalled_connection_times_out_then_is_reset(fake, broker_factory, raw):
    broker = start_broker(broker_factory, fake, io_timeout_ms=1000)
    client = Client(broker.url, timeout=3.0)
    keys = [f"s{i}" for i in range(10)]
    preload(client, keys)
    resets = server_stats(broker, fake)["resets"]

    fake.inject(Fault.STALL, nth=4)
    start = time.monotonic()
    reply = raw(broker.url).call([[Op.GET, k.encode()] for k in keys], timeout_ms=500)
    elapsed = time.monotonic() - start
    assert reply.code == Code.OK
    # The answer before the stalled one is never proven by a next answer or fence: it times out too.
    for i, (key, r) in enumerate(zip(keys, reply.payload)):
        if i < 2:
            assert r == [Code.OK, value_of(key), 0]
        else:
            assert r[0] == Code.TIMEOUT, f"{key}: {r}"
    assert 0.5 - EARLY <= elapsed <= 0.5 + LATE  # at the frame's deadline

    # Silent past io_timeout with (tombstoned) requests in flight: the connection is reset.
    assert fake.wait_for_connections(2, timeout=5.0)
    assert server_stats(broker, fake)["resets"] == resets + 1
    assert_all_served(client, keys)


def test_stall_on_one_connection_does_not_hold_up_the_other(fake, broker_factory):
    broker = start_broker(broker_factory, fake, conns=2, io_timeout_ms=1500)
    client = Client(broker.url, timeout=3.0)
    keys = [f"o{i}" for i in range(20)]
    preload(client, keys)
    accepted = fake.accepted
    # Both connections ready and idle (each one's opening `stats settings` answered): on a loaded
    # machine the second one's could still be in flight, and the broker rightly queued a call on
    # the stalled connection then (equally deep, first in order), which failed with its reset.
    deadline = time.monotonic() + 5.0
    while (s := server_stats(broker, fake))["connections"] < 2 or s["depth"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.01)
    before = fake.requests

    fake.inject(Fault.STALL, nth=1)
    stalled: dict[str, object] = {}

    def stalled_call() -> None:
        start = time.monotonic()
        try:
            stalled["result"] = Client(broker.url, timeout=2.0).get("victim")
        except MemcacheError as exc:
            stalled["result"] = exc
        stalled["elapsed"] = time.monotonic() - start

    t = threading.Thread(target=stalled_call)
    t.start()
    assert fake.wait_for_requests(before + 1)  # the victim is in flight, unanswered
    # Sequential calls meanwhile go to the idle connection and are answered (a call queued behind
    # the stall would fail with the connection's reset instead).
    for k in keys:
        assert client.get(k) == value_of(k)
    t.join(10)
    assert not t.is_alive()
    assert isinstance(stalled["result"], BrokerTimeout)
    assert stalled["elapsed"] <= 2.0 + LATE
    assert fake.wait_for_connections(accepted + 1, timeout=5.0)
    assert_all_served(client, keys)


def test_repeated_faults_mark_the_server_down_and_it_comes_back(fake, broker_factory):
    broker = start_broker(
        broker_factory, fake, failure_limit=3, probe_interval_ms=200, probe_max_interval_ms=400
    )
    client = Client(broker.url, timeout=2.0)
    preload(client, ["d"])
    for _ in range(3):
        fake.inject(Fault.WRONG_OPAQUE, nth=1)
    failures = 0
    deadline = time.monotonic() + 10
    while fake.pending_faults() and time.monotonic() < deadline:
        try:
            client.get("d")
        except MemcacheError:
            failures += 1
        time.sleep(0.05)
    assert failures == 3 and fake.pending_faults() == 0
    snap = server_stats(broker, fake)
    assert snap["resets"] == 3 and snap["ejections"] == 1
    # Marked down: fail fast until a probe finds it healthy, then serve again.
    recovered_after = None
    start = time.monotonic()
    while time.monotonic() - start < 10:
        try:
            if client.get("d") == value_of("d"):
                recovered_after = time.monotonic() - start
                break
        except ServerUnavailable:
            pass
        time.sleep(0.02)
    assert recovered_after is not None, "the server never came back"
    assert server_stats(broker, fake)["state"] == "up"


def test_client_error_to_a_request_without_data_fails_it_alone(fake, broker_factory, raw):
    # memcached has read the whole `mg` line when it answers CLIENT_ERROR, so the stream is still in
    # step; the next answer's opaque proves it. That reply belongs to its request alone.
    broker = start_broker(broker_factory, fake)
    client = Client(broker.url, timeout=3.0)
    keys = [f"ce{i}" for i in range(20)]
    preload(client, keys)
    resets = server_stats(broker, fake)["resets"]
    fake.inject(Fault.CLIENT_ERROR, nth=8)
    reply = raw(broker.url).call([[Op.GET, k.encode()] for k in keys], timeout_ms=5000)
    assert fake.faults_fired == [(Fault.CLIENT_ERROR, 1)]
    for i, (key, r) in enumerate(zip(keys, reply.payload)):
        if i == 7:
            assert r == [Code.CLIENT_ERROR, "CLIENT_ERROR bad command line format"], r
        else:
            assert r == [Code.OK, value_of(key), 0], f"{key}: {r}"
    assert server_stats(broker, fake)["resets"] == resets
    assert fake.live_connections() == [fake.accepted]


def test_client_error_to_a_request_with_data_resets_the_connection(fake, broker_factory, raw):
    # After `ms`, memcached may have read our data block as commands: nothing after it is trusted.
    broker = start_broker(broker_factory, fake)
    resets = server_stats(broker, fake)["resets"]
    accepted = fake.accepted
    keys = [f"cs{i}" for i in range(12)]
    fake.inject(Fault.CLIENT_ERROR, nth=5)
    reply = raw(broker.url).call([[Op.SET, k.encode(), value_of(k), 0, 0] for k in keys], timeout_ms=5000)
    codes = [r[0] for r in reply.payload]
    # The 4th set's HD is proven by the 5th answer arriving in its place? No: the 5th is an error
    # line without an opaque, so the 4th stays unproven and fails with the rest.
    assert codes[:3] == [Code.OK] * 3
    assert codes[4] == Code.CLIENT_ERROR
    assert codes[3] == Code.CONNECTION_ERROR and set(codes[5:]) == {Code.CONNECTION_ERROR}
    assert fake.wait_for_connections(accepted + 1)
    assert server_stats(broker, fake)["resets"] == resets + 1
