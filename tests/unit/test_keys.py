"""clientlib.keys: every key rule byte-exact, and agreement with pymemcache's own checks.

Where we differ from pymemcache (pymemcache is looser; we are never looser):
- keys: pymemcache rejects only ASCII whitespace (space, \\t \\n \\v \\f \\r) between other bytes
  or at either end, and NUL; we also reject the other control bytes 0x01-0x1f and 0x7F, which
  memcached's meta protocol does not allow in a key, the empty full key, and keys made only of
  whitespace (pymemcache's split()-based test lets b" " through). pymemcache raises TypeError
  for a key that is neither bytes nor str and UnicodeEncodeError for a lone surrogate with
  allow_unicode_keys; we raise MemcacheIllegalInputError for both.
- integers: pymemcache accepts bool (and sends "True", which memcached rejects); we reject it.
- cas: pymemcache accepts any digit string; we reject values past 2**64-1, which memcached's
  64-bit cas cannot hold, and return an int rather than bytes.
"""

from __future__ import annotations

import array
import enum
import re
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymemcache.client.base import Client as PmClient
from pymemcache.client.base import check_key_helper
from pymemcache.exceptions import MemcacheIllegalInputError as PmIllegalInputError

from clientlib.errors import MemcacheClientError, MemcacheError, MemcacheIllegalInputError
from clientlib.keys import MAX_CAS, MAX_KEY_LENGTH, check_cas, check_int, check_key, check_keys

pytestmark = pytest.mark.unit

BAD_BYTES = [*range(0x00, 0x21), 0x7F]
GOOD_BYTES = [b for b in range(256) if b not in BAD_BYTES]
PM = SimpleNamespace(encoding="ascii")  # stands in for `self` in pymemcache's check methods


def ck(key: Any, prefix: bytes = b"", allow_unicode_keys: bool = False, **kw: Any) -> bytes:
    return check_key(key, prefix=prefix, allow_unicode_keys=allow_unicode_keys, **kw)


def spec_valid(full: bytes) -> bool:
    """The rule as stated, written independently of the implementation."""
    return 1 <= len(full) <= 250 and all(b > 0x20 and b != 0x7F for b in full)


# --- check_key: rules --------------------------------------------------------------------------


def test_accepts_plain_keys_and_returns_exact_bytes() -> None:
    assert ck(b"user:42") == b"user:42"
    assert ck("user:42") == b"user:42"
    assert type(ck("user:42")) is bytes
    assert ck(b"a") == b"a"


def test_prefix_is_prepended() -> None:
    assert ck(b"42", prefix=b"app:") == b"app:42"
    assert ck("42", prefix=b"app:") == b"app:42"
    assert ck("\u00e9", prefix=b"p:", allow_unicode_keys=True) == b"p:\xc3\xa9"


def test_length_limit_is_250_bytes_including_prefix() -> None:
    assert MAX_KEY_LENGTH == 250
    assert ck(b"k" * 250) == b"k" * 250
    assert ck(b"k" * 246, prefix=b"app:") == b"app:" + b"k" * 246
    with pytest.raises(MemcacheIllegalInputError, match="too long: 251 bytes"):
        ck(b"k" * 251)
    with pytest.raises(MemcacheIllegalInputError, match="too long: 251 bytes"):
        ck(b"k" * 247, prefix=b"app:")
    with pytest.raises(MemcacheIllegalInputError, match="too long"):
        ck(b"k" * 100_000)


def test_length_counts_utf8_bytes_not_characters() -> None:
    assert ck("\u00e9" * 125, allow_unicode_keys=True) == b"\xc3\xa9" * 125
    with pytest.raises(MemcacheIllegalInputError, match="too long: 252 bytes"):
        ck("\u00e9" * 126, allow_unicode_keys=True)


def test_empty_key_is_rejected_but_prefix_alone_is_a_key() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="empty"):
        ck(b"")
    with pytest.raises(MemcacheIllegalInputError, match="empty"):
        ck("")
    # The rule is on the full key memcached sees, as pymemcache's is.
    assert ck(b"", prefix=b"p:") == b"p:"


