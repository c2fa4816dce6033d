"""The client's CURVE keys (ZeroMQ's authentication and encryption) for a broker on TCP.

A broker with CURVE configured (`curve_secret_key_file`, `curve_allowed_clients`) accepts only
clients whose public key it lists. The client needs its own key pair and the broker's public
key, as Client arguments or from the environment:

    MCBROKER_CURVE_SECRETKEY   this client's secret key
    MCBROKER_CURVE_PUBLICKEY   this client's public key
    MCBROKER_CURVE_SERVERKEY   the broker's public key

Each is Z85 text of 40 characters (what `mcbroker curve-keygen` and pyzmq's zmq.auth write in
their key files). All three or none. No I/O here beyond reading the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = ("MCBROKER_CURVE_SECRETKEY", "MCBROKER_CURVE_PUBLICKEY", "MCBROKER_CURVE_SERVERKEY")
_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


@dataclass(frozen=True)
class CurveKeys:
    """Z85 keys, 40 bytes each."""

    secret: bytes
    public: bytes
    server: bytes


def _key(name: str, value: str | bytes) -> bytes:
    if isinstance(value, str):
        try:
            value = value.strip().encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{name}: a CURVE key is 40 characters of Z85 text, got non-ASCII text") from None
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be str or bytes (40 characters of Z85 text), got {type(value).__name__}")
    if len(value) != 40 or not set(value) <= _Z85:
        raise ValueError(f"{name}: a CURVE key is 40 characters of Z85 text (mcbroker curve-keygen), got {len(value)} bytes")
    return value


def curve_keys(
    secret: str | bytes | None = None, public: str | bytes | None = None, server: str | bytes | None = None
) -> CurveKeys | None:
    """The keys from the arguments, else from the environment (all from one source); None when
    neither gives any. Raises ValueError naming the key that is missing or malformed."""
    given = (secret, public, server)
    names: tuple[str, ...] = ("curve_secretkey", "curve_publickey", "curve_serverkey")
    values: tuple[str | bytes | None, ...] = given
    if all(v is None for v in given):
        values = tuple(os.environ.get(name) or None for name in ENV)
        names = ENV
        if all(v is None for v in values):
            return None
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise ValueError(f"CURVE needs all three keys; missing {', '.join(missing)}")
    s, p, v = (_key(n, k) for n, k in zip(names, values) if k is not None)
    return CurveKeys(secret=s, public=p, server=v)
