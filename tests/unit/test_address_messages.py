"""clientlib.address.parse_server: every error names the address it refused (holes that mutation
testing found: the address text was not checked in the messages)."""

from __future__ import annotations

import pytest

from clientlib.address import parse_server

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text, words",
    [
        ("unix:relative.sock", "server address 'unix:relative.sock'"),
        ("[::1]:99999", "server address '[::1]:99999'"),
        ("cache:99999", "server address 'cache:99999'"),
        ("::1", "IPv6 addresses need brackets"),
        ("a:b:11211", "IPv6 addresses need brackets"),
    ],
)
def test_errors_name_the_address(text: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_server(text)
    assert words in str(info.value)


def test_a_non_string_names_its_type() -> None:
    with pytest.raises(ValueError) as info:
        parse_server(11211)  # type: ignore[arg-type]
    assert str(info.value) == "server address must be a string, got int"
