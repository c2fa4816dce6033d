"""The fence's fast path (`ResponseParser.take_exact` of `EN O<n>`) against the general path, event
for event, on streams that are right and streams that are wrong.

tests/unit/test_pipeline.py runs each of its cases both ways; this adds random streams: writes of
plain gets (and a set, a delete) each closed by a fence, answered as memcached does or with one
fault (the fence answered HD, by the wrong opaque, with an extra token, before its write's last
answer, left out; an error line, CLIENT_ERROR to a set right after a fence that proved a value
holding CRLF; a value holding CRLF and `EN O<n>`; a swallowed response), fed
in random pieces. The run with the fast path and the run without must give the same results to
the same waiters at the same points of the feed, the same OutOfStep (or none), and leave the same
counts behind."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from broker.meta import ResponseParser
from broker.pipeline import Batch, OutOfStep, Pipeline
from broker.translate import encode_op
from clientlib.wire import Code, Op

pytestmark = pytest.mark.unit


class _Waiter:
    def __init__(self, name: str, log: list[Any]) -> None:
        self.name, self.log, self.done = name, log, False

    def deliver(self, index: int, result: list[Any]) -> None:
        self.log.append((self.name, index, result))

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        for i, r in zip(indices, results):
            self.log.append((self.name, i, r))

    def fail(self, index: int, code: Code, message: str) -> None:
        self.log.append((self.name, index, ("failed", code)))


# One write: its ops ("get" with an answer kind, "set", "delete"), then how its fence is answered.
_GET_ANSWERS = st.sampled_from(["miss", "hit", "crlf", "fence-look-alike", "server_error", "client_error"])
_OPS = st.lists(st.one_of(_GET_ANSWERS.map(lambda a: ("get", a)), st.sampled_from([("set", "HD"), ("set", "client_error")]),
                          st.just(("delete", "NF"))),
                min_size=1, max_size=5)
_FENCE = st.sampled_from(["EN", "EN", "EN", "HD", "wrong-opaque", "extra-token", "early", "missing", "error"])
_WRITES = st.lists(st.tuples(_OPS, _FENCE, st.booleans()), min_size=1, max_size=4)


def _answer(kind: str, opaque: int) -> bytes:
    if kind == "miss":
        return b"EN O%d\r\n" % opaque
    if kind == "HD":
        return b"HD O%d\r\n" % opaque
    if kind == "NF":
        return b"NF O%d\r\n" % opaque
    if kind == "server_error":
        return b"SERVER_ERROR out of memory\r\n"
    if kind == "client_error":
        return b"CLIENT_ERROR bad data chunk\r\n"
    value = {"hit": b"plain", "crlf": b"a\r\nb", "fence-look-alike": b"x\r\nEN O%d\r\n" % (opaque + 1)}[kind]
    return b"VA %d f0 s%d O%d\r\n%b\r\n" % (len(value), len(value), opaque, value)


def _build(writes: list[tuple[list[tuple[str, str]], str, bool]]) -> tuple[list[tuple[Pipeline, list[Any]]], bytes]:
    """The pipeline with every write queued and sealed, and the stream memcached (or a fault) sends."""
    log: list[Any] = []
    p = Pipeline(1 << 20)
    stream = b""
    for w, (ops, fence_kind, swallow) in enumerate(writes):
        first = p.seq + 1
        wire_ops: list[list[Any]] = []
        answers: list[bytes] = []
        for j, (op, kind) in enumerate(ops):
            key = b"k%d-%d" % (w, j)
            if op == "get":
                wire_ops.append([Op.GET, key])
            elif op == "set":
                wire_ops.append([Op.SET, key, b"v", 0, 0])
            else:
                wire_ops.append([Op.DELETE, key])
            answers.append(_answer(kind, first + j))
        data = b"".join(encode_op(op[0], op, first + j) for j, op in enumerate(wire_ops))
        p.seq += len(wire_ops)
        p.submit(Batch(_Waiter(f"w{w}", log), list(range(len(wire_ops))), [int(op[0]) for op in wire_ops], None, first), data)
        p.seal()
        fence_opaque = p.seq
        fence_answer = {
            "EN": b"EN O%d\r\n" % fence_opaque, "HD": b"HD O%d\r\n" % fence_opaque,
            "wrong-opaque": b"EN O%d\r\n" % (fence_opaque + 1), "extra-token": b"EN O%d k\r\n" % fence_opaque,
            "early": b"", "missing": b"", "error": b"ERROR\r\n",
        }[fence_kind]
        if fence_kind == "early":
            answers.insert(len(answers) - 1, b"EN O%d\r\n" % fence_opaque)
        if swallow and len(answers) > 1:
            del answers[0]  # a response lost: every later one is out of its place
        stream += b"".join(answers) + fence_answer
    return [(p, log)], stream


def _run(writes: Any, cuts: list[int], fast: bool) -> tuple[list[Any], list[int], str | None, int, int]:
    patch = mock.patch.object(ResponseParser, "take_exact", lambda self, response: False)
    if fast:
        patch = mock.patch.object(ResponseParser, "take_exact", ResponseParser.take_exact)
    with patch:
        [(p, log)], stream = _build(writes)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
        seen: list[int] = []
        error = None
        start = 0
        for end in points:
            try:
                p.receive(stream[start:end])
            except OutOfStep as exc:
                error = f"{exc} answered={exc.answered}"
                p.fail_all(Code.CONNECTION_ERROR, "reset")
                seen.append(len(log))
                break
            seen.append(len(log))
            start = end
        return log, seen, error, p.inflight, len(p.queue)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=_WRITES, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_the_fence_fast_path_is_the_general_path_event_for_event(writes: Any, cuts: list[int]) -> None:
    fast = _run(writes, cuts, fast=True)
    general = _run(writes, cuts, fast=False)
    assert fast == general


def test_byte_by_byte_every_fence_kind() -> None:
    """Every fence answer kind after a value holding CRLF, fed byte by byte, both ways."""
    for kind in ("EN", "HD", "wrong-opaque", "extra-token", "early", "missing", "error"):
        writes = [([("get", "crlf"), ("get", "fence-look-alike")], kind, False), ([("get", "hit")], "EN", False),
                  ([("get", "crlf")], kind, False), ([("set", "client_error")], "EN", False)]
        cuts = list(range(400))
        assert _run(writes, cuts, fast=True) == _run(writes, cuts, fast=False), kind
