"""broker/statsview.py: what `mcbroker stats` and `mcbroker top` print, by the layout they promise:
numbers with thousands separators (floats to one decimal below a million, whole above), "-" for a
missing number, memory in MiB (2**20 bytes) to one decimal, the broker-wide rows with their names
padded to the longest name, and one row per server in name order (name left-aligned, numbers right-
aligned, columns two spaces apart). `top`'s rates are (now - before) / seconds between the two
snapshots, its hit ratio ok / (ok + miss) over the same interval."""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest
from rich.console import Console

from broker import statsview
from clientlib.errors import MemcacheServerError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "-"), (0, "0"), (7, "7"), (1234, "1,234"), (-1234567, "-1,234,567"), (0.0, "0.0"), (2.25, "2.2"),
        (2.35, "2.4"), (1234.56, "1,234.6"), (999_999.94, "999,999.9"), (999_999.96, "1,000,000.0"),
        (1_000_000.0, "1,000,000"), (1_234_567.5, "1,234,568"), (-2_000_000.4, "-2,000,000"), (-999_999.0, "-999,999.0"),
        ("up", "up"),
    ],
)
def test_numbers(value, text):
    assert statsview._num(value) == text


@pytest.mark.parametrize("n, text", [(0, "0.0 MiB"), (1 << 20, "1.0 MiB"), (3 * (1 << 20) // 2, "1.5 MiB"),
                                     (1_000_000, "1.0 MiB"), (1 << 30, "1024.0 MiB")])
def test_mib(n, text):
    assert statsview._mib(n) == text


def test_pairs_in_name_order_or_a_dash():
    assert statsview._pairs({"set": 2, "get": 1_000, "delete": 0}) == "delete 0, get 1,000, set 2"
    assert statsview._pairs({}) == "-"


FULL: dict[str, Any] = {
    "version": "1.2.3", "pid": 4242, "uptime": 3661.25, "rss_bytes": 52_428_800, "hash": "ketama",
    "draining": False, "connected_workers": 12, "max_clients": 1000, "clients_refused": 3, "frames": 123_456,
    "ops": 234_567, "requests_by_op": {"get": 200_000, "set": 34_567}, "ok": 150_000, "miss": 84_000,
    "errors": 567, "errors_by_kind": {"timeout": 7, "server_down": 560}, "timeouts": 7, "overloaded": 0,
    "gets_upstream": 190_000, "gets_coalesced": 10_000, "inflight": 5, "buffered_bytes": 2048,
    "requests_per_write": 12.5, "replies": 123_000, "replies_dropped": 456, "bad_frames": 1, "internal_errors": 0,
    "servers": {
        "mc2:11211": {"state": "down", "connections": 0, "depth": 0, "requests": 10, "errors": 560,
                      "timeouts": 7, "resets": 2, "requests_per_write": 1.0, "latency_p50_us": None,
                      "latency_p99_us": None, "latency_p999_us": None},
        "mc1:11211": {"state": "up", "connections": 4, "depth": 5, "requests": 234_000, "errors": 0,
                      "timeouts": 0, "resets": 0, "requests_per_write": 12.5, "latency_p50_us": 85.2,
                      "latency_p99_us": 1_500.0, "latency_p999_us": 2_345_678.0},
    },
}


def test_the_stats_table():
    expected = [
        "mcbroker 1.2.3  pid 4242  up 3,661.2 s  rss 50.0 MiB  hash ketama",
        "",
        "connected workers / max    12 / 1,000",
        "clients refused            3",
        "frames                     123,456",
        "requests                   234,567",
        "requests by op             get 200,000, set 34,567",
        "ok / miss                  150,000 / 84,000",
        "errors                     567",
        "errors by kind             server_down 560, timeout 7",
        "timeouts                   7",
        "overloaded                 0",
        "gets upstream / coalesced  190,000 / 10,000",
        "in flight                  5",
        "buffered bytes             2,048",
        "requests per write         12.5",
        "replies sent / dropped     123,000 / 456",
        "bad frames                 1",
        "internal errors            0",
        "",
        "server     state  conns  depth  requests  errors  timeouts  resets  req/write  p50 us   p99 us    p999 us",
        "mc1:11211     up      4      5   234,000       0         0       0       12.5    85.2  1,500.0  2,345,678",
        "mc2:11211   down      0      0        10     560         7       2        1.0       -        -          -",
        "(latency: per memcached write, written -> last answer parsed, over the last 10-20 s)",
    ]
    assert statsview.table(FULL).split("\n") == expected


def test_a_draining_broker_says_so_and_missing_fields_are_dashes():
    out = statsview.table({"draining": True, "servers": {}}).split("\n")
    assert out[0] == "mcbroker ?  pid None  up - s  rss 0.0 MiB  hash None  DRAINING"
    assert out[2] == "connected workers / max    - / -"
    assert out[6] == "requests by op             -"
    assert out[-3] == ""
    # no server: the header alone, each column as wide as its name
    assert out[-2] == "server  state  conns  depth  requests  errors  timeouts  resets  req/write  p50 us  p99 us  p999 us"


def test_a_long_server_name_widens_its_column():
    out = statsview.table({"servers": {"a-very-long-memcached-name:11211": {"state": "probing"}, "b:1": {}}}).split("\n")
    header, row1, row2 = out[-4], out[-3], out[-2]
    width = len("a-very-long-memcached-name:11211")
    assert header.startswith("server".ljust(width) + "    state")
    assert row1.startswith("a-very-long-memcached-name:11211  probing")
    assert row2.startswith("b:1".ljust(width) + "        -")
    assert len(header) == len(row1) == len(row2)


def test_server_rows_in_name_order_with_every_column():
    rows = statsview.server_rows(FULL)
    assert [r[0] for r in rows] == ["mc1:11211", "mc2:11211"]
    assert rows[0] == ["mc1:11211", "up", "4", "5", "234,000", "0", "0", "0", "12.5", "85.2", "1,500.0", "2,345,678"]
    assert [h for h, _ in statsview.SERVER_COLUMNS] == [
        "server", "state", "conns", "depth", "requests", "errors", "timeouts", "resets", "req/write",
        "p50 us", "p99 us", "p999 us",
    ]
    assert statsview.server_rows({}) == []


@pytest.mark.parametrize(
    "now, before, dt, rate",
    [({"ops": 300}, {"ops": 100}, 2.0, 100.0), ({"ops": 300}, None, 2.0, None), ({"ops": 300}, {"ops": 100}, 0.0, None),
     ({"ops": 300}, {"ops": 100}, -1.0, None), ({"ops": 50}, {"ops": 100}, 1.0, 0.0),  # a restarted broker
     ({}, {"ops": 0}, 0.5, 0.0), ({"ops": 3}, {}, 0.5, 6.0)],
)
def test_rate(now, before, dt, rate):
    assert statsview._rate(now, before, "ops", dt) == rate


def render(obj: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None, highlight=False)
    console.print(obj)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]


