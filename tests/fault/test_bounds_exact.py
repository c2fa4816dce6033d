"""The broker-wide in-flight bound is exact (issue 14, surviving mutant 4): with one or two paused servers
and every in-flight limit at 128, one frame of 200 gets has exactly 128 admitted (they time out,
nobody answers) and 72 refused at once as OVERLOADED. Requests are counted in flight when they are
admitted, so one frame cannot overshoot a bound."""

from __future__ import annotations

import pytest
import zmq

from clientlib.wire import Code, Op, decode_reply, encode_request
from fakemc import pause_fully
from pool import wait_for

pytestmark = pytest.mark.fault

LIMIT = 128


# One server and 129 keys: one past the bound, where the whole-frame path for a get_many to a
# single server must hand over to per-op admission.
# The last case leaves the per-connection bound alone to decide (total and per server 2 x LIMIT).
@pytest.mark.parametrize(
    "n_servers, keys, total",
    [(2, 200, LIMIT), (2, LIMIT + 1, LIMIT), (1, 200, LIMIT), (1, LIMIT + 1, LIMIT), (1, LIMIT + 1, 2 * LIMIT)],
)
def test_one_frame_of_gets_past_the_bound_gets_exactly_128_timeouts_and_the_rest_overloaded(
    memcached_factory, broker_factory, n_servers, keys, total
):
    servers = memcached_factory(n_servers)
    broker = broker_factory(
        [s.address for s in servers],
        max_inflight_total=total, max_inflight_per_server=total, max_inflight_per_connection=LIMIT,
        failure_limit=1000, io_timeout_ms=60000,
    )
    # Connected and serving before the servers stop answering: every connection open and nothing
    # of the broker's own in flight (each new connection asks `stats settings`, which takes a slot
    # of max_inflight_total until answered; under load one was still waiting when the servers
    # stopped, and the frame got 126 slots, not 128).
    def settled() -> bool:
        st = broker.stats()
        return st["inflight"] == 0 and all(v["connections"] == 2 for v in st["servers"].values())

    wait_for(settled, 10.0, "every broker connection open and idle")
    for s in servers:
        pause_fully(s)  # SIGSTOP is asynchronous: wait until memcached really answers nothing
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(broker.url)
        sock.send(encode_request(5, [[Op.GET, b"key-%d" % i] for i in range(keys)], 500))
        assert sock.poll(10_000), "no reply"
        reply = decode_reply(sock.recv())
    finally:
        sock.close(linger=0)
        for s in servers:
            s.resume()
    assert reply.req_id == 5 and reply.code == Code.OK
    codes = [r[0] for r in reply.payload]
    assert codes.count(Code.TIMEOUT) == LIMIT
    assert codes.count(Code.OVERLOADED) == keys - LIMIT
    # Admission is in frame order: the first 128 went out, the rest were refused.
    assert set(codes[:LIMIT]) == {Code.TIMEOUT} and set(codes[LIMIT:]) == {Code.OVERLOADED}
