"""The state of one pipelined memcached connection, sans-I/O: requests and bytes in, results out.

No socket and no clock here (the driver in connection.py owns both), so the guarantee "a response
reaches only the request that asked for it" lives in this one object and is tested byte by byte.

- `submit(batch, data)` queues the meta requests of one `Batch` (a worker frame's ops bound for
  this connection, encoded in one join); `seal()` ends a write with a fence; the driver
  writes `out` and calls `sent(n)`.
- `receive(data)` parses what memcached sent. Responses come back in request order: FIFO position
  is the truth, and the opaque token the broker put on each request (consecutive per connection)
  must come back on its response as the cross-check.
- Self-verifying stream: a meta result is held until the next response arrives whole and in its
  place (its opaque checked) or the fence that closes its write does (an `mg` with an opaque of
  its own), so a response whose data block swallowed (or lost) bytes of the next one is caught by
  the next check before its value leaves the broker. A data block that ran past its end always
  holds a CRLF and swallowed whole responses, so a value holding one is proven only by a later
  response with its opaque in place: an error line after it (to mg/md/ma, or a SERVER_ERROR) is
  held with it until then, while a text reply or an error to ms after it resets the connection
  (either would be used at once). Text replies (stats, version) are not cache values and go at
  once. (Resetting at any error line after such a value let one worker's get of a value holding
  CRLF plus an incr of a non-number fail every request in flight on the connection.)
- Anything that casts doubt on the stream's sync raises `OutOfStep`; the driver then closes the
  connection and calls `fail_all`, so every request not yet answered gets an explicit error.
  Which replies keep the stream in step, and so belong to their request alone:
  `SERVER_ERROR` to any request; `CLIENT_ERROR` to a request without a data block (`mg`, `md`,
  `ma`: memcached read its whole line); `ERROR` / `CLIENT_ERROR` to a text command. Reset:
  `CLIENT_ERROR` or `ERROR` to `ms` (memcached may have read our data as commands), `ERROR` to a
  meta request, an unexpected opaque or status, an unparsable line, a response with nothing in
  flight.
- A waiter that gave up (deadline passed) stays in the FIFO as a tombstone: its late response is
  parsed, checked and dropped, never handed to anyone else.
- A plain get's hit whose client flags are 0 is delivered as its value alone (the bytes object;
  the wire's result for a GET_MANY key, see clientlib.wire), every other result as the wire's
  `[code, ...]` list: most hits cost no object beyond their value.
- The hot path: the answers to a batch of plain gets (`mg <key> v f s O<n>`) that are exactly in
  shape and in turn are parsed in one pass straight into results (`_take_gets`) and released as
  one run, under the same proof rule (each proves the one before it; the last waits). Anything
  else (an error, a lease flag, an opaque out of turn, a size that disagrees) is left to the
  general path, which makes every check and raises; the unit tests run every case both ways.
"""

from __future__ import annotations

import re
from collections import deque
from itertools import compress, repeat
from typing import Any, Callable, Protocol, cast

from clientlib.wire import Code, Op

from . import meta
from .meta import ProtocolError, Response, Status
from .translate import DATA_OPS, MISS, UNLINK_TOO_LARGE, error_result, meta_result, op_name, text_result

TEXT = -1  # Batch.first of a text command: its answer carries no opaque
# A fence closes every write: `mg` of a key the broker never stores, with an opaque of its own, so
# its answer (EN, or HD should the key exist) is checked in place like any other. (`mn` would be
# cheaper, but its MN carries no opaque: a data block that ran on to a later write's MN could
# not be told from one that stopped where it should.)
FENCE_KEY = b"_mcbroker_fence_"
_FENCE_OP = -2


class Waiter(Protocol):
    """Whoever is waiting for results (a worker's frame, a broadcast gather, a probe)."""

    done: bool

    def deliver(self, index: int, result: Any) -> None: ...

    def deliver_many(self, indices: list[int], results: list[Any]) -> None:
        """`deliver(indices[n], results[n])` for each n, in order."""

    def fail(self, index: int, code: Code, message: str) -> None: ...


