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

from clientlib.limits import item_fits
from clientlib.wire import Code, Op, RequestFrame, WireError, decode_request, encode_error, encode_reply

from . import meta
from .connection import Budget, Connection, Server
from .pipeline import TAG_BITS, TEXT, Batch
from .stats import CODE_NAMES, OP_NAMES
from .meta import encode_get
from .translate import BROADCAST, TEXT_EXPECT, UNLINK_TOO_LARGE, encode_op, encode_text, too_large

log = logging.getLogger("mcbroker.router")

Send = Callable[[Any, bytes, bytes], bool]
# One frame's requests bound for one connection: op indices, op codes, pinned keys, encoded
# requests, joinable reads.
_Group = tuple[list[int], list[int], list[bytes | None], list[bytes], list[bytes | None]]

# The buffer bound (max_buffered_bytes) and who may use what is left: a store of a large value is
# refused once it would take the buffered bytes past the bound, while small requests (gets,
# deletes, small sets) keep a reserve above it, so a flood of large sets cannot lock the other
# workers out (a flood test found their small sets refused).
SMALL_OP_BYTES = 4096
SMALL_RESERVE_BYTES = 1 << 20
# A deadline missed while the server had answered nothing for this long is a failure of the server.
SILENT_FAILURE = 0.1
# The deadline heap is swept of answered frames when it passes this size (or twice what the last
# sweep left): answered frames kept behind a long wait cost memory, not correctness.
SWEEP_MIN = 4096
_GET = int(Op.GET)
_GETS = int(Op.GETS)
_SET = int(Op.SET)
_CAS = int(Op.CAS)
_VERSION = int(Op.VERSION)
_FLUSH_ALL = int(Op.FLUSH_ALL)
_CONN_MASK = (1 << TAG_BITS) - 1
_OK_CODE = int(Code.OK)
_MISS_CODE = int(Code.MISS)


class RouterStats:
    __slots__ = (
        "frames", "ops", "ok", "miss", "errors", "timeouts", "overloaded", "bad_frames",
        "dropped_frames", "replies", "replies_dropped", "noreply", "internal_errors", "gets_upstream",
        "gets_coalesced", "by_op", "by_code",
    )

    def __init__(self) -> None:
        self.frames = self.ops = self.ok = self.miss = self.errors = self.timeouts = 0
        self.overloaded = self.bad_frames = self.dropped_frames = self.replies = 0
        self.replies_dropped = self.noreply = self.internal_errors = 0
        # Plain gets sent to memcached, and plain gets answered by joining one already in flight.
        self.gets_upstream = self.gets_coalesced = 0
        # Requests by the opcode of their frame's first op (one add per frame, never per key) and
        # failed results by code (failures only), indexed by the wire's numbers.
        self.by_op = [0] * (max(Op) + 1)
        self.by_code = [0] * (max(Code) + 1)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__[:-2]}
        out["requests_by_op"] = {OP_NAMES.get(i, str(i)): n for i, n in enumerate(self.by_op) if n}
        out["errors_by_kind"] = {CODE_NAMES.get(i, str(i)): n for i, n in enumerate(self.by_code) if n}
        return out


