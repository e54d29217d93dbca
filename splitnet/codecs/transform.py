"""Transform coding of CNN feature maps: spatial DCT, channel KLT, uniform quantizer, range coding.

The JPEG recipe, applied to what crosses a cut of a CNN instead of to pixels. For the (H*W, C)
tokens of one feature map (H = W, channels last, as :mod:`splitnet.model.efficientnet` cuts)::

    x (T = H*W, C)
      -> z = x - mean                                 per-channel mean of the calibration maps
      -> Z = DCT_H z DCT_W^T                          orthonormal 2-D DCT-II over the map, per channel
                                                      (spatial="dct"; "none" codes every position alone)
      -> c = Z @ A                                    channel KLT, (C, K): the eigenvectors of the
                                                      calibration covariance, in the metric given at fit
      -> q = round(c / step[f, k])                    uniform quantizer, one step per (frequency, component)
      -> range-coded under a static model per (f, k)  calibration counts, fixed at fit (part of the hash)

Decode is the inverse: ``x_hat = IDCT(q * step @ S) + mean``, with the synthesis matrix ``S``
(K, C) = ``A``'s inverse on the kept components.

**The metric** (``metric="fisher"``): the squared error that matters is the one the rest of the
network feels. ``fit(..., channel_metric=M, frequency_weights=w)`` takes the output's Fisher
information w.r.t. the cut features (:mod:`splitnet.codecs.sensitivity` computes it on the
calibration inputs through the tail): ``M`` (C, C) averaged over positions, ``w`` (T,) its energy per
DCT frequency. The KLT is then taken in the space ``u = M^{1/2} x`` (``M`` floored by
``metric_floor`` times its mean eigenvalue, so directions the output ignores are still coded
coarsely rather than dropped), and the step of frequency ``f`` is scaled by
``(w_f / mean w) ** (-frequency_alpha / 2)``: the DC coefficient, which survives the global
average pool, gets a finer step than the high frequencies. ``metric="mse"`` is the plain KLT with
one step for every coefficient.

Every byte the receiver needs rides in the payload: the range-coded stream (one part). Values of
``|q|`` larger than any seen at calibration are clipped to that range (counted in the held-out
fidelity, not hidden). Encoding and decoding walk the symbols in Python through
:class:`splitnet.codecs.order1.Order1Model` (about 3 us per coefficient: 25-30 ms for a 7x7x192 map);
``skip_unused`` leaves out the coefficients that were 0 on every calibration map (about half of
them at the steps that meet the bar's bytes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from splitnet.codecs.base import Payload
from splitnet.codecs.order1 import Order1Model
from splitnet.codecs.registry import register_codec
from splitnet.codecs.scalar import as_tokens, check_payload, part
from splitnet.codecs.vq import _check_int, _FittedCodec, _progress
from splitnet.errors import CodecError

SPATIAL = ("dct", "none")
METRICS = ("mse", "fisher")
MODEL_PREFIX = "coef_"
#: the largest |q| a coefficient may take (the alphabet is 2 * MAX_LEVEL + 1 symbols at most)
MAX_LEVEL = 4095


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (n, n): row u is frequency u over positions 0..n-1."""
    k = np.arange(n)
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def map_dct(z: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(M, T, C) maps (T = side**2, row-major positions) -> (M, T, C) 2-D DCT coefficients
    (frequency u * side + v) with the (side, side) DCT matrix ``d``."""
    s = d.shape[0]
    m = z.reshape(z.shape[0], s, s, z.shape[-1])
    return np.einsum("ui,vj,nijk->nuvk", d, d, m, optimize=True).reshape(z.shape)


def map_idct(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Inverse of :func:`map_dct`."""
    s = d.shape[0]
    m = c.reshape(c.shape[0], s, s, c.shape[-1])
    return np.einsum("ui,vj,nuvk->nijk", d, d, m, optimize=True).reshape(c.shape)


def _sym_sqrt(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M^{1/2}, M^{-1/2}) of a symmetric positive definite matrix."""
    w, u = np.linalg.eigh(m)
    w = np.maximum(w, 1e-30)
    return (u * np.sqrt(w)) @ u.T, (u / np.sqrt(w)) @ u.T


@register_codec
class TransformCodec(_FittedCodec):
    """Transform coder for feature maps (see the module docstring).

    Args:
        step: quantizer step, in units of the RMS of the calibration coefficients (larger = fewer bytes).
        spatial: "dct" (2-D DCT over each square map of ``positions`` tokens) or "none".
        positions: tokens per map (H*W); 0 = read from the fit features' shape (N, T, C).
        dim: channel KLT components kept (0 = all C).
        metric: "fisher" (``fit`` needs ``channel_metric``, optionally ``frequency_weights``) or "mse".
        metric_floor: added to the metric, times its mean eigenvalue (metric="fisher").
        frequency_alpha: exponent of the per-frequency step scaling (0 = one step for all).
        skip_unused: coefficients whose level was 0 on every calibration map are not sent (the
            decoder sets them to 0): fewer symbols to walk, at the price of the rare held-out level
            that is not 0 there.
    """

    name = "transform"

    def __init__(self, step: float = 1.5, spatial: str = "dct", positions: int = 0, dim: int = 0, metric: str = "fisher",
                 metric_floor: float = 0.5, frequency_alpha: float = 1.0, skip_unused: bool | int = False) -> None:
        super().__init__()
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < float(step) <= 1e3 or not math.isfinite(step):
            raise ValueError(f"transform.step must be a number in (0, 1000], got {step!r}")
        if spatial not in SPATIAL:
            raise ValueError(f"transform.spatial must be one of {', '.join(map(repr, SPATIAL))}, got {spatial!r}")
        if metric not in METRICS:
            raise ValueError(f"transform.metric must be one of {', '.join(map(repr, METRICS))}, got {metric!r}")
        for key, v in (("metric_floor", metric_floor), ("frequency_alpha", frequency_alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 100.0:
                raise ValueError(f"transform.{key} must be a number in [0, 100], got {v!r}")
        if metric == "fisher" and float(metric_floor) <= 0.0:
            raise ValueError("transform.metric_floor must be > 0 with metric='fisher' (the metric must stay invertible)")
        self.step, self.spatial, self.metric = float(step), spatial, metric
        self.positions = _check_int("transform.positions", positions, 0, 1 << 20)
        self.dim = _check_int("transform.dim", dim, 0, 1 << 16)
        self.metric_floor, self.frequency_alpha = float(metric_floor), float(frequency_alpha)
        if skip_unused not in (True, False, 0, 1):
            raise ValueError(f"transform.skip_unused must be a bool (or 0/1), got {skip_unused!r}")
        self.skip_unused = bool(skip_unused)
        if spatial == "dct" and self.positions and math.isqrt(self.positions) ** 2 != self.positions:
            raise ValueError(f"transform.positions={self.positions} is not a square map (spatial='dct' needs H = W)")
        self._model: Order1Model | None = None

    # -- state -----------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"step": self.step, "spatial": self.spatial, "positions": self.positions, "dim": self.dim, "metric": self.metric,
                "metric_floor": self.metric_floor, "frequency_alpha": self.frequency_alpha} | (
                    {"skip_unused": True} if self.skip_unused else {})

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "analysis": self.analysis, "synthesis": self.synthesis, "steps": self.steps,
                "level": np.asarray([self.level], dtype=np.int64), "coded": self.coded.astype(np.uint8),
                **self._model.arrays(MODEL_PREFIX)}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        f32 = lambda k: np.ascontiguousarray(arrays[k], dtype=np.float32)  # noqa: E731
        self.mean, self.analysis, self.synthesis, self.steps = f32("mean"), f32("analysis"), f32("synthesis"), f32("steps")
        c, k = self.analysis.shape
        t = self.positions
        if self.mean.shape != (c,) or self.synthesis.shape != (k, c) or self.steps.shape != (t if self.spatial == "dct" else 1, k):
            raise ValueError(f"transform arrays are inconsistent: mean {self.mean.shape}, analysis {self.analysis.shape}, "
                             f"synthesis {self.synthesis.shape}, steps {self.steps.shape} for positions={t}")
        if not np.all(self.steps > 0):
            raise ValueError("transform steps must be positive")
        self.level = int(np.asarray(arrays["level"]).reshape(-1)[0])
        if not 1 <= self.level <= MAX_LEVEL:
            raise ValueError(f"transform level {self.level} is outside 1..{MAX_LEVEL}")
        self.coded = np.asarray(arrays["coded"]).astype(bool)
        if self.coded.shape != self.steps.shape or not self.coded.any() or (not self.skip_unused and not self.coded.all()):
            raise ValueError(f"transform coded-coefficient mask has shape {self.coded.shape} (steps {self.steps.shape}) or "
                             "does not match skip_unused")
        self._model = Order1Model.from_arrays(arrays, MODEL_PREFIX)
        if self._model.size != 2 * self.level + 1 or self._model.contexts != int(self.coded.sum()):
            raise ValueError("transform entropy model does not match the coded coefficients and level")
        self._dct = dct_matrix(math.isqrt(t)) if self.spatial == "dct" else None

    # -- transform -------------------------------------------------------------------------
    def _maps(self, t: np.ndarray) -> np.ndarray:
        """(N, C) tokens -> (M, T', C) maps (T' = positions, or 1 per token with spatial='none')."""
        per = self.positions if self.spatial == "dct" else 1
        if t.shape[0] % per:
            raise CodecError(f"transform: {t.shape[0]} tokens are not whole maps of {per} positions; send (B, {per}, C)")
        return t.reshape(-1, per, t.shape[1])

    def _coefficients(self, t: np.ndarray) -> np.ndarray:
        """(N, C) tokens -> (M, T', K) unquantized coefficients in step units."""
        z = self._maps(t - self.mean)
        if self._dct is not None:
            z = map_dct(z, self._dct)
        return (z @ self.analysis) / self.steps

    def _reconstruct(self, q: np.ndarray) -> np.ndarray:
        """(M, T', K) integer levels -> (M * T', C) tokens."""
        z = (q * self.steps) @ self.synthesis
        if self._dct is not None:
            z = map_idct(z, self._dct)
        return z.reshape(-1, z.shape[-1]) + self.mean

    # -- fit -------------------------------------------------------------------------------
    def fit(self, features, *, progress: bool = True, channel_metric: np.ndarray | None = None,
            frequency_weights: np.ndarray | None = None) -> "TransformCodec":
        """Learn mean, KLT, steps and the entropy model from calibration features: (N, T, C) maps,
        or (N * T, C) tokens with ``positions`` set. ``channel_metric`` (C, C) and
        ``frequency_weights`` (T,): see the module docstring (metric="fisher" needs the first)."""
        a = np.asarray(features, dtype=np.float32) if isinstance(features, np.ndarray) else None
        if a is not None and a.ndim == 3 and self.spatial == "dct":
            if self.positions and a.shape[1] != self.positions:
                raise ValueError(f"transform: fit maps have {a.shape[1]} positions, config says {self.positions}")
            self.positions = int(a.shape[1])
        x, _ = as_tokens(features if a is None else a)
        if self.spatial == "dct":
            if not self.positions:
                raise ValueError("transform: give (N, T, C) maps at fit or set positions=T (spatial='dct' codes whole maps)")
            if math.isqrt(self.positions) ** 2 != self.positions:
                raise ValueError(f"transform: {self.positions} positions are not a square map (spatial='dct' needs H = W)")
        else:
            self.positions = 1
        c = x.shape[1]
        if self.metric == "fisher" and channel_metric is None:
            raise CodecError("transform metric='fisher' needs channel_metric at fit (splitnet.codecs.sensitivity.output_fisher), "
                             "or use metric='mse'")
        if self.metric == "mse" and (channel_metric is not None or frequency_weights is not None):
            raise ValueError("transform metric='mse' takes no channel_metric / frequency_weights")
        with _progress(3, f"transform fit step={self.step} {self.spatial}", progress) as bar:
            self.mean = x.mean(axis=0).astype(np.float32)
            self._dct = dct_matrix(math.isqrt(self.positions)) if self.spatial == "dct" else None
            z = self._maps(x - self.mean).astype(np.float64)
            if self._dct is not None:
                z = map_dct(z, self._dct)
            flat = z.reshape(-1, c)
            cov = flat.T @ flat / flat.shape[0]
            if self.metric == "fisher":
                m = np.asarray(channel_metric, dtype=np.float64)
                if m.shape != (c, c) or not np.all(np.isfinite(m)):
                    raise ValueError(f"channel_metric must be a finite ({c}, {c}) matrix")
                m = (m + m.T) / 2
                m = m + self.metric_floor * max(float(np.trace(m)) / c, 1e-30) * np.eye(c)
                root, inv_root = _sym_sqrt(m)
            else:
                root = inv_root = np.eye(c)
            evals, evecs = np.linalg.eigh(root @ cov @ root)
            k = self.dim if 0 < self.dim < c else c
            v = evecs[:, ::-1][:, :k]
            self.analysis = np.ascontiguousarray(root @ v, dtype=np.float32)  # (C, K)
            self.synthesis = np.ascontiguousarray(v.T @ inv_root, dtype=np.float32)  # (K, C)
            bar.update()
            coef = z @ self.analysis.astype(np.float64)  # (M, T', K)
            rms = float(np.sqrt(np.mean(coef**2))) or 1.0
            t = self.positions if self.spatial == "dct" else 1
            scale = np.ones(t)
            if frequency_weights is not None:
                w = np.asarray(frequency_weights, dtype=np.float64).reshape(-1)
                if w.shape != (t,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
                    raise ValueError(f"frequency_weights must be {t} finite positive values (one per DCT frequency)")
                scale = (w / w.mean()) ** (-self.frequency_alpha / 2)
            self.steps = np.ascontiguousarray(np.broadcast_to((self.step * rms * scale)[:, None], (t, k)), dtype=np.float32)
            bar.update()
            q = np.rint(coef / self.steps)
            self.level = int(min(max(1, np.abs(q).max()), MAX_LEVEL))
            self.coded = (q != 0).any(axis=0) if self.skip_unused else np.ones((t, k), dtype=bool)
            if not self.coded.any():
                self.coded[0, 0] = True  # the stream codes at least one coefficient
            n_coded = int(self.coded.sum())
            sym = (np.clip(q[:, self.coded], -self.level, self.level) + self.level).astype(np.int64).reshape(-1)
            ctx = np.tile(np.arange(n_coded), coef.shape[0])
            self._model = Order1Model.fit(sym, 2 * self.level + 1, ctx, n_coded)
            bar.update()
        self._mark_fitted()
        return self

    # -- wire ------------------------------------------------------------------------------
    def levels(self, x) -> np.ndarray:
        """(M, T', K) the integer levels the encoder sends for (..., C) features (clipped)."""
        self._require_fit()
        t, _ = as_tokens(x)
        self._check_width(t.shape[1], self.mean.shape[0])
        return self._levels(t)

    def _levels(self, t: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(self._coefficients(t)), -self.level, self.level).astype(np.int64)

    def encode(self, x) -> Payload:
        self._require_fit()
        t, shape = as_tokens(x)
        self._check_width(t.shape[1], self.mean.shape[0])
        q = self._levels(t)[:, self.coded]  # (M, coded coefficients)
        ctx = np.tile(np.arange(q.shape[1]), q.shape[0])
        data = self._model.encode(q.reshape(-1) + self.level, ctx)
        return Payload(self.name, self.codebook_hash, shape, "float32", {"r": np.frombuffer(data, dtype=np.uint8)})

    def decode(self, payload: Payload) -> np.ndarray:
        self._require_fit()
        n, c = check_payload(self, payload)
        self._check_width(c, self.mean.shape[0])
        per = self.positions if self.spatial == "dct" else 1
        if n % per:
            raise CodecError(f"transform payload of {n} tokens is not whole maps of {per} positions")
        r = part(payload, "r")
        if r.dtype != np.uint8 or r.ndim != 1:
            raise CodecError(f"transform payload stream must be 1-D uint8, got {r.dtype} {r.shape}")
        maps, n_coded = n // per, int(self.coded.sum())
        ctx = np.tile(np.arange(n_coded), maps)
        sym = self._model.decode(r.tobytes(), ctx.size, ctx)
        q = np.zeros((maps, *self.steps.shape), dtype=np.float32)
        q[:, self.coded] = (sym - self.level).reshape(maps, n_coded)
        return self._reconstruct(q).reshape(payload.shape).astype(np.float32)
