"""A model as ordered blocks (embed | block 0 .. block L-1 | head) and Stages that slice it.

An :class:`Architecture` knows one model family: how to build its embed, blocks and head from a
config, which weight names each part owns, and what crosses a cut. :class:`BlockModel` holds the
parts that were loaded (all of them, or only one stage's) and cuts :class:`Stage` s from them.

What crosses a cut is a dict of tensors: always ``"hidden"`` (B, T, C), plus whatever the family
needs to rebuild its context on the other side (``"attention_mask"`` for padded encoders).
Decoder stages keep their own KV cache, so positions come from the cache length.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from splitnet.errors import ConfigError, StageError
from splitnet.model.kv_cache import KVCache


class Architecture(abc.ABC):
    """One model family. Subclasses are registered in :mod:`splitnet.model.registry`."""

    #: "encoder" | "decoder" | "vision" | "sequential"
    kind: str = ""

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)

    #: config keys of the block count and the width of the residual stream
    num_blocks_key: str = "num_hidden_layers"
    hidden_size_key: str = "hidden_size"

    # --- structure -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(self.config[self.num_blocks_key])

    @property
    def hidden_size(self) -> int:
        return int(self.config[self.hidden_size_key])

    @abc.abstractmethod
    def build_embed(self) -> nn.Module: ...

    @abc.abstractmethod
    def build_block(self, index: int) -> nn.Module: ...

    @abc.abstractmethod
    def build_head(self) -> nn.Module: ...

    # --- weights ---------------------------------------------------------------------------
    @abc.abstractmethod
    def embed_prefixes(self, names: list[str]) -> list[str]:
        """Weight-name prefixes that the embed module loads from (first match is stripped)."""

    @abc.abstractmethod
    def block_prefix(self, names: list[str], index: int) -> str: ...

    @abc.abstractmethod
    def head_prefixes(self, names: list[str]) -> list[str]: ...

    def tie_head(self, head: nn.Module, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """Extra tensors the head needs that live under other names (tied embeddings)."""
        return {}

    # --- data flow ---------------------------------------------------------------------------
    def context(self, inputs: Mapping[str, torch.Tensor], past_len: int, hidden: torch.Tensor) -> dict:
        """Per-forward context (masks, positions) rebuilt from what crossed the cut."""
        return {"past_len": past_len}

    def carry(self, ctx: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Context tensors that must cross a cut beside ``hidden``."""
        return {}

    @property
    def uses_kv_cache(self) -> bool:
        return self.kind == "decoder"

    def make_stage(self, start: int, end: int, embed: nn.Module | None, blocks: list[nn.Module], head: nn.Module | None) -> "Stage":
        """The Stage that runs these parts (families built from transformers' modules override it)."""
        return Stage(self, start, end, embed, blocks, head)


