"""The broker's fast encoders must produce exactly what the general encoder produces."""

import pytest
from hypothesis import given, strategies as st

from broker.meta import Get, RequestError, Set, encode, encode_get, encode_gets, encode_set, needs_encoding

pytestmark = pytest.mark.unit

keys = st.binary(min_size=0, max_size=260)
opaques = st.integers(min_value=-2, max_value=2**40)


def _same(fast, slow):
    try:
        expected = slow()
    except RequestError:
        with pytest.raises(RequestError):
            fast()
        return
    assert fast() == expected


def test_fast_get_bytes():
    # The broker's gets ask for s, the value's size, to check it against the VA header.
    assert encode_get(b"foo", 7) == b"mg foo v f s O7\r\n"
    assert encode_get(b"foo", 7, cas=True) == b"mg foo v f c s O7\r\n"
    assert encode_get(b"foo bar", 7) == b"mg Zm9vIGJhcg== b v f s O7\r\n"  # the general encoder's way
    assert encode_set(b"foo", b"bar", 9, 0, 0) == b"ms foo 3 O9\r\nbar\r\n"


@given(keys, opaques, st.booleans())
def test_fast_get_equals_encode(key, opaque, cas):
    _same(lambda: encode_get(key, opaque, cas), lambda: encode(Get(key, opaque, cas=cas, size=True)))


def test_get_asks_for_size_only_when_told():
    # Get's size flag defaults off; its place in the request is after c (v f c s t k ...).
    assert encode(Get(b"foo", opaque=7)) == b"mg foo v f O7\r\n"
    assert encode(Get(b"foo", opaque=7, size=True)) == b"mg foo v f s O7\r\n"
    assert encode(Get(b"foo", opaque=7, cas=True, size=True, ttl=True)) == b"mg foo v f c s t O7\r\n"


@given(keys, st.binary(max_size=64), opaques, st.integers(-5, 2**33), st.integers(-(2**32), 2**33))
def test_fast_set_equals_encode(key, value, opaque, flags, ttl):
    _same(
        lambda: encode_set(key, value, opaque, flags, ttl),
        lambda: encode(Set(key, value, opaque, client_flags=flags, ttl=ttl)),
    )


def test_unknown_stats_group_is_refused_before_it_can_reset_a_connection():
    from broker.meta import Stats

    assert encode(Stats((b"slabs",))) == b"stats slabs\r\n"
    with pytest.raises(RequestError, match="unknown stats group"):
        encode(Stats((b"slabz",)))


def test_encode_gets_is_encode_get_of_each_key_in_turn() -> None:
    keys = [b"a", b"key:1", b"k" * 250]
    assert encode_gets(keys, 41) == b"".join(encode_get(k, o) for o, k in zip(range(41, 44), keys))
    assert encode_gets(keys, 41) == b"mg a v f s O41\r\nmg key:1 v f s O42\r\nmg " + b"k" * 250 + b" v f s O43\r\n"


@pytest.mark.parametrize(
    "keys, needs",
    [
        ([b"a", b"b"], False),
        ([b"a", b"b c"], True),  # a space: base64
        ([b"a", b"b\x7f"], True),
        ([b"a", b""], True),
        ([b"a", b"k" * 251], True),
        ([b"\xff\xfe", b"A"], False),  # high bytes go as they are
    ],
)
def test_needs_encoding_finds_any_key_that_cannot_go_as_it_is(keys: list[bytes], needs: bool) -> None:
    assert needs_encoding(keys) is needs
