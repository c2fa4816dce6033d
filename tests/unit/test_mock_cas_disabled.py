"""MockClient(cas_enabled=False) answers as memcached -C does: every cas unique is 0 and a cas
compare never matches (checked against a live -C server, direct and through the broker)."""

import pytest

from clientlib import MockClient

pytestmark = pytest.mark.unit


def test_without_cas_gets_returns_zero_and_cas_fails_leaving_the_value() -> None:
    m = MockClient(cas_enabled=False)
    m.set("k", b"old")
    value, token = m.gets("k")
    assert (value, token) == (b"old", b"0")
    assert m.cas("k", b"new", token) is False
    assert m.get("k") == b"old"
    assert m.cas("missing", b"x", b"0") is None


def test_with_cas_the_same_calls_swap() -> None:
    m = MockClient()
    m.set("k", b"old")
    _, token = m.gets("k")
    assert token != b"0" and m.cas("k", b"new", token) is True and m.get("k") == b"new"
