"""clientlib: what worker processes import to reach memcached through the local mcbroker.

`Client` is a drop-in for pymemcache's `Client`; `AsyncClient` offers the same calls as coroutines.
"""

from .client import AsyncClient, Client
from .errors import (
    BrokerError,
    BrokerOverloaded,
    BrokerTimeout,
    BrokerUnavailable,
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
    ProtocolMismatch,
    ServerUnavailable,
)
from .mock import MockClient
from .serde import CompressedSerde, PickleSerde

__all__ = [
    "AsyncClient", "Client", "CompressedSerde", "MockClient", "PickleSerde", "BrokerError", "BrokerOverloaded",
    "BrokerTimeout", "BrokerUnavailable", "MemcacheClientError", "MemcacheError",
    "MemcacheIllegalInputError", "MemcacheServerError", "MemcacheUnexpectedCloseError",
    "MemcacheUnknownCommandError", "MemcacheUnknownError", "ProtocolMismatch", "ServerUnavailable",
]
