"""clientlib.serde against pymemcache's serdes and Client.

Same bytes and flags written, same values read back, in both directions.
"""

from __future__ import annotations

import math
import random
import sys
import zlib
from typing import Any

import pymemcache.serde as pm_serde
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymemcache.client.base import Client as PmClient
from pymemcache.exceptions import MemcacheIllegalInputError as PmIllegalInputError

from clientlib import serde
from clientlib.errors import MemcacheIllegalInputError
from clientlib.serde import (
    FLAG_BYTES,
    FLAG_COMPRESSED,
    FLAG_INTEGER,
    FLAG_LONG,
    FLAG_PICKLE,
    FLAG_TEXT,
    CompressedSerde,
    LegacyWrappingSerde,
    PickleSerde,
    RawSerde,
    Serde,
    default_serde,
    encode_value,
    make_serde,
)

pytestmark = pytest.mark.unit

KEY = b"k"
INT_DIGIT_LIMIT = sys.get_int_max_str_digits()

scalars = (
    st.binary(max_size=600)
    | st.text(max_size=300)
    | st.integers()
    | st.integers(min_value=-(10**1200), max_value=10**1200)
    | st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
)
# Containers of the scalars: values a cache actually holds (rows, dicts of fields).
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=8)
    | st.dictionaries(st.text(max_size=10), children, max_size=8)
    | st.tuples(children, children),
    max_leaves=20,
)
# Long, repetitive values so CompressedSerde actually compresses.
compressible = st.one_of(
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(401, 2000)),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(401, 2000)),
    st.builds(lambda v, n: [v] * n, scalars, st.integers(401, 1000)),
    st.integers(min_value=10**401, max_value=10**1500),
)


def pm_wire_bytes(data: Any) -> bytes:
    """What pymemcache's Client puts on the wire for a serializer's output."""
    return data if isinstance(data, bytes) else str(data).encode("ascii")


def assert_same_value(got: Any, expected: Any) -> None:
    assert got == expected
    assert type(got) is type(expected)


# --- PickleSerde -------------------------------------------------------------------------------


@settings(deadline=None)
@given(values)
def test_pickle_serde_matches_pymemcache_bytes_and_flags(value: Any) -> None:
    ours, our_flags = PickleSerde().serialize(KEY, value)
    theirs, their_flags = pm_serde.PickleSerde().serialize(KEY, value)
    assert isinstance(ours, bytes)
    assert our_flags == their_flags
    assert ours == pm_wire_bytes(theirs)


@settings(deadline=None)
@given(values)
def test_pickle_serde_reads_what_pymemcache_writes_and_back(value: Any) -> None:
    theirs, their_flags = pm_serde.PickleSerde().serialize(KEY, value)
    assert_same_value(PickleSerde().deserialize(KEY, pm_wire_bytes(theirs), their_flags), value)
    ours, our_flags = PickleSerde().serialize(KEY, value)
    assert_same_value(pm_serde.PickleSerde().deserialize(KEY, ours, our_flags), value)


@pytest.mark.parametrize(
    ("value", "data", "flags"),
    [
        (b"raw\x00\xff", b"raw\x00\xff", FLAG_BYTES),
        ("h\u00e9llo \u2603", "h\u00e9llo \u2603".encode(), FLAG_TEXT),
        (0, b"0", FLAG_INTEGER),
        (-42, b"-42", FLAG_INTEGER),
        (2**100, str(2**100).encode(), FLAG_INTEGER),
    ],
)
def test_pickle_serde_native_types_exact_encoding(value: Any, data: bytes, flags: int) -> None:
    assert PickleSerde().serialize(KEY, value) == (data, flags)
    assert_same_value(PickleSerde().deserialize(KEY, data, flags), value)


@pytest.mark.parametrize("value", [True, False, None, 1.5, [1], bytearray(b"x")])
def test_pickle_serde_pickles_everything_else(value: Any) -> None:
    data, flags = PickleSerde().serialize(KEY, value)
    assert flags == FLAG_PICKLE
    assert_same_value(PickleSerde().deserialize(KEY, data, flags), value)


class MyBytes(bytes):
    pass


class MyStr(str):
    pass


class MyInt(int):
    pass


