"""Broker configuration: frozen dataclasses loaded from TOML, validated once.

Everything that can be wrong with a config is found here, at load, and
reported as a ConfigError naming the key. The rest of the broker trusts a
Config it is given. Reload builds a new Config; nothing is mutated.

Data only: this module reads the config file and nothing else (no sockets, no
logging).
"""

from __future__ import annotations

import difflib
import grp
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from clientlib.address import ServerAddress, check_listen_url, default_bind_url, parse_server


class ConfigError(ValueError):
    """A config problem. `key` is the offending key ("servers[1].weight"), or
    None for problems with the file as a whole."""

    def __init__(self, key: str | None, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        text = f"{key}: {problem}" if key is not None else problem
        super().__init__(f"{source}: {text}" if source else text)


@dataclass(frozen=True)
class ServerConfig:
    address: ServerAddress
    weight: int


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...]
    servers: tuple[ServerConfig, ...]
    hash: str
    connections_per_server: int
    timeout_ms: int
    connect_timeout_ms: int
    io_timeout_ms: int
    failure_limit: int
    on_server_down: str
    probe_interval_ms: int
    probe_max_interval_ms: int
    max_frame_bytes: int
    max_value_bytes: int
    max_inflight_per_connection: int
    max_inflight_per_server: int
    max_inflight_total: int
    max_buffered_bytes: int
    max_batch_per_turn: int
    max_clients: int
    coalesce_reads: bool
    curve_secret_key_file: str
    curve_allowed_clients: str
    log_level: str
    socket_mode: int
    socket_group: str
    drain_timeout_ms: int
    metrics_listen: str

    @property
    def curve(self) -> bool:
        """CURVE configured: TCP listeners authenticate and encrypt, and may be non-loopback."""
        return bool(self.curve_secret_key_file)

    def listen_urls(self) -> tuple[str, ...]:
        """The addresses to bind: the configured ones, or the default socket."""
        return self.listen if self.listen else (default_bind_url(),)

    def as_mapping(self) -> dict[str, object]:
        """Plain TOML-shaped values; from_mapping(c.as_mapping()) == c."""
        out: dict[str, object] = {}
        for name in DEFAULTS:
            out[name] = getattr(self, name)
        out["listen"] = list(self.listen)
        out["socket_mode"] = f"{self.socket_mode:04o}"
        out["servers"] = [
            s.address.name if s.weight == 1 else {"address": s.address.name, "weight": s.weight}
            for s in self.servers
        ]
        return out


# The single source of the built-in defaults; etc/mcbroker.toml spells out the
# same values (a test holds them equal).
DEFAULTS: Mapping[str, object] = MappingProxyType(
    {
        "listen": [],
        "servers": ["127.0.0.1:11211"],
        "hash": "rendezvous",
        "connections_per_server": 2,
        "timeout_ms": 1000,
        "connect_timeout_ms": 1000,
        "io_timeout_ms": 3000,
        "failure_limit": 3,
        "on_server_down": "fail",
        "probe_interval_ms": 100,
        "probe_max_interval_ms": 30000,
        "max_frame_bytes": 4194304,
        "max_value_bytes": 0,
        "max_inflight_per_connection": 65536,
        "max_inflight_per_server": 131072,
        "max_inflight_total": 262144,
        "max_buffered_bytes": 268435456,
        "max_batch_per_turn": 4096,
        "max_clients": 1024,
        "coalesce_reads": True,
        "curve_secret_key_file": "",
        "curve_allowed_clients": "",
        "log_level": "info",
        "socket_mode": "0660",
        "socket_group": "",
        "drain_timeout_ms": 10000,
        "metrics_listen": "",
    }
)

HASHES = ("rendezvous", "ketama")
ON_SERVER_DOWN = ("fail", "remap")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

MAX_WEIGHT = 1000

# Room in a frame for everything but the value of a single set: key (at most
# 250 bytes), flags, ids and msgpack headers. A frame limit that cannot carry
# the largest allowed value would reject valid sets.
FRAME_OVERHEAD_BYTES = 4096

_HOUR_MS = 3_600_000

