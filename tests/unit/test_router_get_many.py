"""A get_many sent as one GET_MANY op is served exactly as the same keys sent as one GET per key
(clientlib/wire.py: "answered exactly as the frame of one GET per key would be"): the same
results, the same requests to memcached, the same counters, on the short path and on every way
off it (a key needing base64, a key with a write in flight, a server down, a bound reached).

Each case runs twice on fresh rigs (test_router.py's Router, Server and Connection over a
scripted memcached), once per form, and the two runs must agree; the expected results are also
written out, so both forms agreeing on a wrong answer fails too."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from clientlib.wire import Code, Op
from pool import owners
from test_router import Rig, set_op

pytestmark = pytest.mark.unit

FORMS = ["one GET per key", "one GET_MANY op"]


def get_many(rig: Rig, keys: list[bytes], form: str) -> int:
    if form == FORMS[0]:
        return rig.frame([[Op.GET, k] for k in keys])
    return rig.frame([[Op.GET_MANY, keys]])


def sent(rig: Rig) -> dict[str, list[bytes]]:
    return {name: list(far.requests) for name, far in rig.far.items()}


def counters(rig: Rig) -> tuple[int, ...]:
    s = rig.router.stats
    return (s.frames, s.ops, s.ok, s.miss, s.gets_upstream, s.gets_coalesced, s.overloaded, s.by_op[int(Op.GET)])


def results(rig: Rig, req_id: int) -> list[list[Any]]:
    """The reply's results, a GET_MANY's bare values (hits with client flags 0) read as one GET
    per key's [OK, value, 0] (clientlib/wire.py); test_the_two_forms_differ_only_in_bare_values
    checks the shapes themselves."""
    return [[int(Code.OK), r, 0] if type(r) is bytes else r for r in rig.results(req_id)]


def both(case: Callable[[Rig, str], list[list[list[Any]]]], make: Callable[[], Rig]) -> list[list[list[Any]]]:
    """The case's results in both forms, checked equal (with what memcached got and the counters)."""
    runs = []
    for form in FORMS:
        rig = make()
        results = case(rig, form)
        server_state = [(s.inflight_n, dict(s.reads), dict(s.joiners)) for s in rig.servers]
        runs.append((results, sent(rig), counters(rig), rig.budget.inflight, server_state))
    assert runs[0] == runs[1]
    results, _, _, inflight, server_state = runs[0]
    assert inflight == 0 and all(state == (0, {}, {}) for state in server_state)
    return results


def test_hits_misses_and_keys_read_twice() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"1"), set_op(b"b", b"2", 7), set_op(b"c", b"3")])
        rig.serve()
        first = get_many(rig, [b"a", b"b"], form)
        second = get_many(rig, [b"c", b"a", b"d", b"b", b"c"], form)  # a and b in flight: read again
        rig.serve()
        return [results(rig, first), results(rig, second)]

    assert both(case, lambda: Rig(connections=2)) == [
        [[Code.OK, b"1", 0], [Code.OK, b"2", 7]],
        [[Code.OK, b"3", 0], [Code.OK, b"1", 0], [Code.MISS], [Code.OK, b"2", 7], [Code.OK, b"3", 0]],
    ]
    rig = Rig(connections=2)
    case(rig, FORMS[1])
    # frames, ops, ok, miss, gets upstream, gets joined, overloaded, GETs: a GET_MANY counts its keys.
    assert counters(rig) == (3, 10, 9, 1, 7, 0, 0, 7)


def test_three_servers() -> None:
    keys = [b"m-%d" % i for i in range(40)]

    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(k, k, i) for i, k in enumerate(keys[:30])])
        rig.serve()
        a = get_many(rig, keys[:35], form)
        b = get_many(rig, keys[10:], form)
        rig.serve()
        return [results(rig, a), results(rig, b)]

    expected = [[Code.OK, k, i] if i < 30 else [Code.MISS] for i, k in enumerate(keys)]
    assert both(case, lambda: Rig(3, connections=2)) == [expected[:35], expected[10:]]


def test_keys_needing_base64_take_the_per_op_path() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a b", b"1"), set_op(b"c\td", b"2"), set_op(b"plain", b"3")])
        rig.serve()
        r = get_many(rig, [b"a b", b"plain", b"c\td", b"e f"], form)
        rig.serve()
        return [results(rig, r)]

    assert both(case, Rig) == [[[Code.OK, b"1", 0], [Code.OK, b"3", 0], [Code.OK, b"2", 0], [Code.MISS]]]