@pytest.mark.parametrize("bad", BAD_BYTES, ids=lambda b: f"0x{b:02x}")
@pytest.mark.parametrize("where", ["start", "middle", "end", "alone"])
def test_every_space_and_control_byte_is_rejected_anywhere(bad: int, where: str) -> None:
    b = bytes([bad])
    key = {"start": b + b"key", "middle": b"ke" + b + b"y", "end": b"key" + b, "alone": b}[where]
    kind = "whitespace" if b in b" \t\n\r\x0b\x0c" else "control byte"
    with pytest.raises(MemcacheIllegalInputError, match=f"{kind} 0x{bad:02x} at offset"):
        ck(key)
    with pytest.raises(MemcacheIllegalInputError):
        ck(key.decode("latin-1"))  # the same character in a str key
    with pytest.raises(MemcacheIllegalInputError):
        ck(b"ok", prefix=b)  # a bad byte in the prefix fails too


def test_error_names_the_offset_of_the_first_bad_byte() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="0x0a at offset 3"):
        ck(b"abc\ndef ghi")


def test_every_other_byte_is_accepted() -> None:
    assert len(GOOD_BYTES) == 256 - 34
    for b in GOOD_BYTES:
        assert ck(bytes([b])) == bytes([b])
        assert ck(b"k" + bytes([b]) * 249) == b"k" + bytes([b]) * 249
    # All of them in one key, in chunks that fit the length limit.
    everything = bytes(GOOD_BYTES)
    for i in range(0, len(everything), 250):
        assert ck(everything[i : i + 250]) == everything[i : i + 250]


def test_bytes_keys_may_hold_high_bytes_without_allow_unicode() -> None:
    assert ck(b"\xc3\xa9\xff\x80") == b"\xc3\xa9\xff\x80"
    assert ck(b"\xc3\xa9", allow_unicode_keys=True) == b"\xc3\xa9"


def test_non_ascii_str_needs_allow_unicode_keys() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="Non-ASCII key"):
        ck("caf\u00e9")
    with pytest.raises(MemcacheIllegalInputError, match="Non-ASCII key"):
        ck("caf\u00e9", encoding="latin-1")  # a wider encoding does not lift the rule
    assert ck("caf\u00e9", allow_unicode_keys=True) == b"caf\xc3\xa9"
    assert ck("\u2603\U0001f600", allow_unicode_keys=True) == "\u2603\U0001f600".encode()


def test_unicode_whitespace_is_not_ascii_whitespace() -> None:
    # U+00A0 and U+3000 encode to bytes >= 0x80, which memcached takes as key bytes.
    assert ck("a\u00a0b", allow_unicode_keys=True) == b"a\xc2\xa0b"
    assert ck("a\u3000b", allow_unicode_keys=True) == b"a\xe3\x80\x80b"


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="not valid Unicode"):
        ck("a\ud800", allow_unicode_keys=True)
    with pytest.raises(MemcacheIllegalInputError, match="Non-ASCII"):
        ck("a\ud800")


def test_ascii_str_is_encoded_with_the_given_encoding() -> None:
    assert ck("abc", encoding="utf-8") == b"abc"
    assert ck("abc", encoding="latin-1") == b"abc"


@pytest.mark.parametrize("key", [1, 1.5, None, ["k"], ("k",), {"k": 1}, object()])
def test_keys_of_other_types_are_rejected(key: Any) -> None:
    with pytest.raises(MemcacheIllegalInputError, match="Key must be bytes or str"):
        ck(key)


def test_bytes_like_keys_are_accepted_as_pymemcache_accepts_them() -> None:
    assert ck(bytearray(b"k1")) == b"k1"
    assert type(ck(bytearray(b"k1"))) is bytes
    assert ck(memoryview(b"k2"), prefix=b"p") == b"pk2"
    with pytest.raises(MemcacheIllegalInputError):
        ck(bytearray(b"a b"))


