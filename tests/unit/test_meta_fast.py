"""The broker's fast encoders must produce exactly what the general encoder produces."""

import pytest
from hypothesis import given, settings, strategies as st

from broker.meta import Arith, Delete, Get, RequestError, Set, encode, encode_get, encode_gets, encode_set, is_plain_key, needs_encoding

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
    assert encode_gets([b"key:1"], 7) == encode_get(b"key:1", 7) == b"mg key:1 v f s O7\r\n"  # one key: its own path


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=12), min_size=2, max_size=2100),
    st.one_of(st.integers(1, 3000), st.integers(1, 10**19), st.sampled_from([999, 1000, 999_001, 10**6 - 7])),
)
def test_encode_gets_writes_each_opaque_in_decimal_across_every_thousand(keys: list[bytes], first: int) -> None:
    # encode_gets builds the opaques from a high part and three low digits (meta._put_opaques).
    assert encode_gets(keys, first) == b"".join(b"mg %b v f s O%d\r\n" % (k, first + j) for j, k in enumerate(keys))


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


@given(st.lists(st.binary(min_size=0, max_size=252) | st.sampled_from([b"k" * 250, b"k" * 251, b"a\x20b", b"\x7f"]), max_size=12))
def test_needs_encoding_of_a_list_is_whether_any_key_is_not_plain(keys: list[bytes]) -> None:
    # The lot's C-level passes against is_plain_key's regex, key by key.
    assert needs_encoding(keys) is (not all(is_plain_key(k) for k in keys))


# --- issue 14's mutmut survivors: the hot-path encoders' edges ---------------------------------------
# protocol.txt: `ms <key> <datalen> <flags>*`, F(token) client flags, T(token) TTL, O(token)
# opaque (memcached 1.6 takes at most 32 bytes, the leading "O" counted); a key is at most 250 bytes.


@pytest.mark.parametrize(
    ("key", "plain"),
    [(b"a", True), (b"k" * 250, True), (b"\x80\xff", True), (b"", False), (b"k" * 251, False),
     (b"a b", False), (b"a\x7f", False), (b"\x00", False)],
)
def test_is_plain_key_is_a_key_of_1_to_250_bytes_none_a_space_or_control_byte(key: bytes, plain: bool) -> None:
    # protocol.txt "Keys": up to 250 bytes, no control characters or whitespace; else the meta
    # `b` flag (base64) carries it, which is not the plain path.
    assert is_plain_key(key) is plain
    assert needs_encoding([key]) is not plain


@pytest.mark.parametrize(("client_flags", "ttl"), [(1, 0), (0, 1), (0, 30), (5, 30)])
def test_encode_set_carries_nonzero_client_flags_and_ttl(client_flags: int, ttl: int) -> None:
    line, _, data = encode_set(b"k", b"v", 7, client_flags, ttl).partition(b"\r\n")
    tokens = line.split()
    assert tokens[:3] == [b"ms", b"k", b"1"] and data == b"v\r\n"
    assert (b"F%d" % client_flags in tokens) == (client_flags != 0)
    assert (b"T%d" % ttl in tokens) == (ttl != 0)
    assert b"O7" in tokens


def test_an_opaque_of_32_digits_is_refused_and_31_digits_go() -> None:
    biggest = 10**31 - 1  # "O" and 31 digits: the longest opaque token memcached takes
    assert encode_get(b"k", biggest).rstrip(b"\r\n").endswith(b" O%d" % biggest)
    assert encode_set(b"k", b"v", biggest, 0, 0).split(b"\r\n")[0].endswith(b" O%d" % biggest)
    for encode_one in (lambda o: encode_get(b"k", o), lambda o: encode_set(b"k", b"v", o, 0, 0), lambda o: encode(Get(b"k", o))):
        with pytest.raises(RequestError, match="opaque") as info:
            encode_one(10**31)
        assert str(biggest) in str(info.value), "the message states the range"


def test_a_250_byte_key_goes_verbatim_and_251_bytes_are_refused() -> None:
    key = b"k" * 250
    assert encode_get(key, 1) == b"mg " + key + b" v f s O1\r\n"
    assert encode_set(key, b"v", 1, 0, 0) == b"ms " + key + b" 1 O1\r\nv\r\n"
    assert needs_encoding([key]) is False
    with pytest.raises(RequestError, match="250"):
        encode(Get(b"k" * 251, 1))


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (lambda: encode(Get("k", 1)), "str"),  # type: ignore[arg-type]
        (lambda: encode(Get(b"", 1)), "empty"),
        # a key with a space goes base64, which memcached checks against 250: at most 186 raw bytes
        (lambda: encode(Get(b"k" * 249 + b" ", 1)), "186"),
        (lambda: encode(Get(b"k", "1")), "str"),  # type: ignore[arg-type]
        (lambda: encode(Get(b"k", b"has space")), "printable"),
        (lambda: encode(Set(b"k", b"v", 1, client_flags=-3)), "-3"),
        (lambda: encode(Set(b"k", b"v", 1, ttl="soon")), "soon"),  # type: ignore[arg-type]
    ],
)
def test_a_refused_request_says_what_was_wrong(request_: object, says: str) -> None:
    with pytest.raises(RequestError) as info:
        request_()  # type: ignore[operator]
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("request_", "names"),
    [
        (lambda: encode(Get(b"k", 1, touch=1 << 40)), "touch"),
        (lambda: encode(Get(b"k", 1, vivify=1 << 40)), "vivify"),
        (lambda: encode(Get(b"k", 1, recache=1 << 40)), "recache"),
        (lambda: encode(Set(b"k", b"v", 1, client_flags=1 << 40)), "client flags"),
        (lambda: encode(Set(b"k", b"v", 1, ttl=1 << 40)), "ttl"),
        (lambda: encode(Set(b"k", b"v", 1, cas=-1)), "cas"),
        (lambda: encode(Set(b"k", "v", 1)), "str"),  # type: ignore[arg-type]
        (lambda: encode(Set(b"k", b"v", 1, mode="add")), "'add'"),  # type: ignore[arg-type]
        (lambda: encode(Delete(b"k", 1, cas=-1)), "cas"),
        (lambda: encode(Delete(b"k", 1, ttl=1 << 40)), "ttl"),
        (lambda: encode(Arith(b"k", 1, mode="incr")), "'incr'"),  # type: ignore[arg-type]
    ],
)
def test_a_refused_argument_is_named(request_: object, names: str) -> None:
    # The error names the argument as the request's API names it, and the value it got.
    with pytest.raises(RequestError) as info:
        request_()  # type: ignore[operator]
    assert names in str(info.value)