def test_top_view_rates_hit_ratio_and_the_top_columns():
    before = {"ops": 1_000, "ok": 100, "miss": 50, "errors": 10}
    now = dict(FULL, ops=1_600, ok=400, miss=150, errors=13, connected_workers=3, inflight=2, overloaded=1,
               rss_bytes=5 << 20)
    text = render(statsview._view(now, before, 3.0))
    lines = text.splitlines()
    # 600 ops in 3 s; 300 hits and 100 misses in the interval; 3 errors in 3 s
    assert lines[0].split() == ["mcbroker", "pid", "4242", "ops/s", "200.0", "hit", "ratio", "75.0%", "errors/s", "1.0"]
    assert lines[1].split() == ["workers", "3", "in", "flight", "2", "overloaded", "1", "rss", "5.0", "MiB"]
    table = [_cells(ln) for ln in lines if ln.startswith(("┃", "│"))]
    assert table[0] == ["server", "state", "depth", "errors", "timeouts", "req/write", "p50 us", "p99 us"]
    assert table[1] == ["mc1:11211", "up", "5", "0", "0", "12.5", "85.2", "1,500.0"]
    assert table[2] == ["mc2:11211", "down", "0", "560", "7", "1.0", "-", "-"]
    assert lines[-1] == "refresh 3.0 s · Ctrl-C to quit"


