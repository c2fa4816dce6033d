"""ignore_exc=True: a read that fails for any reason returns its miss value, as pymemcache's does
(its Client catches every exception of a read, a serde that cannot decode included)."""

from __future__ import annotations

from typing import Any

import pytest
from pymemcache.client.base import Client as Direct

from clientlib import AsyncClient, Client

pytestmark = pytest.mark.integration


class BrokenSerde:
    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        raise RuntimeError("cannot decode")


def test_a_serde_that_cannot_decode_is_a_miss_with_ignore_exc(mc, broker):
    host, _, port = mc.address.rpartition(":")
    theirs = Direct((host, int(port)), serde=BrokenSerde(), ignore_exc=True, default_noreply=False)
    ours = Client(broker.url, serde=BrokenSerde(), ignore_exc=True, timeout=5.0)
    ours.set("k", b"v")
    assert theirs.get("k") is None and ours.get("k") is None
    assert theirs.get("k", b"dflt") == b"dflt" and ours.get("k", b"dflt") == b"dflt"
    assert theirs.get_many(["k"]) == {} and ours.get_many(["k"]) == {}
    strict = Client(broker.url, serde=BrokenSerde(), timeout=5.0)
    with pytest.raises(RuntimeError, match="cannot decode"):
        strict.get("k")


def test_the_same_for_asyncclient(mc, broker):
    import asyncio

    Client(broker.url, timeout=5.0).set("k", b"v")

    async def run() -> tuple[Any, Any]:
        c = AsyncClient(broker.url, serde=BrokenSerde(), ignore_exc=True, timeout=5.0)
        try:
            return await c.get("k"), await c.get_many(["k"])
        finally:
            await c.disconnect_all()

    assert asyncio.run(run()) == (None, {})
