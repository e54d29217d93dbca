"""Multi-head attention core shared by every family (scaled dot-product, optional KV cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitnet.model.kv_cache import KVCache


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, C)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    cache: KVCache | None = None,
    layer: int = 0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v: (B, nh, T, hs) (k/v may have fewer heads: grouped-query attention).

    With a cache, k/v are appended to the layer's cache and queries attend to every cached
    position plus the causal part of the new ones.
    """
    if cache is not None:
        k, v = cache.append(layer, k, v)
    if k.shape[1] != q.shape[1]:  # GQA: (B, n_kv, S, hs) -> (B, nh, S, hs)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    T, S = q.shape[2], k.shape[2]
    if causal:
        if T == 1:
            mask = None  # one new token sees everything cached
        else:
            # query t (absolute position S - T + t) may see keys 0 .. S - T + t
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
