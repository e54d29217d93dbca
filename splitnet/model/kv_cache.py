"""Per-request key/value cache of one stage: one (k, v) pair per block the stage holds."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every block of one stage for one request.

    Tensors are (B, n_kv_heads, T, head_size). ``length`` is the number of positions cached,
    which is also the position of the next token this stage will see.
    """

    def __init__(self) -> None:
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0
        #: tokens this cache has been fed in total (evidence that decode is incremental)
        self.tokens_computed = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values for ``layer`` and return the full (k, v) for attention."""
        old = self._layers.get(layer)
        if old is not None:
            k = torch.cat([old[0], k], dim=2)  # (B, nh, T_old + T_new, hs)
            v = torch.cat([old[1], v], dim=2)
        self._layers[layer] = (k, v)
        return k, v

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative tokens the verifier rejected)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length == self.length:
            return
        self._layers = {i: (k[:, :, :length].contiguous(), v[:, :, :length].contiguous()) for i, (k, v) in self._layers.items()}
        self.length = length

    def layer_ids(self) -> list[int]:
        """Block indices this cache holds keys and values for."""
        return sorted(self._layers)

    def get_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[layer]

    def set_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a past (k, v) of ``layer`` in place (ONNX export feeds the past as tensors)."""
        self._layers[layer] = (k, v)

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
        self.tokens_computed += n_tokens

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._layers.values())

    def close(self) -> None:
        """Give back what this cache holds (a pooled cache returns its slot)."""
