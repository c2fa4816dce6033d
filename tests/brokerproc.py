"""A real mcbroker process for tests: its own config file and ipc socket, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_live: set["BrokerProcess"] = set()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Iterable):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


class BrokerProcess:
    """`python -m broker serve --config <file>` with a private ipc socket."""

    def __init__(self, servers: list[Any], **settings: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcb-br-"))
        self.url = f"ipc://{self.dir}/broker.sock"
        self.config_path = self.dir / "mcbroker.toml"
        self.settings: dict[str, Any] = {"listen": [self.url], "servers": servers, **settings}
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        text = "".join(f"{k} = {toml_value(v)}\n" for k, v in self.settings.items())
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0, *, ping: bool = True) -> "BrokerProcess":
        """Start and wait until it answers a ping; with ping=False, until it logs that it is
        ready (then its counters hold only what others sent it)."""
        seen = self._ready_lines()
        log = open(self.dir / "broker.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        _live.add(self)
        if ping:
            self.wait_ready(timeout)
            return self
        deadline = time.monotonic() + timeout
        while self._ready_lines() <= seen:
            if not self.running or time.monotonic() > deadline:
                raise RuntimeError(f"broker not ready within {timeout}s:\n{self.log()}")
            time.sleep(0.01)
        return self

    def _ready_lines(self) -> int:
        try:
            return (self.dir / "broker.log").read_text(errors="replace").count("mcbroker ready")
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        from clientlib import Client
        from clientlib.errors import MemcacheError

        deadline = time.monotonic() + timeout
        client = Client(self.url, timeout=0.2)
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"broker exited with {self.proc.returncode if self.proc else None}:\n{self.log()}")
                try:
                    if client.broker_ping() == "PONG":
                        return
                except MemcacheError:
                    time.sleep(0.02)
            raise RuntimeError(f"broker did not answer ping within {timeout}s:\n{self.log()}")
        finally:
            client.disconnect_all()

    def log(self) -> str:
        try:
            return (self.dir / "broker.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it lingers. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _live.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _live.discard(self)

    def restart(self) -> "BrokerProcess":
        self.stop()
        return self.start()

    def stats(self) -> dict[str, Any]:
        from clientlib import Client

        client = Client(self.url, timeout=5.0)
        try:
            return client.broker_stats()
        finally:
            client.disconnect_all()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_all() -> None:
    for b in list(_live):
        b.cleanup()
