"""The soak (not in CI): minutes of mixed, self-verifying load with faults injected periodically.

    python -m bench.soak --minutes 5 [--procs 4] [--threads 4] [--servers 3] [--fault-every 12] [--seed 1]
                         [--faults latency,mc_kill,truncate,bandwidth,mc_stop,duplicate,slicer,reset_peer,blackhole,broker_kill]

Three memcached servers (tests/harness.py), each behind its own fault proxy (tests/faultproxy.py),
one broker (tests/brokerproc.py); forked worker processes x threads run tests/verify.py's
self-verifying mix (get, get_many, set, delete; every value names its key, writer and sequence).
Every --fault-every seconds one fault from a fixed rotation hits one server (or the broker):
latency, bandwidth, slicer, blackhole, reset_peer, truncate, duplicate on a proxy; memcached
kill -9 + restart (under slow_close); memcached SIGSTOP / SIGCONT; broker kill -9 + restart.

Printed at the end (and exit status 1 if any of the first three is not as stated):
- misdelivered: values that named another key or writer (must be 0);
- acknowledged writes lost: reads of a state no acknowledged write could have left (must be 0),
  not counting keys of a memcached that was killed between the write and the read (listed apart);
  evictions and expiry cannot occur (no TTLs; memcached's own `evictions` is printed to show it);
- reconciliation: the live broker's counters (since its last restart) against what the workers
  sent and received, line by line;
- operations by outcome, the faults injected, calls over deadline + tolerance, broker RSS.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from brokerproc import BrokerProcess  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from harness import Memcached  # noqa: E402
from pool import owners  # noqa: E402
from timing import LATE  # noqa: E402
from verify import Tally, run_worker  # noqa: E402

TIMEOUT = 1.0
TOLERANCE = LATE  # tests/timing.py: how late a loaded machine may run any call
KEYS_PER_THREAD = 16


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.servers = [Memcached().start() for _ in range(args.servers)]
        self.proxies = [FaultProxy(s.address, seed=args.seed + i, max_seconds=args.minutes * 60 + 600).start()
                        for i, s in enumerate(self.servers)]
        self.addresses = [p.address for p in self.proxies]
        self.broker = BrokerProcess(self.addresses, timeout_ms=int(TIMEOUT * 1000), io_timeout_ms=1500)
        self.broker.start(ping=False)
        self.kills: list[tuple[str, float, float]] = []  # proxy address, killed, restarted
        self.faults: Counter[str] = Counter()
        self.broker_rss_max = 0.0

    # --- faults --------------------------------------------------------------------------------

    def toxic(self, name: str, seconds: float, **params: Any) -> Callable[[int], None]:
        def fault(i: int) -> None:
            self.proxies[i].set(name, **params)
            time.sleep(seconds)
            self.proxies[i].clear()
        fault.__name__ = name
        return fault

    def mc_kill(self, i: int) -> None:
        self.proxies[i].set("slow_close", delay_ms=300, stream="both")
        killed = time.monotonic()
        self.servers[i].kill()
        time.sleep(1.0)
        self.servers[i].restart()
        self.kills.append((self.addresses[i], killed, time.monotonic()))
        self.proxies[i].clear()

    def mc_stop(self, i: int) -> None:
        self.servers[i].pause()
        time.sleep(1.5)
        self.servers[i].resume()

    def reset_pulses(self, i: int) -> None:
        for _ in range(3):
            self.proxies[i].set("reset_peer", timeout_ms=0)
            time.sleep(0.1)
            self.proxies[i].clear()
            time.sleep(0.5)

    def broker_kill(self, _i: int) -> None:
        self.broker_rss_max = max(self.broker_rss_max, rss_mib(self.broker.pid))
        self.broker.kill()
        # A reply the old broker sent just before the kill may still wait in a worker's queue:
        # the workers take it (their calls fail fast meanwhile) before the generation turns, so
        # that the replies counted from then on come from the new broker (as test_process_faults
        # does; bumped at once, two old replies were once counted as the new broker's).
        time.sleep(0.3)
        self.gen.value += 1
        self.broker.start(ping=False)

    def rotation(self) -> list[Callable[[int], None]]:
        return [
            self.toxic("latency", 4, latency_ms=20, jitter_ms=15, stream="both"),
            self.mc_kill,
            self.toxic("truncate", 4, every=10, drop=3),
            self.toxic("bandwidth", 4, rate_kbps=128),
            self.mc_stop,
            self.toxic("duplicate", 4, every=10),
            self.toxic("slicer", 3, size=1, stream="both"),
            self.reset_pulses,
            self.toxic("blackhole", 1.5),
            self.broker_kill,
        ]

    # --- run -------------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        seconds = a.minutes * 60
        prefix = f"soak-{uuid.uuid4().hex[:8]}"
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        stop = ctx.Event()
        self.gen = ctx.Value("i", 0)
        procs = [
            ctx.Process(target=run_worker,
                        args=(self.broker.url, w, a.threads, seconds, 10_000_000, TIMEOUT, TOLERANCE, prefix,
                              KEYS_PER_THREAD, out, a.seed),
                        kwargs={"stop": stop, "gen": self.gen})
            for w in range(a.procs)
        ]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        end = t0 + seconds
        faults = self.rotation()
        if a.faults:
            by_name = {getattr(f, "__name__", ""): f for f in faults}
            unknown = [x for x in a.faults if x not in by_name]
            if unknown:
                raise SystemExit(f"unknown faults {unknown}; known: {', '.join(by_name)}")
            faults = [by_name[x] for x in a.faults]
        n = 0
        print(f"soak: {a.minutes} min, {a.procs} processes x {a.threads} threads, {a.servers} servers, "
              f"a fault every {a.fault_every}s, seed {a.seed}", flush=True)
        try:
            while time.monotonic() + a.fault_every < end:
                time.sleep(a.fault_every)
                fault = faults[n % len(faults)]
                if getattr(fault, "__name__", "") == "broker_kill" and len(faults) > 1 and end - time.monotonic() < 0.4 * seconds:
                    # The live broker's counters are reconciled at the end: keep its generation long.
                    n += 1
                    fault = faults[n % len(faults)]
                i = self.rng.randrange(len(self.servers))
                name = getattr(fault, "__name__", "fault")
                target = "broker" if name == "broker_kill" else self.addresses[i]
                print(f"  {time.monotonic() - t0:7.1f}s  {name} on {target}", flush=True)
                fault(i)
                self.faults[name] += 1
                self.broker_rss_max = max(self.broker_rss_max, rss_mib(self.broker.pid))
                n += 1
            time.sleep(max(0.0, end - time.monotonic()))
        finally:
            stop.set()
        tallies = []
        deadline = time.monotonic() + TIMEOUT + 120
        while len(tallies) < a.procs and time.monotonic() < deadline:
            try:
                tallies.append(out.get(timeout=0.5))
            except Exception:  # queue.Empty
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        total = Tally()
        for t in tallies:
            total = total + t
        return self.report(total, len(tallies), time.monotonic() - t0)

    def report(self, t: Tally, reported: int, elapsed: float) -> int:
        a = self.args
        after = self.broker.stats()
        self.broker_rss_max = max(self.broker_rss_max, rss_mib(self.broker.pid))
        g = self.gen.value
        mine = t.by_gen.get(g, Counter())
        where = owners(self.addresses, [x[0] for x in t.lost])
        excused, lost = [], []
        for x in t.lost:
            key, since, at, _ = x
            if any(addr == where[key] and since <= up and at >= down for addr, down, up in self.kills):
                excused.append(x)
            else:
                lost.append(x)
        evictions = sum(int(s.stats().get("evictions", 0)) for s in self.servers)
        ok = True
        print(f"\nworkers reporting: {reported} of {a.procs}; elapsed {elapsed:.0f}s")
        print(f"operations: {t.calls} calls ({t.calls / max(elapsed, 1):.0f}/s), {t.ops} ops in {t.frames} frames")
        print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items())))
        print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())))
        print(f"misdelivered: {len(t.misdelivered)}")
        print(f"acknowledged writes lost: {len(lost)} (not counted: {len(excused)} reads of keys of a killed "
              f"memcached, {len(self.kills)} kills; memcached evictions {evictions}; no TTLs, so no expiry)")
        for x in (t.misdelivered + [str(y) for y in lost])[:10]:
            print(f"    {x}")
        print(f"calls over deadline + {TOLERANCE}s: {len(t.late)}; longest call {t.max_took:.3f}s "
              f"(deadline {TIMEOUT}s)")
        print(f"reply frames: {t.replies} received for {t.frames} sent; duplicates {t.dup_replies}, "
              f"unknown {t.unknown_replies}, never answered {t.unanswered} (sent to a broker that was then "
              f"killed; {t.outcomes['timeout']} calls timed out); {t.unsent} more failed at the send "
              f"(BrokerUnavailable: no broker listening)")
        for gen in sorted(t.by_gen):
            c = t.by_gen[gen]
            print(f"  broker generation {gen}: frames sent {c['frames']}, replies received {c['replies']}, "
                  f"ok {c['ok']}, miss {c['miss']}, errors {c['errors']}, timeouts {c['timeouts']}")
        checks = [
            # the final stats call: one frame and one op in, its reply and ok not yet counted
            ("frames in (live broker) - 1", after["frames"] - 1,
             "= replies + replies_dropped + noreply + dropped_frames",
             after["replies"] + after["replies_dropped"] + after["noreply"] + after["dropped_frames"]),
            ("ops in - 1", after["ops"] - 1, "= ok + miss + errors + timeouts",
             after["ok"] + after["miss"] + after["errors"] + after["timeouts"]),
            ("replies sent", after["replies"], "= replies the workers received from it", mine["replies"]),
        ] + [(f"{c} counted", after[c], "= carried by the replies received", mine[c])
             for c in ("ok", "miss", "errors", "timeouts")]
        print(f"reconciliation (broker generation {g}, since its {'start' if g == 0 else 'restart'}; "
              f"pid {after['pid']}):")
        for left, lv, rel, rv in checks:
            good = lv == rv
            ok &= good
            print(f"  {left} {lv} {rel} {rv}: {'ok' if good else 'MISMATCH'}")
        sent_to_it = after["frames"] - 1
        print(f"  frames the workers sent in this generation {mine['frames']}, received by it {sent_to_it} "
              f"(the difference: sent while it was starting and not accepted before their deadline)")
        ok &= 0 <= mine["frames"] - sent_to_it
        for c in ("bad_frames", "internal_errors", "replies_dropped"):
            print(f"  {c}: {after[c]}")
            ok &= after[c] == 0
        ok &= t.dup_replies == 0 and t.unknown_replies == 0 and t.unanswered <= t.outcomes["timeout"]
        print(f"broker RSS: max {self.broker_rss_max:.1f} MiB")
        ok &= not t.misdelivered and not lost and not t.crashed and not t.late and reported == a.procs
        if t.crashed:
            print("worker crashed:\n" + t.crashed[0])
        print("RESULT: " + ("PASS" if ok else "FAIL"))
        return 0 if ok else 1

    def close(self) -> None:
        self.broker.cleanup()
        for p in self.proxies:
            p.stop()
        for s in self.servers:
            s.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="mcbroker soak: self-verifying load with periodic faults")
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--fault-every", type=float, default=12.0, help="seconds between faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", type=lambda v: [x for x in v.split(",") if x], default=[],
                    help="comma-separated faults to rotate through (default: all, in a fixed order)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.minutes > 24 * 60 or not 1 <= args.procs <= 64 or not 1 <= args.threads <= 64:
        ap.error("--minutes in (0, 1440], --procs and --threads in [1, 64]")
    soak = Soak(args)
    try:
        return soak.run()
    finally:
        soak.close()


if __name__ == "__main__":
    sys.exit(main())
