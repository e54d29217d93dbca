"""Receiver-side context adapter for AlignedVQ ("aligned fine-tuning").

The receiver decodes every token of a sequence from its codes; a small pre-LN transformer then
looks at the whole decoded sequence and adds a correction to each token, trained on calibration
features only to bring the decoded features (and, optionally, the next stages' output) back toward
the true ones. Training uses torch (:func:`train_adapter`); decoding runs the same network in
plain numpy (:class:`NumpyAdapter`: a few small GEMMs, no torch dispatch overhead), so neither side
of a cut needs torch for the codec. It adds no byte to the wire: payload and encoder are unchanged.

Weights live in the fitted codec's state as ``adapter.<param>`` float32 arrays (safetensors) and
its shape in the codec config, so they are covered by the codec's content hash.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from splitnet.errors import CodecError

PREFIX = "adapter."


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of the adapter.

    Attributes:
        width: channels inside the adapter (features are projected C -> width -> C).
        layers: transformer layers (pre-LN, bidirectional attention over one sequence).
        heads: attention heads; must divide ``width``.
        ffn: hidden width of each layer's MLP.
        max_positions: learned position embeddings; longer sequences reuse the last one.
    """

    width: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    max_positions: int = 512

    def __post_init__(self) -> None:
        for k in ("width", "layers", "heads", "ffn", "max_positions"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16:
                raise ValueError(f"adapter.{k} must be an int in 1..65536, got {v!r}")

    def as_dict(self) -> dict[str, int]:
        return {"width": self.width, "layers": self.layers, "heads": self.heads, "ffn": self.ffn, "max_positions": self.max_positions}


def build_adapter(channels: int, cfg: AdapterConfig):
    """A fresh adapter; its output layer starts at zero, so it starts as the identity."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if cfg.width % cfg.heads:
        raise ValueError(f"adapter.heads={cfg.heads} does not divide adapter.width={cfg.width}")
    W = cfg.width

    class _Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(W)
            self.qkv = nn.Linear(W, 3 * W)
            self.proj = nn.Linear(W, W)
            self.ln2 = nn.LayerNorm(W)
            self.fc = nn.Linear(W, cfg.ffn)
            self.out = nn.Linear(cfg.ffn, W)

        def forward(self, h, bias):
            B, T, C = h.shape
            q, k, v = self.qkv(self.ln1(h)).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.heads, C // cfg.heads).transpose(1, 2) for t in (q, k, v))  # (B, T, C) -> (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            h = h + self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)
            return h + self.out(F.gelu(self.fc(self.ln2(h)), approximate="tanh"))

    class ContextAdapter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(channels, W)
            self.pos = nn.Embedding(cfg.max_positions, W)
            nn.init.normal_(self.pos.weight, std=0.02)
            self.layers = nn.ModuleList(_Layer() for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(W)
            self.head = nn.Linear(W, channels)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, x, mask):
            """x (B, T, C) decoded features, mask (B, T) bool (True = real token) -> (B, T, C)."""
            B, T, C = x.shape
            pos = torch.arange(T, device=x.device).clamp(max=cfg.max_positions - 1)
            bias = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # (B, T) -> (B, 1, 1, T)
            h = self.inp(x) + self.pos(pos)[None]  # (B, T, C) -> (B, T, W)
            for layer in self.layers:
                h = layer(h, bias)
            return x + self.head(self.ln_f(h))  # (B, T, W) -> (B, T, C), a correction of x

    return ContextAdapter()


def adapter_arrays(module) -> dict[str, np.ndarray]:
    return {PREFIX + k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}


def adapter_shapes(channels: int, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of an adapter (what :func:`adapter_arrays` writes, without prefix)."""
    W, out = cfg.width, {}
    out.update({"inp.weight": (W, channels), "inp.bias": (W,), "pos.weight": (cfg.max_positions, W)})
    for i in range(cfg.layers):
        for k, shp in {"ln1.weight": (W,), "ln1.bias": (W,), "qkv.weight": (3 * W, W), "qkv.bias": (3 * W,),
                       "proj.weight": (W, W), "proj.bias": (W,), "ln2.weight": (W,), "ln2.bias": (W,),
                       "fc.weight": (cfg.ffn, W), "fc.bias": (cfg.ffn,), "out.weight": (W, cfg.ffn), "out.bias": (W,)}.items():
            out[f"layers.{i}.{k}"] = shp
    out.update({"ln_f.weight": (W,), "ln_f.bias": (W,), "head.weight": (channels, W), "head.bias": (channels,)})
    return out


def _ln(h: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + eps) * g + b


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    y = x * x
    y *= 0.044715 * x
    y += x
    y *= 0.7978845608028654
    np.tanh(y, out=y)
    y += 1.0
    y *= 0.5 * x
    return y


class NumpyAdapter:
    """The trained adapter's forward pass in numpy (the decode path)."""

    def __init__(self, channels: int, cfg: AdapterConfig, arrays: Mapping[str, np.ndarray]):
        want = adapter_shapes(channels, cfg)
        got = {k[len(PREFIX):]: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items() if k.startswith(PREFIX)}
        if set(got) != set(want):
            raise ValueError(f"adapter arrays {sorted(set(got) ^ set(want))[:4]} do not match the adapter config")
        for k, v in got.items():
            if v.shape != want[k]:
                raise ValueError(f"adapter array {k} has shape {v.shape}, config needs {want[k]}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"adapter array {k} holds non-finite values")
        self.cfg, self.p = cfg, got
        self.t = {k: np.ascontiguousarray(v.T) for k, v in got.items() if k.endswith("weight") and v.ndim == 2 and k != "pos.weight"}

    def __call__(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """x (B, T, C) decoded features, mask (B, T) bool -> (B, T, C)."""
        p, t, cfg = self.p, self.t, self.cfg
        B, T, C = x.shape
        W, nh = cfg.width, cfg.heads
        hs = W // nh
        lin = lambda a, k: a @ t[k + ".weight"] + p[k + ".bias"]  # noqa: E731  (n, in) -> (n, out), one GEMM
        pos = p["pos.weight"][np.minimum(np.arange(T), cfg.max_positions - 1)]
        x2 = x.reshape(B * T, C)  # (B, T, C) -> (B*T, C)
        h = (lin(x2, "inp").reshape(B, T, W) + pos).reshape(B * T, W)
        bias = None if mask.all() else np.where(mask, 0.0, -np.inf).astype(np.float32)[:, None, None, :]  # (B, 1, 1, T)
        scale = np.float32(1.0 / np.sqrt(hs))
        for i in range(cfg.layers):
            k_ = f"layers.{i}."
            a = lin(_ln(h, p[k_ + "ln1.weight"], p[k_ + "ln1.bias"]), k_ + "qkv")  # (B*T, 3W)
            q, k, v = (a[:, j * W : (j + 1) * W].reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for j in range(3))  # -> (B, nh, T, hs)
            att = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, nh, T, T)
            if bias is not None:
                att += bias
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(B * T, W)  # (B, nh, T, hs) -> (B*T, W)
            h = h + lin(y, k_ + "proj")
            h = h + lin(_gelu_tanh(lin(_ln(h, p[k_ + "ln2.weight"], p[k_ + "ln2.bias"]), k_ + "fc")), k_ + "out")
        out = x2 + lin(_ln(h, p["ln_f.weight"], p["ln_f.bias"]), "head")  # (B*T, W) -> (B*T, C)
        return out.reshape(B, T, C).astype(np.float32, copy=False)


def split_lengths(n: int, lengths) -> np.ndarray:
    """Validated per-sequence lengths of ``n`` packed tokens (None = one sequence)."""
    if lengths is None:
        return np.array([n], dtype=np.int64)
    lens = np.asarray(lengths).astype(np.int64).reshape(-1)
    if (lens < 0).any() or int(lens.sum()) != n:
        raise CodecError(f"sequence lengths {lens.tolist()[:8]} do not add up to the {n} decoded tokens")
    return lens


def pad_sequences(tokens: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) packed tokens -> (B, T, C) zero-padded batch and (B, T) bool mask."""
    t = int(lens.max()) if lens.size else 0
    out = np.zeros((len(lens), t, tokens.shape[1]), dtype=np.float32)
    mask = np.arange(t)[None, :] < lens[:, None]
    out[mask] = tokens  # (N, C) -> (B, T, C)
    return out, mask


def apply_adapter(adapter: "NumpyAdapter", tokens: np.ndarray, lens: np.ndarray, batch_tokens: int = 8192) -> np.ndarray:
    """Run the adapter over packed tokens (N, C) of sequences with ``lens`` tokens each
    (sequences of similar length batched together)."""
    out = np.empty_like(tokens, dtype=np.float32)
    offs = np.concatenate([[0], np.cumsum(lens)])
    for idx in length_batches(lens, batch_tokens):
        if len(idx) == 1:
            s = idx[0]
            out[offs[s] : offs[s + 1]] = adapter(tokens[None, offs[s] : offs[s + 1]], np.ones((1, int(lens[s])), bool))[0]
            continue
        x, mask = pad_sequences(np.concatenate([tokens[offs[s] : offs[s + 1]] for s in idx]), lens[idx])
        rows = adapter(x, mask)[mask]  # (B, T, C) -> (n, C), in sequence order
        pos = 0
        for s in idx:
            out[offs[s] : offs[s + 1]] = rows[pos : pos + lens[s]]
            pos += int(lens[s])
    return out


def length_batches(lens: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Sequence indices grouped by similar length, each group about ``batch_tokens`` padded tokens
    (padding costs time: attention over a padded batch is several times slower on CPU)."""
    order = np.flatnonzero(lens > 0)
    order = order[np.argsort(lens[order], kind="stable")]
    out, cur = [], []
    for s in order:
        if cur and int(lens[s]) * (len(cur) + 1) > batch_tokens:
            out.append(np.array(cur))
            cur = []
        cur.append(s)
    if cur:
        out.append(np.array(cur))
    return out


class TableDecoder:
    """Codes -> features as the numpy decoder computes them (bias + sum of table rows), as torch
    parameters so the decoder tables can be trained together with the adapter."""

    def __init__(self, bias: np.ndarray, tables: list[np.ndarray], trainable: bool):
        import torch

        self.bias = torch.nn.Parameter(torch.from_numpy(np.array(bias, dtype=np.float32)), requires_grad=trainable)
        self.tables = [torch.nn.Parameter(torch.from_numpy(np.array(t, dtype=np.float32)), requires_grad=trainable) for t in tables]

    def parameters(self):
        return [self.bias, *self.tables] if self.bias.requires_grad else []

    def __call__(self, codes):
        out = self.bias.expand(codes.shape[0], -1)
        for i, t in enumerate(self.tables):
            out = out + t[codes[:, i]]  # (n,) -> (n, C)
        return out


def train_adapter(
    module,
    decoder: TableDecoder,
    codes: np.ndarray,
    target: np.ndarray,
    lens: np.ndarray,
    *,
    steps: int,
    batch_tokens: int = 4096,
    lr: float = 2e-3,
    table_lr: float = 3e-4,
    tail: Callable | None = None,
    tail_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``module`` (and ``decoder``'s tables when trainable) so that
    module(decoder(codes)) approaches ``target``: packed (N, L) codes and (N, C) true features of
    sequences with ``lens`` tokens each (calibration data only).

    Loss: mean squared error over real tokens, divided by the target's per-channel variance
    (scale-free), plus ``tail_weight`` * mean(1 - cosine) between ``tail(adapted, mask)`` and
    ``tail(target, mask)`` when a differentiable ``tail`` (e.g. the next stages of the model) is
    given. AdamW, linear warm-up then cosine decay, ``steps`` steps of about ``batch_tokens``
    tokens (sequences batched by length). Returns a small training report.
    """
    import torch
    from tqdm.auto import tqdm

    n = target.shape[0]
    if codes.ndim != 2 or codes.shape[0] != n or target.ndim != 2 or int(np.sum(lens)) != n:
        raise ValueError("codes must be (N, L), target (N, C), and lens must add up to N")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    offs = np.concatenate([[0], np.cumsum(lens)])
    batches = length_batches(np.asarray(lens), batch_tokens)
    var = torch.from_numpy(target.var(axis=0).astype(np.float32) + 1e-6)
    groups = [{"params": list(module.parameters()), "lr": lr, "weight_decay": 0.01}]
    if decoder.parameters():
        groups.append({"params": decoder.parameters(), "lr": table_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))
    target_t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
    module.train()
    t0, losses, queue = time.perf_counter(), [], []
    with tqdm(total=steps, desc="alignedvq adapter", disable=not progress, leave=False) as bar:
        for _ in range(steps):
            if not queue:
                queue = [batches[i] for i in rng.permutation(len(batches))]
            idx = queue.pop()
            rows = torch.from_numpy(np.concatenate([np.arange(offs[s], offs[s + 1]) for s in idx]))
            T = int(lens[idx].max())
            mask = torch.from_numpy(np.arange(T)[None, :] < lens[idx][:, None])  # (B, T)
            x = torch.zeros(len(idx), T, target.shape[1])
            y = torch.zeros_like(x)
            x[mask] = decoder(codes_t[rows])  # (n, C) -> (B, T, C)
            y[mask] = target_t[rows]
            out = module(x, mask)
            loss = ((out - y) ** 2 / var)[mask].mean()  # real tokens only
            if tail is not None and tail_weight > 0:
                mi = mask.long()
                with torch.no_grad():
                    ref = tail(y, mi)
                loss = loss + tail_weight * (1 - torch.nn.functional.cosine_similarity(tail(out, mi), ref, dim=-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(module.parameters()) + decoder.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update()
    module.eval()
    return {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 2),
            "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
            "calibration_tokens": int(n), "calibration_sequences": int(np.sum(np.asarray(lens) > 0))}
