"""Per-sequence correction: the mean of what a sequence's decode misses, in a few bits per sequence.

A sentence embedding (MiniLM: mean pooling after the last block) averages its tokens, so per-token
decode errors that differ from token to token largely cancel, while the part of the error that all
tokens of a sequence share does not. On MiniLM cut 2 (8 context anchors + 3x12, learned adapter)
that shared part, the per-sequence mean of the miss, holds ~6 % of the error energy but adding it
back exactly lifts the embedding cosine by ~0.006 (``examples/codec_bar_study.py seqmean``).

The encoder holds the receiver's whole decoder (tables and adapter are in the same codec file), so
it computes exactly what the receiver will decode, takes the mean miss of each sequence, and sends
it as uniform scalar quantizers of its coefficients in a fixed basis (the principal directions of
the calibration sequences' mean misses). Bits go where they remove the most error (greedy
allocation with the distortion of the optimal uniform quantizer of a Gaussian at each width, a
fixed-rate form of reverse water-filling); components that get no bit are not sent. The decoder
adds the dequantized mean (cell midpoints) to every token of its sequence.

Arrays (saved with the codec under ``seqcorr_``): ``basis`` (C, k), ``lo`` (k,), ``step`` (k,),
``bits`` (k,) int32 in 1..16.
"""

from __future__ import annotations

import heapq
from typing import Mapping

import numpy as np

from splitnet.codecs.bitpack import BitReader, BitWriter
from splitnet.errors import CodecError

PREFIX = "seqcorr_"
SIGMA_MARGIN = 1.25  # quantizers sized for 1.25x the calibration spread: held-out misses run larger
# optimal uniform quantizer of a unit Gaussian (Max, 1960): step and mean squared error by bits
_STEP = (0.0, 1.596, 0.9957, 0.586, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308)
_MSE = (1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.00349, 0.001041, 0.0003074, 0.00008971)


def _gaussian_step(bits: int) -> float:
    return _STEP[bits] if bits < len(_STEP) else _STEP[-1] * 0.5 ** (bits - len(_STEP) + 1)


def _gaussian_mse(bits: int) -> float:
    return _MSE[bits] if bits < len(_MSE) else _MSE[-1] * 0.25 ** (bits - len(_MSE) + 1)


class SequenceCorrection:
    """Quantizer of per-sequence mean misses (see the module docstring)."""

    def __init__(self, basis: np.ndarray, lo: np.ndarray, step: np.ndarray, bits: np.ndarray) -> None:
        b = np.ascontiguousarray(basis, dtype=np.float32)
        lo_, st = (np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for v in (lo, step))
        bt = np.asarray(bits).astype(np.int64).reshape(-1)
        k = bt.size
        if b.ndim != 2 or b.shape[1] != k or lo_.shape != (k,) or st.shape != (k,):
            raise ValueError(f"sequence correction arrays disagree: basis {b.shape}, lo {lo_.shape}, step {st.shape}, bits {bt.shape}")
        if k and (bt.min() < 1 or bt.max() > 16 or not np.all(np.isfinite(st)) or st.min() <= 0 or not np.all(np.isfinite(lo_))):
            raise ValueError("sequence correction: bits must be 1..16 and steps finite and positive")
        self.basis, self.lo, self.step, self.bits = b, lo_, st, bt
        self._fields = [int(w) for w in bt]

    @property
    def bits_per_sequence(self) -> int:
        return int(self.bits.sum())

    @classmethod
    def fit(cls, means: np.ndarray, bits_per_sequence: int) -> "SequenceCorrection":
        """Basis and quantizers from (S, C) calibration mean misses, spending at most
        ``bits_per_sequence`` bits on each sequence."""
        m = np.asarray(means, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] < 2:
            raise CodecError("sequence correction needs the mean misses of at least 2 calibration sequences")
        if not 1 <= bits_per_sequence <= 1 << 16:
            raise ValueError(f"bits_per_sequence must be in 1..65536, got {bits_per_sequence}")
        center = m.mean(axis=0)
        evals, evecs = np.linalg.eigh((m - center).T @ (m - center) / m.shape[0])
        basis = evecs[:, ::-1]
        coef = m @ basis
        mu, sigma = coef.mean(axis=0), np.maximum(coef.std(axis=0), 1e-12) * SIGMA_MARGIN
        bits = np.zeros(basis.shape[1], dtype=np.int64)
        heap = [(-(sigma[i] ** 2) * (_gaussian_mse(0) - _gaussian_mse(1)), i) for i in range(bits.size)]
        heapq.heapify(heap)
        for _ in range(bits_per_sequence):  # greedy: each bit where it removes the most error
            _, i = heapq.heappop(heap)
            bits[i] += 1
            if bits[i] < 16:
                heapq.heappush(heap, (-(sigma[i] ** 2) * (_gaussian_mse(bits[i]) - _gaussian_mse(bits[i] + 1)), i))
        keep = bits > 0
        step = sigma[keep] * np.array([_gaussian_step(b) for b in bits[keep]])
        lo = mu[keep] - step * (1 << bits[keep]) / 2
        return cls(basis[:, keep], lo, step, bits[keep])

    def encode(self, means: np.ndarray) -> np.ndarray:
        """(S, C) mean misses -> packed uint8 buffer of ``S * bits_per_sequence`` bits."""
        coef = np.asarray(means, dtype=np.float32) @ self.basis
        w = BitWriter()
        for i, width in enumerate(self._fields):
            q = np.clip(np.floor((coef[:, i] - self.lo[i]) / self.step[i]), 0, (1 << width) - 1).astype(np.uint32)
            w.add(q, width)
        return w.getvalue()

    def decode(self, buf: np.ndarray, n_sequences: int) -> np.ndarray:
        """The (S, C) corrections a buffer from :meth:`encode` holds."""
        if not self._fields:
            return np.zeros((n_sequences, self.basis.shape[0]), np.float32)
        rdr = BitReader(np.asarray(buf), [(n_sequences, w) for w in self._fields])
        coef = np.stack([self.lo[i] + (rdr.read().astype(np.float32) + 0.5) * self.step[i] for i in range(len(self._fields))], axis=1)
        return (coef @ self.basis.T).astype(np.float32)

    def nbytes(self, n_sequences: int) -> int:
        return (n_sequences * self.bits_per_sequence + 7) // 8

    def arrays(self, prefix: str = PREFIX) -> dict[str, np.ndarray]:
        return {prefix + "basis": self.basis, prefix + "lo": self.lo, prefix + "step": self.step,
                prefix + "bits": self.bits.astype(np.int32)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = PREFIX) -> "SequenceCorrection":
        try:
            return cls(*(arrays[prefix + k] for k in ("basis", "lo", "step", "bits")))
        except KeyError as e:
            raise ValueError(f"sequence correction array {e.args[0]!r} is missing") from None


def sequence_means(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(S, C) mean of (N, C) packed tokens per sequence (empty sequences: zeros)."""
    lens = np.asarray(lengths, dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(lens)])
    sums = np.zeros((lens.size, tokens.shape[1]), np.float64)
    nz = lens > 0
    if nz.any():
        sums[nz] = np.add.reduceat(tokens.astype(np.float64), offs[:-1][nz], axis=0)
    return (sums / np.maximum(lens, 1)[:, None]).astype(np.float32)
