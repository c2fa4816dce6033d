"""Where the broker's CPU per key of a get_many goes, in this process, stage by stage.

    python -m bench.broker_stages [--keys 100] [--frames 3000] [--value-size 100] [--per-op] [--servers N]

The broker's own objects (Router, Server, Connection and its pipeline) run in this process, with
no ZeroMQ and no event loop: each frame goes in through `Router.handle`, the connection writes it
to one end of a socketpair, the other end answers every `mg` at once the way memcached does (all
hits, `VA <size> f0 s<size> O<n>`), and `Connection.on_readable` reads the answers and hands the
encoded reply to a list. That whole Python path, per key, is the first line; it is what the
bench's "broker CPU per key" carries beyond ZeroMQ (compare the zmq-echo's CPU per key there).

Then each stage of it alone, on the same frames and answers, beside a floor: the least any CPython
code must spend on that stage, measured the same way.

    sockets  the send and the reads the connection makes       (the same system calls on a
             for the frame                                     socketpair, nothing else)
    decode   wire.decode_request: unpack + check every key     floor: msgpack.unpackb alone
    encode   meta.holds_unsafe_byte + meta.encode_gets         floor: one b"".join of the keys
    parse    ResponseParser.feed + take_get_answers            floor: one regex match and one
                                                               slice per answer, nothing else
    reply    wire.encode_reply of the results                  floor: (it is one C call)
    reads    the coalescing table (published, then cleared),   (total with coalescing on minus
             per key; none since 79b2376, where a get_many's   total with it off: about 0 for
             keys stay out of it                               get_many frames now)
    rest     the whole path with coalescing off, less the five stages above: routing, the batch
             and its FIFO entry, the pipeline's proof and delivery

A stage timed alone runs with warm caches, its input made once; inside the whole path the same call
costs more (1.3-1.6 x for decode and parse on the Xeon machine), and the rest computed from the
stages alone took that difference for bookkeeping. So each stage is also timed *in the path*: the
whole path runs once more with a clock around every call of the stage's functions (the functions
the broker calls, swapped for the run and put back after it), and the rest is what the whole path
spends outside them and outside the socket calls. The clocks' own cost shows as the difference
between the whole path with and without them; the rest carries it. The rest is also given per
frame: most of it is per frame (routing, the job, the batch, the fence, the proof, the delivery),
not per key.

Frames are what clientlib sends: one GET_MANY op carrying the keys (one GET for one key); with
--per-op, one GET op per key (clientlib before GET_MANY, or facing a broker older than it).
With --servers N the whole path also runs with the keys placed over N servers (one connection and
one scripted memcached each): its CPU per key, and what each further server's batch adds per frame
(the N-server path less the one-server path, over N - 1).
CPU is this process's (time.process_time), the median of --rounds runs; figures are per key.
Nothing here needs a network, a memcached or a broker process.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker import meta  # noqa: E402
from broker import router as router_module  # noqa: E402
from broker.connection import READY, Budget, Connection, Server  # noqa: E402
from broker.health import Health  # noqa: E402
from broker.router import Router  # noqa: E402
from broker.shard import make_placement  # noqa: E402
from clientlib.address import parse_server  # noqa: E402
from clientlib.wire import Op, decode_request, encode_reply, encode_request  # noqa: E402

_REQUEST = re.compile(rb"mg (\S+) v f s O(\d+)\r\n|mg \S+ O(\d+)\r\n")
_FLOOR_ANSWER = re.compile(rb"VA (\d+) [^\r]*\r\n")


class _IO:
    """The service's part for a Server: which connections have bytes to write."""

    def __init__(self) -> None:
        self.dirty_conns: list[Any] = []

    def watch(self, conn: Any) -> None:
        pass

    def unwatch(self, conn: Any) -> None:
        pass

    def dirty(self, conn: Any) -> None:
        self.dirty_conns.append(conn)


def answers(requests: bytes, value: bytes) -> bytes:
    """memcached's answers to `requests`: a hit with `value` for each get, a miss for the fence."""
    out = []
    for m in _REQUEST.finditer(requests):
        if m[1] is None:
            out.append(b"EN O%s\r\n" % m[3])
        else:
            out.append(b"VA %d f0 s%d O%s\r\n%s\r\n" % (len(value), len(value), m[2], value))
    return b"".join(out)