@pytest.mark.parametrize("value", [MyBytes(b"b"), MyStr("s"), MyInt(3)])
def test_pickle_serde_pickles_subclasses_so_they_round_trip_as_themselves(value: Any) -> None:
    data, flags = PickleSerde().serialize(KEY, value)
    assert (data, flags) == pm_serde.PickleSerde().serialize(KEY, value)
    assert flags == FLAG_PICKLE
    assert_same_value(PickleSerde().deserialize(KEY, data, flags), value)


def test_pickling_errors_propagate_like_pymemcache() -> None:
    class Local:
        pass

    with pytest.raises(Exception) as ours:
        PickleSerde().serialize(KEY, Local())
    with pytest.raises(Exception) as theirs:
        pm_serde.PickleSerde().serialize(KEY, Local())
    assert type(ours.value) is type(theirs.value)


def test_pickle_serde_nan_round_trips() -> None:
    data, flags = PickleSerde().serialize(KEY, math.nan)
    assert flags == FLAG_PICKLE
    assert math.isnan(pm_serde.PickleSerde().deserialize(KEY, data, flags))
    assert math.isnan(PickleSerde().deserialize(KEY, data, flags))


@pytest.mark.parametrize("version", range(0, serde.DEFAULT_PICKLE_VERSION + 1))
def test_pickle_version_is_honoured_like_pymemcache(version: int) -> None:
    value = {"a": [1, 2.5, None], "b": (b"x", "y")}
    assert PickleSerde(pickle_version=version).serialize(KEY, value) == pm_serde.PickleSerde(
        pickle_version=version
    ).serialize(KEY, value)


def test_int_past_str_digit_limit_is_pickled_and_pymemcache_reads_it() -> None:
    value = 10 ** (INT_DIGIT_LIMIT + 5)
    # pymemcache cannot store it at all.
    with pytest.raises(ValueError):
        pm_serde.PickleSerde().serialize(KEY, value)
    data, flags = PickleSerde().serialize(KEY, value)
    assert flags == FLAG_PICKLE
    assert pm_serde.PickleSerde().deserialize(KEY, data, flags) == value
    assert PickleSerde().deserialize(KEY, data, flags) == value


@pytest.mark.parametrize(
    ("data", "flags", "expected"),
    [
        (b"123", FLAG_LONG, 123),
        (b"-" + b"9" * 30, FLAG_LONG, -int("9" * 30)),
        (b"7", FLAG_INTEGER, 7),
        (b"abc", FLAG_BYTES, b"abc"),
        (b"abc", 32, b"abc"),  # unknown bit: raw bytes
        (b"abc", 1 << 31, b"abc"),
        (b"x\xc3\xa9", FLAG_TEXT, "x\u00e9"),
        (b"x\xc3\xa9", FLAG_TEXT | FLAG_PICKLE, "x\u00e9"),  # TEXT is tested first
        (b"not a pickle", FLAG_PICKLE, None),  # unreadable pickle reads as a miss
        (b"", FLAG_PICKLE, None),
    ],
)
def test_deserialize_flag_handling_matches_pymemcache(
    data: bytes, flags: int, expected: Any
) -> None:
    assert_same_value(PickleSerde().deserialize(KEY, data, flags), expected)
    assert_same_value(pm_serde.PickleSerde().deserialize(KEY, data, flags), expected)


@given(st.binary(max_size=50), st.integers(min_value=0, max_value=2**32 - 1))
def test_deserialize_any_flags_same_outcome_as_pymemcache(data: bytes, flags: int) -> None:
    def outcome(s: Any) -> tuple[str, Any]:
        try:
            return ("ok", s.deserialize(KEY, data, flags))
        except Exception as exc:  # compare failures too: same exception type
            return ("error", type(exc))

    ours, theirs = outcome(PickleSerde()), outcome(pm_serde.PickleSerde())
    if ours[0] == "ok" and isinstance(ours[1], float) and math.isnan(ours[1]):
        assert math.isnan(theirs[1])
    else:
        assert ours == theirs


# --- CompressedSerde ---------------------------------------------------------------------------