def test_long_key_is_shortened_in_the_error_message() -> None:
    with pytest.raises(MemcacheIllegalInputError) as info:
        ck(b"x" * 1_000_000)
    assert len(str(info.value)) < 200
    assert "1000000 bytes" in str(info.value)
    with pytest.raises(MemcacheIllegalInputError) as info:
        ck("\u00e9" * 1_000_000)
    assert len(str(info.value)) < 200
    assert "1000000 characters" in str(info.value)
    with pytest.raises(MemcacheIllegalInputError) as info:
        ck(list(range(1_000_000)))
    assert len(str(info.value)) < 200


def test_errors_are_client_errors() -> None:
    with pytest.raises(MemcacheClientError):
        ck(b"a b")
    with pytest.raises(MemcacheError):
        ck(b"")


# --- check_key: properties ---------------------------------------------------------------------

# Bytes near the edges of the rule, so random keys hit every branch often.
edgy_bytes = st.binary(max_size=260) | st.lists(
    st.sampled_from([0x00, 0x09, 0x0A, 0x0D, 0x1F, 0x20, 0x21, 0x41, 0x7E, 0x7F, 0x80, 0xFF]),
    max_size=260,
).map(bytes)
keys = (
    edgy_bytes
    | st.text(max_size=260)
    | st.text(alphabet=st.characters(codec="ascii"), max_size=260)
    | st.builds(lambda n: b"k" * n, st.integers(0, 300))
)
prefixes = st.sampled_from([b"", b"p:", b"app:v1:", b"x" * 200])


@given(keys, prefixes, st.booleans())
def test_any_accepted_key_obeys_the_rule(key: bytes | str, prefix: bytes, uni: bool) -> None:
    try:
        full = ck(key, prefix=prefix, allow_unicode_keys=uni)
    except MemcacheIllegalInputError:
        return
    assert 1 <= len(full) <= 250
    assert not any(b <= 0x20 or b == 0x7F for b in full)
    assert full.startswith(prefix)


@given(edgy_bytes, prefixes)
def test_bytes_keys_accepted_exactly_when_the_rule_says(key: bytes, prefix: bytes) -> None:
    full = prefix + key
    if spec_valid(full):
        assert ck(key, prefix=prefix) == full
    else:
        with pytest.raises(MemcacheIllegalInputError):
            ck(key, prefix=prefix)


@given(st.binary(min_size=1, max_size=250).filter(spec_valid))
def test_valid_bytes_keys_round_trip_unchanged(key: bytes) -> None:
    assert ck(key) == key


# --- check_keys: a batch checked as check_key checks each key -------------------------------

def checked_one_by_one(batch: list[Any], prefix: bytes, uni: bool, encoding: str) -> list[bytes] | str:
    """The rule for check_keys, written as its definition: check_key on each key in turn; the
    first refusal's message stands for the batch."""
    out = []
    for key in batch:
        try:
            out.append(check_key(key, prefix=prefix, allow_unicode_keys=uni, encoding=encoding))
        except MemcacheIllegalInputError as exc:
            return str(exc)
    return out


def checked_together(batch: list[Any], prefix: bytes, uni: bool, encoding: str) -> list[bytes] | str:
    """check_keys on the whole batch: its keys, or its error's message."""
    try:
        return check_keys(batch, prefix=prefix, allow_unicode_keys=uni, encoding=encoding)
    except MemcacheIllegalInputError as exc:
        return str(exc)


@given(st.lists(keys, max_size=12), prefixes, st.booleans(), st.sampled_from(["ascii", "utf-8", "latin-1", "utf-16"]))
def test_check_keys_is_check_key_on_each_key(batch: list[Any], prefix: bytes, uni: bool, encoding: str) -> None:
    assert checked_together(batch, prefix, uni, encoding) == checked_one_by_one(batch, prefix, uni, encoding)


class StrKey(str):
    pass


valid_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
one_bad = st.sampled_from(["", " ", "a b", "a\tb", "a\x7fb", "k" * 251, "\u00e9", "\ud800", b"", b"a b", b"\x00", b"k" * 251, 5, None])
one_odd = st.sampled_from([bytearray(b"ba"), memoryview(b"mv"), StrKey("sub"), b"\xff\xfe", "\u00e9t\u00e9"])


