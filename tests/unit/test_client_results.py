"""clientlib.Client's answers for each wire result, without a broker: the real Client, Commands and
Transport over test_transport's scripted DEALER stand-in.

The expected values are pymemcache's (pymemcache/client/base.py, 4.0: its docstrings and return
statements), and the exception for each failure code is the table in README.md ("Errors") and
clientlib/wire.py, written out here, not read from clientlib.errors.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from clientlib import Client
from clientlib.errors import MemcacheError, ProtocolMismatch
from clientlib.wire import Code, Op, encode_error, encode_reply
from test_transport import RAISES, FakeSocket, each_op, install

pytestmark = pytest.mark.unit

def test_every_failure_code_has_its_exception_listed() -> None:
    assert set(RAISES) == {c for c in Code if c >= Code.SERVER_ERROR}


@pytest.fixture
def url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mcb-unit-") as d:
        yield f"ipc://{d}/nobody.sock"


def client_answering(
    url: str, answer: Callable[[list[Any]], list[Any]], bare: bool = True, **kw: Any,
) -> tuple[Client, FakeSocket]:
    """A Client whose broker answers each op with answer(op); a GET_MANY's hits with client flags
    0 as their values alone, as the broker does (with `bare`; else as [OK, value, 0])."""
    def responder(frame: list[Any]) -> list[bytes]:
        _, rid, _, flags, ops = frame
        results = [answer(op) for op in each_op(ops)]
        if bare and len(ops) == 1 and ops[0][0] == Op.GET_MANY:
            results = [r[1] if r[0] == Code.OK and r[2:] == [0] else r for r in results]
        return [] if flags & 1 else [encode_reply(rid, results)]

    c = Client(url, timeout=0.5, **kw)
    sock = install(c._transport, FakeSocket(responder))  # type: ignore[arg-type]
    return c, sock


def always(result: list[Any]) -> Callable[[list[Any]], list[Any]]:
    return lambda op: list(result)


# --- outcomes are values (pymemcache's) ---------------------------------------------------------


@pytest.mark.parametrize(
    "result, expected",
    [([Code.OK], True), ([Code.NOT_STORED], False), ([Code.EXISTS], False), ([Code.NOT_FOUND], None)],
)
def test_cas_returns_none_false_true(url: str, result: list[Any], expected: Any) -> None:
    # pymemcache: "True if the value was stored, False if the cas was not current (EXISTS), None
    # if the key was not found (NOT_FOUND)".
    c, _ = client_answering(url, always(result))
    assert c.cas("k", b"v", 123) is expected


@pytest.mark.parametrize("method", ["add", "replace", "append", "prepend"])
def test_store_commands_true_when_stored_false_when_not(url: str, method: str) -> None:
    c, _ = client_answering(url, always([Code.OK]))
    assert getattr(c, method)("k", b"v") is True
    c, _ = client_answering(url, always([Code.NOT_STORED]))
    assert getattr(c, method)("k", b"v") is False


def test_set_returns_true_and_set_many_returns_the_failed_keys(url: str) -> None:
    c, _ = client_answering(url, lambda op: [Code.OK] if op[1] != b"bad" else [Code.NOT_STORED])
    assert c.set("k", b"v") is True
    assert c.set_many({"a": b"1", "bad": b"2", "b": b"3"}) == ["bad"]


def test_get_hit_miss_and_default(url: str) -> None:
    c, _ = client_answering(url, lambda op: [Code.OK, b"v", 0] if op[1] == b"hit" else [Code.MISS])
    assert c.get("hit") == b"v"
    assert c.get("miss") is None
    assert c.get("miss", default=b"d") == b"d"
    assert c.get_many(["hit", "miss"]) == {"hit": b"v"}


def test_gets_returns_value_and_cas_and_a_miss_is_none_none(url: str) -> None:
    c, _ = client_answering(url, lambda op: [Code.OK, b"v", 0, 77] if op[1] == b"hit" else [Code.MISS])
    # pymemcache gives the cas token as the bytes memcached sent
    assert c.gets("hit") == (b"v", b"77")
    assert c.gets("miss") == (None, None)
    assert c.gets_many(["hit", "miss"]) == {"hit": (b"v", b"77")}


def test_delete_and_touch_true_when_found_false_when_not(url: str) -> None:
    c, _ = client_answering(url, lambda op: [Code.OK] if op[1] == b"here" else [Code.NOT_FOUND])
    assert c.delete("here") is True and c.delete("gone") is False
    assert c.touch("here", 10) is True and c.touch("gone", 10) is False


def test_incr_decr_return_the_new_value_or_none(url: str) -> None:
    c, sock = client_answering(url, lambda op: [Code.OK, 42] if op[1] == b"n" else [Code.NOT_FOUND])
    assert c.incr("n", 2) == 42 and c.decr("n", 1) == 42
    assert c.incr("gone", 1) is None and c.decr("gone", 1) is None
    assert [f[4][0][:3] for f in sock.sent[:2]] == [[Op.INCR, b"n", 2], [Op.DECR, b"n", 1]]


def test_stats_of_several_servers_sums_numbers_and_keeps_the_first_servers_text(url: str) -> None:
    per_server = {
        "a:1": {"curr_items": "120", "version": "1.6.18", "rusage_user": "0.5", "cmd_get": "7"},
        "b:2": {"curr_items": "80", "version": "1.6.21", "rusage_user": "1.25", "cmd_get": "3"},
    }
    c, _ = client_answering(url, always([Code.OK, per_server]))
    s = c.stats()
    assert s[b"curr_items"] == 200 and s[b"cmd_get"] == 10
    assert s[b"version"] == b"1.6.18"
    assert s[b"rusage_user"] == 0.5  # pymemcache reads it as a float; floats are not summed
    one, _ = client_answering(url, always([Code.OK, {"a:1": per_server["a:1"]}]))
    assert one.stats()[b"curr_items"] == 120


def test_version_is_the_first_servers_and_flush_all_is_true(url: str) -> None:
    c, _ = client_answering(url, lambda op: [Code.OK, {"a:1": "1.6.18", "b:2": "1.6.9"}] if op[0] == Op.VERSION else [Code.OK, {"a:1": True, "b:2": True}])
    assert c.version() == b"1.6.18"
    assert c.flush_all() is True


# --- failures are exceptions, by the table -------------------------------------------------------


@pytest.mark.parametrize("code", sorted(RAISES), ids=lambda c: c.name)
@pytest.mark.parametrize("call", ["get", "set", "delete", "incr", "flush_all", "stats"])
def test_a_failed_result_raises_its_exception_with_the_brokers_message(url: str, code: Code, call: str) -> None:
    c, _ = client_answering(url, always([code, f"because {code.name}"]))
    run: dict[str, Callable[[], Any]] = {
        "get": lambda: c.get("k"), "set": lambda: c.set("k", b"v"), "delete": lambda: c.delete("k"),
        "incr": lambda: c.incr("k", 1), "flush_all": c.flush_all, "stats": c.stats,
    }
    with pytest.raises(MemcacheError) as info:
        run[call]()
    assert type(info.value) is RAISES[code]
    assert f"because {code.name}" in str(info.value)


@pytest.mark.parametrize("code", sorted(RAISES), ids=lambda c: c.name)
def test_a_refused_frame_raises_its_exception(url: str, code: Code) -> None:
    c = Client(url, timeout=0.5)
    install(c._transport, FakeSocket(lambda f: [encode_error(f[1], code, "whole frame")]))  # type: ignore[arg-type]
    with pytest.raises(RAISES[code]):
        c.get_many(["a", "b"])


def test_ignore_exc_turns_failed_reads_into_misses(url: str) -> None:
    c, _ = client_answering(url, always([Code.SERVER_DOWN, "down"]), ignore_exc=True)
    assert c.get("k") is None and c.get("k", default=1) == 1
    assert c.get_many(["a", "b"]) == {}
    assert c.gets("k") == (None, None)


def test_noreply_write_returns_true_without_waiting(url: str) -> None:
    c, sock = client_answering(url, always([Code.SERVER_ERROR, "never seen"]))
    assert c.set("k", b"v", noreply=True) is True
    assert sock.sent[-1][3] & 1


# --- get_many: a dict of the keys found (pymemcache's get_many), the first failure raised ---------


def by_key(table: dict[bytes, list[Any]]) -> Callable[[list[Any]], list[Any]]:
    return lambda op: list(table[op[1]])


class Upper:
    """A serde that reads every value back upper-cased: the non-default path of get_many."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        return value.upper()


