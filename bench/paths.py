"""The competing paths, as seen from one worker process: how it connects and how it does one call.

| path | worker's client | reaches memcached through |
|---|---|---|
| direct | pymemcache `Client`, one connection per worker | nothing (or the delay proxy) |
| hashclient | pymemcache `HashClient` (rendezvous), one connection per server per worker | nothing (or the delay proxy) |
| twemproxy | pymemcache `Client`, one connection per worker | nutcracker (2 server connections each) |
| broker, broker-coalesce-on/off | `clientlib.Client` | mcbroker (2 connections per server) |
| zmq-echo | a raw DEALER sending clientlib's frame | nothing: bench/echo.py answers with a reply-sized blob |
| floor | `clientlib.Client` | bench/floor.py: the least Python a broker of this design runs (2 connections) |
| floor-guarded | `clientlib.Client` | bench/floor.py --rcvhwm 2 --opaques --fence: the floor with mcbroker's flood bound, opaques and fence |
| raw | one socket pipelining `mg <key> v` batches | nothing: the ceiling of one memcached connection |

Every value read is checked against the one the bench stored (`value_for`); a wrong value raises
`WrongValue`, which fails the scenario. Writes are checked by reading them back at the end.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CALL_TIMEOUT_S = 2.0
BROKER_PATHS = ("broker", "broker-coalesce-on", "broker-coalesce-off")
FLOOR_PATHS = ("floor", "floor-guarded")
PATHS = ("direct", "hashclient", "twemproxy", *BROKER_PATHS, *FLOOR_PATHS, "zmq-echo", "raw")
# The floor's options that add, in their plainest form, the work of mcbroker's guarantees that
# cost it most (bench/README, sixteenth and eighteenth rounds): the flood bound (at most 2 frames
# queued per worker socket), an opaque and `s` on every request checked on every answer, and the
# fence closing every write.
GUARDED_FLOOR_FLAGS = ("--rcvhwm", "2", "--opaques", "--fence")
PATH_HELP = {
    "direct": "pymemcache Client, one connection per worker, straight to memcached",
    "hashclient": "pymemcache HashClient over all servers (its default rendezvous hashing)",
    "twemproxy": "pymemcache Client through nutcracker 0.5.0 (ketama, fnv1a_64, 2 server connections)",
    "broker": "clientlib.Client through mcbroker (2 connections per server; coalesce_reads not set)",
    "broker-coalesce-on": "clientlib.Client through mcbroker with coalesce_reads = true",
    "broker-coalesce-off": "clientlib.Client through mcbroker with coalesce_reads = false",
    "floor": "limit: clientlib.Client through bench/floor.py, the least Python any broker of this design runs "
             "(plain gets only; no opaques, fences, deadlines, bounds, coalescing or stats; 2 connections)",
    "floor-guarded": "limit: the floor with mcbroker's flood bound (RCVHWM 2), an opaque and `s` on every request "
                     "checked on every answer, and the fence closing every write, each in its plainest form "
                     "(bench/floor.py --rcvhwm 2 --opaques --fence; 2 connections)",
    "zmq-echo": "limit: raw ZeroMQ DEALER sending clientlib's frame to a bare ROUTER echo (no memcached)",
    "raw": "limit: one raw socket per worker pipelining `mg <key> v` for a whole batch",
}


class WrongValue(AssertionError):
    """A worker read something other than what the bench stored."""


def value_for(key: str, size: int, tag: str = "") -> bytes:
    """The value the bench stores under `key`: the key (and tag) first, padded to `size` bytes."""
    head = f"{key}={tag}=".encode()
    return head + b"." * max(0, size - len(head))


@dataclass(frozen=True)
class WorkerSpec:
    path: str
    targets: tuple[str, ...]   # memcached / twemproxy host:port, or a broker / floor / echo ipc URL
    op: str                    # get | get_many | set
    keys: tuple[str, ...]      # this worker's key sequence (get/set) or the flat batches (get_many)
    batch: int
    value_size: int
    seconds: float
    pace_s: float = 0.0        # 0: back to back; else one call every pace_s
    sample_cap: int = 4096     # latency samples kept (stride doubles when full)
    reply_bytes: int = 0       # zmq-echo: the reply size the echo server sends
    worker_id: int = 0


Op = Callable[[int], int]   # call number -> keys done


def _pymemcache(spec: WorkerSpec) -> Any:
    from pymemcache.client.base import Client as PmcClient
    from pymemcache.client.hash import HashClient

    addrs = []
    for t in spec.targets:
        host, _, port = t.rpartition(":")
        addrs.append((host, int(port)))
    if spec.path == "hashclient":
        return HashClient(addrs, connect_timeout=CALL_TIMEOUT_S, timeout=CALL_TIMEOUT_S, no_delay=True,
                          use_pooling=False, retry_attempts=0, dead_timeout=1)
    # One socket per worker, as a prefork app has today; no_delay gives it its best case.
    return PmcClient(addrs[0], connect_timeout=CALL_TIMEOUT_S, timeout=CALL_TIMEOUT_S, no_delay=True)


def _client_ops(spec: WorkerSpec, client: Any) -> tuple[Op, Callable[[], None]]:
    keys = spec.keys
    n = len(keys)
    size = spec.value_size
    if spec.op == "get":
        expect = {k: value_for(k, size) for k in set(keys)}
        get = client.get

        def op(i: int) -> int:
            k = keys[i % n]
            got = get(k)
            if got != expect[k]:
                raise WrongValue(f"{spec.path} get {k!r}: {got[:60] if got else got!r}")
            return 1
        return op, lambda: None

    if spec.op == "get_many":
        b = spec.batch
        batches = [list(keys[j:j + b]) for j in range(0, n, b)]
        expects = [{k: value_for(k, size) for k in batch} for batch in batches]
        nb = len(batches)
        get_many = client.get_many

        def op(i: int) -> int:
            j = i % nb
            got = get_many(batches[j])
            if got != expects[j]:
                bad = sorted(set(expects[j]) ^ set(got))[:3] or [k for k in got if got[k] != expects[j][k]][:3]
                raise WrongValue(f"{spec.path} get_many: wrong or missing keys {bad}")
            return b
        return op, lambda: None

    if spec.op == "set":
        written: dict[str, bytes] = {}
        setter = client.set

        def op(i: int) -> int:
            k = keys[i % n]
            v = value_for(k, size, f"w{spec.worker_id}s{i}")
            if setter(k, v, noreply=False) is not True:
                raise WrongValue(f"{spec.path} set {k!r} was not stored")
            written[k] = v
            return 1

        def check() -> None:
            for k, v in written.items():
                got = client.get(k)
                if got != v:
                    raise WrongValue(f"{spec.path} set {k!r}: read back {got[:60] if got else got!r}, wrote {v[:60]!r}")
        return op, check
    raise ValueError(f"unknown op {spec.op!r}")


def _echo_ops(spec: WorkerSpec) -> tuple[Op, Callable[[], None], Callable[[], None]]:
    import random

    import zmq

    from clientlib.wire import Op as WireOp, encode_request

    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(CALL_TIMEOUT_S * 1000))
    sock.connect(spec.targets[0])
    keys = [k.encode() for k in spec.keys]
    n = len(keys)
    b = spec.batch if spec.op == "get_many" else 1
    timeout_ms = int(CALL_TIMEOUT_S * 1000 - 25)  # what clientlib sends for a 2 s timeout
    want = spec.reply_bytes
    rid = random.getrandbits(48)
    get_code, get_many_code = int(WireOp.GET), int(WireOp.GET_MANY)

    def op(i: int) -> int:
        nonlocal rid
        rid += 1
        j = (i * b) % n
        # The frame clientlib builds for this call: one GET, or one GET_MANY of the batch's keys.
        if b == 1:
            ops = [[get_code, keys[j % n]]]
        else:
            ops = [[get_many_code, [keys[(j + x) % n] for x in range(b)]]]
        sock.send(encode_request(rid, ops, timeout_ms))
        try:
            reply = sock.recv()
        except zmq.Again:
            raise TimeoutError("zmq-echo: no reply within the call timeout") from None
        if len(reply) != want:
            raise WrongValue(f"zmq-echo: reply of {len(reply)} bytes, expected {want}")
        return b

    def close() -> None:
        sock.close(0)
        ctx.term()
    return op, (lambda: None), close


def _raw_ops(spec: WorkerSpec) -> tuple[Op, Callable[[], None], Callable[[], None]]:
    host, _, port = spec.targets[0].rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    b = spec.batch
    keys = spec.keys
    batches = [keys[j:j + b] for j in range(0, len(keys), b)]
    # The whole answer to a batch is known in advance, so checking it is one bytes compare.
    requests = [b"".join(b"mg %s v\r\n" % k.encode() for k in batch) for batch in batches]
    answers = [b"".join(b"VA %d\r\n%s\r\n" % (spec.value_size, value_for(k, spec.value_size)) for k in batch)
               for batch in batches]
    nb = len(batches)
    recv_into = sock.recv_into
    buf = bytearray(max(len(a) for a in answers) + 65536)
    view = memoryview(buf)

    def op(i: int) -> int:
        j = i % nb
        sock.sendall(requests[j])
        want = len(answers[j])
        got = 0
        while got < want:
            r = recv_into(view[got:])
            if not r:
                raise ConnectionError("memcached closed the raw connection")
            got += r
        if got != want or view[:got] != answers[j]:
            raise WrongValue(f"raw: batch {j} answered {bytes(view[:80])!r}...")
        return len(batches[j])

    return op, (lambda: None), sock.close


def open_path(spec: WorkerSpec) -> tuple[Op, Callable[[], None], Callable[[], None]]:
    """(op, check, close) for one worker: op(i) does call i and returns the keys it covered; check()
    verifies what the worker wrote (sets); close() releases the connection."""
    if spec.path == "zmq-echo":
        return _echo_ops(spec)
    if spec.path == "raw":
        return _raw_ops(spec)
    if spec.path in BROKER_PATHS or spec.path in FLOOR_PATHS:
        from clientlib import Client

        client: Any = Client(spec.targets[0], timeout=CALL_TIMEOUT_S)
        close: Callable[[], None] = client.disconnect_all
    elif spec.path in ("direct", "hashclient", "twemproxy"):
        client = _pymemcache(spec)
        close = client.close
    else:
        raise ValueError(f"unknown path {spec.path!r}")
    op, check = _client_ops(spec, client)
    return op, check, close


def batches_of(keys: Sequence[str], batch: int, count: int, offset: int) -> tuple[str, ...]:
    """`count` get_many batches of `batch` distinct keys each, flat, starting at `offset`."""
    n = len(keys)
    return tuple(keys[(offset + j * batch + x) % n] for j in range(count) for x in range(batch))
