"""How much the output of a classifier feels an error in the features at a cut: its Fisher metric.

For an input x with cut features h and the tail's softmax p(y | h), a small error e in h moves the
output by KL(p(.|h) || p(.|h + e)) ~= e^T F(h) e / 2, with the Fisher information
``F(h) = E_{y ~ p(.|h)} [g g^T]``, ``g = d log p(y | h) / d h``. :func:`output_fisher` estimates it on
calibration inputs by sampling ``samples`` labels per input from the model's own softmax (no true
labels needed) and back-propagating through the frozen tail, and summarises it as

- ``channel_metric`` (C, C): ``E[g_p g_p^T]`` over inputs, sampled labels and map positions p;
- ``frequency_weights`` (T,): the energy of g per 2-D DCT frequency of the (side x side) map
  (per position when the map is not square), normalised to mean 1.

:class:`splitnet.codecs.transform.TransformCodec` (``metric="fisher"``) codes in this metric. Only the
calibration inputs are used; torch is needed here (the cloud side), never at encode or decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitnet.errors import CodecError


@dataclass(frozen=True)
class OutputSensitivity:
    channel_metric: np.ndarray  # (C, C) float64
    frequency_weights: np.ndarray  # (T,) float64, mean 1
    inputs: int
    samples_per_input: int


def _tail_logits(tail, hidden):
    """The tail stage's logits with autograd on (``Stage.forward`` runs under no_grad)."""
    inputs = {"hidden": hidden}
    h = tail.hidden_input(inputs)
    ctx = tail.arch.context(inputs, 0, h)
    for offset, block in enumerate(tail.blocks):
        h = block(h, ctx, None, tail.start + offset)
    out = tail.head(h, ctx)
    if "logits" not in out:
        raise CodecError(f"output_fisher needs a classifier tail with logits; it returned {sorted(out)}")
    return out["logits"]


def output_fisher(bm, cut: int, maps: np.ndarray, *, samples: int = 8, seed: int = 0, batch_size: int = 32,
                  progress=None) -> OutputSensitivity:
    """The tail's Fisher metric at ``cut`` on calibration ``maps`` (N, T, C) (see the module docstring)."""
    import torch

    from splitnet.codecs.transform import dct_matrix, map_dct

    if bm.kind != "vision":
        raise CodecError(f"output_fisher is for classifiers (vision models); {bm.name} is a {bm.kind}")
    x_all = np.asarray(maps, dtype=np.float32)
    if x_all.ndim != 3 or x_all.shape[0] == 0:
        raise ValueError(f"maps must be (N, T, C) with N >= 1, got {x_all.shape}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    n, t, c = x_all.shape
    side = math.isqrt(t)
    dct = dct_matrix(side) if side * side == t else None
    tail = bm.stage(cut, bm.num_blocks)
    for p in tail.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    metric = np.zeros((c, c))
    energy = np.zeros(t)
    for i in range(0, n, batch_size):
        x = torch.from_numpy(x_all[i : i + batch_size]).requires_grad_(True)
        logp = _tail_logits(tail, x).float().log_softmax(-1)
        labels = torch.multinomial(logp.detach().exp(), samples, replacement=True, generator=gen)  # (B, S)
        for s in range(samples):
            (g,) = torch.autograd.grad(logp.gather(1, labels[:, s : s + 1]).sum(), x, retain_graph=s + 1 < samples)
            g = g.double().numpy()  # (B, T, C)
            metric += np.einsum("btc,btd->cd", g, g)
            energy += ((map_dct(g, dct) if dct is not None else g) ** 2).sum(axis=(0, 2))
        if progress is not None:
            progress.update(x.shape[0])
    metric /= n * samples * t
    return OutputSensitivity(metric, energy / energy.mean(), n, samples)
