import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _mcbroker(*args, **kw):
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=30, **kw)


def test_ping_and_stats_against_a_running_broker(broker):
    r = _mcbroker("ping", "--broker", broker.url)
    assert r.returncode == 0 and r.stdout.strip() == "PONG"
    r = _mcbroker("stats", "--json", "--broker", broker.url)
    assert r.returncode == 0
    stats = json.loads(r.stdout)
    assert stats["pid"] == broker.pid and len(stats["servers"]) == 1


def test_ping_without_a_broker_fails_clearly(tmp_path):
    r = _mcbroker("ping", "--broker", f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.3")
    assert r.returncode == 1
    assert "BrokerUnavailable" in r.stderr or "BrokerTimeout" in r.stderr


def test_check_config_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('servers = ["127.0.0.1:99999"]\n')
    r = _mcbroker("check-config", "--config", str(bad))
    assert r.returncode == 1 and "servers" in r.stderr


def test_serve_refuses_an_ipc_path_another_broker_holds(broker):
    r = _mcbroker("serve", "--listen", broker.url, "--server", "127.0.0.1:11211")
    assert r.returncode == 1 and "already listening" in r.stderr
    assert _mcbroker("ping", "--broker", broker.url).stdout.strip() == "PONG"


def test_flags_override_the_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('servers = ["127.0.0.1:11211"]\nhash = "rendezvous"\n')
    r = _mcbroker("check-config", "--config", str(cfg), "--server", "unix:/tmp/x.sock", "--hash", "ketama",
                  "--listen", f"ipc://{tmp_path}/b.sock")
    assert r.returncode == 0, r.stderr
    assert "unix:/tmp/x.sock" in r.stdout and "ketama" in r.stdout and f"ipc://{tmp_path}/b.sock" in r.stdout


@pytest.mark.parametrize("how", ["--connect", "--broker", "MCBROKER_URL"])
@pytest.mark.parametrize("command", ["ping", "stats", "top"])
def test_a_memcached_address_is_a_one_line_error(how, command):
    import os

    bad = "127.0.0.1:11211"
    if how == "MCBROKER_URL":
        r = _mcbroker(command, env={**os.environ, "MCBROKER_URL": bad})
    else:
        r = _mcbroker(command, how, bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert bad in r.stderr and "ipc:///" in r.stderr and "tcp://127.0.0.1:PORT" in r.stderr


def test_check_config_positional_lists_every_error_with_key_and_reason(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('servers = ["127.0.0.1:99999"]\ntimeout_ms = "1s"\nsocket_mode = "0666"\nlisten_on = []\n')
    for args in (["check-config", str(bad)], ["check-config", "--config", str(bad)]):
        r = _mcbroker(*args)
        assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("invalid:")]
        assert len(lines) == 4, r.stderr
        for key, reason in (("servers[0]", "out of range"), ("timeout_ms", "must be an integer"),
                            ("socket_mode", "every local user"), ("listen_on", "unknown key")):
            assert any(f"{bad}: {key}: " in line and reason in line for line in lines), (key, r.stderr)
        assert "4 errors" in r.stderr


def test_check_config_shipped_file_positional():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "etc" / "mcbroker.toml"
    r = _mcbroker("check-config", str(shipped))
    assert r.returncode == 0 and "socket_mode 0660" in r.stdout, r.stderr


def test_check_config_missing_file_is_one_clear_line(tmp_path):
    r = _mcbroker("check-config", str(tmp_path / "nope.toml"))
    assert r.returncode == 1 and "cannot read config file" in r.stderr and "Traceback" not in r.stderr


def test_version():
    r = _mcbroker("--version")
    assert r.returncode == 0 and r.stdout.startswith("mcbroker ") and r.stdout.split()[1][0].isdigit()


def test_serve_with_a_bad_config_names_key_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('socket_group = "no such group"\n')
    r = _mcbroker("serve", "--config", str(bad))
    assert r.returncode == 2 and "socket_group" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_an_unknown_socket_group_is_a_clear_start_error(tmp_path, mc):
    r = _mcbroker("serve", "--listen", f"ipc://{tmp_path}/b.sock", "--server", mc.address, "--config", str(_cfg(tmp_path, 'socket_group = "mcbroker-no-such-group"')))
    assert r.returncode == 1 and "mcbroker-no-such-group" in r.stderr and "no such group" in r.stderr, r.stderr


def _cfg(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text + "\n")
    return p
