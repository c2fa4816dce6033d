"""Route each operation of a worker's frame to its server, gather results, answer the frame once.

A `Job` is one worker frame: it waits for one result per op and replies exactly once, either when
every op has its result or at the frame's deadline (pending ops then read TIMEOUT). Late responses
find the job done and are swallowed by the pipeline: nothing can reach a later request.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from typing import Any, Callable

from clientlib.wire import Code, Op, RequestFrame, WireError, decode_request, encode_error, encode_reply

from . import meta
from .meta import ArithMode, Response, SetMode, Status
from .pipeline import Budget, Server

log = logging.getLogger("mcbroker.router")

Send = Callable[[Any, bytes, bytes], bool]

_SET_MODES = {
    Op.SET: SetMode.SET,
    Op.ADD: SetMode.ADD,
    Op.REPLACE: SetMode.REPLACE,
    Op.APPEND: SetMode.APPEND,
    Op.PREPEND: SetMode.PREPEND,
    Op.CAS: SetMode.SET,
}
_STORE_CODES = {
    Status.OK: [Code.OK],
    Status.NOT_STORED: [Code.NOT_STORED],
    Status.EXISTS: [Code.EXISTS],
    Status.NOT_FOUND: [Code.NOT_FOUND],
    Status.MISS: [Code.NOT_FOUND],
}
_TEXT_EXPECT = {
    Op.VERSION: frozenset({Status.VERSION}),
    Op.STATS: frozenset({Status.STATS, Status.RESET, Status.TEXT_OK}),
    Op.FLUSH_ALL: frozenset({Status.TEXT_OK}),
    Op.CACHE_MEMLIMIT: frozenset({Status.TEXT_OK}),
}
_BROADCAST = frozenset(_TEXT_EXPECT)
_OK = [Code.OK]
# A deadline missed while the server had answered nothing for this long is a failure of the server.
SILENT_FAILURE = 0.1
_MISS = [Code.MISS]


def to_result(op: int, resp: Response) -> list[Any]:
    """Translate one memcached response into the wire's result for `op`."""
    status = resp.status
    if status is Status.SERVER_ERROR:
        return [Code.SERVER_ERROR, resp.text.decode("utf-8", "replace")]
    if op <= Op.GATS:
        if status is Status.VALUE:
            f = resp.flags.get("f")
            flags = int(f) if f else 0
            if op == Op.GETS or op == Op.GATS:
                c = resp.flags.get("c")
                return [Code.OK, resp.value, flags, int(c) if c else 0]
            return [Code.OK, resp.value, flags]
        if status is Status.MISS:
            return _MISS
    elif op <= Op.DELETE:
        r = _STORE_CODES.get(status)
        if r is not None:
            return r
    elif op <= Op.DECR:
        if status is Status.VALUE and resp.value is not None and resp.value.isdigit():
            return [Code.OK, int(resp.value)]
        if status is Status.NOT_FOUND:
            return [Code.NOT_FOUND]
        if status is Status.CLIENT_ERROR:
            return [Code.CLIENT_ERROR, resp.text.decode("utf-8", "replace")]
    elif op == Op.TOUCH:
        if status is Status.OK:
            return _OK
        if status is Status.MISS:
            return [Code.NOT_FOUND]
    elif op == Op.VERSION and status is Status.VERSION:
        return [Code.OK, resp.text.decode("ascii", "replace")]
    elif op == Op.STATS:
        if status is Status.STATS:
            return [Code.OK, resp.stats]
        return [Code.OK, {}]
    elif op in (Op.FLUSH_ALL, Op.CACHE_MEMLIMIT) and status is Status.TEXT_OK:
        return [Code.OK, True]
    return [Code.SERVER_ERROR, f"unexpected {status.name} reply to {Op(op).name}"]


