"""Why the broker's loop is a hand-written zmq.Poller loop: a ZeroMQ ROUTER echo server written
both ways, measured side by side in one run with N synchronous DEALER clients.

    python -m bench.loop_choice [--clients 8,32] [--seconds 3]

Everything it starts it stops; every loop is bounded by time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time

import zmq
import zmq.asyncio


def poller_server(url: str, secs: float) -> None:
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.bind(url)
    p = zmq.Poller()
    p.register(r, zmq.POLLIN)
    noblock, sndmore = int(zmq.NOBLOCK), int(zmq.SNDMORE)
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if p.poll(100):
            while True:
                try:
                    ident = r.recv(noblock)
                except zmq.Again:
                    break
                data = r.recv(noblock)
                r.send(ident, sndmore | noblock)
                r.send(data, noblock)
    ctx.destroy(0)


def asyncio_server(url: str, secs: float) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        r = ctx.socket(zmq.ROUTER)
        r.bind(url)
        end = time.monotonic() + secs
        while time.monotonic() < end:
            try:
                parts = await asyncio.wait_for(r.recv_multipart(), 0.2)
            except asyncio.TimeoutError:
                continue
            await r.send_multipart(parts)
        ctx.destroy(0)

    asyncio.run(main())


def client(url: str, secs: float, q: "mp.Queue[int]") -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 2000)
    s.connect(url)
    time.sleep(0.3)
    n = 0
    end = time.monotonic() + secs
    try:
        while time.monotonic() < end:
            s.send(b"x" * 30)
            s.recv()
            n += 1
    finally:
        q.put(n)
        ctx.destroy(0)


def run(server, clients: int, secs: float) -> float:
    url = f"ipc://{tempfile.mkdtemp(prefix='mcb-loop-')}/echo.sock"
    sp = mp.Process(target=server, args=(url, secs + 2))
    sp.start()
    time.sleep(0.3)
    q: "mp.Queue[int]" = mp.Queue()
    cs = [mp.Process(target=client, args=(url, secs, q)) for _ in range(clients)]
    try:
        for c in cs:
            c.start()
        return sum(q.get(timeout=secs + 10) for _ in cs) / secs
    finally:
        for c in cs:
            c.join(5)
        sp.terminate()
        sp.join(5)
        path = url[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"{'clients':>7} {'poller req/s':>13} {'asyncio req/s':>14} {'asyncio/poller':>15}")
    for n in (int(x) for x in args.clients.split(",")):
        a = run(poller_server, n, args.seconds)
        b = run(asyncio_server, n, args.seconds)
        print(f"{n:>7} {a:>13,.0f} {b:>14,.0f} {b / a:>15.2f}")


if __name__ == "__main__":
    main()
