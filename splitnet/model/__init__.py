"""Models as ordered blocks, cut into stages (see :mod:`splitnet.model.blocks`).

The names below are imported on first use (PEP 562), so that torch-free parts of this package
(:mod:`splitnet.model.tokenizer`) can be used on an edge device without torch installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Architecture": "splitnet.model.blocks",
    "BlockModel": "splitnet.model.blocks",
    "Stage": "splitnet.model.blocks",
    "BUILTIN_MODELS": "splitnet.model.builtin",
    "KVCache": "splitnet.model.kv_cache",
    "load_model": "splitnet.model.loading",
    "resolve_model_dir": "splitnet.model.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'splitnet.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
