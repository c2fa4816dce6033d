"""Who may connect to the broker: the ZAP handler the loop runs, for every listener.

ZeroMQ asks the ZAP handler (ZeroMQ RFC 27, at inproc://zeromq.zap.01) about every new connection
before it accepts a single frame from it. Two jobs:

- CURVE (TCP listeners, when configured): only the client public keys found in the allowed
  directory (`*.key` files, as pyzmq's zmq.auth reads them with `configure_curve(location=...)`)
  are accepted; the rest are refused for good (status 400: ZeroMQ does not retry).
- max_clients (every listener): before answering, the loop takes ZeroMQ's accept events and
  settles the connections waiting for a slot (`before_answer`, Front.admit), shutting down those
  past max_clients. ZeroMQ emits a connection's accept event before its ZAP request, so a refused
  connection is shut down while its handshake waits for this answer: it never delivers a frame,
  and its peer sees a plain disconnect and reconnects later. (Refusing through a ZAP status instead was tried: libzmq
  4.3.5 then drops the connection for good or retries it, nondeterministically, even for status
  300 "try later". So the answer here is never a refusal for the cap, only for a CURVE key.)

No thread: the loop polls the ZAP socket, and a handshake costs one request and one reply. Nothing
here runs per frame.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

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
    """The ZAP handler of every listener; checks CURVE keys when `curve` is given."""

    def __init__(self, ctx: "zmq.Context[Any]", curve: CurveKeys | None = None) -> None:
        self.curve = curve
        self.zap: "zmq.Socket[Any]" = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.accepted = 0
        self.refused = 0
        # Run before each batch of answers: the front's accept events (max_clients).
        self.before_answer: Callable[[], object] | None = None

    def guard(self, sock: "zmq.Socket[Any]", tcp: bool) -> None:
        """Make `sock` (a ROUTER, before its bind) ask this handler about every connection: a
        CURVE server for TCP when CURVE is configured, else with ZeroMQ's NULL mechanism (ipc
        stays guarded by the file system)."""
        sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
        if tcp and self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)

    def set_allowed(self, curve: CurveKeys) -> None:
        """New allowed client keys (a reload); the server key pair stays until restart."""
        if self.curve is not None:
            self.curve = CurveKeys(self.curve.public, self.curve.secret, curve.allowed)

    def on_zap(self) -> None:
        """Answer every ZAP request waiting (call when the ZAP socket is readable)."""
        while True:
            try:
                msg = self.zap.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            if self.before_answer is not None:
                # This request's connection was accepted before it was sent: its accept event
                # is there to take, and a connection past max_clients is shut down before the
                # answer lets its handshake finish.
                self.before_answer()
            self.zap.send_multipart(self._answer(msg))

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6 or msg[0] != ZAP_VERSION:
            request_id = msg[1] if len(msg) > 1 else b""
            return [ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        request_id, address, mechanism = msg[1], msg[3], msg[5]
        if self.curve is None or mechanism == b"NULL":
            # Sockets without CURVE (ipc, or no CURVE configured) use NULL; a CURVE socket
            # never sends a NULL request.
            return [ZAP_VERSION, request_id, b"200", b"OK", b"", b""]
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
