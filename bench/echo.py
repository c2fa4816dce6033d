"""The ZeroMQ limit: a bare ROUTER that answers every message with a fixed blob, no memcached.

    python -m bench.echo --url ipc:///tmp/x/echo.sock --reply-bytes 130 [--max-seconds 3600]

The same loop shape as the broker's (one zmq.Poller loop, plain send/recv, NOBLOCK), doing no work
per message beyond receiving it and sending the reply. Clients (bench/paths.py) send the very
frame clientlib would send; the reply has the size of the broker's reply to that frame, so the path
carries the same bytes both ways. Prints READY once bound; SIGTERM/SIGINT only set a flag.
"""

from __future__ import annotations

import argparse
import sys
import time

import zmq

from .serving import StopFlag, bound_router, check_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--reply-bytes", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args(argv)
    check_url(p, args.url)
    stop = StopFlag()
    ctx = zmq.Context()
    router = bound_router(ctx, args.url)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    reply = b"\x00" * max(1, args.reply_bytes)
    noblock, sndmore = int(zmq.NOBLOCK), int(zmq.SNDMORE)
    print("READY", flush=True)
    end = time.monotonic() + args.max_seconds
    try:
        while not stop.set and time.monotonic() < end:
            if not poller.poll(100):
                continue
            for _ in range(4096):  # one turn drains a bounded batch, as the broker's does
                try:
                    ident = router.recv(noblock)
                except zmq.Again:
                    break
                router.recv(noblock)
                try:
                    router.send(ident, sndmore | noblock)
                    router.send(reply, noblock)
                except zmq.Again:
                    pass  # a peer that went away or stopped reading: drop, as a ROUTER does
    finally:
        ctx.destroy(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
