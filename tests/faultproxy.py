"""A fault-injecting TCP proxy for tests and the soak: toxiproxy's toxics in one small asyncio process.

    python tests/faultproxy.py --upstream 127.0.0.1:11211 [--max-seconds 900] [--max-connections 256]

It listens on a free loopback port, prints `{"port": N}` on stdout, and forwards every connection
to the upstream (memcached), applying the toxics that are on at that moment. It is controlled by
JSON lines on stdin, each answered by one JSON line on stdout:

    {"cmd": "set", "toxic": "latency", "latency_ms": 20, "jitter_ms": 10, "stream": "downstream"}
    {"cmd": "remove", "toxic": "latency"}      {"cmd": "clear"}      {"cmd": "stats"}

Toxics (toxiproxy's names where it has one; `stream` is "downstream" = memcached -> broker, the
default as in toxiproxy, "upstream" = broker -> memcached, or "both"):

- latency      latency_ms, jitter_ms: each chunk waits latency +- jitter (uniform) before it goes
               on; order is kept (a chunk never overtakes the one before it).
- bandwidth    rate_kbps: at most rate KiB/s, written in 10 ms slices.
- slicer       size (bytes, default 1), delay_us: each chunk is written in slices of `size`
               bytes, each flushed on its own (TCP_NODELAY on both sides, so each is a segment).
- blackhole    bytes are read and thrown away; the connection stays open (toxiproxy's `timeout`
               toxic with timeout 0).
- reset_peer   timeout_ms: every connection, open or new, is reset (RST, SO_LINGER 0) on both
               sides after timeout_ms.
- slow_close   delay_ms: when one side closes, the close reaches the other side delay_ms later.
- truncate     every (chunks), drop (bytes): one chunk in `every` loses `drop` bytes at a random
               offset and the stream goes on (a middlebox that loses bytes; "truncate and
               continue": the receiver must notice).
- duplicate    every (chunks): one chunk in `every` is sent twice in a row.

Bounded: at most --max-connections at once (more are closed at accept), each direction holds at
most one 64 KiB chunk (reads wait for the write to drain), and the process exits after
--max-seconds or as soon as its stdin closes (the test that started it is gone). Random choices
come from --seed, so a failing run can be replayed.

`FaultProxy` below starts it as a subprocess and talks to it; stop() ends it by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

CHUNK = 64 * 1024
HOST = "127.0.0.1"
STREAMS = ("downstream", "upstream", "both")
TOXICS: dict[str, dict[str, float]] = {
    "latency": {"latency_ms": 0.0, "jitter_ms": 0.0},
    "bandwidth": {"rate_kbps": 100.0},
    "slicer": {"size": 1.0, "delay_us": 0.0},
    "blackhole": {},
    "reset_peer": {"timeout_ms": 0.0},
    "slow_close": {"delay_ms": 0.0},
    "truncate": {"every": 50.0, "drop": 1.0},
    "duplicate": {"every": 50.0},
}


class ToxicError(ValueError):
    pass


def parse_toxic(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate a "set" command: (name, params with defaults filled in). Raises ToxicError."""
    name = msg.get("toxic")
    if name not in TOXICS:
        raise ToxicError(f"unknown toxic {name!r}; known: {', '.join(TOXICS)}")
    params: dict[str, Any] = dict(TOXICS[name])
    stream = msg.get("stream", "downstream")
    if stream not in STREAMS:
        raise ToxicError(f"stream must be one of {STREAMS}, not {stream!r}")
    for k, v in msg.items():
        if k in ("cmd", "toxic", "stream"):
            continue
        if k not in params:
            raise ToxicError(f"{name} has no parameter {k!r}; it has {sorted(params) or 'none'}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ToxicError(f"{name}.{k} must be a number >= 0, not {v!r}")
        params[k] = float(v)
    if name in ("truncate", "duplicate") and params["every"] < 1:
        raise ToxicError(f"{name}.every must be >= 1")
    if name == "slicer" and params["size"] < 1:
        raise ToxicError("slicer.size must be >= 1")
    if name == "bandwidth" and params["rate_kbps"] <= 0:
        raise ToxicError("bandwidth.rate_kbps must be > 0")
    params["stream"] = stream
    return name, params


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Link:
    """One proxied connection: the client side (the broker) and the upstream side (memcached)."""

    def __init__(self, proxy: "Proxy", cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 ur: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self.closed = False
        self.reset_task: asyncio.Task[None] | None = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for w in (self.cw, self.uw):
                w.close()
            self.proxy.links.discard(self)

    def reset(self) -> None:
        if not self.closed:
            self.closed = True
            _reset(self.cw)
            _reset(self.uw)
            self.proxy.counts["resets"] += 1
            self.proxy.links.discard(self)

    def schedule_reset(self, timeout_s: float) -> None:
        if self.reset_task is None and not self.closed:
            async def later() -> None:
                await asyncio.sleep(timeout_s)
                self.reset()
            self.reset_task = asyncio.ensure_future(later())


class Proxy:
    def __init__(self, upstream: tuple[str, int], max_connections: int, seed: int) -> None:
        self.upstream = upstream
        self.max_connections = max_connections
        self.rng = random.Random(seed)
        self.toxics: dict[str, dict[str, Any]] = {}
        self.links: set[Link] = set()
        self.counts = {
            "accepted": 0, "refused": 0, "upstream_failed": 0, "chunks": 0, "bytes": 0,
            "blackholed_bytes": 0, "truncated_bytes": 0, "duplicated_chunks": 0, "resets": 0,
        }

    def on(self, name: str, direction: str) -> dict[str, Any] | None:
        p = self.toxics.get(name)
        if p is None or (p["stream"] != "both" and p["stream"] != direction):
            return None
        return p

    async def serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if len(self.links) >= self.max_connections:
            self.counts["refused"] += 1
            cw.close()
            return
        self.counts["accepted"] += 1
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5.0)
        except (OSError, asyncio.TimeoutError):
            # memcached is not there: the broker sees its connection closed, as with no proxy.
            self.counts["upstream_failed"] += 1
            _reset(cw)
            return
        for w in (cw, uw):
            s = w.get_extra_info("socket")
            if s is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link(self, cr, cw, ur, uw)
        self.links.add(link)
        rp = self.on("reset_peer", "downstream") or self.on("reset_peer", "upstream")
        if rp is not None:
            link.schedule_reset(rp["timeout_ms"] / 1000)
        try:
            await asyncio.gather(self.pump(link, cr, uw, "upstream"), self.pump(link, ur, cw, "downstream"))
        except asyncio.CancelledError:
            link.close()  # the proxy is exiting

    async def pump(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        counts = self.counts
        dup_n = trunc_n = 0
        try:
            while not link.closed:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.closed:
                    break
                counts["chunks"] += 1
                counts["bytes"] += len(data)
                if self.on("blackhole", direction) is not None:
                    counts["blackholed_bytes"] += len(data)
                    continue
                lat = self.on("latency", direction)
                if lat is not None:
                    delay = lat["latency_ms"] + self.rng.uniform(-lat["jitter_ms"], lat["jitter_ms"])
                    if delay > 0:
                        await asyncio.sleep(delay / 1000)
                tr = self.on("truncate", direction)
                if tr is not None:
                    trunc_n += 1
                    if trunc_n >= tr["every"]:
                        trunc_n = 0
                        drop = min(int(tr["drop"]), len(data) - 1) if len(data) > 1 else 0
                        if drop > 0:
                            at = self.rng.randrange(0, len(data) - drop + 1)
                            data = data[:at] + data[at + drop:]
                            counts["truncated_bytes"] += drop
                du = self.on("duplicate", direction)
                if du is not None:
                    dup_n += 1
                    if dup_n >= du["every"]:
                        dup_n = 0
                        data = data + data
                        counts["duplicated_chunks"] += 1
                sl = self.on("slicer", direction)
                bw = self.on("bandwidth", direction)
                if sl is not None:
                    size = int(sl["size"])
                    for i in range(0, len(data), size):
                        if link.closed:
                            return
                        writer.write(data[i:i + size])
                        await writer.drain()
                        if sl["delay_us"]:
                            await asyncio.sleep(sl["delay_us"] / 1e6)
                elif bw is not None:
                    step = max(1, int(bw["rate_kbps"] * 1024 / 100))  # 10 ms worth
                    for i in range(0, len(data), step):
                        if link.closed:
                            return
                        writer.write(data[i:i + step])
                        await writer.drain()
                        await asyncio.sleep(0.01)
                else:
                    writer.write(data)
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        # One side closed (or failed): with slow_close the other side learns it delay_ms later.
        sc = self.on("slow_close", direction)
        if sc is not None and not link.closed:
            await asyncio.sleep(sc["delay_ms"] / 1000)
        link.close()

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg.get("cmd")
        if cmd == "set":
            name, params = parse_toxic(msg)
            self.toxics[name] = params
            if name == "reset_peer":
                for link in list(self.links):
                    link.schedule_reset(params["timeout_ms"] / 1000)
            return {"ok": True}
        if cmd == "remove":
            self.toxics.pop(str(msg.get("toxic")), None)
            return {"ok": True}
        if cmd == "clear":
            self.toxics.clear()
            for link in self.links:
                if link.reset_task is not None and not link.reset_task.done():
                    link.reset_task.cancel()
                link.reset_task = None
            return {"ok": True}
        if cmd == "stats":
            return {"ok": True, "connections": len(self.links), "toxics": sorted(self.toxics), **self.counts}
        raise ToxicError(f"unknown command {cmd!r}")


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    proxy = Proxy((host, int(port)), args.max_connections, args.seed)
    server = await asyncio.start_server(proxy.serve, HOST, args.port)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": bound, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def control() -> None:
        while True:
            line = await stdin.readline()
            if not line:
                stop.set()  # whoever started us is gone
                return
            try:
                reply = proxy.command(json.loads(line))
            except (ValueError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            print(json.dumps(reply), flush=True)

    ctl = asyncio.ensure_future(control())
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        pass
    ctl.cancel()
    server.close()
    for link in list(proxy.links):
        link.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="host:port of the server behind the proxy")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--max-connections", type=int, default=256)
    ap.add_argument("--seed", type=int, default=13)
    asyncio.run(_main(ap.parse_args(argv)))


class FaultProxy:
    """The proxy in its own process, driven from a test: set/remove/clear toxics, read stats.

    `address` ("127.0.0.1:PORT") goes into the broker's server list in place of memcached's.
    `port` can be given to come back on the same port after stop() (a restart)."""

    def __init__(self, upstream: str, *, port: int = 0, max_seconds: float = 900.0, seed: int = 13) -> None:
        self.upstream = upstream
        self.port = port
        self.max_seconds = max_seconds
        self.seed = seed
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout: float = 10.0) -> "FaultProxy":
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--upstream", self.upstream, "--port", str(self.port),
             "--max-seconds", str(self.max_seconds), "--seed", str(self.seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )
        hello = self._read(timeout)
        self.port = int(hello["port"])
        return self

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"fault proxy (pid {self.proc.pid}) silent for {timeout}s")
            part = os.read(fd, 4096)
            if not part:
                raise RuntimeError(f"fault proxy exited with {self.proc.poll()}")
            buf += part
        return dict(json.loads(buf))

    def _call(self, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if not reply.get("ok"):
            raise ToxicError(reply.get("error", reply))
        return reply

    def set(self, toxic: str, **params: Any) -> None:
        """Turn `toxic` on (or change its parameters); see the module docstring for the names."""
        self._call({"cmd": "set", "toxic": toxic, **params})

    def remove(self, toxic: str) -> None:
        self._call({"cmd": "remove", "toxic": toxic})

    def clear(self) -> None:
        self._call({"cmd": "clear"})

    def stats(self) -> dict[str, Any]:
        return self._call({"cmd": "stats"})

    def stop(self) -> None:
        """End the process (closing its stdin ends it; SIGKILL by PID if it lingers)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    main()