def pm_compressed_serialize(value: Any, **kwargs: Any) -> tuple[bytes, int] | None:
    """pymemcache's CompressedSerde output on the wire, or None when it fails on the value."""
    try:
        data, flags = pm_serde.CompressedSerde(**kwargs).serialize(KEY, value)
    except (TypeError, ValueError):
        return None
    return pm_wire_bytes(data), flags


@settings(deadline=None)
@given(values | compressible)
def test_compressed_serde_matches_pymemcache(value: Any) -> None:
    ours, our_flags = CompressedSerde().serialize(KEY, value)
    assert isinstance(ours, bytes)
    theirs = pm_compressed_serialize(value)
    if theirs is None:
        # pymemcache's CompressedSerde raises TypeError for ints over 400 digits (it tries
        # to compress the str its PickleSerde returns); ours compresses the digits.
        assert type(value) is int and len(str(abs(value))) >= 400
        assert our_flags == FLAG_INTEGER | FLAG_COMPRESSED
    else:
        assert (ours, our_flags) == theirs
        assert_same_value(CompressedSerde().deserialize(KEY, theirs[0], theirs[1]), value)
    assert_same_value(pm_serde.CompressedSerde().deserialize(KEY, ours, our_flags), value)
    assert_same_value(CompressedSerde().deserialize(KEY, ours, our_flags), value)


@settings(deadline=None)
@given(compressible)
def test_compressed_serde_sets_flag_when_it_compresses(value: Any) -> None:
    data, flags = CompressedSerde().serialize(KEY, value)
    assert flags & FLAG_COMPRESSED
    plain, plain_flags = PickleSerde().serialize(KEY, value)
    assert flags == plain_flags | FLAG_COMPRESSED
    assert zlib.decompress(data) == plain
    assert len(data) <= len(plain)


def test_compressed_serde_keeps_incompressible_data_plain() -> None:
    value = random.Random(7).randbytes(2000)
    assert CompressedSerde().serialize(KEY, value) == (value, FLAG_BYTES)
    assert pm_serde.CompressedSerde().serialize(KEY, value) == (value, FLAG_BYTES)


@pytest.mark.parametrize("size", [399, 400, 401])
def test_compressed_serde_threshold_is_strictly_greater_than_min_len(size: int) -> None:
    value = b"a" * size
    ours = CompressedSerde().serialize(KEY, value)
    assert ours == pm_serde.CompressedSerde().serialize(KEY, value)
    assert bool(ours[1] & FLAG_COMPRESSED) == (size > 400)


@pytest.mark.parametrize(
    ("compress", "expect_flag"),
    [
        (lambda b: b[::-1], True),  # same length: pymemcache keeps the compressed form
        (lambda b: b + b"!", False),  # longer: plain
        (lambda b: b[:-1], True),
    ],
)
def test_compressed_serde_tie_and_growth_rules_match_pymemcache(
    compress: Any, expect_flag: bool
) -> None:
    value = b"0123456789" * 50
    kwargs = {"compress": compress, "decompress": lambda b: b}
    ours = CompressedSerde(**kwargs).serialize(KEY, value)
    assert ours == pm_serde.CompressedSerde(**kwargs).serialize(KEY, value)
    assert bool(ours[1] & FLAG_COMPRESSED) is expect_flag


@pytest.mark.parametrize("min_len", [0, -1])
def test_compressed_serde_non_positive_min_len_disables_compression(min_len: int) -> None:
    value = b"a" * 5000
    assert CompressedSerde(min_compress_len=min_len).serialize(KEY, value) == (value, FLAG_BYTES)
    assert pm_serde.CompressedSerde(min_compress_len=min_len).serialize(KEY, value) == (
        value,
        FLAG_BYTES,
    )


def test_compressed_serde_custom_inner_serde_and_min_len() -> None:
    inner = RawSerde()
    value = "x" * 50
    data, flags = CompressedSerde(serde=inner, min_compress_len=10).serialize(KEY, value)
    assert flags == FLAG_COMPRESSED
    assert zlib.decompress(data) == b"x" * 50
    # The inner serde gets FLAG_COMPRESSED still set, and RawSerde ignores flags.
    assert CompressedSerde(serde=inner).deserialize(KEY, data, flags) == b"x" * 50