def test_top_view_of_the_first_snapshot_has_no_rates():
    lines = render(statsview._view(FULL, None, 0.0)).splitlines()
    assert lines[0].split() == ["mcbroker", "pid", "4242", "ops/s", "-", "hit", "ratio", "-", "errors/s", "-"]
    assert lines[-1] == "Ctrl-C to quit"


def test_top_view_hit_ratio_without_reads_is_a_dash():
    before = {"ops": 10, "ok": 5, "miss": 5, "errors": 0}
    now = {"ops": 20, "ok": 5, "miss": 5, "errors": 0, "pid": 1}
    line = render(statsview._view(now, before, 1.0)).splitlines()[0]
    assert line.split() == ["mcbroker", "pid", "1", "ops/s", "10.0", "hit", "ratio", "-", "errors/s", "0.0"]
    before = {"ok": 0, "miss": 0}
    now = {"ok": 0, "miss": 4, "pid": 1}  # only misses: 0%, not a dash
    assert "hit ratio 0.0%" in render(statsview._view(now, before, 1.0)).splitlines()[0]


class _Client:
    """What top() needs of a clientlib.Client: broker_stats() answers, then disconnect_all()."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls = 0
        self.disconnected = 0

    def broker_stats(self) -> dict[str, Any]:
        self.calls += 1
        a = self.answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return a

    def disconnect_all(self) -> None:
        self.disconnected += 1


def test_top_draws_count_refreshes_then_lets_go_of_the_client(capsys):
    client = _Client([{"pid": 31, "ops": 10}, {"pid": 31, "ops": 20}])
    assert statsview.top(client, interval=0.0, count=2) == 0
    assert client.calls == 2 and client.disconnected == 1
    out = capsys.readouterr().out
    assert "mcbroker pid 31" in out and "refresh" in out


def test_top_shows_a_failed_poll(capsys):
    # Live leaves its last frame on a terminal that is not one (pytest's capture): the failed poll
    client = _Client([MemcacheServerError("broker gone")])
    assert statsview.top(client, interval=0.0, count=1) == 0
    assert client.calls == 1 and client.disconnected == 1
    assert capsys.readouterr().out.strip() == "MemcacheServerError: broker gone"


def test_top_goes_on_after_a_failed_poll(capsys):
    client = _Client([MemcacheServerError("broker gone"), {"pid": 32}])
    assert statsview.top(client, interval=0.0, count=2) == 0
    assert client.calls == 2 and client.disconnected == 1
    out = capsys.readouterr().out
    assert "mcbroker pid 32" in out and "broker gone" not in out
    assert out.rstrip().endswith("Ctrl-C to quit") and "refresh" not in out  # the first good snapshot: no rates


def test_top_ends_quietly_on_ctrl_c():
    client = _Client([{"pid": 1}, KeyboardInterrupt()])
    assert statsview.top(client, interval=0.0, count=0) == 0
    assert client.calls == 2 and client.disconnected == 1


def test_top_without_rich_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.live", None)
    with pytest.raises(statsview.MissingExtra) as info:
        statsview.top(_Client([]), interval=0.0, count=1)
    assert "rich" in str(info.value) and "mcbroker[top]" in str(info.value)
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "now, before, ratio",
    [
        ({"ok": 3, "miss": 1}, {}, "75.0%"),  # a snapshot without the counters counts them as 0
        ({"ok": 3}, {}, "100.0%"),
        ({"miss": 1}, {}, "0.0%"),
        ({"ok": 12, "miss": 12}, {"ok": 10, "miss": 10}, "50.0%"),  # as many hits as misses
        ({"ok": 10, "miss": 7}, {"ok": 4, "miss": 5}, "75.0%"),
    ],
)
def test_top_hit_ratio_over_the_interval(now, before, ratio):
    line = render(statsview._view(dict(now, pid=1), before, 1.0)).splitlines()[0]
    assert f"hit ratio {ratio}" in line


def test_top_header_columns_are_three_spaces_apart():
    lines = render(statsview._view(FULL, None, 0.0)).splitlines()
    first = max(len("mcbroker pid 4242"), len("workers 12"))
    assert lines[0].index("ops/s") == lines[1].index("in flight") == first + 3


def test_top_server_table_keeps_its_natural_width_and_alignment():
    lines = render(statsview._view(FULL, None, 0.0)).splitlines()
    rows = [ln for ln in lines if ln.startswith(("┃", "│"))]
    assert all(len(ln) < 100 for ln in lines)  # not stretched to the 200-column console
    header = rows[0].replace("┃", "│").split("│")[1:-1]
    mc1 = rows[1].split("│")[1:-1]
    assert header[0] == " server    " and mc1[0] == " mc1:11211 "  # names to the left
    assert mc1[2].endswith(" 5 ") and mc1[2].startswith("   ")
    assert mc1[1].endswith(" up ")


def test_top_server_table_cells_do_not_wrap_on_a_narrow_terminal():
    console = Console(file=io.StringIO(), width=40, color_system=None, highlight=False)
    console.print(statsview._view(FULL, None, 0.0))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    # one line for the header and one per server: cells are cut short, never wrapped onto a second line
    assert len([ln for ln in lines if ln.startswith("┃")]) == 1
    assert len([ln for ln in lines if ln.startswith("│")]) == 2


class _FakeTime:
    """statsview's clock and sleep: time passes only when top() sleeps or a poll takes time."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class _SlowClient(_Client):
    def __init__(self, answers: list[Any], clock: _FakeTime, poll_time: float) -> None:
        super().__init__(answers)
        self.clock, self.poll_time = clock, poll_time

    def broker_stats(self) -> dict[str, Any]:
        self.clock.now += self.poll_time
        return super().broker_stats()


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """top()'s Console made a 120-column colour terminal writing here (it is built inside top())."""
    import rich.console

    out = io.StringIO()
    real = rich.console.Console
    monkeypatch.setattr(
        rich.console, "Console",
        lambda **kw: real(file=out, force_terminal=True, width=120, color_system="standard", **kw),
    )
    return out