@given(
    st.lists(valid_text | valid_text.map(str.encode), min_size=1, max_size=30),
    st.lists(st.tuples(st.integers(0, 30), one_bad | one_odd), max_size=2),
    prefixes, st.booleans(), st.sampled_from(["ascii", "utf-8", "latin-1", "utf-16", "cp1252"]),
)
def test_check_keys_is_check_key_on_each_key_for_mostly_good_batches(
    batch: list[Any], inserts: list[tuple[int, Any]], prefix: bytes, uni: bool, encoding: str,
) -> None:
    # The batches get_many sees: good keys, now and then one that is bad or of another type.
    for at, key in inserts:
        batch.insert(at, key)
    assert checked_together(batch, prefix, uni, encoding) == checked_one_by_one(batch, prefix, uni, encoding)


@pytest.mark.parametrize(
    ("batch", "prefix", "expected"),
    [
        (["a", "b"], b"", [b"a", b"b"]),
        ([b"a", b"b"], b"p:", [b"p:a", b"p:b"]),
        (["a", b"b", bytearray(b"c")], b"", [b"a", b"b", b"c"]),  # mixed types: key by key
        ([], b"", []),
        (["k" * 248], b"p:", [b"p:" + b"k" * 248]),  # 250 bytes with the prefix: the limit
    ],
)
def test_check_keys_accepts(batch: list[Any], prefix: bytes, expected: list[bytes]) -> None:
    assert check_keys(batch, prefix=prefix, allow_unicode_keys=False) == expected


def test_check_keys_refuses_a_lone_surrogate_and_an_encoding_that_makes_a_bad_byte() -> None:
    with pytest.raises(MemcacheIllegalInputError, match="not valid Unicode"):
        check_keys(["ok", "\ud800"], prefix=b"", allow_unicode_keys=True)
    # UTF-16 puts a BOM and NUL bytes into every key: check_key refuses each, and so must the batch.
    with pytest.raises(MemcacheIllegalInputError, match="0x00"):
        check_key("ab", prefix=b"", allow_unicode_keys=False, encoding="utf-16")
    with pytest.raises(MemcacheIllegalInputError, match="0x00"):
        check_keys(["ab", "cd"], prefix=b"", allow_unicode_keys=False, encoding="utf-16")


