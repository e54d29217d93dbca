"""Any ``nn.Sequential`` as a chain of blocks: each child is one block; no embed or head.

The first stage takes ``{"x": tensor}`` (or ``{"hidden": tensor}``), every stage returns
``{"hidden": tensor}``, and the last stage returns ``{"output": tensor}``. Children may produce
tensors of any shape.
"""

from __future__ import annotations

from torch import nn

from splitnet.model.blocks import Architecture, BlockModel


class _Input(nn.Module):
    def forward(self, inputs, past_len):
        x = inputs["x"] if "x" in inputs else inputs["hidden"]
        return x, {"past_len": 0}


class _Output(nn.Module):
    def forward(self, h, ctx, all_logits=False):
        return {"output": h}


class _Child(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, h, ctx, cache=None, layer=0):
        return self.module(h)


class SequentialArchitecture(Architecture):
    kind = "sequential"

    def __init__(self, seq: nn.Sequential):
        super().__init__({"num_blocks": len(seq)})
        self.seq = seq

    @property
    def num_blocks(self):
        return len(self.seq)

    @property
    def hidden_size(self):
        return -1  # unknown: children may change shapes freely

    def build_embed(self):
        return _Input()

    def build_block(self, index):
        return _Child(self.seq[index])

    def build_head(self):
        return _Output()

    def embed_prefixes(self, names):
        return []

    def block_prefix(self, names, index):
        return f"{index}."

    def head_prefixes(self, names):
        return []


def from_sequential(seq: nn.Sequential, name: str = "sequential") -> BlockModel:
    """Wrap an in-memory ``nn.Sequential`` (its weights are used as they are)."""
    arch = SequentialArchitecture(seq)
    return BlockModel(
        arch=arch,
        name=name,
        model_dir=None,
        embed=arch.build_embed(),
        blocks={i: arch.build_block(i).eval() for i in range(len(seq))},
        head=arch.build_head(),
    )