# A result waiting for its proof: (waiter, index, result), or from the fast path a run of them,
# (waiter, [index, ...], [result, ...]).
Held = tuple[Waiter, "int | list[int]", Any]


class OutOfStep(Exception):
    """The connection's stream can no longer be trusted: close it and `fail_all`. `answered`:
    memcached itself said so (ERROR, CLIENT_ERROR), so the server is alive, only the stream spoilt."""

    def __init__(self, reason: str, answered: bool = False) -> None:
        super().__init__(reason)
        self.answered = answered


# Read coalescing: a plain get in flight is named in its server's tables by a tag, its opaque and
# its connection's number (`opaque << 3 | conn_no`; at most 8 connections per server): an int,
# so registering the gets of a frame allocates no container per key (the garbage collector's
# young generation would run every few frames). `reads`: key -> tag of the get that may be
# joined; `joiners`: tag -> [waiter, index, waiter, index, ...], made only when one joins.
TAG_BITS = 3


def tag_of(opaque: int, conn_no: int) -> int:
    return (opaque << TAG_BITS) | conn_no


class Batch:
    """Consecutive requests on one connection for one waiter: a frame's ops bound here, or one
    text command. Request j carries opaque `first + j` (TEXT: none) and answers `indices[j]`;
    indices ascend (frame order), which Job.deliver_many relies on.
    `reads[j]`, when given, is the key of request j, a plain get that other waiters may join
    while it is in flight (see `tag_of`); its answer goes to them too."""

    __slots__ = ("waiter", "indices", "ops", "keys", "first", "expect", "reads", "gets")

    def __init__(
        self, waiter: Waiter, indices: list[int], ops: list[int], keys: list[bytes | None] | None,
        first: int, expect: frozenset[Status] | None = None, reads: list[bytes | None] | None = None,
    ) -> None:
        self.waiter = waiter
        self.indices = indices
        self.ops = ops
        self.keys = keys  # per request, the pinned key to release when it is answered (or None)
        self.first = first
        self.expect = expect
        self.reads = reads
        # Every request a plain get (`mg <key> v f s O<n>`): the answers may take the fast path.
        self.gets = first != TEXT and ops.count(_GET) == len(ops)


class _NoWaiter:
    done = True

    def deliver(self, index: int, result: Any) -> None: ...

    def deliver_many(self, indices: list[int], results: list[Any]) -> None: ...

    def fail(self, index: int, code: Code, message: str) -> None: ...


_NO_WAITER = _NoWaiter()
_VALUE = Status.VALUE
_MISS = Status.MISS
_HIT = Status.OK
_GET = int(Op.GET)
_OK = Code.OK
# A get's hit as the broker asks for it (`mg <key> v f s O<n>`): client flags, size, opaque.
_GET_HIT = re.compile(rb" f(\d{1,10}) s(\d{1,20}) O(\d{1,20})").fullmatch
_SERVER_ERROR = Code.SERVER_ERROR


