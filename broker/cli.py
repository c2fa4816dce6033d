"""`mcbroker` command line: serve, check-config, stats, top, ping, curve-keygen.

Admin commands (stats, top, ping) talk to a running broker over its own socket (`--connect URL`,
else $MCBROKER_URL, else the default ipc socket). Every failure is one line on stderr and an exit
status, never a traceback: `check-config` exits 1 when it found errors; `serve` exits 2 for an
invalid config and 1 when it cannot start (socket in use, unknown socket_group, ...); admin
commands exit 1 when the broker is not there and 2 for a mistyped address. `curve-keygen DIR NAME`
writes a CURVE key pair (exit 1 rather than overwrite one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from typing import Any

from . import config as config_mod
from . import logfmt


def version() -> str:
    try:
        return metadata.version("mcbroker")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.listen:
        out["listen"] = args.listen
    if args.server:
        out["servers"] = args.server
    if args.hash:
        out["hash"] = args.hash
    return out


def _config_path(args: argparse.Namespace) -> str | None:
    file = getattr(args, "file", None)
    if file is not None and args.config is not None and file != args.config:
        raise SystemExit(f"mcbroker: two config files given: {file} and --config {args.config}")
    return file if file is not None else args.config


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import Broker

    path = _config_path(args)
    try:
        cfg = config_mod.load(path, _overrides(args))
    except config_mod.ConfigError as exc:
        print(f"mcbroker: bad config: {exc}", file=sys.stderr)
        return 2  # as before issue 11: the bench (bench/procs.py) tells a refused config by it
    logfmt.setup(args.log_level or cfg.log_level)
    try:
        broker = Broker(cfg, config_path=path, overrides=_overrides(args))
    except Exception as exc:  # a clear one-line reason beats a traceback for a service that cannot start
        print(f"mcbroker: cannot start: {exc}", file=sys.stderr)
        return 1
    broker.run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    problems = config_mod.check_file(path, _overrides(args))
    if problems:
        for exc in problems:
            where = f"{exc.source}: " if exc.source else ""
            print(f"invalid: {where}{exc.key or '(file)'}: {exc.problem}", file=sys.stderr)
        print(f"mcbroker: {len(problems)} error{'s' if len(problems) != 1 else ''} in {path or 'the defaults'}", file=sys.stderr)
        return 1
    cfg = config_mod.load(path, _overrides(args))
    group = cfg.socket_group or "(the broker user's group)"
    print(
        f"ok: listen {', '.join(cfg.listen_urls())}; servers {', '.join(s.address.name for s in cfg.servers)}; "
        f"hash {cfg.hash}; socket_mode {cfg.socket_mode:04o}; socket_group {group}"
    )
    return 0


class _BadAddress(Exception):
    pass


def _client(args: argparse.Namespace) -> Any:
    from clientlib import Client

    try:
        # Validated at construction: a bad --connect or MCBROKER_URL is a one-line error.
        return Client(args.broker, timeout=args.timeout)
    except (TypeError, ValueError) as exc:
        raise _BadAddress(str(exc)) from None


def _admin(args: argparse.Namespace, call: Any) -> tuple[int, Any]:
    from clientlib.errors import MemcacheError

    try:
        client = _client(args)
    except _BadAddress as exc:
        print(f"mcbroker: {exc}", file=sys.stderr)
        return 2, None
    try:
        return 0, call(client)
    except MemcacheError as exc:
        print(f"mcbroker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None
    finally:
        client.disconnect_all()


def cmd_ping(args: argparse.Namespace) -> int:
    rc, answer = _admin(args, lambda c: c.broker_ping())
    if rc == 0:
        print(answer)
    return rc


def cmd_stats(args: argparse.Namespace) -> int:
    from . import statsview

    rc, stats = _admin(args, lambda c: c.broker_stats())
    if rc == 0:
        print(json.dumps(stats, indent=2, sort_keys=True) if args.json else statsview.table(stats))
    return rc


def cmd_top(args: argparse.Namespace) -> int:
    from . import statsview

    rc, _ = _admin(args, lambda c: c.broker_ping())  # a bad address or no broker: say so before drawing
    if rc:
        return rc
    if not sys.stdout.isatty():
        print("mcbroker: top draws a live view and needs a terminal; use `mcbroker stats [--json]`", file=sys.stderr)
        return 2
    try:
        return statsview.top(_client(args), interval=args.interval, count=args.count)
    except statsview.MissingExtra as exc:
        print(f"mcbroker: {exc}", file=sys.stderr)
        return 1


def cmd_curve_keygen(args: argparse.Namespace) -> int:
    import os
    import shlex

    import zmq.auth

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    public_file = os.path.join(args.dir, f"{args.name}.key")
    secret_file = public_file + "_secret"
    for path in (public_file, secret_file):
        if os.path.exists(path):
            print(f"mcbroker: {path} exists; not overwriting a key", file=sys.stderr)
            return 1
    public_file, secret_file = zmq.auth.create_certificates(args.dir, args.name)
    os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    print(f"public key file: {public_file}\nsecret key file: {secret_file} (mode 0600)")
    print(f"public key: {public.decode()}")
    print("broker: curve_secret_key_file = the secret key file; a client: copy the .key file into the")
    print("broker's curve_allowed_clients directory, and give the client (environment or Client arguments):")
    print(f"  MCBROKER_CURVE_PUBLICKEY={shlex.quote(public.decode())}")
    print(f"  MCBROKER_CURVE_SECRETKEY={shlex.quote(secret.decode())}")
    print("  MCBROKER_CURVE_SERVERKEY=<the broker's public key>")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcbroker", description="memcached connection broker for prefork Python servers")
    p.add_argument("--version", action="version", version=f"mcbroker {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,check-config,curve-keygen,stats,top,ping}")

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE", help="TOML config (default: built-in defaults, as etc/mcbroker.toml)")
        sp.add_argument("--listen", action="append", metavar="URL", help="ipc:///path or tcp://127.0.0.1:PORT (repeatable)")
        sp.add_argument("--server", action="append", metavar="HOST:PORT", help="memcached server, or unix:/path (repeatable)")
        sp.add_argument("--hash", choices=["rendezvous", "ketama"], help="key placement across servers")

    serve = sub.add_parser("serve", help="run the broker in the foreground")
    config_args(serve)
    serve.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="overrides log_level in the config")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config: every error with its key and reason")
    check.add_argument("file", nargs="?", metavar="FILE", help="the config file (or --config FILE)")
    config_args(check)
    check.set_defaults(func=cmd_check_config)
    keygen = sub.add_parser(
        "curve-keygen", help="write a CURVE key pair (DIR/NAME.key public, DIR/NAME.key_secret) for the broker or a client"
    )
    keygen.add_argument("dir", metavar="DIR")
    keygen.add_argument("name", metavar="NAME")
    keygen.set_defaults(func=cmd_curve_keygen)

    def connect_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--connect", "--broker", dest="broker", metavar="URL",
            help="broker address, ipc:///path or tcp://127.0.0.1:PORT (default: $MCBROKER_URL or the default ipc socket)",
        )
        sp.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the broker (default 2)")

    stats = sub.add_parser("stats", help="a running broker's counters, latency and servers, as a table")
    connect_args(stats)
    stats.add_argument("--json", action="store_true", help="the same numbers as JSON")
    stats.set_defaults(func=cmd_stats)
    top = sub.add_parser("top", help="live view of a running broker (Ctrl-C to quit)")
    connect_args(top)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default: until Ctrl-C)")
    top.set_defaults(func=cmd_top)
    ping = sub.add_parser("ping", help="ask a running broker for PONG")
    connect_args(ping)
    ping.set_defaults(func=cmd_ping)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `mcbroker stats --json | head`: the reader left; not an error of ours to print.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
