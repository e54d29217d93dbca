"""A learned transform coder for CNN cuts: the Fisher transform codec's steps trained by distillation.

:class:`LearnedCodec` starts from :class:`splitnet.codecs.transform.TransformCodec` in the tail's
Fisher metric (DCT over the map, channel KLT, one uniform step per (frequency, component)) and
then learns the log of every step end to end, on the calibration maps only::

    loss = KL(softmax(tail(x)) || softmax(tail(decode(round(encode(x)))))) + lam * bits / 1000

``round`` passes gradients straight through (STE); ``bits`` is the code length of the levels under
a factorised Laplace model (one learned scale per coefficient), a stand-in for the range coder's
static model that is refitted on the final levels. The tail's weights stay frozen.

The wire format, the numpy encoder and the decoder are the transform codec's (the edge needs no
torch: torch is imported by ``fit`` only). ``fit`` needs the tail: pass ``tail`` (a stage from
:func:`splitnet.model.load_model`) or set ``model`` and ``cut`` so that it loads it itself.

What we measured (issue #17, cut 15 of EfficientNet-Lite0, 686 calibration / 484 held-out crops,
benchmarks/results/vision-2core-vm-2026-12-02-learned.json): learning the steps moves the codec
along the transform codec's rate-distortion curve without beating it on held-out crops
(learned:step=2 655 B, top-1 0.841, KL 0.046; transform:step=2 665 B, 0.845, 0.046). Learning the
analysis/synthesis matrices too (a study, not kept) overfits: calibration KL 0.036 -> 0.012,
held-out 0.046 -> 0.055; a per-position decoder-side correction MLP overfits the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from splitnet.codecs.order1 import Order1Model
from splitnet.codecs.registry import register_codec
from splitnet.codecs.transform import MAX_LEVEL, TransformCodec
from splitnet.codecs.vq import _check_int, _progress
from splitnet.errors import CodecError


def _check_float(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= float(v) <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


@register_codec
class LearnedCodec(TransformCodec):
    """Transform codec whose steps are trained by distillation through the frozen tail.

    Args:
        step: the initial step (as ``transform.step``).
        lam: weight of the rate term (bits per map / 1000) against the KL.
        epochs: passes over the calibration maps (0 = the Fisher transform codec as is).
        lr: Adam learning rate on the log steps.
        batch: maps per training step.
        seed: torch seed of the shuffles.
        model, cut: with ``fit`` called without ``tail``, the model to load and the cut its tail starts at.
        metric_floor, frequency_alpha: as ``transform``.
    """

    name = "learned"

    def __init__(self, step: float = 2.0, lam: float = 0.01, epochs: int = 6, lr: float = 1e-3, batch: int = 32, seed: int = 0,
                 model: str = "", cut: int = 0, positions: int = 0, metric_floor: float = 0.5, frequency_alpha: float = 1.0,
                 fisher_samples: int = 4) -> None:
        super().__init__(step=step, spatial="dct", positions=positions, metric="fisher", metric_floor=metric_floor,
                         frequency_alpha=frequency_alpha, skip_unused=True)
        self.lam = _check_float("learned.lam", lam, 0.0, 100.0)
        self.lr = _check_float("learned.lr", lr, 1e-6, 1.0)
        self.epochs = _check_int("learned.epochs", epochs, 0, 1000)
        self.batch = _check_int("learned.batch", batch, 1, 4096)
        self.seed = _check_int("learned.seed", seed, 0, 1 << 31)
        self.fisher_samples = _check_int("learned.fisher_samples", fisher_samples, 1, 64)
        if not isinstance(model, str):
            raise ValueError(f"learned.model must be a model name, got {model!r}")
        self.model, self.cut = model, _check_int("learned.cut", cut, 0, 1 << 10)

    def _config(self) -> dict[str, Any]:
        cfg = super()._config()
        for k in ("spatial", "metric", "skip_unused", "dim"):
            cfg.pop(k, None)
        return cfg | {"lam": self.lam, "epochs": self.epochs, "lr": self.lr, "batch": self.batch, "seed": self.seed,
                      "model": self.model, "cut": self.cut, "fisher_samples": self.fisher_samples}

    def fit(self, features, *, progress: bool = True, tail=None, channel_metric: np.ndarray | None = None,
            frequency_weights: np.ndarray | None = None) -> "LearnedCodec":
        """Fit on calibration maps (N, T, C) (or (N * T, C) with ``positions`` or ``model``/``cut``
        set). ``tail``: the stage after the cut (else loaded from ``model``/``cut``);
        ``channel_metric``/``frequency_weights``: the tail's Fisher metric (else estimated here)."""
        maps = np.asarray(features, dtype=np.float32)
        bm = None
        if tail is None or (maps.ndim == 2 and not self.positions):
            if not self.model or not self.cut:
                raise CodecError("learned codec: fit needs tail=<stage after the cut>, or model=NAME and cut=N in its config")
            from splitnet.model import load_model

            bm = load_model(self.model)
            side, _, _ = bm.arch.cut_shape(self.cut)
            self.positions = self.positions or side * side
            tail = tail if tail is not None else bm.stage(self.cut, bm.num_blocks)
        if maps.ndim == 2:
            if not self.positions or maps.shape[0] % self.positions:
                raise CodecError(f"learned codec: {maps.shape[0]} vectors are not whole maps of {self.positions} positions")
            maps = maps.reshape(-1, self.positions, maps.shape[-1])
        if maps.ndim != 3:
            raise ValueError(f"learned codec: fit takes (N, T, C) maps, got shape {maps.shape}")
        if channel_metric is None:
            from splitnet.codecs.sensitivity import output_fisher

            if bm is None:
                raise CodecError("learned codec: give channel_metric (splitnet.codecs.sensitivity.output_fisher) with tail=")
            sens = output_fisher(bm, self.cut, maps, samples=self.fisher_samples, seed=self.seed)
            channel_metric, frequency_weights = sens.channel_metric, sens.frequency_weights
        super().fit(maps, progress=False, channel_metric=channel_metric, frequency_weights=frequency_weights)
        if self.epochs:
            self.steps = self._train_steps(tail, maps, progress)
        self._refit_entropy(maps)
        self._mark_fitted()
        return self

    def _train_steps(self, tail, maps: np.ndarray, progress: bool) -> np.ndarray:
        import torch

        from splitnet.codecs.sensitivity import _tail_logits
        from splitnet.codecs.transform import map_dct

        gen = torch.Generator().manual_seed(self.seed)
        for p in tail.parameters():
            p.requires_grad_(False)
        z = torch.from_numpy(map_dct((maps - self.mean).astype(np.float64), self._dct).astype(np.float32))  # (N, T, C)
        a = torch.from_numpy(self.analysis)
        syn = torch.from_numpy(self.synthesis)
        d = torch.from_numpy(self._dct.astype(np.float32))
        s = d.shape[0]
        mean = torch.from_numpy(self.mean)
        x = torch.from_numpy(maps)
        coef = z @ a  # (N, T, K)
        log_step = torch.nn.Parameter(torch.from_numpy(np.log(self.steps)).clone())
        log_b = torch.nn.Parameter(torch.log(coef.abs().mean(0) / torch.from_numpy(self.steps) + 1e-2))
        opt = torch.optim.Adam([log_step, log_b], lr=self.lr)
        with torch.no_grad():
            ref = _tail_logits(tail, x).log_softmax(-1)
        n = maps.shape[0]
        per_epoch = math.ceil(n / self.batch)
        with torch.enable_grad(), _progress(self.epochs * per_epoch, "learned fit (distillation)", progress) as bar:
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, self.batch):
                    idx = perm[i : i + self.batch]
                    step = log_step.exp()
                    u = coef[idx] / step
                    uq = u + (torch.round(u) - u).detach()  # straight-through rounding
                    b = log_b.exp()
                    cdf = lambda v: 0.5 + 0.5 * torch.sign(v) * (1 - torch.exp(-v.abs() / b))  # noqa: E731
                    bits = -torch.log2((cdf(uq + 0.5) - cdf(uq - 0.5)).clamp_min(1e-9)).sum((1, 2))
                    zh = ((uq * step) @ syn).reshape(-1, s, s, syn.shape[1])
                    xh = torch.einsum("ui,vj,nuvk->nijk", d, d, zh).reshape(len(idx), -1, syn.shape[1]) + mean
                    lq = _tail_logits(tail, xh).log_softmax(-1)
                    lp = ref[idx]
                    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
                    loss = kl + self.lam * bits.mean() / 1000.0
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    bar.update()
                    bar.set_postfix_str(f"kl {float(kl.detach()):.4f} bytes {float(bits.detach().mean()) / 8:.0f}")
        return np.ascontiguousarray(log_step.detach().exp().numpy(), dtype=np.float32)

    def _refit_entropy(self, maps: np.ndarray) -> None:
        """Levels, coded mask and the range coder's static model from the calibration maps at the final steps."""
        q = np.rint(self._coefficients(maps.reshape(-1, maps.shape[-1])))
        self.level = int(min(max(1, np.abs(q).max()), MAX_LEVEL))
        self.coded = (q != 0).any(axis=0)
        if not self.coded.any():
            self.coded[0, 0] = True
        n_coded = int(self.coded.sum())
        sym = (np.clip(q[:, self.coded], -self.level, self.level) + self.level).astype(np.int64).reshape(-1)
        self._model = Order1Model.fit(sym, 2 * self.level + 1, np.tile(np.arange(n_coded), q.shape[0]), n_coded)
