"""A value too large for a frame (above the Client's max_frame_bytes) gets memcached's outcome, not
a local input error (issue 8, item 1): a set deletes the key's old value through the broker and
raises MemcacheServerError("object too large for cache ..."); add/replace/append/prepend/cas raise
it without sending anything, so the old value stays. Real broker, real memcached."""

from __future__ import annotations

from typing import Any

import pytest

from clientlib import Client
from clientlib.errors import MemcacheServerError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FRAME = 1 << 16
BIG = b"x" * (FRAME + 1)


@pytest.fixture
def c(broker: Any) -> Client:
    return Client(broker.url, timeout=5.0, max_frame_bytes=FRAME)


def test_set_deletes_the_old_value_and_raises(c: Client) -> None:
    assert c.set("k", b"old") is True
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        c.set("k", BIG)
    assert c.get("k") is None
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        c.set("never-there", BIG)


def test_set_with_noreply_deletes_silently(c: Client) -> None:
    assert c.set("k", b"old") is True
    assert c.set("k", BIG, noreply=True) is True
    assert c.get("k") is None


@pytest.mark.parametrize("mode", ["add", "replace", "append", "prepend", "cas"])
def test_other_modes_leave_the_old_value(c: Client, mode: str) -> None:
    assert c.set("k", b"old") is True
    _, token = c.gets("k")
    call = {
        "add": lambda: c.add("k", BIG), "replace": lambda: c.replace("k", BIG),
        "append": lambda: c.append("k", BIG), "prepend": lambda: c.prepend("k", BIG),
        "cas": lambda: c.cas("k", BIG, token),
    }[mode]
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        call()
    assert c.gets("k") == (b"old", token)  # not rewritten either


def test_set_many_stores_the_rest_and_deletes_the_too_large(c: Client) -> None:
    assert c.set_many({"a": b"old", "k": b"old", "b": b"old"}) == []
    with pytest.raises(MemcacheServerError, match="object too large for cache"):
        c.set_many({"a": b"1", "k": BIG, "b": b"2"})
    assert c.get_many(["a", "k", "b"]) == {"a": b"1", "b": b"2"}
    c.set("k", b"old")
    lenient = Client(c.broker_url, timeout=5.0, max_frame_bytes=FRAME, ignore_exc=True)
    assert lenient.set_many({"a": b"3", "k": BIG}) == ["k"]
    assert c.get_many(["a", "k"]) == {"a": b"3"}
