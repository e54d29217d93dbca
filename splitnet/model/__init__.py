"""Models as ordered blocks, cut into stages (see :mod:`splitnet.model.blocks`)."""

from splitnet.model.blocks import Architecture, BlockModel, Stage
from splitnet.model.builtin import BUILTIN_MODELS
from splitnet.model.kv_cache import KVCache
from splitnet.model.loading import load_model, resolve_model_dir

__all__ = ["Architecture", "BlockModel", "BUILTIN_MODELS", "KVCache", "Stage", "load_model", "resolve_model_dir"]