class Stage(nn.Module):
    """A contiguous slice of a model: embed (if first), blocks [start, end), head (if last)."""

    def __init__(self, arch: Architecture, start: int, end: int, embed: nn.Module | None, blocks: list[nn.Module], head: nn.Module | None):
        nn.Module.__init__(self)
        self.arch = arch
        self.start = start
        self.end = end
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def __repr__(self) -> str:  # nn.Module's repr is too long for logs
        parts = (["embed"] if self.embed is not None else []) + [f"blocks {self.start}..{self.end - 1}"] + (["head"] if self.head is not None else [])
        return f"Stage({self.arch.kind}, {', '.join(parts)})"

    def hidden_input(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The hidden state that crossed the cut into this stage, checked, in this stage's dtype."""
        if "hidden" not in inputs:
            raise StageError(f"{self!r} expects a 'hidden' tensor from the previous stage, got {sorted(inputs)}")
        h = inputs["hidden"]
        if self.arch.hidden_size > 0 and (h.dim() != 3 or h.shape[-1] != self.arch.hidden_size):
            raise StageError(f"{self!r} expects hidden of shape (B, T, {self.arch.hidden_size}), got {tuple(h.shape)}")
        param = next(self.parameters(), None)
        if param is not None and h.is_floating_point():
            h = h.to(param.dtype)
        return h

    def token_ids_input(self, inputs: Mapping[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
        """The first stage's ``input_ids``, every id checked against the vocabulary, on this
        stage's device.

        Ids given in host memory (the worker leaves them there) are checked before they are
        copied: checking them on a GPU would wait for everything queued on it, once per step.
        """
        ids = inputs.get("input_ids")
        if ids is None:
            raise StageError(f"{self!r} expects input_ids, got {sorted(inputs)}")
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < 0 or hi >= vocab_size:
                raise StageError(f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary 0..{vocab_size - 1}")
        param = next(self.parameters(), None)
        return ids.to(param.device, non_blocking=True) if param is not None and ids.device != param.device else ids

    def stacked_input(self, inputs: Sequence[Mapping[str, torch.Tensor]], vocab_size: int | None = None, *, ragged: bool = False) -> torch.Tensor:
        """The members of a cached batch, each one sequence, stacked along the batch:
        ``input_ids`` (B, T) of a first stage (``vocab_size`` given), checked against the
        vocabulary once and copied to the device in one copy, or ``hidden`` (B, T, C), checked
        as :meth:`hidden_input` checks one and converted once. Members of different lengths are
        refused unless ``ragged``: then each is right-padded to the longest (token 0, zero hidden
        states), and the caller masks and drops the padding."""
        name = "input_ids" if vocab_size is not None else "hidden"
        parts = []
        for x in inputs:
            t = x.get(name)
            if t is None:
                raise StageError(f"{self!r} expects {'input_ids' if vocab_size is not None else 'a hidden tensor from the previous stage'}, got {sorted(x)}")
            parts.append(t)
        first = parts[0]
        if vocab_size is None and self.arch.hidden_size > 0 and any(p.dim() != 3 or p.shape[-1] != self.arch.hidden_size for p in parts):
            bad = next(p for p in parts if p.dim() != 3 or p.shape[-1] != self.arch.hidden_size)
            raise StageError(f"{self!r} expects hidden of shape (B, T, {self.arch.hidden_size}), got {tuple(bad.shape)}")
        if any(p.dim() < 2 or p.shape[0] != 1 or p.shape[2:] != first.shape[2:] or p.dtype != first.dtype for p in parts):
            raise StageError("a cached request sends one sequence (batch 1, no attention_mask) of the same tensors as the other members")
        longest = max(p.shape[1] for p in parts)
        if any(p.shape[1] != longest for p in parts):
            if not ragged:
                raise StageError("a cached batch without padding needs all members the same number of tokens")
            parts = [p if p.shape[1] == longest else torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, longest - p.shape[1])) for p in parts]
        x = torch.cat(parts, dim=0) if len(parts) > 1 else first  # (B, T) ids or (B, T, C) hidden, where the members' tensors are
        if vocab_size is not None:
            return self.token_ids_input({"input_ids": x}, vocab_size)
        return self.hidden_input({"hidden": x})

    def new_cache(self) -> KVCache:
        """An empty per-request KV cache of the type this stage's blocks write."""
        return KVCache()

    def cache_pool(self, max_requests: int, max_bytes: int | None = None):
        """A KV cache shared by many requests that :meth:`forward_batch` batches over, or None
        when this stage batches only requests without a cache."""
        return None

    @torch.no_grad()
    def forward_batch(self, inputs: list[Mapping[str, torch.Tensor]], caches: list | None, *, all_logits: bool = False) -> list[dict[str, torch.Tensor]]:
        """One forward for several requests; outputs per member, in order. Without caches, the
        members' tensors (equal but for the batch dimension) are stacked along the batch and
        every output is split back along it."""
        if caches is not None:
            raise StageError(f"{self!r} batches only requests without a KV cache")
        if len(inputs) == 1:
            return [self.forward(inputs[0], None, all_logits=all_logits)]
        names = sorted(inputs[0])
        if any(sorted(x) != names or any(x[n].shape[1:] != inputs[0][n].shape[1:] or x[n].dtype != inputs[0][n].dtype for n in names) for x in inputs):
            raise StageError("members of a batch must carry the same tensors, equal in shape but for the batch dimension")
        sizes = [int(x[names[0]].shape[0]) for x in inputs]
        if any(int(x[n].shape[0]) != b for x, b in zip(inputs, sizes) for n in names):
            raise StageError("every tensor of a request must have the same batch size")
        out = self.forward({n: torch.cat([x[n] for x in inputs], dim=0) for n in names}, None, all_logits=all_logits)
        total = sum(sizes)
        if any(v.dim() == 0 or v.shape[0] != total for v in out.values()):
            raise StageError(f"{self!r} returned outputs without a batch dimension; it cannot be batched")
        return [dict(zip(out, parts)) for parts in zip(*(torch.split(v, sizes, dim=0) for v in out.values()))]

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.head is not None

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, torch.Tensor], cache: KVCache | None = None, *, all_logits: bool = False) -> dict[str, torch.Tensor]:
        """Run the slice. ``inputs`` is the model input for the first stage, else what crossed the cut."""
        past_len = cache.length if cache is not None else 0
        if self.embed is not None:
            h, ctx = self.embed(inputs, past_len)
        else:
            h = self.hidden_input(inputs)
            ctx = self.arch.context(inputs, past_len, h)
        for offset, block in enumerate(self.blocks):
            h = block(h, ctx, cache, self.start + offset)
        if cache is not None:
            cache.advance(h.shape[1])
        if self.head is not None:
            return self.head(h, ctx, all_logits=all_logits)
        return {"hidden": h, **self.arch.carry(ctx)}


