"""TCP listening and CURVE (issue 13): TCP only when configured; a non-loopback TCP address without
CURVE is refused before anything is bound; with CURVE, only the listed client keys get in; clientlib
takes its key pair from its arguments or the environment; a second broker cannot take over a live
TCP endpoint. The machine has loopback only: CURVE runs on 127.0.0.1, the refusal uses 0.0.0.0.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.auth

from brokerproc import BrokerProcess
from clientlib import Client
from clientlib.errors import BrokerTimeout
from harness import free_port
from timing import LATE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# A refused client's call times out after this: long enough that its handshake surely reaches the
# broker (and is refused) before the call gives up, on a machine that may stall for LATE.
REFUSED_WAIT = 2 * LATE


def _mcbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=30)


def _keys(path: Path) -> tuple[str, str]:
    public, secret = zmq.auth.load_certificate(path)
    assert secret is not None
    return public.decode(), secret.decode()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Keys made with `mcbroker curve-keygen`: the broker's, a known client's, an unknown client's;
    only the known client's public key is in the allowed directory."""
    made = {}
    for name in ("server", "known", "stranger"):
        r = _mcbroker("curve-keygen", str(tmp_path / "keys"), name)
        assert r.returncode == 0, r.stderr
        assert "public key:" in r.stdout and "MCBROKER_CURVE_SECRETKEY=" in r.stdout
        made[name] = tmp_path / "keys" / f"{name}.key_secret"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "known.key").write_bytes((tmp_path / "keys" / "known.key").read_bytes())
    made["allowed"] = allowed
    return made


@pytest.fixture
def curve_broker(memcached, keys) -> Iterator[tuple[BrokerProcess, str]]:
    """A broker on its ipc socket (no CURVE: the file system guards it) and on 127.0.0.1 with CURVE."""
    b = BrokerProcess(
        [memcached.address], curve_secret_key_file=str(keys["server"]), curve_allowed_clients=str(keys["allowed"]),
    )
    tcp = f"tcp://127.0.0.1:{free_port()}"
    b.write_config(listen=[b.url, tcp])
    try:
        b.start()
        yield b, tcp
    finally:
        b.cleanup()


def _client(url: str, keys: dict[str, Path], who: str, timeout: float = 5.0) -> Client:
    server_public, _ = _keys(keys["server"])
    public, secret = _keys(keys[who])
    return Client(url, timeout=timeout, curve_secretkey=secret, curve_publickey=public, curve_serverkey=server_public)


def test_known_client_key_is_served_over_curve(curve_broker, keys):
    b, tcp = curve_broker
    c = _client(tcp, keys, "known")
    try:
        assert c.set("curve", b"secret value") is True
        assert c.get("curve") == b"secret value"
    finally:
        c.disconnect_all()
    assert b.stats()["curve_accepted"] >= 1


def test_unknown_client_key_is_refused_and_the_broker_goes_on(curve_broker, keys):
    b, tcp = curve_broker
    stranger = _client(tcp, keys, "stranger", timeout=REFUSED_WAIT)
    try:
        with pytest.raises(BrokerTimeout, match="curve_allowed_clients"):
            stranger.get("curve")
    finally:
        stranger.disconnect_all()
    # Counted when the broker reads the handshake, which a loaded machine may delay past the call.
    deadline = time.monotonic() + 10
    while b.stats()["curve_refused"] < 1:
        assert time.monotonic() < deadline, "the stranger's handshake was never refused"
        time.sleep(0.05)
    assert "is not in curve_allowed_clients" in b.log()
    # The refusal costs nobody else anything: the known key is served right after.
    known = _client(tcp, keys, "known")
    try:
        assert known.set("after", b"1") is True and known.get("after") == b"1"
    finally:
        known.disconnect_all()


def test_client_without_keys_is_refused_on_the_curve_listener(curve_broker, keys):
    b, tcp = curve_broker
    plain = Client(tcp, timeout=REFUSED_WAIT)
    try:
        with pytest.raises(BrokerTimeout):
            plain.get("x")
    finally:
        plain.disconnect_all()
    # ipc is not under CURVE: local workers need no keys.
    local = Client(b.url, timeout=2.0)
    try:
        assert local.broker_ping() == "PONG"
    finally:
        local.disconnect_all()


def test_client_takes_its_keys_from_the_environment(curve_broker, keys, monkeypatch):
    _, tcp = curve_broker
    server_public, _ = _keys(keys["server"])
    public, secret = _keys(keys["known"])
    monkeypatch.setenv("MCBROKER_CURVE_SECRETKEY", secret)
    monkeypatch.setenv("MCBROKER_CURVE_PUBLICKEY", public)
    monkeypatch.setenv("MCBROKER_CURVE_SERVERKEY", server_public)
    c = Client(tcp, timeout=2.0)
    try:
        assert c.set("env", b"ok") is True and c.get("env") == b"ok"
    finally:
        c.disconnect_all()


