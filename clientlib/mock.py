"""`MockClient`: clientlib's `Client` API over an in-process memory store, for tests of code that
uses clientlib (the counterpart of pymemcache's `pymemcache.test.utils.MockMemcacheClient`).

Faithful by construction: `MockClient` *is* a `Client` whose transport is replaced. Every call goes
through the same argument checks (clientlib.keys), the same serde handling and the same frame
building as the real client; the frame is then decoded with the broker's own schema check
(`wire.decode_request`) and executed here against memcached's semantics, and the results go back
through the same translation into return values and exceptions. So a test written against the mock
sees what it would see through a broker: same keys accepted and rejected, same return values.

memcached semantics kept: expiry (relative seconds, absolute Unix times past 30 days, negative =
already expired), cas uniques, add/replace/append/prepend rules (append and prepend keep the item's
flags and TTL), incr/decr on decimal text (64-bit wrap on incr, floor at 0 on decr, the result
padded with spaces when it is shorter than the old value, as memcached rewrites in place), touch,
gat/gats, flush_all with a delay, and the item size limit. Not kept: memory limits and eviction
(`cache_memlimit` is recorded, nothing is evicted), and stats beyond a few counters.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import limits, wire
from .client import Client
from .commands import Commands
from .errors import error_for
from .transport import build_frames
from .wire import Code, Op

__all__ = ["MockClient", "MOCK_SERVER", "MOCK_VERSION"]

MOCK_SERVER = "mock"
MOCK_VERSION = "1.6.18-mock"

# memcached reads a TTL above 30 days as an absolute Unix time.
_RELATIVE_TTL_LIMIT = 60 * 60 * 24 * 30
_U64 = (1 << 64) - 1
# What memcached's strtoull-based check accepts as a number: optional blanks and sign, digits,
# then a blank or the end of the value.
_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)(?:[ \t\n\v\f\r]|\Z)")

_OK = [Code.OK]
_MISS = [Code.MISS]
_NOT_STORED = [Code.NOT_STORED]
_NOT_FOUND = [Code.NOT_FOUND]
_EXISTS = [Code.EXISTS]


@dataclass(slots=True)
class _Item:
    value: bytes
    flags: int
    exptime: float  # absolute (clock) time, 0 = never
    cas: int
    stored_at: float
    won: bool = False  # a lease (W) was handed out for it and no store has come since
    stale: bool = False  # marked stale by INVALIDATE (meta `md I`)


class _Memory:
    """One emulated memcached server: wire ops in, wire results out. Not thread-safe by itself."""

    def __init__(self, clock: Callable[[], float], item_size_max: int, cas_enabled: bool) -> None:
        self.clock = clock
        self.item_size_max = item_size_max
        self.cas_enabled = cas_enabled
        self.items: dict[bytes, _Item] = {}
        self.cas_counter = 0
        self.flush_at: float | None = None
        self.memlimit_mb = 64
        self.started = clock()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "cmd_get", "cmd_set", "cmd_touch", "cmd_flush", "get_hits", "get_misses", "delete_hits",
                "delete_misses", "incr_hits", "incr_misses", "decr_hits", "decr_misses", "cas_hits",
                "cas_misses", "cas_badval", "touch_hits", "touch_misses", "total_items",
            ),
            0,
        )

    # --- items ---------------------------------------------------------------------------------

    def _exptime(self, ttl: int, now: float) -> float:
        if ttl == 0:
            return 0.0
        if ttl < 0:
            return -1.0  # already expired; nonzero so it reads as "has an expiry"
        if ttl > _RELATIVE_TTL_LIMIT:
            return float(ttl)
        return now + ttl

    def _live(self, key: bytes, now: float) -> _Item | None:
        item = self.items.get(key)
        if item is None:
            return None
        if item.exptime and item.exptime <= now:
            del self.items[key]
            return None
        return item

    def _fits(self, key: bytes, value_len: int, flags: int) -> bool:
        return limits.item_fits(len(key), value_len, flags, item_size_max=self.item_size_max, cas_enabled=self.cas_enabled)

    def _next_cas(self) -> int:
        if not self.cas_enabled:
            return 0
        self.cas_counter += 1
        return self.cas_counter

    def _store_item(self, key: bytes, value: bytes, flags: int, exptime: float, now: float) -> list[Any]:
        self.items[key] = _Item(value, flags, exptime, self._next_cas(), now)
        self.counters["total_items"] += 1
        return _OK

    # --- ops -----------------------------------------------------------------------------------

    def execute(self, op: list[Any]) -> list[Any]:
        now = self.clock()
        if self.flush_at is not None and now >= self.flush_at:
            # A delayed flush_all invalidates everything stored up to its time.
            self.items.clear()
            self.flush_at = None
        code = op[0]
        if code <= Op.GATS:
            return self._get(code, op, now)
        if code == Op.LEASE_GET:
            return self._lease_get(op[1], op[2], op[3], now)
        if code == Op.INVALIDATE:
            item = self._live(op[1], now)
            if item is None:
                self.counters["delete_misses"] += 1
                return _NOT_FOUND
            # memcached 1.6.18: `md I` bumps the cas (protocol.txt) and counts nothing on a hit.
            item.stale, item.won = True, False
            item.cas = self._next_cas()
            item.exptime = self._exptime(op[2], now)
            return _OK
        if code <= Op.CAS:
            return self._store(code, op, now)
        if code == Op.DELETE:
            found = self._live(op[1], now) is not None
            self.counters["delete_hits" if found else "delete_misses"] += 1
            if found:
                del self.items[op[1]]
                return _OK
            return _NOT_FOUND
        if code == Op.INCR or code == Op.DECR:
            return self._arith(code, op[1], op[2], now)
        if code == Op.TOUCH:
            self.counters["cmd_touch"] += 1
            item = self._live(op[1], now)
            self.counters["touch_hits" if item else "touch_misses"] += 1
            if item is None:
                return _NOT_FOUND
            item.exptime = self._exptime(op[2], now)
            return _OK
        return self._server_wide(code, op, now)

    def _get(self, code: int, op: list[Any], now: float) -> list[Any]:
        item = self._live(op[1], now)
        if item is not None and item.won and not item.stale and not item.value and not item.flags:
            item = None  # a lease's placeholder reads as a miss through the broker (translate.py)
        if item is None:
            self.counters["cmd_get"] += 1
            self.counters["get_misses"] += 1
            return _MISS
        if code == Op.GAT or code == Op.GATS:
            # memcached 1.6.18 counts a hit of `mg <key> T<ttl>` as a touch only.
            self.counters["cmd_touch"] += 1
            self.counters["touch_hits"] += 1
            item.exptime = self._exptime(op[2], now)
            # Touching can expire the item (negative TTL): memcached still returns this hit.
        else:
            self.counters["cmd_get"] += 1
            self.counters["get_hits"] += 1
        if code == Op.GETS or code == Op.GATS:
            return [Code.OK, item.value, item.flags, item.cas]
        return [Code.OK, item.value, item.flags]

    def _lease_get(self, key: bytes, lease_ttl: int, recache_ttl: int, now: float) -> list[Any]:
        """memcached's `mg <key> v f c s N<lease_ttl> R<recache_ttl>` (checked against 1.6.18):
        a miss creates an empty item living lease_ttl seconds and wins its caller (W); a stale
        item, or one expiring within recache_ttl seconds, wins its first caller (W) and answers
        the rest Z, as does an item whose lease is out."""
        self.counters["cmd_get"] += 1
        item = self._live(key, now)
        if item is None:
            # memcached 1.6.18 counts the item N creates as a get hit and a stored item.
            self.counters["get_hits"] += 1
            self.counters["total_items"] += 1
            item = self.items[key] = _Item(b"", 0, self._exptime(lease_ttl, now), self._next_cas(), now, won=True)
            return [Code.OK, b"", 0, item.cas, wire.LEASE_WON]
        self.counters["get_hits"] += 1
        bits = wire.LEASE_STALE if item.stale else 0
        due = recache_ttl and item.exptime > 0 and item.exptime - now < recache_ttl
        if item.won:
            bits |= wire.LEASE_TAKEN
        elif item.stale or due:
            item.won = True
            bits |= wire.LEASE_WON
        return [Code.OK, item.value, item.flags, item.cas, bits]

    def _store(self, code: int, op: list[Any], now: float) -> list[Any]:
        self.counters["cmd_set"] += 1
        key, value, flags, ttl = op[1], op[2], op[3], op[4]
        if not self._fits(key, len(value), flags):
            # memcached's text protocol: "SERVER_ERROR object too large for cache" in every mode;
            # a set also unlinks the key's old item (memcached's process_update_command).
            if code == Op.SET:
                self.items.pop(key, None)
            return [Code.SERVER_ERROR, limits.TOO_LARGE]
        item = self._live(key, now)
        exptime = self._exptime(ttl, now)
        if code == Op.SET:
            return self._store_item(key, value, flags, exptime, now)
        if code == Op.ADD:
            return _NOT_STORED if item is not None else self._store_item(key, value, flags, exptime, now)
        if code == Op.REPLACE:
            return _NOT_STORED if item is None else self._store_item(key, value, flags, exptime, now)
        if code == Op.CAS:
            if item is None:
                self.counters["cas_misses"] += 1
                return _NOT_FOUND
            # memcached -C (cas_enabled no) keeps no cas uniques: every item's is 0, and a cas
            # compare never matches.
            if item.cas != op[5] or not self.cas_enabled:
                self.counters["cas_badval"] += 1
                return _EXISTS
            self.counters["cas_hits"] += 1
            return self._store_item(key, value, flags, exptime, now)
        # APPEND / PREPEND: the old item's flags and TTL stay, as in memcached.
        if item is None:
            return _NOT_STORED
        if not self._fits(key, len(item.value) + len(value), item.flags):
            return _NOT_STORED  # memcached cannot allocate the joined item: NOT_STORED, item kept
        joined = item.value + value if code == Op.APPEND else value + item.value
        return self._store_item(key, joined, item.flags, item.exptime, now)

    def _arith(self, code: int, key: bytes, delta: int, now: float) -> list[Any]:
        name = "incr" if code == Op.INCR else "decr"
        item = self._live(key, now)
        if item is None:
            self.counters[name + "_misses"] += 1
            return _NOT_FOUND
        m = _NUMBER.match(item.value)
        number = int(m.group(2)) if m else -1
        if m is not None and m.group(1) == b"-" and number <= _U64:
            # strtoull negates "-N" modulo 2**64; memcached refuses it only if negative as an int64.
            number = -number & _U64
            if number >> 63:
                number = -1
        if m is None or number > _U64 or number < 0:
            return [Code.CLIENT_ERROR, "CLIENT_ERROR cannot increment or decrement non-numeric value"]
        self.counters[name + "_hits"] += 1
        if code == Op.INCR:
            number = (number + delta) & _U64
        else:
            number = max(number - delta, 0)
        text = b"%d" % number
        if len(text) <= len(item.value):
            # memcached rewrites the value in place and pads the rest with spaces.
            item.value = text.ljust(len(item.value))
            item.cas = self._next_cas()
        else:
            self.items[key] = _Item(text, item.flags, item.exptime, self._next_cas(), now)
            self.counters["total_items"] += 1  # a new, longer item replaces the old one
        return [Code.OK, number]

    def _server_wide(self, code: int, op: list[Any], now: float) -> list[Any]:
        if code == Op.VERSION:
            return [Code.OK, {MOCK_SERVER: MOCK_VERSION}]
        if code == Op.STATS:
            return [Code.OK, {MOCK_SERVER: self._stats(op[1], now)}]
        if code == Op.FLUSH_ALL:
            self.counters["cmd_flush"] += 1
            if op[1] > 0:
                self.flush_at = now + op[1]
            else:
                self.items.clear()
                self.flush_at = None
            return [Code.OK, {MOCK_SERVER: True}]
        if code == Op.CACHE_MEMLIMIT:
            self.memlimit_mb = op[1]
            return [Code.OK, {MOCK_SERVER: True}]
        if code == Op.PING:
            return [Code.OK, "PONG"]
        if code == Op.BROKER_STATS:
            return [Code.OK, {"mock": True, "items": len(self.items)}]
        return [Code.BAD_REQUEST, f"unknown op {code}"]

    def _stats(self, args: list[bytes], now: float) -> dict[str, str]:
        if not args:
            live = [k for k in list(self.items) if self._live(k, now) is not None]
            stats = {
                "pid": str(os.getpid()),
                "uptime": str(int(now - self.started)),
                "time": str(int(time.time())),
                "version": MOCK_VERSION,
                "curr_items": str(len(live)),
                "bytes": str(sum(len(self.items[k].value) for k in live)),
                "limit_maxbytes": str(self.memlimit_mb * 1024 * 1024),
                "evictions": "0",
            }
            stats.update((name, str(value)) for name, value in self.counters.items())
            return stats
        if args == [b"settings"]:
            return {
                "maxbytes": str(self.memlimit_mb * 1024 * 1024),
                "item_size_max": str(self.item_size_max),
                "cas_enabled": "yes" if self.cas_enabled else "no",
                "evictions": "on",
            }
        return {}


class _MemoryTransport:
    """The transport of a MockClient: the same frames as the real one (transport.build_frames),
    decoded with the broker's own schema check, executed against `_Memory`."""

    def __init__(self, memory: _Memory) -> None:
        self.memory = memory
        self.lock = threading.Lock()
        self._ids = itertools.count()

    def request1(self, op: list[Any], timeout_ms: int, timeout: float) -> list[Any]:
        return self.request([op], timeout_ms, timeout) or []

    def request(
        self, ops: list[list[Any]], timeout_ms: int, timeout: float, *, noreply: bool = False,
        max_frame_bytes: int = 1 << 30,
    ) -> list[list[Any]] | None:
        flags = wire.NOREPLY if noreply else 0
        results: list[list[Any]] = []
        with self.lock:
            for _, data, _ in build_frames(ops, timeout_ms, flags, max_frame_bytes, self._ids.__next__):
                try:
                    request = wire.decode_request(data, max_frame=max_frame_bytes)
                except wire.WireError as exc:
                    raise error_for(exc.code, str(exc)) from None
                answers = [self.memory.execute(op) for op in request.each_op()]
                if request.many:
                    # As the broker answers a GET_MANY: a hit with client flags 0 is its value alone.
                    answers = [r[1] if r[0] == Code.OK and r[2] == 0 else r for r in answers]
                results.extend(answers)
        return None if noreply else results

    def close(self) -> None:
        """Nothing to close."""


