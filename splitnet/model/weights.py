"""Reading weights from a Hugging Face model directory: config.json and safetensors files.

Only the tensors a stage needs are read (``safe_open`` reads lazily per key), so a process that
serves blocks 4..7 never loads the embedding matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from splitnet.errors import ModelLoadError


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; point --model at a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (single or sharded checkpoints)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text()).get("weight_map", {})
        return {k: model_dir / v for k, v in mapping.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ModelLoadError(
        f"{model_dir} holds no model.safetensors or model.safetensors.index.json; "
        "splitnet loads safetensors only (convert .bin checkpoints with `safetensors` first)"
    )


def load_tensors(
    model_dir: Path, wanted: Callable[[str], bool], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read only the tensors whose names satisfy ``wanted``."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if wanted(name):
            by_file.setdefault(file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name] = t
    return out


def strip_prefixes(names: Iterable[str], prefixes: Iterable[str]) -> str:
    """The first prefix among ``prefixes`` that some name starts with ("" if none)."""
    names = list(names)
    for p in prefixes:
        if any(n.startswith(p) for n in names):
            return p
    return ""


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Load ``tensors`` whose names start with ``prefix`` into ``module``; every parameter must be found."""
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(sub))
    if missing:
        raise ModelLoadError(f"weights for {what} are incomplete: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    sub = {k: v for k, v in sub.items() if k in expected}
    for k, v in sub.items():
        want = module.state_dict()[k].shape
        if tuple(v.shape) != tuple(want):
            raise ModelLoadError(f"weight {prefix}{k} has shape {tuple(v.shape)}, the config needs {tuple(want)}")
    module.load_state_dict(sub, strict=True)