SHAPES = pytest.mark.parametrize("bare", [True, False], ids=["bare values", "hit lists"])


@SHAPES
@pytest.mark.parametrize("serde", [None, Upper()], ids=["default serde", "own serde"])
def test_get_many_keeps_hits_leaves_out_misses_and_keys_by_the_callers_keys(url: str, serde: Any, bare: bool) -> None:
    table = {b"a": [Code.OK, b"va", 0], b"b": [Code.MISS], b"c": [Code.OK, b"vc", 0]}
    c, _ = client_answering(url, by_key(table), bare, serde=serde)
    up = (lambda v: v.upper()) if serde else (lambda v: v)
    assert c.get_many(["a", "b", "c"]) == {"a": up(b"va"), "c": up(b"vc")}
    assert c.get_many([b"a", "a", b"b"]) == {b"a": up(b"va"), "a": up(b"va")}  # str and bytes stay apart
    assert c.get_many(["b"]) == {}
    assert c.get_many([]) == {}


@SHAPES
@pytest.mark.parametrize("serde", [None, Upper()], ids=["default serde", "own serde"])
def test_get_many_raises_the_first_failure_with_the_answered_keys(url: str, serde: Any, bare: bool) -> None:
    table = {
        b"a": [Code.OK, b"va", 0], b"b": [Code.MISS], b"c": [Code.SERVER_DOWN, "c is down"],
        b"d": [Code.TIMEOUT, "d timed out"],
    }
    c, _ = client_answering(url, by_key(table), bare, serde=serde)
    with pytest.raises(MemcacheError) as info:
        c.get_many(["a", "b", "c", "d"])
    assert type(info.value) is RAISES[Code.SERVER_DOWN] and "c is down" in str(info.value)
    assert info.value.partial == {"a": b"VA" if serde else b"va"}  # type: ignore[attr-defined]
    assert set(info.value.failed) == {"c", "d"}  # type: ignore[attr-defined]
    c2, _ = client_answering(url, by_key(table), serde=serde, ignore_exc=True)
    assert c2.get_many(["a", "b", "c", "d"]) == {"a": b"VA" if serde else b"va"}


