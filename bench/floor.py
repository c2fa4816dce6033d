"""The Python limit: the least work any broker of this design does for a get, in a process of its own.

    python -m bench.floor --url ipc:///tmp/x/floor.sock --server 127.0.0.1:11211 [--server ...]
                          [--connections 2]

mcbroker's design fixes the transport (ZeroMQ, msgpack frames), the language (CPython) and the
shape of the hop (one loop that batches every worker's gets into pipelined `mg` writes). This
program is that design with nothing else: a `zmq.Poller` loop, a ROUTER answered with plain
send/recv, each frame unpacked with one `msgpack.unpackb`, its gets written as `mg <key> v f` with
one join per server, each turn's frames given to the least busy of `--connections` connections to
each memcached, keys placed by Python's own `hash` (the cheapest placement there is; the bench
stores every key on every server), answers matched first in, first out with one precompiled regex
match and one slice per answer, and one `msgpack.packb` per reply. Workers talk to it with
clientlib, as to the broker.

What it leaves out is what mcbroker adds for its guarantees and its operations: opaques and the
fence that prove each answer belongs to its request, `s` checked on every hit, deadlines and
timeouts, bounds on what is in flight and buffered, key checks, pins, read coalescing, a placement
that matches other clients', reconnects, statistics, access control. It handles only frames of
plain gets; it is a measuring stick (bench/README.md, "Paths"), not a product: a wrong answer from
memcached or a lost connection ends it with an error, it never recovers.

Every broker of this design must do at least this work per frame and per key, so a figure this
program misses on a machine, no CPython broker of this design can meet there. Prints READY once
bound and connected; SIGTERM/SIGINT only set a flag.

Three options add, one by one, what mcbroker pays for its guarantees, in this program's plainest
form, so that `python -m bench.ab_broker --before-floor ... --after-floor ...` can price each:
`--rcvhwm 2` (mcbroker's flood bound: at most 2 frames queued per worker), `--opaques` (every
request `mg <key> v f s O<n>`, every answer's opaque checked against its request's in turn and
each hit's `s` against its value's length) and `--fence` (with --opaques: every write ends with
mcbroker's fence, `mg _mcbroker_fence_ O<n>`, whose `EN O<n>` is checked in its place).
"""

from __future__ import annotations

import argparse
import collections
import re
import socket
import sys
import time
from typing import Any

import msgpack  # type: ignore[import-untyped]
import zmq

from .serving import StopFlag, bound_router, check_url

GET = 1      # clientlib.wire.Op.GET
GET_MANY = 6  # clientlib.wire.Op.GET_MANY: a get_many's keys in one op
OK, MISS, BAD_REQUEST = 0, 1, 23   # clientlib.wire.Code
VERSION = 1
# memcached's answer to `mg <key> v f`: a hit with its size and client flags, or a miss.
_ANSWER = re.compile(rb"VA (\d+) f(\d+)\r\n|EN\r\n")
# ... and to `mg <key> v f s O<n>` (--opaques): the same with the size again and the opaque.
_CHECKED = re.compile(rb"VA (\d+) f(\d+) s(\d+) O(\d+)\r\n|EN O(\d+)\r\n")
FENCE_KEY = b"_mcbroker_fence_"  # broker/pipeline.py's: a key the broker never stores
_FENCE = object()  # the `part` of a fence's entry in Upstream.waiting