def test_reload_rereads_the_allowed_client_keys(curve_broker, keys):
    b, tcp = curve_broker
    allowed: Path = keys["allowed"]
    (allowed / "stranger.key").write_bytes((keys["stranger"].parent / "stranger.key").read_bytes())
    b.reload()
    c = _client(tcp, keys, "stranger", timeout=3.0)
    try:
        assert c.set("welcome", b"now") is True
    finally:
        c.disconnect_all()


def test_non_loopback_tcp_without_curve_refuses_to_start_before_binding(memcached):
    port = free_port()
    r = _mcbroker("serve", "--listen", f"tcp://0.0.0.0:{port}", "--server", memcached.address)
    assert r.returncode == 2
    assert "needs CURVE" in r.stderr and "curve_secret_key_file" in r.stderr
    # Nothing was bound: the port is still free.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("0.0.0.0", port))


def test_check_config_names_the_non_loopback_rule(tmp_path):
    cfg = tmp_path / "remote.toml"
    cfg.write_text(f'listen = ["tcp://0.0.0.0:{free_port()}"]\n')
    r = _mcbroker("check-config", "--config", str(cfg))
    assert r.returncode == 1 and "listen[0]" in r.stderr and "needs CURVE" in r.stderr


def test_non_loopback_tcp_with_curve_passes_the_config_check(tmp_path, keys):
    cfg = tmp_path / "remote.toml"
    cfg.write_text(
        f'listen = ["tcp://0.0.0.0:{free_port()}"]\n'
        f'curve_secret_key_file = "{keys["server"]}"\ncurve_allowed_clients = "{keys["allowed"]}"\n'
    )
    r = _mcbroker("check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr


def test_curve_needs_both_keys(tmp_path, keys):
    cfg = tmp_path / "half.toml"
    cfg.write_text(f'curve_secret_key_file = "{keys["server"]}"\n')
    r = _mcbroker("check-config", "--config", str(cfg))
    assert r.returncode == 1 and "curve_allowed_clients" in r.stderr  # check-config: 1 for errors
    r = _mcbroker("serve", "--config", str(cfg))
    assert r.returncode == 2 and "curve_allowed_clients" in r.stderr  # serve: 2 for a bad config


def test_a_public_key_file_is_not_a_secret_key(tmp_path, memcached, keys):
    public_only = keys["server"].parent / "server.key"
    cfg = tmp_path / "wrong.toml"
    cfg.write_text(
        f'listen = ["tcp://127.0.0.1:{free_port()}"]\nservers = ["{memcached.address}"]\n'
        f'curve_secret_key_file = "{public_only}"\ncurve_allowed_clients = "{keys["allowed"]}"\n'
    )
    r = _mcbroker("serve", "--config", str(cfg))
    assert r.returncode == 1 and "holds no secret key" in r.stderr


def test_second_broker_cannot_take_over_a_live_tcp_endpoint(memcached, broker_factory):
    tcp = f"tcp://127.0.0.1:{free_port()}"
    first = BrokerProcess([memcached.address])
    first.write_config(listen=[first.url, tcp])
    try:
        first.start()
        r = _mcbroker("serve", "--listen", tcp, "--server", memcached.address)
        assert r.returncode == 1 and "already listening" in r.stderr and tcp in r.stderr
        # With an ipc address bound before the taken port: refused too, promptly, and the ipc
        # path it had bound is removed again.
        other_ipc = first.dir / "second.sock"
        r = _mcbroker("serve", "--listen", f"ipc://{other_ipc}", "--listen", tcp, "--server", memcached.address)
        assert r.returncode == 1 and "already listening" in r.stderr and tcp in r.stderr
        assert not other_ipc.exists()
        c = Client(tcp, timeout=2.0)
        try:
            assert c.broker_ping() == "PONG" and c.broker_stats()["pid"] == first.pid
        finally:
            c.disconnect_all()
    finally:
        first.cleanup()


def test_async_client_with_a_known_key_is_served(curve_broker, keys):
    import asyncio

    from clientlib import AsyncClient

    _, tcp = curve_broker
    server_public, _ = _keys(keys["server"])
    public, secret = _keys(keys["known"])

    async def run() -> list[object]:
        c = AsyncClient(tcp, timeout=2.0, curve_secretkey=secret, curve_publickey=public, curve_serverkey=server_public)
        try:
            assert await c.set("async-curve", b"v") is True
            return list(await asyncio.gather(*[c.get("async-curve") for _ in range(50)]))
        finally:
            await c.disconnect_all()

    assert asyncio.run(run()) == [b"v"] * 50
