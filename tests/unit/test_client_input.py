"""Bad input raises MemcacheIllegalInputError in the worker, before any frame is sent.

The proof: the clients here point at a URL where no broker listens, with a tiny timeout. Anything
that reached the transport would fail with BrokerUnavailable or BrokerTimeout instead, and would
open a socket; after every rejected call the client still has no socket at all. The control tests
show the same client does reach the transport (and fail there) for valid input.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clientlib import AsyncClient, Client, MockClient
from clientlib.errors import BrokerTimeout, BrokerUnavailable, MemcacheIllegalInputError, MemcacheServerError

pytestmark = pytest.mark.unit

TINY = 0.02


@pytest.fixture
def nowhere() -> Iterator[str]:
    # A private directory: nothing can be listening on a socket path inside it.
    with tempfile.TemporaryDirectory(prefix="mcb-nobroker-") as d:
        yield f"ipc://{d}/no-broker.sock"


def make(url: str, **kwargs: Any) -> Client:
    return Client(url, timeout=TINY, **kwargs)


def no_socket(c: Client) -> bool:
    return c._transport._state().sock is None and not list(c._transport._sockets)


def rejected(c: Client, call: Callable[[Client], Any]) -> MemcacheIllegalInputError:
    with pytest.raises(MemcacheIllegalInputError) as info:
        call(c)
    assert no_socket(c), "a rejected call must not touch the transport"
    return info.value


# --- keys ------------------------------------------------------------------------------------

BAD_KEYS: list[tuple[str, Any]] = [
    ("empty str", ""),
    ("empty bytes", b""),
    ("251 bytes", "k" * 251),
    ("251 bytes as bytes", b"k" * 251),
    ("space", "a b"),
    ("leading space", " a"),
    ("trailing space", "a "),
    ("tab", "a\tb"),
    ("newline", "a\nb"),
    ("carriage return", "a\rb"),
    ("vertical tab", "a\x0bb"),
    ("form feed", "a\x0cb"),
    ("NUL", "a\x00b"),
    ("control 0x01", b"a\x01b"),
    ("control 0x1f", b"\x1f"),
    ("DEL 0x7f", "a\x7fb"),
    ("DEL 0x7f as bytes", b"\x7f"),
    ("non-ASCII str", "caf\u00e9"),
    ("non-ASCII str, CJK", "\u4e2d\u6587"),
    ("int", 5),
    ("None", None),
    ("float", 1.5),
    ("tuple", ("a",)),
]

# Every keyed method, each given one key.
KEYED: dict[str, Callable[[Client, Any], Any]] = {
    "get": lambda c, k: c.get(k),
    "gets": lambda c, k: c.gets(k),
    "gat": lambda c, k: c.gat(k, 10),
    "gats": lambda c, k: c.gats(k, 10),
    "get_many": lambda c, k: c.get_many(["ok1", k, "ok2"]),
    "get_multi": lambda c, k: c.get_multi([k]),
    "gets_many": lambda c, k: c.gets_many(["ok1", k]),
    "set": lambda c, k: c.set(k, b"v"),
    "set noreply": lambda c, k: c.set(k, b"v", noreply=True),
    "add": lambda c, k: c.add(k, b"v"),
    "replace": lambda c, k: c.replace(k, b"v"),
    "append": lambda c, k: c.append(k, b"v"),
    "prepend": lambda c, k: c.prepend(k, b"v"),
    "cas": lambda c, k: c.cas(k, b"v", 1),
    "set_many": lambda c, k: c.set_many({"ok1": b"1", k: b"2"}),
    "set_multi noreply": lambda c, k: c.set_multi({k: b"2"}, noreply=True),
    "delete": lambda c, k: c.delete(k),
    "delete_many": lambda c, k: c.delete_many(["ok1", k]),
    "delete_multi noreply": lambda c, k: c.delete_multi([k], noreply=True),
    "incr": lambda c, k: c.incr(k, 1),
    "decr": lambda c, k: c.decr(k, 1),
    "touch": lambda c, k: c.touch(k, 10),
    "__getitem__": lambda c, k: c[k],
    "__setitem__": lambda c, k: c.__setitem__(k, b"v"),
    "__delitem__": lambda c, k: c.__delitem__(k),
}


@pytest.mark.parametrize("method", list(KEYED))
@pytest.mark.parametrize("label,key", BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
def test_bad_key_rejected_before_sending(nowhere: str, method: str, label: str, key: Any) -> None:
    rejected(make(nowhere), lambda c: KEYED[method](c, key))


def test_key_length_counts_the_prefix(nowhere: str) -> None:
    c = make(nowhere, key_prefix="pre:")
    err = rejected(c, lambda c: c.get("k" * 247))
    assert "251" in str(err)
    # 246 + 4 = 250 is legal: it gets as far as the (missing) broker.
    with pytest.raises(BrokerUnavailable):
        c.get("k" * 246)


def test_key_length_counts_encoded_bytes(nowhere: str) -> None:
    c = make(nowhere, allow_unicode_keys=True)
    rejected(c, lambda c: c.get("\u00e9" * 126))  # 126 characters, 252 bytes
    with pytest.raises(BrokerUnavailable):
        c.get("\u00e9" * 125)  # 250 bytes


def test_a_bad_prefix_makes_every_key_bad(nowhere: str) -> None:
    c = make(nowhere, key_prefix=b"bad prefix:")
    rejected(c, lambda c: c.get("k"))


def test_non_ascii_keys_allowed_with_allow_unicode_keys(nowhere: str) -> None:
    strict = make(nowhere)
    rejected(strict, lambda c: c.set("caf\u00e9", b"v"))
    relaxed = make(nowhere, allow_unicode_keys=True)
    for key in ("caf\u00e9", "\u4e2d\u6587", "\U0001f600"):
        with pytest.raises(BrokerUnavailable):  # accepted, then no broker
            relaxed.set(key, b"v")
    # Whitespace stays illegal whatever the option says, also non-ASCII whitespace encoded.
    rejected(make(nowhere, allow_unicode_keys=True), lambda c: c.get("caf\u00e9 x"))
    rejected(make(nowhere, allow_unicode_keys=True), lambda c: c.get("lone\udcff"))


def test_high_bytes_in_bytes_keys_are_legal(nowhere: str) -> None:
    # memcached accepts bytes >= 0x80 in keys; bytes keys are not subject to allow_unicode_keys.
    c = make(nowhere)
    with pytest.raises(BrokerUnavailable):
        c.get(b"caf\xc3\xa9\xff")


# --- numbers ---------------------------------------------------------------------------------

BAD_INTS = [("str", "10"), ("bytes", b"10"), ("float", 1.0), ("None", None), ("bool", True), ("list", [1])]


@pytest.mark.parametrize("label,value", BAD_INTS, ids=[b[0] for b in BAD_INTS])
@pytest.mark.parametrize(
    "method",
    ["set", "add", "replace", "append", "prepend", "cas", "set_many", "touch", "gat", "gats"],
)
def test_bad_expire_rejected(nowhere: str, method: str, label: str, value: Any) -> None:
    calls: dict[str, Callable[[Client], Any]] = {
        "set": lambda c: c.set("k", b"v", expire=value),
        "add": lambda c: c.add("k", b"v", expire=value),
        "replace": lambda c: c.replace("k", b"v", expire=value),
        "append": lambda c: c.append("k", b"v", expire=value),
        "prepend": lambda c: c.prepend("k", b"v", expire=value),
        "cas": lambda c: c.cas("k", b"v", 1, expire=value),
        "set_many": lambda c: c.set_many({"k": b"v"}, expire=value),
        "touch": lambda c: c.touch("k", value),
        "gat": lambda c: c.gat("k", value),
        "gats": lambda c: c.gats("k", value),
    }
    rejected(make(nowhere), calls[method])


@pytest.mark.parametrize("value", [2**32, -(2**31) - 1, 2**64])
def test_expire_out_of_range_rejected(nowhere: str, value: int) -> None:
    rejected(make(nowhere), lambda c: c.set("k", b"v", expire=value))


@pytest.mark.parametrize("label,value", BAD_INTS + [("negative", -1), ("over 64 bits", 2**64)], ids=lambda x: str(x)[:20])
@pytest.mark.parametrize("method", ["incr", "decr"])
def test_bad_delta_rejected(nowhere: str, method: str, label: str, value: Any) -> None:
    rejected(make(nowhere), lambda c: getattr(c, method)("k", value))


BAD_CAS = [
    ("letters", "12a"), ("bytes letters", b"x1"), ("empty", ""), ("negative", -1), ("float", 1.0),
    ("None", None), ("bool", True), ("arabic digits", "\u0661\u0662"), ("over 64 bits", 2**64),
    ("over 64 bits as text", str(2**64)), ("spaces", "1 2"), ("sign", "+1"),
]


@pytest.mark.parametrize("label,value", BAD_CAS, ids=[b[0] for b in BAD_CAS])
def test_bad_cas_rejected(nowhere: str, label: str, value: Any) -> None:
    rejected(make(nowhere), lambda c: c.cas("k", b"v", value))


@pytest.mark.parametrize("value", [b"123", "123", 123, "00042", 0, 2**64 - 1])
def test_good_cas_tokens_reach_the_transport(nowhere: str, value: Any) -> None:
    with pytest.raises(BrokerUnavailable):
        make(nowhere).cas("k", b"v", value)


@pytest.mark.parametrize("label,value", BAD_INTS + [("negative", -1), ("over 32 bits", 2**32)], ids=lambda x: str(x)[:20])
def test_bad_delay_rejected(nowhere: str, label: str, value: Any) -> None:
    rejected(make(nowhere), lambda c: c.flush_all(delay=value))
    rejected(make(nowhere), lambda c: c.flush_all(value, noreply=True))


@pytest.mark.parametrize("value", ["64", 1.5, -1, None, True])
def test_bad_memlimit_rejected(nowhere: str, value: Any) -> None:
    rejected(make(nowhere), lambda c: c.cache_memlimit(value))


@pytest.mark.parametrize("flags", [-1, 2**32, "1", 1.0, True])
def test_bad_flags_rejected(nowhere: str, flags: Any) -> None:
    rejected(make(nowhere), lambda c: c.set("k", b"v", flags=flags))
    rejected(make(nowhere), lambda c: c.set_many({"k": b"v"}, flags=flags))


# --- values ----------------------------------------------------------------------------------


def test_unencodable_values_rejected(nowhere: str) -> None:
    # The default serde sends str(value) in the client's encoding (ascii), as pymemcache does.
    rejected(make(nowhere), lambda c: c.set("k", "caf\u00e9"))
    rejected(make(nowhere), lambda c: c.set_many({"a": b"ok", "b": "\u00e9"}))


def test_value_over_the_frame_limit(nowhere: str) -> None:
    # memcached's outcome, not an input error: add/replace/append/prepend/cas fail without sending
    # anything; a set sends a delete of the key instead (so here, with no broker, it reaches the
    # transport and fails there). tests/integration/test_client_too_large.py has the real thing.
    c = make(nowhere, max_frame_bytes=1 << 20)
    big = b"x" * (1 << 20)
    for call in (lambda: c.add("k", big), lambda: c.replace("k", big), lambda: c.append("k", big),
                 lambda: c.prepend("k", big), lambda: c.cas("k", big, 1)):
        with pytest.raises(MemcacheServerError, match="object too large for cache"):
            call()
    assert no_socket(c)
    with pytest.raises(BrokerUnavailable):
        c.set("k", big)
    c.disconnect_all()


def test_timeout_must_be_positive(nowhere: str) -> None:
    for bad in (0, -1, "1", True, 10**9):
        with pytest.raises(MemcacheIllegalInputError):
            Client(nowhere, timeout=bad)


def test_broker_url_must_be_a_string() -> None:
    # pymemcache takes a memcached (host, port); clientlib takes the broker's URL: say so clearly.
    with pytest.raises(TypeError, match="broker"):
        Client(("127.0.0.1", 11211))  # type: ignore[arg-type]


# --- controls: valid input does reach the transport -----------------------------------------


@pytest.mark.parametrize("method", list(KEYED))
def test_control_valid_input_reaches_the_transport(nowhere: str, method: str) -> None:
    c = make(nowhere)
    with pytest.raises((BrokerUnavailable, BrokerTimeout)):
        KEYED[method](c, "good-key")
    assert not no_socket(c)
    c.disconnect_all()


# --- the other clients check the same way ----------------------------------------------------


def test_async_client_rejects_before_sending(nowhere: str) -> None:
    async def main() -> None:
        c = AsyncClient(nowhere, timeout=TINY)
        for key in ("", "a b", "k" * 251, "caf\u00e9", b"\x7f"):
            with pytest.raises(MemcacheIllegalInputError):
                await c.get(key)
        with pytest.raises(MemcacheIllegalInputError):
            await c.set_many({"ok": b"1", "a b": b"2"})
        with pytest.raises(MemcacheIllegalInputError):
            await c.incr("k", -1)
        with pytest.raises(MemcacheIllegalInputError):
            await c.cas("k", b"v", "x")
        with pytest.raises(MemcacheIllegalInputError):
            await c.touch("k", "1")
        assert c._transport._sock is None  # never opened
        with pytest.raises(BrokerUnavailable):  # control
            await c.get("good")
        await c.disconnect_all()

    asyncio.run(main())


@pytest.mark.parametrize("method", list(KEYED))
@pytest.mark.parametrize("label,key", BAD_KEYS[:18], ids=[b[0] for b in BAD_KEYS[:18]])
def test_mock_client_rejects_the_same_keys(method: str, label: str, key: Any) -> None:
    with pytest.raises(MemcacheIllegalInputError):
        KEYED[method](MockClient(), key)


def test_max_frame_bytes_must_be_a_sane_int(nowhere: str) -> None:
    for bad in (0, -1, 100, "4MiB", 1.5, True, 1 << 31):
        with pytest.raises(MemcacheIllegalInputError, match="max_frame_bytes"):
            Client(nowhere, max_frame_bytes=bad)
    assert Client(nowhere, max_frame_bytes=512).max_frame_bytes == 512