class MockClient(Client):
    """A `Client` backed by an in-memory store instead of a broker.

    Takes the Client's keyword arguments (serde, key_prefix, allow_unicode_keys, default_noreply,
    ignore_exc, encoding, timeout, ...) with the same meaning. `server` is accepted and ignored,
    as pymemcache's mock does. `clock` (seconds, like time.time) lets tests drive expiry without
    sleeping. `item_size_max` (bytes, memcached's `-I`, default 1 MiB) and `cas_enabled` (False
    for memcached's `-C`) set memcached 1.6's item size rule (clientlib.limits): a value whose
    item does not fit fails with MemcacheServerError("object too large for cache") in every store
    mode, and a failed `set` also deletes the key's old value, as memcached does; an append or
    prepend whose joined value would not fit returns False (NOT_STORED).
    """

    def __init__(
        self,
        server: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        item_size_max: int = limits.DEFAULT_ITEM_SIZE_MAX,
        cas_enabled: bool = True,
        **kwargs: Any,
    ) -> None:
        # Skips Client.__init__ on purpose: no broker address, no ZeroMQ transport.
        Commands.__init__(self, **kwargs)
        self.broker_url = "mock"
        self.server = server
        self._memory = _Memory(clock, item_size_max, cas_enabled)
        self._memory_transport = _MemoryTransport(self._memory)
        self._transport = self._memory_transport

    def clear(self) -> None:
        """Forget every item (pymemcache's mock has the same helper)."""
        with self._memory_transport.lock:
            self._memory.items.clear()
            self._memory.flush_at = None

    def disconnect_all(self) -> None:
        """Nothing to disconnect."""

    def quit(self) -> None:
        """Nothing to disconnect."""
