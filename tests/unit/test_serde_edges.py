"""clientlib/serde.py at its edges (holes that mutation testing found), each against what
pymemcache's serde module does."""

from __future__ import annotations

import enum
import logging
from typing import Any

import pymemcache.serde as pm_serde
import pytest

from clientlib.serde import FLAG_COMPRESSED, CompressedSerde, PickleSerde, encode_value, python_memcache_deserializer

pytestmark = pytest.mark.unit


class Recorder:
    """A serde that records the keys it is handed."""

    def __init__(self) -> None:
        self.keys: list[Any] = []

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        self.keys.append(key)
        return bytes(value), 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        self.keys.append(key)
        return value


def test_an_unreadable_pickle_is_logged_as_pymemcache_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    # pymemcache.serde: log.info("Pickle error", exc_info=True), and the value reads as None.
    for deserialize in (python_memcache_deserializer, pm_serde.python_memcache_deserializer):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert deserialize(b"k", b"\x80\x04not a pickle", 1) is None
        (record,) = caplog.records
        assert (record.levelno, record.getMessage()) == (logging.INFO, "Pickle error")
        assert record.exc_info is not None and record.exc_info[0] is not None


def test_compressed_serde_hands_the_key_to_its_inner_serde() -> None:
    for cls in (CompressedSerde, pm_serde.CompressedSerde):
        inner = Recorder()
        wrapped = cls(serde=inner)
        data, flags = wrapped.serialize(b"the-key", b"v")
        assert wrapped.deserialize("the-key", data, flags) == b"v"
        assert inner.keys == [b"the-key", "the-key"], cls


def test_encode_value_hands_the_key_to_the_serde() -> None:
    inner = Recorder()
    assert encode_value(inner, b"prefix:k", b"v") == (b"v", 0)
    assert inner.keys == [b"prefix:k"]


def test_min_compress_len_1_compresses_anything_longer_than_a_byte() -> None:
    value = "a" * 100  # pickled: well over 1 byte, and it compresses
    ours = CompressedSerde(min_compress_len=1).serialize(b"k", value)
    theirs = pm_serde.CompressedSerde(min_compress_len=1).serialize(b"k", value)
    assert ours[1] & FLAG_COMPRESSED and theirs[1] & FLAG_COMPRESSED
    assert ours == (theirs[0], theirs[1])
    assert CompressedSerde(min_compress_len=0).serialize(b"k", value)[1] & FLAG_COMPRESSED == 0


class Flags(enum.IntEnum):
    TEN = 10


def test_int_subclass_flags_go_out_as_plain_ints() -> None:
    data, flags = encode_value(PickleSerde(), b"k", b"v", flags=Flags.TEN)
    assert (data, flags, type(flags)) == (b"v", 10, int)
