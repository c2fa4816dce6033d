"""clientlib.errors: pymemcache's hierarchy and the one map from the broker's failure codes to
exceptions (the docstrings of each class state which reply it stands for)."""

from __future__ import annotations

import pytest

from clientlib import errors
from clientlib.errors import (
    BrokerError, BrokerOverloaded, BrokerTimeout, BrokerUnavailable, MemcacheClientError, MemcacheError,
    MemcacheServerError, MemcacheUnexpectedCloseError, MemcacheUnknownCommandError, ProtocolMismatch,
    ServerUnavailable, error_for,
)
from clientlib.wire import Code

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "code, cls",
    [
        (Code.SERVER_ERROR, MemcacheServerError),  # memcached's SERVER_ERROR
        (Code.CLIENT_ERROR, MemcacheClientError),  # memcached's CLIENT_ERROR
        (Code.UNKNOWN_COMMAND, MemcacheUnknownCommandError),  # memcached's bare ERROR
        (Code.CONNECTION_ERROR, MemcacheUnexpectedCloseError),
        (Code.TIMEOUT, BrokerTimeout),
        (Code.OVERLOADED, BrokerOverloaded),
        (Code.SERVER_DOWN, ServerUnavailable),
        (Code.BAD_REQUEST, MemcacheClientError),
        (Code.UNSUPPORTED_VERSION, ProtocolMismatch),
        (Code.SHUTTING_DOWN, BrokerUnavailable),
    ],
)
def test_each_failure_code_has_its_exception(code: Code, cls: type[MemcacheError]) -> None:
    exc = error_for(int(code), "what the broker said")
    assert type(exc) is cls
    assert str(exc) == "what the broker said"
    assert exc.partial is None and exc.failed is None


@pytest.mark.parametrize("code", [max(int(c) for c in Code) + 1, 250, 10_000, -1])
def test_an_unknown_failure_code_is_a_server_error(code: int) -> None:
    # error_for's docstring: "Unknown codes are server errors" (a newer broker's new code must
    # not crash an older client with a TypeError).
    exc = error_for(code, b"new")
    assert type(exc) is MemcacheServerError
    assert str(exc) == "b'new'"


def test_the_hierarchy_is_pymemcaches_plus_the_broker_classes() -> None:
    # pymemcache.exceptions: UnknownCommand < Client < Error; UnexpectedClose < Server < Error.
    assert issubclass(MemcacheUnknownCommandError, MemcacheClientError)
    assert issubclass(MemcacheUnexpectedCloseError, MemcacheServerError)
    assert issubclass(errors.MemcacheIllegalInputError, MemcacheClientError)
    assert issubclass(errors.MemcacheUnknownError, MemcacheError)
    assert issubclass(BrokerTimeout, TimeoutError) and issubclass(BrokerTimeout, BrokerError)
    assert issubclass(ServerUnavailable, MemcacheServerError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), MemcacheError)