class RouterStats:
    __slots__ = (
        "frames", "ops", "ok", "miss", "errors", "timeouts", "overloaded", "bad_frames",
        "dropped_frames", "replies", "replies_dropped", "noreply", "internal_errors",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Job:
    """One worker frame in flight."""

    __slots__ = ("router", "peer", "ident", "req_id", "results", "pending", "deadline", "noreply", "done", "where")

    def __init__(self, router: "Router", peer: Any, ident: bytes, frame: RequestFrame, deadline: float) -> None:
        self.router = router
        self.peer = peer
        self.ident = ident
        self.req_id = frame.req_id
        n = len(frame.ops)
        self.results: list[Any] = [None] * n
        self.pending = n
        self.deadline = deadline
        self.noreply = frame.noreply
        self.done = False
        self.where: list[Server | None] = [None] * n

    def deliver(self, index: int, op: int, resp: Response) -> None:
        self.results[index] = to_result(op, resp)
        self.pending -= 1
        if self.pending == 0:
            self.finish()

    def fail(self, index: int, code: Code, message: str) -> None:
        if self.results[index] is None:
            self.results[index] = [code, message]
            self.pending -= 1
            if self.pending == 0 and not self.done:
                self.finish()

    def set(self, index: int, result: list[Any]) -> None:
        self.results[index] = result
        self.pending -= 1
        if self.pending == 0:
            self.finish()

    def expire(self, now: float) -> None:
        late: list[Server] = []
        for i, r in enumerate(self.results):
            if r is None:
                server = self.where[i]
                self.results[i] = [Code.TIMEOUT, f"no answer from {server.name if server else 'memcached'} before the deadline"]
                if server is not None:
                    server.stats.timeouts += 1
                    if server not in late:
                        late.append(server)
        self.pending = 0
        self.finish()
        # One missed deadline is one failure per server, however many of the frame's keys it held:
        # a single 100-key get_many must not count as 100 consecutive failures. Counted after the
        # reply, so a mark-down failing the server's in-flight slots finds this job done.
        # Only a server that has stopped answering counts: a backlog that memcached is still
        # working through (say, right after it resumed) is slow, not failed, and must not eject it.
        for server in late:
            if server.silent_for(now) >= SILENT_FAILURE:
                server.record_failure(now, "request timed out")

    def finish(self) -> None:
        self.done = True
        router = self.router
        stats = router.stats
        for r in self.results:
            c = r[0]
            if c == Code.OK:
                stats.ok += 1
            elif c < Code.SERVER_ERROR:
                stats.miss += 1
            elif c == Code.TIMEOUT:
                stats.timeouts += 1
            else:
                if c == Code.OVERLOADED:
                    stats.overloaded += 1
                stats.errors += 1
        if self.noreply:
            stats.noreply += 1
            return
        router.reply(self.peer, self.ident, encode_reply(self.req_id, self.results))


class Gather:
    """A broadcast op (version, stats, flush_all): one sub-request per server, one result."""

    __slots__ = ("job", "index", "names", "values", "pending", "error", "done")

    def __init__(self, job: Job, index: int, names: list[str]) -> None:
        self.job = job
        self.index = index
        self.names = names
        self.values: dict[str, Any] = {}
        self.pending = len(names)
        self.error: str | None = None
        self.done = False

    def deliver(self, index: int, op: int, resp: Response) -> None:
        r = to_result(op, resp)
        if r[0] == Code.OK:
            self.values[self.names[index]] = r[1]
        else:
            self.error = self.error or f"{self.names[index]}: {r[1]}"
        self._one()

    def fail(self, index: int, code: Code, message: str) -> None:
        self.error = self.error or f"{self.names[index]}: {message}"
        self._one()

    def _one(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.done = True
            if not self.job.done:
                if self.error is not None:
                    self.job.fail(self.index, Code.SERVER_ERROR, self.error)
                else:
                    self.job.set(self.index, [Code.OK, self.values])


class Router:
    def __init__(
        self,
        *,
        budget: Budget,
        send: Send,
        default_timeout: float,
        max_frame: int,
        max_value: int,
        remap: bool,
        local: Callable[[int], Any],
    ) -> None:
        self.budget = budget
        self._send = send
        self.default_timeout = default_timeout
        self.max_frame = max_frame
        self.max_value = max_value
        self.remap = remap
        self.local = local  # answers PING and BROKER_STATS
        self.stats = RouterStats()
        self.servers: list[Server] = []
        self.placement: Any = None
        self.down: frozenset[int] = frozenset()
        self.draining = False
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()

    def set_servers(self, servers: list[Server], placement: Any) -> None:
        self.servers = servers
        self.placement = placement
        self.refresh_down()

    def refresh_down(self, _server: Server | None = None) -> None:
        self.down = frozenset(i for i, s in enumerate(self.servers) if not s.health.is_up)

    # --- frames --------------------------------------------------------------------------------

    def reply(self, peer: Any, ident: bytes, data: bytes) -> None:
        if self._send(peer, ident, data):
            self.stats.replies += 1
        else:
            self.stats.replies_dropped += 1

    def handle(self, peer: Any, ident: bytes, data: bytes, now: float) -> None:
        stats = self.stats
        stats.frames += 1
        try:
            frame = decode_request(data, self.max_frame)
        except WireError as exc:
            stats.bad_frames += 1
            if exc.req_id is not None:
                self.reply(peer, ident, encode_error(exc.req_id, exc.code, str(exc)))
            else:
                stats.dropped_frames += 1
            return
        if self.draining:
            if not frame.noreply:
                self.reply(peer, ident, encode_error(frame.req_id, Code.SHUTTING_DOWN, "broker is shutting down"))
            return
        timeout = frame.timeout_ms / 1000.0 if frame.timeout_ms else self.default_timeout
        job = Job(self, peer, ident, frame, now + timeout)
        stats.ops += len(frame.ops)
        for i, op in enumerate(frame.ops):
            self.route(job, i, op, now)
        # A job whose every op was answered on the spot (refused, local) has already replied.
        if not job.done:
            heapq.heappush(self._deadlines, (job.deadline, next(self._seq), job))

    def route(self, job: Job, i: int, op: list[Any], now: float) -> None:
        code = op[0]
        if code >= Op.VERSION:
            if code in _BROADCAST:
                self._broadcast(job, i, op, now)
            else:
                job.set(i, [Code.OK, self.local(code)])
            return
        key: bytes = op[1]
        servers = self.servers
        idx = self.placement.lookup(key)
        if idx in self.down:
            if self.remap:
                alt = self.placement.lookup_excluding(key, self.down)
                idx = alt if alt is not None else idx
            if idx in self.down:
                server = servers[idx]
                job.fail(i, Code.SERVER_DOWN, f"{server.name} is down: {server.health.last_error}")
                return
        server = servers[idx]
        budget = self.budget
        if budget.inflight >= budget.max_inflight or budget.buffered >= budget.max_buffered:
            job.fail(i, Code.OVERLOADED, "broker at its in-flight or buffer limit")
            return
        if code >= Op.SET and code <= Op.CAS and len(op[2]) > self.max_value:
            job.fail(i, Code.SERVER_ERROR, f"object too large for cache ({len(op[2])} > {self.max_value} bytes)")
            return
        conn = server.pick(key, now)
        if conn is None:
            job.fail(i, Code.CONNECTION_ERROR, f"no connection to {server.name}: {server.health.last_error or 'connecting'}")
            return
        if len(conn.inflight) >= server.max_inflight_conn or server.inflight_over():
            server.unpin(key)
            job.fail(i, Code.OVERLOADED, f"too many requests in flight to {server.name}")
            return
        opaque = conn.next_opaque()
        try:
            if code == Op.GET:
                data = meta.encode_get(key, opaque)
            elif code == Op.SET:
                data = meta.encode_set(key, op[2], opaque, op[3], op[4])
            else:
                data = meta.encode(_build(code, op, opaque))
        except meta.RequestError as exc:
            server.unpin(key)
            job.fail(i, Code.CLIENT_ERROR, str(exc))
            return
        job.where[i] = server
        conn.push((job, i, code, b"%d" % opaque, key, None), data, now)

    def _broadcast(self, job: Job, i: int, op: list[Any], now: float) -> None:
        code = op[0]
        if code == Op.VERSION:
            req: meta.Request = meta.Version()
        elif code == Op.STATS:
            req = meta.Stats(tuple(op[1]))
        elif code == Op.FLUSH_ALL:
            req = meta.FlushAll(op[1] or None)
        else:
            req = meta.CacheMemlimit(op[1])
        try:
            data = meta.encode(req)
        except meta.RequestError as exc:
            job.fail(i, Code.CLIENT_ERROR, str(exc))
            return
        servers = self.servers
        gather = Gather(job, i, [s.name for s in servers])
        for n, server in enumerate(servers):
            conn = server.pick(None, now) if server.health.is_up else None
            if conn is None:
                gather.fail(n, Code.SERVER_DOWN, f"no connection ({server.health.state.value})")
                continue
            conn.push((gather, n, code, None, None, _TEXT_EXPECT[code]), data, now)

    # --- deadlines -----------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            job = heapq.heappop(heap)[2]
            if not job.done:
                job.expire(now)

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


def _build(code: int, op: list[Any], opaque: int) -> meta.Request:
    key = op[1]
    if code == Op.GET:
        return meta.Get(key, opaque)
    if code == Op.GETS:
        return meta.Get(key, opaque, cas=True)
    if code == Op.GAT:
        return meta.Get(key, opaque, touch=op[2])
    if code == Op.GATS:
        return meta.Get(key, opaque, cas=True, touch=op[2])
    if code <= Op.CAS:
        return meta.Set(
            key, op[2], opaque, mode=_SET_MODES[code], client_flags=op[3], ttl=op[4],
            cas=op[5] if code == Op.CAS else None,
        )
    if code == Op.DELETE:
        return meta.Delete(key, opaque)
    if code == Op.INCR:
        return meta.Arith(key, opaque, delta=op[2])
    if code == Op.DECR:
        return meta.Arith(key, opaque, mode=ArithMode.DECR, delta=op[2])
    if code == Op.TOUCH:
        return meta.Get(key, opaque, value=False, client_flags=False, touch=op[2])
    raise WireError(Code.BAD_REQUEST, f"unknown op {code}")
