"""Pure reductions and rendering: rounds -> per-path summaries -> tables; the issue's targets with a
pass/fail column. No processes, no sockets.

Ratios are the median over rounds of the per-round ratio (both paths of a round ran back to back,
so they saw the same slice of a shared, noisy machine), not a ratio of medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BROKER_PATHS = ("broker", "broker-coalesce-on", "broker-coalesce-off")
REFERENCES = ("direct", "hashclient", "twemproxy", "floor", "floor-guarded", "zmq-echo", "raw")
# Paths whose rows carry ratios to the references: the brokers, and the floors (the least Python a
# broker of this design runs, without and with the guarantees' work), so each target can be read
# for the floors too.
RATIO_PATHS = (*BROKER_PATHS, "floor", "floor-guarded")
CPU_COLUMNS = ("worker_cpu_us", "broker_cpu_us", "twemproxy_cpu_us", "echo_cpu_us", "proxy_cpu_us", "mc_cpu_us")


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(pct / 100.0 * len(sorted_values) + 0.999999)))
    return float(sorted_values[rank - 1])


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (scenario, path), in first-seen order."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["path"]), []).append(r)
    by_round = {(r["scenario"], r["path"], r["round"]): r for r in rows}
    out = []
    for (scenario, path), rs in groups.items():
        s: dict[str, Any] = {"scenario": scenario, "path": path, "rounds": len(rs), "workers": rs[0].get("workers")}
        if "rss_mib" in rs[0]:
            s["rss_mib"] = max(r["rss_mib"] for r in rs)
            s["rss_before_mib"] = min(r["rss_before_mib"] for r in rs)
            s["rss_per_worker_kib"] = _median([r["rss_per_worker_kib"] for r in rs])
            s["mc_conns"] = max(r["mc_conns"] for r in rs)
            out.append(s)
            continue
        ops = [r["ops_per_s"] for r in rs]
        s.update(ops_median=round(statistics.median(ops), 1), ops_min=round(min(ops), 1), ops_max=round(max(ops), 1),
                 ops_rounds=[round(x, 1) for x in ops])
        for col in (*CPU_COLUMNS, "upstream_per_get", "req_per_write"):
            s[col] = _median([r.get(col) for r in rs])
        conns = [r["mc_conns"] for r in rs if r.get("mc_conns") is not None]
        s["mc_conns"] = max(conns) if conns else None
        lat = sorted(x for r in rs for x in r.get("samples", ()))
        s["samples"] = len(lat)
        s["p50_us"], s["p99_us"], s["p999_us"] = (percentile(lat, p) for p in (50, 99, 99.9))
        s["calls"] = sum(r["calls"] for r in rs)
        if path in RATIO_PATHS:
            for ref in REFERENCES:
                if ref == path or (path == "floor" and ref == "floor-guarded"):
                    continue  # (the guarded floor's row carries the ratio the other way: the guarantees' price)
                ratios = [r["ops_per_s"] / by_round[(scenario, ref, r["round"])]["ops_per_s"]
                          for r in rs if (scenario, ref, r["round"]) in by_round]
                if ratios:
                    s[f"vs_{ref}"] = round(statistics.median(ratios), 3)
        out.append(s)
    return out


# --- targets (issue 9's table, and issue 10's coalescing acceptance) --------------------------


@dataclass(frozen=True)
class Target:
    what: str
    scenario: str
    measure: Callable[[Mapping[tuple[str, str], Mapping[str, Any]]], float | None]
    op: str            # ">=" or "<="
    limit: float
    unit: str = ""
    needs_coalesce: bool = False
    # The best value this design could show in the same run (see _zero_cost_broker), or None
    # where the run has no path that bounds it.
    bound: Callable[[Mapping[tuple[str, str], Mapping[str, Any]]], float | None] | None = None
    # The same measure for another path standing where the broker does, given its name: for the
    # floor (bench/floor.py, the least Python a broker of this design runs) and the floor with
    # the guarantees' work added (floor-guarded) in the same run; None where the scenario has
    # neither.
    at: Callable[[str], Callable[[Mapping[tuple[str, str], Mapping[str, Any]]], float | None]] | None = None
    # Whether the floors' values bound the target (a miss they share reads "floor misses too",
    # or "guarded floor misses too" where the plain floor meets it and the guarded one does not).
    # Not for memcached's CPU per get: that falls with the requests each write carries, which a
    # broker gathers by how long its loop waits, not by how little Python it runs (the floor's
    # faster turns gather fewer: bench/README, sixteenth and seventeenth rounds).
    floor_bounds: bool = True


def _get(s: Mapping[tuple[str, str], Mapping[str, Any]], sc: str, path: str, col: str) -> float | None:
    v = s.get((sc, path), {}).get(col)
    return None if v is None else float(v)


def _ratio(sc: str, col: str, a: str = "broker", b: str = "direct") -> Callable[..., float | None]:
    def f(s: Mapping[tuple[str, str], Mapping[str, Any]]) -> float | None:
        x, y = _get(s, sc, a, col), _get(s, sc, b, col)
        return round(x / y, 3) if x is not None and y else None
    return f


def _col(sc: str, col: str, path: str = "broker") -> Callable[..., float | None]:
    return lambda s: _get(s, sc, path, col)


def _added(sc: str, col: str, path: str = "broker") -> Callable[..., float | None]:
    def f(s: Mapping[tuple[str, str], Mapping[str, Any]]) -> float | None:
        x, y = _get(s, sc, path, col), _get(s, sc, "direct", col)
        return round(x - y, 1) if x is not None and y is not None else None
    return f


def total_cpu(s: Mapping[tuple[str, str], Mapping[str, Any]], sc: str, path: str) -> float | None:
    """us of CPU per op summed over every process of a path (workers, broker or proxy or echo,
    delay proxy, memcached); None when the path did not run or reported no CPU."""
    row = s.get((sc, path))
    if not row:
        return None
    cpu = [float(row[c]) for c in CPU_COLUMNS if row.get(c) is not None]
    return sum(cpu) if cpu else None


def _zero_cost_broker(sc: str, ref: str) -> Callable[..., float | None]:
    """broker / `ref` as it would be if the broker cost no more than the bare ZeroMQ echo of the
    same run: the echo path's worker and server CPU, plus the memcached CPU the broker path used.
    With every core busy (8 and more workers on 2 vCPUs) throughput is the cores over the total
    CPU per op, so the ratio of two paths is the inverse ratio of their totals; `ref` "zmq-echo"
    gives the bound on broker / echo."""
    def f(s: Mapping[tuple[str, str], Mapping[str, Any]]) -> float | None:
        echo, ref_total = total_cpu(s, sc, "zmq-echo"), total_cpu(s, sc, ref)
        mc = _get(s, sc, "broker", "mc_cpu_us")
        if echo is None or ref_total is None or mc is None:
            return None
        return round(ref_total / (echo + mc), 3)
    return f


TARGETS: tuple[Target, ...] = (
    Target("32 workers single get: broker / direct", "get-32", _col("get-32", "vs_direct"), ">=", 0.6,
           bound=_zero_cost_broker("get-32", "direct"), at=lambda p: _col("get-32", "vs_direct", p)),
    Target("same run: broker / twemproxy", "get-32", _col("get-32", "vs_twemproxy"), ">=", 0.9,
           bound=_zero_cost_broker("get-32", "twemproxy"), at=lambda p: _col("get-32", "vs_twemproxy", p)),
    Target("same run: broker / bare ZeroMQ echo", "get-32", _col("get-32", "vs_zmq-echo"), ">=", 0.9,
           bound=_zero_cost_broker("get-32", "zmq-echo"), at=lambda p: _col("get-32", "vs_zmq-echo", p)),
    Target("8 workers get_many(100): broker / direct", "getmany-8", _col("getmany-8", "vs_direct"), ">=", 0.95,
           bound=_zero_cost_broker("getmany-8", "direct"), at=lambda p: _col("getmany-8", "vs_direct", p)),
    Target("32 workers get_many(100): broker / direct", "getmany-32", _col("getmany-32", "vs_direct"), ">=", 0.95,
           bound=_zero_cost_broker("getmany-32", "direct"), at=lambda p: _col("getmany-32", "vs_direct", p)),
    Target("8 workers get_many(100): broker / twemproxy", "getmany-8", _col("getmany-8", "vs_twemproxy"), ">=", 1.1,
           bound=_zero_cost_broker("getmany-8", "twemproxy"), at=lambda p: _col("getmany-8", "vs_twemproxy", p)),
    Target("32 workers get_many(100): broker / twemproxy", "getmany-32", _col("getmany-32", "vs_twemproxy"), ">=", 1.1,
           bound=_zero_cost_broker("getmany-32", "twemproxy"), at=lambda p: _col("getmany-32", "vs_twemproxy", p)),
    # A raw DEALER (the echo path's worker) is the least a worker can spend on a ZeroMQ call.
    Target("worker CPU per single get (32 workers): broker path / direct", "get-32",
           _ratio("get-32", "worker_cpu_us"), "<=", 1.5, bound=_ratio("get-32", "worker_cpu_us", a="zmq-echo"),
           at=lambda p: _ratio("get-32", "worker_cpu_us", a=p)),
    # The ZeroMQ hop alone over direct (the echo path's latency minus direct's) bounds the two
    # latency targets below; the echo's server CPU per key: what the ZeroMQ hop alone costs the broker's side.
    Target("broker CPU per key in get_many(100), 8 workers", "getmany-8", _col("getmany-8", "broker_cpu_us"), "<=", 2.0, "us",
           bound=_col("getmany-8", "echo_cpu_us", "zmq-echo"), at=lambda p: _col("getmany-8", "broker_cpu_us", p)),
    Target("memcached CPU per get at 32 workers: broker / direct", "get-32", _ratio("get-32", "mc_cpu_us"), "<=", 0.2,
           at=lambda p: _ratio("get-32", "mc_cpu_us", a=p), floor_bounds=False),
    Target("1 worker back to back: added p50 over direct", "latency-b2b", _added("latency-b2b", "p50_us"), "<=", 50, "us",
           bound=_added("latency-b2b", "p50_us", "zmq-echo"), at=lambda p: _added("latency-b2b", "p50_us", p)),
    Target("1 worker back to back: added p99 over direct", "latency-b2b", _added("latency-b2b", "p99_us"), "<=", 100, "us",
           bound=_added("latency-b2b", "p99_us", "zmq-echo"), at=lambda p: _added("latency-b2b", "p99_us", p)),
    Target("1 ms round trip, 16 workers single get: broker / direct", "rtt1ms-16", _col("rtt1ms-16", "vs_direct"), ">=", 0.95,
           at=lambda p: _col("rtt1ms-16", "vs_direct", p)),
    Target("4 servers, 1 ms, 8 workers get_many(100): broker / HashClient", "multi4-1ms",
           _col("multi4-1ms", "vs_hashclient"), ">=", 3.5, at=lambda p: _col("multi4-1ms", "vs_hashclient", p)),
    Target("broker RSS with 256 connected workers", "rss-256", _col("rss-256", "rss_mib"), "<=", 64, "MiB"),
    Target("hot key, 32 workers: upstream gets per client get, coalescing on", "hotkey-32",
           _col("hotkey-32", "upstream_per_get", "broker-coalesce-on"), "<=", 0.1, needs_coalesce=True),
)


BOUND_SCENARIOS = ("get-32", "getmany-8", "getmany-32")


def model_check(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The design bounds above rest on throughput = cores / total CPU per op; for each scenario
    they use, the ratio that model predicts for the broker and the echo against direct, beside
    the measured one, so a run shows whether the model held."""
    by = {(s["scenario"], s["path"]): s for s in summaries}
    lines = []
    for sc in BOUND_SCENARIOS:
        direct = total_cpu(by, sc, "direct")
        parts = []
        for path, col in (("zmq-echo", None), ("broker", "vs_direct")):
            total = total_cpu(by, sc, path)
            if direct is None or total is None:
                continue
            if col is not None:
                measured = _get(by, sc, path, col)
            else:
                ops, ref = _get(by, sc, path, "ops_median"), _get(by, sc, "direct", "ops_median")
                measured = ops / ref if ops is not None and ref else None
            if measured is not None:
                parts.append(f"{path} / direct predicted {direct / total:.2f}, measured {measured:.2f}")
        if parts:
            lines.append(f"{sc}: " + "; ".join(parts))
    return lines


