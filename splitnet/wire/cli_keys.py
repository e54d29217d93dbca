"""``splitnet keys gen``: make CURVE keypairs for stages and clients."""

from __future__ import annotations

import argparse
from pathlib import Path


def _gen(args: argparse.Namespace) -> int:
    from splitnet.errors import ConfigError
    from splitnet.wire.security import generate_keypair

    out = Path(args.out)
    for name in args.name:
        if not args.force and ((out / f"{name}.key").exists() or (out / f"{name}.key_secret").exists()):
            raise SystemExit(f"splitnet keys gen: {out / name}.key exists; pass --force to overwrite")
        try:
            pub, sec = generate_keypair(out, name)
        except ConfigError as e:
            raise SystemExit(f"splitnet keys gen: {e}") from e
        print(f"{name}: public {pub} (share; put client keys in the stages' --keys-dir) secret {sec} (keep private)")
        if args.allow_dir:
            allow = Path(args.allow_dir)
            allow.mkdir(parents=True, exist_ok=True)
            (allow / pub.name).write_bytes(pub.read_bytes())
            print(f"{name}: public key added to the allow-list {allow}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CURVE keys for authenticated, encrypted stage sockets")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION")
    g = keys.add_parser("gen", help="generate CURVE keypairs (NAME.key public, NAME.key_secret private)")
    g.add_argument("--out", default="keys", help="directory to write the key files into")
    g.add_argument("--name", action="append", required=True, help="key name, e.g. server or client-a (repeatable)")
    g.add_argument("--allow-dir", default="", help="also copy the public key into this allow-list directory")
    g.add_argument("--force", action="store_true", help="overwrite existing key files")
    g.set_defaults(func=_gen)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
