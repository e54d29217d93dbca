"""Export a stage to ONNX so an edge device can run it with onnxruntime and no torch.

Stateless stages (encoders, ViT, ``nn.Sequential``) are supported; decoder stages keep a KV
cache across calls and are not exported yet (they raise :class:`ConfigError`).
The file carries its stage description in ONNX metadata (``splitnet.*`` keys), which
:class:`splitnet.edge.onnx_stage.OnnxStage` reads back.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from splitnet.errors import ConfigError
from splitnet.model.blocks import BlockModel, Stage


class _Positional(nn.Module):
    """Stage with positional inputs/outputs in a fixed name order (what ONNX export needs)."""

    def __init__(self, stage: Stage, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.stage = stage
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *args):
        out = self.stage(dict(zip(self.input_names, args)))
        return tuple(out[n] for n in self.output_names)


def example_inputs(bm: BlockModel, start: int) -> dict[str, torch.Tensor]:
    """Small inputs of the right kinds for tracing the stage that starts at ``start``."""
    if start == 0:
        if bm.kind == "encoder":
            return bm.tokenize(["an example sentence for tracing the stage", "short"])
        if bm.kind == "vision":
            cfg = bm.arch.config
            return {"pixel_values": torch.randn(2, cfg.get("num_channels", 3), cfg["image_size"], cfg["image_size"])}
        raise ConfigError("pass example inputs for the first stage of a sequential model")
    first = bm.stage(0, start) if all(i in bm.blocks for i in range(start)) and bm.embed is not None else None
    if first is None:
        raise ConfigError("exporting a later stage needs the blocks before it loaded, to make example inputs")
    return dict(first(example_inputs(bm, 0)))


def _tokenizer_meta(bm: BlockModel, path: Path) -> dict[str, str]:
    """Ship the first stage's tokenizer with it, so the edge needs neither torch nor the model dir:
    byte-level ones are named, a tokenizer.json is copied next to the ONNX file."""
    from splitnet.model.tokenizer import ByteTokenizer, HFTokenizer

    tok = bm.tokenizer
    if isinstance(tok, ByteTokenizer):
        return {"splitnet.tokenizer": "bytes"}
    src = Path(bm.model_dir) / "tokenizer.json" if bm.model_dir else None
    if isinstance(tok, HFTokenizer) and src is not None and src.is_file():
        dst = path.with_name(path.stem + ".tokenizer.json")
        shutil.copyfile(src, dst)
        return {"splitnet.tokenizer": "file:" + dst.name, "splitnet.pad_id": str(tok.pad_id)}
    return {}


def export_stage_onnx(
    bm: BlockModel,
    start: int,
    end: int,
    path: str | Path,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    opset: int = 17,
) -> Path:
    """Write blocks [start, end) of ``bm`` to ``path`` as ONNX with dynamic batch/sequence axes."""
    if bm.kind == "decoder":
        raise ConfigError("decoder stages hold a KV cache and cannot be exported to ONNX yet; serve them with torch")
    stage = bm.stage(start, end)
    inputs = dict(inputs) if inputs is not None else example_inputs(bm, start)
    input_names = sorted(inputs)
    outputs = stage(inputs)
    output_names = sorted(outputs)
    dynamic = {}
    for n, t in list(inputs.items()) + list(outputs.items()):
        axes = {0: "batch"}
        if t.dim() >= 2 and bm.kind == "encoder":
            axes[1] = "tokens"
        dynamic[n if n in inputs else f"{n}"] = axes
    # an output that is also an input (attention_mask passes through) needs its own name
    out_names = [f"{n}" if n not in inputs else f"{n}__out" for n in output_names]
    dyn = {**{n: dynamic[n] for n in input_names}, **{o: dynamic[n] for o, n in zip(out_names, output_names)}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Positional(stage, input_names, output_names).eval(),
            tuple(inputs[n] for n in input_names),
            str(path),
            input_names=input_names,
            output_names=out_names,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
    import onnx

    model = onnx.load(str(path))
    meta = {
        "splitnet.model": bm.name,
        "splitnet.fingerprint": bm.fingerprint(),
        "splitnet.kind": bm.kind,
        "splitnet.blocks": json.dumps([start, end]),
        "splitnet.num_blocks": str(bm.num_blocks),
        "splitnet.outputs": json.dumps(dict(zip(out_names, output_names))),
    }
    meta.update(_tokenizer_meta(bm, path))
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path