@pytest.mark.parametrize("serde", [None, Upper()], ids=["default serde", "own serde"])
@pytest.mark.parametrize("code", sorted(RAISES), ids=lambda c: c.name)
def test_get_many_raises_any_failure_code_even_alone(url: str, serde: Any, code: Code) -> None:
    # SERVER_ERROR is the lowest failure code (wire.FIRST_ERROR): a get_many whose only failure
    # is that one must raise it too.
    table = {b"a": [Code.OK, b"va", 0], b"b": [Code.MISS], b"c": [code, "c failed"]}
    c, _ = client_answering(url, by_key(table), serde=serde)
    with pytest.raises(RAISES[code], match="c failed") as info:
        c.get_many(["a", "b", "c"])
    assert info.value.failed.keys() == {"c"}  # type: ignore[attr-defined]


class Flags:
    """A serde that reads each value back with the flags it came with."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        return (value, flags)


@pytest.mark.parametrize("serde", [None, Flags()], ids=["default serde", "own serde"])
def test_get_many_reads_bare_values_beside_hits_with_flags_in_the_callers_order(url: str, serde: Any) -> None:
    # A GET_MANY's reply mixes bare values (flags 0) with [OK, value, flags] lists (other flags):
    # the dict keeps the caller's key order and gives each value its own flags.
    table = {b"a": [Code.OK, b"va", 5], b"b": [Code.OK, b"vb", 0], b"c": [Code.MISS], b"d": [Code.OK, b"vd", 0]}
    c, sock = client_answering(url, by_key(table), serde=serde)
    got = c.get_many(["a", "b", "c", "d"])
    assert sock.sent[-1][4] == [[Op.GET_MANY, [b"a", b"b", b"c", b"d"]]]
    if serde is None:
        assert list(got.items()) == [("a", b"va"), ("b", b"vb"), ("d", b"vd")]
    else:
        assert list(got.items()) == [("a", (b"va", 5)), ("b", (b"vb", 0)), ("d", (b"vd", 0))]


@pytest.mark.parametrize("value", [b"\x00v", b"\x00abc", b"\x01abc", b"\x00\x00\x00"])
@pytest.mark.parametrize(
    "call",
    [lambda c: c.get("k"), lambda c: c.gets("k"), lambda c: c.gets_many(["a", "b"]), lambda c: c.set_many({"a": b"1", "b": b"2"})],
    ids=["get", "gets", "gets_many", "set_many"],
)
def test_a_bare_value_anywhere_but_a_get_many_is_a_protocol_mismatch(url: str, call: Callable[[Any], Any], value: bytes) -> None:
    # Only a GET_MANY's key may be answered by its value alone: elsewhere the bytes' first byte
    # would read as a code (b"\x00..." as OK, b"\x01..." as a miss). (Review: Client.get's own
    # hot path read b"\x00abc" as a hit of 97.)
    c = Client(url, timeout=0.5)
    install(c._transport, FakeSocket(lambda f: [encode_reply(f[1], [value for _ in each_op(f[4])])]))  # type: ignore[arg-type]
    with pytest.raises(ProtocolMismatch, match="malformed result"):
        call(c)


# --- a result too short for its op: ProtocolMismatch (client.py's module docstring), not IndexError ---


@pytest.mark.parametrize(
    "call, result",
    [
        (lambda c: c.get("k"), [Code.OK]),  # a hit without its value and flags
        (lambda c: c.gets("k"), [Code.OK, b"v", 0]),  # without its cas
        (lambda c: c.get_many(["a", "b"]), [Code.OK]),
        (lambda c: c.incr("k", 1), [Code.OK]),  # without the new value
    ],
    ids=["get", "gets", "get_many", "incr"],
)
def test_a_result_too_short_for_its_op_is_a_protocol_mismatch(url: str, call: Callable[[Any], Any], result: list[Any]) -> None:
    c, _ = client_answering(url, always(result))
    with pytest.raises(ProtocolMismatch, match="malformed result"):
        call(c)


def test_a_short_result_to_a_read_with_ignore_exc_is_a_miss(url: str) -> None:
    c, _ = client_answering(url, always([Code.OK]), ignore_exc=True)
    assert c.get("k", default="d") == "d"


class Picky:
    """A serde whose own code raises IndexError: that is the caller's error, not the broker's."""

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        return value[10]


def test_an_index_error_from_the_callers_own_serde_is_not_turned_into_a_protocol_mismatch(url: str) -> None:
    c, _ = client_answering(url, always([Code.OK, b"short", 0]), serde=Picky())
    with pytest.raises(IndexError):
        c.get("k")


# --- bare values and result lists read alike (review of d19cd4a) -----------------------------------

_RESULT = st.one_of(
    st.builds(lambda v, f: [int(Code.OK), v, f], st.sampled_from([b"", b"v", b"\x00", b"a\r\nb"]), st.sampled_from([0, 0, 5])),
    st.just([int(Code.MISS)]),
    st.builds(lambda c: [int(c), f"{c.name} here"], st.sampled_from([Code.SERVER_DOWN, Code.TIMEOUT, Code.SERVER_ERROR])),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", b"a", "c", "d"]), _RESULT), max_size=30),
    st.sampled_from([None, Flags()]), st.booleans(),
)
def test_get_many_reads_bare_values_as_their_lists(pairs: list[tuple[Any, list[Any]]], serde: Any, ignore_exc: bool) -> None:
    # The same answers as lists and as a GET_MANY's reply (flags-0 hits bare) give the same dict,
    # key order, partial results and failures.
    from clientlib.commands import Command, Commands, _finish_many

    keys = [k for k, _ in pairs]
    lists = [r for _, r in pairs]
    bare = [r[1] if r[0] == Code.OK and r[2] == 0 else r for r in lists]
    c = Commands(serde=serde, ignore_exc=ignore_exc)
    outs = []
    for results in (lists, bare):
        cmd = Command([], _finish_many, keys, extra=False, read=True, miss={})
        try:
            outs.append(("ok", list(_finish_many(c, cmd, [list(r) if type(r) is list else r for r in results]).items())))
        except MemcacheError as exc:
            partial = list(exc.partial.items())  # type: ignore[attr-defined]
            outs.append(("raised", type(exc), str(exc), partial, sorted(map(repr, exc.failed))))  # type: ignore[attr-defined]
    assert outs[0] == outs[1]
