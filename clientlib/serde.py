"""Value serialization compatible with pymemcache, pylibmc and python-memcached.

A serde is any object with ``serialize(key, value) -> (bytes, flags)`` and
``deserialize(key, value, flags) -> object`` (pymemcache's protocol), so a
pymemcache serde object can be passed to clientlib unchanged and the other way
round. The flag bits below are the ones those three clients agree on; values
written by any of them read back the same here.

``key`` is whatever the client hands over: pymemcache passes the full prefixed
key bytes to ``serialize`` and the caller's original key to ``deserialize``.
None of the serdes here look at it.

Unpickling runs arbitrary code: only point ``PickleSerde`` at a memcached that
untrusted parties cannot write to (the same caveat as pymemcache's).
"""

from __future__ import annotations

import logging
import pickle
import zlib
from typing import Any, Callable, Protocol, runtime_checkable

from clientlib.errors import MemcacheIllegalInputError

__all__ = [
    "FLAG_BYTES",
    "FLAG_PICKLE",
    "FLAG_INTEGER",
    "FLAG_LONG",
    "FLAG_COMPRESSED",
    "FLAG_TEXT",
    "MAX_FLAGS",
    "DEFAULT_PICKLE_VERSION",
    "Serde",
    "python_memcache_serializer",
    "python_memcache_deserializer",
    "PickleSerde",
    "CompressedSerde",
    "LegacyWrappingSerde",
    "RawSerde",
    "pickle_serde",
    "compressed_serde",
    "default_serde",
    "make_serde",
    "encode_value",
]

_log = logging.getLogger(__name__)

FLAG_BYTES = 0
FLAG_PICKLE = 1 << 0
FLAG_INTEGER = 1 << 1
FLAG_LONG = 1 << 2
FLAG_COMPRESSED = 1 << 3
FLAG_TEXT = 1 << 4

# memcached 1.6 stores client flags as an unsigned 32-bit number.
MAX_FLAGS = 2**32 - 1

DEFAULT_PICKLE_VERSION = pickle.HIGHEST_PROTOCOL

SerializeFunc = Callable[[Any, Any], "tuple[Any, int]"]
DeserializeFunc = Callable[[Any, bytes, int], Any]


