"""Gunicorn end to end: a real Gunicorn with 8 workers (sync and gthread, preload_app on and off,
every pair of the three choices) serves each example app (examples/django_app,
examples/flask_app) through a real broker and memcached, while a bounded concurrent load client
checks every response.

The responses depend on cached values: a write read back (/put), a value computed once and read
by every worker (/square), an atomic counter shared by every worker (/hit: the answers must be
exactly 1..N), and the value the app wrote while loading (/boot: written by the master process
with --preload, before the fork). memcached's connection counters show only the broker's
connections, never one per worker: watched through one stats connection kept open,
curr_connections stays at its value from before Gunicorn started (the broker's 2 plus the
watcher) and total_connections does not move at all.

Each configuration sends 2,000 requests (most of the module's time is starting and stopping 8
workers per configuration, not the requests). Which workers answered is printed, not asserted: the
kernel and gthread's threads decide how accepts spread, and on a loaded machine one worker may
take them all; memcached's counters are what shows no worker opened a connection of its own.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import harness
from brokerproc import BrokerProcess
from clientlib import Client
from clientlib.client import DEFAULT_TIMEOUT
from harness import Memcached
from timing import LATE

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
APPS = {
    "django": (ROOT / "examples" / "django_app", "exampleproject.wsgi"),
    "flask": (ROOT / "examples" / "flask_app", "app:app"),
}
WORKERS = 8
THREADS = 16  # load client threads
REQUESTS = 2000
LOAD_DEADLINE_S = 90.0  # the load loop's bound in time (a hung server fails, never stalls)


@dataclass
class Gunicorn:
    app: str
    worker_class: str
    preload: bool
    broker_url: str
    log: Path
    port: int = field(default_factory=harness.free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        chdir, target = APPS[self.app]
        argv = [
            sys.executable, "-m", "gunicorn", target, "--chdir", str(chdir),
            "--workers", str(WORKERS), "--worker-class", self.worker_class,
            "--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "5", "--timeout", "30",
            "--log-level", "warning",
        ]
        if self.worker_class == "gthread":
            argv += ["--threads", "4"]
        if self.preload:
            argv.append("--preload")
        # The Flask app's cache calls get clientlib's 1 s deadline plus the stated tolerance of a loaded
        # machine (tests/timing.py): its import-time set, in each worker as it boots under this
        # test's load and beside other suites, once missed 1 s, and Gunicorn stops when a worker
        # fails to boot. (The Django app's settings give 2 s.)
        env = dict(os.environ, MCBROKER_URL=self.broker_url,
                   FLASK_CACHE_OPTIONS=json.dumps({"timeout": DEFAULT_TIMEOUT + LATE}))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if get(self.port, "/square/1")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer within {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            # Quick shutdown (every response was already checked): SIGTERM's graceful stop costs
            # seconds per run in the workers' sleep loops.
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started (its own session)
                proc.wait(5)
        self.proc = None


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode(), reply.getheader("X-Worker-Pid") or ""
    finally:
        conn.close()


@pytest.fixture
def server(request: pytest.FixtureRequest, broker: BrokerProcess, tmp_path: Path) -> Iterator[Gunicorn]:
    app, worker_class, preload = request.param
    g = Gunicorn(app, worker_class, preload, broker.url, tmp_path / "gunicorn.log")
    try:
        yield g
    finally:
        g.stop()


# Every pair of (app, worker class, preload) in four runs instead of all eight (an orthogonal array:
# each app meets each worker class and each preload mode, and each worker class each preload mode).
# The three-way case left in is the riskiest one: Flask-Caching's one shared client, made in the
# master before the fork, then used by a gthread worker's threads. Half the module's time (about
# 2.8 s of CPU per run goes to booting 8 workers) goes with the other four.
CONFIGS = [("django", "sync", True), ("django", "gthread", False), ("flask", "sync", False), ("flask", "gthread", True)]
assert {(a, w) for a, w, _ in CONFIGS} == {(a, w) for a in APPS for w in ("sync", "gthread")}
assert {(a, p) for a, _, p in CONFIGS} == {(a, p) for a in APPS for p in (True, False)}
assert {(w, p) for _, w, p in CONFIGS} == {(w, p) for w in ("sync", "gthread") for p in (True, False)}


@pytest.mark.parametrize("server", CONFIGS, indirect=True, ids=[f"{a}-{w}-{'preload' if p else 'lazy'}"
                                                                for a, w, p in CONFIGS])
def test_gunicorn_serves_every_request_right(server: Gunicorn, broker: BrokerProcess, mc: Memcached) -> None:
    total = REQUESTS
    # The broker's memcached connections exist before Gunicorn starts...
    warm = Client(broker.url, timeout=5.0)
    warm.set("warm", b"1")
    warm.disconnect_all()
    # ...both of them: the broker opens its second on its own time, which a loaded machine can
    # put after a count taken here (seen once: 2 before Gunicorn started, 3 throughout).
    give_up = time.monotonic() + 30
    while [s["connections"] for s in broker.stats()["servers"].values()] != [2]:
        assert time.monotonic() < give_up, broker.stats()["servers"]
        time.sleep(0.05)
    watch = harness.StatsConnection(mc.address)
    base = watch.stats()

    server.start()
    assert server.proc is not None
    master = server.proc.pid

    run = secrets.token_hex(4)
    expected: dict[int, str | None] = {}
    for i in range(total):
        kind = i % 3
        if kind == 0:
            expected[i] = f"v{i}-{secrets.token_hex(3)}"
        elif kind == 1:
            expected[i] = str((i % 40) ** 2)
        else:
            expected[i] = None  # a counter value, checked as a whole below

    def path_of(i: int) -> str:
        kind = i % 3
        if kind == 0:
            return f"/put/{run}-{i}/{expected[i]}"
        if kind == 1:
            return f"/square/{i % 40}"
        return f"/hit/{run}"

    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.25):
            samples.append(int(watch.stats()["curr_connections"]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    deadline = time.monotonic() + LOAD_DEADLINE_S
    wrong: list[str] = []
    hits: list[int] = []
    pids: set[str] = set()
    lock = threading.Lock()

    def load(indices: range) -> None:
        for i in indices:
            if time.monotonic() > deadline:
                with lock:
                    wrong.append(f"request {i}: load deadline passed")
                return
            try:
                status, body, pid = get(server.port, path_of(i))
            except OSError as exc:
                with lock:
                    wrong.append(f"{path_of(i)}: {exc!r}")
                continue
            with lock:
                pids.add(pid)
                if status != 200:
                    wrong.append(f"{path_of(i)}: HTTP {status}: {body[:200]}")
                elif expected[i] is None:
                    hits.append(int(body))
                elif body != expected[i]:
                    wrong.append(f"{path_of(i)}: got {body!r}, want {expected[i]!r}")

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(load, [range(t, total, THREADS) for t in range(THREADS)]))
        elapsed = time.monotonic() - started
        status, boot, _ = get(server.port, "/boot")
    finally:
        stop_sampling.set()
        sampler.join(10)
    end = watch.stats()
    watch.close()
    broker_servers = broker.stats()["servers"]

    assert not wrong, f"{len(wrong)} wrong of {total}: {wrong[:10]}\n{server.log.read_text()[-3000:]}"
    n_hits = sum(1 for i in range(total) if i % 3 == 2)
    assert sorted(hits) == list(range(1, n_hits + 1)), "the shared counter lost or repeated a value"
    assert status == 200
    if server.preload:
        assert boot == f"loaded by pid {master}"  # written in the master, before the fork
    else:
        assert boot.startswith("loaded by pid ") and boot != f"loaded by pid {master}"
    # Only the broker's connections: the same count as before Gunicorn started, and memcached
    # accepted no connection at all while Gunicorn started, served and answered.
    assert samples, "no connection sample was taken"
    assert set(samples) == {int(base["curr_connections"])}, samples
    assert int(end["curr_connections"]) == int(base["curr_connections"])
    assert int(end["total_connections"]) == int(base["total_connections"])
    assert [s["connections"] for s in broker_servers.values()] == [2]
    print(f"{server.app} {server.worker_class} preload={server.preload}: {total} requests in {elapsed:.2f}s "
          f"({total / elapsed:.0f}/s), {len(pids)} workers answered, memcached curr_connections "
          f"{base['curr_connections']} throughout")