@pytest.mark.parametrize(
    ("batch", "uni"),
    [
        (["a", "b" * 250, "k:1"], False),  # str keys, the shortest and the longest
        (["caf\u00e9", "k"], True),  # UTF-8
        ([b"a", b"\x80" * 250], False),  # bytes keys, the longest
    ],
)
def test_check_keys_takes_an_ordinary_batch_without_checking_key_by_key(
    batch: list[Any], uni: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not a result (key by key gives the same) but the point of check_keys: a batch of plain
    # keys is encoded and checked in one pass, never one check_key call per key.
    import clientlib.keys as keys_module

    def refuse(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("check_key called for an ordinary batch")

    expected = checked_one_by_one(batch, b"", uni, "ascii")
    monkeypatch.setattr(keys_module, "check_key", refuse)
    assert check_keys(batch, prefix=b"", allow_unicode_keys=uni) == expected


@pytest.mark.parametrize(
    ("batch", "prefix", "words"),
    [
        (["ok", "bad key", "also bad\n"], b"", "whitespace 0x20"),  # the first bad key is named
        (["ok", "bad key"], b"", "whitespace 0x20"),
        ([b"ok", b"tab\tkey"], b"", "whitespace 0x09"),
        (["ok", ""], b"", "empty"),
        (["ok", "k" * 249], b"p:", "too long"),  # 251 bytes with the prefix
        ([b"ok", b"a\x7f"], b"", "control byte 0x7f"),
        (["ok", "caf\u00e9"], b"", "Non-ASCII"),
        (["ok", 5], b"", "must be bytes or str"),
    ],
)
def test_check_keys_refuses_the_first_bad_key(batch: list[Any], prefix: bytes, words: str) -> None:
    with pytest.raises(MemcacheIllegalInputError, match=words):
        check_keys(batch, prefix=prefix, allow_unicode_keys=False)


def pymemcache_check(key: Any, prefix: bytes, uni: bool) -> bytes | None:
    """pymemcache's key check: the key it would send, or None when it refuses the key."""
    try:
        return check_key_helper(key, allow_unicode_keys=uni, key_prefix=prefix)
    except (PmIllegalInputError, UnicodeEncodeError, TypeError):
        return None


@given(keys, prefixes, st.booleans())
def test_never_looser_than_pymemcache_and_same_bytes_when_both_accept(
    key: bytes | str, prefix: bytes, uni: bool
) -> None:
    theirs = pymemcache_check(key, prefix, uni)
    try:
        ours: bytes | None = ck(key, prefix=prefix, allow_unicode_keys=uni)
    except MemcacheIllegalInputError:
        ours = None
    if theirs is None:
        assert ours is None
    elif ours is not None:
        assert ours == theirs
    else:
        # We reject, pymemcache accepts: only keys the stated rule forbids.
        assert not spec_valid(theirs)


@pytest.mark.parametrize("key", [b"", b"a\x01b", b"\x7f", b"a\x1fb", b" ", b"\t\n "])
def test_documented_differences_from_pymemcache(key: bytes) -> None:
    assert pymemcache_check(key, b"", False) == key
    with pytest.raises(MemcacheIllegalInputError):
        ck(key)


@pytest.mark.parametrize("key", [1, None])
def test_pymemcache_raises_type_error_where_we_raise_illegal_input(key: Any) -> None:
    with pytest.raises(TypeError):
        check_key_helper(key, allow_unicode_keys=False, key_prefix=b"")
    with pytest.raises(MemcacheIllegalInputError):
        ck(key)


# --- check_int ---------------------------------------------------------------------------------


class Seconds(enum.IntEnum):
    MINUTE = 60


@pytest.mark.parametrize("value", [0, 1, -1, 2**31, -(2**31), 10**30])
def test_check_int_returns_ints_unchanged(value: int) -> None:
    assert check_int(value, "expire") == value
    assert type(check_int(value, "expire")) is int


def test_check_int_normalizes_int_subclasses_to_plain_int() -> None:
    got = check_int(Seconds.MINUTE, "expire")
    assert got == 60
    assert type(got) is int
    assert str(got) == "60"


@pytest.mark.parametrize("value", [True, False, "1", b"1", 1.0, 1.5, None, [1], 1j])
def test_check_int_rejects_non_ints_and_bool(value: Any) -> None:
    expected = re.escape(f"delay must be integer, got bad value: {value!r}")
    with pytest.raises(MemcacheIllegalInputError, match=expected):
        check_int(value, "delay")


def test_check_int_rejects_the_same_non_bools_as_pymemcache() -> None:
    for value in ["1", b"1", 1.0, None]:
        with pytest.raises(PmIllegalInputError):
            PmClient._check_integer(PM, value, "delay")  # type: ignore[arg-type]
        with pytest.raises(MemcacheIllegalInputError):
            check_int(value, "delay")
    # bool: pymemcache lets it through as the token b"True"; we do not.
    assert PmClient._check_integer(PM, True, "delay") == b"True"  # type: ignore[arg-type]


def test_check_int_range_bounds_are_inclusive() -> None:
    assert check_int(0, "delta", minimum=0) == 0
    assert check_int(2**64 - 1, "delta", minimum=0, maximum=2**64 - 1) == 2**64 - 1
    with pytest.raises(MemcacheIllegalInputError, match="delta must be >= 0, got -1"):
        check_int(-1, "delta", minimum=0)
    with pytest.raises(MemcacheIllegalInputError, match="delta must be <= 10, got 11"):
        check_int(11, "delta", maximum=10)


def test_check_int_huge_value_gives_a_readable_error() -> None:
    # str() of this int would itself raise ValueError (int/str digit limit).
    with pytest.raises(MemcacheIllegalInputError, match="bits"):
        check_int(10**10000, "delta", maximum=2**64 - 1)


@given(st.integers())
def test_check_int_accepts_every_int(value: int) -> None:
    assert check_int(value, "n") == value


# --- check_cas ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cas", "expected"),
    [
        (0, 0),
        (12345, 12345),
        (MAX_CAS, 2**64 - 1),
        (b"0", 0),
        (b"12345", 12345),
        ("12345", 12345),
        ("000123", 123),
        (b"0" * 100 + b"7", 7),
        (str(MAX_CAS), MAX_CAS),
    ],
)
def test_check_cas_accepts_digits(cas: Any, expected: int) -> None:
    got = check_cas(cas)
    assert got == expected
    assert type(got) is int


@pytest.mark.parametrize(
    "cas",
    [
        -1,
        True,
        False,
        1.0,
        None,
        [1],
        b"",
        "",
        b"-1",
        b"+1",
        b" 1",
        b"1 ",
        b"1\n",
        b"12a",
        b"0x10",
        "1_000",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
        "\uff11",  # FULLWIDTH DIGIT ONE
        "\u00b2",  # SUPERSCRIPT TWO
        bytearray(b"1"),
    ],
)
def test_check_cas_rejects_non_digits(cas: Any) -> None:
    with pytest.raises(MemcacheIllegalInputError, match="cas must"):
        check_cas(cas)


@pytest.mark.parametrize(
    "cas",
    [2**64, str(2**64), b"9" * 21, b"9" * 100_000, 10**10000],
    ids=["int-2**64", "str-2**64", "21-digits", "100k-digits", "int-10**10000"],
)
def test_check_cas_rejects_values_past_64_bits(cas: Any) -> None:
    with pytest.raises(MemcacheIllegalInputError, match="at most"):
        check_cas(cas)


cas_inputs = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.binary(max_size=25)
    | st.text(max_size=25)
    | st.text(alphabet="0123456789", max_size=25)
    | st.text(alphabet="0123456789", max_size=25).map(str.encode)
)


