"""The fault tests' checker (tests/verify.py) catches what it is there to catch: a value of another
key or writer, a read of a state no acknowledged write left, and counters that do not add up."""

from __future__ import annotations

import random

from verify import ABSENT, Tally, _Thread, reconcile, value_for


def thread() -> _Thread:
    return _Thread(None, None, Tally(), "w0t0", ["k1", "k2"], 1.0, 1.0, 0)  # type: ignore[arg-type]


def test_another_keys_value_is_misdelivered():
    t = thread()
    t.check("k1", value_for("k2", "w0t0", 0, random.Random(0)), 0.0)
    t.check("k1", value_for("k1", "w9t9", 0, random.Random(0)), 0.0)
    t.check("k1", b"garbage", 0.0)
    assert len(t.tally.misdelivered) == 3


def test_reads_outside_the_possible_states_are_lost_writes():
    t = thread()
    rng = random.Random(0)
    t.check("k1", None, 0.0)  # never written: absent is right
    t.acked("k1", 5)
    t.check("k1", value_for("k1", "w0t0", 5, rng), 0.0)
    assert t.tally.lost == []
    t.check("k1", None, 1.0)  # an acknowledged write gone
    t.check("k1", value_for("k1", "w0t0", 4, rng), 1.0)  # an older write come back
    assert [x[3].split(", at ")[0] for x in t.tally.lost] == ["read -1, possible [5]", "read 4, possible [5]"]
    t.possible["k1"].add(ABSENT)  # an indeterminate delete makes absent possible
    t.check("k1", None, 2.0)
    assert len(t.tally.lost) == 2


def _counts(**over):
    d = dict(frames=11, ops=21, ok=11, miss=5, errors=3, timeouts=2, replies=11, replies_dropped=0,
             bad_frames=0, dropped_frames=0, noreply=0, internal_errors=0, overloaded=0)
    d.update(over)
    return d


def test_reconcile_accepts_matching_counts_and_names_each_mismatch():
    t = Tally(frames=10, ops=20, replies=10)
    t.codes.update(ok=10, miss=5, errors=3, timeouts=2)
    assert reconcile(_counts(), t) == []
    assert reconcile(_counts(replies=12, frames=12), t) != []
    assert any("miss" in p for p in reconcile(_counts(miss=6, ok=10), t))
    assert any("replies_dropped" in p for p in reconcile(_counts(replies=10, replies_dropped=1), t))
    t.dup_replies = 1
    assert any("dup_replies" in p for p in reconcile(_counts(), t))


def test_a_frame_sent_before_the_broker_was_replaced_and_answered_after_counts_for_its_successor() -> None:
    # test_broker_kill_9_and_restart_with_live_clients once counted one more frame in the new
    # broker than the workers had sent it: a frame sent as the old broker died, held by ZeroMQ and
    # answered by the new one within its deadline. It belongs to the generation that answered it.
    from types import SimpleNamespace

    from clientlib.wire import Code, Op, encode_reply
    from verify import _Wire

    gen = SimpleNamespace(value=0)
    tally = Tally()
    wire = _Wire(tally, gen)
    wire.pack(1, [[Op.GET, b"a"]], 1000)  # answered by the old broker
    wire.unpack(encode_reply(1, [[Code.OK, b"x", 0]]))
    wire.pack(2, [[Op.GET, b"b"]], 1000)  # sent as the old one dies
    gen.value = 1
    wire.pack(3, [[Op.GET, b"c"]], 1000)
    wire.unpack(encode_reply(2, [[Code.MISS]]))
    wire.unpack(encode_reply(3, [[Code.OK, b"z", 0]]))
    assert dict(tally.by_gen[0]) == {"frames": 1, "replies": 1, "ok": 1}
    assert dict(tally.by_gen[1]) == {"frames": 2, "replies": 2, "crossed": 1, "miss": 1, "ok": 1}
    assert tally.frames == 3 and tally.replies == 3 and tally.dup_replies == 0


class _Rolls(random.Random):
    """The thread's rng with its op rolls scripted (0.6: a set, 0.95: a delete, 0.1: a get)."""

    def __init__(self, rolls: list[float]) -> None:
        super().__init__(0)
        self.rolls = rolls

    def random(self) -> float:
        return self.rolls.pop(0)

    def choice(self, seq):  # type: ignore[no-untyped-def, override]
        return seq[0]


class _Scripted:
    """Stands in for the Client: answers from a script, so the checker's own bookkeeping is tested."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers

    def _next(self, *args: object) -> object:
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    get = set = delete = _next


def test_a_lost_read_reports_the_keys_last_writes_and_their_outcomes():
    from clientlib.errors import MemcacheUnexpectedCloseError

    t = _Thread(_Scripted([]), None, Tally(), "w0t0", ["k1"], 1.0, 1.0, 0)  # type: ignore[arg-type]
    t.rng = _Rolls([0.95, 0.6, 0.1])  # delete (fails, indeterminate), set (acknowledged), get
    t.client = _Scripted([MemcacheUnexpectedCloseError("reset"), True, None])  # type: ignore[assignment]
    now = [0.0]
    t.clock = lambda: now[0]
    t.one()
    now[0] = 1.5  # the failed delete can no longer land (tolerance 1 s)
    for _ in range(2):
        t.one()
    assert len(t.tally.lost) == 1
    what = t.tally.lost[0][3]
    assert what.startswith("read -1, possible [1], at ")
    assert "delete -1 -> error:MemcacheUnexpectedCloseError at " in what and "set 1 -> stored at " in what
    assert what.index("delete -1") < what.index("set 1")


def test_a_failed_write_may_land_after_a_later_acknowledged_one_begun_within_tolerance():
    # Its bytes may still wait in a proxy or in memcached's socket on the closed connection while
    # another connection's write overtakes them. Only the failures that say the write may have been
    # applied count; an answer from memcached (an error) or nothing sent cannot land later.
    from clientlib.errors import BrokerTimeout, MemcacheServerError, MemcacheUnexpectedCloseError, ServerUnavailable

    t = _Thread(_Scripted([]), None, Tally(), "w0t0", ["k1"], 1.0, 1.0, 0)  # type: ignore[arg-type]
    now = [0.0]
    t.clock = lambda: now[0]
    rng = random.Random(0)
    t.rng = _Rolls([0.6, 0.6, 0.6, 0.6, 0.95])  # four sets, then an acknowledged delete
    t.client = _Scripted([  # type: ignore[assignment]
        MemcacheUnexpectedCloseError("reset"),  # set 1: sent, its answer lost
        BrokerTimeout("late"),  # set 2: may be applied, later
        ServerUnavailable("down"),  # set 3: never sent
        MemcacheServerError("SERVER_ERROR out of memory"),  # set 4: memcached answered it
        True,
    ])
    for _ in range(5):
        t.one()
    assert t.possible["k1"] == {ABSENT, 1, 2}
    # A write whose call began within tolerance (1 s) of their failure keeps them, however late
    # it returns; one that began later narrows them out.
    now[0] = 1.2
    t.acked("k1", ABSENT, began=0.9)
    t.check("k1", value_for("k1", "w0t0", 1, rng), 0.0)  # landed after the delete: not lost
    assert t.tally.lost == []
    t.acked("k1", ABSENT, began=1.0)
    assert t.possible["k1"] == {ABSENT}
    t.check("k1", value_for("k1", "w0t0", 2, rng), 0.0)
    assert [x[3].split(", at ")[0] for x in t.tally.lost] == ["read 2, possible [-1]"]
