"""Export a stage to ONNX so an edge device can run it with onnxruntime and no torch.

Stateless stages (encoders, ViT, ``nn.Sequential``) map inputs to outputs. Decoder stages take
their KV cache as inputs and return it grown: ``past_key_<i>``/``past_value_<i>`` (B, kv heads,
P, head size) in, ``present_key_<i>``/``present_value_<i>`` (P + T positions) out, for every
block ``i`` they hold; the runner keeps the cache between calls (and trims it for speculative
decoding), so the graph itself is stateless.
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


class _DecoderPositional(nn.Module):
    """A decoder stage as a stateless graph: the KV cache comes in as tensors and goes out grown."""

    def __init__(self, stage: Stage, input_names: list[str], output_names: list[str], layers: list[int]):
        super().__init__()
        self.stage = stage
        self.input_names = input_names
        self.output_names = output_names
        self.layers = layers

    def forward(self, *args):
        n = len(self.input_names)
        inputs, past = dict(zip(self.input_names, args[:n])), args[n:]
        cache = self.stage.new_cache()
        for j, layer in enumerate(self.layers):
            cache.set_layer(layer, past[2 * j], past[2 * j + 1])
        cache.length = past[0].shape[2]  # traced: the graph reads the past length from the input shape
        out = self.stage(inputs, cache)
        present = [t for layer in self.layers for t in cache.get_layer(layer)]
        return (*(out[k] for k in self.output_names), *present)


def example_inputs(bm: BlockModel, start: int) -> dict[str, torch.Tensor]:
    """Small inputs of the right kinds for tracing the stage that starts at ``start``."""
    if start == 0:
        if bm.kind == "decoder":
            return {"input_ids": torch.tensor([[5, 17, 42]], dtype=torch.long)}
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
    stage = bm.stage(start, end)
    if bm.kind == "decoder":
        return _export_decoder(bm, stage, start, end, Path(path), inputs, opset)
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
    _write_metadata(bm, start, end, path, out_names, output_names)
    return path


def _write_metadata(bm: BlockModel, start: int, end: int, path: Path, out_names: list[str], output_names: list[str], extra: dict[str, str] | None = None) -> None:
    import onnx

    model = onnx.load(str(path))
    meta = {
        "splitnet.model": bm.name,
        "splitnet.fingerprint": bm.fingerprint(),
        "splitnet.kind": bm.kind,
        "splitnet.blocks": json.dumps([start, end]),
        "splitnet.num_blocks": str(bm.num_blocks),
        "splitnet.outputs": json.dumps(dict(zip(out_names, output_names))),
        **(extra or {}),
    }
    meta.update(_tokenizer_meta(bm, path))
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


def _export_decoder(bm: BlockModel, stage: Stage, start: int, end: int, path: Path, inputs: Mapping[str, torch.Tensor] | None, opset: int) -> Path:
    inputs = dict(inputs) if inputs is not None else example_inputs(bm, start)
    input_names = sorted(inputs)
    probe = stage.new_cache()
    with torch.no_grad():
        first = stage(inputs, probe)  # fills a cache: its shapes are the past's shapes
    layers = probe.layer_ids()
    output_names = sorted(first)
    # trace with a non-empty past and more than one new token, so no shape is taken for a constant
    past = [t for layer in layers for t in probe.get_layer(layer)]
    past_names = [f"past_{kind}_{layer}" for layer in layers for kind in ("key", "value")]
    present_names = [f"present_{kind}_{layer}" for layer in layers for kind in ("key", "value")]
    seq_axis = "tokens"
    dyn: dict[str, dict[int, str]] = {n: {0: "batch", 1: seq_axis} for n in input_names}
    dyn.update({n: {0: "batch", 1: seq_axis} if first[n].dim() >= 3 else {0: "batch"} for n in output_names})
    dyn.update({n: {0: "batch", 2: "past"} for n in past_names})
    dyn.update({n: {0: "batch", 2: "total"} for n in present_names})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _DecoderPositional(stage, input_names, output_names, layers).eval(),
            (*(inputs[n] for n in input_names), *past),
            str(path),
            input_names=input_names + past_names,
            output_names=output_names + present_names,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
    _write_metadata(bm, start, end, path, output_names, output_names, {"splitnet.kv_layers": json.dumps(layers)})
    return path
