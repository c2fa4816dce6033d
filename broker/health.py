"""Per-server health: consecutive-failure counting, mark-down, and probe scheduling with backoff.

Pure bookkeeping driven by the caller's clock, so it can be tested without sockets or sleeps.
"""

from __future__ import annotations

import enum
import random


FAST_WINDOW = 10.0


class State(enum.Enum):
    UP = "up"
    DOWN = "down"
    PROBING = "probing"


def backoff(attempt: int, base: float, cap: float, rng: random.Random = random._inst) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so retries never align."""
    step = min(cap, base * (2 ** min(attempt, 30)))
    return step / 2 + rng.random() * step / 2


class Health:
    __slots__ = (
        "state", "failures", "failure_limit", "ejections", "probe_at", "probe_attempt", "up_since", "_base", "_cap",
        "last_error", "down_since", "fast_window",
    )

    def __init__(
        self, failure_limit: int, probe_interval: float, probe_max_interval: float, fast_window: float = FAST_WINDOW,
    ) -> None:
        self.state = State.UP
        self.failures = 0
        self.failure_limit = failure_limit
        self.ejections = 0
        self.probe_at = 0.0
        self.probe_attempt = 0
        self.up_since = 0.0  # when the last probe brought it back
        self._base = probe_interval
        self._cap = probe_max_interval
        self.last_error = ""
        self.down_since = 0.0
        # For this long after a mark-down, failed probes do not back off: most outages are short
        # (a restart, a deploy), and a server must be back in use within about one probe interval
        # of answering again. Only an outage that lasts longer backs off exponentially.
        self.fast_window = fast_window

    def configure(self, failure_limit: int, probe_interval: float, probe_max_interval: float) -> None:
        """A reloaded config's settings; the state and the outage history carry over."""
        self.failure_limit = failure_limit
        self._base = probe_interval
        self._cap = probe_max_interval

    @property
    def is_up(self) -> bool:
        return self.state is State.UP

    def record_success(self) -> None:
        self.failures = 0
        if self.state is not State.UP:
            self.state = State.UP

    def record_failure(self, now: float, reason: str) -> bool:
        """Count a failure; returns True when this failure marks the server down."""
        self.failures += 1
        self.last_error = reason
        if self.state is State.UP and self.failures >= self.failure_limit:
            self.state = State.DOWN
            # Ejected again before it stayed up for the longest probe interval: it is flapping, so
            # the backoff carries on from where the last outage left it instead of starting over.
            if self.ejections and now - self.up_since < self._cap:
                self.probe_attempt += 1
            else:
                self.probe_attempt = 0
            self.ejections += 1
            self.down_since = now
            self.probe_at = now + self._probe_delay(now)
            return True
        return False

    def _probe_delay(self, now: float) -> float:
        # The first fast_window of an outage probes at the base interval whatever the history:
        # a restart loop (memcached restarted again and again) must not push each recovery later.
        # Past it, the backoff grows, carried over from the last outage when the server flaps.
        attempt = 0 if now - self.down_since < self.fast_window else self.probe_attempt
        return backoff(attempt, self._base, self._cap)

    def probe_due(self, now: float) -> bool:
        return self.state is State.DOWN and now >= self.probe_at

    def start_probe(self) -> None:
        self.state = State.PROBING

    def probe_succeeded(self, now: float) -> None:
        self.failures = 0
        self.state = State.UP
        self.up_since = now

    def probe_failed(self, now: float, reason: str) -> None:
        self.last_error = reason
        if now - self.down_since >= self.fast_window:
            self.probe_attempt += 1
        self.state = State.DOWN
        self.probe_at = now + self._probe_delay(now)
