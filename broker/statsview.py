"""What `mcbroker stats` and `mcbroker top` print: a broker's stats snapshot as text.

Pure formatting over the dict the broker answers BROKER_STATS with (README "Stats" documents each
field); `top` also polls, through the Client it is given.
"""

from __future__ import annotations

import time
from typing import Any


class MissingExtra(RuntimeError):
    pass


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in sorted(d.items())) or "-"


SERVER_COLUMNS = (
    ("server", None), ("state", "state"), ("conns", "connections"), ("depth", "depth"),
    ("requests", "requests"), ("errors", "errors"), ("timeouts", "timeouts"), ("resets", "resets"),
    ("req/write", "requests_per_write"), ("p50 us", "latency_p50_us"), ("p99 us", "latency_p99_us"),
    ("p999 us", "latency_p999_us"),
)


# What fits an 80-column terminal in `top`; `stats` shows them all.
TOP_COLUMNS = ("server", "state", "depth", "errors", "timeouts", "req/write", "p50 us", "p99 us")


def server_rows(stats: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, s in sorted(stats.get("servers", {}).items()):
        rows.append([name if key is None else _num(s.get(key)) for _, key in SERVER_COLUMNS])
    return rows


def table(stats: dict[str, Any]) -> str:
    """`mcbroker stats`: the broker-wide numbers, then one row per memcached server."""
    lines = [
        f"mcbroker {stats.get('version', '?')}  pid {stats.get('pid')}  up {_num(stats.get('uptime'))} s  "
        f"rss {_mib(int(stats.get('rss_bytes', 0)))}  hash {stats.get('hash')}"
        + ("  DRAINING" if stats.get("draining") else ""),
        "",
    ]
    wide = [
        ("connected workers / max", f"{_num(stats.get('connected_workers'))} / {_num(stats.get('max_clients'))}"),
        ("clients refused", stats.get("clients_refused")),
        ("frames", stats.get("frames")),
        ("requests", stats.get("ops")),
        ("requests by op", _pairs(stats.get("requests_by_op", {}))),
        ("ok / miss", f"{_num(stats.get('ok'))} / {_num(stats.get('miss'))}"),
        ("errors", stats.get("errors")),
        ("errors by kind", _pairs(stats.get("errors_by_kind", {}))),
        ("timeouts", stats.get("timeouts")),
        ("overloaded", stats.get("overloaded")),
        ("gets upstream / coalesced", f"{_num(stats.get('gets_upstream'))} / {_num(stats.get('gets_coalesced'))}"),
        ("in flight", stats.get("inflight")),
        ("buffered bytes", stats.get("buffered_bytes")),
        ("requests per write", stats.get("requests_per_write")),
        ("replies sent / dropped", f"{_num(stats.get('replies'))} / {_num(stats.get('replies_dropped'))}"),
        ("bad frames", stats.get("bad_frames")),
        ("internal errors", stats.get("internal_errors")),
    ]
    width = max(len(k) for k, _ in wide)
    lines += [f"{k:<{width}}  {v if isinstance(v, str) else _num(v)}" for k, v in wide]
    lines.append("")
    header = [h for h, _ in SERVER_COLUMNS]
    rows = server_rows(stats)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines.append(fmt(header))
    lines += [fmt(r) for r in rows]
    lines.append("(latency: per memcached write, written -> last answer parsed, over the last 10-20 s)")
    return "\n".join(lines)


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str, dt: float) -> float | None:
    if before is None or dt <= 0:
        return None
    return max(0.0, (now.get(key, 0) - before.get(key, 0)) / dt)


def _view(stats: dict[str, Any], before: dict[str, Any] | None, dt: float) -> Any:
    from rich.console import Group
    from rich.table import Table

    ops = _rate(stats, before, "ops", dt)
    ok_d = stats.get("ok", 0) - (before or {}).get("ok", 0)
    miss_d = stats.get("miss", 0) - (before or {}).get("miss", 0)
    ratio = ok_d / (ok_d + miss_d) if before is not None and ok_d + miss_d else None
    err = _rate(stats, before, "errors", dt)
    head = Table.grid(padding=(0, 3))
    head.add_row(
        f"[b]mcbroker[/b] pid {stats.get('pid')}",
        f"ops/s [b]{_num(ops)}[/b]",
        f"hit ratio [b]{'-' if ratio is None else f'{ratio:.1%}'}[/b]",
        f"errors/s [b]{_num(err)}[/b]",
    )
    head.add_row(
        f"workers [b]{_num(stats.get('connected_workers'))}[/b]",
        f"in flight {_num(stats.get('inflight'))}",
        f"overloaded {_num(stats.get('overloaded'))}",
        f"rss {_mib(int(stats.get('rss_bytes', 0)))}",
    )
    servers = Table(expand=False)
    picked = [i for i, (h, _) in enumerate(SERVER_COLUMNS) if h in TOP_COLUMNS]
    for i in picked:
        h = SERVER_COLUMNS[i][0]
        servers.add_column(h, justify="left" if h == "server" else "right", no_wrap=True)
    for row in server_rows(stats):
        servers.add_row(*[row[i] for i in picked])
    return Group(head, servers, f"[dim]refresh {dt:.1f} s · Ctrl-C to quit[/dim]" if before else "[dim]Ctrl-C to quit[/dim]")


def top(client: Any, *, interval: float = 1.0, count: int = 0) -> int:
    """Redraw the broker's numbers every `interval` seconds until Ctrl-C (or `count` refreshes)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise MissingExtra("mcbroker top needs the rich package: pip install 'mcbroker[top]'") from None
    from clientlib.errors import MemcacheError

    before: dict[str, Any] | None = None
    t_before = 0.0
    shown = 0
    try:
        with Live(console=Console(highlight=False), refresh_per_second=4, screen=False, auto_refresh=False) as live:
            while True:
                t = time.monotonic()
                try:
                    stats = client.broker_stats()
                except MemcacheError as exc:
                    live.update(f"[red]{type(exc).__name__}: {exc}[/red]", refresh=True)
                else:
                    live.update(_view(stats, before, t - t_before), refresh=True)
                    before, t_before = stats, t
                shown += 1
                if count and shown >= count:
                    return 0
                time.sleep(max(0.0, interval - (time.monotonic() - t)))
    except KeyboardInterrupt:
        return 0
    finally:
        client.disconnect_all()
