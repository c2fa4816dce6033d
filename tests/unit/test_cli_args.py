"""broker/cli.py in this process (tests/integration/test_cli.py runs the same commands as processes):
its argument handling, the exit statuses its docstring promises (check-config 1 for errors; admin
commands 1 when the broker is not there, 2 for a mistyped address; curve-keygen 1 rather than
overwrite a key), and what each command prints. Commands that need a running broker get a stand-in
client (the end-to-end runs are in the integration test)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from broker import cli, statsview
from clientlib.errors import MemcacheServerError

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "mcbroker.toml"


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def test_defaults_of_the_admin_commands():
    for command in ("stats", "ping", "top"):
        args = parse(command)
        assert args.broker is None and args.timeout == 2.0 and args.command == command
    assert parse("stats").json is False and parse("stats", "--json").json is True
    top = parse("top")
    assert (top.interval, top.count) == (1.0, 0)
    top = parse("top", "--interval", "0.5", "--count", "3", "--connect", "ipc:///tmp/x.sock", "--timeout", "0.25")
    assert (top.interval, top.count, top.broker, top.timeout) == (0.5, 3, "ipc:///tmp/x.sock", 0.25)
    assert parse("ping", "--broker", "tcp://127.0.0.1:5").broker == "tcp://127.0.0.1:5"
    assert parse("stats").func is cli.cmd_stats and parse("ping").func is cli.cmd_ping and top.func is cli.cmd_top


def test_config_flags_repeat_and_choose():
    args = parse("serve", "--listen", "ipc:///a", "--listen", "tcp://127.0.0.1:1", "--server", "a:1",
                 "--server", "b:2", "--hash", "ketama", "--log-level", "debug", "--config", "c.toml")
    assert args.listen == ["ipc:///a", "tcp://127.0.0.1:1"] and args.server == ["a:1", "b:2"]
    assert (args.hash, args.log_level, args.config, args.func) == ("ketama", "debug", "c.toml", cli.cmd_serve)
    assert cli._overrides(args) == {"listen": ["ipc:///a", "tcp://127.0.0.1:1"], "servers": ["a:1", "b:2"], "hash": "ketama"}
    none = parse("serve")
    assert (none.listen, none.server, none.hash, none.log_level, none.config) == (None, None, None, None, None)
    assert cli._overrides(none) == {}
    check = parse("check-config", "f.toml")
    assert (check.file, check.config, check.func) == ("f.toml", None, cli.cmd_check_config)
    assert parse("check-config").file is None
    keygen = parse("curve-keygen", "/d", "n")
    assert (keygen.dir, keygen.name, keygen.func) == ("/d", "n", cli.cmd_curve_keygen)


@pytest.mark.parametrize(
    "argv",
    [[], ["serve", "--hash", "modulo"], ["serve", "--log-level", "loud"], ["top", "--count", "x"],
     ["stats", "--timeout", "soon"], ["curve-keygen", "only-dir"], ["nosuch"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2  # argparse's usage error
    assert "usage: mcbroker" in capsys.readouterr().err


def test_log_levels_are_the_configs():
    for level in ("debug", "info", "warning", "error", "critical"):
        assert parse("serve", "--log-level", level).log_level == level


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    from importlib import metadata

    assert capsys.readouterr().out == f"mcbroker {metadata.version('mcbroker')}\n"


def test_version_when_not_installed(monkeypatch):
    from importlib import metadata

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", missing)
    assert cli.version() == "unknown (not installed)"


def test_config_path_positional_or_flag():
    assert cli._config_path(parse("check-config", "a.toml")) == "a.toml"
    assert cli._config_path(parse("check-config", "--config", "b.toml")) == "b.toml"
    assert cli._config_path(parse("check-config", "a.toml", "--config", "a.toml")) == "a.toml"
    assert cli._config_path(parse("check-config")) is None
    assert cli._config_path(parse("serve", "--config", "c.toml")) == "c.toml"  # serve has no positional
    with pytest.raises(SystemExit) as info:
        cli._config_path(parse("check-config", "a.toml", "--config", "b.toml"))
    assert str(info.value.code) == "mcbroker: two config files given: a.toml and --config b.toml"


def test_check_config_of_the_shipped_file(capsys, monkeypatch):
    monkeypatch.delenv("MCBROKER_URL", raising=False)
    assert cli.main(["check-config", str(SHIPPED), "--listen", "ipc:///run/x.sock", "--server", "a:1",
                     "--server", "unix:/tmp/m.sock", "--hash", "ketama"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == ("ok: listen ipc:///run/x.sock; servers a:1, unix:/tmp/m.sock; hash ketama; "
                   "socket_mode 0660; socket_group (the broker user's group)\n")


def test_check_config_names_the_group(tmp_path, capsys):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'socket_group = "{group}"\nsocket_mode = "0600"\nlisten = ["ipc:///run/a.sock", "ipc:///run/b.sock"]\n')
    assert cli.main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out == (f"ok: listen ipc:///run/a.sock, ipc:///run/b.sock; servers 127.0.0.1:11211; hash rendezvous; "
                   f"socket_mode 0600; socket_group {group}\n")


def test_check_config_lists_each_error_and_counts_them(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('servers = ["127.0.0.1:99999"]\ntimeout_ms = "1s"\n')
    assert cli.main(["check-config", str(bad), "--hash", "ketama"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3
    assert any(ln.startswith(f"invalid: {bad}: servers[0]: ") and "out of range" in ln for ln in lines[:2])
    assert any(ln.startswith(f"invalid: {bad}: timeout_ms: ") and "integer" in ln for ln in lines[:2])
    assert lines[2] == f"mcbroker: 2 errors in {bad}"


def test_check_config_one_error_from_a_flag(capsys):
    assert cli.main(["check-config", "--server", "nohost:0"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("invalid: command line: servers[0]: ")
    assert lines[1] == "mcbroker: 1 error in the defaults"


def test_check_config_a_file_it_cannot_read(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert cli.main(["check-config", str(missing)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"invalid: {missing}: (file): cannot read config file: No such file or directory",
                     f"mcbroker: 1 error in {missing}"]


def test_serve_with_a_bad_config_exits_2_before_starting(tmp_path, capsys, monkeypatch):
    import broker.service

    started: list[Any] = []
    monkeypatch.setattr(broker.service, "Broker", lambda *a, **k: started.append(a))
    bad = tmp_path / "bad.toml"
    bad.write_text('hash = "modulo"\n')
    assert cli.main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mcbroker: bad config: {bad}: hash: ") and err.count("\n") == 1
    assert started == []


class _Broker:
    """Stands in for broker.service.Broker: what cmd_serve does with it, not the service itself."""

    made: list[tuple[Any, ...]] = []
    fail: Exception | None = None

    def __init__(self, cfg: Any, *, config_path: str | None, overrides: dict[str, Any]) -> None:
        if _Broker.fail is not None:
            raise _Broker.fail
        _Broker.made.append((cfg, config_path, overrides))
        self.ran = False

    def run(self) -> None:
        _Broker.made.append(("run",))


@pytest.fixture
def fake_broker(monkeypatch):
    import broker.service

    levels: list[str] = []
    _Broker.made, _Broker.fail = [], None
    monkeypatch.setattr(broker.service, "Broker", _Broker)
    monkeypatch.setattr(cli.logfmt, "setup", levels.append)
    return levels


def test_serve_builds_and_runs_the_broker_with_the_flags(tmp_path, fake_broker):
    cfg = tmp_path / "c.toml"
    cfg.write_text('log_level = "warning"\nservers = ["a:1"]\n')
    assert cli.main(["serve", "--config", str(cfg), "--server", "b:2"]) == 0
    (config, path, overrides), (ran,) = _Broker.made
    assert ran == "run"
    assert path == str(cfg) and overrides == {"servers": ["b:2"]}
    assert [s.address.name for s in config.servers] == ["b:2"]
    assert fake_broker == ["warning"]  # the config's log level
    _Broker.made.clear()
    assert cli.main(["serve", "--config", str(cfg), "--log-level", "debug"]) == 0
    assert fake_broker == ["warning", "debug"]  # the flag wins


def test_serve_that_cannot_start_is_one_line_and_exit_1(fake_broker, capsys):
    _Broker.fail = OSError("ipc:///run/x.sock: another broker is already listening")
    assert cli.main(["serve"]) == 1
    assert capsys.readouterr().err == "mcbroker: cannot start: ipc:///run/x.sock: another broker is already listening\n"
    assert _Broker.made == []


class _Client:
    def __init__(self, ping: Any = "PONG", stats: Any = None) -> None:
        self.ping, self.stats = ping, stats
        self.disconnected = 0

    def _answer(self, a: Any) -> Any:
        if isinstance(a, Exception):
            raise a
        return a

    def broker_ping(self) -> Any:
        return self._answer(self.ping)

    def broker_stats(self) -> Any:
        return self._answer(self.stats)

    def disconnect_all(self) -> None:
        self.disconnected += 1


def _use(monkeypatch, client: _Client) -> list[Any]:
    made: list[Any] = []

    def fake(args: Any) -> _Client:
        made.append((args.broker, args.timeout))
        return client

    monkeypatch.setattr(cli, "_client", fake)
    return made


def test_ping_prints_the_answer(monkeypatch, capsys):
    client = _Client()
    made = _use(monkeypatch, client)
    assert cli.main(["ping", "--connect", "ipc:///run/b.sock", "--timeout", "0.5"]) == 0
    assert capsys.readouterr() == ("PONG\n", "")
    assert made == [("ipc:///run/b.sock", 0.5)] and client.disconnected == 1


def test_ping_without_an_answer_is_exit_1(monkeypatch, capsys):
    client = _Client(ping=MemcacheServerError("broker at ipc:///run/b.sock is not answering"))
    _use(monkeypatch, client)
    assert cli.main(["ping"]) == 1
    assert capsys.readouterr() == ("", "mcbroker: MemcacheServerError: broker at ipc:///run/b.sock is not answering\n")
    assert client.disconnected == 1


def test_stats_as_json_and_as_a_table(monkeypatch, capsys):
    stats = {"pid": 9, "ops": 1234, "servers": {"a:1": {"state": "up"}}, "version": "1.0"}
    _use(monkeypatch, _Client(stats=stats))
    assert cli.main(["stats", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == stats
    assert out == json.dumps(stats, indent=2, sort_keys=True) + "\n"  # sorted keys, two-space indent
    assert cli.main(["stats"]) == 0
    assert capsys.readouterr().out == statsview.table(stats) + "\n"


def test_stats_failure_prints_nothing_on_stdout(monkeypatch, capsys):
    _use(monkeypatch, _Client(stats=MemcacheServerError("gone")))
    assert cli.main(["stats", "--json"]) == 1
    assert capsys.readouterr() == ("", "mcbroker: MemcacheServerError: gone\n")


@pytest.mark.parametrize("command", ["ping", "stats", "top"])
def test_a_memcached_address_is_exit_2(command, capsys, monkeypatch):
    monkeypatch.delenv("MCBROKER_URL", raising=False)
    assert cli.main([command, "--connect", "127.0.0.1:11211"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mcbroker: ") and err.count("\n") == 1
    assert "127.0.0.1:11211" in err and "ipc:///" in err


def test_no_broker_there_is_exit_1(tmp_path, capsys):
    assert cli.main(["ping", "--connect", f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mcbroker: Broker") and err.count("\n") == 1


def test_client_gets_the_address_and_timeout(monkeypatch):
    import clientlib

    made: list[Any] = []
    monkeypatch.setattr(clientlib, "Client", lambda broker, timeout: made.append((broker, timeout)) or "client")
    assert cli._client(parse("ping", "--broker", "ipc:///x.sock", "--timeout", "3")) == "client"
    assert made == [("ipc:///x.sock", 3.0)]

    def refuse(broker: Any, timeout: Any) -> Any:
        raise TypeError("timeout must be a number")

    monkeypatch.setattr(clientlib, "Client", refuse)
    with pytest.raises(cli._BadAddress) as info:
        cli._client(parse("ping"))
    assert str(info.value) == "timeout must be a number" and info.value.__suppress_context__


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.written: list[str] = []

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.written.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def test_top_needs_a_terminal(monkeypatch, capsys):
    client = _Client()
    _use(monkeypatch, client)
    monkeypatch.setattr(sys, "stdout", _Tty(False))
    assert cli.main(["top"]) == 2
    err = capsys.readouterr().err
    assert err == "mcbroker: top draws a live view and needs a terminal; use `mcbroker stats [--json]`\n"
    assert client.disconnected == 1  # the ping's client is let go


def test_top_pings_first_then_draws(monkeypatch):
    client = _Client()
    _use(monkeypatch, client)
    monkeypatch.setattr(sys, "stdout", _Tty(True))
    calls: list[Any] = []
    monkeypatch.setattr(statsview, "top", lambda c, interval, count: calls.append((c, interval, count)) or 0)
    assert cli.main(["top", "--interval", "0.5", "--count", "4"]) == 0
    assert calls == [(client, 0.5, 4)]


def test_top_without_a_broker_does_not_draw(monkeypatch, capsys):
    _use(monkeypatch, _Client(ping=MemcacheServerError("no broker")))
    monkeypatch.setattr(sys, "stdout", _Tty(True))
    monkeypatch.setattr(statsview, "top", lambda *a, **k: pytest.fail("drew without a broker"))
    assert cli.main(["top"]) == 1


def test_top_without_rich(monkeypatch, capsys):
    _use(monkeypatch, _Client())
    monkeypatch.setattr(sys, "stdout", _Tty(True))

    def missing(*a: Any, **k: Any) -> int:
        raise statsview.MissingExtra("mcbroker top needs the rich package")

    monkeypatch.setattr(statsview, "top", missing)
    assert cli.main(["top"]) == 1
    assert capsys.readouterr().err == "mcbroker: mcbroker top needs the rich package\n"


def test_curve_keygen_writes_a_pair(tmp_path, capsys):
    where = tmp_path / "keys"
    assert cli.main(["curve-keygen", str(where), "web1"]) == 0
    public_file, secret_file = where / "web1.key", where / "web1.key_secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700
    public, secret = zmq.auth.load_certificate(str(secret_file))
    assert secret is not None and zmq.auth.load_certificate(str(public_file)) == (public, None)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"public key file: {public_file}"
    assert out[1] == f"secret key file: {secret_file} (mode 0600)"
    assert out[2] == f"public key: {public.decode()}"
    assert f"  MCBROKER_CURVE_PUBLICKEY={public.decode()}" in out or f"  MCBROKER_CURVE_PUBLICKEY='{public.decode()}'" in out
    assert any(ln.startswith("  MCBROKER_CURVE_SECRETKEY=") and secret.decode() in ln for ln in out)
    assert "  MCBROKER_CURVE_SERVERKEY=<the broker's public key>" in out


def test_curve_keygen_does_not_overwrite(tmp_path, capsys):
    assert cli.main(["curve-keygen", str(tmp_path), "b"]) == 0
    before = (tmp_path / "b.key_secret").read_bytes()
    capsys.readouterr()
    assert cli.main(["curve-keygen", str(tmp_path), "b"]) == 1
    assert capsys.readouterr().err == f"mcbroker: {tmp_path / 'b.key'} exists; not overwriting a key\n"
    assert (tmp_path / "b.key_secret").read_bytes() == before
    (tmp_path / "c.key_secret").write_text("someone's secret\n")  # only the secret half there
    assert cli.main(["curve-keygen", str(tmp_path), "c"]) == 1
    assert capsys.readouterr().err == f"mcbroker: {tmp_path / 'c.key_secret'} exists; not overwriting a key\n"
    assert not (tmp_path / "c.key").exists()


def test_a_reader_that_leaves_is_not_an_error(monkeypatch):
    # `mcbroker stats --json | head`: stdout is pointed at /dev/null and the exit status is 0
    class _Out:
        def fileno(self) -> int:
            return 99

    opened: list[Any] = []
    duped: list[Any] = []
    monkeypatch.setattr(cli.os, "open", lambda path, flags: opened.append((path, flags)) or 42)
    monkeypatch.setattr(cli.os, "dup2", lambda a, b: duped.append((a, b)))
    monkeypatch.setattr(sys, "stdout", _Out())

    def leaves(args: Any) -> int:
        raise BrokenPipeError()

    monkeypatch.setattr(cli, "cmd_ping", leaves)
    assert cli.main(["ping"]) == 0
    assert opened == [(os.devnull, os.O_WRONLY)] and duped == [(42, 99)]


def test_check_config_an_error_without_a_source_has_no_prefix(monkeypatch, capsys):
    # A problem check_file could not place (no file, not from a flag) is printed key first.
    monkeypatch.setattr(cli.config_mod, "check_file", lambda path, overrides: [
        cli.config_mod.ConfigError("timeout_ms", "must be an integer"),
        cli.config_mod.ConfigError(None, "not valid TOML", source="c.toml"),
    ])
    assert cli.main(["check-config"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "invalid: timeout_ms: must be an integer", "invalid: c.toml: (file): not valid TOML",
        "mcbroker: 2 errors in the defaults",
    ]


def test_curve_keygen_names_the_config_keys_to_set(tmp_path, capsys):
    assert cli.main(["curve-keygen", str(tmp_path), "k"]) == 0
    out = capsys.readouterr().out
    assert "curve_secret_key_file" in out and "curve_allowed_clients" in out  # as config.py spells them
    assert "None" not in out


def _subparsers(parser: Any) -> dict[str, Any]:
    import argparse

    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_usage_names_every_command():
    parser = cli.build_parser()
    commands = set(_subparsers(parser))
    assert commands == {"serve", "check-config", "curve-keygen", "stats", "top", "ping"}  # README "The broker"
    usage = parser.format_usage()
    listed = usage[usage.index("{") + 1:usage.index("}")].split(",")
    assert sorted(listed) == sorted(commands), usage


def test_usage_forms_are_the_readmes():
    # README, "The broker": `mcbroker serve [--config FILE] [--listen URL]... [--server HOST:PORT]...
    # [--hash rendezvous|ketama] [--log-level LEVEL]`, `check-config [FILE]` (or `--config FILE`),
    # `curve-keygen DIR NAME`, and `--connect URL` for the admin commands.
    subs = _subparsers(cli.build_parser())
    usage = {name: " ".join(p.format_usage().split()) for name, p in subs.items()}
    for form in ("[--config FILE]", "[--listen URL]", "[--server HOST:PORT]", "[--hash {rendezvous,ketama}]",
                 "[--log-level {debug,info,warning,error,critical}]"):
        assert form in usage["serve"], (form, usage["serve"])
    for form in ("[--config FILE]", "[--listen URL]", "[--server HOST:PORT]", "[FILE]"):
        assert form in usage["check-config"], (form, usage["check-config"])
    assert usage["curve-keygen"].endswith(" DIR NAME")
    for name in ("stats", "top", "ping"):
        assert "[--connect URL]" in usage[name], usage[name]


def test_every_command_and_option_says_what_it_does():
    import argparse

    parser = cli.build_parser()
    assert "memcached connection broker for prefork Python servers" in parser.format_help()  # README's first line
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    described = {a.dest: a.help for a in sub._choices_actions}
    assert set(described) == set(sub.choices)
    for name, text in described.items():
        assert isinstance(text, str) and text.strip(), name
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or not (action.option_strings or action.dest == "file"):
                continue  # curve-keygen's DIR NAME are described by the command's own help
            assert isinstance(action.help, str) and action.help.strip(), (name, action.dest)
