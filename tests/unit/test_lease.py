"""clientlib/lease.py: herd-safe get_or_set as steps, driven here by hand.

What the steps must do, from memcached's meta flags (protocol.txt, "Meta Get"; checked against
memcached 1.6.18): W (won) -> compute, fill with the lease's cas, return the fresh value;
a value that is fresh, stale (X) or due for recache with another caller refreshing it (Z) ->
return it; an empty placeholder another caller holds (Z, b"", flags 0) -> poll, doubling the
delay up to MAX_POLL, until a value arrives or `wait` seconds pass, then compute without storing.
"""

from __future__ import annotations

from typing import Any

import pytest

from clientlib.lease import MAX_POLL, Compute, Fill, LeaseGet, Release, Sleep, is_pending, steps
from clientlib.wire import LEASE_STALE, LEASE_TAKEN, LEASE_WON

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def drive(answers: list[Any], *, wait: float = 1.0, poll: float = 0.01, fn: Any = None,
          fail: type[BaseException] | None = None) -> tuple[list[Any], Any, int]:
    """Run the steps as a driver does: each LeaseGet is answered from `answers` in turn; Compute
    calls `fn` (default: returns b"computed"); Sleep advances the clock; `fail` is thrown in at the
    Fill. Returns (the steps taken, the result, how many times fn ran)."""
    clock = Clock()
    calls = []

    def computed() -> bytes:
        return b"computed"

    run = steps(wait=wait, poll=poll, clock=clock)
    taken: list[Any] = []
    try:
        step = next(run)
        while True:
            taken.append(step)
            outcome = None
            try:
                if isinstance(step, LeaseGet):
                    outcome = answers.pop(0)
                elif isinstance(step, Compute):
                    calls.append(clock.t)
                    outcome = (fn or computed)()
                elif isinstance(step, Fill) and fail is not None:
                    raise fail("fill failed")
                elif isinstance(step, Sleep):
                    clock.t += step.seconds
            except Exception as exc:
                step = run.throw(exc)
                continue
            step = run.send(outcome)
    except StopIteration as stop:
        return taken, stop.value, len(calls)


PENDING = (b"", 0, 7, LEASE_TAKEN)


def test_the_winner_computes_fills_with_its_lease_cas_and_returns_the_value() -> None:
    taken, value, calls = drive([(b"", 0, 41, LEASE_WON)])
    assert taken == [LeaseGet(), Compute(), Fill(b"computed", 41)]
    assert value == b"computed" and calls == 1


def test_a_fresh_value_is_returned_without_computing() -> None:
    taken, value, calls = drive([(b"cached", 0, 5, 0)])
    assert taken == [LeaseGet()] and value == b"cached" and calls == 0


@pytest.mark.parametrize("bits", [LEASE_STALE | LEASE_TAKEN, LEASE_TAKEN], ids=["stale", "recache"])
def test_a_value_another_caller_is_refreshing_is_returned_as_it_is(bits: int) -> None:
    taken, value, calls = drive([(b"old", 3, 5, bits)])
    assert taken == [LeaseGet()] and value == b"old" and calls == 0


def test_a_stale_value_this_caller_won_is_recomputed() -> None:
    taken, value, calls = drive([(b"old", 0, 9, LEASE_STALE | LEASE_WON)])
    assert taken == [LeaseGet(), Compute(), Fill(b"computed", 9)] and value == b"computed" and calls == 1


def test_a_pending_lease_is_polled_with_doubling_delays_until_the_value_arrives() -> None:
    taken, value, calls = drive([PENDING, PENDING, PENDING, (b"theirs", 0, 8, 0)], poll=0.01)
    assert taken == [LeaseGet(), Sleep(0.01), LeaseGet(), Sleep(0.02), LeaseGet(), Sleep(0.04), LeaseGet()]
    assert value == b"theirs" and calls == 0


def test_polls_never_wait_longer_than_max_poll() -> None:
    taken, _, _ = drive([PENDING] * 8 + [(b"v", 0, 1, 0)], wait=60, poll=0.05)
    sleeps = [s.seconds for s in taken if isinstance(s, Sleep)]
    assert sleeps == [0.05, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2] and MAX_POLL == 0.2


def test_after_waiting_the_bound_the_caller_computes_and_stores_nothing() -> None:
    taken, value, calls = drive([PENDING] * 100, wait=0.5, poll=0.1)
    sleeps = [s.seconds for s in taken if isinstance(s, Sleep)]
    # 0.1 + 0.2 + 0.2 = 0.5: the last sleep is cut to what is left of the bound
    assert sleeps == pytest.approx([0.1, 0.2, 0.2])
    assert sum(sleeps) == pytest.approx(0.5)
    assert not any(isinstance(s, Fill) for s in taken)
    assert value == b"computed" and calls == 1


