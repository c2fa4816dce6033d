"""What users call is written out: every public method of Client and AsyncClient is a real function
of its class with pymemcache's signature and a docstring (help(Client.get) shows them), nothing
generated with setattr; AsyncClient offers the same calls as coroutines."""

from __future__ import annotations

import inspect
import pydoc

import pytest

from clientlib import AsyncClient, Client, MockClient

pytestmark = pytest.mark.unit

CALLS = [
    "get", "gets", "gat", "gats", "get_many", "gets_many", "set", "add", "replace", "append", "prepend",
    "cas", "set_many", "delete", "delete_many", "incr", "decr", "touch", "stats", "version", "flush_all",
    "cache_memlimit", "broker_ping", "broker_stats", "close", "disconnect_all", "quit",
]
# pymemcache 4's parameter names, in order (after self).
SIGNATURES = {
    "get": ["key", "default"],
    "gets": ["key", "default", "cas_default"],
    "get_many": ["keys"],
    "gets_many": ["keys"],
    "set": ["key", "value", "expire", "noreply", "flags"],
    "add": ["key", "value", "expire", "noreply", "flags"],
    "replace": ["key", "value", "expire", "noreply", "flags"],
    "append": ["key", "value", "expire", "noreply", "flags"],
    "prepend": ["key", "value", "expire", "noreply", "flags"],
    "cas": ["key", "value", "cas", "expire", "noreply", "flags"],
    "set_many": ["values", "expire", "noreply", "flags"],
    "delete": ["key", "noreply"],
    "delete_many": ["keys", "noreply"],
    "incr": ["key", "value", "noreply"],
    "decr": ["key", "value", "noreply"],
    "touch": ["key", "expire", "noreply"],
    "stats": ["args"],
    "version": [],
    "flush_all": ["delay", "noreply"],
    "cache_memlimit": ["memlimit"],
}


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("name", CALLS)
def test_written_out_with_a_docstring(cls: type, name: str) -> None:
    fn = cls.__dict__.get(name)
    assert inspect.isfunction(fn), f"{cls.__name__}.{name} is not defined in the class body"
    assert fn.__qualname__ == f"{cls.__name__}.{name}"
    assert fn.__doc__ and len(fn.__doc__.strip()) > 10
    assert inspect.getsourcefile(fn).endswith("clientlib/client.py")
    if cls is AsyncClient:
        assert inspect.iscoroutinefunction(fn), name


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("name", list(SIGNATURES))
def test_pymemcache_signatures(cls: type, name: str) -> None:
    params = list(inspect.signature(getattr(cls, name)).parameters)
    assert params[0] == "self" and params[1:] == SIGNATURES[name]


def test_help_shows_the_real_signature() -> None:
    text = pydoc.render_doc(Client.get, renderer=pydoc.plaintext)
    assert "get(self, key: 'Key', default: 'Any' = None) -> 'Any'" in text
    assert "default" in text and "miss" in text
    assert "set(self, key: 'Key', value: 'Any', expire: 'int' = 0" in pydoc.render_doc(Client.set, renderer=pydoc.plaintext)


def test_aliases_are_the_same_functions() -> None:
    for cls in (Client, AsyncClient):
        assert cls.get_multi is cls.get_many
        assert cls.set_multi is cls.set_many
        assert cls.delete_multi is cls.delete_many


def test_constructor_signature_is_spelled_out() -> None:
    for cls in (Client, AsyncClient):
        params = inspect.signature(cls).parameters
        assert list(params)[:2] == ["broker", "timeout"]
        assert "kwargs" not in params
        for name in ("serde", "key_prefix", "allow_unicode_keys", "default_noreply", "ignore_exc", "max_frame_bytes"):
            assert name in params
    assert "item_size_max" in inspect.signature(MockClient).parameters