class Upstream:
    """One connection to memcached: bytes to write, frames waiting for answers in order."""

    __slots__ = ("buf", "fd", "out", "results", "seq", "sock", "unfenced", "waiting", "want")

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.out = bytearray()
        # Per frame (or part of a frame, with several servers) sent, oldest first: (ident, req_id,
        # keys, part); `results` holds the oldest's answers so far. part: None for a whole frame,
        # else (the frame's Split, the positions of these keys in it).
        # many: the frame was one GET_MANY op (its reply carries a hit with flags 0 as the value alone).
        self.waiting: collections.deque[tuple[bytes, int, int, Any, bool]] = collections.deque()
        self.buf = b""
        self.results: list[Any] = []
        self.seq = 0  # --opaques: the last opaque sent
        self.want = 1  # --opaques: the opaque the next answer must carry
        self.unfenced = False  # --fence: requests queued since the last fence

    def queue_checked(self, keys: list[bytes], entry: tuple[bytes, int, int, Any, bool]) -> None:
        """--opaques: queue the gets of `keys`, each with the next opaque, answered as `entry`
        (see `waiting`)."""
        first = self.seq + 1
        # Built whole before anything changes: a key that is not bytes raises here, and the
        # frame is answered as one the floor does not serve, with nothing queued.
        reqs = b"".join([b"mg %b v f s O%d\r\n" % ko for ko in zip(keys, range(first, first + len(keys)))])
        self.out += reqs
        self.seq += len(keys)
        self.unfenced = True
        self.waiting.append(entry)

    def fence(self) -> None:
        """End what is queued with the fence (--fence), if anything was queued since the last."""
        if self.unfenced:
            self.seq += 1
            self.out += b"mg %b O%d\r\n" % (FENCE_KEY, self.seq)
            self.waiting.append((b"", self.seq, 1, _FENCE, False))
            self.unfenced = False

    def flush(self) -> bool:
        """Write what is queued; True when some is left (wait for POLLOUT)."""
        if self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                n = 0
            del self.out[:n]
        return bool(self.out)

    def _read(self) -> bytes:
        """What memcached sent, after what the last read left unparsed."""
        data = self.sock.recv(1 << 18)
        if not data:
            raise ConnectionError("memcached closed the connection")
        return self.buf + data if self.buf else data

    def answers(self, router: Any, sndmore: int, noblock: int) -> None:
        """Read what memcached sent and reply to every frame now fully answered."""
        buf = self._read()
        pos = 0
        end = len(buf)
        match = _ANSWER.match
        waiting = self.waiting
        results = self.results
        while waiting:
            ident, req_id, n, part, many = waiting[0]
            while len(results) < n:
                m = match(buf, pos)
                if m is None:
                    if buf.find(b"\r\n", pos) >= 0:
                        raise ConnectionError(f"unexpected answer from memcached: {buf[pos:pos + 80]!r}")
                    break
                size = m[1]
                if size is None:
                    results.append([MISS])
                    pos = m.end()
                    continue
                start = m.end()
                stop = start + int(size)
                if stop + 2 > end:
                    break  # the value is not all here yet: read it again with the rest
                flags = m[2]
                results.append(buf[start:stop] if flags == b"0" else [OK, buf[start:stop], int(flags)])
                pos = stop + 2
            if len(results) < n:
                break
            waiting.popleft()
            _reply(router, ident, req_id, part, many, results, sndmore, noblock)
            results = self.results = []
        self.buf = buf[pos:]

    def answers_checked(self, router: Any, sndmore: int, noblock: int) -> None:
        """`answers` for --opaques (and --fence): every answer's opaque checked against its
        request's in turn, each hit's `s` against its size, each fence's `EN O<n>` in its place.
        A copy of `answers` with the checks in, not a flag in it: the plain floor's per-answer loop
        stays the one every earlier measurement ran, with no test per answer added."""
        buf = self._read()
        pos = 0
        end = len(buf)
        match = _CHECKED.match
        waiting = self.waiting
        results = self.results
        want = self.want
        while waiting:
            ident, req_id, n, part, many = waiting[0]
            while len(results) < n:
                m = match(buf, pos)
                if m is None:
                    if buf.find(b"\r\n", pos) >= 0:
                        raise ConnectionError(f"unexpected answer from memcached: {buf[pos:pos + 80]!r}")
                    break
                size = m[1]
                if size is None:
                    if int(m[5]) != want:
                        raise ConnectionError(f"answer O{m[5]!r} where O{want} was due")
                    results.append([MISS])
                    pos = m.end()
                    want += 1
                    continue
                if m[3] != size or int(m[4]) != want:
                    raise ConnectionError(f"answer {m[0]!r} where O{want} was due")
                start = m.end()
                stop = start + int(size)
                if stop + 2 > end:
                    break  # the value is not all here yet: read it again with the rest
                flags = m[2]
                results.append(buf[start:stop] if flags == b"0" else [OK, buf[start:stop], int(flags)])
                pos = stop + 2
                want += 1
            if len(results) < n:
                break
            waiting.popleft()
            if part is not _FENCE:  # (the fence asks no value: a hit would be `HD`, unexpected above)
                _reply(router, ident, req_id, part, many, results, sndmore, noblock)
            results = self.results = []
        self.want = want
        self.buf = buf[pos:]


def _reply(router: Any, ident: bytes, req_id: int, part: Any, many: bool, results: list[Any], sndmore: int,
           noblock: int) -> None:
    """Reply to the frame that `results` (a whole frame's, or one server's `part` of it) answer,
    once all its parts are in."""
    if part is not None:
        split, where = part
        whole = split.results
        for i, r in zip(where, results):
            whole[i] = r
        split.parts -= 1
        if split.parts:
            return
        results = whole
    if not many:
        results = [[OK, r, 0] if type(r) is bytes else r for r in results]
    try:
        router.send(ident, sndmore | noblock)
        router.send(msgpack.packb([VERSION, req_id, OK, results]), noblock)
    except zmq.Again:
        pass  # a worker that went away or stopped reading: drop, as a ROUTER does