def test_wait_zero_computes_at_once_when_another_caller_holds_the_lease() -> None:
    taken, value, calls = drive([PENDING], wait=0)
    assert taken == [LeaseGet(), Compute()] and value == b"computed" and calls == 1


def test_a_failed_read_with_errors_ignored_computes_and_stores_nothing() -> None:
    taken, value, calls = drive([None])
    assert taken == [LeaseGet(), Compute()] and value == b"computed" and calls == 1


def test_a_winner_whose_fn_raises_releases_its_placeholder_and_the_error_propagates() -> None:
    def boom() -> bytes:
        raise ZeroDivisionError("db down")

    clock = Clock()
    run = steps(wait=1, poll=0.01, clock=clock)
    assert next(run) == LeaseGet()
    assert run.send((b"", 0, 1, LEASE_WON)) == Compute()
    try:
        boom()
    except ZeroDivisionError as exc:
        assert run.throw(exc) == Release()  # the placeholder goes, so nobody waits for it
    with pytest.raises(ZeroDivisionError):
        run.send(None)


def test_a_winner_whose_fill_fails_releases_its_placeholder() -> None:
    with pytest.raises(RuntimeError, match="fill failed"):
        drive([(b"", 0, 1, LEASE_WON)], fail=RuntimeError)


def test_a_winner_of_a_stale_value_keeps_it_when_fn_raises() -> None:
    # The stale value is what the others are served meanwhile: it is not deleted.
    run = steps(wait=1, poll=0.01, clock=Clock())
    next(run)
    assert run.send((b"old", 0, 1, LEASE_WON | LEASE_STALE)) == Compute()
    with pytest.raises(ZeroDivisionError):
        run.throw(ZeroDivisionError())


def test_a_failed_release_does_not_hide_fns_error() -> None:
    run = steps(wait=1, poll=0.01, clock=Clock())
    next(run)
    run.send((b"", 0, 1, LEASE_WON))
    assert run.throw(ValueError("fn")) == Release()
    with pytest.raises(ValueError, match="fn"):
        run.throw(ConnectionError("delete failed too"))


@pytest.mark.parametrize(
    "lease, pending",
    [
        ((b"", 0, 1, LEASE_TAKEN), True),
        ((b"", 0, 1, LEASE_TAKEN | LEASE_STALE), False),  # a stale empty value is a value
        ((b"", 5, 1, LEASE_TAKEN), False),  # client flags: a stored value, not the placeholder
        ((b"x", 0, 1, LEASE_TAKEN), False),
        ((b"", 0, 1, 0), False),  # nobody holds a lease: an empty stored value
        ((b"", 0, 1, LEASE_WON), False),
    ],
)
def test_only_an_empty_flagless_item_someone_else_won_is_a_lease_in_progress(lease: Any, pending: bool) -> None:
    assert is_pending(lease) is pending


def test_a_recache_window_as_long_as_the_value_lives_is_refused() -> None:
    from clientlib.errors import MemcacheIllegalInputError
    from clientlib.mock import MockClient

    c = MockClient()
    with pytest.raises(MemcacheIllegalInputError, match="recache_ttl"):
        c.get_or_set("k", lambda: b"v", expire=2, recache_ttl=100)
    with pytest.raises(MemcacheIllegalInputError, match="recache_ttl"):
        c.get_or_set("k", lambda: b"v", expire=10, recache_ttl=10)
    assert c.get_or_set("k", lambda: b"v", expire=10, recache_ttl=5) == b"v"
    assert c.get_or_set("k2", lambda: b"v", expire=0, recache_ttl=5) == b"v"  # never expires: never due


@pytest.mark.parametrize("item", [(b"x", 0), (b"", 5)])
def test_a_won_recache_of_a_real_value_is_not_released_when_compute_fails(item: tuple[bytes, int]) -> None:
    # protocol.txt, mg R(token): "if remaining TTL is less than token, win for recache": the winner
    # gets the item's real value with W. Only the empty, flag-0 item memcached vivified (N) is a
    # placeholder to release; releasing a real item would delete a value other readers still use.
    g = steps(wait=1.0, poll=0.1, clock=lambda: 0.0)
    next(g)  # LeaseGet
    value, flags = item
    g.send((value, flags, 7, LEASE_WON))  # -> Compute
    with pytest.raises(RuntimeError, match="boom"):
        g.throw(RuntimeError("boom"))  # no Release step in between: the error goes straight out