@runtime_checkable
class Serde(Protocol):
    """pymemcache's serialization protocol."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]: ...

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any: ...


def _as_bytes(data: Any, encoding: str) -> bytes:
    """Coerce a serializer's output to bytes the way pymemcache's Client does.

    pymemcache sends ``str(data).encode(encoding)`` for anything that is not
    bytes, so ``5`` becomes ``b"5"`` and ``1.5`` becomes ``b"1.5"``.
    """
    if isinstance(data, bytes):
        return data
    try:
        return str(data).encode(encoding)
    except UnicodeEncodeError as exc:
        raise MemcacheIllegalInputError(f"Data values must be binary-safe: {exc}") from exc


def python_memcache_serializer(
    key: Any, value: Any, pickle_version: int = DEFAULT_PICKLE_VERSION
) -> tuple[bytes, int]:
    """Encode ``value`` as python-memcached / pymemcache do.

    Exact type checks (not isinstance) on purpose: a subclass of bytes, str or
    int (bool included) is pickled, so it comes back as itself rather than as
    the base type.
    """
    value_type = type(value)
    if value_type is bytes:
        return value, FLAG_BYTES
    if value_type is str:
        return value.encode("utf8"), FLAG_TEXT
    if value_type is int:
        try:
            return b"%d" % value, FLAG_INTEGER
        except ValueError:
            # Beyond sys.get_int_max_str_digits() (4300 digits by default) the
            # decimal form cannot be produced; pymemcache raises here. A pickle
            # holds any int and every reader of these flags can load it.
            pass
    return pickle.dumps(value, protocol=pickle_version), FLAG_PICKLE


def python_memcache_deserializer(key: Any, value: bytes, flags: int) -> Any:
    """Decode a value written with the shared flag bits.

    The order of the tests matches pymemcache's, which matters for values
    written with several bits set (e.g. TEXT|COMPRESSED after decompression).
    """
    if flags == 0:
        return value
    if flags & FLAG_TEXT:
        return value.decode("utf8")
    if flags & FLAG_INTEGER:
        return int(value)
    if flags & FLAG_LONG:
        return int(value)
    if flags & FLAG_PICKLE:
        try:
            return pickle.loads(value)
        except Exception:
            # pymemcache turns an unreadable pickle (class gone, truncated
            # value) into a miss rather than an error; callers rely on that.
            _log.info("Pickle error", exc_info=True)
            return None
    return value


class PickleSerde:
    """pymemcache's ``PickleSerde``: bytes raw (flag 0), str as UTF-8 (16),
    int as decimal (2), anything else pickled (1). Reads flag 4 (long) too."""

    __slots__ = ("_pickle_version",)

    def __init__(self, pickle_version: int = DEFAULT_PICKLE_VERSION) -> None:
        self._pickle_version = pickle_version

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return python_memcache_serializer(key, value, self._pickle_version)

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        return python_memcache_deserializer(key, value, flags)


pickle_serde = PickleSerde()


class CompressedSerde:
    """pymemcache's ``CompressedSerde``: wraps another serde and compresses
    its output when it is longer than ``min_compress_len`` bytes.

    The compressed form (and FLAG_COMPRESSED) is kept unless it came out
    strictly longer than the input; on a tie pymemcache keeps the compressed
    form, and so do we, so both write identical bytes and flags.
    ``min_compress_len <= 0`` disables compression. Parameter names are
    pymemcache's so existing keyword calls keep working.
    """

    __slots__ = ("_compress", "_decompress", "_serde", "_min_compress_len")

    def __init__(
        self,
        compress: Callable[[bytes], bytes] = zlib.compress,
        decompress: Callable[[bytes], bytes] = zlib.decompress,
        serde: Serde = pickle_serde,
        min_compress_len: int = 400,
    ) -> None:
        self._compress = compress
        self._decompress = decompress
        self._serde = serde
        self._min_compress_len = min_compress_len

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        data, flags = self._serde.serialize(key, value)
        # pymemcache's own PickleSerde returns str for ints, which its
        # CompressedSerde then fails to compress (TypeError) past 400 digits.
        data = _as_bytes(data, "utf-8")
        if len(data) > self._min_compress_len > 0:
            compressed = self._compress(data)
            if len(compressed) <= len(data):
                return compressed, flags | FLAG_COMPRESSED
        return data, flags

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        if flags & FLAG_COMPRESSED:
            value = self._decompress(value)
        # The inner serde sees FLAG_COMPRESSED still set, as in pymemcache.
        return self._serde.deserialize(key, value, flags)


compressed_serde = CompressedSerde()


class LegacyWrappingSerde:
    """Adapts pymemcache's old ``serializer`` / ``deserializer`` function pair.

    A missing function (None) passes values through unchanged with flags 0.
    Like pymemcache's, ``serialize`` returns whatever the function returns,
    which may not be bytes; ``encode_value`` coerces it as pymemcache's Client
    does.
    """

    __slots__ = ("_serializer", "_deserializer")

    def __init__(
        self,
        serializer_func: SerializeFunc | None,
        deserializer_func: DeserializeFunc | None,
    ) -> None:
        self._serializer = serializer_func
        self._deserializer = deserializer_func

    def serialize(self, key: Any, value: Any) -> tuple[Any, int]:
        if self._serializer is None:
            return value, FLAG_BYTES
        return self._serializer(key, value)

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        if self._deserializer is None:
            return value
        return self._deserializer(key, value, flags)


class RawSerde:
    """What pymemcache's Client does with ``serde=None``.

    Stores bytes as they are and anything else as ``str(value)`` encoded with
    ``encoding`` (so ``5`` is ``b"5"``, ``None`` is ``b"None"``), always with
    flags 0; reads return the stored bytes, whatever the flags. Non-encodable
    text raises MemcacheIllegalInputError, as pymemcache's Client does.
    """

    __slots__ = ("_encoding",)

    def __init__(self, encoding: str = "ascii") -> None:
        self._encoding = encoding

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return _as_bytes(value, self._encoding), FLAG_BYTES

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        return value


default_serde = RawSerde()


def make_serde(
    serde: Serde | None = None,
    serializer: SerializeFunc | None = None,
    deserializer: DeserializeFunc | None = None,
    encoding: str = "ascii",
) -> Serde:
    """Pick the serde a Client uses from its constructor arguments.

    Same precedence as pymemcache: an explicit ``serde`` wins, then the legacy
    function pair, and with neither the raw behaviour.
    """
    if serde is not None:
        return serde
    if serializer is None and deserializer is None:
        return default_serde if encoding == "ascii" else RawSerde(encoding)
    return LegacyWrappingSerde(serializer, deserializer)


def encode_value(
    serde: Serde,
    key: Any,
    value: Any,
    *,
    flags: int | None = None,
    encoding: str = "ascii",
) -> tuple[bytes, int]:
    """Serialize one value for a store command, ready for the wire.

    Applies what pymemcache's Client does around ``serde.serialize``: an
    explicit ``flags`` overrides the serde's, and non-bytes output is sent as
    ``str(data).encode(encoding)``. Flags are checked against memcached's
    32-bit range here because a bad flags token would be rejected only after
    the request left the worker.
    """
    data, data_flags = serde.serialize(key, value)
    if flags is not None:
        data_flags = flags
    if type(data_flags) is not int:
        if isinstance(data_flags, bool) or not isinstance(data_flags, int):
            raise MemcacheIllegalInputError(
                f"flags must be an integer, got bad value: {data_flags!r}"
            )
        data_flags = int(data_flags)
    if not 0 <= data_flags <= MAX_FLAGS:
        raise MemcacheIllegalInputError(
            f"flags must be in 0..{MAX_FLAGS}, got bad value: {data_flags!r}"
        )
    return _as_bytes(data, encoding), data_flags
