"""bench/report.py's design bounds: the best ratio the design could show in a run, from the same
run's echo path (pure code: summaries in, numbers out)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report


def _summary(scenario: str, path: str, **cols: Any) -> dict[str, Any]:
    return {"scenario": scenario, "path": path, **cols}


# One get-32 run, numbers shaped like a real one: us of CPU per op by process, and ops/s.
GET32 = [
    _summary("get-32", "direct", ops_median=43_000.0, worker_cpu_us=28.0, mc_cpu_us=18.0),
    _summary("get-32", "twemproxy", ops_median=26_000.0, worker_cpu_us=34.0, twemproxy_cpu_us=26.0, mc_cpu_us=16.0),
    _summary("get-32", "broker", ops_median=14_000.0, worker_cpu_us=73.0, broker_cpu_us=57.0, mc_cpu_us=7.0,
             vs_direct=0.33, vs_twemproxy=0.54, **{"vs_zmq-echo": 0.56}),
    _summary("get-32", "zmq-echo", ops_median=25_000.0, worker_cpu_us=53.0, echo_cpu_us=25.0),
]
RAN = {"get-32": {"workers": 32, "pending": False, "failed": None}}


def _by(summaries: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["scenario"], s["path"]): s for s in summaries}


def test_total_cpu_adds_every_process_of_a_path() -> None:
    by = _by(GET32)
    assert report.total_cpu(by, "get-32", "direct") == 28.0 + 18.0
    assert report.total_cpu(by, "get-32", "twemproxy") == 34.0 + 26.0 + 16.0
    assert report.total_cpu(by, "get-32", "zmq-echo") == 53.0 + 25.0
    assert report.total_cpu(by, "get-32", "raw") is None


def test_bound_is_the_reference_total_over_the_echo_total_plus_the_broker_paths_memcached_cpu() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(GET32, RAN)}
    echo_plus_mc = 53.0 + 25.0 + 7.0
    assert rows["32 workers single get: broker / direct"]["bound"] == pytest.approx((28.0 + 18.0) / echo_plus_mc, abs=1e-3)
    assert rows["same run: broker / twemproxy"]["bound"] == pytest.approx((34.0 + 26.0 + 16.0) / echo_plus_mc, abs=1e-3)
    assert rows["same run: broker / bare ZeroMQ echo"]["bound"] == pytest.approx((53.0 + 25.0) / echo_plus_mc, abs=1e-3)
    # A raw DEALER's CPU per get over direct's bounds the worker CPU target.
    assert rows["worker CPU per single get (32 workers): broker path / direct"]["bound"] == pytest.approx(53.0 / 28.0, abs=1e-3)


def test_a_target_its_bound_misses_says_so_and_one_within_reach_is_a_plain_fail() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(GET32, RAN)}
    # 46 / 85 = 0.54 < 0.6: even a broker that cost nothing would miss.
    assert rows["32 workers single get: broker / direct"]["status"] == "FAIL (bound misses too)"
    # 76 / 85 = 0.89 < 0.9 likewise; 78 / 85 = 0.92 >= 0.9 is within reach: a plain FAIL.
    assert rows["same run: broker / twemproxy"]["status"] == "FAIL (bound misses too)"
    assert rows["same run: broker / bare ZeroMQ echo"]["status"] == "FAIL"
    # 53 / 28 = 1.89 > 1.5.
    assert rows["worker CPU per single get (32 workers): broker path / direct"]["status"] == "FAIL (bound misses too)"


def test_a_passing_target_passes_whatever_its_bound() -> None:
    fast = [dict(s) for s in GET32]
    fast[2]["vs_zmq-echo"] = 0.95
    rows = {t["target"]: t for t in report.evaluate_targets(fast, RAN)}
    assert rows["same run: broker / bare ZeroMQ echo"]["status"] == "pass"


def test_no_echo_path_no_bound() -> None:
    without_echo = [s for s in GET32 if s["path"] != "zmq-echo"]
    rows = {t["target"]: t for t in report.evaluate_targets(without_echo, RAN)}
    assert rows["32 workers single get: broker / direct"]["bound"] is None
    assert rows["32 workers single get: broker / direct"]["status"] == "FAIL"


def test_latency_bound_is_the_echo_hop_over_direct() -> None:
    b2b = [
        _summary("latency-b2b", "direct", p50_us=85.0, p99_us=187.0),
        _summary("latency-b2b", "broker", p50_us=361.0, p99_us=616.0),
        _summary("latency-b2b", "zmq-echo", p50_us=131.0, p99_us=284.0),
    ]
    rows = {t["target"]: t for t in report.evaluate_targets(b2b, {"latency-b2b": {"workers": 1}})}
    p50 = rows["1 worker back to back: added p50 over direct"]
    assert (p50["value"], p50["bound"], p50["status"]) == (361.0 - 85.0, 131.0 - 85.0, "FAIL")
    p99 = rows["1 worker back to back: added p99 over direct"]
    assert (p99["value"], p99["bound"]) == (616.0 - 187.0, 284.0 - 187.0)


def test_model_check_sets_the_predicted_ratio_beside_the_measured_one() -> None:
    lines = report.model_check(GET32)
    # Predicted: direct's total over the path's total; measured: ops ratio (echo) or vs_direct.
    assert lines == [
        f"get-32: zmq-echo / direct predicted {46.0 / 78.0:.2f}, measured {25_000 / 43_000:.2f}; "
        f"broker / direct predicted {46.0 / 137.0:.2f}, measured 0.33"
    ]


def test_the_table_shows_the_bound_column() -> None:
    table = report.targets_table(report.evaluate_targets(GET32, RAN))
    header = table.splitlines()[0]
    assert "design bound" in header
    row = next(line for line in table.splitlines() if line.startswith("| 32 workers single get: broker / direct"))
    assert "0.54" in row and "FAIL (bound misses too)" in row


# The floor path (bench/floor.py): the least Python any broker of this design runs, in the same run.
GETMANY8 = [
    _summary("getmany-8", "direct", ops_median=555_000.0, worker_cpu_us=3.0, mc_cpu_us=0.6),
    _summary("getmany-8", "twemproxy", ops_median=486_000.0, worker_cpu_us=3.0, twemproxy_cpu_us=0.5, mc_cpu_us=0.6),
    _summary("getmany-8", "broker", ops_median=310_000.0, worker_cpu_us=1.9, broker_cpu_us=2.6, mc_cpu_us=0.8,
             vs_direct=0.56, vs_twemproxy=0.64),
    _summary("getmany-8", "floor", ops_median=452_000.0, worker_cpu_us=1.6, broker_cpu_us=1.6, mc_cpu_us=0.9,
             vs_direct=0.81, vs_twemproxy=0.93),
    _summary("getmany-8", "zmq-echo", ops_median=2_250_000.0, worker_cpu_us=0.6, echo_cpu_us=0.3),
]
RAN8 = {"getmany-8": {"workers": 8, "pending": False, "failed": None}}


def test_a_target_the_floor_misses_too_says_so() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(GETMANY8, RAN8)}
    direct = rows["8 workers get_many(100): broker / direct"]
    # The echo bound (3.6 / (0.9 + 0.8) = 2.1) is within reach; the floor's 0.81 is not.
    assert (direct["value"], direct["floor"]) == (0.56, 0.81)
    assert direct["bound"] == pytest.approx(3.6 / (0.6 + 0.3 + 0.8), abs=1e-3)
    assert direct["status"] == "FAIL (floor misses too)"
    assert rows["8 workers get_many(100): broker / twemproxy"]["status"] == "FAIL (floor misses too)"
    # The floor's own CPU per key (its process stands where the broker does) meets 2 us: a plain FAIL.
    cpu = rows["broker CPU per key in get_many(100), 8 workers"]
    assert (cpu["value"], cpu["floor"], cpu["status"]) == (2.6, 1.6, "FAIL")


def test_a_bound_that_misses_is_said_before_the_floor() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(GET32 + [
        _summary("get-32", "floor", ops_median=20_000.0, worker_cpu_us=60.0, broker_cpu_us=30.0, mc_cpu_us=6.0,
                 vs_direct=0.46)], RAN)}
    row = rows["32 workers single get: broker / direct"]
    assert (row["floor"], row["status"]) == (0.46, "FAIL (bound misses too)")
    # The floor's worker runs clientlib as the broker's does: 60 / 28.
    assert rows["worker CPU per single get (32 workers): broker path / direct"]["floor"] == pytest.approx(60.0 / 28.0, abs=1e-3)


def test_no_floor_path_no_floor_value() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets([s for s in GETMANY8 if s["path"] != "floor"], RAN8)}
    row = rows["8 workers get_many(100): broker / direct"]
    assert (row["floor"], row["status"]) == (None, "FAIL")


def test_summaries_give_the_floor_its_ratios_and_the_broker_its_ratio_to_the_floor() -> None:
    rounds = [
        {"scenario": "get-8", "path": path, "round": rnd, "ops_per_s": ops, "calls": 10, "workers": 8}
        for rnd, (d, b, f) in enumerate([(70_000.0, 12_000.0, 15_000.0), (60_000.0, 12_600.0, 15_750.0)])
        for path, ops in (("direct", d), ("broker", b), ("floor", f))
    ]
    by = {s["path"]: s for s in report.summarize(rounds)}
    # The median of the per-round ratios: (12/15, 12.6/15.75) = (0.8, 0.8); (15/70, 15.75/60).
    assert by["broker"]["vs_floor"] == pytest.approx(0.8, abs=1e-3)
    assert by["floor"]["vs_direct"] == pytest.approx((15 / 70 + 15.75 / 60) / 2, abs=1e-3)
    assert "vs_floor" not in by["floor"] and "vs_broker" not in by["floor"]
    assert "vs_direct" not in by["direct"]


def test_the_table_shows_the_floor_column() -> None:
    table = report.targets_table(report.evaluate_targets(GETMANY8, RAN8))
    header = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    assert header.index("floor") == header.index("design bound") + 1
    row = next(line for line in table.splitlines() if line.startswith("| 8 workers get_many(100): broker / direct"))
    assert "0.81" in row and "FAIL (floor misses too)" in row


def test_memcached_cpu_shows_the_floors_value_but_never_calls_it_a_bound() -> None:
    # memcached's CPU per get falls with the requests per write, which the floor's shorter turns
    # make fewer: its value is shown beside the broker's, and a miss it shares is a plain FAIL.
    rows = {t["target"]: t for t in report.evaluate_targets(GET32 + [
        _summary("get-32", "floor", ops_median=20_000.0, worker_cpu_us=60.0, broker_cpu_us=30.0, mc_cpu_us=6.0,
                 vs_direct=0.46)], RAN)}
    row = rows["memcached CPU per get at 32 workers: broker / direct"]
    assert row["floor"] is not None and row["floor"] > 0.2 and row["value"] > 0.2
    assert row["status"] == "FAIL"


# The floor with the guarantees' work added (bench/floor.py --rcvhwm 2 --opaques --fence), in the
# same run: where the plain floor meets a target and it does not, the verdict says so.
GUARDED8 = [
    *(s for s in GETMANY8 if s["path"] in ("direct", "twemproxy", "zmq-echo")),
    _summary("getmany-8", "broker", ops_median=430_000.0, worker_cpu_us=1.6, broker_cpu_us=2.1, mc_cpu_us=0.8,
             vs_direct=0.78, vs_twemproxy=0.98),
    _summary("getmany-8", "floor", ops_median=530_000.0, worker_cpu_us=1.5, broker_cpu_us=1.3, mc_cpu_us=0.8,
             vs_direct=0.96, vs_twemproxy=1.19),
    _summary("getmany-8", "floor-guarded", ops_median=440_000.0, worker_cpu_us=1.6, broker_cpu_us=1.8, mc_cpu_us=0.8,
             vs_direct=0.80, vs_twemproxy=0.99),
]


def test_a_target_the_plain_floor_meets_and_the_guarded_floor_misses_says_so() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(GUARDED8, RAN8)}
    direct = rows["8 workers get_many(100): broker / direct"]
    assert (direct["value"], direct["floor"], direct["guarded"]) == (0.78, 0.96, 0.80)
    assert direct["status"] == "FAIL (guarded floor misses too)"
    assert rows["8 workers get_many(100): broker / twemproxy"]["status"] == "FAIL (guarded floor misses too)"
    # Both floors meet 2 us of CPU per key: the broker's 2.1 is a plain FAIL.
    cpu = rows["broker CPU per key in get_many(100), 8 workers"]
    assert (cpu["floor"], cpu["guarded"], cpu["status"]) == (1.3, 1.8, "FAIL")


def test_a_target_both_floors_miss_is_said_for_the_plain_floor_first() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(
        [dict(s, vs_direct=0.70) if s["path"] == "floor" else s for s in GUARDED8], RAN8)}
    assert rows["8 workers get_many(100): broker / direct"]["status"] == "FAIL (floor misses too)"


def test_a_target_the_guarded_floor_meets_is_a_plain_fail() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(
        [dict(s, vs_direct=0.97) if s["path"] == "floor-guarded" else s for s in GUARDED8], RAN8)}
    assert rows["8 workers get_many(100): broker / direct"]["status"] == "FAIL"


def test_a_guarded_floor_without_a_plain_floor_gives_no_verdict_of_its_own() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets([s for s in GUARDED8 if s["path"] != "floor"], RAN8)}
    row = rows["8 workers get_many(100): broker / direct"]
    assert (row["floor"], row["guarded"], row["status"]) == (None, 0.80, "FAIL")


def test_no_guarded_floor_path_no_guarded_value() -> None:
    rows = {t["target"]: t for t in report.evaluate_targets(GETMANY8, RAN8)}
    assert rows["8 workers get_many(100): broker / direct"]["guarded"] is None


def test_the_table_shows_the_guarded_floor_column() -> None:
    table = report.targets_table(report.evaluate_targets(GUARDED8, RAN8))
    header = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    assert header.index("guarded floor") == header.index("floor") + 1
    row = next(line for line in table.splitlines() if line.startswith("| 8 workers get_many(100): broker / direct"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[header.index("floor")] == "0.96" and cells[header.index("guarded floor")] == "0.80"
    assert cells[header.index("result")] == "FAIL (guarded floor misses too)"


def test_the_guarded_floor_carries_its_ratio_to_the_floor_and_the_broker_its_ratio_to_both() -> None:
    rounds = [
        {"scenario": "getmany-8", "path": path, "round": rnd, "ops_per_s": ops, "calls": 10, "workers": 8}
        for rnd, (d, b, f, g) in enumerate([(500.0, 400.0, 480.0, 400.0), (600.0, 420.0, 525.0, 420.0)])
        for path, ops in (("direct", d), ("broker", b), ("floor", f), ("floor-guarded", g))
    ]
    by = {s["path"]: s for s in report.summarize(rounds)}
    assert by["floor-guarded"]["vs_floor"] == pytest.approx((400 / 480 + 420 / 525) / 2, abs=1e-3)
    assert by["broker"]["vs_floor-guarded"] == pytest.approx(1.0, abs=1e-3)
    assert "vs_floor-guarded" not in by["floor"] and "vs_floor-guarded" not in by["floor-guarded"]