# Inclusive ranges. The maxima are far past any sane setting; they exist to
# catch unit mistakes (seconds vs milliseconds, an extra zero) and overflow.
INT_RANGES: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "connections_per_server": (1, 8),
        "timeout_ms": (1, 600_000),
        "connect_timeout_ms": (1, 600_000),
        "io_timeout_ms": (1, 600_000),
        "failure_limit": (1, 1000),
        "probe_interval_ms": (1, _HOUR_MS),
        "probe_max_interval_ms": (1, _HOUR_MS),
        "max_frame_bytes": (FRAME_OVERHEAD_BYTES + 1, 1 << 30),
        # memcached itself refuses item sizes over 1 GiB (-I).
        "max_value_bytes": (0, 1 << 30),
        "max_inflight_per_connection": (1, 1 << 24),
        "max_inflight_per_server": (1, 1 << 24),
        "max_inflight_total": (1, 1 << 26),
        "max_buffered_bytes": (1 << 16, 1 << 36),
        "max_batch_per_turn": (1, 1 << 20),
        # Worker sockets served at once (memcached's -c, twemproxy's client_connections); each
        # also takes a file descriptor, so the process's open-files limit caps it too.
        "max_clients": (1, 1 << 20),
        "drain_timeout_ms": (0, _HOUR_MS),
    }
)

_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"hash": HASHES, "on_server_down": ON_SERVER_DOWN, "log_level": LOG_LEVELS}
)


def _type_name(value: object) -> str:
    return type(value).__name__


def _int(key: str, value: object) -> int:
    # bool is an int subclass; `timeout_ms = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {_type_name(value)} {value!r}")
    low, high = INT_RANGES[key]
    if not low <= value <= high:
        raise ConfigError(key, f"{value} is out of range {low}..{high}")
    return value


def _bool(key: str, value: object) -> bool:
    # TOML has real booleans; "yes" or 1 is a mistake worth naming, not a truthy value.
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {_type_name(value)} {value!r}")
    return value


def _choice(key: str, value: object) -> str:
    choices = _CHOICES[key]
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, one of {', '.join(choices)}; got {_type_name(value)}")
    # Case is never meaningful in these names; "INFO" is what people type.
    normal = value.lower()
    if normal not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")
    return normal


_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")


def _socket_mode(value: object) -> int:
    # TOML has octal integers (0o660) but people write "0660" (chmod's spelling): take both.
    key = "socket_mode"
    if isinstance(value, str):
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ConfigError(key, f"{value!r} is not an octal file mode such as \"0660\"")
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ConfigError(key, f"must be an octal mode string such as \"0660\" (or 0o660), got {_type_name(value)}")
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, f"{mode:o} is not a file mode (0000..0777)")
    if mode & 0o600 != 0o600:
        raise ConfigError(key, f"{mode:04o} denies the broker's own user read and write on its socket")
    if mode & 0o007:
        raise ConfigError(
            key, f"{mode:04o} lets every local user use the broker (it has no authentication); "
            "use a group (socket_group) and at most 0660"
        )
    return mode


def _socket_group(value: object) -> str:
    key = "socket_group"
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a group name or number as a string, got {_type_name(value)}")
    if value and not _GROUP_RE.fullmatch(value):
        raise ConfigError(key, f"{value!r} is not a group name")
    return value


def _metrics_listen(value: object) -> str:
    key = "metrics_listen"
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string \"HOST:PORT\" (or \"\" for none), got {_type_name(value)}")
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"{value!r} is not HOST:PORT (for example \"127.0.0.1:9150\")")
    return value


def _list(key: str, value: object) -> list[object]:
    # A bare string is iterable too; accepting it would split "a:1" into chars.
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"must be a list, got {_type_name(value)}")
    return list(value)


