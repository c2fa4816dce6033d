"""Shared fixtures: real memcached servers on free loopback ports, stopped by PID.

Fixtures
  memcached          one TCP server for this test
  memcached_unix     one unix-socket server for this test
  memcached_factory  factory(n=1, extra_args=(), unix=False) -> list[Memcached]; all stopped at teardown
  shared_memcached   one TCP server for the whole session; prefer `mc`
  mc                 shared_memcached, flushed (and revived if a test broke it) before each test
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from pathlib import Path

import pytest

# Make `import harness` work whatever pytest's import mode is.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import harness  # noqa: E402
from harness import Memcached, MemcachedFactory  # noqa: E402

# Property tests explore new examples on every local run; CI (CI=true) runs a fixed derivation
# of them, so a submission lands on what was run here, and a new counterexample found locally
# becomes a test instead of a coin toss in CI.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

# No per-example deadline anywhere: Hypothesis's default (200 ms) is a timed assertion, and a
# loaded machine can hold a test off the CPU for LATE (tests/timing.py); speed belongs to bench/.
_hypothesis_settings.register_profile("local", deadline=None)
_hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
# scripts/mutation (mutmut sets MUTANT_UNDER_TEST): fixed and fewer examples, so each of thousands
# of mutants runs fast and the same way every time; a mutant killed only by chance is not killed.
_hypothesis_settings.register_profile("mutation", derandomize=True, max_examples=30, deadline=None)
if os.environ.get("MUTANT_UNDER_TEST"):
    _hypothesis_settings.load_profile("mutation")
elif os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
else:
    _hypothesis_settings.load_profile("local")


def pytest_sessionstart(session: pytest.Session) -> None:
    # A missing memcached is a broken machine, not a reason to skip half the suite.
    if harness.memcached_binary() is None:
        pytest.exit(
            "memcached is not installed (not on PATH). Install it (apt-get install memcached) "
            "or run the tests through scripts/test, which installs it.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Backstop for servers a test started by hand and never stopped.
    harness.stop_all()


# scripts/mutation sets MCB_MUTATION: mutmut re-runs tests by id, and pytest cannot select an id
# holding a backslash (an escaped \r or \x.. in a parameter) from the command line; such ids get
# "%" in place of each run of backslashes in those runs only.
if os.environ.get("MCB_MUTATION"):

    @pytest.hookimpl(wrapper=True)
    def pytest_pycollect_makeitem(collector: Any, name: str, obj: Any) -> Any:
        items = yield
        if isinstance(items, list):
            for item in items:
                if "\\" in item.name:
                    # a run of backslashes, not each: a second pytest.main in the same process (mutmut's
                    # clean run after its stats run) escapes the ids' backslashes once more
                    item.name = re.sub(r"\\+", "%", item.name)
                    item._id = collector._id.child(item.name)  # pytest 9: the node id follows the name
        return items

    # mutmut 3.8.1's stats run (which tests reach which function) tracks callers in a ContextVar,
    # set and reset around each call of mutated code. Run in-process by mutmut, the reset failed
    # now and then inside test_client_peer (LookupError: the variable gone from the context; once
    # a segfault in ContextVar.set), failing the stats run; the same tests pass under plain
    # pytest with MUTANT_UNDER_TEST=stats. Only the caller bookkeeping is lost here: the hit that
    # maps the test to the function is recorded before the set, and mutant runs do not use it.
    try:
        from mutmut.core import MutmutCallStack
    except ImportError:  # not under mutmut
        pass
    else:
        _ctx_var = MutmutCallStack._ctx

        def _tolerant_reset(cls: Any, token: Any) -> None:
            try:
                _ctx_var.reset(token)
            except (LookupError, ValueError, RuntimeError):
                old = token.old_value
                _ctx_var.set((None, 0) if old is token.MISSING else old)

        MutmutCallStack.reset = classmethod(_tolerant_reset)  # type: ignore[method-assign, assignment]


@pytest.fixture
def memcached() -> Iterator[Memcached]:
    server = Memcached()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def memcached_unix() -> Iterator[Memcached]:
    server = Memcached(unix=True)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def memcached_factory() -> Iterator[MemcachedFactory]:
    made: list[Memcached] = []

    def factory(n: int = 1, extra_args: Sequence[str] = (), unix: bool = False) -> list[Memcached]:
        servers = []
        for _ in range(n):
            server = Memcached(unix=unix)
            # Track before starting so a failed start is cleaned up too.
            made.append(server)
            servers.append(server.start(extra_args))
        return servers

    try:
        yield factory
    finally:
        harness.stop_all(made)


@pytest.fixture(scope="session")
def shared_memcached() -> Iterator[Memcached]:
    server = Memcached()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def mc(shared_memcached: Memcached) -> Memcached:
    """The session's shared server, empty. Tests must not assume anything else about its history."""
    server = shared_memcached
    if server.running and server.paused:
        server.resume()
    try:
        server.flush_all()
    except (OSError, harness.MemcachedError):
        # An earlier test stopped or wedged it: bring it back on the same port.
        server.restart()
        server.flush_all()
    return server


# --- the broker ------------------------------------------------------------------------------

from brokerproc import BrokerProcess  # noqa: E402
import brokerproc  # noqa: E402


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """factory(servers: list[str | dict], **config) -> a started BrokerProcess, stopped at teardown."""
    made: list[BrokerProcess] = []

    def factory(servers: list[Any], **settings: Any) -> BrokerProcess:
        b = BrokerProcess(servers, **settings)
        made.append(b)
        return b.start()

    try:
        yield factory
    finally:
        for b in made:
            b.cleanup()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess], mc: Memcached) -> BrokerProcess:
    """A broker in front of the session's (flushed) memcached."""
    return broker_factory([mc.address])


def pytest_unconfigure(config: pytest.Config) -> None:
    brokerproc.stop_all()
