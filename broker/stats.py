"""Counters' companions: latency over a recent window, process memory, and the names operators see.

Pure (no sockets): the socket driver (connection.py) records one sample per pipeline batch with the
clock reading it already has; snapshot() turns them into percentiles for `mcbroker stats`, `top` and
Prometheus.
"""

from __future__ import annotations

import bisect
import os

from clientlib.wire import Code, Op

# Bucket upper bounds in seconds: 1 us to ~100 s, each 10% above the last, so a percentile read
# from a bucket is within 10% of the true value.
_GROWTH = 1.1
BOUNDS: tuple[float, ...] = tuple(1e-6 * _GROWTH**i for i in range(194))
# Percentiles cover the last WINDOW to 2 * WINDOW seconds (the current and the previous window).
WINDOW = 10.0

OP_NAMES: dict[int, str] = {int(op): op.name.lower() for op in Op}
CODE_NAMES: dict[int, str] = {int(c): c.name.lower() for c in Code}


class LatencyWindow:
    """Latency samples of the last 10-20 s in log buckets: record() is a bisect and an add."""

    __slots__ = ("current", "previous", "rotate_at", "count", "total")

    def __init__(self) -> None:
        self.current = [0] * (len(BOUNDS) + 1)
        self.previous = [0] * (len(BOUNDS) + 1)
        self.rotate_at = 0.0
        self.count = 0  # lifetime samples
        self.total = 0.0  # lifetime sum, seconds

    def record(self, seconds: float, now: float) -> None:
        if now >= self.rotate_at:
            self._rotate(now)
        self.current[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.count += 1
        self.total += seconds

    def _rotate(self, now: float) -> None:
        # A window with no samples at all is skipped whole: stale numbers must not linger.
        stale = now >= self.rotate_at + WINDOW
        self.previous = [0] * len(self.current) if stale else self.current
        self.current = [0] * len(self.previous)
        self.rotate_at = now + WINDOW

    def percentiles(self, qs: tuple[float, ...], now: float) -> tuple[list[float | None], int]:
        """The q-quantiles (seconds, each a bucket's upper bound) of the recent samples, and how
        many samples that is; None for each when there were none."""
        if now >= self.rotate_at + WINDOW:
            return [None] * len(qs), 0  # nothing recorded for a whole window
        merged = [a + b for a, b in zip(self.current, self.previous)] if now < self.rotate_at else self.current
        n = sum(merged)
        if not n:
            return [None] * len(qs), 0
        out: list[float | None] = []
        for q in qs:
            rank = max(1, int(q * n + 0.999999))
            seen = 0
            for i, c in enumerate(merged):
                seen += c
                if seen >= rank:
                    out.append(BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1])
                    break
        return out, n


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