def test_compressed_serde_accepts_pymemcache_inner_serde() -> None:
    # pymemcache's PickleSerde returns str for ints; ours coerces before compressing.
    value = 10**600
    data, flags = CompressedSerde(serde=pm_serde.PickleSerde()).serialize(KEY, value)
    assert flags == FLAG_INTEGER | FLAG_COMPRESSED
    assert pm_serde.CompressedSerde().deserialize(KEY, data, flags) == value


# --- LegacyWrappingSerde, RawSerde, make_serde, encode_value -----------------------------------


def test_legacy_wrapping_serde_calls_the_functions() -> None:
    calls: list[tuple[Any, ...]] = []

    def ser(key: Any, value: Any) -> tuple[bytes, int]:
        calls.append(("ser", key, value))
        return b"S" + value, 7

    def de(key: Any, value: bytes, flags: int) -> Any:
        calls.append(("de", key, value, flags))
        return value.upper()

    s = LegacyWrappingSerde(ser, de)
    assert s.serialize(b"key", b"v") == (b"Sv", 7)
    assert s.deserialize("key", b"abc", 7) == b"ABC"
    assert calls == [("ser", b"key", b"v"), ("de", "key", b"abc", 7)]


@given(scalars)
def test_legacy_wrapping_serde_without_functions_matches_pymemcache(value: Any) -> None:
    ours = LegacyWrappingSerde(None, None)
    theirs = pm_serde.LegacyWrappingSerde(None, None)
    assert ours.serialize(KEY, value) == theirs.serialize(KEY, value)
    assert ours.deserialize(KEY, b"raw", 16) == theirs.deserialize(KEY, b"raw", 16) == b"raw"


class FakeSocket:
    """Enough of a socket for pymemcache's Client: records writes, replays canned reads."""

    def __init__(self, reply: bytes) -> None:
        self.sent = b""
        self._reply = reply

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv(self, size: int) -> bytes:
        chunk, self._reply = self._reply[:size], self._reply[size:]
        return chunk

    def close(self) -> None:
        pass


def pm_client_store(value: Any, **client_kwargs: Any) -> tuple[bytes, int]:
    """Run pymemcache's Client.set against a fake socket; return (data, flags) it sent."""
    client = PmClient(("localhost", 1), **client_kwargs)
    client.sock = FakeSocket(b"STORED\r\n")  # type: ignore[assignment]
    client.set("key", value, noreply=False)
    header, _, rest = client.sock.sent.partition(b"\r\n")  # type: ignore[union-attr]
    _, _, flags, _, length = header.split()
    data = rest[: int(length)]
    assert rest[int(length) :] == b"\r\n"
    return data, int(flags)


def pm_client_get(data: bytes, flags: int, **client_kwargs: Any) -> Any:
    client = PmClient(("localhost", 1), **client_kwargs)
    client.sock = FakeSocket(  # type: ignore[assignment]
        b"VALUE key %d %d\r\n" % (flags, len(data)) + data + b"\r\nEND\r\n"
    )
    return client.get("key")


@given(scalars)
def test_default_serde_sends_what_pymemcache_client_sends_with_serde_none(value: Any) -> None:
    try:
        expected: tuple[bytes, int] | type[Exception] = pm_client_store(value)
    except PmIllegalInputError:
        expected = MemcacheIllegalInputError
    try:
        got: tuple[bytes, int] | type[Exception] = encode_value(make_serde(), KEY, value)
    except MemcacheIllegalInputError:
        got = MemcacheIllegalInputError
    assert got == expected


@given(st.binary(max_size=100), st.integers(min_value=0, max_value=2**32 - 1))
def test_default_serde_returns_what_pymemcache_client_returns(data: bytes, flags: int) -> None:
    expected = pm_client_get(data, flags)
    assert_same_value(default_serde.deserialize(KEY, data, flags), expected)
    assert_same_value(data, expected)


