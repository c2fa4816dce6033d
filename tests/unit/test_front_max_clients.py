"""max_clients: the config key, and the check that decides which file descriptor the broker may shut
down when a worker connection past max_clients is accepted (broker/front.py, refuse_connection).

The check runs on a duplicate of a descriptor that ZeroMQ's I/O thread owns and may have closed and
reused meanwhile; it must shut down only a connection accepted on the broker's bound address, never
a listener, never another socket (one of the broker's memcached connections, the client end of a
connection), and it must close only its duplicate. These tests use real loopback sockets (TCP and
unix), no processes.
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import config
from broker.config import ConfigError, from_mapping
from broker.front import bound_address, is_accepted_on, peer_closed, refuse_connection

pytestmark = pytest.mark.unit


# --- config -----------------------------------------------------------------------------------


def test_max_clients_defaults_to_memcacheds_1024() -> None:
    assert from_mapping({}).max_clients == 1024


@pytest.mark.parametrize("value", [1, 8, 1024, 1 << 20])
def test_max_clients_in_range_is_taken(value: int) -> None:
    assert from_mapping({"max_clients": value}).max_clients == value


@pytest.mark.parametrize("value, words", [
    (0, "out of range 1.."), (-1, "out of range 1.."), ((1 << 20) + 1, "out of range"),
    ("1024", "must be an integer"), (True, "must be an integer"), (8.0, "must be an integer"),
])
def test_max_clients_out_of_range_or_wrong_type_is_an_error_naming_it(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping({"max_clients": value})
    assert e.value.key == "max_clients"
    assert words in e.value.problem


def test_check_config_names_max_clients_among_other_errors() -> None:
    found = config.problems({"max_clients": 0, "timeout_ms": 0})
    assert sorted(e.key or "" for e in found) == ["max_clients", "timeout_ms"]


def test_max_clients_round_trips_through_the_mapping() -> None:
    c = from_mapping({"max_clients": 8})
    assert from_mapping(c.as_mapping()) == c


# --- bound_address ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, expected", [
    ("tcp://127.0.0.1:5555", ("tcp", ("127.0.0.1", 5555))),
    ("tcp://0.0.0.0:5555", ("tcp", (None, 5555))),
    ("tcp://[::1]:5556", ("tcp", ("::1", 5556))),
    ("tcp://[::]:5556", ("tcp", (None, 5556))),
    ("ipc:///run/mcbroker/mcbroker.sock", ("ipc", "/run/mcbroker/mcbroker.sock")),
    ("ipc://@abstract", ("ipc", "\0abstract")),
])
def test_bound_address_is_what_getsockname_of_an_accepted_connection_says(endpoint: str, expected: object) -> None:
    assert bound_address(endpoint) == expected


def test_bound_address_refuses_other_transports() -> None:
    with pytest.raises(ValueError):
        bound_address("inproc://x")


# --- refuse_connection, TCP ----------------------------------------------------------------------


class Tcp:
    """A listener on 127.0.0.1 (or the wildcard), one connection to it, and both its ends."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.accepted, _ = self.listener.accept()
        self.accepted.settimeout(5)

    def close(self) -> None:
        for s in (self.client, self.accepted, self.listener):
            s.close()


@pytest.fixture
def tcp() -> Iterator[Tcp]:
    t = Tcp()
    try:
        yield t
    finally:
        t.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _still_talks(a: socket.socket, b: socket.socket) -> bool:
    a.sendall(b"ping")
    return b.recv(4) == b"ping"


def test_an_accepted_connection_on_the_bound_address_is_shut_down_and_only_the_dup_closed(tcp: Tcp) -> None:
    local = bound_address(f"tcp://127.0.0.1:{tcp.port}")
    fds_before = set(os.listdir("/proc/self/fd"))
    assert refuse_connection(tcp.accepted.fileno(), local) is True
    # The peer sees the end of the stream; the owner's descriptor is still open (it closes it).
    assert tcp.client.recv(16) == b""
    assert _fd_open(tcp.accepted.fileno())
    assert set(os.listdir("/proc/self/fd")) == fds_before  # the duplicate was closed, nothing leaked
    assert tcp.accepted.recv(16) == b""  # and the owner reads EOF too (ZeroMQ then closes its fd)


