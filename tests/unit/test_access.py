"""broker/access.py, the ZAP handler, in this process over inproc sockets, by ZeroMQ RFC 27 (ZAP):

- a request is [version "1.0", request id, domain, address, identity, mechanism, credentials...];
- a reply is [version "1.0", the request's id, status code, status text, user id, metadata], where
  "200" accepts and "400" refuses for good;
- a CURVE request carries one credential, the client's 32-byte public key; the broker accepts it
  when its z85 form (ZeroMQ RFC 32) is one of the allowed `*.key` certificates (pyzmq's zmq.auth);

and the broker's rules: NULL (ipc, or no CURVE configured) is accepted without a check, a CURVE
socket sends no NULL request, the user id of an accepted CURVE client is its z85 public key."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
import zmq.auth
import zmq.utils.z85

from broker.access import DOMAIN, ZAP_ENDPOINT, ZAP_VERSION, Access, AccessError, CurveKeys, load_curve

pytestmark = pytest.mark.unit


@pytest.fixture
def ctx() -> Iterator["zmq.Context[Any]"]:
    c: zmq.Context[Any] = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


@pytest.fixture
def keys(tmp_path) -> dict[str, Any]:
    """A broker key pair and two client key pairs, one of them allowed."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    server_pub, server_secret = zmq.auth.create_certificates(str(tmp_path), "broker")
    good_pub, good_secret = zmq.auth.create_certificates(str(tmp_path), "good")
    bad_pub, _ = zmq.auth.create_certificates(str(tmp_path), "bad")
    os.rename(good_pub, allowed / "good.key")
    good_z85, _ = zmq.auth.load_certificate(str(allowed / "good.key"))
    bad_z85, _ = zmq.auth.load_certificate(bad_pub)
    return {
        "secret_file": server_secret, "public_file": server_pub, "allowed": str(allowed),
        "good": good_z85, "bad": bad_z85, "good_secret_file": good_secret,
        "bad_secret_file": bad_pub + "_secret",
    }


def test_zap_names_are_rfc_27s():
    assert ZAP_ENDPOINT == "inproc://zeromq.zap.01"
    assert ZAP_VERSION == b"1.0"
    assert DOMAIN == b"mcbroker"


def test_load_curve_reads_the_pair_and_the_allowed_keys(keys, tmp_path):
    pub, secret = zmq.auth.load_certificate(keys["secret_file"])
    curve = load_curve(keys["secret_file"], keys["allowed"])
    assert curve == CurveKeys(public=pub, secret=secret, allowed=frozenset({keys["good"]}))
    assert len(curve.public) == len(curve.secret) == 40  # z85 of 32 bytes
    assert keys["bad"] not in curve.allowed


def test_load_curve_a_public_key_file_is_not_a_secret_key(keys):
    with pytest.raises(AccessError) as info:
        load_curve(keys["public_file"], keys["allowed"])
    text = str(info.value)
    assert text.startswith(f"curve_secret_key_file {keys['public_file']!r} holds no secret key")


def test_load_curve_a_missing_secret_key_file(keys, tmp_path):
    missing = str(tmp_path / "nope.key_secret")
    with pytest.raises(AccessError) as info:
        load_curve(missing, keys["allowed"])
    assert str(info.value).startswith(f"curve_secret_key_file {missing!r}: ")
    assert "nope.key_secret" in str(info.value) and info.value.__cause__ is None


def test_load_curve_a_file_without_keys(keys, tmp_path):
    junk = tmp_path / "junk.key_secret"
    junk.write_text("# nothing here\n")
    with pytest.raises(AccessError) as info:
        load_curve(str(junk), keys["allowed"])
    assert str(info.value).startswith(f"curve_secret_key_file {str(junk)!r}: ") and "No public key" in str(info.value)


def test_load_curve_allowed_must_be_a_directory(keys, tmp_path):
    for where in (str(tmp_path / "missing"), keys["public_file"]):
        with pytest.raises(AccessError) as info:
            load_curve(keys["secret_file"], where)
        assert str(info.value) == f"curve_allowed_clients {where!r} is not a directory"