def test_a_key_with_its_write_in_flight_is_read_after_the_write() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"old"), set_op(b"b", b"2")])
        rig.serve()
        w = rig.frame([set_op(b"a", b"new")])  # not answered yet: `a` is pinned to its connection
        r = get_many(rig, [b"b", b"a", b"z"], form)
        rig.serve()
        return [results(rig, w), results(rig, r)]

    assert both(case, lambda: Rig(connections=2)) == [
        [[Code.OK]], [[Code.OK, b"2", 0], [Code.OK, b"new", 0], [Code.MISS]],
    ]


def test_a_down_server_refuses_its_keys_and_the_others_answer() -> None:
    names = Rig(2).names
    keys = [b"d-%d" % i for i in range(20)]
    where = owners(names, [k.decode() for k in keys])

    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.server(names[1]).record_failure(rig.now, "test: gone")
        r = get_many(rig, keys, form)
        rig.serve()
        return [results(rig, r)]

    [got] = both(case, lambda: Rig(2, failure_limit=1))
    for k, res in zip(keys, got):
        if where[k.decode()] == names[1]:
            assert res[0] == Code.SERVER_DOWN and "test: gone" in res[1]
        else:
            assert res == [Code.MISS]
    assert any(res[0] == Code.SERVER_DOWN for res in got) and any(res == [Code.MISS] for res in got)


@pytest.mark.parametrize("bound", ["max_conn", "max_server", "max_total"])
def test_a_bound_admits_exactly_its_limit_in_key_order(bound: str) -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        r = get_many(rig, [b"k-%d" % i for i in range(10)], form)
        assert rig.budget.inflight == 7
        rig.serve()
        return [[res[0] for res in results(rig, r)]]  # type: ignore[list-item]

    assert both(case, lambda: Rig(1, connections=1, **{bound: 7})) == [[Code.MISS] * 7 + [Code.OVERLOADED] * 3]  # type: ignore[arg-type]


def test_a_get_many_of_one_key() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"1")])
        rig.serve()
        r = get_many(rig, [b"a"], form)
        rig.serve()
        return [results(rig, r)]

    assert both(case, Rig) == [[[Code.OK, b"1", 0]]]


# --- review: odd batches (duplicate keys, reads and writes interleaved, partial answers) ----------


def test_duplicate_keys_in_one_get_many() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"1"), set_op(b"b", b"2")])
        rig.serve()
        first = get_many(rig, [b"a", b"a", b"b", b"a", b"z", b"z"], form)
        second = get_many(rig, [b"a", b"z", b"a"], form)  # read again while the first's are in flight
        rig.serve()
        third = get_many(rig, [b"b", b"b"], form)  # after the answers: a fresh read
        rig.serve()
        return [results(rig, first), results(rig, second), results(rig, third)]

    a, b, z = [Code.OK, b"1", 0], [Code.OK, b"2", 0], [Code.MISS]
    assert both(case, lambda: Rig(2, connections=2)) == [[a, a, b, a, z, z], [a, z, a], [b, b]]


def test_a_read_after_a_write_of_its_key_follows_the_write() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"old"), set_op(b"b", b"2")])
        rig.serve()
        first = get_many(rig, [b"a", b"b"], form)
        w = rig.frame([set_op(b"a", b"new")])  # pins `a`
        second = get_many(rig, [b"b", b"a"], form)  # `a` follows the write onto its connection
        rig.serve()
        third = get_many(rig, [b"a", b"b"], form)
        rig.serve()
        return [results(rig, first), results(rig, w), results(rig, second), results(rig, third)]

    assert both(case, lambda: Rig(1, connections=2)) == [
        [[Code.OK, b"old", 0], [Code.OK, b"2", 0]], [[Code.OK]],
        [[Code.OK, b"2", 0], [Code.OK, b"new", 0]], [[Code.OK, b"new", 0], [Code.OK, b"2", 0]],
    ]


