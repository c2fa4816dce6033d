"""broker/logfmt.py by the logfmt rules (as Heroku and Grafana Loki's logfmt parser read them): a
value is bare unless it is empty or holds a space, `=`, `"`, a backslash or a control character; a
quoted value escapes backslash and `"` with a backslash, newline and tab as \\n and \\t. Timestamps are
RFC 3339 UTC with milliseconds, worked out here with datetime; the rate limit by its docstring."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import pytest

from broker import logfmt
from broker.logfmt import REPEAT_INTERVAL, KeyValueFormatter, RateLimit, _quote

pytestmark = pytest.mark.unit


def unquote(value: str) -> str:
    """A logfmt value back to its text (an independent reader: Loki's rules)."""
    if not value.startswith('"'):
        return value
    assert value.endswith('"') and len(value) >= 2
    out, i, body = [], 0, value[1:-1]
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"'}[nxt])
            i += 2
        else:
            assert c != '"', value  # an unescaped quote would end the value early
            out.append(c)
            i += 1
    return "".join(out)


@pytest.mark.parametrize("c", [" ", "=", '"', "\\", "\n", "\t"])
def test_each_special_character_forces_quotes(c):
    for text in (c, f"a{c}", f"{c}b", f"a{c}b"):
        q = _quote(text)
        assert q.startswith('"') and q.endswith('"'), (text, q)
        assert unquote(q) == text


@pytest.mark.parametrize("text", ["ready", "X", "XX", "s:11211", "a-b_c.d/e", "日本", "up,down"])
def test_plain_words_stay_bare(text):
    assert _quote(text) == text


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("a\\b", '"a\\\\b"'),
        ("a\tb", '"a\\tb"'),
        ('\\"', '"\\\\\\""'),  # backslash then quote: each escaped once, in that order
        ("\\n", '"\\\\n"'),  # a backslash and an n is not a newline
        ("x y\nz\t\"w\"", '"x y\\nz\\t\\"w\\""'),
    ],
)
def test_escapes(text, quoted):
    assert _quote(text) == quoted
    assert unquote(quoted) == text


def _record(created: float, level: int = logging.WARNING, msg: str = "%s down", args: tuple = ("s:1",),
            name: str = "mcbroker.connection", exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def fields(line: str) -> list[tuple[str, str]]:
    """key=value pairs of one line (values may be quoted, holding spaces)."""
    out, i = [], 0
    while i < len(line):
        eq = line.index("=", i)
        key = line[i:eq]
        j = eq + 1
        if line[j] == '"':
            k = j + 1
            while line[k] != '"':
                k += 2 if line[k] == "\\" else 1
            end = k + 1
        else:
            end = line.find(" ", j)
            end = len(line) if end < 0 else end
        out.append((key, unquote(line[j:end])))
        assert end == len(line) or line[end] == " "
        i = end + 1
    return out


@pytest.mark.parametrize("created", [1796000000.25, 1796000000.0078125, 0.5, 1796003599.9990234375])
def test_a_line_is_ts_level_logger_msg(created):
    line = KeyValueFormatter().format(_record(created))
    ts = datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert line == f'ts={ts} level=warning logger=mcbroker.connection msg="s:1 down"'
    assert fields(line) == [("ts", ts), ("level", "warning"), ("logger", "mcbroker.connection"), ("msg", "s:1 down")]


@pytest.mark.parametrize("level, name", [(logging.DEBUG, "debug"), (logging.INFO, "info"), (logging.ERROR, "error")])
def test_level_names_in_lower_case(level, name):
    line = KeyValueFormatter().format(_record(0.0, level=level, msg="ok", args=()))
    assert fields(line)[1] == ("level", name)
    assert fields(line)[3] == ("msg", "ok")
    assert line.endswith(" msg=ok")


def test_an_exception_is_one_quoted_field_after_msg():
    try:
        raise ValueError("boom here")
    except ValueError:
        record = _record(0.0, level=logging.ERROR, msg="loop failed", args=(), exc_info=sys.exc_info())
    line = KeyValueFormatter().format(record)
    assert "\n" not in line  # one line per event
    got = fields(line)
    assert [k for k, _ in got] == ["ts", "level", "logger", "msg", "exc"]
    assert got[3] == ("msg", "loop failed")
    exc = got[4][1]
    assert exc.startswith("Traceback (most recent call last):\n")
    assert exc.endswith("ValueError: boom here")
    assert "test_an_exception_is_one_quoted_field_after_msg" in exc


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def test_setup_sends_key_value_lines_to_stderr_at_the_level(root_logging, capsys):
    root_logging.addHandler(logging.NullHandler())  # whatever was there is replaced
    logfmt.setup("warning")
    assert root_logging.level == logging.WARNING
    assert len(root_logging.handlers) == 1
    handler = root_logging.handlers[0]
    assert isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, KeyValueFormatter)
    log = logging.getLogger("mcbroker.test_logfmt")
    log.info("not shown")
    log.warning("server %s down", "s:1")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert fields(lines[0])[1:] == [("level", "warning"), ("logger", "mcbroker.test_logfmt"), ("msg", "server s:1 down")]


@pytest.mark.parametrize("level, value", [("debug", logging.DEBUG), ("info", logging.INFO), ("ERROR", logging.ERROR)])
def test_setup_level_names(root_logging, level, value):
    logfmt.setup(level)
    assert root_logging.level == value


def test_rate_limit_defaults_to_ten_seconds():
    assert REPEAT_INTERVAL == 10.0
    r = RateLimit()
    assert r.interval == 10.0
    assert r.allow("s", 100.0) == 0
    assert r.allow("s", 109.999) is None
    assert r.allow("s", 110.0) == 1  # exactly one interval later: the next line, with the count


def test_rate_limit_counts_per_key_and_starts_again_after_each_line():
    r = RateLimit(5.0)
    assert r.allow("a", 0.0) == 0
    assert r.allow("b", 0.0) == 0
    for t in (1.0, 2.0):
        assert r.allow("a", t) is None
    assert r.allow("b", 3.0) is None
    assert r.allow("a", 5.0) == 2
    assert r.allow("a", 6.0) is None  # the next interval runs from the line just logged
    assert r.allow("a", 10.0) == 1
    assert r.allow("b", 5.0) == 1
    assert r.allow("a", 15.0) == 0  # nothing held back since


def test_reset_forgets_the_held_count_and_the_interval():
    r = RateLimit(10.0)
    assert r.allow("a", 0.0) == 0
    assert r.allow("a", 1.0) is None
    assert r.allow("a", 2.0) is None
    r.reset("a")
    r.reset("never seen")  # resetting a key with no failure is harmless
    assert r.allow("a", 3.0) == 0
    assert r.allow("a", 4.0) is None
    assert r.allow("a", 13.0) == 1
