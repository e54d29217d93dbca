"""Name-keyed codec registry. Heavy codecs (faiss) import lazily on first use."""

from __future__ import annotations

import importlib
from typing import Any

from splitnet.codecs.base import Codec

_REGISTRY: dict[str, type[Codec]] = {}

# name -> module that registers it when imported
_LAZY: dict[str, str] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def register_lazy(name: str, module: str) -> None:
    """Declare that importing ``module`` registers codec ``name``."""
    _LAZY[name] = module


def known_codecs() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def codec_class(name: str) -> type[Codec]:
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(known_codecs())}") from None


def make_codec(name: str, **config: Any) -> Codec:
    """A new, unfitted codec ``name`` built with ``config``."""
    return codec_class(name)(**config)


for _name, _mod in {
    "fp32": "splitnet.codecs.scalar",
    "fp16": "splitnet.codecs.scalar",
    "int8": "splitnet.codecs.scalar",
    "int4": "splitnet.codecs.scalar",
    "topk": "splitnet.codecs.scalar",
    "pq": "splitnet.codecs.vq",
    "rvq": "splitnet.codecs.vq",
    "alignedvq": "splitnet.codecs.alignedvq",
    "transform": "splitnet.codecs.transform",
    "learned": "splitnet.codecs.learned",
}.items():
    register_lazy(_name, _mod)
