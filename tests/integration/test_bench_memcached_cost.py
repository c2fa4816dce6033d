"""bench/memcached_cost.py: it drives a real memcached with every load and reports numbers that can
be true (never a timing bound); its writes are memcached's own protocol, checked against the text
of protocol.txt here."""

from __future__ import annotations

import re

import pytest

from bench import memcached_cost

pytestmark = pytest.mark.integration


def test_the_broker_write_is_gets_with_opaques_in_turn_then_the_fence() -> None:
    # protocol.txt, Meta Get: "mg <key> <flags>*\r\n"; O(token) is echoed, and a miss of the fence
    # key is "EN O<token>" with the fence's opaque.
    data, end = memcached_cost.meta_write([b"a", b"bb"], 7)
    assert data == b"mg a v f s O7\r\nmg bb v f s O8\r\nmg _mcbroker_fence_ O9\r\n"
    assert end == b"EN O9\r\n"


def test_the_classic_write_is_one_multi_key_get_ended_by_END() -> None:
    # protocol.txt, Commands: "get <key>*\r\n" ... "After all the items have been transmitted, the
    # server sends the string "END\r\n"".
    assert memcached_cost.classic_write([b"a", b"bb"]) == (b"get a bb\r\n", b"END\r\n")


def test_a_short_run_reports_every_load_with_plausible_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert memcached_cost.main(["--seconds", "0.1", "--rounds", "1", "--connections", "4"]) == 0
    out = capsys.readouterr().out
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([a-z -]+?[0-9]*) \| ([0-9,]+) \| ([0-9.]+) \| [0-9.]+-[0-9.]+ \| ([0-9.]+) \|$", out, re.M)}
    want = ["direct-like", *(f"meta {n}" for n in memcached_cost.META_SIZES), *(f"classic {n}" for n in memcached_cost.CLASSIC_SIZES)]
    assert list(rows) == want, out
    for name, (rate, cost, ratio) in rows.items():
        assert float(rate.replace(",", "")) > 0 and float(cost) > 0 and float(ratio) > 0, (name, out)
    assert rows["direct-like"][2] == "1.00", out


def test_a_wrong_answer_stops_the_run() -> None:
    # Only whole, right answers are counted: a write whose answer holds fewer hits than gets (here
    # keys never stored, so misses) raises rather than being timed.
    import socket
    import tempfile
    from pathlib import Path

    from bench.procs import split_address, start_memcached

    with tempfile.TemporaryDirectory() as tmp:
        mc, address = start_memcached(Path(tmp), "t")
        try:
            with socket.create_connection(split_address(address), timeout=5) as s:
                with pytest.raises(RuntimeError, match="0 hits for 3 gets"):
                    memcached_cost.batches(s, [b"never-stored"], 3, 0.05, classic=False)
            with socket.create_connection(split_address(address), timeout=5) as s:
                with pytest.raises(RuntimeError, match="a miss or an error"):
                    memcached_cost.one_each([s], [b"never-stored"], 0.05)
        finally:
            mc.stop()
