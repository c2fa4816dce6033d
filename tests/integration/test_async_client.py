"""AsyncClient: the same methods as Client, as coroutines; concurrent calls share one socket.

The method-by-method check runs one script through the synchronous Client and then (after a flush)
through the AsyncClient on the same broker and memcached, and requires identical outcomes; the
synchronous Client's outcomes are themselves checked against pymemcache in test_client_parity.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from clientlib import AsyncClient, Client, PickleSerde
from clientlib.errors import BrokerTimeout, MemcacheClientError
from timing import at_deadline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CAS = object()  # replaced by the script's last cas token

# (method, args, kwargs): each runs on both clients; results are compared.
SCRIPT: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("get", ("a",), {}),
    ("get", ("a",), {"default": b"d"}),
    ("gets", ("a",), {}),
    ("gat", ("a", 10), {}),
    ("gats", ("a", 10), {}),
    ("get_many", (["a", "b"],), {}),
    ("gets_many", (["a"],), {}),
    ("set", ("a", b"1"), {}),
    ("set", ("nr", b"1"), {"noreply": True}),
    ("get", ("nr",), {}),
    ("add", ("a", b"2"), {}),
    ("add", ("b", b"2"), {}),
    ("replace", ("a", b"3"), {}),
    ("replace", ("zz", b"3"), {}),
    ("append", ("a", b"t"), {}),
    ("prepend", ("a", b"h"), {}),
    ("append", ("zz", b"t"), {}),
    ("get", ("a",), {}),
    ("gat", ("a", 100), {}),
    ("gets", ("a",), {}),
    ("cas", ("a", b"c", CAS), {}),
    ("cas", ("a", b"d", CAS), {}),
    ("cas", ("zz", b"d", b"1"), {}),
    ("gats", ("a", 0), {}),
    ("get_many", (["a", "b", "zz"],), {}),
    ("get_multi", (["a"],), {}),
    ("gets_many", (["a", "b"],), {}),
    ("set_many", ({"m1": b"1", "m2": b"2"},), {}),
    ("set_multi", ({"m3": b"3"},), {}),
    ("set_many", ({"m4": b"4", "m5": b"x" * (2 << 20)},), {}),
    ("get_many", (["m1", "m2", "m3", "m4", "m5"],), {}),
    ("delete", ("m1",), {}),
    ("delete", ("m1",), {}),
    ("delete_many", (["m2", "zz"],), {}),
    ("delete_multi", (["m3"],), {}),
    ("get_many", (["m1", "m2", "m3"],), {}),
    ("incr", ("n", 1), {}),
    ("set", ("n", b"10"), {}),
    ("incr", ("n", 5), {}),
    ("decr", ("n", 6), {}),
    ("get", ("n",), {}),
    ("incr", ("n", 1), {"noreply": True}),
    ("get", ("n",), {}),
    ("incr", ("a", 1), {}),
    ("incr", ("n", -1), {}),
    ("touch", ("a", 10), {}),
    ("touch", ("zz", 10), {}),
    ("set", ("bad key", b"1"), {}),
    ("set", ("e", b"1"), {"expire": -1}),
    ("get", ("e",), {}),
    ("version", (), {}),
    ("cache_memlimit", (64,), {}),
    ("broker_ping", (), {}),
    ("flush_all", (), {}),
    ("get", ("a",), {}),
    ("close", (), {}),
    ("set", ("after-close", b"1"), {}),
    ("disconnect_all", (), {}),
    ("get", ("after-close",), {}),
    ("quit", (), {}),
    ("get", ("after-close",), {}),
]


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except Exception as exc:
        return ("raise", type(exc).__name__)


def _args(args: tuple[Any, ...], st: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(st["cas"] if a is CAS else a for a in args)


def _normalize(method: str, result: tuple[str, Any], st: dict[str, Any]) -> tuple[str, Any]:
    kind, value = result
    if kind == "ok" and method in ("gets", "gats") and value[1] is not None:
        st["cas"] = value[1]
        return kind, (value[0], "<cas>")
    if kind == "ok" and method == "gets_many":
        return kind, {k: (v, "<cas>") for k, (v, _) in value.items()}
    return result


def run_sync(c: Client) -> list[Any]:
    st: dict[str, Any] = {}
    out = []
    for method, args, kwargs in SCRIPT:
        r = outcome(lambda: getattr(c, method)(*_args(args, st), **kwargs))
        out.append((method, args, _normalize(method, r, st)))
    return out


async def run_async(c: AsyncClient) -> list[Any]:
    st: dict[str, Any] = {}
    out = []
    for method, args, kwargs in SCRIPT:
        try:
            coro = getattr(c, method)(*_args(args, st), **kwargs)
            assert asyncio.iscoroutine(coro), method
            r: tuple[str, Any] = ("ok", await coro)
        except AssertionError:
            raise
        except Exception as exc:
            r = ("raise", type(exc).__name__)
        out.append((method, args, _normalize(method, r, st)))
    return out


def test_every_method_is_a_coroutine_with_client_results(broker_factory: Any, mc: Any) -> None:
    b = broker_factory([mc.address], max_value_bytes=1 << 20)
    sync = run_sync(Client(b.url, timeout=5.0))
    Client(b.url, timeout=5.0).flush_all()

    async def main() -> list[Any]:
        c = AsyncClient(b.url, timeout=5.0)
        try:
            return await run_async(c)
        finally:
            await c.disconnect_all()

    mine = asyncio.run(main())
    diffs = [(s, m) for s, m in zip(sync, mine) if s != m]
    assert not diffs, "\n".join(f"{s} != {m}" for s, m in diffs)
    assert ("get", ("a",), ("ok", b"h3t")) in mine
    assert ("incr", ("a", 1), ("raise", "MemcacheClientError")) in mine


def test_200_concurrent_calls_share_one_socket(broker: Any) -> None:
    async def main() -> None:
        c = AsyncClient(broker.url, timeout=5.0)
        try:
            values = {f"k{i}": f"value-of-k{i}".encode() for i in range(200)}
            assert await c.set_many(values) == []
            sock = c._transport._sock
            # 200 reads at once, each for a different key: each must get its own value.
            got = await asyncio.gather(*(c.get(k) for k in values))
            assert got == list(values.values())
            assert c._transport._sock is sock  # one socket for all of them
            assert c._transport._waiters == {}
            # Mixed concurrent calls: writes, reads, counters, multi-key reads.
            await c.set("ctr", b"0")
            calls: list[Awaitable[Any]] = []
            for i in range(200):
                kind = i % 4
                if kind == 0:
                    calls.append(c.set(f"w{i}", f"written-{i}".encode()))
                elif kind == 1:
                    calls.append(c.get(f"k{i}"))
                elif kind == 2:
                    calls.append(c.incr("ctr", 1))
                else:
                    calls.append(c.get_many([f"k{i}", f"k{(i + 1) % 200}"]))
            results = await asyncio.gather(*calls)
            counters = []
            for i, r in enumerate(results):
                kind = i % 4
                if kind == 0:
                    assert r is True
                elif kind == 1:
                    assert r == values[f"k{i}"]
                elif kind == 2:
                    counters.append(r)
                else:
                    assert r == {f"k{i}": values[f"k{i}"], f"k{(i + 1) % 200}": values[f"k{(i + 1) % 200}"]}
            assert sorted(counters) == list(range(1, 51))
            assert await c.get_many([f"w{i}" for i in range(0, 200, 4)]) == {
                f"w{i}": f"written-{i}".encode() for i in range(0, 200, 4)
            }
            assert c._transport._sock is sock
        finally:
            await c.disconnect_all()

    asyncio.run(main())


def test_concurrent_calls_are_pipelined_not_serialized(broker: Any) -> None:
    # All 200 requests are in flight together: every one is waiting before the first reply lands.
    async def main() -> int:
        c = AsyncClient(broker.url, timeout=5.0)
        try:
            await c.set("k", b"v")
            peak = 0
            original = c._transport._send

            async def counting_send(sock: Any, data: bytes, deadline: float) -> None:
                nonlocal peak
                await original(sock, data, deadline)
                peak = max(peak, len(c._transport._waiters))

            c._transport._send = counting_send  # type: ignore[method-assign]
            assert await asyncio.gather(*(c.get("k") for _ in range(200))) == [b"v"] * 200
            return peak
        finally:
            await c.disconnect_all()

    assert asyncio.run(main()) >= 100


def test_serde_and_prefix(broker: Any) -> None:
    async def main() -> None:
        c = AsyncClient(broker.url, serde=PickleSerde(), key_prefix="ap:", timeout=5.0)
        try:
            await c.set("obj", {"a": [1, 2]})
            assert await c.get("obj") == {"a": [1, 2]}
            assert await c.get_many(["obj", "zz"]) == {"obj": {"a": [1, 2]}}
        finally:
            await c.disconnect_all()

    asyncio.run(main())
    assert Client(broker.url, serde=PickleSerde(), timeout=5.0).get("ap:obj") == {"a": [1, 2]}


def test_timeouts_cancellation_and_stale_replies(broker_factory: Any, mc: Any) -> None:
    b = broker_factory([mc.address], failure_limit=1000)
    values = {f"k{i}": f"value-of-k{i}".encode() for i in range(50)}
    Client(b.url, timeout=5.0).set_many(values)

    async def main() -> None:
        c = AsyncClient(b.url, timeout=5.0)
        try:
            assert await c.get("k0") == values["k0"]  # connected, with time for a loaded machine
            c.timeout = 0.3
            b.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(BrokerTimeout):
                    await c.get("k1")
                assert at_deadline(time.monotonic() - t0, 0.3)  # tests/timing.py: LATE of tolerance
                # Concurrent calls that all time out, and one that is cancelled by its caller.
                results = await asyncio.gather(*(c.get(f"k{i}") for i in range(2, 20)), return_exceptions=True)
                assert all(isinstance(r, BrokerTimeout) for r in results)
                task = asyncio.ensure_future(c.get("k20"))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert c._transport._waiters == {}
            finally:
                b.resume()
            # The late replies to all of the above arrive now; none may answer a new call.
            c.timeout = 5.0
            for _ in range(3):
                keys = list(reversed(values))
                got = await asyncio.gather(*(c.get(k) for k in keys))
                assert got == [values[k] for k in keys]
        finally:
            await c.disconnect_all()

    asyncio.run(main())


def test_one_client_across_event_loops(broker: Any) -> None:
    # asyncio.run twice (a new loop each time): the client opens a fresh socket for the new loop.
    c = AsyncClient(broker.url, timeout=5.0)

    async def write() -> None:
        await c.set("loop", b"1")

    async def read() -> Any:
        try:
            return await c.get("loop")
        finally:
            await c.disconnect_all()

    asyncio.run(write())
    assert asyncio.run(read()) == b"1"


def test_errors_are_raised_from_the_coroutine(broker: Any) -> None:
    async def main() -> None:
        c = AsyncClient(broker.url, timeout=5.0)
        try:
            await c.set("text", b"abc")
            with pytest.raises(MemcacheClientError):
                await c.incr("text", 1)
            assert await c.get("text") == b"abc"  # the client and broker are still fine
        finally:
            await c.disconnect_all()

    asyncio.run(main())


def test_a_call_cancelled_by_the_callers_own_timeout_logs_nothing(broker, mc, caplog):
    # Found by a fresh user: asyncio logged "_GatheringFuture exception was never retrieved" for
    # every call a caller's wait_for cancelled while it waited for its reply.
    import asyncio
    import gc
    import logging

    from clientlib import AsyncClient

    async def main() -> bytes | None:
        c = AsyncClient(broker.url, timeout=5.0)
        try:
            await c.set("k", b"v")
            mc.pause()  # the gets below wait for their replies when they are cancelled
            try:
                for _ in range(5):
                    try:
                        await asyncio.wait_for(c.get("k"), timeout=0.05)
                    except asyncio.TimeoutError:
                        pass
            finally:
                mc.resume()
            await asyncio.sleep(0.05)
            gc.collect()
            return await c.get("k")
        finally:
            await c.close()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert asyncio.run(main()) == b"v"
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
