"""The state of one pipelined memcached connection, sans-I/O: requests and bytes in, results out.

No socket and no clock here (the driver in connection.py owns both), so the guarantee "a response
reaches only the request that asked for it" lives in this one object and is tested byte by byte.

- `submit(batch, data)` queues the meta requests of one `Batch` (a worker frame's ops bound for
  this connection, encoded in one join); `seal()` ends a write with an `mn` fence; the driver
  writes `out` and calls `sent(n)`.
- `receive(data)` parses what memcached sent. Responses come back in request order: FIFO position
  is the truth, and the opaque token the broker put on each request (consecutive per connection)
  must come back on its response as the cross-check.
- Self-verifying stream: a meta result is held until the next response arrives whole and in its
  place (its opaque checked) or the `mn` fence that closes its write does, so a response whose
  data block swallowed (or lost) bytes of the next one is caught by the next check before its
  value leaves the broker. Text replies (stats, version) are not cache values and go at once.
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
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol

from clientlib.wire import Code, Op

from . import meta
from .meta import ProtocolError, Response, Status
from .translate import DATA_OPS, error_result, meta_result, op_name, text_result

FENCE = b"mn\r\n"
TEXT = -1  # Batch.first of a text command: its answer carries no opaque


class Waiter(Protocol):
    """Whoever is waiting for results (a worker's frame, a broadcast gather, a probe)."""

    done: bool

    def deliver(self, index: int, result: list[Any]) -> None: ...

    def fail(self, index: int, code: Code, message: str) -> None: ...


class OutOfStep(Exception):
    """The connection's stream can no longer be trusted: close it and `fail_all`. `answered`:
    memcached itself said so (ERROR, CLIENT_ERROR), so the server is alive, only the stream spoilt."""

    def __init__(self, reason: str, answered: bool = False) -> None:
        super().__init__(reason)
        self.answered = answered


class Batch:
    """Consecutive requests on one connection for one waiter: a frame's ops bound here, or one
    text command. Request j carries opaque `first + j` (TEXT: none) and answers `indices[j]`."""

    __slots__ = ("waiter", "indices", "ops", "keys", "first", "expect")

    def __init__(
        self, waiter: Waiter, indices: list[int], ops: list[int], keys: list[bytes] | None,
        first: int, expect: frozenset[Status] | None = None,
    ) -> None:
        self.waiter = waiter
        self.indices = indices
        self.ops = ops
        self.keys = keys  # pinned keys to release as their responses arrive
        self.first = first
        self.expect = expect


class _Fence:
    """The FIFO entry of an `mn` fence."""


_FENCE = _Fence()
_VALUE = Status.VALUE
_NOOP = Status.NOOP
_GET = int(Op.GET)


class Pipeline:
    __slots__ = ("parser", "queue", "head", "out", "seq", "inflight", "held", "unfenced", "unflushed", "_release")

    def __init__(self, max_value_len: int, release: Callable[[bytes], None] | None = None) -> None:
        self.parser = meta.ResponseParser(max_value_len)
        self.queue: deque[Batch | _Fence] = deque()
        self.head = 0  # responses already matched in queue[0]
        self.out = bytearray()  # bytes to write
        self.seq = 0
        self.inflight = 0  # requests written or queued, not yet answered (fences not counted)
        self.held: list[tuple[Waiter, int, list[Any]]] = []  # results waiting for their fence
        self.unfenced = False
        self.unflushed = 0  # requests in `out` since the last sent()
        self._release = release

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

    def seal(self) -> None:
        """End the requests queued so far with a fence (before each write)."""
        if self.unfenced:
            self.queue.append(_FENCE)
            self.out += FENCE
            self.unfenced = False

    def sent(self, n: int) -> None:
        del self.out[:n]
        self.unflushed = 0

    # --- responses -----------------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Parse `data`; deliver every result whose fence arrived. Returns responses matched.
        Raises OutOfStep (after giving the request it blames its own error)."""
        parser = self.parser
        parser.feed(data)
        queue = self.queue
        matched = 0
        held = self.held
        while True:
            try:
                item = parser.next_item()
            except ProtocolError as exc:
                raise OutOfStep(f"protocol error: {exc}") from None
            if item is None:
                return matched
            if not queue:
                raise OutOfStep(f"a response with nothing in flight: {_describe(item)}")
            batch = queue[0]
            matched += 1
            if batch is _FENCE:
                if type(item) is tuple and item[0] is _NOOP:
                    queue.popleft()
                    self.release_held()
                    continue
                raise OutOfStep(f"{_describe(item)} where the fence's MN was due")
            assert isinstance(batch, Batch)
            j = self.head
            op = batch.ops[j]
            if type(item) is tuple:
                status, value, flags = item
                if batch.first == TEXT:
                    raise OutOfStep(f"{status.name} to a text command")
                opaque = meta.opaque_of(flags)
                if opaque is None or opaque != b"%d" % (batch.first + j):
                    raise OutOfStep(f"opaque mismatch: expected {batch.first + j}, got {opaque!r}")
                try:
                    if op == _GET and status is _VALUE and flags[:2] == b" f":
                        result: list[Any] = [Code.OK, value, int(flags[2 : flags.index(b" ", 2)])]
                    else:
                        result = meta_result(op, status, value, meta.flag_dict(flags))
                except ValueError as exc:
                    raise OutOfStep(f"unusable {status.name} response: {exc}") from None
                # This response arrived whole and in its place: what came before it is proven.
                if held:
                    self.release_held()
                    held = self.held
                held.append((batch.waiter, batch.indices[j], result))
            else:
                result = self._other(batch, op, item)
                if batch.first == TEXT:
                    # Not a cache value (stats, version, flush_all): it needs no proof.
                    if not batch.waiter.done:
                        batch.waiter.deliver(batch.indices[j], result)
                else:
                    held.append((batch.waiter, batch.indices[j], result))
            self._advance(batch, j)

    def _other(self, batch: Batch, op: int, resp: Response) -> list[Any]:
        """A response the meta fast path did not take: an error, a text reply, a meta line with
        unusual tokens."""
        status = resp.status
        text = batch.first == TEXT
        if status is Status.SERVER_ERROR or (status is Status.CLIENT_ERROR and op not in DATA_OPS) or (
            text and status is Status.ERROR
        ):
            return error_result(resp)
        if status is Status.ERROR or status is Status.CLIENT_ERROR:
            # memcached may have read our data block as commands: nothing after it can be trusted.
            self._blame(batch, error_result(resp))
            raise OutOfStep(f"{status.value} to {op_name(op)}", answered=True)
        if text:
            if batch.expect is not None and status not in batch.expect:
                raise OutOfStep(f"unexpected {status.name} for a text command")
            return text_result(op, resp)
        raise OutOfStep(f"unexpected {status.name} for {op_name(op)}")

    def _blame(self, batch: Batch, result: list[Any]) -> None:
        j = self.head
        self._advance(batch, j)
        if not batch.waiter.done:
            batch.waiter.fail(batch.indices[j], result[0], result[1])

    def _advance(self, batch: Batch, j: int) -> None:
        self.inflight -= 1
        if batch.keys is not None and self._release is not None:
            self._release(batch.keys[j])
        if j + 1 < len(batch.indices):
            self.head = j + 1
        else:
            self.head = 0
            self.queue.popleft()

    def release_held(self) -> None:
        held = self.held
        if held:
            self.held = []
            for waiter, index, result in held:
                if not waiter.done:
                    waiter.deliver(index, result)

    # --- failure -------------------------------------------------------------------------------

    def fail_all(self, code: Code, reason: str) -> int:
        """Fail every request not yet delivered (held results included: their stream is
        unproven); returns how many were in flight. The pipeline is empty afterwards."""
        failed: list[tuple[Waiter, int]] = [(w, i) for w, i, _ in self.held]
        self.held = []
        queue, self.queue = self.queue, deque()
        head, self.head = self.head, 0
        release = self._release
        for batch in queue:
            if batch is _FENCE:
                continue
            assert isinstance(batch, Batch)
            for j in range(head, len(batch.indices)):
                if batch.keys is not None and release is not None:
                    release(batch.keys[j])
                failed.append((batch.waiter, batch.indices[j]))
            head = 0
        n = self.inflight
        self.inflight = 0
        self.out.clear()
        self.unflushed = 0
        self.unfenced = False
        for waiter, index in failed:
            if not waiter.done:
                waiter.fail(index, code, reason)
        return n


def _describe(item: Any) -> str:
    return item[0].name if type(item) is tuple else item.status.name
