"""How tests check time on a shared, loaded 2-core machine (issue 14).

No test asserts how fast something is: throughput and latency belong to bench/. The only timed
assertions are deadlines, each checked against the configured timeout with a stated tolerance:

- "answered at its deadline":  deadline - EARLY <= elapsed <= deadline + LATE
- "failed fast, without waiting for its deadline": with the call's timeout set to FAST_DEADLINE,
  elapsed <= FAST_DEADLINE - LATE (a call that waited out its deadline cannot pass).

LATE is how late a loaded machine may run anything: another test suite beside this one can keep a
process off the CPU for a second. A failure within LATE is the machine, past it the code.
"""

from __future__ import annotations

LATE = 1.5
# Early: the broker measures a deadline from when it read the frame, a little after the call began.
EARLY = 0.05
FAST_DEADLINE = 5.0
FAST = FAST_DEADLINE - LATE


def at_deadline(elapsed: float, deadline: float) -> bool:
    """Answered at its deadline: not (much) before it, and at most LATE after it."""
    return deadline - EARLY <= elapsed <= deadline + LATE


def within(elapsed: float, deadline: float) -> bool:
    """Answered by its deadline, allowing LATE for a loaded machine."""
    return elapsed <= deadline + LATE