def test_a_wildcard_bind_matches_its_port_on_any_address() -> None:
    t = Tcp("0.0.0.0")
    try:
        assert refuse_connection(t.accepted.fileno(), bound_address(f"tcp://0.0.0.0:{t.port}")) is True
        assert t.client.recv(16) == b""
    finally:
        t.close()


def test_the_listener_is_never_shut_down(tcp: Tcp) -> None:
    local = bound_address(f"tcp://127.0.0.1:{tcp.port}")
    assert refuse_connection(tcp.listener.fileno(), local) is False
    # Still accepting.
    c = socket.create_connection(("127.0.0.1", tcp.port), timeout=5)
    try:
        a, _ = tcp.listener.accept()
        a.close()
    finally:
        c.close()


def test_the_client_end_of_a_connection_to_the_bound_address_is_not_a_worker_connection(tcp: Tcp) -> None:
    # Its peer is the bound address, its own address an ephemeral port: a memcached connection of
    # the broker looks like this.
    local = bound_address(f"tcp://127.0.0.1:{tcp.port}")
    assert refuse_connection(tcp.client.fileno(), local) is False
    assert _still_talks(tcp.client, tcp.accepted) and _still_talks(tcp.accepted, tcp.client)


def test_a_connection_accepted_on_another_address_is_never_shut_down(tcp: Tcp) -> None:
    other = Tcp()
    try:
        local = bound_address(f"tcp://127.0.0.1:{tcp.port}")
        assert refuse_connection(other.accepted.fileno(), local) is False
        assert _still_talks(other.client, other.accepted)
    finally:
        other.close()


def test_a_descriptor_that_is_not_a_socket_or_is_closed_is_left_alone(tcp: Tcp) -> None:
    local = bound_address(f"tcp://127.0.0.1:{tcp.port}")
    r, w = os.pipe()
    try:
        assert refuse_connection(r, local) is False
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)
    closed = os.dup(tcp.accepted.fileno())
    os.close(closed)
    assert refuse_connection(closed, local) is False
    assert _still_talks(tcp.client, tcp.accepted)


def test_a_udp_socket_on_the_same_port_is_left_alone(tcp: Tcp) -> None:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", tcp.port))
        u.connect(("127.0.0.1", tcp.port))
        assert refuse_connection(u.fileno(), bound_address(f"tcp://127.0.0.1:{tcp.port}")) is False
    finally:
        u.close()


# --- refuse_connection, ipc (unix sockets) --------------------------------------------------------


class Unix:
    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.client.settimeout(5)
        self.client.connect(path)
        self.accepted, _ = self.listener.accept()
        self.accepted.settimeout(5)

    def close(self) -> None:
        for s in (self.client, self.accepted, self.listener):
            s.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mcb-cap-") as d:
        yield Path(d)


def test_ipc_an_accepted_connection_on_the_bound_path_is_shut_down(sockdir: Path) -> None:
    u = Unix(str(sockdir / "broker.sock"))
    try:
        assert refuse_connection(u.accepted.fileno(), bound_address(f"ipc://{u.path}")) is True
        assert u.client.recv(16) == b""
        assert _fd_open(u.accepted.fileno())
    finally:
        u.close()


def test_ipc_the_listener_the_client_end_and_another_path_are_left_alone(sockdir: Path) -> None:
    u = Unix(str(sockdir / "broker.sock"))
    other = Unix(str(sockdir / "memcached.sock"))
    try:
        local = bound_address(f"ipc://{u.path}")
        assert refuse_connection(u.listener.fileno(), local) is False
        assert refuse_connection(u.client.fileno(), local) is False  # unnamed: a memcached unix connection
        assert refuse_connection(other.accepted.fileno(), local) is False
        assert _still_talks(u.client, u.accepted) and _still_talks(other.client, other.accepted)
    finally:
        u.close()
        other.close()


def test_is_accepted_on_needs_a_peer(sockdir: Path) -> None:
    u = Unix(str(sockdir / "broker.sock"))
    try:
        local = bound_address(f"ipc://{u.path}")
        assert is_accepted_on(u.accepted, local)
        assert not is_accepted_on(u.listener, local)  # same address, no peer
    finally:
        u.close()


