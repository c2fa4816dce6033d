"""Herd-safe get_or_set on memcached's meta flags, sans-I/O: the steps, not the sockets.

Among all callers of all hosts, only one computes a value that is missing, stale or due for
recache; the others get the stale value, or wait a bounded time for the fresh one. The
vocabulary is meta-memcache-py's (lease, stale-while-revalidate, recache policy); the mechanism
is memcached's (protocol.txt, "Meta Get"):

- `mg <key> v f c s N<lease_ttl> [R<recache_ttl>]`. On a miss, N creates an empty item that lives
  `lease_ttl` seconds and answers its first caller W (won: it must compute and fill the key);
  later callers get the empty item with Z (taken). R: a hit whose remaining TTL is under
  `recache_ttl` answers one caller W and the rest Z, with the value, which they use.
- A key marked stale (`Client.invalidate`, meta `md <key> I T<ttl>`) answers X (stale) with its
  old value: one caller W, the rest Z; everyone but the winner uses the stale value. memcached
  hands that W to the first `mg` of the key of any kind, plain `get` included (seen on 1.6.18):
  if a plain get takes it, nobody recomputes and get_or_set serves the stale value until the
  stale TTL lapses; the next get_or_set after that recomputes. Keep the stale TTL short, or read
  invalidated keys with get_or_set only.
- The winner fills the key with `cas` against the cas its lease came with: if anyone stored the
  key since, its value stays and the winner's is only returned to its own caller.

Bounds: a caller that finds the key taken and empty polls (first after `poll` seconds, doubling,
at most `MAX_POLL`) until the value arrives or `wait` seconds have passed; then it computes the
value itself and returns it without storing (the winner's fill stays authoritative). A winner
whose `fn` (or fill) raises deletes its empty placeholder, so the next caller wins at once rather
than everyone waiting `wait` seconds until `lease_ttl` lapses, and its error propagates; a winner
that dies without a word leaves the lease to lapse after `lease_ttl`.
While a value is being computed, a plain `get` of the key is a miss (the broker reads memcached's
empty placeholder, flagged Z, as one: broker/translate.py). Ambiguity: an empty value (b"" with
client flags 0, as `set(key, b"")` stores it) due for recache while another caller refreshes it
looks exactly like that placeholder, so it reads as pending (get_or_set) or as a miss (get); do not
store b"" under keys read with get_or_set.

`steps()` yields what to do (`LeaseGet`, `Compute`, `Fill`, `Release`, `Sleep`) and is sent each
one's outcome (or thrown its exception); Client and AsyncClient drive it, each with its own I/O,
sleep and way of calling `fn` (AsyncClient awaits what `fn` returns when it is awaitable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Union

from .wire import LEASE_STALE, LEASE_TAKEN, LEASE_WON

__all__ = [
    "LeaseGet", "Compute", "Fill", "Release", "Sleep", "Step", "steps", "MAX_POLL", "DEFAULT_LEASE_TTL", "DEFAULT_WAIT",
]

DEFAULT_LEASE_TTL = 30  # seconds a winner has to fill a missing key
DEFAULT_WAIT = 3.0  # seconds a caller waits for another's computation before computing itself
DEFAULT_POLL = 0.01  # seconds before the first poll of a key another caller is computing
MAX_POLL = 0.2


@dataclass(frozen=True, slots=True)
class LeaseGet:
    """Read the key with a lease; send back `(value, client_flags, cas, lease_bits)`, or None
    when the read failed and the caller ignores errors."""


@dataclass(frozen=True, slots=True)
class Compute:
    """Call `fn` (awaiting it, for AsyncClient, if it returns an awaitable); send back its value,
    or throw its exception in."""


@dataclass(frozen=True, slots=True)
class Fill:
    """Store `value` if the key's cas is still `cas` (the lease's); the outcome is not needed."""

    value: Any
    cas: int


@dataclass(frozen=True, slots=True)
class Release:
    """Delete the key: the winner's computation or fill failed, and its empty placeholder must not
    keep the other callers waiting until lease_ttl lapses."""


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step = Union[LeaseGet, Compute, Fill, Release, Sleep]
Lease = tuple[Any, int, int, int]  # decoded value, client flags, cas, lease bits


def is_pending(lease: Lease) -> bool:
    """Another caller holds the lease on a key that has no value yet."""
    value, flags, _, bits = lease
    return bool(bits & LEASE_TAKEN) and not bits & LEASE_STALE and flags == 0 and value == b""


def steps(*, wait: float, poll: float, clock: Callable[[], float]) -> Generator[Step, Any, Any]:
    """The herd-safe get_or_set as a sequence of steps; returns the value for the caller. The
    driver throws a step's exception back in; what the steps do not handle propagates."""
    deadline = clock() + wait
    delay = poll
    while True:
        lease: Lease | None = yield LeaseGet()
        if lease is None:
            return (yield Compute())  # the read failed and errors are ignored: store nothing
        value, flags, cas, bits = lease
        if bits & LEASE_WON:
            placeholder = value == b"" and flags == 0 and not bits & LEASE_STALE
            try:
                fresh = yield Compute()
                yield Fill(fresh, cas)
            except BaseException:
                if placeholder:
                    try:
                        yield Release()
                    except Exception:  # noqa: BLE001 - best effort: the lease lapses anyway
                        pass
                raise
            return fresh
        if not is_pending(lease):
            return value  # fresh; or stale / due for recache while another caller refreshes it
        left = deadline - clock()
        if left <= 0:
            return (yield Compute())
        yield Sleep(min(delay, left))
        delay = min(delay * 2, MAX_POLL)
