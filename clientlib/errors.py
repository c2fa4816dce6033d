"""Exceptions raised by clientlib.

The first seven classes carry pymemcache's names and hierarchy so that code
written against ``pymemcache.exceptions`` keeps catching the same things when it
switches to clientlib. The broker classes sit under ``MemcacheError`` so a
blanket ``except MemcacheError`` still covers every failure this library raises.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MemcacheError",
    "MemcacheClientError",
    "MemcacheUnknownCommandError",
    "MemcacheIllegalInputError",
    "MemcacheServerError",
    "MemcacheUnknownError",
    "MemcacheUnexpectedCloseError",
    "BrokerError",
    "BrokerUnavailable",
    "BrokerTimeout",
    "BrokerOverloaded",
    "ServerUnavailable",
    "ProtocolMismatch",
]


class MemcacheError(Exception):
    """Base class of every exception raised by clientlib.

    When `get_many` / `gets_many` fail for some keys only (one of several servers down, timed
    out or failing), the first failure is raised and carries what the broker did answer:
    `partial`, the {key: value} (or {key: (value, cas)}) of the keys that were answered, as the
    call would have returned them, and `failed`, {key: exception} for the keys that failed. Both
    are None on every other exception (a get_many whose frame got no reply at all included). With
    ignore_exc=True such a call returns `partial` instead (failed keys read as misses).
    """

    partial: dict[Any, Any] | None = None
    failed: "dict[Any, MemcacheError] | None" = None


class MemcacheClientError(MemcacheError):
    """memcached rejected a request as malformed (its ``CLIENT_ERROR`` reply).

    Normally clientlib validates input before it leaves the worker, so seeing
    this points at a bug in clientlib or the broker, or a memcached version
    that disagrees about the protocol.
    """


class MemcacheUnknownCommandError(MemcacheClientError):
    """memcached did not recognise a command (its bare ``ERROR`` reply).

    Raised for commands the target memcached does not support, e.g. a meta
    command sent to a server too old to know it.
    """


class MemcacheIllegalInputError(MemcacheClientError):
    """A key, value, flag, expiry, delta or cas value is not legal for memcached.

    Raised in the worker process, before anything is sent: keys that are
    empty, longer than 250 bytes, contain whitespace or control bytes, or are
    non-ASCII text without ``allow_unicode_keys``; integers that are not ints;
    cas tokens that are not digits; values a serde cannot encode.
    """


class MemcacheServerError(MemcacheError):
    """memcached reported a failure while processing a request.

    Raised for its ``SERVER_ERROR`` replies (e.g. out of memory, object too
    large). The error belongs to that one request; others are unaffected.
    """


class MemcacheUnknownError(MemcacheError):
    """A reply could not be understood.

    Raised when a response from memcached (relayed by the broker) has a shape
    this library does not know, which suggests a version mismatch.
    """


class MemcacheUnexpectedCloseError(MemcacheServerError):
    """The connection to memcached closed while a request was in flight.

    Raised when the broker lost its connection to the key's server after the
    request was written; a write may or may not have been applied.
    """


class BrokerError(MemcacheError):
    """Base class for failures on the broker side of the worker/broker hop."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached, or went away.

    Raised when the broker's socket does not exist or refuses connections, or
    when the broker shut down (or restarted) with the request outstanding.
    """


class BrokerTimeout(BrokerError, TimeoutError):
    """No answer arrived within the call's deadline.

    Also a ``TimeoutError`` so generic timeout handling catches it. For a
    write the outcome is unknown: the broker may still have applied it.
    """


class BrokerOverloaded(BrokerError):
    """The broker refused the request because one of its bounds was hit.

    Raised when the broker answers with an overload status (too many requests
    in flight, queue full, per-client limit). Nothing was sent to memcached,
    so retrying later is safe.
    """


class ServerUnavailable(MemcacheServerError):
    """The memcached server that owns the key is down.

    Raised when the broker has marked the server down after repeated
    failures, or its connection was refused. Nothing was sent to memcached.
    """


class ProtocolMismatch(BrokerError):
    """The worker and the broker do not speak the same wire protocol.

    Raised when the broker's reply carries a different wire version, or a
    reply frame is malformed (bad msgpack, wrong shape, unknown status).
    """


def _wire_errors() -> dict[int, type[MemcacheError]]:
    from .wire import Code

    return {
        Code.SERVER_ERROR: MemcacheServerError,
        Code.CLIENT_ERROR: MemcacheClientError,
        Code.UNKNOWN_COMMAND: MemcacheUnknownCommandError,
        Code.CONNECTION_ERROR: MemcacheUnexpectedCloseError,
        Code.TIMEOUT: BrokerTimeout,
        Code.OVERLOADED: BrokerOverloaded,
        Code.SERVER_DOWN: ServerUnavailable,
        Code.BAD_REQUEST: MemcacheClientError,
        Code.UNSUPPORTED_VERSION: ProtocolMismatch,
        Code.SHUTTING_DOWN: BrokerUnavailable,
    }


_BY_CODE = _wire_errors()


def error_for(code: int, message: object) -> MemcacheError:
    """The exception for a wire failure code (clientlib.wire.Code): the one place where the
    broker's failure codes become exceptions. Unknown codes are server errors."""
    return _BY_CODE.get(code, MemcacheServerError)(str(message))