def test_reads_of_the_same_keys_on_two_connections_in_one_turn() -> None:
    """Two get_many of one key set in flight on different connections at once; a third, sent
    after the first answered but before the second did, and a fourth: each gets its own keys'
    values, in its own order, whichever connection answered first."""

    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        keys = [b"k-%d" % i for i in range(12)]
        rig.frame([set_op(k, k) for k in keys[::2]])
        rig.serve()
        r1 = get_many(rig, keys, form)
        r2 = get_many(rig, keys[::-1], form)
        rig.serve()
        r3 = get_many(rig, keys[3:] + keys[:3], form)
        r4 = get_many(rig, keys[5:9], form)
        rig.serve()
        return [results(rig, r1), results(rig, r2), results(rig, r3), results(rig, r4)]

    [r1, r2, r3, r4] = both(case, lambda: Rig(3, connections=3))
    keys = [b"k-%d" % i for i in range(12)]
    want = {k: ([Code.OK, k, 0] if i % 2 == 0 else [Code.MISS]) for i, k in enumerate(keys)}
    assert r1 == [want[k] for k in keys] and r2 == [want[k] for k in keys[::-1]]
    assert r3 == [want[k] for k in keys[3:] + keys[:3]] and r4 == [want[k] for k in keys[5:9]]


def test_a_get_many_that_times_out_then_answers_late() -> None:
    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"1")])
        rig.serve()
        r = get_many(rig, [b"a", b"b", b"a"], form)
        rig.router.expire(rig.now + 5.0)
        late = get_many(rig, [b"a", b"c"], form)  # sent while the timed-out read of `a` is in flight
        rig.serve()  # the late answers find the first job done
        return [[[res[0]] for res in results(rig, r)], results(rig, late)]

    assert both(case, Rig) == [[[Code.TIMEOUT]] * 3, [[Code.OK, b"1", 0], [Code.MISS]]]


def test_noreply_get_many_frames() -> None:
    from clientlib.wire import NOREPLY

    def case(rig: Rig, form: str) -> list[list[list[Any]]]:
        rig.frame([set_op(b"a", b"1")])
        rig.serve()
        n = len(rig.replies)
        if form == FORMS[0]:
            rig.frame([[Op.GET, b"a"], [Op.GET, b"z"]], flags=NOREPLY)
        else:
            rig.frame([[Op.GET_MANY, [b"a", b"z"]]], flags=NOREPLY)
        rig.serve()
        assert len(rig.replies) == n
        r = get_many(rig, [b"a", b"z"], form)
        rig.serve()
        return [results(rig, r)]

    assert both(case, Rig) == [[[Code.OK, b"1", 0], [Code.MISS]]]


def test_the_two_forms_differ_only_in_bare_values() -> None:
    # A GET_MANY's hit with client flags 0 is its value alone; a hit with other flags, a miss and
    # every result of one GET per key keep the [code, ...] shape.
    shapes = {}
    for form in FORMS:
        rig = Rig()
        rig.frame([set_op(b"a", b"1"), set_op(b"b", b"2", 7)])
        rig.serve()
        r = get_many(rig, [b"a", b"b", b"c", b"a"], form)
        rig.serve()
        shapes[form] = rig.results(r)
    assert shapes[FORMS[0]] == [[Code.OK, b"1", 0], [Code.OK, b"2", 7], [Code.MISS], [Code.OK, b"1", 0]]
    assert shapes[FORMS[1]] == [b"1", [Code.OK, b"2", 7], [Code.MISS], b"1"]


def test_a_get_many_leaves_the_read_table_alone() -> None:
    """A get_many's keys neither join a read in flight nor enter the read table (coalescing is
    for frames of one get), and a single get's read in the table stays its own."""
    from broker.pipeline import tag_of

    rig = Rig(1, connections=1)
    server = rig.servers[0]
    conn = server.conns[0]
    rig.frame([[Op.GET, b"x"]])
    seq = conn.pipeline.seq
    assert server.reads == {b"x": tag_of(seq, conn.no)}
    rig.frame([[Op.GET_MANY, [b"a", b"a", b"x", b"b"]]])  # all four sent
    assert conn.pipeline.seq == seq + 4
    assert server.reads == {b"x": tag_of(seq, conn.no)}
    rig.frame([[Op.GET, b"x"]])  # joins the first read, not the get_many's
    assert conn.pipeline.seq == seq + 4
    assert (rig.router.stats.gets_upstream, rig.router.stats.gets_coalesced) == (5, 1)
    rig.serve()
    assert server.reads == {} and server.joiners == {}
