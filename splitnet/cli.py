"""The ``splitnet`` command line: each subcommand lives in the module that owns the feature.

A feature module exposes ``register(subparsers)`` which adds its parser and sets ``func`` to a
callable taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path of every feature that adds subcommands; imported lazily so `splitnet --help` is fast
_COMMAND_MODULES = [
    "splitnet.runtime.cli_demo",  # demo
    "splitnet.runtime.cli_serve",  # serve-stage
    "splitnet.cloud.server",  # serve (all stages of a plan on one device, supervised)
    "splitnet.cloud.cli_api",  # api (OpenAI-compatible HTTP server over a pipeline)
    "splitnet.cloud.cli_status",  # status (liveness, model, blocks and load of stages)
    "splitnet.bench.cli",  # bench <suite>
    "splitnet.codecs.cli",  # calibrate
    "splitnet.planner.cli",  # plan, profile
    "splitnet.wire.cli_keys",  # keys gen
    "splitnet.lab.cli",  # lab up/down
    "splitnet.model.cli_train_lm",  # train-lm
    "splitnet.model.cli_export",  # export-onnx
    "splitnet.model.cli_models",  # models
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitnet", description="Edge-cloud collaborative split inference.")
    parser.add_argument("--version", action="version", version="splitnet 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("splitnet"):
                continue  # feature not built into this release
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from splitnet.errors import SplitnetError

    try:
        return int(args.func(args) or 0)
    except SplitnetError as e:  # a user mistake or an unreachable peer: one line, no traceback
        print(f"splitnet {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
