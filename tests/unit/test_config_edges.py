"""broker/config.py at its edges (holes that mutation testing found): inclusive bounds and
relations at equality, the messages' types, check-config's sources and group lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import config
from broker.config import ConfigError, from_mapping, load

pytestmark = pytest.mark.unit


def error_of(d: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_mapping(d)
    return info.value


def test_a_problem_with_the_whole_file_has_no_key_prefix() -> None:
    assert str(ConfigError(None, "config must be a table")) == "config must be a table"
    assert str(ConfigError("timeout_ms", "too big")) == "timeout_ms: too big"
    assert str(ConfigError(None, "not valid TOML", source="/etc/x.toml")) == "/etc/x.toml: not valid TOML"


def test_as_mapping_writes_weighted_servers_as_tables() -> None:
    c = from_mapping({"hash": "ketama", "servers": ["a:1", {"address": "b:1", "weight": 2}]})
    assert c.as_mapping()["servers"] == ["a:1", {"address": "b:1", "weight": 2}]
    assert from_mapping(c.as_mapping()) == c


# Ranges are inclusive (config.py: "Inclusive ranges"); these ends are the documented ones.
@pytest.mark.parametrize(
    "key, low, high",
    [("timeout_ms", 1, 600_000), ("connections_per_server", 1, 8), ("failure_limit", 1, 1000), ("drain_timeout_ms", 0, 3_600_000)],
)
def test_integer_ranges_include_both_ends(key: str, low: int, high: int) -> None:
    assert getattr(from_mapping({key: low}), key) == low
    assert getattr(from_mapping({key: high}), key) == high
    for bad in (low - 1, high + 1):
        e = error_of({key: bad})
        assert (e.key, e.problem) == (key, f"{bad} is out of range {low}..{high}")


def test_type_errors_name_the_type_given() -> None:
    assert "must be an integer, got str '5'" in error_of({"timeout_ms": "5"}).problem
    assert "must be true or false, got int 1" in error_of({"coalesce_reads": 1}).problem
    assert "got float" in error_of({"socket_mode": 6.6}).problem
    e = error_of({"socket_group": 5})
    assert e.key == "socket_group" and "got int" in e.problem
    e = error_of({"socket_group": "bad group!"})
    assert e.key == "socket_group" and "'bad group!' is not a group name" in e.problem
    assert "got list" in error_of({"metrics_listen": ["127.0.0.1:9150"]}).problem
    assert error_of({"listen": ["ipc:///tmp/b.sock", 5]}).problem == "must be a string, got int"
    assert error_of({"servers": "a:1"}).problem == "must be a list, got str"
    assert error_of({"servers": [{"address": 5}]}).problem == "must be a string, got int"
    assert error_of({"servers": ["a:1", None]}).problem == "must be a string, got NoneType"
    assert error_of({"servers": [{"address": "a:1", "weight": 2.5}], "hash": "ketama"}).problem == "must be an integer, got float"
    assert "got int" in error_of({"hash": 5}).problem


def test_socket_modes_outside_the_rule_say_why() -> None:
    assert "0000 denies the broker's own user read and write" in error_of({"socket_mode": "0000"}).problem
    assert "0777 lets every local user use the broker" in error_of({"socket_mode": "0777"}).problem
    assert "1000 is not a file mode" in error_of({"socket_mode": 0o1000}).problem
    assert "-1 is not a file mode" in error_of({"socket_mode": -1}).problem


@pytest.mark.parametrize("value", ["127.0.0.1:9150", "localhost:1", "[::1]:65535", "0.0.0.0:9150"])
def test_metrics_listen_takes_host_port_with_ports_1_to_65535(value: str) -> None:
    assert from_mapping({"metrics_listen": value}).metrics_listen == value


@pytest.mark.parametrize("value", ["127.0.0.1:0", "127.0.0.1:65536", "[::1]", "127.0.0.1:"])
def test_metrics_listen_refuses_ports_outside_1_to_65535(value: str) -> None:
    assert error_of({"metrics_listen": value}).key == "metrics_listen"


def test_relations_allow_equality() -> None:
    c = from_mapping({
        "probe_interval_ms": 500, "probe_max_interval_ms": 500,
        "max_frame_bytes": 1 << 20, "max_value_bytes": (1 << 20) - 4096, "max_buffered_bytes": 1 << 20,
        "max_inflight_per_connection": 1000, "max_inflight_per_server": 1000, "max_inflight_total": 1000,
    })
    assert (c.probe_interval_ms, c.max_value_bytes, c.max_inflight_total) == (500, (1 << 20) - 4096, 1000)
    assert error_of({"probe_interval_ms": 501, "probe_max_interval_ms": 500}).key == "probe_interval_ms"
    e = error_of({"max_frame_bytes": 1 << 20, "max_value_bytes": (1 << 20) - 4095, "max_buffered_bytes": 1 << 20})
    assert e.key == "max_value_bytes"
    e = error_of({"max_inflight_per_connection": 1001, "max_inflight_per_server": 1000, "max_inflight_total": 1000})
    assert e.key == "max_inflight_per_connection"
    assert error_of({"max_inflight_per_server": 1001, "max_inflight_total": 1000, "max_inflight_per_connection": 10}).key == "max_inflight_per_server"
    assert error_of({"max_buffered_bytes": (1 << 20) - 1, "max_frame_bytes": 1 << 20}).key == "max_buffered_bytes"


def test_problems_of_something_that_is_not_a_table() -> None:
    (e,) = config.problems([1, 2])  # type: ignore[arg-type]
    assert (e.key, e.problem) == (None, "config must be a table, got list")


def test_problems_with_a_bad_hash_still_check_weighted_servers_only_for_syntax() -> None:
    found = config.problems({"hash": "md5", "servers": [{"address": "a:1", "weight": 2}, "b:1"]})
    assert [e.key for e in found] == ["hash"]
    found = config.problems({"hash": "ketama", "servers": [{"address": "a:1", "weight": 2}, "a:b:c"]})
    assert [e.key for e in found] == ["servers[1]"]


def test_problems_name_both_bad_entries_of_a_two_entry_list() -> None:
    found = config.problems({"servers": ["a:b:c", "127.0.0.1:99999"]})
    assert [e.key for e in found] == ["servers[0]", "servers[1]"]


# --- check_file and load: sources and the group lookup -----------------------------------------


def test_check_file_without_a_file_checks_the_overrides_alone() -> None:
    assert config.check_file(None) == []
    assert config.check_file(None, {"timeout_ms": None}) == []  # None: the flag was not given
    (e,) = config.check_file(None, {"timeout_ms": 0})
    assert (e.key, e.source) == ("timeout_ms", "command line")


def test_check_file_names_the_file_or_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('timeout_ms = 0\nservers = ["a:b:c"]\n')
    found = config.check_file(str(path), {"failure_limit": 0, "log_level": None})
    by_key = {e.key: e.source for e in found}
    assert by_key == {"timeout_ms": str(path), "servers[0]": str(path), "failure_limit": "command line"}
    (e,) = config.check_file(str(path), {"timeout_ms": 5, "servers": ["a:b:c"]})
    assert (e.key, e.source) == ("servers[0]", "command line")
    assert str(e).startswith("command line: servers[0]: ")


@pytest.mark.parametrize("group", ["", "4242424", "root"])
def test_check_file_looks_up_only_group_names(tmp_path: Path, group: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'socket_group = "{group}"\n')
    assert config.check_file(str(path)) == []


@pytest.mark.parametrize("value", ['"bad group!"', "5"])
def test_check_file_reports_a_malformed_group_once(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"socket_group = {value}\n")
    (e,) = config.check_file(str(path))
    assert e.key == "socket_group" and "no group" not in e.problem


def test_check_file_reports_an_unknown_group_beside_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('socket_group = "no-such-group-mcbroker"\ntimeout_ms = 0\n')
    assert sorted(str(e.key) for e in config.check_file(str(path))) == ["socket_group", "timeout_ms"]


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    (e,) = config.check_file(missing)
    assert (e.key, e.source) == (None, missing)
    assert e.problem == "cannot read config file: No such file or directory"
    bad = tmp_path / "bad.toml"
    bad.write_text("timeout_ms = = 1\n")
    (e,) = config.check_file(str(bad))
    assert e.source == str(bad) and e.problem.startswith("not valid TOML: ")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'log_level = "caf\xe9"\n')
    for call in (lambda: config.check_file(str(latin))[0], lambda: _load_error(str(latin))):
        e = call()
        assert e.source == str(latin) and e.problem.startswith("not valid UTF-8: ")


def _load_error(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def test_load_blames_the_command_line_with_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("timeout_ms = 5\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), {"timeout_ms": 0})
    assert (info.value.key, info.value.source, info.value.problem) == ("timeout_ms", "command line", "0 is out of range 1..600000")


def test_curve_key_files_are_absolute_paths() -> None:
    c = from_mapping({"curve_secret_key_file": "/etc/mcbroker/broker.key", "curve_allowed_clients": "/etc/mcbroker/clients"})
    assert (c.curve, c.curve_secret_key_file) == (True, "/etc/mcbroker/broker.key")
    e = error_of({"curve_secret_key_file": "broker.key", "curve_allowed_clients": "/etc/mcbroker/clients"})
    assert (e.key, e.problem) == ("curve_secret_key_file", "must be an absolute path, got 'broker.key'")
    e = error_of({"curve_allowed_clients": 5})
    assert e.key == "curve_allowed_clients" and "got int" in e.problem


# --- issue 14's mutmut run of from_mapping, _server, _servers, _listen, _choice, _list -------------

# etc/mcbroker.toml: "With CURVE, a tcp listen address may be any host (tcp://0.0.0.0:5555); without
# it, a non-loopback address is refused at startup." and "Both keys or neither."
CURVE = {
    "curve_secret_key_file": "/etc/mcbroker/curve/broker.key_secret",
    "curve_allowed_clients": "/etc/mcbroker/clients",
}


def test_with_curve_a_tcp_listener_may_be_any_host() -> None:
    c = from_mapping({**CURVE, "listen": ["ipc:///tmp/b.sock", "tcp://0.0.0.0:5555"]})
    assert c.listen == ("ipc:///tmp/b.sock", "tcp://0.0.0.0:5555")
    e = error_of({"listen": ["ipc:///tmp/b.sock", "tcp://0.0.0.0:5555"]})
    assert e.key == "listen[1]" and "loopback" in e.problem


def test_curve_takes_both_key_settings_and_names_the_missing_one() -> None:
    e = error_of({"curve_secret_key_file": CURVE["curve_secret_key_file"]})
    assert e.key == "curve_allowed_clients" and "both" in e.problem
    e = error_of({"curve_allowed_clients": CURVE["curve_allowed_clients"]})
    assert e.key == "curve_secret_key_file" and "both" in e.problem


def test_a_server_table_without_a_weight_weighs_1() -> None:
    # README: `servers` lists `host:port`, `unix:/path`, or `{ address = "host:port", weight = 2 }`;
    # a table that gives no weight is an unweighted server, which rendezvous takes.
    c = from_mapping({"servers": [{"address": "a:1"}, "b:2"]})
    assert [(s.address.name, s.weight) for s in c.servers] == [("a:1", 1), ("b:2", 1)]


def test_server_weights_range_over_1_to_max_weight_inclusive() -> None:
    for weight in (1, config.MAX_WEIGHT):
        c = from_mapping({"hash": "ketama", "servers": [{"address": "a:1", "weight": weight}]})
        assert c.servers[0].weight == weight
    for weight in (0, config.MAX_WEIGHT + 1):
        e = error_of({"hash": "ketama", "servers": [{"address": "a:1", "weight": weight}]})
        assert e.key == "servers[0].weight"
        assert e.problem == f"{weight} is out of range 1..{config.MAX_WEIGHT}"


def test_what_is_not_a_table_or_has_non_string_keys_is_named() -> None:
    assert error_of([1]).problem == "config must be a table, got list"  # type: ignore[arg-type]
    e = error_of({1: 2})  # type: ignore[dict-item]
    assert (e.key, e.problem) == ("1", "config keys must be strings")


def test_an_unknown_key_is_named_with_the_nearest_known_one_if_any() -> None:
    e = error_of({"timeout": 5})
    assert e.key == "timeout" and "did you mean 'timeout_ms'" in e.problem
    e = error_of({"zzzzzzzz": 5})
    assert (e.key, e.problem) == ("zzzzzzzz", "unknown key")
