"""Who may connect to the broker's TCP listeners: CURVE keys checked by a ZAP handler the loop runs.

With CURVE configured, ZeroMQ asks the ZAP handler (ZeroMQ RFC 27, at inproc://zeromq.zap.01)
about every new connection to a CURVE listener, before it accepts a single frame from it. This one
accepts only the client public keys found in the allowed directory (`*.key` files, as pyzmq's
zmq.auth reads them with `configure_curve(location=...)`) and refuses the rest for good (status
400: ZeroMQ does not retry). No thread: the loop polls the ZAP socket, and a handshake costs one
request and one reply. Nothing here runs per frame, and nothing at all without CURVE.

Not done here, on purpose: a cap on the number of worker connections through ZAP. Tried: libzmq
4.3.5 drops a refused connection for good or retries it, nondeterministically (a refusal with
status 300 "try later" still ended most clients' sockets), so a worker refused during a spike
would never be served again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85

log = logging.getLogger("mcbroker.access")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
DOMAIN = b"mcbroker"
_NOBLOCK = int(zmq.NOBLOCK)


class AccessError(ValueError):
    """CURVE keys that cannot be loaded; the message names the file and the reason."""


@dataclass(frozen=True)
class CurveKeys:
    """The broker's CURVE key pair and the client public keys it accepts (z85, 40 bytes each)."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]


def load_curve(secret_key_file: str, allowed_dir: str) -> CurveKeys:
    """Read the broker's key pair (a zmq.auth secret certificate, as `mcbroker curve-keygen`
    writes) and every client public key (`*.key`) in `allowed_dir`. Raises AccessError."""
    try:
        public, secret = zmq.auth.load_certificate(secret_key_file)
    except (OSError, ValueError) as exc:
        raise AccessError(f"curve_secret_key_file {secret_key_file!r}: {exc}") from None
    if secret is None:
        raise AccessError(
            f"curve_secret_key_file {secret_key_file!r} holds no secret key (the .key_secret file, not the public .key)"
        )
    if not os.path.isdir(allowed_dir):
        raise AccessError(f"curve_allowed_clients {allowed_dir!r} is not a directory")
    try:
        allowed = zmq.auth.load_certificates(allowed_dir)
    except (OSError, ValueError) as exc:
        raise AccessError(f"curve_allowed_clients {allowed_dir!r}: {exc}") from None
    if not allowed:
        log.warning("curve_allowed_clients %s holds no client public key (*.key): every client is refused", allowed_dir)
    return CurveKeys(public=public, secret=secret, allowed=frozenset(allowed))


class Access:
    """The ZAP handler for the CURVE listeners (made only when CURVE is configured)."""

    def __init__(self, ctx: "zmq.Context[Any]", curve: CurveKeys) -> None:
        self.curve = curve
        self.zap: "zmq.Socket[Any]" = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.accepted = 0
        self.refused = 0

    def secure(self, sock: "zmq.Socket[Any]") -> None:
        """Make `sock` (a ROUTER, before its bind) a CURVE server checked by this handler."""
        sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)

    def set_allowed(self, curve: CurveKeys) -> None:
        """New allowed client keys (a reload); the server key pair stays until restart."""
        self.curve = CurveKeys(self.curve.public, self.curve.secret, curve.allowed)

    def on_zap(self) -> None:
        """Answer every ZAP request waiting (call when the ZAP socket is readable)."""
        while True:
            try:
                msg = self.zap.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(self._answer(msg))

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6 or msg[0] != ZAP_VERSION:
            request_id = msg[1] if len(msg) > 1 else b""
            return [ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        request_id, address, mechanism = msg[1], msg[3], msg[5]
        if mechanism != b"CURVE" or len(msg) != 7 or len(msg[6]) != 32:
            self.refused += 1
            return [ZAP_VERSION, request_id, b"400", b"CURVE required", b"", b""]
        key = zmq.utils.z85.encode(msg[6])
        if key not in self.curve.allowed:
            self.refused += 1
            log.warning(
                "refused a CURVE client from %s: public key %s is not in curve_allowed_clients",
                address.decode(errors="replace"), key.decode(),
            )
            return [ZAP_VERSION, request_id, b"400", b"client key not allowed", b"", b""]
        self.accepted += 1
        return [ZAP_VERSION, request_id, b"200", b"OK", key, b""]

    def close(self) -> None:
        self.zap.close(linger=0)