def frame_ops(keys: list[bytes], per_op: bool = False) -> list[list[Any]]:
    """The ops of clientlib's frame for a get of `keys` (one GET per key with `per_op`)."""
    if per_op or len(keys) == 1:
        return [[Op.GET, k] for k in keys]
    return [[Op.GET_MANY, keys]]


def whole_path(
    keys: list[bytes], frames: int, value: bytes, coalesce: bool,
    answer: Callable[[bytes, bytes], bytes] = answers, per_op: bool = False, servers: int = 1,
) -> float:
    """CPU seconds per key of handle + flush + on_readable, over `frames` get_many frames whose
    requests `answer` answers; with `servers` > 1 the keys are placed over that many servers (one
    connection and one socketpair each), as the broker places them. RuntimeError unless every
    reply came and the last one is right."""
    replies: list[bytes] = []

    def send(peer: Any, ident: bytes, data: bytes) -> bool:
        replies.append(data)
        return True

    budget = Budget(1 << 20, 1 << 30)
    router = Router(budget=budget, send=send,
                    default_timeout=5.0, max_frame=1 << 22, max_value=0, remap=False,
                    local=lambda op: None, coalesce=coalesce)
    io = _IO()
    pool: list[Server] = []
    pairs: list[tuple[Connection, socket.socket, socket.socket]] = []  # (connection, its end, memcached's end)
    for n in range(servers):
        server = Server(parse_server(f"127.0.0.{n + 1}:1"), connections=1, io=io, budget=budget,
                        health=Health(3, 1, 30), max_inflight_conn=1 << 16, max_inflight_server=1 << 17)
        near, far = socket.socketpair()
        near.setblocking(False)
        far.setblocking(False)
        conn = server.conns[0]
        conn.sock = near  # connected, as after `open` and the connect's completion
        conn.state = READY
        pool.append(server)
        pairs.append((conn, near, far))
    router.set_servers(pool, make_placement("rendezvous", [(srv.address.hash_key, 1) for srv in pool]))
    ops = frame_ops(keys, per_op)
    spent = 0.0
    try:
        for i in range(frames):
            frame = encode_request(i + 1, ops, 5000)
            now = time.monotonic()
            t0 = time.process_time()
            for server in pool:
                server.batch_conn = None
            router.handle(None, b"worker", frame, now)
            for c in io.dirty_conns:
                c.flush(now)
            io.dirty_conns.clear()
            spent += time.process_time() - t0
            asked: list[Connection] = []
            for conn, _, far in pairs:
                sent = b""
                while True:
                    try:
                        sent += far.recv(1 << 20)
                    except BlockingIOError:
                        break
                if sent:
                    far.sendall(answer(sent, value))
                    asked.append(conn)
            t0 = time.process_time()
            for conn in asked:
                conn.on_readable(now)
            # As the service's loop does every turn (its poll timeout): answered frames leave
            # the deadline heap, so the collector does not walk thousands of finished ones.
            router.next_deadline()
            spent += time.process_time() - t0
            if len(replies) != i + 1:
                raise RuntimeError(f"frame {i + 1}: {len(replies)} replies")
        last = msgpack.unpackb(replies[-1])
        want: Any = value if len(keys) > 1 and not per_op else [0, value, 0]  # a GET_MANY's hits are bare
        if last[2] != 0 or len(last[3]) != len(keys) or any(r != want for r in last[3]):
            raise RuntimeError(f"wrong reply: {last!r:.200}")
    finally:
        for _, near, far in pairs:
            near.close()
            far.close()
    return spent / (frames * len(keys))


# Each stage's functions as the whole path calls them (by the name the caller looks up), for the
# in-path clocks. None of them calls another of them, so no time is counted twice.
STAGE_FUNCTIONS: dict[str, list[tuple[Any, str]]] = {
    "decode": [(router_module, "decode_request")],
    "encode": [(meta, "holds_unsafe_byte"), (meta, "is_plain_key"), (meta, "encode_gets"), (router_module, "encode_get")],
    "parse": [(meta.ResponseParser, name) for name in ("feed", "take_get_answers", "take_exact", "next_items")],
    "reply": [(router_module, "encode_reply")],
}


