"""Llama / Qwen2 / Mistral-style decoders: RMSNorm, rotary positions, grouped-query attention,
SwiGLU MLP. Qwen2 adds q/k/v biases (``attention_bias`` or model_type "qwen2")."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from splitnet.errors import ModelLoadError
from splitnet.model.attention import attend, merge_heads
from splitnet.model.blocks import Architecture
from splitnet.model.gpt2 import LMHead


class RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_theta(cfg: Mapping[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    rope_type = (params.get("rope_type") if isinstance(params, dict) else None) or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "default":
        raise ModelLoadError(f"rope scaling {rope_type!r} is not supported yet; only default rotary embeddings are")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])

    def forward(self, inputs, past_len):
        return self.embed_tokens(inputs["input_ids"]), {"past_len": past_len}


class _Attn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg["hidden_size"]
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_head
        self.hs = cfg.get("head_dim") or C // self.n_head
        bias = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
        self.q_proj = nn.Linear(C, self.n_head * self.hs, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.hs, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.hs, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.hs, C, bias=False)
        inv_freq = 1.0 / (rope_theta(cfg) ** (torch.arange(0, self.hs, 2, dtype=torch.float32) / self.hs))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class _MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, I = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)


class LlamaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = _Attn(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = _MLP(cfg)

    def forward(self, h: torch.Tensor, ctx: dict, cache=None, layer: int = 0) -> torch.Tensor:
        a = self.self_attn
        B, T, _ = h.shape
        x = self.input_layernorm(h)
        q = a.q_proj(x).view(B, T, a.n_head, a.hs).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)
        k = a.k_proj(x).view(B, T, a.n_kv, a.hs).transpose(1, 2)  # (B, T, nkv*hs) -> (B, nkv, T, hs)
        v = a.v_proj(x).view(B, T, a.n_kv, a.hs).transpose(1, 2)
        pos = torch.arange(ctx["past_len"], ctx["past_len"] + T, device=h.device, dtype=torch.float32)
        freqs = torch.outer(pos, a.inv_freq)  # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = attend(q, k, v, causal=True, cache=cache, layer=layer)
        h = h + a.o_proj(merge_heads(y))
        m = self.mlp
        x = self.post_attention_layernorm(h)
        return h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


class LlamaArchitecture(Architecture):
    kind = "decoder"

    def build_embed(self):
        return LlamaEmbed(self.config)

    def build_block(self, index):
        return LlamaBlock(self.config)

    def build_head(self):
        C = self.config["hidden_size"]
        return LMHead(RMSNorm(C, self.config.get("rms_norm_eps", 1e-6)), C, self.config["vocab_size"])

    def _base(self, names):
        return "model." if any(n.startswith("model.") for n in names) else ""

    def embed_prefixes(self, names):
        return [self._base(names)]

    def block_prefix(self, names, index):
        return f"{self._base(names)}layers.{index}."

    def head_prefixes(self, names):
        return [""]

    def head_tensors(self, tensors_by_name, names):
        base = self._base(names)
        out = {"norm.weight": f"{base}norm.weight"}
        out["lm_head.weight"] = "lm_head.weight" if "lm_head.weight" in names else f"{base}embed_tokens.weight"
        return out
