"""The broker address is checked when a Client is made (issue 8, item 4): a memcached-style
host:port, a relative ipc path or another scheme is refused at once with an error that names the
accepted forms, the same in Client, AsyncClient and MCBROKER_URL; nothing is left to fail later
as a raw ZeroMQ error."""

from __future__ import annotations

from typing import Any

import pytest

from clientlib import AsyncClient, Client, MockClient
from clientlib.address import CONNECT_FORMS, check_connect_url

pytestmark = pytest.mark.unit

BAD = [
    ("memcached host:port", "127.0.0.1:11211"),
    ("host name and port", "localhost:11211"),
    ("bare path", "/run/mcbroker/mcbroker.sock"),
    ("relative ipc path", "ipc://run/mcbroker.sock"),
    ("ipc without path", "ipc://"),
    ("tcp without port", "tcp://127.0.0.1"),
    ("tcp port 0", "tcp://127.0.0.1:0"),
    ("tcp port too big", "tcp://127.0.0.1:70000"),
    ("tcp port not a number", "tcp://127.0.0.1:http"),
    ("tcp not loopback", "tcp://10.0.0.1:5555"),
    ("tcp wildcard", "tcp://*:5555"),
    ("other scheme", "udp://127.0.0.1:5555"),
    ("inproc", "inproc://broker"),
    ("NUL in path", "ipc:///tmp/a\0b"),
    ("path too long", "ipc:///" + "a" * 200),
]
GOOD = [
    "ipc:///run/mcbroker/mcbroker.sock",
    "ipc:///tmp/mcb-1000/mcbroker.sock",
    "tcp://127.0.0.1:5555",
    "tcp://127.0.0.2:1",
    "tcp://localhost:65535",
    "tcp://[::1]:5555",
]


@pytest.mark.parametrize("label,url", BAD, ids=[b[0] for b in BAD])
def test_client_refuses_a_bad_address_naming_the_forms(label: str, url: str) -> None:
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError) as info:
            make(url)
        assert CONNECT_FORMS in str(info.value)
        assert "ipc:///" in str(info.value) and "tcp://127.0.0.1:PORT" in str(info.value)


def test_the_common_mistake_is_explained() -> None:
    with pytest.raises(ValueError, match="memcached host:port is not a broker address"):
        Client("127.0.0.1:11211")


BAD_ENV = [b for b in BAD if "\0" not in b[1]]  # an environment variable cannot hold a NUL byte


@pytest.mark.parametrize("label,url", BAD_ENV, ids=[b[0] for b in BAD_ENV])
def test_mcbroker_url_is_checked_the_same_way(monkeypatch: pytest.MonkeyPatch, label: str, url: str) -> None:
    monkeypatch.setenv("MCBROKER_URL", url)
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError) as info:
            make()
        assert "MCBROKER_URL" in str(info.value) and CONNECT_FORMS in str(info.value)


@pytest.mark.parametrize("url", GOOD)
def test_good_addresses_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    assert check_connect_url(url) == url
    assert Client(url).broker_url == url
    assert AsyncClient(url).broker_url == url
    monkeypatch.setenv("MCBROKER_URL", url)
    assert Client().broker_url == url


def test_not_a_string_is_a_type_error() -> None:
    for bad in (("127.0.0.1", 11211), b"ipc:///x", 5):
        with pytest.raises(TypeError, match="broker"):
            Client(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="broker"):
            AsyncClient(bad)  # type: ignore[arg-type]


def test_mock_client_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # It never connects anywhere, so a broken MCBROKER_URL must not break tests that use it.
    monkeypatch.setenv("MCBROKER_URL", "127.0.0.1:11211")
    m: Any = MockClient()
    assert m.set("a", b"1") is True and m.get("a") == b"1"