class Job:
    """One worker frame in flight."""

    __slots__ = ("router", "peer", "ident", "req_id", "results", "pending", "deadline", "noreply", "done", "where", "many")

    def __init__(self, router: "Router", peer: Any, ident: bytes, frame: RequestFrame, deadline: float) -> None:
        self.router = router
        self.peer = peer
        self.ident = ident
        self.req_id = frame.req_id
        n = frame.results_wanted()
        self.results: list[Any] = [None] * n
        self.pending = n
        self.deadline = deadline
        self.noreply = frame.noreply
        self.done = False
        self.where: list[Server | None] = [None] * n
        # A GET_MANY's reply carries a hit with client flags 0 as its value alone, as the
        # pipeline delivers it; any other frame's reply carries it as [OK, value, 0].
        self.many = frame.many

    def deliver(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.pending -= 1
        if self.pending == 0:
            self.finish()

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        mine = self.results
        first = indices[0]
        if indices[-1] - first == len(indices) - 1:
            # Frame positions in a row (ascending, as a batch holds them): one slice assignment.
            mine[first : first + len(indices)] = results
        else:
            for index, result in zip(indices, results):
                mine[index] = result
        self.pending -= len(indices)
        if self.pending == 0:
            self.finish()

    def fail(self, index: int, code: Code, message: str) -> None:
        if self.results[index] is None:
            self.results[index] = [code, message]
            self.pending -= 1
            if self.pending == 0 and not self.done:
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
        results = self.results
        if len(results) > 8:
            # A get_many: count the common outcomes in C, look at the rest one by one.
            bare = list(map(type, results)).count(bytes)
            if bare == len(results):
                stats.ok += bare
                results = []
            else:
                codes = [_OK_CODE if type(r) is bytes else r[0] for r in results] if bare else [r[0] for r in results]
                ok = codes.count(_OK_CODE)
                miss = codes.count(_MISS_CODE)
                if ok + miss == len(codes):
                    stats.ok += ok
                    stats.miss += miss
                    results = []
        for r in results:
            if type(r) is bytes:
                stats.ok += 1
                continue
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
                stats.by_code[c] += 1
        if self.noreply:
            stats.noreply += 1
        else:
            results = self.results
            if not self.many:
                if len(results) == 1:
                    if type(results[0]) is bytes:  # the commonest frame, one get: no comprehension
                        results = [[_OK_CODE, results[0], 0]]
                else:
                    results = [[_OK_CODE, r, 0] if type(r) is bytes else r for r in results]
            router.reply(self.peer, self.ident, encode_reply(self.req_id, results))
        # The deadline heap keeps this job until it reaches the top: behind a frame that waits for
        # a silent server, that is up to a deadline later. It must not keep the values with it.
        # (Nothing touches a done job's slots: every late answer or failure checks `done` first.)
        self.results = []
        self.where = []


class Singles:
    """The waiter of a batch of single-get frames: request j answers op 0 of jobs[j]. A loop
    turn's frames of one plain get bound for one connection go as one such batch (Router._get_to):
    one FIFO entry and one pass over their answers instead of one of each per frame."""

    __slots__ = ("jobs",)
    # Each job is done on its own: each delivery and failure checks its job, and a tombstone (a
    # job past its deadline) drops its answer there.
    done = False

    def __init__(self, job: Job) -> None:
        self.jobs = [job]

    def deliver(self, index: int, result: Any) -> None:
        job = self.jobs[index]
        if not job.done:
            job.deliver(0, result)

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        jobs = self.jobs
        for index, result in zip(indices, results):
            job = jobs[index]
            if not job.done:
                job.deliver(0, result)

    def fail(self, index: int, code: Code, message: str) -> None:
        job = self.jobs[index]
        if not job.done:
            job.fail(0, code, message)


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

    def deliver(self, index: int, r: list[Any]) -> None:
        if r[0] == Code.OK:
            self.values[self.names[index]] = r[1]
        else:
            self.error = self.error or f"{self.names[index]}: {r[1]}"
        self._one()

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        for index, result in zip(indices, results):
            self.deliver(index, result)

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
                    self.job.deliver(self.index, [Code.OK, self.values])


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
        coalesce: bool = True,
    ) -> None:
        self.budget = budget
        self._send = send
        self.default_timeout = default_timeout
        self.max_frame = max_frame
        self.max_value = max_value
        self.remap = remap
        self.coalesce = coalesce
        self.local = local  # answers PING and BROKER_STATS
        self.stats = RouterStats()
        self.servers: list[Server] = []
        self.single: Server | None = None  # the only server: no placement to compute
        self.placement: Any = None
        self.down: frozenset[int] = frozenset()
        self.draining = False
        self._deadlines: list[tuple[float, int, Job]] = []
        self._sweep_at = SWEEP_MIN
        self._seq = itertools.count()

    def set_servers(self, servers: list[Server], placement: Any) -> None:
        self.servers = servers
        self.placement = placement
        self.single = servers[0] if len(servers) == 1 else None
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
            else:
                stats.noreply += 1  # frames in = replies + replies_dropped + noreply + dropped_frames
            return
        timeout = frame.timeout_ms / 1000.0 if frame.timeout_ms else self.default_timeout
        job = Job(self, peer, ident, frame, now + timeout)
        ops = frame.ops
        gets = frame.gets
        if gets is not None:
            # A get_many, as one GET_MANY op or one GET per key: counted as its GETs either way.
            stats.ops += len(gets)
            stats.by_op[_GET] += len(gets)
        else:
            stats.ops += len(ops)
            stats.by_op[ops[0][0]] += len(ops)
        # The commonest frames, one plain get or a get_many, take a short path when nothing is unusual.
        if gets is not None:
            queued = self._all_gets(job, gets, now)
            if not queued and len(ops) == 1:
                ops = frame.each_op()  # the per-op path below takes a GET_MANY key by key
        else:
            queued = len(ops) == 1 and ops[0][0] == _GET and self._one_get(job, ops[0][1], now)
        if queued:
            self._watch(job)
            return
        # The frame's requests bound for one connection go as one batch: one join, one FIFO entry.
        groups: dict[Connection, _Group] = {}
        budget = self.budget
        single = self.single if not self.down else None
        # Only a frame of one op joins a read in flight or offers its own; a get_many's keys never
        # do, on either path (see `_all_gets`).
        coalesce = self.coalesce and gets is None and len(ops) == 1
        upstream = 0
        for i, op in enumerate(ops):
            code = op[0]
            if code >= _VERSION:
                if code in BROADCAST:
                    # What this frame queued so far goes first: the broadcast fences the
                    # connections, and a fence takes the next opaque.
                    self._push(job, groups, now)
                    groups = {}
                    self._broadcast(job, i, op, now)
                else:
                    job.deliver(i, [Code.OK, self.local(code)])
                continue
            key: bytes = op[1]
            server = single if single is not None else self._place(job, i, key)
            if server is None:
                continue
            if budget.inflight >= budget.max_inflight or (
                budget.buffered + len(op[2]) > budget.max_buffered
                if _SET <= code <= _CAS and len(op[2]) > SMALL_OP_BYTES
                else budget.buffered >= budget.max_buffered + SMALL_RESERVE_BYTES
            ):
                job.fail(i, Code.OVERLOADED, "broker at its in-flight or buffer limit")
                continue
            if server.inflight_n >= server.max_inflight_server:
                job.fail(i, Code.OVERLOADED, f"too many requests in flight to {server.name}")
                continue
            # Reads follow a key's writes in flight onto their connection, so a worker's own write
            # is never overtaken by its own later read; only writes pin a key.
            pin: bytes | None = None
            joinable: bytes | None = None
            if code <= _GETS:
                if code == _GET and coalesce:
                    tag = server.reads.get(key)
                    if tag is not None:
                        self._join(server, tag, job, i)
                        continue
                entry = server.pinned.get(key) if server.pinned else None
                if entry is not None:
                    conn = entry[0]
                else:
                    conn = server.batch_conn  # this turn's connection, once picked
                    if conn is None or conn.sock is None:
                        conn = server.pick(None, now)
            else:
                if code == _SET:
                    if len(op[2]) > self._value_limit(server):
                        # memcached would refuse it and unlink the key (the text protocol's rule
                        # for a set that fails for size): do the unlink without shipping the value.
                        code = UNLINK_TOO_LARGE
                elif _SET < code <= _CAS:
                    # memcached's meta `ms` unlinks the stored item on a too-large value in every
                    # mode; the text protocol (and so every pymemcache user) only does that for
                    # `set`. Refuse by memcached's own size rule, so these change nothing.
                    limit = self._value_limit(server)
                    if not item_fits(len(key), len(op[2]), op[3], item_size_max=limit, cas_enabled=server.cas_enabled):
                        job.deliver(i, too_large(len(op[2]), limit))
                        continue
                conn = server.pick(key, now)
                pin = key
                if server.reads:
                    # A get that arrives after this write must not be answered by a response
                    # requested before it: close the key's read to joiners.
                    server.reads.pop(key, None)
            if conn is None:
                job.fail(i, Code.CONNECTION_ERROR, f"no connection to {server.name}: {server.health.last_error or 'connecting'}")
                continue
            pipeline = conn.pipeline
            if pipeline.inflight >= server.max_inflight_conn:
                if pin is not None:
                    server.unpin(pin)
                job.fail(i, Code.OVERLOADED, f"too many requests in flight to {server.name}")
                continue
            opaque = pipeline.seq + 1
            try:
                if code == _GET:
                    req = encode_get(key, opaque)
                elif code == UNLINK_TOO_LARGE:
                    req = meta.encode(meta.Delete(key, opaque))
                else:
                    req = encode_op(code, op, opaque)
            except meta.RequestError as exc:
                if pin is not None:
                    server.unpin(pin)
                job.fail(i, Code.CLIENT_ERROR, str(exc))
                continue
            pipeline.seq = opaque
            # Counted in flight now, so the bounds above see this frame's earlier requests.
            if not pipeline.inflight:
                conn.since = now
            pipeline.inflight += 1
            server.inflight_n += 1
            budget.inflight += 1
            job.where[i] = server
            if code == _GET:
                upstream += 1
                if coalesce:
                    server.reads[key] = (opaque << TAG_BITS) | conn.no
                    joinable = key
            g = groups.get(conn)
            if g is None:
                groups[conn] = ([i], [code], [pin], [req], [joinable])
            else:
                g[0].append(i)
                g[1].append(code)
                g[2].append(pin)
                g[3].append(req)
                g[4].append(joinable)
        self.stats.gets_upstream += upstream
        self._push(job, groups, now)
        # A job whose every op was answered on the spot (refused, local) has already replied.
        if not job.done:
            self._watch(job)

    def _watch(self, job: Job) -> None:
        """Put `job` on the deadline heap. A job answered stays there until it reaches the top,
        so behind one that waits long (a slow server, a long timeout) answered jobs pile up: when
        the heap has grown to twice what it held after the last sweep, the answered ones go."""
        heap = self._deadlines
        heapq.heappush(heap, (job.deadline, next(self._seq), job))
        if len(heap) > self._sweep_at:
            heap[:] = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
            self._sweep_at = max(SWEEP_MIN, 2 * len(heap))

    def _one_get(self, job: Job, key: bytes, now: float) -> bool:
        """A frame of one plain get (the commonest frame) on its own short path: it joins the get
        of its key in flight, or goes as a batch of one. False (nothing done) when anything is
        unusual (its server down, a bound reached, its key pinned by a write in flight or in need
        of base64): the per-op path then decides, with its errors."""
        server = self.single
        if server is None:
            if self.down:
                return False
            server = self.servers[self.placement.lookup(key)]
        elif self.down:
            return False
        budget = self.budget
        if (
            budget.inflight >= budget.max_inflight or budget.buffered >= budget.max_buffered + SMALL_RESERVE_BYTES
            or server.inflight_n >= server.max_inflight_server
            or (server.pinned and key in server.pinned)
            or not meta.is_plain_key(key)
        ):
            return False
        conn = server.batch_conn
        if conn is None or conn.sock is None:
            conn = server.pick(None, now)
        if conn is None or conn.pipeline.inflight >= server.max_inflight_conn:
            return False
        coalesce = self.coalesce
        if coalesce and server.reads:
            tag = server.reads.get(key)
            if tag is not None:
                self._join(server, tag, job, 0)
                return True
        job.where[0] = server
        self._get_to(job, server, conn, key, now, coalesce)
        return True

    def _get_to(self, job: Job, server: Server, conn: Connection, key: bytes, now: float, joinable: bool) -> None:
        """Queue the admitted get of a frame of one plain get on `conn`: in the batch of this
        turn's single gets there while it is still open (nothing queued after it, no fence yet),
        else as a new one; if `joinable`, later gets of `key` may join it."""
        opaque = self._reserve(server, conn, 1, now)
        if joinable:
            server.reads[key] = (opaque << TAG_BITS) | conn.no
        data = meta.encode_gets([key], opaque)
        batch = conn.pipeline.open_batch()
        # Its requests' opaques run on from its first: joined only where this one is next in that run.
        if (
            batch is not None and type(batch.waiter) is Singles and (batch.reads is not None) is joinable
            and batch.first + len(batch.indices) == opaque
        ):
            singles = batch.waiter
            conn.extend(batch, len(singles.jobs), key if joinable else None, data)
            singles.jobs.append(job)
        else:
            conn.push(Batch(Singles(job), [0], [_GET], None, opaque, None, [key] if joinable else None), data, now, reserved=True)

    def _all_gets(self, job: Job, keys: list[bytes], now: float) -> bool:
        """A get_many, admitted, encoded and queued as a whole: the common multi-key frame
        without the per-op path, one batch per server (keys placed as the per-op path places
        them). Its keys neither join a read in flight nor offer theirs to join: measured, joining
        cost the broker more than the requests it saved, at every share of joined keys tried
        (bench/README, thirteenth round). False (nothing done)
        when any op is not a plain get, a key needs base64, a server is down or has a write in
        flight (its keys' reads must follow it), or a bound would refuse part of the frame: the
        per-op path then decides each op. `keys`: the frame's `gets`, each 1..250 bytes
        (decode_request checked them)."""
        if self.down:
            return False
        n = len(keys)
        budget = self.budget
        if (
            budget.inflight + n > budget.max_inflight or budget.buffered >= budget.max_buffered + SMALL_RESERVE_BYTES
            or meta.holds_unsafe_byte(keys)  # their sizes are checked: decode_request did
        ):
            return False
        parts: list[tuple[Server, list[int] | None, list[bytes]]]
        single = self.single
        if single is not None:
            parts = [(single, None, keys)]
        else:
            by: dict[int, tuple[list[int], list[bytes]]] = {}
            for i, (key, s) in enumerate(zip(keys, self.placement.lookup_many(keys))):
                g = by.get(s)
                if g is None:
                    by[s] = ([i], [key])
                else:
                    g[0].append(i)
                    g[1].append(key)
            servers = self.servers
            parts = [(servers[s], idx, ks) for s, (idx, ks) in by.items()]
        conns: list[Connection] = []
        for server, _, ks in parts:
            m = len(ks)
            if server.pinned or server.inflight_n + m > server.max_inflight_server:
                return False
            conn = server.batch_conn
            if conn is None or conn.sock is None:
                conn = server.pick(None, now)
            if conn is None or conn.pipeline.inflight + m > server.max_inflight_conn:
                return False
            conns.append(conn)
        if single is not None:
            job.where = [single] * n
        for (server, indices, ks), conn in zip(parts, conns):
            self._gets_to(job, server, conn, indices, ks, now)
        return True

    def _gets_to(
        self, job: Job, server: Server, conn: Connection, indices: list[int] | None, keys: list[bytes], now: float,
    ) -> None:
        """Queue admitted gets of `keys` (frame positions `indices`; None: 0, 1, ...) to `server`
        on `conn` as one batch (a get_many's: no later get joins them, see `_all_gets`)."""
        m = len(keys)
        if indices is not None:
            where = job.where
            for i in indices:
                where[i] = server
        first = self._reserve(server, conn, m, now)
        conn.push(
            Batch(job, indices if indices is not None else list(range(m)), [_GET] * m, None, first),
            meta.encode_gets(keys, first), now, reserved=True,
        )

    def _reserve(self, server: Server, conn: Connection, m: int, now: float) -> int:
        """Count `m` admitted gets in flight on `conn`, its server and the budget, and take their
        opaques; returns the first (the others follow it)."""
        server.inflight_n += m
        self.budget.inflight += m
        pipeline = conn.pipeline
        first = pipeline.seq + 1
        pipeline.seq += m
        if not pipeline.inflight:
            conn.since = now
        pipeline.inflight += m
        self.stats.gets_upstream += m
        return first

    @staticmethod
    def _push(job: Job, groups: dict[Connection, _Group], now: float) -> None:
        for conn, (indices, codes, pins, reqs, gets) in groups.items():
            first = conn.pipeline.seq - len(indices) + 1
            n = len(indices)
            keys = pins if pins.count(None) != n else None
            joinable = gets if gets.count(None) != n else None
            conn.push(Batch(job, indices, codes, keys, first, None, joinable), b"".join(reqs), now, reserved=True)

    def _place(self, job: Job, i: int, key: bytes) -> Server | None:
        """The key's server among several, or None after refusing the op (its server is down)."""
        servers = self.servers
        idx = self.placement.lookup(key)
        if idx in self.down:
            if self.remap:
                alt = self.placement.lookup_excluding(key, self.down)
                idx = alt if alt is not None else idx
            if idx in self.down:
                server = servers[idx]
                job.fail(i, Code.SERVER_DOWN, f"{server.name} is down: {server.health.last_error}")
                return None
        return servers[idx]

    def _value_limit(self, server: Server) -> int:
        """The server's item size limit, or the broker's own cap (max_value_bytes) when lower."""
        limit = server.item_limit
        return self.max_value if 0 < self.max_value < limit else limit

    def _broadcast(self, job: Job, i: int, op: list[Any], now: float) -> None:
        code = op[0]
        try:
            data = encode_text(code, op)
        except meta.RequestError as exc:
            job.fail(i, Code.CLIENT_ERROR, str(exc))
            return
        # (server name, connection or None, why there is none)
        sends: list[tuple[str, Connection | None, str]] = []
        for server in self.servers:
            if code == _FLUSH_ALL:
                server.reads.clear()  # a get after flush_all must not share a read from before it
            conn = server.pick(None, now) if server.health.is_up else None
            if conn is None:
                sends.append((server.name, None, f"no connection ({server.health.state.value})"))
                continue
            sends.append((server.name, conn, ""))
            if code == _FLUSH_ALL:
                # memcached keeps the order of requests on one connection only: a read the worker
                # sends next may go out on the server's other connection and be answered before
                # the flush. So each open connection gets the flush (memcached's cmd_flush counts
                # one per connection) and whatever follows it there waits behind it.
                for other in server.conns:
                    if other is not conn and other.sock is not None:
                        sends.append((server.name, other, ""))
        gather = Gather(job, i, [name for name, _, _ in sends])
        for n, (_, conn, why) in enumerate(sends):
            if conn is None:
                gather.fail(n, Code.SERVER_DOWN, why)
                continue
            conn.seal()
            conn.push(Batch(gather, [n], [code], None, TEXT, TEXT_EXPECT[code]), data, now)

    # --- deadlines -----------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            job = heapq.heappop(heap)[2]
            if not job.done:
                job.expire(now)

    def _join(self, server: Server, tag: int, waiter: Job, index: int) -> None:
        """Op `index` of `waiter`, a get whose key is being read and was not written since, joins
        the get in flight named `tag` (see pipeline.tag_of): that get's answer goes to the waiter
        too, and nothing more goes to memcached. Counted in flight on that get's connection (whose
        answer releases it), on its server and in the budget, as any request sent is."""
        joined = server.joiners.get(tag)
        if joined is None:
            server.joiners[tag] = [waiter, index]
        else:
            joined.extend((waiter, index))
        server.conns[tag & _CONN_MASK].pipeline.inflight += 1
        server.inflight_n += 1
        self.budget.inflight += 1
        waiter.where[index] = server
        self.stats.gets_coalesced += 1

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else None
