"""Self-verifying load for fault tests and the soak: worker processes whose every value names its
key, writer and sequence, and the reconciliation of what they saw against the broker's counters.

A worker process (forked) runs `threads` threads; each thread owns its keys (`<prefix>:w<W>t<T>k<i>`)
and does a bounded, seeded mix of get / get_many / set / delete through one shared `clientlib.Client`.
Every value is `<key>|<writer>|<seq>|<padding>`, so:

- misdelivered: a value naming another key (or another writer) than the one asked for;
- lost: a read that returns a state no write could have left, given what was acknowledged. Per key
  the thread keeps the set of states memcached may hold: an acknowledged set of seq S (or an
  acknowledged delete: absent) narrows it to {S}; a write that failed or timed out is
  indeterminate and only adds its state. Once sent, such a write may still land after later writes
  are acknowledged (its bytes wait in a proxy's buffer, or in memcached's socket on the connection
  the broker closed, and another connection's requests overtake them: seen in test_toxics'
  truncate run on a loaded machine, a set failed at 339.7 ms landed after a delete acknowledged at
  342.6 ms), so its state stays possible for `tolerance` (how late a loaded machine may run
  anything) after it failed, past a later write whose call began within that time. Only the
  failures that say the write may have been applied count (BrokerTimeout,
  MemcacheUnexpectedCloseError: README "Guarantees"). A read outside the set is an acknowledged write lost
  (or an old one come back). `since` says when the set was last narrowed, so a test can excuse
  losses that a killed memcached explains. A lost read's report carries the key's last writes
  (op, state, outcome, start and duration in ms from the thread's start), so a failure that
  happens once in many runs can be read from its own log.

The worker also watches the wire under the Client (it wraps `clientlib.transport`'s
`pack_request` / `unpack_reply`, observing only): every frame it packed, every reply it received
(late ones that the Client discards included) and each reply's per-op status codes, classified as
the broker's RouterStats counts them. After its calls each thread waits out the deadline and
sends one ping, which sweeps any late reply into the count. `reconcile()` then checks:

    broker frames in  == frames the workers sent
    broker replies    == replies the workers received (each request id exactly once)
    broker ops        == ok + miss + errors + timeouts, and each class == what the replies carried
    replies_dropped == bad_frames == internal_errors == 0 (unless the test says otherwise)
"""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from clientlib import Client
from clientlib import transport as _transport
from clientlib.errors import (
    BrokerOverloaded, BrokerTimeout, BrokerUnavailable, MemcacheError, MemcacheUnexpectedCloseError, ServerUnavailable,
)
from clientlib.wire import Code, Op

ABSENT = -1  # the state "no value" in a key's possible states
NOT_SENT = (ServerUnavailable, BrokerOverloaded)  # failures where nothing was sent to memcached
HISTORY = 6  # writes per key a lost read's report shows


@dataclass
class Tally:
    """What one worker process saw; picklable, summed with `+`."""

    calls: int = 0
    frames: int = 0  # request frames sent (packed, and not failed at the send)
    ops: int = 0
    replies: int = 0  # reply frames received, late ones included
    dup_replies: int = 0  # a request id answered twice
    unknown_replies: int = 0  # a request id this worker never sent
    unanswered: int = 0  # request ids never answered (filled in at the end), unsent ones excluded
    unsent: int = 0  # frames packed whose call raised BrokerUnavailable unanswered: never left
    codes: Counter[str] = field(default_factory=Counter)  # ok / miss / errors / timeouts, from replies
    frame_codes: Counter[int] = field(default_factory=Counter)  # replies refusing a whole frame
    # The same per broker generation: `gen` is a shared counter a test (or the soak) bumps right
    # after it killed the broker, so every reply received after the bump came from its successor.
    # by_gen[g] counts frames, replies, ok, miss, errors, timeouts. A frame sent before the bump
    # and answered after it reached the successor (ZeroMQ held it while no broker listened, within
    # its deadline): it is moved to the generation that answered it and counted there as crossed.
    by_gen: dict[int, Counter[str]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)  # what the calls returned or raised
    misdelivered: list[str] = field(default_factory=list)
    lost: list[tuple[str, float, float, str]] = field(default_factory=list)  # key, since, at, what
    late: list[tuple[str, float]] = field(default_factory=list)  # calls over deadline + tolerance
    max_took: float = 0.0
    crashed: list[str] = field(default_factory=list)

    def __add__(self, other: "Tally") -> "Tally":
        out = Tally()
        for name in self.__dataclass_fields__:
            a, b = getattr(self, name), getattr(other, name)
            if name == "max_took":
                setattr(out, name, max(a, b))
            elif name == "by_gen":
                merged: dict[int, Counter[str]] = {}
                for g in set(a) | set(b):
                    merged[g] = a.get(g, Counter()) + b.get(g, Counter())
                setattr(out, name, merged)
            else:
                setattr(out, name, a + b)
        return out


