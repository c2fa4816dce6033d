"""Helper of scripts/django-cache-suite: start memcached and a broker (the tests' harness), put a
small test module beside Django's tests/cache/tests.py that runs its BaseMemcachedTests with
clientlib.django.BrokerCache, and run Django's runtests.py on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
from brokerproc import BrokerProcess  # noqa: E402

MODULE = '''\
import os

from django.core.cache import caches
from django.core.cache.backends.base import InvalidCacheBackendError
from django.test import TestCase, override_settings

from clientlib.errors import MemcacheClientError

from .tests import BaseMemcachedTests, caches_setting_for_tests, memcached_excluded_caches

BrokerCache_params = {"BACKEND": "clientlib.django.BrokerCache", "LOCATION": os.environ["MCBROKER_URL"]}


@override_settings(CACHES=caches_setting_for_tests(base=BrokerCache_params, exclude=memcached_excluded_caches))
class BrokerCacheTests(BaseMemcachedTests, TestCase):
    base_params = BrokerCache_params
    # close() is free: the broker channel stays open (Django's PyLibMCCache says the same).
    should_disconnect_on_close = False
    incr_decr_type_error = MemcacheClientError

    def test_location_multiple_servers(self):
        # Replaces Django's: LOCATION is one broker address (the servers are in the broker's config).
        for location in [["server1.tld", "server2:11211"], "ipc:///a.sock;ipc:///b.sock", "ipc:///a,ipc:///b"]:
            with self.subTest(location=location):
                with self.settings(CACHES={"default": {**self.base_params, "LOCATION": location}}):
                    with self.assertRaises(InvalidCacheBackendError):
                        caches["default"]
'''


def main() -> int:
    src = Path(sys.argv[1])
    tests = src / "tests"
    if not (tests / "cache" / "tests.py").is_file():
        print(f"{src}: no tests/cache/tests.py (not a Django source tree)", file=sys.stderr)
        return 2
    (tests / "cache" / "tests_mcbroker.py").write_text(MODULE)
    mc = harness.Memcached().start()
    broker = BrokerProcess([mc.address]).start()
    try:
        env = dict(os.environ, MCBROKER_URL=broker.url,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "runtests.py", "cache.tests_mcbroker", "--settings=test_sqlite", "--parallel=1",
               "-v", "2", *sys.argv[2:]]
        return subprocess.run(cmd, cwd=tests, env=env).returncode
    finally:
        broker.cleanup()
        mc.cleanup()


if __name__ == "__main__":
    sys.exit(main())