@contextlib.contextmanager
def stage_clocks(spent: dict[str, float]) -> Iterator[None]:
    """Within the block, every call of a stage's function (STAGE_FUNCTIONS) adds its wall time, in
    seconds, to spent[stage]; the functions are put back on the way out, whatever happens."""
    clock = time.perf_counter
    saved: list[tuple[Any, str, Any]] = []

    def clocked(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[stage] += clock() - t
        return call

    try:
        for stage, functions in STAGE_FUNCTIONS.items():
            spent.setdefault(stage, 0.0)
            for owner, name in functions:
                fn = owner.__dict__[name]  # the plain function (a class's own attribute, not a bound method)
                saved.append((owner, name, fn))
                setattr(owner, name, clocked(stage, fn))
        yield
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def in_path(keys: list[bytes], frames: int, value: bytes, per_op: bool = False) -> tuple[float, dict[str, float]]:
    """The whole path (coalescing off) run with the stage clocks: (its CPU seconds per key, with
    the clocks' cost; {stage: seconds per key inside that stage's calls})."""
    spent: dict[str, float] = {}
    with stage_clocks(spent):
        whole = whole_path(keys, frames, value, False, per_op=per_op)
    n = frames * len(keys)
    return whole, {stage: t / n for stage, t in spent.items()}


def per_key(fn: Callable[[], object], nkeys: int, number: int) -> float:
    """CPU seconds per key of one call of `fn` (which handles `nkeys` keys)."""
    timer = timeit.Timer(fn, timer=time.process_time)
    return timer.timeit(number) / (number * nkeys)


def stages(keys: list[bytes], value: bytes, number: int, per_op: bool = False) -> dict[str, tuple[float, float | None]]:
    """{stage: (CPU s per key, floor CPU s per key or None)}."""
    n = len(keys)
    frame = encode_request(1, frame_ops(keys, per_op), 5000)
    stream = answers(meta.encode_gets(keys, 1), value)
    results: list[Any] = [value] * n if n > 1 and not per_op else [[0, value, 0] for _ in keys]

    def parse() -> None:
        p = meta.ResponseParser(1 << 20)
        p.feed(stream)
        if len(p.take_get_answers(1, n, 0, None, True)) != n:
            raise RuntimeError("take_get_answers did not take every answer")

    floor_answer = _FLOOR_ANSWER.match

    def parse_floor() -> None:
        pos = 0
        got = []
        for _ in range(n):
            m = floor_answer(stream, pos)
            assert m is not None
            end = m.end()
            stop = end + int(m[1])
            got.append(stream[end:stop])
            pos = stop + 2

    sockets = socket_calls(meta.encode_gets(keys, 1) + b"mg _mcbroker_fence_ O%d\r\n" % (n + 1),
                           stream + b"EN O%d\r\n" % (n + 1), number) / n
    return {
        "sockets": (sockets, None),
        "decode": (per_key(lambda: decode_request(frame), n, number), per_key(lambda: msgpack.unpackb(frame), n, number)),
        "encode": (per_key(lambda: meta.holds_unsafe_byte(keys) or meta.encode_gets(keys, 1), n, number),
                   per_key(lambda: b"".join(keys), n, number)),
        "parse": (per_key(parse, n, number), per_key(parse_floor, n, number)),
        "reply": (per_key(lambda: encode_reply(1, results), n, number), None),
    }


def socket_calls(requests: bytes, answers: bytes, number: int) -> float:
    """CPU seconds per frame of what the whole path asks of its socket: one send of `requests`
    and the reads of `answers` (until the socket has no more), timed as whole_path times (two
    timed spans per frame), so the timer's own cost cancels when the two are compared."""
    near, far = socket.socketpair()
    near.setblocking(False)
    far.setblocking(False)
    buf = bytearray(256 * 1024)
    spent = 0.0
    try:
        for _ in range(number):
            t0 = time.process_time()
            near.send(requests)
            spent += time.process_time() - t0
            got = 0
            while got < len(requests):
                got += len(far.recv(1 << 20))
            far.sendall(answers)
            t0 = time.process_time()
            while near.recv_into(buf) == len(buf):
                pass
            spent += time.process_time() - t0
    finally:
        near.close()
        far.close()
    return spent / number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.broker_stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100, help="keys per get_many frame (default 100)")
    p.add_argument("--frames", type=int, default=3000, help="frames per run of the whole path (default 3000)")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each measurement; the median is shown (default 3)")
    p.add_argument("--per-op", action="store_true", help="frames of one GET op per key, not one GET_MANY op")
    p.add_argument("--servers", type=int, default=1,
                   help="also run the whole path with the keys placed over this many servers (default 1: not run)")
    args = p.parse_args(argv)
    if args.keys < 1 or args.frames < 1 or args.rounds < 1 or args.value_size < 0:
        p.error("--keys, --frames and --rounds must be positive, --value-size at least 0")
    if not 1 <= args.servers <= 64:
        p.error("--servers must be 1..64")
    keys = [b"bench:%06d" % i for i in range(args.keys)]
    value = b"v" * args.value_size
    number = max(1, args.frames // 3)

    # Rounds interleave coalescing on and off and the stages, so drift on a shared machine falls on
    # all of them; the reads' cost is the median of the per-round differences.
    ons, offs, runs, spread = [], [], [], []
    clocked: list[float] = []
    inside: list[dict[str, float]] = []
    for _ in range(args.rounds):
        ons.append(whole_path(keys, args.frames, value, True, per_op=args.per_op))
        offs.append(whole_path(keys, args.frames, value, False, per_op=args.per_op))
        runs.append(stages(keys, value, number, args.per_op))
        whole, parts = in_path(keys, args.frames, value, args.per_op)
        clocked.append(whole)
        inside.append(parts)
        if args.servers > 1:
            spread.append(whole_path(keys, args.frames, value, False, per_op=args.per_op, servers=args.servers))
    total = statistics.median(ons)
    off = statistics.median(offs)
    reads = statistics.median(a - b for a, b in zip(ons, offs))
    us = 1e6
    what = "single gets" if args.keys == 1 else f"get_many({args.keys}), " + ("one GET op per key" if args.per_op else "one GET_MANY op")
    print(f"{what}, {args.value_size}-byte hits, CPU per key in this process (median of {args.rounds}):")
    named = ("sockets", "decode", "encode", "parse", "reply")
    alone = {name: statistics.median(r[name][0] for r in runs) for name in named}
    within = {name: statistics.median(p[name] for p in inside) for name in named if name != "sockets"}
    with_clocks = statistics.median(clocked)
    # Shares of the clocked run (sockets, the stages in the path and the rest add up to it); the
    # reads' of the whole path with coalescing on.
    print("| stage | us per key, alone | us per key, in the path | floor us per key | share of the whole path |")
    print("|---|---:|---:|---:|---:|")
    print(f"| whole path (handle, flush, on_readable) | {total * us:.2f} | | | 100% |")
    for name in named:
        floors = [r[name][1] for r in runs]
        floor = "" if floors[0] is None else f"{statistics.median(f for f in floors if f is not None) * us:.2f}"
        cost = within.get(name, alone[name])
        there = f"{within[name] * us:.2f}" if name in within else ""
        print(f"| {name} | {alone[name] * us:.2f} | {there} | {floor} | {cost / with_clocks:.0%} |")
    print(f"| reads (coalescing on minus off) | {reads * us:.2f} | | | {reads / total:.0%} |")
    # The rest from the stages as the path runs them: what the clocked run spent outside every
    # stage's calls and outside the socket calls (the clocks' own cost falls in it).
    rest = with_clocks - alone["sockets"] - sum(within.values())
    print(f"| the rest: routing, batches, the pipeline's bookkeeping | | {rest * us:.2f} | | {rest / with_clocks:.0%} |")
    print(f"| the rest, us per frame | | {rest * us * args.keys:.1f} | | |")
    print(f"| whole path, coalescing off | {off * us:.2f} | | | |")
    print(f"| whole path, coalescing off, with the stage clocks | {with_clocks * us:.2f} | | | |")
    print(f"| the clocks' own cost (a difference of two runs; in the rest above) | {(with_clocks - off) * us:.2f} | | | |")
    if spread:
        # What each further server's batch of a frame costs: with many servers and few keys each,
        # most of the broker's work per frame (bench/README, fifteenth round).
        many = statistics.median(spread)
        extra = statistics.median((m - o) * args.keys / (args.servers - 1) for m, o in zip(spread, offs))
        print(f"| whole path over {args.servers} servers, coalescing off | {many * us:.2f} | | | |")
        print(f"| each further server's batch, us per frame | {extra * us:.2f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