def test_load_curve_a_bad_file_among_the_allowed_keys(keys):
    with open(os.path.join(keys["allowed"], "broken.key"), "w") as f:
        f.write("not a certificate\n")
    with pytest.raises(AccessError) as info:
        load_curve(keys["secret_file"], keys["allowed"])
    assert str(info.value).startswith(f"curve_allowed_clients {keys['allowed']!r}: ")
    assert "broken.key" in str(info.value)


def test_load_curve_no_allowed_key_is_a_warning_not_an_error(keys, tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("public keys go here as *.key\n")
    with caplog.at_level(logging.WARNING, logger="mcbroker.access"):
        curve = load_curve(keys["secret_file"], str(empty))
    assert curve.allowed == frozenset()
    [record] = [r for r in caplog.records if r.name == "mcbroker.access"]
    assert record.levelno == logging.WARNING
    assert str(empty) in record.getMessage() and "every client is refused" in record.getMessage()


def test_load_curve_with_allowed_keys_does_not_warn(keys, caplog):
    with caplog.at_level(logging.DEBUG, logger="mcbroker.access"):
        load_curve(keys["secret_file"], keys["allowed"])
    assert not [r for r in caplog.records if r.name == "mcbroker.access"]


def _request(rid: bytes, mechanism: bytes, *credentials: bytes, address: bytes = b"127.0.0.1") -> list[bytes]:
    return [b"1.0", rid, DOMAIN, address, b"", mechanism, *credentials]


def _raw(z85_key: bytes) -> bytes:
    return zmq.utils.z85.decode(z85_key)


def test_without_curve_every_request_is_accepted(ctx):
    access = Access(ctx)
    try:
        assert access._answer(_request(b"r1", b"NULL")) == [b"1.0", b"r1", b"200", b"OK", b"", b""]
        assert access._answer(_request(b"r2", b"PLAIN", b"user", b"pw")) == [b"1.0", b"r2", b"200", b"OK", b"", b""]
        assert (access.accepted, access.refused) == (0, 0)  # only CURVE decisions are counted
    finally:
        access.close()


@pytest.mark.parametrize(
    "msg, rid",
    [([], b""), ([b"1.0"], b""), ([b"1.0", b"r9"], b"r9"), ([b"1.0", b"r9", b"d", b"a", b"i"], b"r9"),
     ([b"2.0", b"r8", DOMAIN, b"a", b"", b"NULL"], b"r8")],
)
def test_a_malformed_request_is_refused_with_its_id(ctx, msg, rid):
    access = Access(ctx)
    try:
        assert access._answer(msg) == [b"1.0", rid, b"400", b"malformed ZAP request", b"", b""]
    finally:
        access.close()


def test_curve_accepts_an_allowed_key_and_names_it_as_the_user(ctx, keys):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    try:
        got = access._answer(_request(b"r3", b"CURVE", _raw(keys["good"])))
        assert got == [b"1.0", b"r3", b"200", b"OK", keys["good"], b""]
        assert (access.accepted, access.refused) == (1, 0)
    finally:
        access.close()


def test_curve_refuses_a_key_not_allowed_and_logs_it(ctx, keys, caplog):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    try:
        with caplog.at_level(logging.WARNING, logger="mcbroker.access"):
            got = access._answer(_request(b"r4", b"CURVE", _raw(keys["bad"]), address=b"10.1.2.3"))
        assert got == [b"1.0", b"r4", b"400", b"client key not allowed", b"", b""]
        assert (access.accepted, access.refused) == (0, 1)
        [record] = [r for r in caplog.records if r.name == "mcbroker.access"]
        assert "10.1.2.3" in record.getMessage() and keys["bad"].decode() in record.getMessage()
    finally:
        access.close()


def test_curve_socket_still_answers_null_requests_of_other_listeners(ctx, keys):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    try:
        assert access._answer(_request(b"r5", b"NULL")) == [b"1.0", b"r5", b"200", b"OK", b"", b""]
        assert (access.accepted, access.refused) == (0, 0)
    finally:
        access.close()


@pytest.mark.parametrize(
    "mechanism, credentials",
    [(b"PLAIN", (b"user", b"pw")), (b"CURVE", ()), (b"CURVE", (b"\x00" * 31,)), (b"CURVE", (b"\x00" * 33,)),
     (b"CURVE", (b"\x00" * 32, b"extra")), (b"GSSAPI", (b"\x00" * 32,))],
)
def test_curve_refuses_anything_but_one_32_byte_curve_key(ctx, keys, mechanism, credentials):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    try:
        got = access._answer(_request(b"r6", mechanism, *credentials))
        assert got == [b"1.0", b"r6", b"400", b"CURVE required", b"", b""]
        assert (access.accepted, access.refused) == (0, 1)
    finally:
        access.close()


def test_set_allowed_replaces_the_keys_but_not_the_pair(ctx, keys, tmp_path):
    curve = load_curve(keys["secret_file"], keys["allowed"])
    access = Access(ctx, curve)
    try:
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        other_pub, other_secret = zmq.auth.create_certificates(str(other_dir), "other")
        os.rename(keys["public_file"].replace("broker.key", "bad.key"), other_dir / "bad.key")
        reloaded = load_curve(other_secret, str(other_dir))  # another pair in the reload is ignored
        access.set_allowed(reloaded)
        assert access.curve is not None
        assert (access.curve.public, access.curve.secret) == (curve.public, curve.secret)
        assert keys["bad"] in access.curve.allowed and keys["good"] not in access.curve.allowed
        assert access._answer(_request(b"r7", b"CURVE", _raw(keys["bad"])))[2] == b"200"
        assert access._answer(_request(b"r8", b"CURVE", _raw(keys["good"])))[2] == b"400"
    finally:
        access.close()


def test_set_allowed_without_curve_stays_without(ctx, keys):
    access = Access(ctx)
    try:
        access.set_allowed(load_curve(keys["secret_file"], keys["allowed"]))
        assert access.curve is None  # CURVE is switched on by a restart, not a reload
    finally:
        access.close()


def test_guard_sets_the_zap_domain_and_curve_server_for_tcp_only(ctx, keys):
    curve = load_curve(keys["secret_file"], keys["allowed"])
    access = Access(ctx, curve)
    plain = Access.__new__(Access)
    plain.curve = None
    socks = [ctx.socket(zmq.ROUTER) for _ in range(3)]
    try:
        access.guard(socks[0], tcp=True)
        access.guard(socks[1], tcp=False)
        plain.guard(socks[2], tcp=True)
        for s in socks:
            assert s.getsockopt(zmq.ZAP_DOMAIN) == b"mcbroker"
        assert socks[0].getsockopt(zmq.CURVE_SERVER) == 1
        assert socks[0].getsockopt(zmq.MECHANISM) == zmq.CURVE
        for s in socks[1:]:
            assert s.getsockopt(zmq.CURVE_SERVER) == 0
            assert s.getsockopt(zmq.MECHANISM) == zmq.NULL
    finally:
        for s in socks:
            s.close(linger=0)
        access.close()


def _zap_client(ctx: "zmq.Context[Any]") -> "zmq.Socket[Any]":
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(ZAP_ENDPOINT)
    return s


def test_on_zap_answers_every_waiting_request_after_before_answer(ctx, keys):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    client = _zap_client(ctx)
    calls: list[int] = []
    access.before_answer = lambda: calls.append(len(calls))
    try:
        access.on_zap()  # nothing waiting: returns at once
        assert calls == []
        client.send_multipart([b"", *_request(b"a", b"CURVE", _raw(keys["good"]))])
        client.send_multipart([b"", *_request(b"b", b"CURVE", _raw(keys["bad"]))])
        client.send_multipart([b"", *_request(b"c", b"NULL")])
        poller = zmq.Poller()
        poller.register(access.zap, zmq.POLLIN)
        answered: list[list[bytes]] = []
        for _ in range(50):  # bounded: inproc delivers at once, a few turns at most
            if len(answered) == 3:
                break
            poller.poll(100)
            access.on_zap()
            while client.poll(0):
                answered.append(client.recv_multipart()[1:])
        assert [a[1:3] for a in answered] == [[b"a", b"200"], [b"b", b"400"], [b"c", b"200"]]
        assert answered[0][4] == keys["good"]
        assert len(calls) == 3  # once before each answer
        assert (access.accepted, access.refused) == (1, 1)
    finally:
        client.close(linger=0)
        access.close()
    assert access.zap.closed


def test_on_zap_without_a_hook(ctx):
    access = Access(ctx)
    client = _zap_client(ctx)
    try:
        assert access.before_answer is None
        client.send_multipart([b"", *_request(b"z", b"NULL")])
        assert access.zap.poll(5000)
        access.on_zap()
        assert client.recv_multipart()[1:] == [b"1.0", b"z", b"200", b"OK", b"", b""]
    finally:
        client.close(linger=0)
        access.close()


def test_the_zap_socket_does_not_linger(ctx):
    access = Access(ctx)
    try:
        assert access.zap.getsockopt(zmq.LINGER) == 0
        assert access.zap.type == zmq.REP
        assert access.zap.getsockopt(zmq.LAST_ENDPOINT) == ZAP_ENDPOINT.encode()
    finally:
        access.close()


def _serve_until(access: Access, router: "zmq.Socket[Any]", want_refused: int) -> list[list[bytes]]:
    """Run the handler and the listener as the loop does, bounded, until a frame arrives or the
    handler has refused `want_refused` connections."""
    poller = zmq.Poller()
    poller.register(access.zap, zmq.POLLIN)
    poller.register(router, zmq.POLLIN)
    got: list[list[bytes]] = []
    for _ in range(100):  # at most ~10 s on a loaded machine; loopback handshakes take milliseconds
        events = dict(poller.poll(100))
        if access.zap in events:
            access.on_zap()
        if router in events:
            got.append(router.recv_multipart())
        if got or (want_refused and access.refused >= want_refused):
            break
    return got


def _curve_client(ctx: "zmq.Context[Any]", server_public: bytes, secret_file: str, port: int) -> "zmq.Socket[Any]":
    pub, secret = zmq.auth.load_certificate(secret_file)
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey = server_public
    s.curve_publickey = pub
    s.curve_secretkey = secret
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def test_a_guarded_tcp_listener_completes_curve_for_an_allowed_key_only(ctx, keys):
    curve = load_curve(keys["secret_file"], keys["allowed"])
    access = Access(ctx, curve)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    clients = []
    try:
        access.guard(router, tcp=True)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        bad = _curve_client(ctx, curve.public, keys["bad_secret_file"], port)
        clients.append(bad)
        bad.send(b"from bad", zmq.NOBLOCK)
        assert _serve_until(access, router, want_refused=1) == []
        assert (access.accepted, access.refused) == (0, 1)
        good = _curve_client(ctx, curve.public, keys["good_secret_file"], port)
        clients.append(good)
        good.send(b"from good")
        got = _serve_until(access, router, want_refused=0)
        assert [m[-1] for m in got] == [b"from good"]  # the broker's secret key made the handshake
        assert (access.accepted, access.refused) == (1, 1)
    finally:
        for c in clients:
            c.close(linger=0)
        router.close(linger=0)
        access.close()


def test_decisions_are_counted_one_by_one(ctx, keys, caplog):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    try:
        with caplog.at_level(logging.WARNING, logger="mcbroker.access"):
            for i in range(3):
                assert access._answer(_request(b"g%d" % i, b"CURVE", _raw(keys["good"])))[2] == b"200"
            for i in range(2):
                assert access._answer(_request(b"b%d" % i, b"CURVE", _raw(keys["bad"])))[2] == b"400"
            for i in range(2):
                assert access._answer(_request(b"p%d" % i, b"PLAIN", b"u", b"p"))[2] == b"400"
        assert (access.accepted, access.refused) == (3, 4)
    finally:
        access.close()


def test_a_peer_address_that_is_not_utf8_is_logged_not_raised(ctx, keys, caplog):
    access = Access(ctx, load_curve(keys["secret_file"], keys["allowed"]))
    try:
        with caplog.at_level(logging.WARNING, logger="mcbroker.access"):
            got = access._answer(_request(b"r", b"CURVE", _raw(keys["bad"]), address=b"10.0.0.\xff"))
        assert got[2:4] == [b"400", b"client key not allowed"]
        [record] = [r for r in caplog.records if r.name == "mcbroker.access"]
        assert "10.0.0.\ufffd" in record.getMessage()  # the undecodable byte replaced (U+FFFD)
    finally:
        access.close()