def test_top_on_a_terminal_draws_every_poll_at_once(monkeypatch, terminal):
    clock = _FakeTime(100.0)
    monkeypatch.setattr(statsview, "time", clock)
    client = _Client([MemcacheServerError("broker gone"), {"pid": 31, "ops": 0}, {"pid": 32, "ops": 50}])
    assert statsview.top(client, count=3) == 0
    assert clock.slept == [1.0, 1.0]  # the default interval, no sleep after the last refresh
    out = terminal.getvalue()
    # each frame drawn when polled (auto refresh is off): the failure, the first and the second view
    assert "MemcacheServerError: broker gone" in out
    assert "pid 31" in out and "pid 32" in out  # plain numbers: no highlighting in colour
    assert out.index("broker gone") < out.index("pid 31") < out.index("pid 32")
    assert "refresh 1.0 s" in out  # the third poll is 1 s after the second
    assert "ops/s \x1b[1m50.0\x1b[0m" in out  # 50 requests in that second, in bold


def test_top_sleeps_what_is_left_of_the_interval(monkeypatch, terminal):
    clock = _FakeTime(50.0)
    monkeypatch.setattr(statsview, "time", clock)
    client = _SlowClient([{"pid": 1}, {"pid": 1}, {"pid": 1}], clock, poll_time=0.1)
    assert statsview.top(client, interval=0.25, count=3) == 0
    assert clock.slept == [pytest.approx(0.15), pytest.approx(0.15)]
    client = _SlowClient([{"pid": 1}, {"pid": 1}], clock, poll_time=0.5)
    clock.slept.clear()
    assert statsview.top(client, interval=0.25, count=2) == 0
    assert clock.slept == [0.0]  # a poll slower than the interval: the next one at once


def test_top_runs_until_ctrl_c_by_default(monkeypatch, terminal):
    clock = _FakeTime(0.0)
    monkeypatch.setattr(statsview, "time", clock)
    client = _Client([{"pid": 1}, {"pid": 1}, {"pid": 1}, KeyboardInterrupt()])
    assert statsview.top(client) == 0
    assert client.calls == 4 and client.disconnected == 1
    assert clock.slept == [1.0, 1.0, 1.0]
