"""A minimal Django project whose responses come from the cache, served through mcbroker.

Run it (from examples/django_app, with a broker running):
    gunicorn exampleproject.wsgi --workers 8 --bind 127.0.0.1:8000
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "exampleproject.urls"
WSGI_APPLICATION = "exampleproject.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# The two lines that matter: the backend, and the broker's address ("" = $MCBROKER_URL, else the
# broker's default ipc socket). The memcached servers are in the broker's config, not here.
CACHES = {
    "default": {
        "BACKEND": "clientlib.django.BrokerCache",
        "LOCATION": os.environ.get("MCBROKER_URL", ""),
        "TIMEOUT": 300,
        "KEY_PREFIX": "example",
        "OPTIONS": {"timeout": 2.0},
    }
}

# A view's exception goes to stderr (Gunicorn's error log) with its traceback: with DEBUG off,
# Django's default sends it only to ADMINS by mail, and a 500 would say nothing of its cause
# (one in 2,000 of test_gunicorn's requests did once, in a fresh-clone CI run, and left no trace).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
