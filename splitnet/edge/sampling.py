"""Next-token choice from logits: greedy, or seeded temperature / top-k sampling.

The last stage need not send whole logits (4 x vocab bytes a position, 200 KB for GPT-2): with
:func:`head_request` the client asks for what its sampler needs: the argmax (greedy) or the
top-k logits and their ids (top-k sampling). :meth:`Sampler.pick` reads any of the three and,
for the same seed, picks the same token as from whole logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked.

    Attributes:
        temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_k: keep only the k most likely tokens before sampling (0: all).
        seed: seed of the per-request generator; the same seed gives the same tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError("SamplingConfig.temperature must be >= 0")
        if self.top_k < 0:
            raise ConfigError("SamplingConfig.top_k must be >= 0")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.config.temperature == 0:
            return int(np.argmax(logits))
        z = logits / self.config.temperature
        if 0 < self.config.top_k < z.size:
            kth = np.partition(z, -self.config.top_k)[-self.config.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(self.rng.choice(p.size, p=p))

    def pick(self, tensors: Mapping[str, Any], position: int | None = None) -> int:
        """The next token from a last stage's outputs (``logits``, ``argmax`` or ``topk_*``) for
        sequence 0, at ``position`` when the stage returned every position (``all_logits``)."""
        if "argmax" in tensors:
            a = np.asarray(tensors["argmax"])[0]
            return int(a if position is None else a[position])
        if "topk_values" in tensors:
            vals, idx = np.asarray(tensors["topk_values"])[0], np.asarray(tensors["topk_indices"])[0]
            if position is not None:
                vals, idx = vals[position], idx[position]
            full = np.full(int(np.asarray(tensors["vocab"]).reshape(-1)[0]), -np.inf)
            full[idx] = vals
            return self(full)
        logits = np.asarray(tensors["logits"])[0]
        return self(logits if position is None else logits[position])


def head_request(config: SamplingConfig) -> dict:
    """``meta`` asking the last stage for just what sampling with ``config`` needs."""
    if config.temperature == 0:
        return {"head": "argmax"}
    if config.top_k > 0:
        return {"head": "topk", "top_k": int(config.top_k)}
    return {}