def _path(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string (a file path, or empty), got {_type_name(value)}")
    if value and not value.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {value!r}")
    return value


def _listen(value: object, curve: bool) -> tuple[str, ...]:
    urls: list[str] = []
    for i, item in enumerate(_list("listen", value)):
        key = f"listen[{i}]"
        if not isinstance(item, str):
            raise ConfigError(key, f"must be a string, got {_type_name(item)}")
        try:
            check_listen_url(item, remote=curve)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
        if item in urls:
            raise ConfigError(key, f"{item!r} is listed twice")
        urls.append(item)
    return tuple(urls)


def _server(key: str, item: object) -> ServerConfig:
    weight: object = 1
    if isinstance(item, Mapping):
        unknown = [k for k in item if k not in ("address", "weight")]
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", "unknown key (expected address, weight)")
        if "address" not in item:
            raise ConfigError(f"{key}.address", "is required")
        text = item["address"]
        weight = item.get("weight", 1)
        addr_key = f"{key}.address"
    else:
        text = item
        addr_key = key
    if not isinstance(text, str):
        raise ConfigError(addr_key, f"must be a string, got {_type_name(text)}")
    try:
        address = parse_server(text)
    except ValueError as e:
        raise ConfigError(addr_key, str(e)) from None
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ConfigError(f"{key}.weight", f"must be an integer, got {_type_name(weight)}")
    if not 1 <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{key}.weight", f"{weight} is out of range 1..{MAX_WEIGHT}")
    return ServerConfig(address=address, weight=weight)


def _identity(address: ServerAddress) -> tuple[object, ...]:
    # Host names are case-insensitive: "LOCALHOST:11211" is localhost again.
    if address.path is not None:
        return ("unix", address.path)
    return ("inet", (address.host or "").lower(), address.port)


def _servers(value: object, hash_name: str) -> tuple[ServerConfig, ...]:
    items = _list("servers", value)
    if not items:
        raise ConfigError("servers", "at least one server is required")
    servers: list[ServerConfig] = []
    seen: dict[tuple[object, ...], int] = {}
    for i, item in enumerate(items):
        key = f"servers[{i}]"
        server = _server(key, item)
        ident = _identity(server.address)
        if ident in seen:
            raise ConfigError(key, f"{server.address.name} duplicates servers[{seen[ident]}]")
        seen[ident] = i
        if server.weight != 1 and hash_name != "ketama":
            # pymemcache's rendezvous hashing has no weights; honouring one
            # would place keys differently from the clients we replace.
            raise ConfigError(f"{key}.weight", 'weights need hash = "ketama"; rendezvous has no weights')
        servers.append(server)
    return tuple(servers)


def _check_relations(c: Config) -> None:
    if c.probe_interval_ms > c.probe_max_interval_ms:
        raise ConfigError(
            "probe_interval_ms",
            f"{c.probe_interval_ms} exceeds probe_max_interval_ms ({c.probe_max_interval_ms})",
        )
    if c.max_value_bytes + FRAME_OVERHEAD_BYTES > c.max_frame_bytes:
        raise ConfigError(
            "max_value_bytes",
            f"{c.max_value_bytes} plus {FRAME_OVERHEAD_BYTES} bytes of framing must fit in "
            f"max_frame_bytes ({c.max_frame_bytes})",
        )
    if c.max_inflight_per_connection > c.max_inflight_per_server:
        raise ConfigError(
            "max_inflight_per_connection",
            f"{c.max_inflight_per_connection} exceeds max_inflight_per_server ({c.max_inflight_per_server})",
        )
    if c.max_inflight_per_server > c.max_inflight_total:
        raise ConfigError(
            "max_inflight_per_server",
            f"{c.max_inflight_per_server} exceeds max_inflight_total ({c.max_inflight_total})",
        )
    if c.max_buffered_bytes < c.max_frame_bytes:
        raise ConfigError(
            "max_buffered_bytes",
            f"{c.max_buffered_bytes} is less than max_frame_bytes ({c.max_frame_bytes}); "
            f"a single largest frame could never be buffered",
        )


def from_mapping(d: Mapping[str, object]) -> Config:
    """Validate a TOML-shaped mapping; missing keys take the built-in defaults."""
    if not isinstance(d, Mapping):
        raise ConfigError(None, f"config must be a table, got {_type_name(d)}")
    for key in d:
        if not isinstance(key, str):
            raise ConfigError(repr(key), "config keys must be strings")
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"unknown key{hint}")
    merged = {**DEFAULTS, **d}
    hash_name = _choice("hash", merged["hash"])
    config = Config(
        listen=_listen(merged["listen"], True),  # syntax; the loopback rule is a relation, below
        curve_secret_key_file=_path("curve_secret_key_file", merged["curve_secret_key_file"]),
        curve_allowed_clients=_path("curve_allowed_clients", merged["curve_allowed_clients"]),
        servers=_servers(merged["servers"], hash_name),
        hash=hash_name,
        on_server_down=_choice("on_server_down", merged["on_server_down"]),
        log_level=_choice("log_level", merged["log_level"]),
        coalesce_reads=_bool("coalesce_reads", merged["coalesce_reads"]),
        socket_mode=_socket_mode(merged["socket_mode"]),
        socket_group=_socket_group(merged["socket_group"]),
        metrics_listen=_metrics_listen(merged["metrics_listen"]),
        **{key: _int(key, merged[key]) for key in INT_RANGES},
    )
    if bool(config.curve_secret_key_file) != bool(config.curve_allowed_clients):
        missing = "curve_allowed_clients" if config.curve_secret_key_file else "curve_secret_key_file"
        raise ConfigError(missing, "is required with CURVE: set both curve_secret_key_file and curve_allowed_clients, or neither")
    if not config.curve:
        _listen(merged["listen"], False)  # a non-loopback tcp address needs CURVE
    _check_relations(config)
    return config


