"""SERVER_ERROR belongs to its own request (twemproxy #149 dropped an early one as stray)."""

import pytest

from clientlib import Client, MemcacheServerError

pytestmark = pytest.mark.integration


def test_server_error_fails_its_request_alone_and_keeps_the_connection(memcached_factory, broker_factory):
    (mc,) = memcached_factory(1, extra_args=("-I", "1m"))  # memcached refuses items over 1 MiB
    broker = broker_factory([mc.address], connections_per_server=1, max_value_bytes=3 << 20,
                            max_frame_bytes=8 << 20)
    client = Client(broker.url, timeout=5.0, max_frame_bytes=8 << 20)
    big = b"x" * (1536 * 1024)
    values = {f"a{i}": f"a{i}".encode() for i in range(20)}
    values["big"] = big
    values.update({f"b{i}": f"b{i}".encode() for i in range(20)})
    # One frame, one pipeline: the big item's SERVER_ERROR sits between good answers.
    with pytest.raises(MemcacheServerError, match="too large"):
        client.set_many(values)
    small = {k: v for k, v in values.items() if k != "big"}
    assert client.get_many(list(values)) == small
    stats = broker.stats()["servers"][mc.address]
    assert stats["resets"] == 0, "a SERVER_ERROR must not reset the connection"
    with pytest.raises(MemcacheServerError):
        client.set("big", big)
    assert client.set("after", b"ok") is True and client.get("after") == b"ok"


def test_a_failing_noreply_request_shifts_no_later_answer(mc, broker):
    """memcached #1312: errors answered to noreply requests shifted every later response. The
    broker never sends noreply upstream, so each response keeps its own request. (A CLIENT_ERROR
    still resets the connection, so a request in flight beside it may get an explicit error,
    never another request's value.)"""
    from clientlib import MemcacheError

    client = Client(broker.url, timeout=5.0)
    client.set_many({"text": b"abc", "k1": b"v1", "k2": b"v2"})
    for _ in range(20):
        assert client.incr("text", 1, noreply=True) is None  # memcached: CLIENT_ERROR non-numeric
        try:
            got = client.get_many(["k1", "k2"])
        except MemcacheError:
            continue
        assert got == {"k1": b"v1", "k2": b"v2"}
    assert client.get("text") == b"abc" and client.get("k1") == b"v1"
