"""A tiny pre-LN ViT trained on scikit-learn's bundled 8x8 digits (seconds on a CPU).

Pre-LN blocks (``x = x + attn(ln(x)); x = x + mlp(ln(x))``) leave the residual stream
un-normalised, so the features that cross a cut carry per-token scale: the case AlignedVQ's
per-token alignment is for. Trained weights are cached under ~/.cache/splitnet (safetensors).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from splitnet.bench.data.stdlib_docs import CACHE_DIR


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class DigitsViT(nn.Module):
    """8x8 image -> 16 patches of 2x2 + a CLS token -> ``depth`` pre-LN blocks -> LN -> linear head."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, n_classes: int = 10):
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        b = img.shape[0]
        p = img.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)  # (B, 8, 8) -> (B, 16, 4)
        x = torch.cat([self.cls.expand(b, -1, -1), self.patch(p)], dim=1)  # (B, 17, dim)
        return x + self.pos

    def run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for blk in self.blocks[start:end]:
            x = blk(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x[:, 0])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.run_blocks(self.embed(img), 0, len(self.blocks))))


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    return train_test_split(x, d.target, test_size=0.3, random_state=seed, stratify=d.target)


def train_digits_vit(epochs: int = 40, seed: int = 0) -> tuple[DigitsViT, tuple]:
    """(trained model in eval mode, (x_train, x_test, y_train, y_test)); cached after the first run."""
    from safetensors.torch import load_file, save_file

    data = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsViT()
    path = CACHE_DIR / f"digits_vit_e{epochs}_s{seed}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), data
    xtr, _, ytr, _ = data
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(xt) + 63) // 64))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), data
