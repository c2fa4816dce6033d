"""A scripted fake memcached for fault tests: speaks enough meta protocol to serve the broker,
and misbehaves on purpose when told to.

    with FakeMemcached() as fake:
        broker = broker_factory([fake.address], connections_per_server=1)
        fake.inject(Fault.WRONG_OPAQUE, nth=3)   # the 3rd request from now gets a bad opaque
        ...
        fake.wait_for_connections(2)             # the broker reconnected

It answers `mg` (v f c k O flags), `ms` (modes S E A P R, C cas, F flags), `md`, `ma` (MI/MD, D, v),
`mn`, `version`, `stats`, `flush_all` and `cache_memlimit` from a dict, one response per request,
in request order, echoing the opaque `O` token like memcached 1.6.18 does (also on `EN`).

A fault fires once, on the nth data request (mg/ms/md/ma) counted from when it was injected, either on any
connection or only on the connection with a given id (ids count accepted connections from 1).
Requests before the faulty one are answered correctly, so a test knows exactly which requests were
served and which were in flight when the stream went bad.

Bounded by construction: at most MAX_CONNECTIONS handler threads, every blocking call has a short
timeout so `stop()` returns promptly, and all threads are daemons joined on stop.

Two helpers for fault tests against real memcached servers live here too: `pause_fully` (SIGSTOP
and wait until it has taken hold) and `keys_held_by` (which keys a server holds, asked directly).
"""

from __future__ import annotations

import base64
import enum
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_CONNECTIONS = 64
MAX_LINES_KEPT = 10_000
MAX_LINE = 8192
MAX_VALUE = 4 << 20
POLL_S = 0.05
VERSION = "1.6.18-fake"

# Bytes no memcached would send: an unparsable line, terminated so the parser sees it at once.
GARBAGE = b"\x00\x01#!garbage\xff\r\n"


FENCE_KEY = b"_mcbroker_fence_"  # broker/pipeline.py's


class Fault(enum.Enum):
    WRONG_OPAQUE = "wrong_opaque"  # the right answer with somebody else's O token
    TRAILING_GARBAGE = "trailing_garbage"  # the right answer followed by an unparsable line
    TRUNCATED_VALUE = "truncated_value"  # a VA header and half its data, then close
    CLIENT_ERROR = "client_error"  # CLIENT_ERROR instead of the answer; later requests answered normally
    CLOSE_MID_RESPONSE = "close_mid_response"  # half a response line, then close
    STALL = "stall"  # from this request on, the connection reads but never answers
    EXTRA_RESPONSE = "extra_response"  # the right answer plus an unsolicited one
    WRONG_SIZE = "wrong_size"  # the right answer with its `s` (item size) token one too high


@dataclass
class _Rule:
    fault: Fault
    remaining: int  # requests still to pass before it fires (1: the next one)
    connection: int | None


@dataclass
class _Conn:
    id: int
    sock: socket.socket
    thread: threading.Thread | None = None
    stalled: bool = False
    closed: bool = False
    # the latest request lines as received, in order: tests read them to see what the broker sent
    lines: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_LINES_KEPT))


class _Close(Exception):
    """Raised by a fault that ends the connection after its partial output."""


