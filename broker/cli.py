"""`mcbroker` command line: serve, check-config, ping, stats, curve-keygen."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from . import config as config_mod


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.listen:
        out["listen"] = args.listen
    if args.server:
        out["servers"] = args.server
    if args.hash:
        out["hash"] = args.hash
    return out


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, _overrides(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import Broker

    try:
        cfg = _load(args)
    except config_mod.ConfigError as exc:
        print(f"mcbroker: bad config: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        broker = Broker(cfg, config_path=args.config, overrides=_overrides(args))
    except Exception as exc:  # a clear one-line reason beats a traceback for a service that cannot start
        print(f"mcbroker: cannot start: {exc}", file=sys.stderr)
        return 1
    broker.run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except config_mod.ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    print(f"ok: listen {', '.join(cfg.listen_urls())}; servers {', '.join(s.address.name for s in cfg.servers)}; hash {cfg.hash}")
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


def cmd_ping(args: argparse.Namespace) -> int:
    from clientlib.errors import MemcacheError

    try:
        print(_client(args).broker_ping())
    except _BadAddress as exc:
        print(f"mcbroker: {exc}", file=sys.stderr)
        return 2
    except MemcacheError as exc:
        print(f"mcbroker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from clientlib.errors import MemcacheError

    try:
        stats = _client(args).broker_stats()
    except _BadAddress as exc:
        print(f"mcbroker: {exc}", file=sys.stderr)
        return 2
    except MemcacheError as exc:
        print(f"mcbroker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


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
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE", help="TOML config (default: built-in defaults, as etc/mcbroker.toml)")
        sp.add_argument("--listen", action="append", metavar="URL", help="ipc:///path or tcp://127.0.0.1:PORT (repeatable)")
        sp.add_argument("--server", action="append", metavar="HOST:PORT", help="memcached server, or unix:/path (repeatable)")
        sp.add_argument("--hash", choices=["rendezvous", "ketama"], help="key placement across servers")

    serve = sub.add_parser("serve", help="run the broker in the foreground")
    config_args(serve)
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config and print its effective addresses")
    config_args(check)
    check.set_defaults(func=cmd_check_config)
    keygen = sub.add_parser(
        "curve-keygen", help="write a CURVE key pair (DIR/NAME.key public, DIR/NAME.key_secret) for the broker or a client"
    )
    keygen.add_argument("dir", metavar="DIR")
    keygen.add_argument("name", metavar="NAME")
    keygen.set_defaults(func=cmd_curve_keygen)
    for name, func, text in (("ping", cmd_ping, "ask a running broker for PONG"), ("stats", cmd_stats, "print a running broker's stats as JSON")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument(
            "--connect", "--broker", dest="broker", metavar="URL",
            help="broker address, ipc:///path or tcp://127.0.0.1:PORT (default: $MCBROKER_URL or the default ipc socket)",
        )
        sp.add_argument("--timeout", type=float, default=2.0)
        sp.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