# --- peer_closed ---------------------------------------------------------------------------------


def test_peer_closed_tells_a_closed_peer_from_an_open_one_without_consuming(tcp: Tcp) -> None:
    fd = tcp.accepted.fileno()
    assert peer_closed(fd) is False  # open, nothing to read
    tcp.client.sendall(b"greeting")
    assert peer_closed(fd) is False  # open, data waiting
    assert tcp.accepted.recv(8) == b"greeting"  # the peek consumed nothing
    tcp.client.close()
    assert select.select([tcp.accepted], [], [], 5)[0]  # the FIN has arrived
    assert peer_closed(fd) is True
    assert _fd_open(fd)  # only its duplicate was closed


def test_peer_closed_counts_a_descriptor_that_is_not_a_connection_as_closed(tcp: Tcp) -> None:
    gone = os.dup(tcp.accepted.fileno())
    os.close(gone)
    assert peer_closed(gone) is True
    r, w = os.pipe()
    try:
        assert peer_closed(r) is True
    finally:
        os.close(r)
        os.close(w)


# --- is_accepted_on and peer_closed, directly -------------------------------------------------------


def test_is_accepted_on_matches_the_port_too(tcp: Tcp) -> None:
    other = Tcp()
    try:
        assert is_accepted_on(tcp.accepted, ("tcp", ("127.0.0.1", tcp.port))) is True
        assert is_accepted_on(tcp.accepted, ("tcp", ("127.0.0.1", other.port))) is False
        assert is_accepted_on(tcp.accepted, ("tcp", (None, other.port))) is False
    finally:
        other.close()


def test_is_accepted_on_never_takes_a_datagram_socket() -> None:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", 0))
        u.connect(u.getsockname())  # it even has a peer
        assert is_accepted_on(u, ("tcp", ("127.0.0.1", u.getsockname()[1]))) is False
        assert is_accepted_on(u, ("tcp", (None, u.getsockname()[1]))) is False
    finally:
        u.close()


def test_an_ipv4_connection_accepted_on_a_dual_stack_listener_matches_its_ipv4_address() -> None:
    # An IPv6 socket that also takes IPv4 names its address "::ffff:127.0.0.1" (RFC 4291 2.5.5.2).
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        accepted, _ = listener.accept()
        try:
            assert accepted.getsockname()[0] == "::ffff:127.0.0.1"
            assert is_accepted_on(accepted, ("tcp", ("127.0.0.1", port))) is True
            assert is_accepted_on(accepted, ("tcp", ("127.0.0.2", port))) is False
            # An IPv6 address keeps its full form: "::ffff:127.0.0.1" is not "::1".
            assert is_accepted_on(accepted, ("tcp", ("::1", port))) is False
            assert is_accepted_on(accepted, ("tcp", ("::ffff:127.0.0.1", port))) is True
            assert is_accepted_on(accepted, ("tcp", (None, port))) is True
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()


def test_an_abstract_ipc_connection_is_matched_by_its_name() -> None:
    name = f"mcb-abstract-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
        listener.listen(4)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect("\0" + name)
        accepted, _ = listener.accept()
        try:
            assert is_accepted_on(accepted, bound_address(f"ipc://@{name}")) is True
            assert is_accepted_on(accepted, bound_address(f"ipc://@{name}-other")) is False
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()


def test_a_listener_counts_as_closed_for_peer_closed(tcp: Tcp) -> None:
    # recv on a listener fails (ENOTCONN): not a connection, so closed.
    assert peer_closed(tcp.listener.fileno()) is True


def test_is_accepted_on_needs_the_transport_it_was_bound_with(tcp: Tcp, sockdir: Path) -> None:
    u = Unix(str(sockdir / "b.sock"))
    try:
        assert is_accepted_on(tcp.accepted, ("ipc", str(sockdir / "b.sock"))) is False
        assert is_accepted_on(u.accepted, ("tcp", (None, tcp.port))) is False
        assert is_accepted_on(u.accepted, ("ipc", str(sockdir / "b.sock"))) is True
    finally:
        u.close()