def evaluate_targets(summaries: Sequence[Mapping[str, Any]], ran: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its measured value and status: pass, FAIL, not run, or pending broker support.
    `ran` maps scenario name -> {"workers": n, "pending": bool, "failed": str|None}."""
    by = {(s["scenario"], s["path"]): s for s in summaries}
    out = []
    for t in TARGETS:
        info = ran.get(t.scenario)
        value = t.measure(by) if info else None
        bound = t.bound(by) if info and t.bound is not None else None
        floor = t.at("floor")(by) if info and t.at is not None else None
        guarded = t.at("floor-guarded")(by) if info and t.at is not None else None
        if info is None:
            status = "not run"
        elif info.get("failed"):
            status = "FAIL (scenario failed)"
        elif t.needs_coalesce and info.get("pending"):
            status = "pending broker support"
        elif value is None:
            status = "no data"
        else:
            def meets(v: float) -> bool:
                return v >= t.limit if t.op == ">=" else v <= t.limit
            status = "pass" if meets(value) else "FAIL"
            if status == "FAIL" and bound is not None and not meets(bound):
                status = "FAIL (bound misses too)"
            elif status == "FAIL" and t.floor_bounds and floor is not None and not meets(floor):
                status = "FAIL (floor misses too)"
            elif (status == "FAIL" and t.floor_bounds and floor is not None and guarded is not None
                  and not meets(guarded)):
                # (Only beside a plain floor that meets it: without one the run shows no price.)
                status = "FAIL (guarded floor misses too)"
        out.append({"target": t.what, "scenario": t.scenario, "workers": info.get("workers") if info else None,
                    "value": value, "bound": bound, "floor": floor, "guarded": guarded, "limit": f"{t.op} {t.limit:g}{(' ' + t.unit) if t.unit else ''}", "status": status})
    return out


# --- tables ------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if digits == 0 and abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:,.{digits or 2}f}"
    return str(v)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]], drop_empty: bool = True, left: int = 1) -> str:
    """A markdown table; columns empty in every row are left out. The first `left` columns are
    left-aligned, the rest (numbers) right-aligned."""
    keep = [i for i in range(len(headers)) if not drop_empty or i == 0 or any(r[i] for r in rows)]
    hs = [headers[i] for i in keep]
    rs = [[r[i] for i in keep] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rs)) if rs else len(h) for i, h in enumerate(hs)]
    lines = ["| " + " | ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(hs, widths))) + " |"]
    lines.append("|" + "|".join(("-" * (w + 2)) if i < left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|")
    for r in rs:
        lines.append("| " + " | ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
    return "\n".join(lines)


def scenario_table(summaries: Sequence[Mapping[str, Any]], unit: str) -> str:
    if summaries and "rss_mib" in summaries[0]:
        headers = ["path", "idle workers", "broker RSS before MiB", "broker RSS MiB", "KiB per worker", "mc conns", "rounds"]
        rows = [[s["path"], _fmt(s["workers"]), _fmt(s["rss_before_mib"], 1), _fmt(s["rss_mib"], 1),
                 _fmt(s["rss_per_worker_kib"], 1), _fmt(s["mc_conns"]), _fmt(s["rounds"])] for s in summaries]
        return markdown(headers, rows)
    headers = [
        "path", f"{unit} median", "min", "max", *(f"/{ref}" for ref in REFERENCES),
        "worker us/op", "broker us/op", "twemproxy us/op", "echo us/op", "delayproxy us/op", "memcached us/op",
        "mc conns", "req/write", "upstream gets/get", "p50 us", "p99 us", "p999 us",
    ]
    rows = []
    for s in summaries:
        rows.append([
            s["path"], _fmt(s["ops_median"]), _fmt(s["ops_min"]), _fmt(s["ops_max"]),
            *(_fmt(s.get(f"vs_{ref}"), 2) for ref in REFERENCES),
            *(_fmt(s.get(c), 1) for c in CPU_COLUMNS),
            _fmt(s.get("mc_conns")), _fmt(s.get("req_per_write"), 1), _fmt(s.get("upstream_per_get"), 3),
            *((f"{s[p]:,.0f}" if s.get(p) is not None and s.get("samples", 0) >= (1000 if p == "p999_us" else 100) else "")
              for p in ("p50_us", "p99_us", "p999_us")),
        ])
    return markdown(headers, rows)


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    headers = ["target (issue 9; last row issue 10)", "scenario", "workers", "measured", "design bound", "floor",
               "guarded floor", "target", "result"]
    rows = [[t["target"], t["scenario"], _fmt(t["workers"]), _fmt(t["value"], 2), _fmt(t.get("bound"), 2), _fmt(t.get("floor"), 2),
             _fmt(t.get("guarded"), 2), t["limit"], t["status"]] for t in targets]
    return markdown(headers, rows, drop_empty=False, left=2)
