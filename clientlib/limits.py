"""memcached's item size limit, as memcached 1.6 computes it.

memcached refuses a value whose whole item does not fit `item_size_max` (`-I`, default 1 MiB,
reported by `stats settings`). The item is a 48-byte header (64-bit builds), the key and its NUL,
4 bytes of client flags when they are not 0, the value with its CRLF, and 8 bytes of CAS unless
memcached runs with `-C` (`cas_enabled no`). Measured against memcached 1.6.18 at the boundary for
`-I 1m`, `-I 2m`, `-C`, short and 200-byte keys, flags 0 and 5 (tests/integration/
test_outside_reports.py and test_item_size_mock_parity.py check it against a live server).

Shared by the broker (which refuses add/replace/append/prepend/cas values that cannot fit, because
memcached's meta `ms` unlinks the stored item on a too-large value in every mode, while the text
protocol does that for `set` only) and by `MockClient` (which must say what production says).
"""

from __future__ import annotations

DEFAULT_ITEM_SIZE_MAX = 1 << 20
ITEM_HEADER_BYTES = 48
CAS_BYTES = 8
CLIENT_FLAGS_BYTES = 4

TOO_LARGE = "object too large for cache"


def item_size(key_len: int, value_len: int, client_flags: int = 0, cas_enabled: bool = True) -> int:
    """Bytes memcached needs for one item: key of `key_len` bytes (raw, not base64), value of
    `value_len` bytes."""
    return (
        ITEM_HEADER_BYTES
        + key_len + 1
        + (CLIENT_FLAGS_BYTES if client_flags else 0)
        + value_len + 2
        + (CAS_BYTES if cas_enabled else 0)
    )


def item_fits(
    key_len: int, value_len: int, client_flags: int = 0, *,
    item_size_max: int = DEFAULT_ITEM_SIZE_MAX, cas_enabled: bool = True,
) -> bool:
    """True when memcached with these settings would store such an item (size-wise)."""
    return item_size(key_len, value_len, client_flags, cas_enabled) <= item_size_max
