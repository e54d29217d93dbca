"""Padding never crosses the wire: encode only the real tokens of a padded batch.

``gather_tokens(hidden, mask)`` turns a (B, T, C) batch and its (B, T) attention mask into the
(N, C) real tokens (N = mask.sum()); the codec encodes those. The receiver already has the mask
(it travels with the request as a small integer tensor, or as per-sequence lengths) and rebuilds
the padded batch with ``scatter_tokens`` (padding positions are zero; attention ignores them).
"""

from __future__ import annotations

import numpy as np

from splitnet.codecs.framing import as_float_array
from splitnet.errors import CodecError


def gather_tokens(hidden, mask) -> np.ndarray:
    h = as_float_array(hidden)
    m = np.asarray(mask if isinstance(mask, np.ndarray) else mask.cpu().numpy()).astype(bool)
    if h.ndim != 3 or m.shape != h.shape[:2]:
        raise CodecError(f"hidden {h.shape} and mask {m.shape} must be (B, T, C) and (B, T)")
    return np.ascontiguousarray(h[m])  # (B, T, C) -> (N, C)


def scatter_tokens(tokens: np.ndarray, mask) -> np.ndarray:
    m = np.asarray(mask if isinstance(mask, np.ndarray) else mask.cpu().numpy()).astype(bool)
    if tokens.ndim != 2 or tokens.shape[0] != int(m.sum()):
        raise CodecError(f"{tokens.shape[0] if tokens.ndim else 0} decoded tokens do not match the mask's {int(m.sum())} real tokens")
    out = np.zeros((*m.shape, tokens.shape[1]), dtype=np.float32)  # (N, C) -> (B, T, C)
    out[m] = tokens
    return out
