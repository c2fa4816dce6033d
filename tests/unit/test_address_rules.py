"""clientlib/address.py at its boundaries, by the rules it follows (written out here):
- a unix socket path fits sun_path (108 bytes on Linux, one for the NUL): at most 107 bytes;
- systemd's RuntimeDirectory= with several entries is ':'-joined: the broker uses the first;
- every refusal names what was refused (the setting or address) and why."""

from __future__ import annotations

import os

import pytest

from clientlib.address import broker_bind_dir, check_connect_url, check_listen_url

pytestmark = pytest.mark.unit


def test_a_socket_path_of_107_bytes_is_accepted_and_108_refused() -> None:
    ok = "/" + "p" * 106
    assert len(ok.encode()) == 107
    assert check_listen_url(f"ipc://{ok}") == f"ipc://{ok}"
    assert check_connect_url(f"ipc://{ok}") == f"ipc://{ok}"
    long = ok + "p"
    for check in (check_listen_url, check_connect_url):
        with pytest.raises(ValueError, match="longer than 107 bytes"):
            check(f"ipc://{long}")


def test_path_length_counts_bytes_not_characters() -> None:
    path = "/" + "é" * 53  # 107 bytes in UTF-8
    assert check_listen_url(f"ipc://{path}")
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        check_listen_url(f"ipc://{path}x")


def test_runtime_directory_uses_the_first_of_several(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/first:/run/second:/run/third")
    assert broker_bind_dir() == "/run/first"


def test_refusals_name_the_address_and_the_reason() -> None:
    with pytest.raises(ValueError) as info:
        check_listen_url("ipc://relative.sock")
    assert "listen address 'ipc://relative.sock'" in str(info.value) and "absolute" in str(info.value)
    with pytest.raises(ValueError) as info:
        check_listen_url(7)  # type: ignore[arg-type]
    assert str(info.value) == "listen address must be a string, got int"
    with pytest.raises(ValueError) as info:
        check_listen_url("ipc:///tmp/a\0b")
    assert "listen address" in str(info.value) and "NUL" in str(info.value)


def test_connect_url_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from clientlib.address import default_connect_url

    monkeypatch.setenv("MCBROKER_URL", "127.0.0.1:11211")
    with pytest.raises(ValueError) as info:
        default_connect_url()
    assert "MCBROKER_URL" in str(info.value)
