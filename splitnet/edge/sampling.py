"""Next-token choice from logits: greedy, or seeded temperature / top-k sampling."""

from __future__ import annotations

from dataclasses import dataclass

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
