"""Checkpoint tensor names -> the names transformers' modules use, by transformers' own mapping.

transformers 5 renames some modules' parameters relative to the checkpoints on the hub (ViT's
``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj`` in the module) and
applies its conversion mapping when it loads. A stage reads the checkpoint itself, so it applies
the same mapping (``transformers.conversion_mapping.get_model_conversion_mapping`` on the family's
task model built on the meta device). Renamings only: a mapping that converts tensors (merging or
splitting them) is refused, by name.
"""

from __future__ import annotations

from typing import Iterable

from splitnet.errors import ModelLoadError


def checkpoint_renames(meta_task_model, names: Iterable[str]) -> dict[str, str]:
    """{module name: checkpoint name} for every checkpoint tensor."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(meta_task_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out: dict[str, str] = {}
    for name in names:
        new, converted_by = rename_source_key(name, renamings, converters)
        if converted_by is not None:
            raise ModelLoadError(f"checkpoint tensor {name!r} needs transformers' weight conversion {converted_by!r}; splitnet loads renamed tensors only")
        if new in out:
            raise ModelLoadError(f"checkpoint tensors {out[new]!r} and {name!r} both map to {new!r}")
        out[new] = name
    return out