def _check_key(key: str, value: object, hash_name: str) -> None:
    if key in INT_RANGES:
        _int(key, value)
    elif key in _CHOICES:
        _choice(key, value)
    elif key == "listen":
        # Syntax only: whether a non-loopback address is allowed depends on the CURVE keys, a
        # relation that from_mapping checks once every key is valid on its own.
        _listen(value, True)
    elif key in ("curve_secret_key_file", "curve_allowed_clients"):
        _path(key, value)
    elif key == "servers":
        _servers(value, hash_name)
    elif key == "coalesce_reads":
        _bool(key, value)
    elif key == "socket_mode":
        _socket_mode(value)
    elif key == "socket_group":
        _socket_group(value)
    elif key == "metrics_listen":
        _metrics_listen(value)


def problems(d: Mapping[str, object]) -> list[ConfigError]:
    """Every problem in a TOML-shaped mapping, one ConfigError per key (check-config reports them
    all at once; from_mapping stops at the first). Relations between keys are checked only once
    every key is valid on its own. Empty: from_mapping(d) succeeds."""
    if not isinstance(d, Mapping):
        return [ConfigError(None, f"config must be a table, got {_type_name(d)}")]
    found: list[ConfigError] = []
    for key in d:
        if not isinstance(key, str) or key not in DEFAULTS:
            try:
                from_mapping({key: d[key]})
            except ConfigError as e:
                found.append(e)
    merged = {**DEFAULTS, **{k: v for k, v in d.items() if k in DEFAULTS}}
    try:
        hash_name = _choice("hash", merged["hash"])
    except ConfigError:
        hash_name = "ketama"  # reported under hash; still check the servers' own syntax
    for key in DEFAULTS:
        if key not in d:
            continue
        value = d[key]
        if key in ("listen", "servers") and isinstance(value, (list, tuple)) and len(value) > 1:
            # Each entry on its own, so every bad one is named (the whole list stops at the first);
            # the whole list again for what spans entries (duplicates), if each entry is fine.
            for i, item in enumerate(value):
                try:
                    _check_key(key, [item], hash_name)
                except ConfigError as e:
                    name = e.key or key
                    if name.startswith(f"{key}[0]"):
                        name = f"{key}[{i}]" + name[len(f"{key}[0]"):]
                    found.append(ConfigError(name, e.problem))
        try:
            _check_key(key, value, hash_name)
        except ConfigError as e:
            if all(f.key != e.key for f in found):
                found.append(e)
    if not found:
        try:
            from_mapping(d)
        except ConfigError as e:
            found.append(e)
    return found


def check_file(path: str | None, overrides: Mapping[str, object] | None = None) -> list[ConfigError]:
    """problems() for a file plus command-line overrides, each error naming its source."""
    try:
        data: dict[str, object] = _read_toml(path) if path is not None else {}
    except ConfigError as e:
        return [e]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data.update(given)
    found = problems(data)
    group = data.get("socket_group")
    if isinstance(group, str) and group and not group.isdigit() and all(e.key != "socket_group" for e in found):
        # This host's group database, which `serve` consults when it makes the socket: check-config
        # runs where the broker will, so it can say so before the start fails.
        try:
            grp.getgrnam(group)
        except KeyError:
            found.append(ConfigError("socket_group", f"no group {group!r} on this host"))
    out = []
    for problem in found:
        root = _ROOT_KEY_RE.match(problem.key or "")
        from_flag = problem.key is not None and root is not None and root.group(0) in given
        out.append(ConfigError(problem.key, problem.problem, source="command line" if from_flag else path))
    return out


def _read_toml(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(None, f"cannot read config file: {e.strerror or e}", source=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(None, f"not valid TOML: {e}", source=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(None, f"not valid UTF-8: {e}", source=path) from None


_ROOT_KEY_RE = re.compile(r"[^\[.]*")


def load(path: str | None, overrides: Mapping[str, object] | None = None) -> Config:
    """Load `path` (None: built-in defaults), apply overrides, validate.

    Overrides come from command-line flags and replace whole top-level values;
    a None value means "flag not given" and is ignored.
    """
    data: dict[str, object] = _read_toml(path) if path is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data.update(given)
    try:
        return from_mapping(data)
    except ConfigError as e:
        root = _ROOT_KEY_RE.match(e.key or "")
        if e.key is not None and root is not None and root.group(0) in given:
            source: str | None = "command line"
        else:
            source = path
        raise ConfigError(e.key, e.problem, source=source) from None
