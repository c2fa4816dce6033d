"""The round-trip injector: ONE single-threaded TCP proxy process in front of every memcached server.

    python -m bench.delayproxy --delay-ms 1.0 --map 127.0.0.1:P1=127.0.0.1:M1 [--map ...]
                               [--stats-file FILE] [--max-seconds 3600]

Every byte a client sends toward memcached is held for `--delay-ms` before it is forwarded (a fixed
one-way delay on the request direction); memcached's answers pass back at once. So every round trip
through the proxy grows by the delay, whatever the client: 16 direct pymemcache connections, the
broker's 2 pipelined ones and twemproxy's all pay the same 1 ms per round trip, and none pays for a
thread of its own (a thread per connection would tax the 16-connection path far more than the
2-connection one). One `selectors` loop; a FIFO of timed chunks (the delay is constant, so arrival
order is due order); non-blocking writes with per-socket output buffers.

Prints READY on stdout once listening. SIGTERM/SIGINT only set a flag; the loop then exits and
writes its own account to --stats-file: chunks and bytes forwarded, and the delay actually added
(mean / max, measured from receive to forward), so the bench can show how the delay was made.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

TICK_S = 0.1  # longest sleep when nothing is due, so a signal or the lifetime bound is seen


class Side:
    __slots__ = ("sock", "peer", "out", "delayed", "closed", "writing")

    def __init__(self, sock: socket.socket, delayed: bool) -> None:
        self.sock = sock
        self.peer: Side | None = None
        self.out = bytearray()
        self.delayed = delayed  # True for the client side: what it sends waits for the delay
        self.closed = False
        self.writing = False


class Proxy:
    def __init__(self, maps: list[tuple[tuple[str, int], tuple[str, int]]], delay_s: float) -> None:
        self.delay_s = delay_s
        self.sel = selectors.DefaultSelector()
        self.due: collections.deque[tuple[float, Side, bytes]] = collections.deque()
        self.stop = False
        self.chunks = 0
        self.bytes = 0
        self.delay_sum = 0.0
        self.delay_max = 0.0
        self.connections = 0
        for front, up in maps:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(front)
            ls.listen(1024)
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, ("listen", up))

    def _accept(self, ls: socket.socket, up: tuple[str, int]) -> None:
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            return
        try:
            u = socket.create_connection(up, timeout=2.0)
        except OSError:
            c.close()
            return
        self.connections += 1
        for s in (c, u):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cs, us = Side(c, True), Side(u, False)
        cs.peer, us.peer = us, cs
        self.sel.register(c, selectors.EVENT_READ, ("side", cs))
        self.sel.register(u, selectors.EVENT_READ, ("side", us))

    def _close(self, side: Side) -> None:
        for s in (side, side.peer):
            if s is not None and not s.closed:
                s.closed = True
                self.sel.unregister(s.sock)
                s.sock.close()

    def _write(self, side: Side, data: bytes) -> None:
        if side.closed:
            return
        side.out += data
        self._flush(side)

    def _flush(self, side: Side) -> None:
        try:
            n = side.sock.send(side.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(side)
            return
        del side.out[:n]
        want = bool(side.out)
        if want != side.writing:
            side.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(side.sock, events, ("side", side))

    def _read(self, side: Side) -> None:
        try:
            data = side.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(side)
            return
        assert side.peer is not None
        if side.delayed:
            self.due.append((time.monotonic() + self.delay_s, side.peer, data))
        else:
            self._write(side.peer, data)

    def _release_due(self) -> None:
        now = time.monotonic()
        due = self.due
        while due and due[0][0] <= now:
            at, target, data = due.popleft()
            late = now - at + self.delay_s
            self.chunks += 1
            self.bytes += len(data)
            self.delay_sum += late
            self.delay_max = max(self.delay_max, late)
            self._write(target, data)

    def run(self, max_seconds: float) -> None:
        end = time.monotonic() + max_seconds
        while not self.stop and time.monotonic() < end:
            timeout = TICK_S
            if self.due:
                timeout = max(0.0, min(TICK_S, self.due[0][0] - time.monotonic()))
            for key, events in self.sel.select(timeout):
                kind, obj = key.data
                if kind == "listen":
                    self._accept(key.fileobj, obj)  # type: ignore[arg-type]
                elif kind == "side":
                    if events & selectors.EVENT_WRITE and not obj.closed:
                        self._flush(obj)
                    if events & selectors.EVENT_READ and not obj.closed:
                        self._read(obj)
                # "wake": the signal wake-up pipe; reading it just empties it
                else:
                    try:
                        os.read(obj, 512)
                    except BlockingIOError:
                        pass
            self._release_due()

    def account(self) -> dict[str, Any]:
        return {
            "delay_ms": round(self.delay_s * 1e3, 3), "connections": self.connections,
            "chunks": self.chunks, "bytes": self.bytes,
            "mean_added_ms": round(self.delay_sum / self.chunks * 1e3, 3) if self.chunks else 0.0,
            "max_added_ms": round(self.delay_max * 1e3, 3),
        }


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise argparse.ArgumentTypeError(f"loopback only: {text}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.delayproxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--map", action="append", required=True, metavar="LISTEN=UPSTREAM")
    p.add_argument("--stats-file")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args(argv)
    if not 0 <= args.delay_ms <= 1000:
        p.error("--delay-ms must be in 0..1000")
    maps = []
    for m in args.map:
        front, sep, up = m.partition("=")
        if not sep:
            p.error(f"--map wants LISTEN=UPSTREAM, got {m!r}")
        maps.append((_hostport(front), _hostport(up)))
    proxy = Proxy(maps, args.delay_ms / 1e3)

    # Signal handlers only record; the loop sees the flag within one tick (or at once via the pipe).
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    proxy.sel.register(r, selectors.EVENT_READ, ("wake", r))

    def on_signal(signum: int, frame: Any) -> None:
        proxy.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("READY", flush=True)
    proxy.run(args.max_seconds)
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            json.dump(proxy.account(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
