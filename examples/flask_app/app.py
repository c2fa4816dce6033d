"""A small Flask app whose responses come from Flask-Caching, served through mcbroker.

Run it (from examples/flask_app, with a broker running):
    gunicorn app:app --workers 8 --bind 127.0.0.1:8000
"""

import os

from flask import Flask, Response
from flask_caching import Cache

app = Flask(__name__)
app.config.update(
    CACHE_TYPE="clientlib.flask.BrokerCache",
    # The broker's address; None = $MCBROKER_URL, else the broker's default ipc socket.
    CACHE_MCBROKER_URL=os.environ.get("MCBROKER_URL"),
    CACHE_KEY_PREFIX="flaskexample:",
    CACHE_DEFAULT_TIMEOUT=300,
)
# Settings from FLASK_* variables (Flask parses each value as JSON), e.g. a longer deadline for
# each cache call than clientlib's 1 s: FLASK_CACHE_OPTIONS='{"timeout": 2.5}'.
app.config.from_prefixed_env()
cache = Cache(app)


def _reply(body: object) -> Response:
    return Response(str(body), mimetype="text/plain", headers={"X-Worker-Pid": str(os.getpid())})


@cache.memoize(timeout=600)
def compute_square(n: int) -> int:
    return n * n


@app.route("/square/<int:n>")
def square(n: int) -> Response:
    return _reply(compute_square(n))


@app.route("/hit/<name>")
def hit(name: str) -> Response:
    # An atomic counter shared by every worker (memcached's incr).
    return _reply(cache.cache.inc(f"hits:{name}"))


@app.route("/put/<key>/<value>")
def put(key: str, value: str) -> Response:
    cache.set(f"put:{key}", value, timeout=600)
    return _reply(cache.get(f"put:{key}"))


@app.route("/boot")
@cache.cached(timeout=600)
def boot() -> Response:
    return _reply(cache.get("booted"))


# Touch the cache while loading: with Gunicorn's --preload this runs in the master process, before
# the workers fork; clientlib gives each worker its own broker socket after the fork.
with app.app_context():
    cache.set("booted", f"loaded by pid {os.getpid()}", timeout=0)