def classify(code: int) -> str:
    """RouterStats' class for a per-op result code (router.Job.finish)."""
    if code == Code.OK:
        return "ok"
    if code < Code.SERVER_ERROR:
        return "miss"
    if code == Code.TIMEOUT:
        return "timeouts"
    return "errors"


class _Wire:
    """Observes every frame packed and every reply unpacked in this process (thread-safe)."""

    def __init__(self, tally: Tally, gen: Any = None) -> None:
        self.tally = tally
        self.gen = gen
        self.lock = threading.Lock()
        self.sent: set[int] = set()
        self.sent_gen: dict[int, int] = {}  # request id -> the generation it was sent in
        self.answered: set[int] = set()
        self.unsent_ids: set[int] = set()
        self.local = threading.local()  # this thread's last request id
        self._pack = _transport.pack_request
        self._unpack = _transport.unpack_reply

    def install(self) -> None:
        _transport.pack_request = self.pack  # type: ignore[assignment]
        _transport.unpack_reply = self.unpack  # type: ignore[assignment]

    def pack(self, req_id: int, ops: list[list[Any]], timeout_ms: int = 0, flags: int = 0) -> bytes:
        data = self._pack(req_id, ops, timeout_ms, flags)
        self.local.rid = req_id
        with self.lock:
            self.sent.add(req_id)
            self.sent_gen[req_id] = self._g()
            self.tally.frames += 1
            # The broker counts a GET_MANY op as its keys (README "ops": a get_many of 100 keys is 100).
            self.tally.ops += len(ops[0][1]) if len(ops) == 1 and ops[0][0] == Op.GET_MANY else len(ops)
            self._gen()["frames"] += 1
        return data

    def call_unavailable(self) -> None:
        """The calling thread's call raised BrokerUnavailable: if its frame got no reply, the
        frame never left this process (nothing listened); it is not counted as sent."""
        rid = getattr(self.local, "rid", None)
        with self.lock:
            if rid is not None and rid in self.sent and rid not in self.answered and rid not in self.unsent_ids:
                self.unsent_ids.add(rid)
                self.tally.frames -= 1
                self.tally.unsent += 1
                sent_in = self._gen(self.sent_gen[rid])
                sent_in["frames"] -= 1
                sent_in["unsent"] += 1

    def _g(self) -> int:
        return 0 if self.gen is None else int(self.gen.value)

    def _gen(self, g: int | None = None) -> Counter[str]:
        if g is None:
            g = self._g()
        c = self.tally.by_gen.get(g)
        if c is None:
            c = self.tally.by_gen[g] = Counter()
        return c

    def unpack(self, data: bytes) -> tuple[int, int, Any]:
        rid, code, payload = self._unpack(data)
        t = self.tally
        with self.lock:
            t.replies += 1
            per_gen = self._gen()
            per_gen["replies"] += 1
            if rid not in self.sent:
                t.unknown_replies += 1
            elif rid in self.answered:
                t.dup_replies += 1
            else:
                self.answered.add(rid)
                sent_in = self.sent_gen[rid]
                if sent_in != self._g():
                    self._gen(sent_in)["frames"] -= 1
                    per_gen["frames"] += 1
                    per_gen["crossed"] += 1
                if code == Code.OK:
                    for r in payload:
                        # A GET_MANY's hit with client flags 0 is its value alone (clientlib/wire.py).
                        kind = "ok" if type(r) is bytes else classify(r[0])
                        t.codes[kind] += 1
                        per_gen[kind] += 1
                else:
                    t.frame_codes[code] += 1
        return rid, code, payload

    def finish(self) -> None:
        with self.lock:
            self.tally.unanswered = len(self.sent - self.answered - self.unsent_ids)


def value_for(key: str, writer: str, seq: int, rng: random.Random) -> bytes:
    return f"{key}|{writer}|{seq}|".encode() + b"p" * rng.choice((0, 8, 100, 1500, 5000))


def parse(value: bytes) -> tuple[str, str, int]:
    key, writer, seq, _ = value.split(b"|", 3)
    return key.decode(), writer.decode(), int(seq)