class Split:
    """A frame whose keys live on several servers: its results, and how many parts are still out."""

    __slots__ = ("parts", "results")

    def __init__(self, n: int, parts: int) -> None:
        self.results: list[Any] = [None] * n
        self.parts = parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--server", required=True, action="append",
                   help="memcached host:port; repeat for several (keys placed by Python's hash(key) %% n)")
    p.add_argument("--connections", type=int, default=2, help="per server")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--rcvhwm", type=int, default=0,
                   help="the ROUTER's receive high-water mark per worker, in frames (default 0: ZeroMQ's own, 1000; "
                        "mcbroker's flood bound is 2)")
    p.add_argument("--opaques", action="store_true",
                   help="each request with an opaque and `s`, each answer checked against its request (as mcbroker)")
    p.add_argument("--fence", action="store_true", help="with --opaques: each write ended with mcbroker's fence, its answer checked")
    args = p.parse_args(argv)
    check_url(p, args.url)
    if not 1 <= args.connections <= 8:
        p.error("--connections must be 1..8")
    if not 0 <= args.rcvhwm <= 1_000_000:
        p.error("--rcvhwm must be 0..1000000")
    if args.fence and not args.opaques:
        p.error("--fence needs --opaques (a fence is told from a miss by its opaque)")
    opaques, fence = args.opaques, args.fence
    stop = StopFlag()
    servers = [[Upstream(a) for _ in range(args.connections)] for a in args.server]
    nservers = len(servers)
    by_fd = {u.fd: u for ups in servers for u in ups}
    ctx = zmq.Context()
    router = bound_router(ctx, args.url, args.rcvhwm)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    for fd in by_fd:
        poller.register(fd, zmq.POLLIN)
    noblock, sndmore = int(zmq.NOBLOCK), int(zmq.SNDMORE)
    unpackb, packb = msgpack.unpackb, msgpack.packb
    print("READY", flush=True)
    end = time.monotonic() + args.max_seconds
    try:
        while not stop.set and time.monotonic() < end:
            for obj, ev in poller.poll(100):
                if obj is router:
                    # This turn's frames all go to each server's connection with the fewest waiting.
                    turn = [min(ups, key=lambda u: len(u.waiting)) for ups in servers]
                    up = turn[0]
                    for _ in range(4096):
                        try:
                            ident = router.recv(noblock)
                        except zmq.Again:
                            break
                        data = router.recv(noblock)
                        req_id = None
                        try:
                            # A frame the floor cannot serve (not msgpack, not a request, not plain
                            # gets of bytes keys) raises here, before anything is queued upstream.
                            frame = unpackb(data)
                            req_id = frame[1]
                            ops = frame[4]
                            many = len(ops) == 1 and ops[0][0] == GET_MANY
                            if many:
                                keys = ops[0][1]
                                if type(keys) is not list or not keys:
                                    raise ValueError("not plain gets")
                            else:
                                keys = [op[1] for op in ops if op[0] == GET]
                                if len(keys) != len(ops) or not keys:
                                    raise ValueError("not plain gets")
                            if nservers == 1:
                                if opaques:
                                    up.queue_checked(keys, (ident, req_id, len(keys), None, many))
                                    continue
                                up.out += b"mg " + b" v f\r\nmg ".join(keys) + b" v f\r\n"
                                up.waiting.append((ident, req_id, len(keys), None, many))
                                continue
                            groups: dict[int, tuple[list[int], list[bytes]]] = {}
                            for i, key in enumerate(keys):
                                g = groups.get(s := hash(key) % nservers)
                                if g is None:
                                    groups[s] = ([i], [key])
                                else:
                                    g[0].append(i)
                                    g[1].append(key)
                            # (upstream, its requests' bytes, or with --opaques its keys, their frame positions)
                            reqs: list[tuple[Upstream, Any, list[int]]]
                            if opaques:
                                b"".join(keys)  # TypeError unless every key is bytes: nothing queued yet
                                reqs = [(turn[s], ks, where) for s, (where, ks) in groups.items()]
                            else:
                                reqs = [(turn[s], b"mg " + b" v f\r\nmg ".join(ks) + b" v f\r\n", where)
                                        for s, (where, ks) in groups.items()]
                        except Exception:  # noqa: BLE001 - any malformed frame: answer it, never die
                            if type(req_id) is int:
                                router.send(ident, sndmore | noblock)
                                router.send(packb([VERSION, req_id, BAD_REQUEST, "the floor serves plain gets only"]), noblock)
                            continue
                        split = Split(len(keys), len(reqs))
                        for u, req, where in reqs:
                            entry = (ident, req_id, len(where), (split, where), many)
                            if opaques:
                                u.queue_checked(req, entry)
                            else:
                                u.out += req
                                u.waiting.append(entry)
                    for u in turn:
                        if fence:
                            u.fence()
                        if u.flush():
                            poller.modify(u.fd, zmq.POLLIN | zmq.POLLOUT)
                    continue
                up = by_fd[obj]
                if ev & zmq.POLLIN:
                    if opaques:
                        up.answers_checked(router, sndmore, noblock)
                    else:
                        up.answers(router, sndmore, noblock)
                if ev & zmq.POLLOUT and not up.flush():
                    poller.modify(up.fd, zmq.POLLIN)
    except ConnectionError as exc:
        print(f"floor: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        ctx.destroy(0)
        for u in by_fd.values():
            u.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
