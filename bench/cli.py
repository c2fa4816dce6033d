"""`python -m bench`: every scenario, every path interleaved per round, one table per scenario and
the issue's targets with a pass/fail column. See bench/README.md.

    python -m bench [--quick] [--scenario NAME[,NAME]] [--rounds 3] [--seconds 2]
                    [--coalesce both|on|off] [--json PATH] [--charts DIR] [--list]

Exit status: 0 when every scenario ran and every value read was right; 1 when a scenario failed (a
worker error or a wrong value; the failure is printed and the other scenarios still run); 2 for bad
arguments. Targets missed are reported, not an error: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .paths import PATH_HELP
from .procs import ROOT, BenchError
from .scenarios import BY_NAME, SCENARIOS, Scenario, environment, quick, run_round

QUICK_SECONDS = 0.15


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown) or text!r}; "
                                         f"known: {', '.join(BY_NAME)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke mode: 1 round of {QUICK_SECONDS} s, fewer workers; whole run under a minute")
    p.add_argument("--scenario", type=_scenario_list, help="only these scenarios, comma-separated (see --list)")
    p.add_argument("--rounds", type=int, help="rounds per scenario, paths interleaved in each (default 3; quick 1)")
    p.add_argument("--seconds", type=float, help=f"wall time of each path's run (default 2; quick {QUICK_SECONDS})")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    p.add_argument("--coalesce", choices=("both", "on", "off"), default="both",
                   help="hot key / Zipf: broker with coalesce_reads = true, false, or both side by side")
    p.add_argument("--json", metavar="PATH", help="write every round, the summaries and the targets as JSON")
    p.add_argument("--charts", metavar="DIR", help="write PNG charts (needs matplotlib: the bench extra)")
    p.add_argument("--list", action="store_true", help="list the scenarios and paths, then exit")
    return p


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return (done.stdout + done.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "missing"

    from .procs import _find_nutcracker

    nut = _find_nutcracker()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu_model": _cpu_model(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "kernel": platform.release(),
        "memcached": _version(["memcached", "-V"]),
        "nutcracker": _version([nut, "--version"]) if nut else "not installed yet",
        "pymemcache": pkg("pymemcache"), "pyzmq": pkg("pyzmq"), "msgpack": pkg("msgpack"),
        "commit": _version(["git", "rev-parse", "--short", "HEAD"]),
    }


def _unit(sc: Scenario) -> str:
    return {"get_many": "keys/s", "set": "sets/s"}.get(sc.op, "gets/s")


def run(args: argparse.Namespace) -> int:
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else 2.0)
    if not 1 <= rounds <= 50 or not 0 < seconds <= 600 or not 16 <= args.value_size <= 100_000:
        raise BenchError("--rounds must be 1..50, --seconds in (0, 600], --value-size 16..100000")
    chosen = [BY_NAME[n] for n in args.scenario] if args.scenario else list(SCENARIOS)
    began = time.monotonic()
    info = machine()
    say(f"bench: {len(chosen)} scenarios, {rounds} round(s) x {seconds} s per path; "
        f"{info['nproc']} CPUs ({info['cpu_model']}), load {info['loadavg_start']}")
    if args.quick:
        say("bench: QUICK MODE: 1 round, short runs, fewer workers: a smoke check that every path works, not a measurement")
    elif rounds < 3:
        say(f"bench: only {rounds} round(s): medians of fewer than 3 rounds are weak on a shared machine")

    rows: list[dict[str, Any]] = []
    scenarios_out: list[dict[str, Any]] = []
    ran: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for base in chosen:
        sc = quick(base) if args.quick else base
        entry: dict[str, Any] = {"name": sc.name, "what": sc.what, "workers": sc.workers, "unit": _unit(sc),
                                 "rounds": rounds, "latency": sc.latency, "notes": [], "failed": None}
        ran[sc.name] = {"workers": sc.workers, "pending": False, "failed": None}
        t0 = time.monotonic()
        try:
            with environment(sc, args.value_size, args.coalesce, say) as env:
                entry["paths"] = list(env.paths)
                entry["notes"] = env.notes
                ran[sc.name]["pending"] = any("PENDING" in n for n in env.notes)
                for note in env.notes:
                    say(f"[{sc.name}] {note}")
                for rnd in range(rounds):
                    for path in env.paths:
                        row = run_round(env, path, rnd, seconds, args.value_size)
                        rows.append(row)
                        if "ops_per_s" in row:
                            say(f"[{sc.name}] round {rnd + 1}/{rounds} {path:<19} {row['ops_per_s']:>11,.0f} {entry['unit']}"
                                f"  worker {row['worker_cpu_us']:.1f} us/op  mc conns {'-' if row['mc_conns'] is None else row['mc_conns']}")
                        else:
                            say(f"[{sc.name}] round {rnd + 1}/{rounds} {path:<19} {row['workers']} idle DEALERs: "
                                f"broker RSS {row['rss_before_mib']:.1f} -> {row['rss_mib']:.1f} MiB")
            if env.proxy_account:
                a = env.proxy_account
                entry["delay"] = a
                entry["notes"].append(
                    f"round trip +{a['delay_ms']:g} ms: bench/delayproxy.py, ONE single-threaded selectors process in "
                    f"front of every memcached server that every path goes through; it holds each client->memcached "
                    f"chunk for {a['delay_ms']:g} ms and passes answers back at once (measured added delay: mean "
                    f"{a['mean_added_ms']} ms, max {a['max_added_ms']} ms over {a['chunks']:,} chunks); its CPU is the "
                    f"delayproxy column")
        except BenchError as exc:
            msg = f"SCENARIO {sc.name} FAILED: {exc}"
            failures.append(msg)
            entry["failed"] = str(exc)
            ran[sc.name]["failed"] = str(exc)
            say("!" * 72 + f"\n{msg}\n" + "!" * 72)
        entry["duration_s"] = round(time.monotonic() - t0, 1)
        scenarios_out.append(entry)

    summaries = report.summarize(rows)
    for entry in scenarios_out:
        entry["summaries"] = [s for s in summaries if s["scenario"] == entry["name"]]
    targets = report.evaluate_targets(summaries, ran)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["duration_s"] = round(time.monotonic() - began, 1)

    out = sys.stdout
    print(f"# python -m bench{' --quick' if args.quick else ''}: {info['date']}, {info['nproc']} x {info['cpu_model']}, "
          f"load {info['loadavg_start']} -> {info['loadavg_end']}, {info['duration_s']} s", file=out)
    print(f"{info['memcached']}; {info['nutcracker']}; pymemcache {info['pymemcache']}; pyzmq {info['pyzmq']}; "
          f"python {info['python']}; commit {info['commit']}", file=out)
    print(f"{rounds} round(s) x {seconds} s per path, paths interleaved in each round; ratios are medians of per-round "
          f"ratios; CPU columns are us of CPU per key (all threads, /proc utime+stime)"
          + ("; QUICK MODE (1 round, fewer workers): not a measurement" if args.quick else ""), file=out)
    for entry in scenarios_out:
        print(f"\n## {entry['name']}: {entry['what']} ({entry['workers']} workers)", file=out)
        for note in entry["notes"]:
            print(f"- {note}", file=out)
        if entry["failed"]:
            print(f"- FAILED: {entry['failed']}", file=out)
        if entry["summaries"]:
            print(report.scenario_table(entry["summaries"], entry["unit"]), file=out)
    print("\n## Targets\n" + report.targets_table(targets), file=out)
    checks = report.model_check(summaries)
    if checks:
        print("\ndesign bound: the best ratio this design could reach in this run if the broker's own work cost "
              "nothing (a bare ZeroMQ echo in its place, plus the memcached CPU the broker path used); for the "
              "worker CPU, a raw DEALER's; for the latencies, the ZeroMQ hop alone (echo minus direct). "
              "Throughput model it rests on (cores / total CPU per op):", file=out)
        for line in checks:
            print(f"- {line}", file=out)
    print("\npaths: " + "; ".join(f"{k}: {v}" for k, v in PATH_HELP.items()), file=out)
    if failures:
        print("\n" + "\n".join(failures), file=out)

    if args.json:
        doc = {
            "machine": info, "settings": {"rounds": rounds, "seconds": seconds, "quick": args.quick,
                                          "value_size": args.value_size, "coalesce": args.coalesce},
            "scenarios": scenarios_out, "targets": targets, "failures": failures,
            "rounds": [{k: v for k, v in r.items() if k != "samples"} for r in rows],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.charts:
        from .charts import render

        try:
            written = render(Path(args.charts), scenarios_out, info)
        except RuntimeError as exc:
            say(f"bench: {exc}")
            return 1
        say(f"bench: {len(written)} charts in {args.charts}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:<14} {sc.what}  [paths: {', '.join(sc.paths)}]")
        return 0
    try:
        return run(args)
    except BenchError as exc:
        say(f"bench: {exc}")
        return 1
    except KeyboardInterrupt:
        say("bench: interrupted; everything started was stopped")
        return 130
