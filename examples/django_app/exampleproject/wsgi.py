"""WSGI entry point: gunicorn exampleproject.wsgi"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")
application = get_wsgi_application()

# Touch the cache while loading: with Gunicorn's --preload this runs in the master process, before
# the workers fork; clientlib gives each worker its own broker socket after the fork.
from django.core.cache import cache  # noqa: E402

cache.set("booted", f"loaded by pid {os.getpid()}", timeout=None)