@dataclass
class BlockModel:
    """The loaded parts of a model, and the means to cut stages from them.

    Attributes:
        arch: the family (structure, weights naming, cut contract).
        name: the name it was loaded under ("minilm" or a directory path).
        model_dir: the Hugging Face directory the weights came from.
        embed, blocks, head: loaded modules; ``blocks`` maps block index to module (a stage-only
            load holds just its own indices).
        tokenizer: an object with ``encode``/``decode``/``__call__`` (may be None).
    """

    arch: Architecture
    name: str
    model_dir: Path | None
    embed: nn.Module | None
    blocks: dict[int, nn.Module]
    head: nn.Module | None
    tokenizer: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.arch.kind

    @property
    def num_blocks(self) -> int:
        return self.arch.num_blocks

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    def stage(self, start: int, end: int) -> Stage:
        """Blocks [start, end); embed included when start == 0, head when end == num_blocks."""
        if not 0 <= start < end <= self.num_blocks:
            raise ConfigError(f"stage blocks [{start}, {end}) outside 0..{self.num_blocks} for {self.name}")
        missing = [i for i in range(start, end) if i not in self.blocks]
        if missing or (start == 0 and self.embed is None) or (end == self.num_blocks and self.head is None):
            raise ConfigError(f"blocks {missing or ''} of {self.name} were not loaded in this process; load them with load_model(..., blocks=range({start}, {end}))")
        return self.arch.make_stage(
            start,
            end,
            self.embed if start == 0 else None,
            [self.blocks[i] for i in range(start, end)],
            self.head if end == self.num_blocks else None,
        ).eval()

    def full(self) -> Stage:
        """The whole model as one stage (the unsplit reference)."""
        return self.stage(0, self.num_blocks)

    def tokenize(self, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.name} has no tokenizer; pass input_ids instead of text")
        return self.tokenizer(texts, max_length=max_length)

    def param_bytes(self, start: int, end: int) -> int:
        return sum(p.numel() * p.element_size() for p in self.stage(start, end).parameters())

    def fingerprint(self) -> str:
        """A short hash of the config and weight file names/sizes (checked by the runtime)."""
        h = hashlib.sha256(json.dumps(self.arch.config, sort_keys=True, default=str).encode())
        if self.model_dir is not None:
            for p in sorted(Path(self.model_dir).glob("*.safetensors")):
                h.update(p.name.encode())
                h.update(str(p.stat().st_size).encode())
        return h.hexdigest()[:16]