class Pipeline:
    __slots__ = (
        "parser", "queue", "head", "out", "seq", "inflight", "held", "proven", "risky", "unfenced", "unflushed",
        "answered", "_release", "reads", "joiners", "conn_no",
    )

    def __init__(
        self, max_value_len: int, release: Callable[[bytes], None] | None = None,
        reads: dict[bytes, int] | None = None, joiners: dict[int, list[Any]] | None = None, conn_no: int = 0,
    ) -> None:
        self.parser = meta.ResponseParser(max_value_len)
        self.queue: deque[Batch] = deque()
        self.head = 0  # responses already matched in queue[0]
        self.out = bytearray()  # bytes to write
        self.seq = 0
        self.inflight = 0  # requests written or queued, not yet answered (fences not counted)
        self.held: list[Held] = []  # results not yet proven in step
        self.proven = 0  # how many of `held` a later response or fence has proven
        self.risky = False  # the last value held contains CRLF
        self.answered = 0  # meta requests answered so far (health: the server does its job)
        self.unfenced = False
        self.unflushed = 0  # requests in `out` since the last sent()
        self._release = release
        # The server's tables of joinable reads (shared by its connections): an answered get leaves
        # them, so nothing joins a read whose response has already gone by.
        self.reads: dict[bytes, int] = reads if reads is not None else {}
        self.joiners: dict[int, list[Any]] = joiners if joiners is not None else {}
        self.conn_no = conn_no

    # --- requests ------------------------------------------------------------------------------

    def submit(self, batch: Batch, data: bytes, *, reserved: bool = False) -> None:
        """Queue a batch whose encoded requests are `data` (opaques from `seq`, consecutive).
        `reserved`: its requests were already counted in `inflight` when they were admitted."""
        self.queue.append(batch)
        self.out += data
        n = len(batch.indices)
        if not reserved:
            self.inflight += n
        self.unflushed += n
        self.unfenced = True

    def open_batch(self) -> Batch | None:
        """The batch queued last while requests may still join it: no fence after it yet (every
        write ends with one, so it has not been written) and nothing queued after it."""
        return self.queue[-1] if self.unfenced else None

    def extend(self, batch: Batch, index: int, read: bytes | None, data: bytes) -> None:
        """Add one plain get, `mg <key> v f s O<seq>` encoded as `data`, to `batch` (open_batch's,
        its requests of opaques batch.first .. seq - 1) as its request for `index` of its waiter;
        `read`: its key when others may join it. Its opaque was taken (`seq`) and it was counted
        in `inflight` when it was admitted."""
        batch.indices.append(index)
        batch.ops.append(_GET)
        if batch.reads is not None:
            batch.reads.append(read)
        self.out += data
        self.unflushed += 1

    def seal(self) -> None:
        """End the requests queued so far with a fence (before each write)."""
        if self.unfenced:
            self.seq = opaque = self.seq + 1
            self.queue.append(Batch(_NO_WAITER, [0], [_FENCE_OP], None, opaque))
            self.out += b"mg %b O%d\r\n" % (FENCE_KEY, opaque)
            self.unfenced = False

    def sent(self, n: int) -> None:
        del self.out[:n]
        self.unflushed = 0

    # --- responses -----------------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Parse `data`; deliver every result proven in step. Returns how many meta requests
        (not fences, not text commands such as the broker's own `stats settings`) were answered.
        Raises OutOfStep (after delivering what was proven and giving the request it blames its
        own error)."""
        parser = self.parser
        parser.feed(data)
        before = self.answered
        queue = self.queue
        try:
            try:
                while True:
                    limit = 1 << 62
                    if queue:
                        batch = queue[0]
                        limit = len(batch.indices) - self.head
                        if batch.gets and self._take_gets(batch, limit):
                            continue
                        if batch.ops[0] == _FENCE_OP and parser.take_exact(b"EN O%d\r\n" % batch.first):
                            # The fence's usual answer, whole and in its place: as in _match, it
                            # proves everything held before it.
                            self.proven = len(self.held)
                            self.risky = False
                            queue.popleft()
                            continue
                    # Everything else, and what the fast path left (an error, a lease flag, an
                    # opaque out of turn, a response not yet whole), with every check; at most
                    # the head batch's responses, so the next batch may take the fast path.
                    items = parser.next_items(limit)
                    if not items:
                        break
                    self._match(items)
                    # A call returns the complete responses before an error; a second is needed
                    # to raise the error it found after them.
                    if parser.failed:
                        parser.next_items()
            except ProtocolError as exc:
                raise OutOfStep(f"protocol error: {exc}") from None
            return self.answered - before
        finally:
            if self.proven:
                self.release_held()

    def _take_gets(self, batch: Batch, limit: int) -> int:
        """The fast path for a batch of plain gets: take the answers that are exactly in shape and
        in turn (see ResponseParser.take_get_answers) in one pass, with the same proof rule as
        `_match`: each answer, whole and with its opaque in place, proves what came before it, so
        all but the last are released and the last is held for the next response to prove. When
        they end the batch and the fence's usual answer follows, whole, that proves the last too,
        as `receive` would on its next step: the answers go as one run and the fence is taken."""
        j = self.head
        first = batch.first + j
        results = self.parser.take_get_answers(first, limit, _OK, MISS, True)
        k = len(results)
        if not k:
            return 0
        held = self.held
        waiter = batch.waiter
        indices = batch.indices
        last = k - 1
        done = k
        keys = batch.keys
        release = self._release
        if keys is not None and release is not None:
            for key in keys[j : j + k]:
                if key is not None:
                    release(key)
        reads = batch.reads
        joined_before: list[Held] | None = None  # joiners of the answers before the last
        late: list[Held] | None = None  # joiners of the last answer: they wait with it
        if reads is not None:
            # Answered: nothing may join these reads any more; their joiners share the answers.
            table = self.reads
            joiners = self.joiners
            conn_no = self.conn_no
            # The table is cleared in one C-level pass over every entry, tags counted by range;
            # one that is not these answers' own (a later read of the key, on this connection or
            # another) is put back.
            start = (first << TAG_BITS) | conn_no
            tags = range(start, start + (k << TAG_BITS), 1 << TAG_BITS)
            keys_read = cast("list[bytes]", reads[j : j + k])  # None (not joinable) pops nothing
            popped: list[int | None] = list(map(table.pop, keys_read, repeat(None, k)))
            if popped != list(tags):
                for key, got in zip(keys_read, popped):
                    if got is not None and got not in tags:
                        table[key] = got
            if joiners:
                # Python steps only through the answers that were joined.
                found = list(map(joiners.pop, tags, repeat(None, k)))
                for n in compress(range(k), found):
                    joined = cast("list[Any]", found[n])
                    if n < last:
                        joined_before = joined_before or []
                        done += _joiners(joined, results[n], joined_before)
                    else:
                        late = []
                        done += _joiners(joined, results[n], late)
        self.answered += k
        self.inflight -= done
        queue = self.queue
        if (
            joined_before is None and late is None  # (with joiners, deliveries keep one order however fed)
            and j + k == len(indices) and len(queue) > 1 and queue[1].ops[0] == _FENCE_OP
            and self.parser.take_exact(b"EN O%d\r\n" % queue[1].first)
        ):
            held.append((waiter, indices[j:] if j else indices, results))
            self.proven = len(held)
            self.risky = False
            self.head = 0
            queue.popleft()
            queue.popleft()
            return k
        if last:
            held.append((waiter, indices[j : j + last], results[:last]))
        if joined_before:
            held += joined_before
        self.proven = len(held)
        held.append((waiter, indices[j + last], results[last]))
        if late:
            held += late
        result = results[last]
        self.risky = result is not MISS and b"\r\n" in (result if type(result) is bytes else result[1])
        j += k
        if j == len(indices):
            j = 0
            queue.popleft()
        self.head = j
        return k

    def _match(self, items: list[Any]) -> None:
        # The hot loop: one pass over a read's responses, no object built per response, the
        # per-response counters kept in locals and written back once.
        queue = self.queue
        held = self.held
        release = self._release
        reads = self.reads
        joiners = self.joiners
        conn_no = self.conn_no
        j = self.head
        proven = self.proven
        risky = self.risky
        answered = 0
        done = 0
        try:
            for item in items:
                if not queue:
                    raise OutOfStep(f"a response with nothing in flight: {_describe(item)}")
                batch = queue[0]
                op = batch.ops[j]
                if type(item) is tuple:
                    status, value, flags = item
                    first = batch.first
                    if first == TEXT:
                        raise OutOfStep(f"{status.name} to a text command")
                    hit = _GET_HIT(flags) if op == _GET and status is _VALUE else None
                    if hit is not None:
                        # `mg k v f s O<n>` answers ` f<client flags> s<size> O<n>`; the size must
                        # agree with the VA header's, so a header that lost or gained a digit is
                        # caught here, not read as a shorter or longer value.
                        if hit[3] != b"%d" % (first + j):
                            raise OutOfStep(f"opaque mismatch: expected {first + j}, got {hit[3]!r}")
                        if int(hit[2]) != len(value):
                            raise OutOfStep(f"unusable VALUE response: s{hit[2]!r} for {len(value)} bytes")
                        client_flags = int(hit[1])
                        result: Any = [_OK, value, client_flags] if client_flags else value
                    else:
                        if meta.opaque_of(flags) != b"%d" % (first + j):
                            raise OutOfStep(f"opaque mismatch: expected {first + j}, got {meta.opaque_of(flags)!r}")
                        if op == _FENCE_OP:
                            # The fence's opaque arrived in its place: everything before it is
                            # proven, whatever its status says about the fence itself.
                            proven = len(held)
                            if status is not _MISS and status is not _HIT:
                                raise OutOfStep(f"{status.name} to the fence")
                            risky = False
                            queue.popleft()
                            continue
                        try:
                            result = meta_result(op, status, value, meta.flag_dict(flags))
                        except ValueError as exc:
                            raise OutOfStep(f"unusable {status.name} response: {exc}") from None
                        if result[0] == _SERVER_ERROR and op != UNLINK_TOO_LARGE:
                            # A status memcached never gives to this request: not its answer.
                            raise OutOfStep(f"{result[1]}")
                    # This response arrived whole and in its place: what came before it is proven.
                    proven = len(held)
                    answered += 1
                    # A data block that ran past its end always holds a CRLF: such a value must be
                    # proven by an answer that carries an opaque, never by an error or text line.
                    risky = value is not None and b"\r\n" in value
                    held.append((batch.waiter, batch.indices[j], result))
                    if batch.reads is not None:
                        key = batch.reads[j]
                        if key is not None:
                            # Answered: nothing may join it any more; its joiners share the answer.
                            tag = ((first + j) << TAG_BITS) | conn_no
                            if reads.get(key) == tag:
                                del reads[key]
                            if joiners:
                                joined = joiners.pop(tag, None)
                                if joined is not None:
                                    done += _joiners(joined, result, held)
                else:
                    result, reset = self._other(batch, op, item)
                    if risky and (reset is not None or batch.first == TEXT):
                        # After a value holding CRLF, a line that would be delivered at once (a
                        # text reply) or would reset the stream as the request's own answer (an
                        # error to ms) may be a swallow's leftover: reset before anyone gets it.
                        # Any other line (an error to mg/md/ma, SERVER_ERROR) is held with the
                        # value, `risky` stays, and the next response with its opaque in place
                        # proves both: a swallow shifts every later response, so that check fails.
                        raise OutOfStep(f"{item.status.name} after a value holding CRLF: the stream cannot be proven in step")
                    if reset is not None:
                        # memcached may have read our data as commands: this reply is the request's
                        # own; nothing after it can be trusted.
                        index = batch.indices[j]
                        failed: list[tuple[Waiter, int, Any]] = [(batch.waiter, index, result)]
                        self.inflight -= self._forget(batch, j, result, failed)
                        self._answered(batch, j, release)
                        j = self.head
                        for waiter, index, result in failed:
                            if not waiter.done:
                                waiter.fail(index, result[0], result[1])
                        raise OutOfStep(reset, answered=True)
                    if batch.first == TEXT:
                        # Not a cache value (stats, version, flush_all): it needs no proof.
                        if not batch.waiter.done:
                            batch.waiter.deliver(batch.indices[j], result)
                    else:
                        answered += 1  # its own error line: the server answered it, in step
                        held.append((batch.waiter, batch.indices[j], result))
                        if batch.reads is not None:
                            done += self._forget(batch, j, result, held)
                done += 1
                keys = batch.keys
                if keys is not None and release is not None:
                    key = keys[j]
                    if key is not None:
                        release(key)
                j += 1
                if j == len(batch.indices):
                    j = 0
                    queue.popleft()
        finally:
            self.head = j
            self.proven = proven
            self.risky = risky
            self.answered += answered
            self.inflight -= done

    def _answered(self, batch: Batch, j: int, release: Callable[[bytes], None] | None) -> None:
        self.inflight -= 1
        key = batch.keys[j] if batch.keys is not None else None
        if key is not None and release is not None:
            release(key)
        if j + 1 < len(batch.indices):
            self.head = j + 1
        else:
            self.head = 0
            self.queue.popleft()

    def _other(self, batch: Batch, op: int, resp: Response) -> tuple[list[Any], str | None]:
        """A response the meta fast path did not take: an error, a text reply, a meta line with
        unusual tokens. Returns its result, and why the stream must be reset after it (or None)."""
        status = resp.status
        text = batch.first == TEXT
        if op == _FENCE_OP:
            raise OutOfStep(f"{status.name} to the fence")
        if status is Status.SERVER_ERROR or (status is Status.CLIENT_ERROR and op not in DATA_OPS) or (
            text and status is Status.ERROR
        ):
            return error_result(resp), None
        if status is Status.ERROR or status is Status.CLIENT_ERROR:
            return error_result(resp), f"{status.value} to {op_name(op)}"
        if text:
            if batch.expect is not None and status not in batch.expect:
                raise OutOfStep(f"unexpected {status.name} for a text command")
            return text_result(op, resp), None
        raise OutOfStep(f"unexpected {status.name} for {op_name(op)}")

    def _forget(self, batch: Batch, j: int, result: list[Any] | None, out: list[Any]) -> int:
        """Request j of `batch` was answered (or failed): if it was a joinable get, take it out of
        the tables and put its joiners with `result` on `out`. Returns how many joined."""
        key = batch.reads[j] if batch.reads is not None else None
        if key is None:
            return 0
        tag = tag_of(batch.first + j, self.conn_no)
        if self.reads.get(key) == tag:
            del self.reads[key]
        joined = self.joiners.pop(tag, None) if self.joiners else None
        return _joiners(joined, result, out) if joined is not None else 0

    def release_held(self) -> None:
        """Deliver the held results that a later response or fence proved."""
        n = self.proven
        held = self.held
        if n == len(held):
            self.held = []
        else:
            self.held = held[n:]
            del held[n:]
        self.proven = 0
        for waiter, index, result in held:
            if not waiter.done:
                if isinstance(index, int):
                    waiter.deliver(index, result)
                else:
                    # A run of answers from the fast path: indices and results, in step.
                    waiter.deliver_many(index, result)

    # --- failure -------------------------------------------------------------------------------

    def fail_all(self, code: Code, reason: str) -> int:
        """Fail every request not yet delivered (held results included: their stream is
        unproven); returns how many were in flight. The pipeline is empty afterwards."""
        self.release_held()
        failed: list[tuple[Waiter, int]] = []
        for w, i, _ in self.held:
            if isinstance(i, int):
                failed.append((w, i))
            else:
                failed.extend((w, index) for index in i)
        self.held = []
        queue, self.queue = self.queue, deque()
        head, self.head = self.head, 0
        release = self._release
        joined: list[tuple[Waiter, int, Any]] = []
        for batch in queue:
            if batch.waiter is _NO_WAITER:
                continue
            for j in range(head, len(batch.indices)):
                key = batch.keys[j] if batch.keys is not None else None
                if key is not None and release is not None:
                    release(key)
                failed.append((batch.waiter, batch.indices[j]))
                if batch.reads is not None:
                    self._forget(batch, j, None, joined)
            head = 0
        failed.extend((w, i) for w, i, _ in joined)
        n = self.inflight
        self.inflight = 0
        self.out.clear()
        self.unflushed = 0
        self.unfenced = False
        for waiter, index in failed:
            if not waiter.done:
                waiter.fail(index, code, reason)
        return n


def _joiners(joined: list[Any], result: Any, out: list[Any]) -> int:
    """Put each waiter of `joined` ([waiter, index, ...]) on `out` with `result`; returns how many."""
    for k in range(0, len(joined), 2):
        out.append((joined[k], joined[k + 1], result))
    return len(joined) // 2


def _describe(item: Any) -> str:
    return item[0].name if type(item) is tuple else item.status.name
