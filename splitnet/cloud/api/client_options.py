"""Command-line options that say how a cloud tool connects to stages (as ``connect()`` does):
CURVE keys (the default transport) or plaintext, and the connect timeout. Shared by
``splitnet api`` and ``splitnet status``."""

from __future__ import annotations

import argparse
import os


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-key", default=os.environ.get("SPLITNET_CLIENT_KEY", ""),
                   help="this client's CURVE keypair (NAME.key_secret from `splitnet keys gen`; env SPLITNET_CLIENT_KEY); "
                        "without it, stages are reached in plaintext (only stages started with --insecure answer)")
    p.add_argument("--server-key", default=os.environ.get("SPLITNET_STAGE_PUBLIC_KEYS", ""),
                   help="the stages' public keys: one NAME.key for all, or one per stage in order, comma-separated (env SPLITNET_STAGE_PUBLIC_KEYS)")
    p.add_argument("--transport", default=os.environ.get("SPLITNET_TRANSPORT", "curvezmq"), choices=("curvezmq",),
                   help="keyed transport (curvezmq, the only one)")
    p.add_argument("--connect-timeout-s", type=float, default=10.0, help="longest wait for every stage to answer at connect")


def client_config(args: argparse.Namespace, **overrides):
    """The :class:`~splitnet.edge.config.ClientConfig` the options describe."""
    from splitnet.edge.config import ClientConfig

    return ClientConfig(client_key=args.client_key, server_key=args.server_key, transport=args.transport,
                        connect_timeout_s=args.connect_timeout_s, **overrides)
