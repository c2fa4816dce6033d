"""Addresses shared by the broker and the client.

Two kinds live here: the ZeroMQ address the broker listens on (and the client
connects to by default), and memcached server addresses from the config.
Nothing here opens a socket; the only I/O is reading the environment and
stat-ing a few well-known directories to pick a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass

SOCKET_NAME = "mcbroker.sock"

# The system-wide location: what systemd's RuntimeDirectory=mcbroker gives.
# Module-level so tests can point it at a temporary directory.
SYSTEM_DIR = "/run/mcbroker"
# Parent of the last-resort per-user directory, /tmp/mcbroker-<uid>.
TMP_BASE = "/tmp"

DEFAULT_MEMCACHED_PORT = 11211

# sun_path is 108 bytes on Linux including the terminating NUL; a longer path
# fails only at bind/connect time with a confusing error, so refuse it early.
MAX_UNIX_PATH_BYTES = 107

_PORT_RE = re.compile(r"[0-9]{1,5}")
_NUMERIC_HOST_RE = re.compile(r"[0-9.]+")
# Permissive on purpose: DNS names, plus the underscores some internal naming
# schemes use. Anything with spaces, slashes or colons is certainly a typo.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")


# --------------------------------------------------------------------------
# Broker (ZeroMQ) address
# --------------------------------------------------------------------------


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _user_dir() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "mcbroker")
    return _tmp_user_dir()


def _tmp_user_dir() -> str:
    return os.path.join(TMP_BASE, f"mcbroker-{os.getuid()}")


def broker_bind_dir() -> str:
    """Directory the broker should put its default ipc socket in.

    The directory may not exist yet; creating it is the broker's job.
    """
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        # systemd joins several RuntimeDirectory= entries with ':'.
        first = runtime.split(":", 1)[0]
        if first:
            return first
    if _writable_dir(SYSTEM_DIR) or _writable_dir(os.path.dirname(SYSTEM_DIR)):
        return SYSTEM_DIR
    return _user_dir()


def default_bind_url() -> str:
    return "ipc://" + os.path.join(broker_bind_dir(), SOCKET_NAME)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def default_connect_url(remote: bool = False) -> str:
    """Where a client finds the broker when it is told nothing.

    Prefers a socket that exists, so a system broker and a per-user broker are
    both found without configuration. When none exists, answer with where this
    user's broker would bind, so a later "cannot connect" names a real place.
    """
    explicit = os.environ.get("MCBROKER_URL")
    if explicit:
        return check_connect_url(explicit, "MCBROKER_URL", remote=remote)
    candidates = [os.path.join(SYSTEM_DIR, SOCKET_NAME)]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        candidates.append(os.path.join(xdg, "mcbroker", SOCKET_NAME))
    candidates.append(os.path.join(_tmp_user_dir(), SOCKET_NAME))
    for path in candidates:
        if _is_socket(path):
            return "ipc://" + path
    return default_bind_url()


def _check_unix_path(path: str, what: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"{what}: socket path must be absolute, got {path!r}")
    if "\0" in path:
        raise ValueError(f"{what}: socket path contains a NUL byte")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise ValueError(f"{what}: socket path cannot be encoded for the file system") from None
    if size > MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"{what}: socket path is longer than {MAX_UNIX_PATH_BYTES} bytes "
            f"(the unix socket limit): {path!r}"
        )


def _parse_port(text: str, what: str) -> int:
    # int() would also accept "+1", " 1", "1_0" and non-ASCII digits.
    if not _PORT_RE.fullmatch(text):
        raise ValueError(f"{what}: port must be a number, got {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port} is out of range 1..65535")
    return port


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_url(url: str, remote: bool = False) -> str:
    """Validate a ZeroMQ address the broker may bind; return it unchanged.

    ipc sockets and loopback TCP; any TCP host only with `remote` (the broker has CURVE
    configured): without authentication the broker must never be reachable from another host.
    """
    if not isinstance(url, str):
        raise ValueError(f"listen address must be a string, got {type(url).__name__}")
    what = f"listen address {url!r}"
    if url.startswith("ipc://"):
        _check_unix_path(url[len("ipc://") :], what)
        return url
    if url.startswith("tcp://"):
        rest = url[len("tcp://") :]
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0 or not rest[close + 1 :].startswith(":"):
                raise ValueError(f"{what}: expected tcp://[<ipv6>]:<port>")
            host, port_text = rest[1:close], rest[close + 2 :]
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{what}: expected tcp://<host>:<port>")
        _parse_port(port_text, what)
        if not remote and not _is_loopback(host):
            raise ValueError(
                f"{what}: a tcp listen address that is not loopback (127.0.0.0/8, [::1] or "
                f"localhost) needs CURVE: set curve_secret_key_file and curve_allowed_clients "
                f"(keys from `mcbroker curve-keygen`); without them the broker serves this host only"
            )
        return url
    raise ValueError(f"{what}: expected ipc://<absolute path> or tcp://<host>:<port>")


CONNECT_FORMS = "ipc:///path/to/mcbroker.sock or tcp://127.0.0.1:PORT"


def check_connect_url(url: str, source: str = "the broker URL", remote: bool = False) -> str:
    """Validate the ZeroMQ address a client connects to; return it unchanged.

    The forms a broker can listen on: ``ipc://`` with an absolute socket path, or ``tcp://`` with a
    loopback host and a port (any host with `remote`: the client has CURVE keys). Raises ValueError naming the accepted forms otherwise; a memcached
    address such as ``127.0.0.1:11211`` (what pymemcache takes) is the common mistake, said so.
    `source` names where the address came from (e.g. ``MCBROKER_URL``) for the message.
    """
    if not isinstance(url, str):
        raise TypeError(f"{source} must be a string ({CONNECT_FORMS}), got {type(url).__name__}")
    try:
        return _check_connect_url(url, f"{source} {url!r}", remote)
    except ValueError as exc:
        if CONNECT_FORMS in str(exc):
            raise
        raise ValueError(f"{exc}; expected {CONNECT_FORMS}") from None


def _check_connect_url(url: str, what: str, remote: bool = False) -> str:
    if url.startswith("ipc://"):
        _check_unix_path(url[len("ipc://"):], what)
        return url
    if url.startswith("tcp://"):
        rest = url[len("tcp://"):]
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0 or not rest[close + 1:].startswith(":"):
                raise ValueError(f"{what}: expected tcp://[<ipv6>]:<port>")
            host, port_text = rest[1:close], rest[close + 2:]
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{what}: tcp:// needs a host and a port")
        _parse_port(port_text, what)
        if not remote and not _is_loopback(host):
            raise ValueError(
                f"{what}: without CURVE keys the broker listens on loopback only (127.0.0.0/8, [::1] or localhost); "
                f"expected {CONNECT_FORMS}"
            )
        return url
    if "://" not in url:
        raise ValueError(
            f"{what} has no scheme: a memcached host:port is not a broker address (clientlib talks "
            f"to the local mcbroker); expected {CONNECT_FORMS}"
        )
    raise ValueError(f"{what} has an unsupported scheme; expected {CONNECT_FORMS}")


# --------------------------------------------------------------------------
# memcached server addresses
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerAddress:
    """A memcached server: either host + port, or a unix socket path."""

    host: str | None
    port: int | None
    path: str | None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def name(self) -> str:
        """Canonical spelling: "host:port", "[v6]:port" or "unix:/path"."""
        if self.path is not None:
            return "unix:" + self.path
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def hash_key(self) -> str:
        """The node key pymemcache's HashClient hashes for this server.

        pymemcache formats tuples as "%s:%s" (so IPv6 hosts lose their
        brackets) and keys unix servers by the bare path. Placement must use
        exactly this string to agree with existing pymemcache deployments.
        """
        if self.path is not None:
            return self.path
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.name


def parse_server(text: str) -> ServerAddress:
    """Parse "host:port", "host", "[v6]:port", "unix:/path" or "/path"."""
    if not isinstance(text, str):
        raise ValueError(f"server address must be a string, got {type(text).__name__}")
    what = f"server address {text!r}"
    s = text.strip()
    if not s:
        raise ValueError("server address is empty")
    if s.startswith("unix:"):
        path = s[len("unix:") :]
        if not path:
            raise ValueError(f"{what}: unix: needs a socket path")
        _check_unix_path(path, what)
        return ServerAddress(host=None, port=None, path=path)
    if s.startswith("/"):
        _check_unix_path(s, what)
        return ServerAddress(host=None, port=None, path=s)
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise ValueError(f"{what}: missing ']' after IPv6 address")
        host, rest = s[1:close], s[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from None
        if not rest:
            return ServerAddress(host=host, port=DEFAULT_MEMCACHED_PORT, path=None)
        if not rest.startswith(":"):
            raise ValueError(f"{what}: expected ':<port>' after ']'")
        return ServerAddress(host=host, port=_parse_port(rest[1:], what), path=None)
    if s.count(":") > 1:
        raise ValueError(f"{what}: IPv6 addresses need brackets, e.g. [::1]:11211")
    host, sep, port_text = s.partition(":")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{what}: {host!r} is not a valid host name or address")
    if _NUMERIC_HOST_RE.fullmatch(host):
        # No real host name is all digits, so this was meant as IPv4.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv4 address") from None
    port = _parse_port(port_text, what) if sep else DEFAULT_MEMCACHED_PORT
    return ServerAddress(host=host, port=port, path=None)
