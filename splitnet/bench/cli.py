"""``splitnet bench <suite>``: each suite is a module with ``add_arguments(parser)`` and
``run(args) -> dict``; the dict is printed as one JSON document (``--json``) or as a summary."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SUITES = {
    "wire": "splitnet.bench.wire",
    "codec": "splitnet.bench.codec",
    "planner": "splitnet.bench.planner",
    "hardening": "splitnet.bench.hardening",
    "hostile": "splitnet.bench.hostile",
    "models": "splitnet.bench.models",
    "pipeline": "splitnet.bench.pipeline",
    "speculative": "splitnet.bench.speculative",
    "vision": "splitnet.bench.vision",
    "lm": "splitnet.bench.lm",
    "e2e": "splitnet.bench.e2e",
    "chaos": "splitnet.bench.chaos",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite and print one JSON document")
    suites = p.add_subparsers(dest="suite", metavar="SUITE")
    for name, mod_name in SUITES.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("splitnet"):
                continue
            raise
        sp = suites.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else name)
        sp.add_argument("--json", action="store_true", help="print only the JSON document")
        sp.add_argument("--out", help="also write the JSON document to this file")
        mod.add_arguments(sp)
        sp.set_defaults(func=lambda args, mod=mod: _run(mod, args))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _run(mod, args: argparse.Namespace) -> int:
    from splitnet.bench.environment import environment

    result = mod.run(args)
    doc = {"suite": args.suite, "environment": environment(), **result}
    text = json.dumps(doc, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        summary = getattr(mod, "summarize", None)
        print(summary(doc) if summary else text)
    sys.stdout.flush()
    return int(doc.get("exit_code", 0))
