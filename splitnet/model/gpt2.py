"""GPT-2 (pre-LN decoder with learned positions and Conv1D weights), mirroring HF names."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from splitnet.model.attention import attend, merge_heads, split_heads
from splitnet.model.blocks import Architecture


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Embed(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.n_positions = cfg["n_positions"]

    def forward(self, inputs: Mapping[str, torch.Tensor], past_len: int):
        ids = inputs["input_ids"]
        T = ids.shape[1]
        if past_len + T > self.n_positions:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds n_positions={self.n_positions}")
        pos = torch.arange(past_len, past_len + T, device=ids.device)
        return self.wte(ids) + self.wpe(pos)[None], {"past_len": past_len}


class _Attn(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.c_attn = Conv1D(C, 3 * C)
        self.c_proj = Conv1D(C, C)


class _MLP(nn.Module):
    def __init__(self, C: int, inner: int):
        super().__init__()
        self.c_fc = Conv1D(C, inner)
        self.c_proj = Conv1D(inner, C)


class GPT2Block(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        C = cfg["n_embd"]
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.n_head = cfg["n_head"]
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.attn = _Attn(C)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.mlp = _MLP(C, cfg.get("n_inner") or 4 * C)

    def forward(self, h: torch.Tensor, ctx: dict, cache=None, layer: int = 0) -> torch.Tensor:
        q, k, v = self.attn.c_attn(self.ln_1(h)).split(h.shape[-1], dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        y = attend(split_heads(q, self.n_head), split_heads(k, self.n_head), split_heads(v, self.n_head), causal=True, cache=cache, layer=layer)
        h = h + self.attn.c_proj(merge_heads(y))
        return h + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(h)), approximate="tanh"))


class LMHead(nn.Module):
    """Final norm + vocabulary projection; returns the last position's logits unless asked."""

    def __init__(self, norm: nn.Module, C: int, vocab: int):
        super().__init__()
        self.norm = norm
        self.lm_head = nn.Linear(C, vocab, bias=False)

    def forward(self, h: torch.Tensor, ctx: dict, all_logits: bool = False) -> dict:
        if not all_logits:
            h = h[:, -1:]  # only the next-token distribution is needed for generation
        logits = self.lm_head(self.norm(h))
        return {"logits": logits if all_logits else logits[:, -1]}


class GPT2Architecture(Architecture):
    kind = "decoder"

    num_blocks_key = "n_layer"
    hidden_size_key = "n_embd"

    def build_embed(self):
        return GPT2Embed(self.config)

    def build_block(self, index):
        return GPT2Block(self.config)

    def build_head(self):
        C = self.config["n_embd"]
        return LMHead(nn.LayerNorm(C, eps=self.config.get("layer_norm_epsilon", 1e-5)), C, self.config["vocab_size"])

    def _base(self, names):
        return "transformer." if any(n.startswith("transformer.") for n in names) else ""

    def embed_prefixes(self, names):
        return [self._base(names)]

    def block_prefix(self, names, index):
        return f"{self._base(names)}h.{index}."

    def head_prefixes(self, names):
        return [""]

    def head_tensors(self, tensors_by_name, names):
        """Map checkpoint names to LMHead's state dict (norm = ln_f, lm_head tied to wte)."""
        base = self._base(names)
        out = {"norm.weight": f"{base}ln_f.weight", "norm.bias": f"{base}ln_f.bias"}
        out["lm_head.weight"] = "lm_head.weight" if "lm_head.weight" in names else f"{base}wte.weight"
        return out
