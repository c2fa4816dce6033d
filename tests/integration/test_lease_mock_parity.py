"""MockClient's leases answer as memcached does through the broker (issue 10).

The same script runs against both: lease reads of a missing key (vivified, won, then taken), the
fill, an invalidation (stale, won, then taken), and a recache window. Lease bits and values must
agree; cas tokens differ between the two stores, so only their use (the fill) is compared.
"""

from __future__ import annotations

from typing import Any

import pytest

from clientlib import Client
from clientlib.mock import MockClient
from clientlib.wire import LEASE_STALE, LEASE_TAKEN, LEASE_WON

pytestmark = pytest.mark.integration


def script(c: Client) -> list[Any]:
    out: list[Any] = []

    def lease(key: str, recache: int = 0) -> tuple[Any, int, int, int]:
        r = c._run(c._lease_get(key, 30, recache))
        out.append(("lease", key, r[0], r[1], r[3]))
        return r

    won = lease("a")
    lease("a")
    out.append(("get while computing", c.get("a", "miss"), c.get_many(["a"])))
    out.append(("fill", c.cas("a", b"filled", won[2], 60)))
    lease("a")
    out.append(("invalidate", c.invalidate("a", 30), c.invalidate("missing", 30)))
    stale = lease("a")
    lease("a")
    out.append(("refill", c.cas("a", b"fresh", stale[2], 60)))
    lease("a")
    c.set("b", b"soon", expire=3, flags=0)
    lease("b", recache=10)
    lease("b", recache=10)
    lease("b", recache=1)
    out.append(("get", c.get("a"), c.get("b")))
    return out


def test_mock_leases_match_memcached_through_the_broker(broker):
    real = script(Client(broker.url, timeout=5.0))
    assert real[:2] == [("lease", "a", b"", 0, LEASE_WON), ("lease", "a", b"", 0, LEASE_TAKEN)]
    assert ("lease", "a", b"filled", 0, LEASE_STALE | LEASE_WON) in real
    assert script(MockClient()) == real