class _Thread:
    def __init__(self, client: Client, wire: _Wire, tally: Tally, name: str, keys: list[str],
                 timeout: float, tolerance: float, seed: int) -> None:
        self.client = client
        self.wire = wire
        self.tally = tally
        self.name = name
        self.keys = keys
        self.timeout = timeout
        self.tolerance = tolerance
        self.rng = random.Random(seed)
        self.seq = 0
        self.possible: dict[str, set[int]] = {k: {ABSENT} for k in keys}
        # Per key, indeterminate writes' states and until when they may still land (self.clock).
        self.landing: dict[str, dict[int, float]] = {k: {} for k in keys}
        self.clock = time.monotonic
        self.start = time.monotonic()
        self.history: dict[str, deque[str]] = {k: deque(maxlen=HISTORY) for k in keys}
        self.since: dict[str, float] = {k: time.monotonic() for k in keys}
        # The tally is shared by the process's threads, so its lock is too: the wire's, which
        # guards the same tally. (A lock per thread let two threads' `outcomes[x] += 1` race, and
        # test_toxics once counted 2 calls more than outcomes.)
        self.lock = wire.lock if wire is not None else threading.Lock()

    def note(self, outcome: str, what: str, took: float) -> None:
        with self.lock:
            t = self.tally
            t.calls += 1
            t.outcomes[outcome] += 1
            t.max_took = max(t.max_took, took)
            if took > self.timeout + self.tolerance:
                t.late.append((what, round(took, 3)))

    def check(self, key: str, value: bytes | None, at: float) -> None:
        if value is None:
            state = ABSENT
        else:
            try:
                k, writer, state = parse(value)
            except ValueError:
                self.tally.misdelivered.append(f"{key}: unparsable value {value[:60]!r}")
                return
            if k != key or writer != self.name:
                self.tally.misdelivered.append(f"{key}: got the value of {k} by {writer} (seq {state})")
                return
        if state not in self.possible[key]:
            self.tally.lost.append((
                key, self.since[key], at,
                f"read {state}, possible {sorted(self.possible[key])}, "
                f"at {(at - self.start) * 1000:.1f} ms after writes {list(self.history[key])}",
            ))

    def acked(self, key: str, state: int, began: float | None = None) -> None:
        """A write of `state` was acknowledged; its call began at `began` (self.clock's time): a
        failed write that could still land after that time stays possible."""
        began = self.clock() if began is None else began
        landing = {s: until for s, until in self.landing[key].items() if until > began}
        self.landing[key] = landing
        self.possible[key] = {state, *landing}
        self.since[key] = time.monotonic()

    def indeterminate(self, key: str, state: int) -> None:
        """A write that may have reached memcached failed: it may land until `tolerance` from
        now, even after later writes are acknowledged."""
        self.landing[key][state] = self.clock() + self.tolerance

    def one(self) -> None:
        rng = self.rng
        roll = rng.random()
        state: int | None = None  # the state a write would leave
        unsent_undo = False
        t0 = time.monotonic()
        began = self.clock()
        c = self.client
        try:
            if roll < 0.45:
                key = rng.choice(self.keys)
                what = f"get {key}"
                got = c.get(key)
                self.check(key, got, t0)
                outcome = "hit" if got is not None else "miss"
            elif roll < 0.55:
                keys = rng.sample(self.keys, min(5, len(self.keys)))
                what = f"get_many {keys}"
                found = c.get_many(keys)
                for k in keys:
                    self.check(k, found.get(k), t0)
                outcome = "get_many"
            elif roll < 0.9:
                key = rng.choice(self.keys)
                self.seq += 1
                what = f"set {key} {self.seq}"
                state = self.seq
                self.possible[key].add(state)  # indeterminate until acknowledged
                assert c.set(key, value_for(key, self.name, state, rng)) is True
                self.acked(key, state, began)
                outcome = "stored"
            else:
                key = rng.choice(self.keys)
                what = f"delete {key}"
                state = ABSENT
                unsent_undo = ABSENT not in self.possible[key]
                self.possible[key].add(ABSENT)
                c.delete(key)  # True (deleted) or False (was absent): absent either way
                self.acked(key, ABSENT, began)
                outcome = "deleted"
        except BrokerTimeout:
            outcome = "timeout"
            if state is not None:
                self.indeterminate(key, state)
        except MemcacheError as exc:
            outcome = "error:" + type(exc).__name__
            if isinstance(exc, BrokerUnavailable):
                self.wire.call_unavailable()
            if isinstance(exc, NOT_SENT) and state is not None and (state != ABSENT or unsent_undo):
                # Nothing reached memcached (clientlib.errors says so for these): the write is
                # known not to have happened, so its state is not a possibility.
                self.possible[key].discard(state)
            elif isinstance(exc, MemcacheUnexpectedCloseError) and state is not None:
                self.indeterminate(key, state)
        took = time.monotonic() - t0
        self.note(outcome, what, took)
        if state is not None:
            self.history[key].append(
                f"{what.split()[0]} {state} -> {outcome} at {(t0 - self.start) * 1000:.1f} ms for {took * 1000:.1f} ms")


