"""Log lines for operators: one line per event, key=value, to stderr; repeated failures rate-limited.

`ts=2026-11-30T04:01:02.123Z level=warning logger=mcbroker.connection msg="..."`: every value that
could hold a space is quoted (logfmt, as Heroku and Grafana Loki read it).
"""

from __future__ import annotations

import logging
import sys
import time

# One line per key (a server) per this many seconds for a repeated failure; the next line says how
# many were left out.
REPEAT_INTERVAL = 10.0


def _quote(text: str) -> str:
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str) -> None:
    """Send the broker's logs to stderr as key=value lines at `level` ("info", "debug", ...)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


class RateLimit:
    """At most one line per key per `interval` seconds; allow() says how many were held back."""

    __slots__ = ("interval", "_next", "_held")

    def __init__(self, interval: float = REPEAT_INTERVAL) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None: stay quiet (counted). Else the number of lines held back since the last one."""
        if now < self._next.get(key, -1.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)

    def reset(self, key: str) -> None:
        """The failure is over: the next one is news again, logged at once."""
        self._next.pop(key, None)
        self._held.pop(key, None)
