"""sentence-transformers pooling, the head of every text-encoder stage that ends the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitnet.errors import ModelLoadError

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
