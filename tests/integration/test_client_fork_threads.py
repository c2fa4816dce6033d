"""One Client shared by forked children and by threads: every call gets its own answer.

Values encode (key, writer pid or thread, sequence), so a reply delivered to the wrong caller, a
stale reply, or a socket shared across fork (pymemcache #536, gunicorn #1953) shows up as a
mismatch rather than as a silent wrong value.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import signal
import threading
import time
from typing import Any

import pytest

from clientlib import Client
from clientlib.errors import MemcacheError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CHILDREN = 8
CALLS_PER_CHILD = 1000
THREADS = 16
CALLS_PER_THREAD = 400
SHARED_KEYS = 20


def encode(key: str, writer: str, seq: int) -> bytes:
    return f"{key}|{writer}|{seq}".encode()


def decode(value: bytes) -> tuple[str, str, int]:
    key, writer, seq = value.decode().split("|")
    return key, writer, int(seq)


class Checker:
    """Self-verifying calls for one writer (a process or a thread) on a shared Client."""

    def __init__(self, client: Client, writer: str) -> None:
        self.c = client
        self.writer = writer
        self.latest: dict[str, int] = {}
        self.counter = 0
        self.mismatches: list[str] = []
        self.errors: list[str] = []
        self.calls = 0

    def bad(self, what: str) -> None:
        if len(self.mismatches) < 20:
            self.mismatches.append(what)
        else:
            self.mismatches.append("...")

    def check_own(self, key: str, value: Any) -> None:
        want = self.latest.get(key)
        got = None if value is None else decode(value)
        if want is None:
            if got is not None:
                self.bad(f"{key}: expected a miss, got {got}")
        elif got != (key, self.writer, want):
            self.bad(f"{key}: expected {(key, self.writer, want)}, got {got}")

    def check_shared(self, key: str, value: Any) -> None:
        # Written only by the parent; any writer and sequence will do, the key must be this one.
        if value is None or decode(value)[0] != key or decode(value)[1] != "parent":
            self.bad(f"{key}: shared value {value!r}")

    def step(self, i: int) -> None:
        own = f"own:{self.writer}:{i % 25}"
        kind = i % 6
        try:
            if kind == 0:
                assert self.c.set(own, encode(own, self.writer, i)) is True
                self.latest[own] = i
            elif kind == 1:
                self.check_own(own, self.c.get(own))
            elif kind == 2:
                keys = [f"own:{self.writer}:{j}" for j in range(i % 25, i % 25 + 5)]
                got = self.c.get_many(keys)
                for k in keys:
                    self.check_own(k, got.get(k))
            elif kind == 3:
                self.counter += 1
                ctr = f"ctr:{self.writer}"
                n = self.c.incr(ctr, 1)
                if n is None:
                    self.c.add(ctr, b"0")
                    n = self.c.incr(ctr, 1)
                    self.counter = 1
                if n != self.counter:
                    self.bad(f"{ctr}: expected {self.counter}, got {n}")
            elif kind == 4:
                key = f"shared:{i % SHARED_KEYS}"
                self.check_shared(key, self.c.get(key))
            else:
                value, cas = self.c.gets(own)
                self.check_own(own, value)
                if value is not None:
                    assert self.c.cas(own, encode(own, self.writer, i), cas) is True
                    self.latest[own] = i
            self.calls += 1
        except MemcacheError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        except AssertionError as exc:
            self.bad(f"step {i}: unexpected return {exc!r}")

    def report(self) -> dict[str, Any]:
        return {"writer": self.writer, "calls": self.calls, "mismatches": self.mismatches, "errors": self.errors[:20]}


def seed_shared(c: Client) -> None:
    assert c.set_many({f"shared:{i}": encode(f"shared:{i}", "parent", 0) for i in range(SHARED_KEYS)}) == []


def _child(c: Client, go: int, out: int) -> int:
    os.read(go, 1)  # start together with the other children
    checker = Checker(c, f"child{os.getpid()}")
    for i in range(CALLS_PER_CHILD):
        checker.step(i)
        if len(checker.errors) > 3:
            break  # broken beyond doubt: report now instead of timing out call after call
    report = checker.report()
    os.write(out, json.dumps(report).encode()[:60000])
    return 0 if not report["mismatches"] and not report["errors"] and report["calls"] == CALLS_PER_CHILD else 1


def test_forked_children_and_parent_share_one_client(broker: Any) -> None:
    c = Client(broker.url, timeout=5.0)
    seed_shared(c)  # the parent's sockets exist before fork
    assert c.get("shared:0") is not None
    go_r, go_w = os.pipe()
    children: dict[int, int] = {}
    try:
        for _ in range(CHILDREN):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never return into pytest
                code = 99
                try:
                    os.close(r)
                    code = _child(c, go_r, w)
                except BaseException as exc:  # noqa: BLE001 - report anything, then exit
                    try:
                        os.write(w, json.dumps({"crash": repr(exc)}).encode())
                    except BaseException:
                        pass
                finally:
                    os._exit(code)
            os.close(w)
            children[pid] = r

        os.write(go_w, b"g" * CHILDREN)
        parent = Checker(c, "parent-own")
        outputs = {pid: b"" for pid in children}
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + 60
        i = 0
        # The parent keeps calling on the same Client while the children run.
        while len(statuses) < len(children) and time.monotonic() < deadline:
            parent.step(i)
            i += 1
            ready, _, _ = select.select([fd for pid, fd in children.items() if pid not in statuses], [], [], 0)
            for pid, fd in children.items():
                if fd in ready:
                    chunk = os.read(fd, 65536)
                    outputs[pid] += chunk
                    if not chunk:
                        _, status = os.waitpid(pid, 0)
                        statuses[pid] = os.waitstatus_to_exitcode(status)
        assert len(statuses) == len(children), "children did not finish in time"
        reports = [json.loads(outputs[pid] or b"{}") for pid in children]
        for pid, report in zip(children, reports):
            assert statuses[pid] == 0, (statuses[pid], report)
            assert report["calls"] == CALLS_PER_CHILD and report["mismatches"] == [] and report["errors"] == []
        assert i > 0 and parent.mismatches == [] and parent.errors == []
        # After the children are gone the parent's connection is still its own.
        for j in range(200):
            parent.step(i + j)
        assert parent.mismatches == [] and parent.errors == []
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for fd in [go_r, go_w, *children.values()]:
            try:
                os.close(fd)
            except OSError:
                pass


def _pool_task(n: int) -> tuple[int, list[str]]:
    c = _POOL_CLIENT  # inherited from the parent at fork, already used there
    assert c is not None
    checker = Checker(c, f"pool{os.getpid()}-{n}")
    for i in range(50):
        checker.step(i)
    return checker.calls, checker.mismatches + checker.errors


_POOL_CLIENT: Client | None = None


def test_multiprocessing_fork_pool_inherits_a_used_client(broker: Any) -> None:
    global _POOL_CLIENT
    _POOL_CLIENT = c = Client(broker.url, timeout=5.0)
    seed_shared(c)
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(4) as pool:
            results = pool.map_async(_pool_task, range(16)).get(timeout=60)
        assert [r[1] for r in results] == [[]] * 16
        assert sum(r[0] for r in results) == 16 * 50
        assert c.get("shared:1") == encode("shared:1", "parent", 0)
    finally:
        _POOL_CLIENT = None


def test_threads_share_one_client(broker: Any) -> None:
    c = Client(broker.url, timeout=5.0)
    seed_shared(c)
    checkers = [Checker(c, f"thread{n}") for n in range(THREADS)]
    start = threading.Barrier(THREADS)

    def work(ch: Checker) -> None:
        start.wait(timeout=30)
        for i in range(CALLS_PER_THREAD):
            ch.step(i)

    threads = [threading.Thread(target=work, args=(ch,), daemon=True) for ch in checkers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not any(t.is_alive() for t in threads), "threads did not finish in time"
    for ch in checkers:
        assert ch.mismatches == [] and ch.errors == [], ch.report()
        assert ch.calls == CALLS_PER_THREAD
    # Each thread opened its own socket; disconnect_all closes them and the client keeps working.
    c.disconnect_all()
    assert c.get("shared:2") == encode("shared:2", "parent", 0)
