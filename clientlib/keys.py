"""Input checks run in the worker before a request leaves the process.

A malformed key or number that reached memcached could desync a pipelined
connection shared with other requests, so everything is checked here, where
the error can go back to the one caller that caused it.

Key rule (memcached's text and meta protocols): 1 to 250 bytes after the
prefix is added and text is encoded, no byte <= 0x20 (space and control
bytes) and no 0x7F. Bytes >= 0x80 are allowed, as memcached allows them.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

from clientlib.errors import MemcacheIllegalInputError

__all__ = ["MAX_KEY_LENGTH", "MAX_CAS", "check_key", "check_keys", "check_int", "check_cas"]

MAX_KEY_LENGTH = 250
# memcached's cas unique is an unsigned 64-bit counter.
MAX_CAS = 2**64 - 1
_MAX_CAS_DIGITS = len(str(MAX_CAS))

# One regex call checks length and every byte in C; the per-rule diagnosis in
# _key_error only runs on the rare rejected key.
_valid_key = re.compile(rb"[\x21-\x7e\x80-\xff]{1,250}").fullmatch
# check_keys: any byte a key may not hold. "!" joins the keys: a byte every key may hold.
_cas_digits = re.compile(rb"[0-9]+").fullmatch

# Longer keys are cut in error messages: a 1 MB key should not become a 1 MB
# exception message in a log line.
_SHOWN_KEY_BYTES = 64


def _show(key: bytes | str) -> str:
    if len(key) <= _SHOWN_KEY_BYTES:
        return repr(key)
    unit = "bytes" if isinstance(key, bytes) else "characters"
    return f"{key[:_SHOWN_KEY_BYTES]!r}... ({len(key)} {unit})"


def _show_int(value: int) -> str:
    # str() of an int past sys.get_int_max_str_digits() raises ValueError,
    # which would replace the intended error with a confusing one.
    if value.bit_length() <= 256:
        return str(value)
    return f"an integer of {value.bit_length()} bits"


def _key_error(key: bytes) -> MemcacheIllegalInputError:
    if not key:
        return MemcacheIllegalInputError("Key is empty")
    if len(key) > MAX_KEY_LENGTH:
        return MemcacheIllegalInputError(
            f"Key is too long: {len(key)} bytes, at most {MAX_KEY_LENGTH}: {_show(key)}"
        )
    for offset, byte in enumerate(key):
        if byte in b" \t\n\r\x0b\x0c":
            return MemcacheIllegalInputError(
                f"Key contains whitespace 0x{byte:02x} at offset {offset}: {_show(key)}"
            )
        if byte <= 0x20 or byte == 0x7F:
            return MemcacheIllegalInputError(
                f"Key contains control byte 0x{byte:02x} at offset {offset}: {_show(key)}"
            )
    # Unreachable while the regex and the loop agree; kept so a future edit to
    # one of them fails loudly instead of accepting a bad key.
    return MemcacheIllegalInputError(f"Key is invalid: {_show(key)}")


def check_key(
    key: bytes | str,
    *,
    prefix: bytes,
    allow_unicode_keys: bool,
    encoding: str = "ascii",
) -> bytes:
    """Return ``prefix + key`` as bytes, or raise MemcacheIllegalInputError.

    Follows pymemcache's ``check_key_helper`` for text: a str key is encoded
    as UTF-8 when ``allow_unicode_keys`` is set; otherwise it must be ASCII
    (then encoded with ``encoding``). Bytes keys are used as given, whatever
    ``allow_unicode_keys`` says, and bytearray/memoryview are accepted as
    pymemcache accepts them. The length and byte rules apply to the full key.
    ``prefix`` is expected to be valid bytes already (the Client normalizes
    it once); a bad prefix makes every key fail here.
    """
    if type(key) is bytes:
        raw = key
    elif isinstance(key, str):
        if allow_unicode_keys:
            try:
                raw = key.encode("utf-8")
            except UnicodeEncodeError as exc:
                # Lone surrogates cannot be encoded at all.
                raise MemcacheIllegalInputError(f"Key is not valid Unicode: {_show(key)}") from exc
        elif key.isascii():
            raw = key.encode(encoding)
        else:
            raise MemcacheIllegalInputError(f"Non-ASCII key: {_show(key)}")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
    else:
        raise MemcacheIllegalInputError(
            f"Key must be bytes or str, got {type(key).__name__}: {reprlib.repr(key)}"
        )
    full = prefix + raw if prefix else raw
    if _valid_key(full) is None:
        raise _key_error(full)
    return full


def check_keys(
    keys: list[Any],
    *,
    prefix: bytes,
    allow_unicode_keys: bool,
    encoding: str = "ascii",
) -> list[bytes]:
    """``[check_key(k, ...) for k in keys]``, with the same result and the same error for the
    first bad key, at a fraction of the cost for the common batch (get_many of str or bytes
    keys): the keys are joined by a space, encoded, prefixed and split back in C-level passes,
    and their bytes checked in one pass over the lot, instead of one call per key (0.15 against
    0.04 us per 10-byte str key). A space is a byte no key may hold, so a key holding one splits
    into more parts than there are keys and, like anything unusual, goes key by key through
    check_key for its error."""
    if not keys:
        return []
    joined: bytes | None = None
    try:
        # join raises TypeError for a batch of mixed types: those go key by key.
        if type(keys[0]) is str:
            text = " ".join(keys)
            if allow_unicode_keys:
                joined = text.encode("utf-8")
            elif text.isascii() and encoding in _ASCII_AS_IS:
                joined = text.encode("ascii")
        elif type(keys[0]) is bytes and set(map(type, keys)) == _BYTES_ONLY:
            # (join alone would take any buffer, array.array's too, which check_key refuses)
            joined = b" ".join(keys)
    except (TypeError, UnicodeError):
        joined = None  # mixed types, or a lone surrogate: check_key names the key
    if joined is not None:
        if prefix:
            joined = prefix + joined.replace(b" ", b" " + prefix)
        full = joined.split(b" ")
        n = len(keys)
        if len(full) == n:
            sizes = list(map(len, full))
            # The n - 1 spaces that join the keys are the only bytes a key may not hold.
            if 0 < min(sizes) and max(sizes) <= MAX_KEY_LENGTH and len(joined.translate(None, _BAD_KEY_BYTES)) == len(joined) - (n - 1):
                return full
    return [check_key(k, prefix=prefix, allow_unicode_keys=allow_unicode_keys, encoding=encoding) for k in keys]


# Codecs that encode ASCII text as its ASCII bytes (so the joined text encodes as the keys do one
# by one); another (UTF-16's BOM and NULs) goes key by key.
_ASCII_AS_IS = frozenset({"ascii", "us-ascii", "utf-8", "utf8", "UTF-8", "latin-1", "latin1", "iso-8859-1"})
_BAD_KEY_BYTES = bytes(range(0x21)) + b"\x7f"
_BYTES_ONLY = {bytes}


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """Return ``value`` as a plain int, or raise MemcacheIllegalInputError.

    For expire, delta, delay and the other numeric arguments. Accepts what
    pymemcache's ``_check_integer`` accepts (int and its subclasses, such as
    IntEnum members) except bool: pymemcache would send ``True`` as the token
    ``True``, which memcached rejects, so no working caller passes one.
    str and float are rejected rather than converted, as in pymemcache.
    ``minimum`` / ``maximum`` (inclusive) let the caller apply the range the
    command allows, so an out-of-range number never reaches memcached.
    """
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MemcacheIllegalInputError(
                f"{name} must be integer, got bad value: {value!r}"
            )
        value = int(value)
    if minimum is not None and value < minimum:
        raise MemcacheIllegalInputError(f"{name} must be >= {minimum}, got {_show_int(value)}")
    if maximum is not None and value > maximum:
        raise MemcacheIllegalInputError(f"{name} must be <= {maximum}, got {_show_int(value)}")
    return value


def check_cas(cas: Any) -> int:
    """Return a cas token as an int in 0..2**64-1, or raise MemcacheIllegalInputError.

    Accepts what pymemcache's ``_check_cas`` accepts: an int >= 0, or a str or
    bytes of ASCII digits (leading zeros allowed). Always returns an int so the
    wire carries one form. bool is rejected (pymemcache sends ``True``, which
    is not a digit string, so it rejects it too). Values past 64 bits are
    rejected because memcached's cas counter cannot hold them.
    """
    if type(cas) is int or (isinstance(cas, int) and not isinstance(cas, bool)):
        number = int(cas)
        if number < 0:
            raise MemcacheIllegalInputError(
                f"cas must only contain values in 0-9, got {_show_int(number)}"
            )
    elif isinstance(cas, (bytes, str)):
        raw = cas.encode("ascii") if isinstance(cas, str) and cas.isascii() else cas
        # A bytes regex, not isdigit(): str.isdigit() accepts non-ASCII digits
        # such as "\u0663", which memcached cannot read.
        if not isinstance(raw, bytes) or _cas_digits(raw) is None:
            raise MemcacheIllegalInputError(
                f"cas must only contain values in 0-9, got bad value: {cas!r}"
            )
        # Checked before int(): a long digit string would otherwise cost
        # quadratic time or hit the int-from-str digit limit.
        if len(raw.lstrip(b"0")) > _MAX_CAS_DIGITS:
            raise MemcacheIllegalInputError(f"cas must be at most {MAX_CAS}, got {_show(raw)}")
        number = int(raw)
    else:
        raise MemcacheIllegalInputError(
            f"cas must be integer, string, or bytes, got bad value: {cas!r}"
        )
    if number > MAX_CAS:
        raise MemcacheIllegalInputError(f"cas must be at most {MAX_CAS}, got {_show_int(number)}")
    return number
