"""bench/broker_stages.py: it runs the broker's real objects end to end and says so only when every
reply was right; here a short run, checked for its rows and for numbers that can be true (never a
timing bound)."""

from __future__ import annotations

import re

import pytest

from bench import broker_stages
from broker import meta

pytestmark = pytest.mark.integration


def test_the_fake_memcached_answers_as_protocol_txt_says() -> None:
    # Meta Get with v f s O: "VA <size> <flags>*\r\n<data block>\r\n", a miss "EN"; opaque echoed.
    sent = meta.encode_gets([b"a", b"bb"], 7) + b"mg _mcbroker_fence_ O9\r\n"
    assert broker_stages.answers(sent, b"xyz") == b"VA 3 f0 s3 O7\r\nxyz\r\nVA 3 f0 s3 O8\r\nxyz\r\nEN O9\r\n"


@pytest.mark.parametrize("form", [[], ["--per-op"]], ids=["GET_MANY", "per-op"])
def test_a_short_run_prints_every_stage_with_plausible_numbers(capsys: pytest.CaptureFixture[str], form: list[str]) -> None:
    assert broker_stages.main(["--keys", "20", "--frames", "30", "--rounds", "1", *form]) == 0
    out = capsys.readouterr().out
    # | name | alone | in the path | floor | share |
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([^|]+?) \|\s*(-?[0-9.]*)\s*\|\s*(-?[0-9.]*)\s*\|\s*([0-9.]*)\s*\|\s*(-?[0-9]*%?)\s*\|$", out, re.M)}
    assert set(rows) == {
        "whole path (handle, flush, on_readable)", "sockets", "decode", "encode", "parse", "reply",
        "reads (coalescing on minus off)", "the rest: routing, batches, the pipeline's bookkeeping",
        "the rest, us per frame", "whole path, coalescing off", "whole path, coalescing off, with the stage clocks",
        "the clocks' own cost (a difference of two runs; in the rest above)",
    }, out
    for name in ("whole path (handle, flush, on_readable)", "sockets", "decode", "encode", "parse", "reply",
                 "whole path, coalescing off", "whole path, coalescing off, with the stage clocks"):
        assert float(rows[name][0]) > 0, (name, out)
    for name in ("decode", "encode", "parse", "reply"):
        assert float(rows[name][1]) > 0, (name, "in the path", out)  # each stage's clock saw its calls
    assert all(float(rows[name][2]) > 0 for name in ("decode", "encode", "parse")), out
    # The shares of the clocked run: sockets, the four stages in the path and the rest make it whole.
    shares = [int(rows[name][3].rstrip("%")) for name in ("sockets", "decode", "encode", "parse", "reply",
                                                           "the rest: routing, batches, the pipeline's bookkeeping")]
    assert abs(sum(shares) - 100) <= 3, (shares, out)  # each share rounded to a whole percent


def test_the_stage_clocks_count_each_stage_and_put_the_functions_back() -> None:
    from broker import router as router_module

    before = {(owner, name): owner.__dict__[name] for functions in broker_stages.STAGE_FUNCTIONS.values() for owner, name in functions}
    keys = [b"k%d" % i for i in range(20)]
    whole, parts = broker_stages.in_path(keys, 5, b"v", False)
    assert whole > 0 and set(parts) == {"decode", "encode", "parse", "reply"}
    assert all(t > 0 for t in parts.values()), parts
    after = {(owner, name): owner.__dict__[name] for owner, name in before}
    assert after == before, "every function is the broker's own again"
    assert router_module.decode_request is broker_stages.decode_request

    spent: dict[str, float] = {}
    with pytest.raises(RuntimeError, match="wrong reply"):
        with broker_stages.stage_clocks(spent):
            broker_stages.whole_path(keys, 2, b"v", False, answer=lambda sent, value: broker_stages.answers(sent, b"w"))
    assert {(owner, name): owner.__dict__[name] for owner, name in before} == before, "put back after an error too"


@pytest.mark.parametrize("servers", [1, 3])
def test_a_wrong_reply_stops_the_run(servers: int) -> None:
    # The whole-path figure counts only runs whose every reply was right: a value that memcached
    # did not send must raise, not be timed.
    keys = [b"k%d" % i for i in range(20)]
    with pytest.raises(RuntimeError, match="wrong reply"):
        broker_stages.whole_path(keys, 2, b"v", True, servers=servers, answer=lambda sent, value: broker_stages.answers(sent, b"w"))


def test_over_several_servers_every_server_is_asked_and_the_reply_is_whole() -> None:
    # 20 keys over 3 servers by the broker's placement: each server's scripted memcached answers
    # its own batch, and the run completes only when every frame's reply carries every key.
    asked: list[bytes] = []

    def answer(sent: bytes, value: bytes) -> bytes:
        asked.append(sent)
        return broker_stages.answers(sent, value)

    keys = [b"k%d" % i for i in range(20)]
    assert broker_stages.whole_path(keys, 3, b"v", False, answer=answer, servers=3) > 0
    assert len(asked) == 3 * 3, "one batch per server per frame"
    assert sum(sent.count(b" v f s O") for sent in asked) == 3 * 20, "every key asked once per frame"


def test_a_short_run_over_servers_prints_what_each_further_batch_adds(capsys: pytest.CaptureFixture[str]) -> None:
    assert broker_stages.main(["--keys", "20", "--frames", "30", "--rounds", "1", "--servers", "3"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| ([^|]+?) \| (-?[0-9.]+) \|", out, re.M))
    assert float(rows["whole path over 3 servers, coalescing off"]) > 0, out
    assert "each further server's batch, us per frame" in rows, out  # a difference of timings: any sign


def test_frames_are_what_clientlib_sends() -> None:
    from clientlib.wire import Op

    assert broker_stages.frame_ops([b"a", b"b"]) == [[Op.GET_MANY, [b"a", b"b"]]]
    assert broker_stages.frame_ops([b"a", b"b"], per_op=True) == [[Op.GET, b"a"], [Op.GET, b"b"]]
    assert broker_stages.frame_ops([b"a"]) == [[Op.GET, b"a"]]
