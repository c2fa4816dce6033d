"""clientlib's CURVE keys: from the Client's arguments or the environment, all three or none,
each 40 characters of Z85; with keys, the broker's host may be any host."""

from __future__ import annotations

import pytest
import zmq

from clientlib import AsyncClient, Client
from clientlib.curve import ENV, curve_keys

pytestmark = pytest.mark.unit

SECRET_PUBLIC = zmq.curve_keypair()
SERVER_PUBLIC, _ = zmq.curve_keypair()


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_no_keys_anywhere_means_no_curve():
    assert curve_keys() is None


def test_keys_from_arguments_str_or_bytes():
    public, secret = SECRET_PUBLIC
    k = curve_keys(secret.decode(), public, SERVER_PUBLIC.decode())
    assert k is not None and (k.secret, k.public, k.server) == (secret, public, SERVER_PUBLIC)


def test_keys_from_the_environment(monkeypatch):
    public, secret = SECRET_PUBLIC
    for name, value in zip(ENV, (secret, public, SERVER_PUBLIC)):
        monkeypatch.setenv(name, value.decode())
    k = curve_keys()
    assert k is not None and (k.secret, k.public, k.server) == (secret, public, SERVER_PUBLIC)


def test_arguments_win_over_the_environment(monkeypatch):
    other_public, other_secret = zmq.curve_keypair()
    for name, value in zip(ENV, (other_secret, other_public, SERVER_PUBLIC)):
        monkeypatch.setenv(name, value.decode())
    public, secret = SECRET_PUBLIC
    k = curve_keys(secret, public, SERVER_PUBLIC)
    assert k is not None and k.public == public


@pytest.mark.parametrize("missing", [0, 1, 2])
def test_a_missing_key_is_named(missing):
    public, secret = SECRET_PUBLIC
    args: list[bytes | None] = [secret, public, SERVER_PUBLIC]
    args[missing] = None
    with pytest.raises(ValueError, match=["curve_secretkey", "curve_publickey", "curve_serverkey"][missing]):
        curve_keys(*args)


def test_a_missing_environment_key_is_named(monkeypatch):
    monkeypatch.setenv(ENV[0], SECRET_PUBLIC[1].decode())
    with pytest.raises(ValueError, match="MCBROKER_CURVE_PUBLICKEY"):
        curve_keys()


@pytest.mark.parametrize("bad", [b"short", b"x" * 41, "é" * 40, b"\x00" * 40, b" " * 40])
def test_a_malformed_key_is_refused(bad):
    public, _ = SECRET_PUBLIC
    with pytest.raises(ValueError, match="Z85"):
        curve_keys(bad, public, SERVER_PUBLIC)


def test_a_key_of_the_wrong_type_is_a_type_error():
    public, _ = SECRET_PUBLIC
    with pytest.raises(TypeError):
        curve_keys(12345, public, SERVER_PUBLIC)  # type: ignore[arg-type]


def test_with_keys_a_remote_broker_address_is_accepted():
    public, secret = SECRET_PUBLIC
    for cls in (Client, AsyncClient):
        c = cls("tcp://10.1.2.3:5555", curve_secretkey=secret, curve_publickey=public, curve_serverkey=SERVER_PUBLIC)
        assert c.broker_url == "tcp://10.1.2.3:5555"


def test_without_keys_a_remote_broker_address_is_refused():
    with pytest.raises(ValueError, match="CURVE"):
        Client("tcp://10.1.2.3:5555")


# The errors name the Client keyword (or environment variable) the caller has to fix, as
# curve_keys' docstring promises: the whole name, not a string that merely contains it.
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_malformed_key_names_its_keyword_exactly(bad):
    public, secret = SECRET_PUBLIC
    args: list[bytes] = [secret, public, SERVER_PUBLIC]
    args[bad] = b"short"
    name = ["curve_secretkey", "curve_publickey", "curve_serverkey"][bad]
    with pytest.raises(ValueError, match=rf"^{name}: .*Z85"):
        curve_keys(*args)


def test_two_missing_keys_are_both_named_as_a_list():
    public, _ = SECRET_PUBLIC
    with pytest.raises(ValueError) as info:
        curve_keys(None, public, None)
    assert str(info.value).endswith("missing curve_secretkey, curve_serverkey")


def test_a_key_of_the_wrong_type_names_the_keyword_and_the_type():
    public, _ = SECRET_PUBLIC
    with pytest.raises(TypeError, match=r"^curve_secretkey must be str or bytes.*got int$"):
        curve_keys(12345, public, SERVER_PUBLIC)  # type: ignore[arg-type]
