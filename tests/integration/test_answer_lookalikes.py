"""Values that look like memcached's own answers, read back through a real broker and memcached.

The broker reads a run of hits in bulk (broker/meta.py `ResponseParser._take_hit_run`, from 16
answers wanted): it splits memcached's answers at CRLF and proves each header by rebuilding it. Here
values hold CRLF, `EN O<n>`, whole `VA ...` answers, bare CR and LF, ` f0 s`, sizes around the bulk
read's 160-byte cap and far past it, with flags 0 and others, among misses and among plain values
(whose long runs the bulk read takes), in get_many batches of 16 to 300 keys in shuffled order,
from several worker processes at once (so answers of different batches share reads at arbitrary
offsets). Every value must come back whole, with its flags, to the
call that asked for it, and the broker must never lose step with memcached (no reset, no error)."""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import pytest

from clientlib import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOOKALIKES = [
    b"", b"\r\n", b"\r\nEN O5\r\n", b"VA 3 f0 s3 O7\r\nabc\r\n", b"x\r\nVA 1 f0 s1 O2\r\ny", b"EN O1",
    b"\n", b"\r", b" f0 s", b"VA 1 f0 s1 O9", b"x" * 159, b"x" * 160, b"x" * 161, b"y" * 5000,
    b"z" * 200_000,
]
FLAGS = [0, 0, 0, 5, 2**32 - 1]
KEYS = 300  # every 10th a lookalike, the rest plain
MISSING = 20
WORKERS = 4
CALLS = 40


class FlagsSerde:
    """Bytes stored as they are; a read returns (value, client flags), so flags are checked too."""

    def serialize(self, key: Any, value: bytes) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


def stored_values() -> dict[str, tuple[bytes, int]]:
    out = {}
    for i in range(KEYS):
        if i % 10:
            # Plain values, flags 0 but for keys 100-119 (runs with other flags take the other template).
            out[f"la:{i}"] = (b"plain:%d" % i, 0 if not 100 <= i < 120 else FLAGS[i % len(FLAGS)])
        else:
            value = LOOKALIKES[(i // 10) % len(LOOKALIKES)] + (b"%d" % i if i % 3 else b"")
            out[f"la:{i}"] = (value, FLAGS[(i // 10) % len(FLAGS)])
    return out


def _reader(url: str, seed: int, out: "multiprocessing.Queue[tuple[int, list[str]]]") -> None:
    stored = stored_values()
    every = list(stored) + [f"la:missing:{i}" for i in range(MISSING)]
    plain = [k for k, (v, _) in stored.items() if v.startswith(b"plain:")]
    rng = random.Random(seed)
    client = Client(url, timeout=20.0, serde=FlagsSerde())
    wrong: list[str] = []
    calls = 0
    try:
        for n in range(CALLS):
            # Every other call asks plain values only (all hits): long runs for the bulk read.
            keys = every if n % 2 else plain
            rng.shuffle(keys)
            batch = keys[: rng.randint(16, len(keys))]
            got = client.get_many(batch)
            calls += 1
            want = {k: stored[k] for k in batch if k in stored}
            if got != want:
                bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
                wrong.append(f"call {calls}: {len(bad)} keys differ, first {bad[:3]}")
    except Exception as exc:  # reported to the parent, which fails the test with it
        wrong.append(f"raised {type(exc).__name__}: {exc}")
    finally:
        client.close()
    out.put((calls, wrong))


@pytest.mark.timeout(180)
def test_values_that_look_like_answers_come_back_whole_to_their_callers(mc: Any, broker_factory: Any) -> None:
    broker = broker_factory([mc.address], connections_per_server=1)
    writer = Client(broker.url, timeout=20.0, serde=FlagsSerde())
    for key, (value, flags) in stored_values().items():
        assert writer.set(key, value, flags=flags) is True
    writer.close()
    ctx = multiprocessing.get_context("fork")
    out: "multiprocessing.Queue[tuple[int, list[str]]]" = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(broker.url, seed, out)) for seed in range(WORKERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=150) for _ in procs]
    for p in procs:
        p.join(10)
    assert [wrong for _, wrong in results] == [[]] * WORKERS
    assert [calls for calls, _ in results] == [CALLS] * WORKERS
    stats = broker.stats()
    assert stats["servers"][mc.address]["resets"] == 0
    assert stats["errors"] == 0
