"""``splitnet keys gen``: make CURVE keypairs for stages and clients.

Give every stage its own keypair (``--name edge-0 --name cloud-1``) and every client its own: a
leaked key then exposes one box, not every link. Secrets are created with mode 0600 (O_EXCL) and
refused at load when group or others can read them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _gen(args: argparse.Namespace) -> int:
    from splitnet.errors import ConfigError
    from splitnet.wire.security import generate_keypair

    out = Path(args.out)
    for name in args.name:
        try:
            pub, sec = generate_keypair(out, name, overwrite=args.force)
        except ConfigError as e:
            raise SystemExit(f"splitnet keys gen: {e}") from e
        print(f"{name}: public {pub} (share; put client keys in the stages' --keys-dir) secret {sec} (keep private)")
        if args.allow_dir:
            allow = Path(args.allow_dir)
            allow.mkdir(parents=True, exist_ok=True)
            target = allow / pub.name
            if target.exists() and not args.force:
                raise SystemExit(f"splitnet keys gen: {target} exists; pass --force to overwrite")
            target.write_bytes(pub.read_bytes())
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