@settings(deadline=None)
@given(values)
def test_encode_value_matches_pymemcache_client_with_pickle_serde(value: Any) -> None:
    expected = pm_client_store(value, serde=pm_serde.PickleSerde())
    assert encode_value(PickleSerde(), KEY, value) == expected
    # Our encoder fed pymemcache's own serde gives the same wire bytes (str coerced).
    assert encode_value(pm_serde.PickleSerde(), KEY, value) == expected
    assert_same_value(pm_client_get(*expected, serde=pm_serde.PickleSerde()), value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\x00\xff", b"\x00\xff"),
        ("text", b"text"),
        (5, b"5"),
        (-5, b"-5"),
        (1.5, b"1.5"),
        (None, b"None"),
        (True, b"True"),
        ([1, "a"], b"[1, 'a']"),
    ],
)
def test_raw_serde_stores_str_of_value_with_flags_zero(value: Any, expected: bytes) -> None:
    assert RawSerde().serialize(KEY, value) == (expected, FLAG_BYTES)
    assert pm_client_store(value) == (expected, FLAG_BYTES)


def test_raw_serde_non_ascii_text_needs_a_wider_encoding() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="binary-safe"):
        RawSerde().serialize(KEY, "\u00e9")
    with pytest.raises(PmIllegalInputError):
        pm_client_store("\u00e9")
    assert RawSerde("utf-8").serialize(KEY, "\u00e9") == (b"\xc3\xa9", FLAG_BYTES)
    assert pm_client_store("\u00e9", encoding="utf-8") == (b"\xc3\xa9", FLAG_BYTES)


def test_make_serde_precedence() -> None:
    explicit = PickleSerde()
    assert make_serde(explicit, serializer=lambda k, v: (v, 0)) is explicit
    assert make_serde() is default_serde
    latin = make_serde(encoding="latin-1")
    assert isinstance(latin, RawSerde)
    assert latin.serialize(KEY, "\u00e9") == (b"\xe9", FLAG_BYTES)
    legacy = make_serde(deserializer=lambda k, v, f: ("got", v, f))
    assert isinstance(legacy, LegacyWrappingSerde)
    assert legacy.deserialize(KEY, b"x", 3) == ("got", b"x", 3)
    assert legacy.serialize(KEY, b"x") == (b"x", 0)


def test_encode_value_flags_override_and_range() -> None:
    assert encode_value(PickleSerde(), KEY, "t", flags=99) == (b"t", 99)
    assert encode_value(PickleSerde(), KEY, "t", flags=0) == (b"t", 0)
    assert encode_value(PickleSerde(), KEY, 1, flags=2**32 - 1) == (b"1", 2**32 - 1)
    for bad in (2**32, -1, True, 1.0, "1"):
        with pytest.raises(MemcacheIllegalInputError, match="flags"):
            encode_value(PickleSerde(), KEY, b"x", flags=bad)  # type: ignore[arg-type]


def test_encode_value_rejects_bad_flags_from_a_serde() -> None:
    bad = LegacyWrappingSerde(lambda k, v: (v, -3), None)
    with pytest.raises(MemcacheIllegalInputError, match="flags"):
        encode_value(bad, KEY, b"x")


def test_encode_value_coerces_non_bytes_like_pymemcache() -> None:
    legacy = LegacyWrappingSerde(lambda k, v: (v, 4), None)
    assert encode_value(legacy, KEY, 12) == (b"12", 4)
    assert encode_value(legacy, KEY, "\u00e9", encoding="utf-8") == (b"\xc3\xa9", 4)
    with pytest.raises(MemcacheIllegalInputError):
        encode_value(legacy, KEY, "\u00e9")


def test_every_serde_satisfies_the_protocol() -> None:
    for s in (
        PickleSerde(),
        CompressedSerde(),
        LegacyWrappingSerde(None, None),
        RawSerde(),
        default_serde,
        serde.pickle_serde,
        serde.compressed_serde,
        pm_serde.PickleSerde(),
    ):
        assert isinstance(s, Serde)
    assert not isinstance(object(), Serde)


def test_flag_constants_are_the_shared_ones() -> None:
    assert (FLAG_BYTES, FLAG_PICKLE, FLAG_INTEGER, FLAG_LONG, FLAG_COMPRESSED, FLAG_TEXT) == (
        pm_serde.FLAG_BYTES,
        pm_serde.FLAG_PICKLE,
        pm_serde.FLAG_INTEGER,
        pm_serde.FLAG_LONG,
        pm_serde.FLAG_COMPRESSED,
        pm_serde.FLAG_TEXT,
    ) == (0, 1, 2, 4, 8, 16)
