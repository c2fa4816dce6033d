import pytest

from clientlib import Client

pytestmark = pytest.mark.integration


def test_one_request_through_the_broker(broker):
    c = Client(broker.url, timeout=5.0)
    assert c.broker_ping() == "PONG"
    assert c.set("k", b"v") is True
    assert c.get("k") == b"v"
    assert c.get("missing", default=b"d") == b"d"
