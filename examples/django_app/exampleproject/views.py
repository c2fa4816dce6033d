"""Views whose answers come from the cache, so a wrong cache answer shows in the response."""

import os

from django.core.cache import cache
from django.http import HttpRequest, HttpResponse


def _reply(body: object) -> HttpResponse:
    response = HttpResponse(str(body), content_type="text/plain")
    response["X-Worker-Pid"] = str(os.getpid())
    return response


def square(request: HttpRequest, n: int) -> HttpResponse:
    # Computed once, then read from the cache by every worker.
    return _reply(cache.get_or_set(f"square:{n}", lambda: n * n, timeout=600))


def hit(request: HttpRequest, name: str) -> HttpResponse:
    # An atomic counter shared by every worker (memcached's incr).
    cache.add(f"hits:{name}", 0, timeout=600)
    return _reply(cache.incr(f"hits:{name}"))


def put(request: HttpRequest, key: str, value: str) -> HttpResponse:
    # Write, then read back what the cache holds.
    cache.set(f"put:{key}", value, timeout=600)
    return _reply(cache.get(f"put:{key}"))


def boot(request: HttpRequest) -> HttpResponse:
    # Written when the application was loaded (in Gunicorn's master with --preload).
    return _reply(cache.get("booted"))
