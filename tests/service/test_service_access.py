"""Issue 11, socket access: a broker started as root with the default socket_mode (0660) and a
configured socket_group serves a worker that runs as another uid in that group, and a worker in no
such group gets a clear permission error at once (not after its timeout).

Workers are forked from the test (root) and drop to spare uids, as Gunicorn drops to www-data;
they are forked rather than exec'd because the interpreter lives under /root, which a spare uid
may not enter.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from brokerproc import BrokerProcess
from clientlib import Client
from clientlib.errors import BrokerUnavailable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test drops worker processes to spare uids"),
]

GROUP = 47011  # a spare gid: socket_group may be a number
MEMBER_UID = 47012
OUTSIDER_UID = 47013
OUTSIDER_GID = 47014
TIMEOUT = 5.0


def _as_user(uid: int, gid: int, groups: list[int], url: str) -> dict[str, object]:
    """Fork a worker that drops to uid/gid/groups, makes a Client and calls it; its outcome."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        out: dict[str, object] = {}
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            client = Client(url, timeout=TIMEOUT)
            t = time.perf_counter()
            try:
                client.set("access", b"granted")
                out["value"] = client.get("access").decode()
            except BrokerUnavailable as exc:
                out["error"] = str(exc)
            out["elapsed"] = time.perf_counter() - t
        except BaseException as exc:  # anything else is reported, never a hung test
            out["crash"] = repr(exc)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _start(request, mc, **settings) -> BrokerProcess:
    b = BrokerProcess([mc.address], socket_group=str(GROUP), **settings)
    request.addfinalizer(b.cleanup)
    # The test's directory is 0700 (mkdtemp); the socket goes into a directory the broker
    # creates, so what decides access is the broker's own work: that directory and the socket.
    os.chmod(b.dir, 0o711)
    b.url = f"ipc://{b.dir}/run/mcbroker.sock"
    b.write_config(listen=[b.url])
    return b.start()


@pytest.fixture
def shared_broker(request, mc):
    return _start(request, mc)


def test_socket_and_directory_get_the_configured_mode_and_group(shared_broker):
    path = Path(shared_broker.url[len("ipc://"):])
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == GROUP
    d = path.parent.stat()
    assert stat.S_IMODE(d.st_mode) == 0o750 and d.st_gid == GROUP


def test_a_worker_in_the_group_is_served(shared_broker):
    out = _as_user(MEMBER_UID, MEMBER_UID, [GROUP], shared_broker.url)
    assert out == {"value": "granted", "elapsed": out.get("elapsed")}, out


def test_a_worker_in_no_such_group_gets_the_permission_error_at_once(shared_broker):
    out = _as_user(OUTSIDER_UID, OUTSIDER_GID, [], shared_broker.url)
    assert "crash" not in out, out
    message = str(out.get("error"))
    path = shared_broker.url[len("ipc://"):]
    # The path, that it exists, that access was denied, and the setting that fixes it.
    assert os.path.dirname(path) in message, message
    assert "exists" in message and "access denied" in message and "socket_group" in message, message
    # "At once": the issue asks for 10 ms; measured here at about 1 ms (see the report). The
    # assertion leaves a loaded machine a wide margin and still proves it did not wait out the
    # call's 5 s deadline.
    assert isinstance(out["elapsed"], float) and out["elapsed"] < TIMEOUT - 1.0, out
    print(f"permission error after {out['elapsed'] * 1000:.2f} ms")


def test_a_worker_denied_the_socket_but_not_the_directory_gets_it_too(request, mc):
    # socket_mode 0640 leaves the group the directory but not a connect (write on the socket).
    b = _start(request, mc, socket_mode="0640")
    out = _as_user(MEMBER_UID, MEMBER_UID, [GROUP], b.url)
    message = str(out.get("error"))
    assert b.url[len("ipc://"):] in message and "access denied" in message and "socket_group" in message, out
    assert out["elapsed"] < TIMEOUT - 1.0, out