class FakeMemcached:
    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: dict[int, _Conn] = {}
        self._rules: list[_Rule] = []
        self._next_id = 0
        self._cas = 0
        self.store: dict[bytes, tuple[bytes, int, int]] = {}  # key -> (value, client flags, cas)
        self.accepted = 0
        self.requests = 0
        self.handled = 0  # requests processed, on all connections, and their answers (if any) sent
        self.faults_fired: list[tuple[Fault, int]] = []  # (fault, connection id)
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeMemcached":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.settimeout(POLL_S)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="fakemc-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(2.0)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        # Handler threads see the stop flag within POLL_S and close their own sockets; closing a
        # socket under a thread blocked in select() on it would be a race.
        for c in conns:
            if c.thread is not None:
                c.thread.join(2.0)
        for c in conns:
            self._shutdown(c)

    def __enter__(self) -> "FakeMemcached":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- scripting -------------------------------------------------------------------------------

    def inject(self, fault: Fault, *, nth: int = 1, connection: int | None = None) -> None:
        """Misbehave once, on the nth request from now (on `connection` only, if given)."""
        if nth < 1:
            raise ValueError("nth counts from 1")
        with self._lock:
            self._rules.append(_Rule(fault, nth, connection))

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._rules)

    def live_connections(self) -> list[int]:
        with self._lock:
            return [c.id for c in self._conns.values() if not c.closed]

    def lines(self, connection: int) -> list[bytes]:
        with self._lock:
            return list(self._conns[connection].lines)

    def close_connection(self, connection: int) -> None:
        """Close one connection from the server's side, as memcached does at its idle_timeout or
        in a restart (its handler thread then sees the end and closes the socket)."""
        with self._lock:
            conn = self._conns[connection]
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def wait_for_connections(self, accepted: int, timeout: float = 5.0) -> bool:
        """Wait until at least `accepted` connections were accepted in all."""
        return self._wait_until(lambda: self.accepted >= accepted, timeout)

    def wait_for_requests(self, requests: int, timeout: float = 5.0) -> bool:
        """Wait until at least `requests` requests were received in all."""
        return self._wait_until(lambda: self.requests >= requests, timeout)

    def wait_for_handled(self, requests: int, timeout: float = 5.0) -> bool:
        """Wait until at least `requests` requests were processed in all and their answers (a
        stalled request has none) sent."""
        return self._wait_until(lambda: self.handled >= requests, timeout)

    def _wait_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # --- connections -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                if len([c for c in self._conns.values() if not c.closed]) >= MAX_CONNECTIONS:
                    sock.close()
                    continue
                self._next_id += 1
                conn = _Conn(self._next_id, sock)
                self._conns[conn.id] = conn
                self.accepted += 1
                self._cond.notify_all()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.thread = threading.Thread(target=self._serve, args=(conn,), name=f"fakemc-{conn.id}", daemon=True)
            conn.thread.start()

    def _shutdown(self, conn: _Conn) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    def _serve(self, conn: _Conn) -> None:
        buf = bytearray()
        try:
            while not self._stop.is_set() and not conn.closed:
                ready, _, _ = select.select([conn.sock], [], [], POLL_S)
                if not ready:
                    continue
                data = conn.sock.recv(256 * 1024)
                if not data:
                    break
                buf += data
                out = bytearray()
                taken = len(conn.lines)
                closing: bytes | None = None
                try:
                    self._process(conn, buf, out)
                except _Close as close:
                    closing = close.args[0]
                self._send(conn, bytes(out) + (closing or b""))
                with self._cond:
                    self.handled += len(conn.lines) - taken
                    self._cond.notify_all()
                if closing is not None:
                    break
        except (OSError, ValueError):  # ValueError: select() on a socket closed under us
            pass
        finally:
            self._shutdown(conn)

    def _send(self, conn: _Conn, data: bytes) -> None:
        # Answers produced before a stall began still go out; a stalled request produced none.
        if data:
            conn.sock.settimeout(2.0)
            try:
                conn.sock.sendall(data)
            finally:
                conn.sock.settimeout(None)

    # --- requests --------------------------------------------------------------------------------

    def _process(self, conn: _Conn, buf: bytearray, out: bytearray) -> None:
        """Answer every complete request in `buf` (consumed from it) into `out`."""
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_LINE:
                    raise _Close(b"CLIENT_ERROR line too long\r\n")
                return
            line = bytes(buf[:end])
            tokens = line.split()
            data: bytes | None = None
            consumed = end + 2
            if tokens and tokens[0] == b"ms":
                if len(tokens) < 3 or not tokens[2].isdigit() or int(tokens[2]) > MAX_VALUE:
                    raise _Close(b"CLIENT_ERROR bad data chunk\r\n")
                size = int(tokens[2])
                if len(buf) < consumed + size + 2:
                    return
                data = bytes(buf[consumed : consumed + size])
                if buf[consumed + size : consumed + size + 2] != b"\r\n":
                    raise _Close(b"CLIENT_ERROR bad data chunk\r\n")
                consumed += size + 2
            del buf[:consumed]
            with self._cond:
                conn.lines.append(line)
                self.requests += 1
                self._cond.notify_all()
                # Faults target the data requests; the broker's own fences (an `mg` of its fence
                # key) and its `stats settings` on each new connection do not count toward `nth`.
                data_request = tokens[:1] in ([b"mg"], [b"ms"], [b"md"], [b"ma"]) and tokens[1:2] != [FENCE_KEY]
                fault = self._take_fault(conn) if data_request else None
                stalled = conn.stalled
            if stalled:
                continue
            answer = self._answer(tokens, data)
            if fault is None:
                out += answer
            else:
                self._misbehave(conn, fault, tokens, answer, out)

    def _take_fault(self, conn: _Conn) -> Fault | None:
        fired: Fault | None = None
        for rule in list(self._rules):
            if rule.connection is not None and rule.connection != conn.id:
                continue
            rule.remaining -= 1
            if rule.remaining == 0:
                self._rules.remove(rule)
                if fired is None:
                    fired = rule.fault
                    self.faults_fired.append((rule.fault, conn.id))
                else:
                    # Two rules on the same request: the second waits for the next one.
                    rule.remaining = 1
                    self._rules.append(rule)
        return fired

    def _misbehave(self, conn: _Conn, fault: Fault, tokens: list[bytes], answer: bytes, out: bytearray) -> None:
        if fault is Fault.WRONG_OPAQUE:
            first, _, rest = answer.partition(b"\r\n")
            parts = [p for p in first.split(b" ") if not p.startswith(b"O")]
            out += b" ".join(parts + [b"O" + _other_opaque(tokens)]) + b"\r\n" + rest
        elif fault is Fault.TRAILING_GARBAGE:
            out += answer + GARBAGE
        elif fault is Fault.TRUNCATED_VALUE:
            value = b"v" * 64
            header = b"VA %d f0%s" % (len(value), _echo(tokens))
            raise _Close(header + b"\r\n" + value[: len(value) // 2])
        elif fault is Fault.CLIENT_ERROR:
            out += b"CLIENT_ERROR bad command line format\r\n"
        elif fault is Fault.CLOSE_MID_RESPONSE:
            raise _Close(answer[: max(1, min(len(answer) - 2, 3))])
        elif fault is Fault.STALL:
            conn.stalled = True
        elif fault is Fault.EXTRA_RESPONSE:
            out += answer + b"HD O" + _other_opaque(tokens) + b"\r\n"
        elif fault is Fault.WRONG_SIZE:
            first, _, rest = answer.partition(b"\r\n")
            parts = [b"s%d" % (int(p[1:]) + 1) if p[:1] == b"s" and p[1:].isdigit() else p for p in first.split(b" ")]
            out += b" ".join(parts) + b"\r\n" + rest
        else:  # pragma: no cover - every Fault is handled above
            raise AssertionError(fault)

    def _answer(self, tokens: list[bytes], data: bytes | None) -> bytes:
        if not tokens:
            return b"ERROR\r\n"
        verb = tokens[0]
        if verb in (b"mg", b"ms", b"md", b"ma") and len(tokens) < 2:
            return b"CLIENT_ERROR bad command line format\r\n"
        with self._lock:
            if verb == b"mg":
                return self._mg(tokens)
            if verb == b"ms":
                assert data is not None
                return self._ms(tokens, data)
            if verb == b"md":
                found = self.store.pop(_key(tokens), None) is not None
                return (b"HD" if found else b"NF") + _echo(tokens) + b"\r\n"
            if verb == b"ma":
                return self._ma(tokens)
            if verb == b"mn":
                return b"MN\r\n"
            if verb == b"version":
                return b"VERSION " + VERSION.encode() + b"\r\n"
            if verb == b"stats":
                return b"STAT pid 1\r\nSTAT curr_items %d\r\nEND\r\n" % len(self.store)
            if verb == b"flush_all":
                self.store.clear()
                return b"OK\r\n"
            if verb == b"cache_memlimit":
                return b"OK\r\n"
        return b"ERROR\r\n"

    def _mg(self, tokens: list[bytes]) -> bytes:
        key = _key(tokens)
        item = self.store.get(key)
        flags = _flag_set(tokens)
        if item is None:
            return b"EN" + _echo(tokens) + b"\r\n"
        value, client_flags, cas = item
        ret = b""
        if b"f" in flags:
            ret += b" f%d" % client_flags
        if b"c" in flags:
            ret += b" c%d" % cas
        if b"s" in flags:
            ret += b" s%d" % len(value)
        ret += _echo(tokens)
        if b"v" in flags:
            return b"VA %d%s\r\n%s\r\n" % (len(value), ret, value)
        return b"HD" + ret + b"\r\n"

    def _ms(self, tokens: list[bytes], data: bytes) -> bytes:
        key = _key(tokens)
        opts = _flag_values(tokens[3:])
        mode = opts.get(b"M", b"S")
        item = self.store.get(key)
        echo = _echo(tokens)
        if b"C" in opts and (item is None or item[2] != int(opts[b"C"])):
            return (b"NF" if item is None else b"EX") + echo + b"\r\n"
        if mode == b"E" and item is not None:
            return b"NS" + echo + b"\r\n"
        if mode in (b"R", b"A", b"P") and item is None:
            return b"NS" + echo + b"\r\n"
        if mode == b"A":
            assert item is not None
            data, client_flags = item[0] + data, item[1]
        elif mode == b"P":
            assert item is not None
            data, client_flags = data + item[0], item[1]
        else:
            client_flags = int(opts.get(b"F", b"0") or b"0")
        self._cas += 1
        self.store[key] = (data, client_flags, self._cas)
        return b"HD" + echo + b"\r\n"

    def _ma(self, tokens: list[bytes]) -> bytes:
        key = _key(tokens)
        opts = _flag_values(tokens[2:])
        item = self.store.get(key)
        echo = _echo(tokens)
        if item is None:
            return b"NF" + echo + b"\r\n"
        if not item[0].isdigit():
            return b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        delta = int(opts.get(b"D", b"1") or b"1")
        n = int(item[0])
        n = n + delta if opts.get(b"M", b"I") in (b"I", b"+") else max(0, n - delta)
        n &= (1 << 64) - 1
        self._cas += 1
        self.store[key] = (b"%d" % n, item[1], self._cas)
        if b"v" in _flag_set(tokens):
            return b"VA %d%s\r\n%d\r\n" % (len(b"%d" % n), echo, n)
        return b"HD" + echo + b"\r\n"


# --- helpers for real memcached servers ------------------------------------------------------


def _all_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("T", "t"):
            return False
    return True


def pause_fully(server: Any, timeout: float = 5.0) -> None:
    """`server.pause()` (SIGSTOP), then wait until every thread of it has stopped.

    The signal is asynchronous: a request sent right after kill() returns can still be answered,
    which would turn a test of a silent server into a flaky one.
    """
    server.pause()
    deadline = time.monotonic() + timeout
    while not _all_stopped(server.pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"memcached {server.pid} did not stop within {timeout}s")
        time.sleep(0.002)


def keys_held_by(server: Any, keys: list[str]) -> set[str]:
    """The keys among `keys` that a real memcached holds, asked directly (pipelined `mg`)."""
    found: set[str] = set()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]
            sock.sendall(b"".join(b"mg %s\r\n" % k.encode() for k in batch))
            buf = b""
            while buf.count(b"\r\n") < len(batch):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("memcached closed the connection")
                buf += chunk
            lines = buf.split(b"\r\n")[: len(batch)]
            if any(line not in (b"HD", b"EN") for line in lines):
                raise AssertionError(f"unexpected replies to mg: {lines[:5]}")
            found.update(k for k, line in zip(batch, lines) if line == b"HD")
    return found


# --- token helpers ---------------------------------------------------------------------------


def _flag_set(tokens: list[bytes]) -> set[bytes]:
    return {t[:1] for t in tokens[2:]}


def _flag_values(tokens: list[bytes]) -> dict[bytes, bytes]:
    return {t[:1]: t[1:] for t in tokens if t}


def _key(tokens: list[bytes]) -> bytes:
    key = tokens[1]
    if b"b" in _flag_set(tokens):
        return base64.b64decode(key)
    return key


def _echo(tokens: list[bytes]) -> bytes:
    """The request flags memcached echoes back: O (opaque) as given, k as the key."""
    out = b""
    for t in tokens[2:]:
        if t.startswith(b"O"):
            out += b" " + t
        elif t == b"k":
            out += b" k" + tokens[1]
    return out


def _other_opaque(tokens: list[bytes]) -> bytes:
    for t in tokens[2:]:
        if t.startswith(b"O"):
            return b"9" + t[1:] + b"9"
    return b"424242"
