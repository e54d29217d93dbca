"""``splitnet export-onnx``: write a stage to ONNX for an edge device that runs onnxruntime, not torch."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="export blocks of a model to ONNX (with its tokenizer when it is the first stage)")
    p.add_argument("--model", required=True, help="built-in name or HF directory")
    p.add_argument("--blocks", required=True, help="START:END, e.g. 0:2")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from splitnet.errors import ConfigError
    from splitnet.model import load_model
    from splitnet.model.onnx_export import export_stage_onnx

    try:
        start, end = (int(x) for x in args.blocks.split(":"))
    except ValueError:
        raise ConfigError(f"--blocks must be START:END, got {args.blocks!r}") from None
    bm = load_model(args.model, blocks=range(start, end))
    path = export_stage_onnx(bm, start, end, args.out, opset=args.opset)
    print(json.dumps({"onnx": str(path), "model": bm.name, "blocks": [start, end], "fingerprint": bm.fingerprint()}))
    return 0
