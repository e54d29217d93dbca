"""``load_model``: a Hugging Face directory, a built-in name or an ``nn.Sequential`` -> BlockModel.

A stage process passes ``blocks=range(a, b)`` and reads only those blocks' weights (plus the
embedding if ``a == 0`` and the head if ``b`` is the last block).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from splitnet.errors import ModelLoadError
from splitnet.model import builtin
from splitnet.model.blocks import Architecture, BlockModel
from splitnet.model.efficientnet import MODEL_TYPE as EFFICIENTNET_LITE, EfficientNetLiteArchitecture
from splitnet.model.gpt2 import GPT2Architecture
from splitnet.model.hf_decoder import FAMILIES as HF_DECODER_FAMILIES
from splitnet.model.hf_decoder import HFDecoderArchitecture
from splitnet.model.hf_encoder import ENCODER_FAMILIES, HFEncoderArchitecture
from splitnet.model.sequential import from_sequential
from splitnet.model.tokenizer import ByteTokenizer, HFTokenizer
from splitnet.model.hf_vision import HFViTArchitecture
from splitnet.model.weights import load_into, load_tensors, read_config, weight_files

ARCHITECTURES: dict[str, type[Architecture]] = {
    "gpt2": GPT2Architecture,
    "vit": HFViTArchitecture,
    EFFICIENTNET_LITE: EfficientNetLiteArchitecture,
    **{model_type: HFDecoderArchitecture for model_type in HF_DECODER_FAMILIES},
    **{model_type: HFEncoderArchitecture for model_type in ENCODER_FAMILIES},
}


def resolve_model_dir(source: str | Path) -> Path:
    """A built-in name's directory (made on first use) or the given path, checked to exist."""
    if isinstance(source, str) and source in builtin.BUILTIN_MODELS:
        return builtin.materialize(source)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model {source!r} is neither a built-in ({', '.join(sorted(builtin.BUILTIN_MODELS))}) nor a directory"
        )
    return path


def architecture_for(config: dict, model_dir: Path | None = None) -> Architecture:
    model_type = config.get("model_type")
    cls = ARCHITECTURES.get(model_type or "")
    if cls is None:
        raise ModelLoadError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    if model_dir is not None and model_type in ENCODER_FAMILIES:
        config = dict(config)
        config["_splitnet_pooling"] = _sentence_pooling(model_dir)
    return cls(config)


_LEGACY_POOLING_KEYS = (  # sentence-transformers' pooling_mode_* flags, in the order it concatenates them
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
)
_SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")


def _sentence_pooling(model_dir: Path) -> dict:
    """sentence-transformers pooling read from modules.json and 1_Pooling/config.json (mean when
    the directory has neither); a module splitnet does not run (Dense, ...) is refused."""
    pooling: dict = {"mode": ("mean",), "normalize": False, "from_files": (model_dir / "modules.json").is_file()}
    modules_file = model_dir / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SENTENCE_MODULES:
            raise ModelLoadError(f"{model_dir}: sentence-transformers module {m.get('type')!r} ({m.get('path')}) is not supported; splitnet runs {', '.join(_SENTENCE_MODULES)}")
    pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
    pool_cfg = model_dir / str(pool_dir) / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if "pooling_mode" in cfg:
            mode = cfg["pooling_mode"]
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
        else:
            modes = tuple(name for key, name in _LEGACY_POOLING_KEYS if cfg.get(key))
        pooling["mode"] = modes or ("mean",)
    pooling["normalize"] = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return pooling


def _tokenizer_for(config: dict, model_dir: Path):
    if config.get("splitnet_tokenizer") == "bytes":
        return ByteTokenizer()
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        return HFTokenizer(tok, pad_id=int(config.get("pad_token_id") or 0))
    return None


def load_model(
    source: str | Path | nn.Sequential,
    *,
    blocks: Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> BlockModel:
    """Load a model (or only ``blocks`` of it) into a :class:`BlockModel`.

    Args:
        source: built-in name (see ``splitnet.model.builtin.BUILTIN_MODELS``), a Hugging Face
            directory with config.json + safetensors, or an ``nn.Sequential``.
        blocks: the block indices to load; the embedding comes with block 0 and the head with
            the last block. ``None`` loads everything.
        dtype: cast floating-point weights (default: as stored).
    """
    if isinstance(source, nn.Sequential):
        return from_sequential(source)
    model_dir = resolve_model_dir(source)
    config = read_config(model_dir)
    arch = architecture_for(config, model_dir)
    L = arch.num_blocks
    wanted_blocks = sorted(set(range(L) if blocks is None else blocks))
    if any(not 0 <= i < L for i in wanted_blocks):
        raise ModelLoadError(f"blocks {wanted_blocks} outside 0..{L - 1} of {source}")
    names = list(weight_files(model_dir))
    renames = {n: n for n in names}  # module name -> checkpoint name
    task_model = getattr(arch, "meta_task_model", None)
    if task_model is not None:
        from splitnet.model.hf_names import checkpoint_renames

        renames = checkpoint_renames(task_model(), names)
        names = list(renames)
    unexpected = arch.unexpected_tensors(names) if hasattr(arch, "unexpected_tensors") else []
    if unexpected:
        raise ModelLoadError(
            f"{model_dir} has tensors this model would not use: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            "(a config field or module splitnet does not honour); refusing to serve it silently wrong"
        )

    parts: list[tuple[str, nn.Module, dict[str, str]]] = []  # (what, module, state key -> checkpoint name)
    embed = head = None
    if 0 in wanted_blocks:
        embed = arch.build_embed()
        parts.append(("embedding", embed, _by_prefix(embed, arch.embed_prefixes(names), names)))
    block_mods: dict[int, nn.Module] = {}
    for i in wanted_blocks:
        mod = arch.build_block(i)
        block_mods[i] = mod
        prefix = arch.block_prefix(names, i)
        parts.append((f"block {i}", mod, {k: prefix + k for k in mod.state_dict()}))
    if L - 1 in wanted_blocks:
        head = arch.build_head()
        mapping = arch.head_tensors(None, names) if hasattr(arch, "head_tensors") else {}
        parts.append(("head", head, mapping))

    needed = {full for _, _, m in parts for full in m.values()}
    missing = sorted(needed - set(names))
    if missing:
        raise ModelLoadError(f"{model_dir} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    wanted = {renames[n] for n in needed}
    by_checkpoint = load_tensors(model_dir, wanted.__contains__, dtype)
    tensors = {n: by_checkpoint[renames[n]] for n in needed}
    for what, mod, mapping in parts:
        load_into(mod, {k: tensors[v] for k, v in mapping.items()}, "", what)
        if dtype is not None:
            mod.to(dtype)
        mod.eval()
    return BlockModel(
        arch=arch,
        name=str(source),
        model_dir=model_dir,
        embed=embed,
        blocks=block_mods,
        head=head,
        tokenizer=_tokenizer_for(config, model_dir),
    )


def _by_prefix(module: nn.Module, prefixes: list[str], names: list[str]) -> dict[str, str]:
    keys = list(module.state_dict())
    for p in prefixes:
        if all(p + k in names for k in keys):
            return {k: p + k for k in keys}
    # fall back to the first prefix so the error message names real missing weights
    p = prefixes[0] if prefixes else ""
    return {k: p + k for k in keys}
