import time

import pytest

from clientlib import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(120)
def test_tens_of_thousands_in_flight_on_one_connection(mc, broker_factory):
    broker = broker_factory([mc.address], connections_per_server=1)
    client = Client(broker.url, timeout=30.0)
    n = 50_000
    values = {f"deep:{i}": f"deep:{i}|v".encode() for i in range(n)}
    assert client.set_many(values) == []
    start = time.monotonic()
    got = client.get_many(list(values))
    elapsed = time.monotonic() - start
    assert got == values
    stats = broker.stats()
    server = stats["servers"][mc.address]
    assert server["resets"] == 0 and stats["errors"] == 0
    print(f"\n{n} keys in one get_many over one connection: {elapsed:.2f}s, "
          f"{server['requests_per_write']} requests per write")
