"""Vision Transformer (pre-LN), mirroring HF ``ViTModel`` / ``ViTForImageClassification`` names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitnet.model.attention import attend, merge_heads, split_heads
from splitnet.model.blocks import Architecture


class _PatchEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        p = cfg["patch_size"]
        self.projection = nn.Conv2d(cfg.get("num_channels", 3), cfg["hidden_size"], kernel_size=p, stride=p)


class ViTEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg["hidden_size"]
        n_patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, C))
        self.patch_embeddings = _PatchEmbeddings(cfg)

    def forward(self, inputs, past_len):
        x = inputs["pixel_values"]
        p = self.patch_embeddings.projection(x.to(self.cls_token.dtype))  # (B, 3, H, W) -> (B, C, H/p, W/p)
        p = p.flatten(2).transpose(1, 2)  # (B, C, N) -> (B, N, C)
        h = torch.cat([self.cls_token.expand(p.shape[0], -1, -1), p], dim=1)  # (B, N + 1, C)
        return h + self.position_embeddings, {"past_len": 0}


class _QKV(nn.Module):
    def __init__(self, C, bias):
        super().__init__()
        self.query = nn.Linear(C, C, bias=bias)
        self.key = nn.Linear(C, C, bias=bias)
        self.value = nn.Linear(C, C, bias=bias)


class _Dense(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.dense = nn.Linear(c_in, c_out)


class _ViTAttention(nn.Module):
    def __init__(self, C, bias):
        super().__init__()
        self.attention = _QKV(C, bias)
        self.output = _Dense(C, C)


class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.n_heads = cfg["num_attention_heads"]
        self.layernorm_before = nn.LayerNorm(C, eps=eps)
        self.attention = _ViTAttention(C, cfg.get("qkv_bias", True))
        self.layernorm_after = nn.LayerNorm(C, eps=eps)
        self.intermediate = _Dense(C, cfg["intermediate_size"])
        self.output = _Dense(cfg["intermediate_size"], C)

    def forward(self, h, ctx, cache=None, layer=0):
        x = self.layernorm_before(h)
        a = self.attention.attention
        y = attend(split_heads(a.query(x), self.n_heads), split_heads(a.key(x), self.n_heads), split_heads(a.value(x), self.n_heads), causal=False)
        h = h + self.attention.output.dense(merge_heads(y))
        m = F.gelu(self.intermediate.dense(self.layernorm_after(h)))
        return h + self.output.dense(m)


class ViTHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg["hidden_size"]
        self.layernorm = nn.LayerNorm(C, eps=cfg.get("layer_norm_eps", 1e-12))
        n_labels = len(cfg.get("id2label") or {}) if cfg.get("architectures", [""])[0].endswith("ForImageClassification") else 0
        self.classifier = nn.Linear(C, n_labels) if n_labels else None

    def forward(self, h, ctx, all_logits=False):
        cls = self.layernorm(h)[:, 0]
        if self.classifier is None:
            return {"pooled": cls}
        return {"logits": self.classifier(cls)}


class ViTArchitecture(Architecture):
    kind = "vision"

    def build_embed(self):
        return ViTEmbed(self.config)

    def build_block(self, index):
        return ViTBlock(self.config)

    def build_head(self):
        return ViTHead(self.config)

    def _base(self, names):
        return "vit." if any(n.startswith("vit.") for n in names) else ""

    def embed_prefixes(self, names):
        return [f"{self._base(names)}embeddings."]

    def block_prefix(self, names, index):
        return f"{self._base(names)}encoder.layer.{index}."

    def head_prefixes(self, names):
        return [""]

    def head_tensors(self, tensors_by_name, names):
        base = self._base(names)
        out = {"layernorm.weight": f"{base}layernorm.weight", "layernorm.bias": f"{base}layernorm.bias"}
        if "classifier.weight" in names:
            out["classifier.weight"] = "classifier.weight"
            out["classifier.bias"] = "classifier.bias"
        return out