def run_worker(url: str, wid: int, threads: int, seconds: float, max_calls: int, timeout: float,
               tolerance: float, prefix: str, keys_per_thread: int, out: Any, seed: int = 0,
               stop: Any = None, gen: Any = None) -> None:
    """A worker process's body (fork it): `threads` threads of self-verifying calls for `seconds`
    (at most `max_calls` calls each, or until `stop` is set), then the sweep ping; puts its Tally
    on `out`."""
    tally = Tally()
    wire = _Wire(tally, gen)
    wire.install()
    client = Client(url, timeout=timeout)
    workers = [
        _Thread(client, wire, tally, f"w{wid}t{t}", [f"{prefix}:w{wid}t{t}k{i}" for i in range(keys_per_thread)],
                timeout, tolerance, seed * 1000 + wid * 10 + t)
        for t in range(threads)
    ]

    def body(w: _Thread) -> None:
        end = time.monotonic() + seconds
        try:
            for _ in range(max_calls):
                if time.monotonic() >= end or (stop is not None and stop.is_set()):
                    break
                w.one()
            # Late replies to calls that gave up arrive by the broker's deadline; one more round
            # trip on this thread's socket sweeps them into the count.
            time.sleep(timeout + 0.3)
            for _ in range(20):
                try:
                    client.broker_ping()
                    break
                except MemcacheError:
                    time.sleep(0.25)
        except Exception:  # noqa: BLE001 - reported, then the test fails on it
            tally.crashed.append(traceback.format_exc())

    ts = [threading.Thread(target=body, args=(w,), daemon=True) for w in workers]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 60)
    wire.finish()
    client.disconnect_all()
    out.put(tally)
    out.close()
    out.join_thread()  # the queue's feeder thread must flush before _exit
    os._exit(0)  # no atexit from the parent (its harness registry) in a forked child


COUNTERS = ("frames", "ops", "ok", "miss", "errors", "timeouts", "replies", "replies_dropped",
            "bad_frames", "dropped_frames", "noreply", "internal_errors", "overloaded")


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {k: int(after[k]) - int(before[k]) for k in COUNTERS}


def reconcile(d: dict[str, int], t: Tally, *, replies_unreceived: int = 0) -> list[str]:
    """Problems in the broker counters' delta `d` (two broker_stats snapshots around the load)
    against the workers' Tally; empty when everything reconciles. Each snapshot is a frame of its
    own: the second's frame and op are in the delta, and so is the first's reply and its ok.
    `replies_unreceived`: replies the broker may have sent to a worker that was killed."""
    problems = []

    def eq(what: str, broker: int, workers: int) -> None:
        if broker != workers:
            problems.append(f"{what}: broker {broker} != workers {workers}")

    eq("frames in", d["frames"] - 1, t.frames)
    eq("ops in", d["ops"] - 1, t.ops)
    eq("ops = ok + miss + errors + timeouts", d["ops"] - 1, d["ok"] - 1 + d["miss"] + d["errors"] + d["timeouts"])
    eq("ok", d["ok"] - 1, t.codes["ok"])
    eq("miss", d["miss"], t.codes["miss"])
    eq("errors", d["errors"], t.codes["errors"])
    eq("timeouts", d["timeouts"], t.codes["timeouts"])
    eq("frames in = replies + dropped + noreply", d["frames"] - 1,
       d["replies"] - 1 + d["replies_dropped"] + d["noreply"] + d["dropped_frames"])
    sent_unseen = d["replies"] - 1 - t.replies
    if not 0 <= sent_unseen <= replies_unreceived:
        problems.append(f"replies: broker sent {d['replies'] - 1}, workers received {t.replies}")
    for name in ("replies_dropped", "bad_frames", "dropped_frames", "noreply", "internal_errors"):
        if d[name] and not (name == "replies_dropped" and d[name] <= replies_unreceived):
            problems.append(f"{name}: {d[name]}")
    for name in ("dup_replies", "unknown_replies", "unanswered"):
        if getattr(t, name) > (replies_unreceived if name == "unanswered" else 0):
            problems.append(f"{name}: {getattr(t, name)}")
    if t.frame_codes:
        problems.append(f"whole-frame refusals: {dict(t.frame_codes)}")
    return problems


def summary(t: Tally) -> str:
    return (f"calls {t.calls}, frames {t.frames}, replies {t.replies}, codes {dict(t.codes)}, "
            f"outcomes {dict(t.outcomes)}, misdelivered {len(t.misdelivered)}, lost {len(t.lost)}, "
            f"late {len(t.late)}, max call {t.max_took:.3f}s")
