"""BERT-style post-LN encoders (all-MiniLM-L6-v2 and friends), with sentence-transformers pooling.

Module names mirror the Hugging Face checkpoint so weights load by prefix.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from splitnet.errors import ModelLoadError

from splitnet.model.attention import attend, merge_heads, split_heads
from splitnet.model.blocks import Architecture


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        C = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], C)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], C)
        self.token_type_embeddings = nn.Embedding(cfg.get("type_vocab_size", 2), C)
        self.LayerNorm = nn.LayerNorm(C, eps=cfg.get("layer_norm_eps", 1e-12))

    def forward(self, inputs: Mapping[str, torch.Tensor], past_len: int):
        ids = inputs["input_ids"]
        B, T = ids.shape
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.long)
        tt = inputs.get("token_type_ids")
        if tt is None:
            tt = torch.zeros_like(ids)
        pos = torch.arange(T, device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(tt)
        h = self.LayerNorm(h)
        return h, bert_context(mask, h.dtype)


def bert_context(mask: torch.Tensor, dtype: torch.dtype) -> dict:
    # (B, T) 1/0 -> additive bias (B, 1, 1, T): 0 where attended, large negative at padding
    bias = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return {"attention_mask": mask, "bias": bias}


class _SelfAttention(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)


class _DenseNorm(nn.Module):
    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(c_in, c_out)
        self.LayerNorm = nn.LayerNorm(c_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(C)
        self.output = _DenseNorm(C, C, eps)


class _Intermediate(nn.Module):
    def __init__(self, C: int, I: int):  # noqa: E741 - C and I as in the papers' notation
        super().__init__()
        self.dense = nn.Linear(C, I)


class BertLayer(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        C, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.n_heads = cfg["num_attention_heads"]
        self.attention = _Attention(C, eps)
        self.intermediate = _Intermediate(C, cfg["intermediate_size"])
        self.output = _DenseNorm(cfg["intermediate_size"], C, eps)
        act = cfg.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new"):
            raise ValueError(f"unsupported hidden_act {act!r}")
        self.approximate = "tanh" if act == "gelu_new" else "none"

    def forward(self, h: torch.Tensor, ctx: dict, cache=None, layer: int = 0) -> torch.Tensor:
        a = self.attention.self
        q = split_heads(a.query(h), self.n_heads)  # (B, nh, T, hs)
        k = split_heads(a.key(h), self.n_heads)
        v = split_heads(a.value(h), self.n_heads)
        y = merge_heads(attend(q, k, v, causal=False, bias=ctx["bias"]))
        o = self.attention.output
        h = o.LayerNorm(o.dense(y) + h)  # post-LN: normalise after the residual add
        m = F.gelu(self.intermediate.dense(h), approximate=self.approximate)
        return self.output.LayerNorm(self.output.dense(m) + h)


POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")


class MeanPoolHead(nn.Module):
    """sentence-transformers pooling: each of ``modes`` in order (``cls``: first token, ``max``:
    masked max, ``mean``: masked mean, ``mean_sqrt_len_tokens``: masked sum / sqrt(tokens)),
    concatenated, then optional L2 normalisation (as sentence-transformers' Pooling + Normalize)."""

    def __init__(self, mode: str | tuple[str, ...] = "mean", normalize: bool = True):
        super().__init__()
        self.modes = (mode,) if isinstance(mode, str) else tuple(mode)
        bad = [m for m in self.modes if m not in POOLING_MODES]
        if bad or not self.modes:
            raise ModelLoadError(f"sentence-transformers pooling {bad or self.modes} is not supported; supported: {', '.join(POOLING_MODES)}")
        self.normalize = normalize

    def forward(self, h: torch.Tensor, ctx: dict, all_logits: bool = False) -> dict:
        mask = ctx["attention_mask"].unsqueeze(-1)  # (B, T, 1)
        out = []
        for mode in self.modes:
            if mode == "cls":
                out.append(h[:, 0])
            elif mode == "max":
                out.append(h.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
            else:
                m = mask.to(h.dtype)
                total = (h * m).sum(1)  # (B, C)
                n = m.sum(1).clamp(min=1e-9)
                out.append(total / (n if mode == "mean" else n.sqrt()))
        pooled = out[0] if len(out) == 1 else torch.cat(out, dim=-1)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return {"embedding": pooled}


class BertArchitecture(Architecture):
    kind = "encoder"

    def build_embed(self) -> nn.Module:
        return BertEmbeddings(self.config)

    def build_block(self, index: int) -> nn.Module:
        return BertLayer(self.config)

    def build_head(self) -> nn.Module:
        pooling = self.config.get("_splitnet_pooling", {"mode": "mean", "normalize": True})
        return MeanPoolHead(pooling.get("mode", "mean"), pooling.get("normalize", True))

    def embed_prefixes(self, names):
        return ["embeddings.", "bert.embeddings.", "model.embeddings."]

    def unexpected_tensors(self, names: list[str]) -> list[str]:
        """A task head in the checkpoint (BertForSequenceClassification's ``classifier``, a masked-LM
        ``cls`` head) would be dropped and the pooled embedding returned instead: refused."""
        return [n for n in names if n.startswith(("classifier.", "cls.", "qa_outputs."))]

    def block_prefix(self, names, index):
        for base in ("encoder.layer.", "bert.encoder.layer.", "model.encoder.layer."):
            if any(n.startswith(base) for n in names):
                return f"{base}{index}."
        return f"encoder.layer.{index}."

    def head_prefixes(self, names):
        return []

    def context(self, inputs, past_len, hidden):
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        return bert_context(mask, hidden.dtype)

    def carry(self, ctx):
        return {"attention_mask": ctx["attention_mask"]}


