"""clientlib/keys.py: what each rejected key's error says. The rules, written out here: memcached's
key rules (doc/protocol.txt: at most 250 bytes, no whitespace or control characters), the whitespace
bytes named as such (space, \\t, \\n, \\r, \\v, \\f) and every other byte <= 0x20 or 0x7f as a control
byte, both with the offset; a key is shown in full up to 64 bytes (characters for a str), else its
first 64 and its length."""

from __future__ import annotations

import pytest

from clientlib.errors import MemcacheIllegalInputError
from clientlib.keys import check_key

pytestmark = pytest.mark.unit


def message(key: object, **kw: object) -> str:
    with pytest.raises(MemcacheIllegalInputError) as info:
        check_key(key, prefix=b"", allow_unicode_keys=False, **kw)  # type: ignore[arg-type]
    return str(info.value)


def test_empty_key() -> None:
    assert message(b"") == "Key is empty"


@pytest.mark.parametrize("n", [251, 300])
def test_too_long_names_the_length_and_the_limit(n: int) -> None:
    key = b"k" * n
    assert message(key) == f"Key is too long: {n} bytes, at most 250: {key[:64]!r}... ({n} bytes)"


def test_250_bytes_is_not_too_long() -> None:
    assert check_key(b"k" * 250, prefix=b"", allow_unicode_keys=False) == b"k" * 250


@pytest.mark.parametrize("byte", [0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C])
def test_whitespace_is_named_with_its_offset(byte: int) -> None:
    key = b"ab" + bytes([byte]) + b"c"
    assert message(key) == f"Key contains whitespace 0x{byte:02x} at offset 2: {key!r}"


@pytest.mark.parametrize("byte", [0x00, 0x01, 0x08, 0x0E, 0x1F, 0x7F])
def test_control_bytes_are_named_with_their_offset(byte: int) -> None:
    key = b"a" + bytes([byte])
    assert message(key) == f"Key contains control byte 0x{byte:02x} at offset 1: {key!r}"


def test_0x21_is_a_valid_key_byte() -> None:
    assert check_key(b"!", prefix=b"", allow_unicode_keys=False) == b"!"


def test_a_key_of_64_bytes_is_shown_whole_and_65_is_cut() -> None:
    k64 = b" " + b"k" * 63
    assert message(k64).endswith(f": {k64!r}")
    k65 = b" " + b"k" * 64
    assert message(k65).endswith(f": {k65[:64]!r}... (65 bytes)")


def test_a_long_str_key_is_counted_in_characters() -> None:
    key = "é" * 70
    assert message(key) == f"Non-ASCII key: {key[:64]!r}... (70 characters)"


def test_wrong_type_names_the_type() -> None:
    assert message(12) == "Key must be bytes or str, got int: 12"
    assert message(None) == "Key must be bytes or str, got NoneType: None"


def test_the_first_bad_byte_is_diagnosed_whatever_valid_bytes_come_before_it() -> None:
    # 250 bytes is not too long, so the trailing space is the problem; '!' (0x21) and 'X' are valid.
    key = b"k" * 249 + b" "
    assert message(key) == f"Key contains whitespace 0x20 at offset 249: {key[:64]!r}... (250 bytes)"
    assert message(b"!\x01") == "Key contains control byte 0x01 at offset 1: b'!\\x01'"
    assert message(b"X\x00") == "Key contains control byte 0x00 at offset 1: b'X\\x00'"
