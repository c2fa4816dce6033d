"""The transport's one translation of library exceptions into clientlib's (no processes)."""

from __future__ import annotations

import errno

import msgpack
import pytest
import zmq

from clientlib.errors import (
    BrokerTimeout, BrokerUnavailable, MemcacheError, MemcacheUnknownError, ProtocolMismatch,
)
from clientlib.transport import _ErrorMap, translate
from clientlib.wire import Code, WireError

pytestmark = pytest.mark.unit

URL = "ipc:///run/mcbroker/mcbroker.sock"


@pytest.mark.parametrize(
    "exc,expected",
    [
        (zmq.Again(), BrokerTimeout),
        (TimeoutError(), BrokerTimeout),
        (zmq.ContextTerminated(), BrokerUnavailable),
        (zmq.ZMQError(errno.EINVAL), BrokerUnavailable),
        (zmq.ZMQError(errno.ENOTSOCK), BrokerUnavailable),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), BrokerUnavailable),
        (OSError(errno.EMFILE, "too many open files"), BrokerUnavailable),
        (msgpack.ExtraData(1, b""), ProtocolMismatch),
        (msgpack.FormatError("bad"), ProtocolMismatch),
        (WireError(Code.BAD_REQUEST, "bad"), ProtocolMismatch),
        (RuntimeError("surprise"), MemcacheUnknownError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_translate(exc: BaseException, expected: type[MemcacheError]) -> None:
    got = translate(exc, URL)
    assert type(got) is expected
    assert URL in str(got)


def test_error_map_translates_once_and_keeps_the_cause() -> None:
    with pytest.raises(BrokerUnavailable) as info:
        with _ErrorMap(URL):
            raise zmq.ZMQError(errno.EINVAL)
    assert isinstance(info.value.__cause__, zmq.ZMQError)


@pytest.mark.parametrize("exc", [BrokerTimeout("x"), KeyboardInterrupt(), SystemExit(1)])
def test_error_map_lets_ours_and_non_errors_through(exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        with _ErrorMap(URL):
            raise exc


def test_error_map_is_silent_without_an_error() -> None:
    with _ErrorMap(URL):
        pass
