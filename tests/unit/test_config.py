"""broker/config.py and clientlib/address.py: parsing, validation, defaults."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymemcache.client.hash import HashClient

from broker import config
from broker.config import ConfigError, from_mapping, load
from clientlib import address
from clientlib.address import (
    ServerAddress,
    check_listen_url,
    default_bind_url,
    default_connect_url,
    parse_server,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "mcbroker.toml"


# --------------------------------------------------------------------------
# parse_server
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected, name",
    [
        ("127.0.0.1:11211", ServerAddress("127.0.0.1", 11211, None), "127.0.0.1:11211"),
        ("localhost", ServerAddress("localhost", 11211, None), "localhost:11211"),
        ("cache-1.example.com:11212", ServerAddress("cache-1.example.com", 11212, None), "cache-1.example.com:11212"),
        ("  mc_2:1  ", ServerAddress("mc_2", 1, None), "mc_2:1"),
        ("10.0.0.5:65535", ServerAddress("10.0.0.5", 65535, None), "10.0.0.5:65535"),
        ("[::1]:11300", ServerAddress("::1", 11300, None), "[::1]:11300"),
        ("[fe80::1]", ServerAddress("fe80::1", 11211, None), "[fe80::1]:11211"),
        ("unix:/run/memcached/mc.sock", ServerAddress(None, None, "/run/memcached/mc.sock"), "unix:/run/memcached/mc.sock"),
        ("/tmp/mc.sock", ServerAddress(None, None, "/tmp/mc.sock"), "unix:/tmp/mc.sock"),
    ],
)
def test_parse_server_forms(text: str, expected: ServerAddress, name: str) -> None:
    got = parse_server(text)
    assert got == expected
    assert got.name == name
    assert str(got) == name
    assert got.is_unix == (expected.path is not None)
    # The canonical name parses back to the same address.
    assert parse_server(got.name) == got


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:11211", "localhost", "h:12", "[::1]:11211", "[::1]", "unix:/tmp/x.sock", "/tmp/y.sock"],
)
def test_hash_key_matches_pymemcache(text: str) -> None:
    # pymemcache's HashClient keys its ring by these strings; any difference
    # would send keys to other servers than existing pymemcache clients do.
    assert list(HashClient([text]).clients) == [parse_server(text).hash_key]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("host:", "port must be a number"),
        ("host:abc", "port must be a number"),
        ("host:+1", "port must be a number"),
        ("host:1_0", "port must be a number"),
        ("host:0", "out of range"),
        ("host:65536", "out of range"),
        ("host:99999", "out of range"),
        ("::1:11211", "brackets"),
        ("[::1", "missing ']'"),
        ("[::1]x", "':<port>'"),
        ("[::1]:", "port must be a number"),
        ("[notv6]:11211", "not an IPv6 address"),
        ("unix:", "needs a socket path"),
        ("unix:relative.sock", "absolute"),
        ("/" + "a" * 200, "longer than"),
        ("ho st:11211", "not a valid host"),
        ("-host:11211", "not a valid host"),
        (":11211", "not a valid host"),
        ("256.1.1.1:11211", "not an IPv4 address"),
    ],
)
def test_parse_server_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_server(text)
    assert fragment in str(info.value)


def test_parse_server_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_server(11211)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# check_listen_url
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ipc:///run/mcbroker/mcbroker.sock",
        "ipc:///tmp/x.sock",
        "tcp://127.0.0.1:5555",
        "tcp://127.8.9.10:1",
        "tcp://localhost:65535",
        "tcp://LOCALHOST:6000",
        "tcp://[::1]:5555",
    ],
)
def test_check_listen_url_accepts(url: str) -> None:
    assert check_listen_url(url) == url


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("tcp://0.0.0.0:5555", "loopback"),
        ("tcp://10.1.2.3:5555", "loopback"),
        ("tcp://example.com:5555", "loopback"),
        ("tcp://*:5555", "loopback"),
        ("tcp://eth0:5555", "loopback"),
        ("tcp://[::]:5555", "loopback"),
        ("tcp://127.0.0.1", "tcp://<host>:<port>"),
        ("tcp://127.0.0.1:*", "port must be a number"),
        ("tcp://127.0.0.1:0", "out of range"),
        ("tcp://[::1]5555", "tcp://[<ipv6>]:<port>"),
        ("tcp://:5555", "tcp://<host>:<port>"),
        ("ipc://", "absolute"),
        ("ipc://relative.sock", "absolute"),
        ("ipc://@abstract", "absolute"),
        ("ipc:///" + "d" * 120, "longer than"),
        ("inproc://broker", "expected ipc://"),
        ("udp://127.0.0.1:5555", "expected ipc://"),
        ("/run/mcbroker/mcbroker.sock", "expected ipc://"),
        ("", "expected ipc://"),
    ],
)
def test_check_listen_url_rejects(url: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        check_listen_url(url)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------
# default broker addresses
# --------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No broker-related environment; system and tmp locations under tmp_path."""
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "MCBROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    # By default the "system" dir has no parent, so it is never chosen.
    monkeypatch.setattr(address, "SYSTEM_DIR", str(tmp_path / "no-run" / "mcbroker"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(address, "TMP_BASE", str(tmp_path / "tmp"))
    return tmp_path


def _mksock(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFSOCK | 0o600)


def test_bind_dir_runtime_directory_first_entry(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/mcbroker:/run/other")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    assert address.broker_bind_dir() == "/run/mcbroker"
    assert default_bind_url() == "ipc:///run/mcbroker/mcbroker.sock"


def test_bind_dir_system_dir_when_writable(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = clean_env / "run" / "mcbroker"
    system.mkdir(parents=True)
    monkeypatch.setattr(address, "SYSTEM_DIR", str(system))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    assert address.broker_bind_dir() == str(system)


def test_bind_dir_system_dir_when_parent_writable(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "run").mkdir()
    system = clean_env / "run" / "mcbroker"
    monkeypatch.setattr(address, "SYSTEM_DIR", str(system))
    assert address.broker_bind_dir() == str(system)
    assert not system.exists()  # creating it is the broker's job


def test_bind_dir_skips_unwritable_system_dir(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = clean_env / "run" / "mcbroker"
    system.mkdir(parents=True)
    monkeypatch.setattr(address, "SYSTEM_DIR", str(system))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    # Stands in for a non-root user facing root-owned /run (root passes any access check).
    real_access = os.access
    denied = {str(system), str(system.parent)}
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) in denied else real_access(p, mode))
    assert address.broker_bind_dir() == str(clean_env / "xdg" / "mcbroker")


def test_bind_dir_xdg_then_tmp(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    assert address.broker_bind_dir() == str(clean_env / "xdg" / "mcbroker")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert address.broker_bind_dir() == str(clean_env / "tmp" / f"mcbroker-{os.getuid()}")
    assert default_bind_url() == f"ipc://{clean_env}/tmp/mcbroker-{os.getuid()}/mcbroker.sock"


def test_bind_dir_empty_runtime_directory_is_unset(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    assert address.broker_bind_dir() == str(clean_env / "xdg" / "mcbroker")


def test_connect_url_env_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mksock(Path(address.SYSTEM_DIR) / "mcbroker.sock")
    monkeypatch.setenv("MCBROKER_URL", "tcp://127.0.0.1:7000")
    assert default_connect_url() == "tcp://127.0.0.1:7000"


def test_connect_url_prefers_system_socket(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = clean_env / "run" / "mcbroker"
    monkeypatch.setattr(address, "SYSTEM_DIR", str(system))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    _mksock(clean_env / "xdg" / "mcbroker" / "mcbroker.sock")
    _mksock(system / "mcbroker.sock")
    assert default_connect_url() == f"ipc://{system}/mcbroker.sock"


def test_connect_url_finds_xdg_then_tmp_socket(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    tmp_sock = clean_env / "tmp" / f"mcbroker-{os.getuid()}" / "mcbroker.sock"
    _mksock(tmp_sock)
    assert default_connect_url() == f"ipc://{tmp_sock}"
    xdg_sock = clean_env / "xdg" / "mcbroker" / "mcbroker.sock"
    _mksock(xdg_sock)
    assert default_connect_url() == f"ipc://{xdg_sock}"


def test_connect_url_ignores_non_socket_files(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = clean_env / "run" / "mcbroker"
    system.mkdir(parents=True)
    (system / "mcbroker.sock").write_text("not a socket")
    monkeypatch.setattr(address, "SYSTEM_DIR", str(system))
    tmp_sock = clean_env / "tmp" / f"mcbroker-{os.getuid()}" / "mcbroker.sock"
    _mksock(tmp_sock)
    assert default_connect_url() == f"ipc://{tmp_sock}"


def test_connect_url_falls_back_to_bind_url(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCBROKER_URL", "")  # empty counts as unset
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    assert default_connect_url() == default_bind_url() == f"ipc://{clean_env}/xdg/mcbroker/mcbroker.sock"


# --------------------------------------------------------------------------
# config: defaults and the shipped file
# --------------------------------------------------------------------------


def test_shipped_config_equals_builtin_defaults() -> None:
    assert load(str(SHIPPED)) == load(None)


def test_shipped_config_spells_out_every_key() -> None:
    import tomllib

    with open(SHIPPED, "rb") as f:
        data = tomllib.load(f)
    assert set(data) == set(config.DEFAULTS)
    assert data == dict(config.DEFAULTS)


def test_defaults_cover_every_field() -> None:
    assert [f.name for f in dataclasses.fields(config.Config)] == list(config.DEFAULTS)


def test_builtin_default_values() -> None:
    c = load(None)
    assert c.listen == ()
    assert c.servers == (config.ServerConfig(ServerAddress("127.0.0.1", 11211, None), 1),)
    assert c.hash == "rendezvous"
    assert c.on_server_down == "fail"
    assert c.connections_per_server == 2
    assert c.max_frame_bytes == 4194304
    assert c.log_level == "info"


def test_config_is_frozen() -> None:
    c = load(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.timeout_ms = 5  # type: ignore[misc]


def test_listen_urls_default_and_explicit(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(clean_env / "xdg"))
    assert load(None).listen_urls() == (f"ipc://{clean_env}/xdg/mcbroker/mcbroker.sock",)
    urls = ["ipc:///tmp/a.sock", "tcp://127.0.0.1:5555"]
    assert from_mapping({"listen": urls}).listen_urls() == tuple(urls)


def test_partial_file_keeps_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('servers = ["a:1", { address = "b:2", weight = 3 }]\nhash = "ketama"\n')
    c = load(str(p))
    assert [s.address.name for s in c.servers] == ["a:1", "b:2"]
    assert [s.weight for s in c.servers] == [1, 3]
    assert c.hash == "ketama"
    assert c.timeout_ms == config.DEFAULTS["timeout_ms"]


def test_as_mapping_round_trips() -> None:
    c = from_mapping(
        {
            "listen": ["ipc:///tmp/m.sock"],
            "servers": ["[::1]:1", "unix:/tmp/mc.sock", {"address": "h", "weight": 7}],
            "hash": "Ketama",
            "on_server_down": "REMAP",
            "log_level": "DEBUG",
        }
    )
    assert (c.hash, c.on_server_down, c.log_level) == ("ketama", "remap", "debug")
    assert from_mapping(c.as_mapping()) == c


# --------------------------------------------------------------------------
# config: errors name the key
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping, key, fragment",
    [
        ({"timeout_ms": 0}, "timeout_ms", "out of range"),
        ({"timeout_ms": -5}, "timeout_ms", "out of range"),
        ({"timeout_ms": 1.5}, "timeout_ms", "must be an integer"),
        ({"timeout_ms": "1000"}, "timeout_ms", "must be an integer"),
        ({"timeout_ms": True}, "timeout_ms", "must be an integer"),
        ({"timeout_ms": None}, "timeout_ms", "must be an integer"),
        ({"connect_timeout_ms": 10**9}, "connect_timeout_ms", "out of range"),
        ({"io_timeout_ms": 0}, "io_timeout_ms", "out of range"),
        ({"connections_per_server": 0}, "connections_per_server", "out of range 1..8"),
        ({"connections_per_server": 9}, "connections_per_server", "out of range 1..8"),
        ({"failure_limit": 0}, "failure_limit", "out of range"),
        ({"probe_interval_ms": 0}, "probe_interval_ms", "out of range"),
        ({"max_batch_per_turn": 0}, "max_batch_per_turn", "out of range"),
        ({"max_value_bytes": -1}, "max_value_bytes", "out of range"),
        ({"max_frame_bytes": 1 << 31}, "max_frame_bytes", "out of range"),
        ({"max_buffered_bytes": 10}, "max_buffered_bytes", "out of range"),
        ({"hash": "md5"}, "hash", "not one of rendezvous, ketama"),
        ({"hash": 1}, "hash", "must be a string"),
        ({"on_server_down": "retry"}, "on_server_down", "not one of fail, remap"),
        ({"log_level": "verbose"}, "log_level", "not one of"),
        ({"listen": "ipc:///tmp/a.sock"}, "listen", "must be a list"),
        ({"listen": [5]}, "listen[0]", "must be a string"),
        ({"listen": ["tcp://0.0.0.0:5555"]}, "listen[0]", "loopback"),
        ({"listen": ["ipc:///tmp/a.sock", "ipc:///tmp/a.sock"]}, "listen[1]", "listed twice"),
        ({"servers": []}, "servers", "at least one server"),
        ({"servers": "127.0.0.1:11211"}, "servers", "must be a list"),
        ({"servers": ["a:1", "b:99999"]}, "servers[1]", "out of range"),
        ({"servers": ["a:1", 7]}, "servers[1]", "must be a string"),
        ({"servers": ["a:1", "a:1"]}, "servers[1]", "duplicates servers[0]"),
        ({"servers": ["LocalHost", "localhost:11211"]}, "servers[1]", "duplicates servers[0]"),
        ({"servers": ["/tmp/mc.sock", "unix:/tmp/mc.sock"]}, "servers[1]", "duplicates servers[0]"),
        ({"servers": [{"weight": 2}]}, "servers[0].address", "is required"),
        ({"servers": [{"address": 5}]}, "servers[0].address", "must be a string"),
        ({"servers": [{"address": "a:1", "port": 2}]}, "servers[0].port", "unknown key"),
        ({"servers": [{"address": "a:1", "weight": 0}], "hash": "ketama"}, "servers[0].weight", "out of range"),
        ({"servers": [{"address": "a:1", "weight": "2"}], "hash": "ketama"}, "servers[0].weight", "must be an integer"),
        ({"servers": [{"address": "a:1", "weight": 2}]}, "servers[0].weight", "ketama"),
        ({"probe_interval_ms": 5000, "probe_max_interval_ms": 1000}, "probe_interval_ms", "exceeds"),
        ({"max_value_bytes": 4194304}, "max_value_bytes", "must fit in max_frame_bytes"),
        ({"max_inflight_per_connection": 200000}, "max_inflight_per_connection", "exceeds"),
        ({"max_inflight_per_server": 300000}, "max_inflight_per_server", "exceeds"),
        ({"max_buffered_bytes": 1 << 20}, "max_buffered_bytes", "less than max_frame_bytes"),
    ],
)
def test_bad_values_name_the_key(mapping: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(mapping)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_rejected_with_hint() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"timeout": 5})
    assert info.value.key == "timeout"
    assert "unknown key" in str(info.value)
    assert "'timeout_ms'" in str(info.value)


def test_unknown_key_in_file_names_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("log_levle = 'debug'\n")
    with pytest.raises(ConfigError) as info:
        load(str(p))
    assert info.value.key == "log_levle"
    assert info.value.source == str(p)
    assert str(p) in str(info.value)


def test_non_string_and_non_mapping_rejected() -> None:
    with pytest.raises(ConfigError, match="keys must be strings"):
        from_mapping({1: 2})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="must be a table"):
        from_mapping([("hash", "ketama")])  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert info.value.key is None
    assert missing in str(info.value)
    assert "cannot read" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("servers = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(p))


# --------------------------------------------------------------------------
# config: overrides
# --------------------------------------------------------------------------


def test_overrides_win_over_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('servers = ["a:1", "b:2"]\nhash = "rendezvous"\ntimeout_ms = 50\n')
    c = load(str(p), {"servers": ["c:3"], "hash": "ketama", "listen": ["tcp://127.0.0.1:6000"]})
    assert [s.address.name for s in c.servers] == ["c:3"]
    assert c.hash == "ketama"
    assert c.listen == ("tcp://127.0.0.1:6000",)
    assert c.timeout_ms == 50  # not overridden: the file's value stays


def test_overrides_without_file() -> None:
    assert load(None, {"log_level": "error"}).log_level == "error"


def test_none_override_means_not_given(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('hash = "ketama"\n')
    assert load(str(p), {"hash": None, "servers": None}).hash == "ketama"


def test_bad_override_blames_command_line(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("timeout_ms = 50\n")
    with pytest.raises(ConfigError) as info:
        load(str(p), {"servers": ["a:1", "a:1"]})
    assert info.value.key == "servers[1]"
    assert info.value.source == "command line"
    with pytest.raises(ConfigError) as info:
        load(str(p), {"nonsense": 1})
    assert info.value.source == "command line"


def test_override_replaces_invalid_file_value(tmp_path: Path) -> None:
    # Overrides apply before validation, so a flag can rescue a bad file value.
    p = tmp_path / "c.toml"
    p.write_text('hash = "md5"\n')
    assert load(str(p), {"hash": "ketama"}).hash == "ketama"


# --------------------------------------------------------------------------
# config: property
# --------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=300_000),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "rendezvous", "ketama", "fail", "remap", "info", "DEBUG",
            "127.0.0.1:11211", "[::1]:1", "unix:/tmp/s", "/tmp/s", "localhost",
            "ipc:///tmp/b.sock", "tcp://127.0.0.1:5555", "tcp://0.0.0.0:1", "h:0",
        ]
    ),
)
_server_tables = st.dictionaries(
    st.sampled_from(["address", "weight", "port"]) | st.text(max_size=5), _scalars, max_size=3
)
_values = st.one_of(
    _scalars,
    st.lists(st.one_of(_scalars, _server_tables), max_size=4),
    st.tuples(_scalars),
    _server_tables,
)
# Real keys plus a few typos: random text would only ever hit the unknown-key path.
_keys = st.sampled_from([*config.DEFAULTS, "timeout", "Hash", "server", "listen_urls", ""])


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=8))
def test_from_mapping_returns_config_or_config_error(d: dict[str, object]) -> None:
    _check_outcome(d)


def _near_range(low: int, high: int) -> st.SearchStrategy[int]:
    # Values at and just past both ends, plus anywhere inside.
    return st.one_of(
        st.integers(min_value=low, max_value=high),
        st.sampled_from([low - 1, low, high, high + 1]),
    )


def _mostly(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    # one_of would flatten _scalars' many branches and drown the valid values.
    return st.integers(0, 9).flatmap(lambda n: _scalars if n == 0 else valid)


def _plausible(key: str) -> st.SearchStrategy[object]:
    if key in config.INT_RANGES:
        low, high = config.INT_RANGES[key]
        default = config.DEFAULTS[key]
        assert isinstance(default, int)
        return _mostly(st.just(default) | _near_range(low, high))
    if key == "hash":
        return _mostly(st.sampled_from(["rendezvous", "ketama", "Ketama"]))
    if key == "on_server_down":
        return _mostly(st.sampled_from(["fail", "remap"]))
    if key == "log_level":
        return _mostly(st.sampled_from(["debug", "INFO", "Warning", "critical", "trace"]))
    if key == "coalesce_reads":
        return _mostly(st.sampled_from([True, False, 1, "yes"]))
    if key == "listen":
        urls = st.sampled_from(
            ["ipc:///tmp/a.sock", "ipc:///tmp/b.sock", "tcp://127.0.0.1:5555", "tcp://[::1]:1", "tcp://0.0.0.0:5556"]
        )
        return _mostly(st.lists(_mostly(urls), max_size=3))
    if key == "curve_secret_key_file":
        return _mostly(st.sampled_from(["", "/etc/mcbroker/curve/server.key_secret", "server.key_secret"]))
    if key == "curve_allowed_clients":
        return _mostly(st.sampled_from(["", "/etc/mcbroker/curve/clients", "clients"]))
    if key == "socket_mode":
        return _mostly(st.sampled_from(["0660", "0600", "660", "0640", "0666", "0777", "0460", "066x", 0o660, 0o600, 432, -1]))
    if key == "socket_group":
        return _mostly(st.sampled_from(["", "www-data", "mcbroker", "33", "bad group", "-x"]))
    if key == "metrics_listen":
        return _mostly(st.sampled_from(["", "127.0.0.1:9150", "[::1]:9150", "9150", "host:0", "h:99999"]))
    assert key == "servers"
    addrs = st.sampled_from(["a:1", "b", "[::1]:2", "unix:/tmp/m.sock", "/tmp/n.sock", "c:11211", "c"])
    tables = st.fixed_dictionaries({"address": addrs}, optional={"weight": _mostly(_near_range(1, config.MAX_WEIGHT))})
    return _mostly(st.lists(_mostly(addrs | tables), max_size=4))


_plausible_configs = st.fixed_dictionaries({}, optional={k: _plausible(k) for k in config.DEFAULTS})


@settings(max_examples=1000, deadline=None)
@given(_plausible_configs)
def test_from_mapping_plausible_values(d: dict[str, object]) -> None:
    _check_outcome(d)


def _check_outcome(d: dict[str, object]) -> None:
    # check-config's list of every problem is empty exactly when the config loads, and names
    # the key from_mapping stops at.
    found = config.problems(d)
    try:
        c = from_mapping(d)
    except ConfigError as e:
        assert e.problem
        assert str(e).startswith(f"{e.key}: " if e.key is not None else e.problem)
        assert found and all(p.problem for p in found)
        assert e.key in [p.key for p in found]
    else:
        assert found == []
        assert isinstance(c, config.Config)
        assert c.servers
        # What was accepted obeys the documented relations.
        assert c.max_inflight_per_connection <= c.max_inflight_per_server <= c.max_inflight_total
        assert c.probe_interval_ms <= c.probe_max_interval_ms
        assert c.max_value_bytes < c.max_frame_bytes <= c.max_buffered_bytes
        for name, (low, high) in config.INT_RANGES.items():
            value = getattr(c, name)
            assert type(value) is int and low <= value <= high
        assert type(c.coalesce_reads) is bool
        assert from_mapping(c.as_mapping()) == c


def test_coalesce_reads_is_on_by_default_and_takes_only_booleans() -> None:
    assert from_mapping({}).coalesce_reads is True
    assert from_mapping({"coalesce_reads": False}).coalesce_reads is False
    for wrong in (1, 0, "yes", "false"):
        with pytest.raises(ConfigError, match="coalesce_reads: must be true or false"):
            from_mapping({"coalesce_reads": wrong})


# --------------------------------------------------------------------------
# issue 11: socket access, drain, metrics keys; check-config lists every error
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value, mode", [("0660", 0o660), ("660", 0o660), (0o640, 0o640), ("0600", 0o600)])
def test_socket_mode_accepts_octal_strings_and_integers(value: object, mode: int) -> None:
    assert from_mapping({"socket_mode": value}).socket_mode == mode


@pytest.mark.parametrize(
    "value, words",
    [
        ("0666", "every local user"),  # no authentication: never world-accessible
        ("0460", "broker's own user"),
        ("0x660", "octal"),
        (True, "octal mode string"),
        (0o1660, "not a file mode"),
    ],
)
def test_socket_mode_rejects(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping({"socket_mode": value})
    assert e.value.key == "socket_mode" and words in e.value.problem


def test_default_socket_mode_is_0660_and_group_empty() -> None:
    c = load(None)
    assert c.socket_mode == 0o660 and c.socket_group == "" and c.drain_timeout_ms == 10000 and c.metrics_listen == ""


@pytest.mark.parametrize("value", ["127.0.0.1", "9150", ":9150", "h:0", "h:70000", 9150])
def test_metrics_listen_must_be_host_port(value: object) -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping({"metrics_listen": value})
    assert e.value.key == "metrics_listen"


def test_problems_reports_every_bad_key_once() -> None:
    found = config.problems(
        {"timeout_ms": "1s", "hash": "md5", "servers": ["a:b"], "socket_mode": "0777", "bogus": 1, "drain_timeout_ms": -1}
    )
    keys = sorted(str(p.key) for p in found)
    assert keys == ["bogus", "drain_timeout_ms", "hash", "servers[0]", "socket_mode", "timeout_ms"]


def test_problems_checks_relations_once_keys_are_valid() -> None:
    found = config.problems({"probe_interval_ms": 5000, "probe_max_interval_ms": 100})
    assert [p.key for p in found] == ["probe_interval_ms"]