@given(cas_inputs)
def test_check_cas_never_looser_than_pymemcache(cas: Any) -> None:
    try:
        theirs: bytes | None = PmClient._check_cas(PM, cas)  # type: ignore[arg-type]
    except PmIllegalInputError:
        theirs = None
    try:
        ours: int | None = check_cas(cas)
    except MemcacheIllegalInputError:
        ours = None
    if theirs is None:
        assert ours is None
    elif ours is None:
        assert int(theirs) > MAX_CAS  # the one documented extra rule
    else:
        assert ours == int(theirs)


def test_check_int_shows_numbers_of_up_to_256_bits_in_digits_and_longer_ones_by_size() -> None:
    top = 2**256 - 1  # 256 bits: still written out
    with pytest.raises(MemcacheIllegalInputError) as info:
        check_int(top, "delta", maximum=2**64 - 1)
    assert str(info.value) == f"delta must be <= {2**64 - 1}, got {top}"
    with pytest.raises(MemcacheIllegalInputError) as info:
        check_int(-top, "delta", minimum=0)
    assert str(info.value) == f"delta must be >= 0, got -{top}"
    with pytest.raises(MemcacheIllegalInputError) as info:
        check_int(2**256, "delta", maximum=2**64 - 1)
    assert str(info.value) == f"delta must be <= {2**64 - 1}, got an integer of 257 bits"


# Found by review: the bytes path once joined any buffer (b" ".join takes array.array's too).
@pytest.mark.parametrize("odd", [array.array("B", b"ab"), array.array("H", [0x4141])], ids=["array B", "array H"])
def test_check_keys_refuses_a_buffer_that_check_key_refuses(odd: Any) -> None:
    batch = [b"first", odd]
    expected = checked_one_by_one(batch, b"", False, "ascii")
    assert isinstance(expected, str) and "Key must be bytes or str, got array" in expected
    try:
        got: list[bytes] | str = check_keys(batch, prefix=b"", allow_unicode_keys=False)
    except MemcacheIllegalInputError as exc:
        got = str(exc)
    assert got == expected
