"""clientlib/limits.py: memcached's item size rule, checked against boundaries measured on
memcached 1.6.18 (the largest value a text-protocol `set` stored, found by bisection, with the
test harness's `-I 2m`, and with `-C` for no CAS; 2026-11-30):

    item_size_max   key bytes  client flags  cas   largest value stored
    2097152         1          0             yes   2097092
    2097152         1          5             yes   2097088
    2097152         200        0             yes   2096893
    2097152         1          0             no    2097100
    2097152         1          5             no    2097096
    2097152         200        0             no    2096901
"""

from __future__ import annotations

import pytest

from clientlib.limits import DEFAULT_ITEM_SIZE_MAX, TOO_LARGE, item_fits, item_size

pytestmark = pytest.mark.unit

MEASURED = [
    (2097152, 1, 0, True, 2097092),
    (2097152, 1, 5, True, 2097088),
    (2097152, 200, 0, True, 2096893),
    (2097152, 1, 0, False, 2097100),
    (2097152, 1, 5, False, 2097096),
    (2097152, 200, 0, False, 2096901),
]


@pytest.mark.parametrize("limit, key_len, flags, cas, largest", MEASURED)
def test_the_largest_value_memcached_stored_fits_and_one_byte_more_does_not(
    limit: int, key_len: int, flags: int, cas: bool, largest: int
) -> None:
    assert item_fits(key_len, largest, flags, item_size_max=limit, cas_enabled=cas)
    assert not item_fits(key_len, largest + 1, flags, item_size_max=limit, cas_enabled=cas)
    # The item is exactly the limit at the boundary: header, key, flags, value, CRLF, CAS all counted.
    assert item_size(key_len, largest, flags, cas) == limit


def test_the_default_limit_is_memcacheds_one_mebibyte() -> None:
    assert DEFAULT_ITEM_SIZE_MAX == 1048576
    # memcached's default -I 1m: the same overhead as above (60 bytes for a 1-byte key, flags 0).
    assert item_fits(1, 1048576 - 60)
    assert not item_fits(1, 1048576 - 59)


def test_any_nonzero_flags_cost_four_bytes_and_their_value_does_not_matter() -> None:
    for flags in (1, 5, 1 << 31, (1 << 32) - 1):
        assert item_size(10, 100, flags) == item_size(10, 100, 0) + 4


def test_each_key_or_value_byte_costs_one() -> None:
    assert item_size(11, 100) == item_size(10, 100) + 1
    assert item_size(10, 101) == item_size(10, 100) + 1


def test_too_large_is_memcacheds_message() -> None:
    # memcached's text protocol: "SERVER_ERROR object too large for cache"
    assert TOO_LARGE == "object too large for cache"


def test_by_default_no_flags_and_cas_on() -> None:
    # 48-byte header + key and its NUL + value and CRLF + 8 bytes of CAS (memcached's defaults)
    assert item_size(1, 100) == 48 + 2 + 102 + 8
    assert item_fits(1, 2097092, item_size_max=2097152) and not item_fits(1, 2097093, item_size_max=2097152)
