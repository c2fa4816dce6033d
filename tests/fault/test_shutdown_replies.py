"""SIGTERM with requests in flight: every request the broker received gets its answer (the value,
or "broker is shutting down"), never silence (issue 13 item 2: replies queued in ZeroMQ were
discarded by closing with linger 0). Raw DEALER sockets, one per worker, so what is checked is the
broker's promise alone."""

from __future__ import annotations

import signal
import time

import pytest
import zmq

from clientlib import Client
from clientlib.wire import Code, Op, decode_reply, encode_request

pytestmark = pytest.mark.fault

WORKERS = 8


@pytest.mark.parametrize("attempt", range(3))
def test_requests_in_flight_at_sigterm_all_get_an_answer(memcached_factory, broker_factory, attempt):
    (mc,) = memcached_factory(1)
    broker = broker_factory([mc.address])
    keys = [b"k%d" % i for i in range(WORKERS)]
    Client(broker.url, timeout=5.0).set_many({k: b"v-" + k for k in keys})
    ctx = zmq.Context()
    socks = []
    try:
        for _ in keys:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(broker.url)
            socks.append(sock)
        for i, sock in enumerate(socks):  # connected and answered once before the race
            sock.send(encode_request(i, [[Op.PING]], 5000))
            assert sock.poll(5000) and decode_reply(sock.recv()).req_id == i
        mc.pause()  # every get below is in flight, unanswered, when the signal comes
        try:
            for i, (sock, k) in enumerate(zip(socks, keys)):
                sock.send(encode_request(100 + i, [[Op.GET, k]], 7000))
            deadline = time.monotonic() + 5
            while broker.stats()["inflight"] < WORKERS and time.monotonic() < deadline:
                time.sleep(0.01)
            assert broker.stats()["inflight"] == WORKERS
            broker.signal(signal.SIGTERM)
            # The signal is handled before memcached answers: a ping is refused once it has been.
            probe = ctx.socket(zmq.DEALER)
            probe.setsockopt(zmq.LINGER, 0)
            probe.connect(broker.url)
            socks.append(probe)
            deadline = time.monotonic() + 10
            for n in range(1000, 2000):
                probe.send(encode_request(n, [[Op.PING]], 5000))
                assert probe.poll(5000), "no answer to a ping"
                if decode_reply(probe.recv()).code == Code.SHUTTING_DOWN:
                    break
                assert time.monotonic() < deadline, "the broker never began to drain"
                time.sleep(0.01)
        finally:
            mc.resume()
        answers = {}
        for i, sock in enumerate(socks[:WORKERS]):
            assert sock.poll(5000), f"request {100 + i}: no reply"
            reply = decode_reply(sock.recv())
            answers[reply.req_id] = reply
        # Drained: memcached answered after the signal, and each answer reached its worker.
        for i, k in enumerate(keys):
            assert answers[100 + i].code == Code.OK and answers[100 + i].payload == [[Code.OK, b"v-" + k, 0]]
        # It drains and exits by itself (a second signal now would cut its exit short).
        assert broker.proc is not None and broker.proc.wait(10) == 0
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
