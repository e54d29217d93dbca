"""AlignedVQ: align the features, vector-quantize them, and count every byte the receiver needs.

Encode (edge side, numpy only)::

    x (N, C)
      -> [norm="token"]  z = (x - mu_t) / sd_t     per-token LayerNorm-style alignment; mu_t and
                                                     log sd_t are scalar-quantised to ``side_bits``
                                                     each and sent (the receiver undoes the alignment)
      -> y = ((z - m) * w) @ P                        per-channel centring, sensitivity weights w
                                                     (optional, e.g. from the next stage's Jacobian)
                                                     and a PCA projection to ``dim`` components
      -> greedy residual VQ over ``stages`` codebooks of ``nbits`` bits (faiss k-means codebooks)
      -> one bit-packed frame: stages*nbits bits per token + 2*side_bits bits per token

Decode (cloud side): ``z_hat = b + sum_s E_s[code_s]`` with tables E_s (K, C) that map each code
straight back to channel space, then ``x_hat = z_hat * sd_t + mu_t``. With ``refine > 0`` the tables
are re-fitted by least squares on the calibration codes (block coordinate descent, closed form): a
receiver-side "aligned fine-tuning" that costs no wire bytes and no decode time.

Learned variant (:meth:`AlignedVQCodec.tune`): a small transformer adapter
(:mod:`splitnet.codecs.adapter`) that sees the decoded features of every token of a sequence and
corrects each one, trained on calibration features together with the decoder tables (gradient
descent, the encoder's codes fixed). It runs on the receiving side, inside ``decode``
(``z_hat -> adapter(z_hat) -> x_hat``, numpy; torch only to train it) and needs the sequence
lengths of packed tokens (``decode(payload, lengths=...)``); payload and encoder are unchanged.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from splitnet.codecs import adapter as _adapter
from splitnet.codecs.base import Payload
from splitnet.codecs.bitpack import BitReader, BitWriter, read_fields
from splitnet.codecs.order1 import Order1Model, RangeDecoder, RangeEncoder
from splitnet.codecs.entropy import Huffman, huffman_lengths
from splitnet.codecs.registry import register_codec
from splitnet.codecs.scalar import as_tokens, check_payload, part
from splitnet.codecs.sequence_correction import PREFIX as SEQCORR_PREFIX
from splitnet.codecs.sequence_correction import SequenceCorrection, sequence_means
from splitnet.codecs.threads import one_blas_thread
from splitnet.codecs.vq import _check_int, _faiss, _FittedCodec, _nearest, _progress, _subsample
from splitnet.errors import CodecError

_EPS = 1e-6
ENTROPY_CODERS = ("none", "zlib", "huffman", "order1", "context")
STAGE_MODEL_PREFIX = "stage{}_context_"  # arrays of residual stage s's model under the anchor (entropy="context")


def _token_stats(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token mean and log standard deviation of (N, C) tokens: the alignment's side information."""
    return t.mean(axis=1), np.log(t.std(axis=1) + _EPS)


def _context_models(codes: np.ndarray, anchors: int, nbits: int, stages: int) -> tuple[Order1Model, list[Order1Model]]:
    """entropy="context": the anchor index under the previous anchor, and each residual stage's
    index under its token's anchor, fitted on (N, >= 1 + stages) encoder codes of calibration
    tokens in order."""
    return (Order1Model.fit(codes[:, 0], anchors),
            [Order1Model.fit(codes[:, 1 + s], 1 << nbits, codes[:, 0], anchors) for s in range(stages)])


@register_codec
class AlignedVQCodec(_FittedCodec):
    """Aligned residual VQ (see the module docstring).

    Args:
        stages: residual codebooks per token.
        nbits: bits per codebook index (codebook size 2**nbits).
        dim: PCA components the VQ works in (0 = all channels, no projection).
        norm: "token" (per-token alignment, side info sent) or "none" (features that already
            leave a LayerNorm, e.g. a post-LN BERT block, need none).
        side_bits: bits for each of the per-token mean and log-std (norm="token").
        refine: least-squares refinement sweeps of the decoder tables (0 = training-free decoder).
        entropy: how indices travel: "none" (bit-packed), "zlib" (compress the packed frame; kept
            only when it is smaller), "huffman" (the anchor index Huffman-coded with calibration
            frequencies) or "order1" (the anchor index range-coded under an order-1 model of the
            previous anchor, :mod:`splitnet.codecs.order1`; residual indices stay packed) or
            "context" (as "order1", and every residual index range-coded under its token's anchor
            index, one model per stage, in the same range-coded stream).
        niter, max_train, seed: k-means iterations, calibration tokens the k-means stages see (0 = all;
            anchors, being per-label means or per-label k-means, use every token), RNG seed.
        anchor_bits: set by ``fit(..., anchor_labels=...)``; 0 = no anchor codebook.
        anchor_contexts: at most this many anchors per label (1 = the label's mean only). A label
            seen often enough gets ``min(anchor_contexts, count // anchor_context_points)`` anchors,
            the k-means centroids of its calibration features: the same token in different
            contexts. Costs about log2 of that many extra (Huffman-coded) bits per token.
        anchor_context_points: calibration tokens per context anchor (k-means needs a few dozen).
        adapter: set by :meth:`tune`: the receiver-side adapter's shape and how it was trained
            (None = training-free / closed-form decoder only).
        sequence_correction: set by :meth:`fit_sequence_correction`: ``{"bits_per_sequence": B}``
            (None = none). Each sequence's mean decode miss travels in B more bits
            (:mod:`splitnet.codecs.sequence_correction`).
    """

    name = "alignedvq"

    def __init__(
        self,
        stages: int = 3,
        nbits: int = 12,
        dim: int = 0,
        norm: str = "none",
        side_bits: int = 8,
        refine: int = 2,
        entropy: str = "none",
        niter: int = 20,
        max_train: int = 200_000,
        seed: int = 0,
        anchor_bits: int = 0,
        anchor_contexts: int = 1,
        anchor_context_points: int = 40,
        adapter: dict | None = None,
        sequence_correction: dict | None = None,
    ) -> None:
        super().__init__()
        self.stages = _check_int("alignedvq.stages", stages, 0, 64)
        self.anchor_bits = _check_int("alignedvq.anchor_bits", anchor_bits, 0, 16)
        self.anchor_contexts = _check_int("alignedvq.anchor_contexts", anchor_contexts, 1, 256)
        self.anchor_context_points = _check_int("alignedvq.anchor_context_points", anchor_context_points, 1, 1 << 20)
        self.nbits = _check_int("alignedvq.nbits", nbits, 1, 16)
        self.dim = _check_int("alignedvq.dim", dim, 0, 1 << 16)
        if norm not in ("token", "none"):
            raise ValueError(f"alignedvq.norm must be 'token' or 'none', got {norm!r}")
        if entropy not in ENTROPY_CODERS:
            raise ValueError(f"alignedvq.entropy must be one of {', '.join(map(repr, ENTROPY_CODERS))}, got {entropy!r}")
        self.norm, self.entropy = norm, entropy
        self.side_bits = _check_int("alignedvq.side_bits", side_bits, 1, 16)
        self._huffman = None
        self._order1: Order1Model | None = None
        self._stage_models: list[Order1Model] = []  # entropy="context": stage s's index under the anchor
        self.refine = _check_int("alignedvq.refine", refine, 0, 100)
        self.niter, self.max_train, self.seed = int(niter), int(max_train), int(seed)
        if adapter is not None and not isinstance(adapter, dict):
            raise ValueError(f"alignedvq.adapter must be a dict or None, got {type(adapter).__name__}")
        self.adapter = dict(adapter) if adapter else None
        self._adapter_module = None
        if sequence_correction is not None and not isinstance(sequence_correction, dict):
            raise ValueError(f"alignedvq.sequence_correction must be a dict or None, got {type(sequence_correction).__name__}")
        self.sequence_correction = dict(sequence_correction) if sequence_correction else None
        self._seqcorr: SequenceCorrection | None = None

    # -- state -----------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "stages": self.stages, "nbits": self.nbits, "dim": self.dim, "norm": self.norm,
            "side_bits": self.side_bits, "refine": self.refine, "entropy": self.entropy,
            "niter": self.niter, "max_train": self.max_train, "seed": self.seed, "anchor_bits": self.anchor_bits,
        } | ({"anchor_contexts": self.anchor_contexts, "anchor_context_points": self.anchor_context_points}
             if self.anchor_contexts > 1 else {}) | (  # keys absent = defaults (hashes of older files hold)
            {"adapter": dict(self.adapter)} if self.adapter else {}) | (
            {"sequence_correction": dict(self.sequence_correction)} if self.sequence_correction else {})

    def _adapter_config(self) -> "_adapter.AdapterConfig":
        keys = ("width", "layers", "heads", "ffn", "max_positions")
        return _adapter.AdapterConfig(**{k: self.adapter[k] for k in keys if k in self.adapter})

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"center": self.center, "weight": self.weight, "proj": self.proj, "codebooks": self.codebooks,
               "tables": self.tables, "bias": self.bias, "side_range": self.side_range}
        if self.anchor_bits:
            out.update(anchor_codebook=self.anchor_cb, anchor_table=self.anchor_tab)
            if self._huffman is not None:
                out["anchor_code_lengths"] = self._huffman.lengths.astype(np.int32)
            if self._order1 is not None:
                out.update(self._order1.arrays())
            for i, m in enumerate(self._stage_models):
                out.update(m.arrays(STAGE_MODEL_PREFIX.format(i)))
        if self._adapter_module is not None:
            out.update({_adapter.PREFIX + k: v for k, v in self._adapter_module.p.items()})
        if self._seqcorr is not None:
            out.update(self._seqcorr.arrays())
        return out

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        f32 = lambda k: np.ascontiguousarray(arrays[k], dtype=np.float32)  # noqa: E731
        self.center, self.weight, self.proj = f32("center"), f32("weight"), f32("proj")  # (C,), (C,), (C, d)
        self.codebooks, self.tables, self.bias = f32("codebooks"), f32("tables"), f32("bias")  # (S,K,d), (S,K,C), (C,)
        self.side_range = f32("side_range")  # (4,): mean lo, hi, log-std lo, hi
        c, k = self.center.shape[0], 1 << self.nbits
        d = self.proj.shape[1]
        if self.proj.shape[0] != c or self.codebooks.shape != (self.stages, k, d) or self.tables.shape != (self.stages, k, c):
            raise ValueError(f"alignedvq arrays are inconsistent with stages={self.stages} nbits={self.nbits}")
        if self.anchor_bits:
            self.anchor_cb, self.anchor_tab = f32("anchor_codebook"), f32("anchor_table")  # (A, d), (A, C)
            a = self.anchor_cb.shape[0]
            if not 1 < a <= 1 << self.anchor_bits or self.anchor_cb.shape[1] != d or self.anchor_tab.shape != (a, c):
                raise ValueError("alignedvq anchor arrays are inconsistent with anchor_bits")
            self._huffman = None
            if self.entropy == "huffman":
                lengths = np.asarray(arrays["anchor_code_lengths"]).astype(np.int64)
                if lengths.shape != (a,):
                    raise ValueError("alignedvq anchor code lengths do not match the anchor codebook")
                self._huffman = Huffman(lengths)
                self._huffman._table()
            self._order1, self._stage_models = None, []
            if self.entropy in ("order1", "context"):
                self._order1 = Order1Model.from_arrays(arrays)
                if self._order1.size != a or self._order1.contexts != a:
                    raise ValueError("alignedvq anchor order-1 model does not match the anchor codebook")
            if self.entropy == "context":
                self._stage_models = [Order1Model.from_arrays(arrays, STAGE_MODEL_PREFIX.format(i)) for i in range(self.stages)]
                if any(m.size != k or m.contexts != a for m in self._stage_models):
                    raise ValueError("alignedvq stage context models do not match the codebooks")
        self._identity = d == c and np.array_equal(self.proj, np.eye(c, dtype=np.float32))
        self._adapter_module = None
        if self.adapter:
            self._adapter_module = _adapter.NumpyAdapter(c, self._adapter_config(), arrays)
        elif any(k.startswith(_adapter.PREFIX) for k in arrays):
            raise ValueError("alignedvq arrays hold adapter weights but the config names no adapter")
        self._seqcorr = None
        if self.sequence_correction:
            self._seqcorr = SequenceCorrection.from_arrays(arrays)
            if self._seqcorr.basis.shape[0] != c or self._seqcorr.bits_per_sequence != self.sequence_correction.get("bits_per_sequence"):
                raise ValueError("alignedvq sequence correction arrays do not match the codec")
        elif any(k.startswith(SEQCORR_PREFIX) for k in arrays):
            raise ValueError("alignedvq arrays hold a sequence correction but the config names none")
        self._levels()

    def _levels(self) -> None:
        """Codebooks in encode order as (codebook in VQ space, its squared norms, decoder table, bits)."""
        lv = []
        if self.anchor_bits:
            lv.append([self.anchor_cb, (self.anchor_cb**2).sum(-1), self.anchor_tab, self.anchor_bits])
        for s in range(self.stages):
            lv.append([self.codebooks[s], (self.codebooks[s] ** 2).sum(-1), self.tables[s], self.nbits])
        self.levels = lv

    @property
    def bits_per_token(self) -> int:
        return self.anchor_bits + self.stages * self.nbits + (2 * self.side_bits if self.norm == "token" else 0)

    # -- alignment -------------------------------------------------------------------------
    def _side_levels(self) -> int:
        return (1 << self.side_bits) - 1

    def _quantize_side(self, v: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        step = (hi - lo) / self._side_levels() if hi > lo else 1.0
        q = np.clip(np.rint((v - lo) / step), 0, self._side_levels()).astype(np.uint32)
        return q, (lo + q * step).astype(np.float32)

    def _dequantize_side(self, q: np.ndarray, lo: float, hi: float) -> np.ndarray:
        step = (hi - lo) / self._side_levels() if hi > lo else 1.0
        return (lo + q.astype(np.float32) * step).astype(np.float32)

    def _align(self, t: np.ndarray):
        """(z, side codes or None, mu_hat, sd_hat) for tokens t (N, C)."""
        if self.norm == "none":
            return t, None, None, None
        mu, lsd = _token_stats(t)
        r = self.side_range
        qm, mu_hat = self._quantize_side(mu, float(r[0]), float(r[1]))
        qs, lsd_hat = self._quantize_side(lsd, float(r[2]), float(r[3]))
        sd_hat = np.exp(lsd_hat)
        z = (t - mu_hat[:, None]) / sd_hat[:, None]
        return z, (qm, qs), mu_hat, sd_hat

    def _exact_align(self, t: np.ndarray) -> np.ndarray:
        """What :meth:`_align` gives with exact, unquantized statistics: calibration tokens only."""
        if self.norm == "none":
            return t
        mu, lsd = _token_stats(t)
        return (t - mu[:, None]) / np.exp(lsd)[:, None]

    def _project(self, z: np.ndarray) -> np.ndarray:
        y = (z - self.center) * self.weight
        return y if self._identity else y @ self.proj  # (N, C) -> (N, d)

    def _codes(self, y: np.ndarray) -> np.ndarray:
        """Greedy residual assignment over all levels: (N, d) -> (N, L)."""
        r = y.copy()
        codes = np.empty((y.shape[0], len(self.levels)), dtype=np.int64)
        for i, (cb, sq, _, _) in enumerate(self.levels):
            codes[:, i] = _nearest(r, cb, sq)
            r -= cb[codes[:, i]]
        return codes

    def _reconstruct(self, codes: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(self.bias, (codes.shape[0], self.bias.shape[0])).copy()
        for i, (_, _, tab, _) in enumerate(self.levels):
            out += tab[codes[:, i]]
        return out

    # -- fit -------------------------------------------------------------------------------
    def fit(self, features, *, progress: bool = True, channel_weights: np.ndarray | None = None,
            anchor_labels: np.ndarray | None = None, min_anchor_count: int = 2):
        """Learn alignment, projection and codebooks from (N, C) calibration features.

        ``channel_weights`` (C,) scales each channel's squared error in the VQ objective, e.g. the
        mean squared Jacobian of the next stage's output w.r.t. that channel.

        ``anchor_labels`` (N,) integer labels of the calibration tokens (e.g. their input token ids)
        add an *anchor* codebook before the residual stages: the mean feature of every label seen
        at least ``min_anchor_count`` times. The encoder never needs labels: it sends the nearest
        anchor's index (``anchor_bits`` = ceil(log2(#anchors)) bits), like any other codebook.
        """
        x, _ = as_tokens(features)
        self.adapter, self._adapter_module = None, None  # a refit starts from a training-free decoder
        self._huffman, self._order1, self._stage_models = None, None, []
        if anchor_labels is not None:
            lab = np.asarray(anchor_labels).reshape(-1)
            if lab.shape[0] != x.shape[0]:
                raise ValueError(f"anchor_labels has {lab.shape[0]} entries for {x.shape[0]} calibration tokens")
            x_all = np.ascontiguousarray(x, dtype=np.float32)  # anchors are means: every calibration token counts
        elif self.stages == 0:
            raise CodecError("alignedvq with stages=0 needs anchor_labels at fit")
        elif self.entropy == "context":
            raise CodecError("alignedvq entropy='context' codes residual indices under the anchor index: give anchor_labels at fit")
        elif self.anchor_contexts > 1:
            raise CodecError(f"alignedvq.anchor_contexts={self.anchor_contexts} needs anchor_labels at fit (e.g. the calibration token ids)")
        x = _subsample(x, self.max_train, self.seed)
        n, c = x.shape
        faiss = _faiss()
        k = 1 << self.nbits
        if self.stages and n < k:  # an anchor-only codec fits no residual codebook
            raise CodecError(f"alignedvq: {n} calibration tokens cannot fit {k} centroids; give at least {k} (ideally 39x)")
        total = 1 + self.stages
        with _progress(total, f"alignedvq fit {self.stages}x{self.nbits} bit dim={self.dim or c}", progress) as bar:
            # alignment statistics
            if self.norm == "token":
                mu, lsd = _token_stats(x)
                self.side_range = np.array(
                    [*np.quantile(mu, [0.001, 0.999]), *np.quantile(lsd, [0.001, 0.999])], dtype=np.float32
                )
            else:
                self.side_range = np.zeros(4, dtype=np.float32)
            z = self._exact_align(x)
            self.center = z.mean(axis=0).astype(np.float32)
            if channel_weights is None:
                self.weight = np.ones(c, dtype=np.float32)
            else:
                w = np.asarray(channel_weights, dtype=np.float64).reshape(-1)
                if w.shape != (c,) or not np.all(np.isfinite(w)) or np.any(w < 0):
                    raise ValueError(f"channel_weights must be {c} finite non-negative values")
                w = np.sqrt(w / w.mean())
                self.weight = np.maximum(w, 1e-3).astype(np.float32)
            zc = (z - self.center) * self.weight
            d = self.dim if 0 < self.dim < c else c
            if d < c:
                cov = (zc.T.astype(np.float64) @ zc) / n
                evals, evecs = np.linalg.eigh(cov)
                self.proj = np.ascontiguousarray(evecs[:, ::-1][:, :d], dtype=np.float32)  # (C, d) leading components
            else:
                self.proj = np.eye(c, dtype=np.float32)
            self._identity = d == c
            y = zc if self._identity else zc @ self.proj
            back = self.proj.T if not self._identity else None  # (d, C)
            r = np.ascontiguousarray(y, dtype=np.float32)
            self.anchor_bits = 0
            if anchor_labels is not None:
                r_all = self._project(self._exact_align(x_all)).astype(np.float32)
                anchors = self._anchor_codebook(r_all, lab, min_anchor_count)
                if anchors.shape[0] < 2:
                    raise CodecError("alignedvq: fewer than 2 anchor labels occur often enough; give more calibration text")
                self.anchor_bits = int(anchors.shape[0] - 1).bit_length()
                self.anchor_cb = anchors
                self.anchor_tab = (anchors if back is None else anchors @ back) / self.weight
                sq = (anchors**2).sum(-1)
                if self.entropy == "order1":  # the anchors of every calibration token, in order
                    self._order1 = Order1Model.fit(_nearest(r_all, anchors, sq), anchors.shape[0])
                a = _nearest(r, anchors, sq)  # what the encoder will pick, no labels
                r = r - anchors[a]
                self._huffman = None
                if self.entropy == "huffman":
                    self._huffman = Huffman(huffman_lengths(np.bincount(a, minlength=anchors.shape[0])))
                    self._huffman._table()
                del r_all  # (N, d) float32 of every calibration token: not kept through k-means
            bar.update()
            # residual k-means, one codebook per stage
            self.codebooks = np.zeros((self.stages, k, d), dtype=np.float32)
            codes = np.empty((n, self.stages), dtype=np.int64)
            for s in range(self.stages):
                km = faiss.Kmeans(d, k, niter=self.niter, seed=self.seed + s, verbose=False,
                                  max_points_per_centroid=max(256, n // k + 1))
                km.train(r)
                self.codebooks[s] = km.centroids
                _, a = km.index.search(r, 1)
                codes[:, s] = a[:, 0]
                r = r - self.codebooks[s][codes[:, s]]
                bar.update()
            # decoder tables: codebooks mapped back to channel space
            self.tables = np.empty((self.stages, k, c), dtype=np.float32)
            for s in range(self.stages):
                t = self.codebooks[s] if back is None else self.codebooks[s] @ back
                self.tables[s] = t / self.weight
            self.bias = self.center.copy()
            self._levels()
            if self.entropy == "context" and anchor_labels is not None:
                # models of the codes the encoder sends for every calibration token, in order
                codes_all = self._codes(self._quantizer_input(x_all))
                self._order1, self._stage_models = _context_models(codes_all, self.anchor_cb.shape[0], self.nbits, self.stages)
        self._mark_fitted()
        if self.refine:
            self.refine_decoder(x, self.refine, progress=progress)
        return self

    def _anchor_codebook(self, r: np.ndarray, lab: np.ndarray, min_count: int) -> np.ndarray:
        """(A, d) anchors: the mean of every label seen ``min_count`` times, or, for labels seen at
        least ``2 * anchor_context_points`` times with ``anchor_contexts > 1``, k-means centroids of
        that label's features (at most 2**16 anchors in all; the most frequent labels win)."""
        uniq, inv, cnt = np.unique(lab, return_inverse=True, return_counts=True)
        per = np.where(cnt >= min_count, 1, 0)
        if self.anchor_contexts > 1:
            split = cnt >= 2 * self.anchor_context_points
            per[split] = np.minimum(self.anchor_contexts, cnt[split] // self.anchor_context_points)
        order = np.argsort(-cnt, kind="stable")
        over = np.cumsum(per[order]) > 1 << 16
        per[order[over]] = 0
        sums = np.zeros((len(uniq), r.shape[1]), dtype=np.float64)
        np.add.at(sums, inv, r)
        out = [(sums[per == 1] / cnt[per == 1, None]).astype(np.float32)]
        many = np.nonzero(per > 1)[0]
        if many.size:
            faiss = _faiss()
            by_label = np.argsort(inv, kind="stable")
            starts = np.concatenate([[0], np.cumsum(cnt)])
            for j in many:
                pts = np.ascontiguousarray(r[by_label[starts[j] : starts[j + 1]]], dtype=np.float32)
                km = faiss.Kmeans(r.shape[1], int(per[j]), niter=max(self.niter, 10), seed=self.seed + int(j), verbose=False,
                                  min_points_per_centroid=1, max_points_per_centroid=1 << 30)
                km.train(pts)
                out.append(km.centroids.astype(np.float32))
        return np.concatenate(out)

    def refine_decoder(self, features, sweeps: int = 2, *, progress: bool = True) -> "AlignedVQCodec":
        """Receiver-side "aligned fine-tuning" in closed form: re-fit each decoder table row as the
        mean target of the calibration tokens that the encoder maps to it (block coordinate descent
        over stages, ``sweeps`` passes). The encoder and the wire format are unchanged."""
        self._require_fit()
        if self.adapter or self.sequence_correction:
            raise CodecError("refine_decoder() must come before tune() and fit_sequence_correction(): they were fitted on these tables")
        x, _ = as_tokens(features)
        x = _subsample(x, self.max_train, self.seed)
        z, _, _, _ = self._align(x)
        codes = self._codes(self._project(z))  # the codes the encoder really sends
        pred = self._reconstruct(codes)
        with _progress(sweeps, "alignedvq refine", progress) as bar:
            for _ in range(sweeps):
                for i, level in enumerate(self.levels):
                    tab = level[2]
                    pred -= tab[codes[:, i]]
                    resid = z - pred  # what level i should explain, (N, C)
                    counts = np.bincount(codes[:, i], minlength=tab.shape[0])
                    order = np.argsort(codes[:, i], kind="stable")
                    starts = np.flatnonzero(np.r_[1, np.diff(codes[order, i])])
                    sums = np.add.reduceat(resid[order].astype(np.float64), starts, axis=0)
                    used = counts > 0
                    tab[used] = (sums / counts[used, None]).astype(np.float32)
                    pred += tab[codes[:, i]]
                shift = (z - pred).mean(axis=0).astype(np.float32)
                self.bias = self.bias + shift
                pred += shift
                bar.update()
        self.refine = int(sweeps)
        self._mark_fitted()
        return self

    def truncated(self, stages: int) -> "AlignedVQCodec":
        """A codec using only the first ``stages`` codebooks (a lower rate) with the training-free
        decoder; residual codebooks are nested, so no refit is needed."""
        self._require_fit()
        if not (0 if self.anchor_bits else 1) <= stages <= self.stages:
            raise ValueError(f"stages must be in {0 if self.anchor_bits else 1}..{self.stages}")
        cfg = {**self._config(), "stages": stages, "refine": 0}
        dropped = tuple(STAGE_MODEL_PREFIX.format(i) for i in range(stages, self.stages))
        arrays = {k: v.copy() for k, v in self._arrays().items() if not k.startswith(dropped)}
        arrays.update(codebooks=self.codebooks[:stages].copy(), tables=self.tables[:stages].copy())
        if self.refine or self.adapter or self.sequence_correction:
            raise CodecError("truncate a codec fitted with refine=0 and no adapter, then refine_decoder()/tune() the result")
        return type(self).from_state(arrays, cfg)

    def _encoder_space(self, features) -> np.ndarray:
        """(N, d) what the encoder quantizes for (N, C) tokens: aligned and projected."""
        self._require_fit()
        t, _ = as_tokens(features)
        self._check_width(t.shape[1], self.center.shape[0])
        return self._quantizer_input(t)

    def _quantizer_input(self, t: np.ndarray) -> np.ndarray:
        """(N, d) float32: (N, C) tokens aligned as the encoder aligns them (quantized side
        information, not the exact statistics) and projected."""
        return np.ascontiguousarray(self._project(self._align(t)[0]), dtype=np.float32)

    def encoder_codes(self, features) -> np.ndarray:
        """(N, levels) the indices the encoder sends for each of the (N, C) tokens: the anchor
        index first (if any), then one per residual stage."""
        return self._codes(self._encoder_space(features))

    def anchor_codes(self, features) -> np.ndarray:
        """(N,) the anchor index the encoder sends for each of the (N, C) tokens."""
        self._require_fit()
        if not self.anchor_bits:
            raise CodecError("this codec has no anchor codebook")
        cb, sq = self.levels[0][0], self.levels[0][1]
        return _nearest(self._encoder_space(features), cb, sq)

    def recoded(self, entropy: str, features=None, *, codes: np.ndarray | None = None) -> "AlignedVQCodec":
        """The same codec (codebooks, tables, adapter: identical decodes) with its indices coded
        by ``entropy``: "huffman" or "order1" (the anchor index) or "context" (the anchor index
        and every residual index). The models are fitted on what the encoder sends for
        calibration ``features`` (N, C), in order, or on ``codes``: (N,) anchors from
        :meth:`anchor_codes` or (N, L) from :meth:`encoder_codes` of this codec or of one it was
        truncated from (its first 1 + stages columns are used), to recode several codecs that
        share codebooks at once."""
        self._require_fit()
        if not self.anchor_bits:
            raise CodecError("recoded() changes how the anchor index is coded; this codec has no anchor codebook")
        if entropy not in ("huffman", "order1", "context"):
            raise ValueError(f"entropy must be 'huffman', 'order1' or 'context', got {entropy!r}")
        if (features is None) == (codes is None):
            raise ValueError("give calibration features or their codes, not both")
        if codes is None:
            codes = self.encoder_codes(features) if entropy == "context" else self.anchor_codes(features)
        codes = np.asarray(codes, dtype=np.int64)
        codes = codes[:, None] if codes.ndim == 1 else codes
        need = 1 + self.stages if entropy == "context" else 1
        if codes.ndim != 2 or codes.shape[1] < need:
            raise ValueError(f"entropy={entropy!r} needs (N, >= {need}) codes, got shape {codes.shape}")
        stage_prefixes = [STAGE_MODEL_PREFIX.format(i) for i in range(self.stages)]
        arrays = {k: v for k, v in self._arrays().items()
                  if k != "anchor_code_lengths" and not k.startswith((Order1Model.PREFIX, *stage_prefixes))}
        a = self.anchor_cb.shape[0]
        if entropy == "huffman":
            arrays["anchor_code_lengths"] = huffman_lengths(np.bincount(codes[:, 0], minlength=a)).astype(np.int32)
        elif entropy == "order1":
            arrays.update(Order1Model.fit(codes[:, 0], a).arrays())
        else:
            anchor_model, stage_models = _context_models(codes, a, self.nbits, self.stages)
            arrays.update(anchor_model.arrays())
            for i, m in enumerate(stage_models):
                arrays.update(m.arrays(STAGE_MODEL_PREFIX.format(i)))
        return type(self).from_state(arrays, {**self._config(), "entropy": entropy})

    # -- learned receiver-side adapter ("aligned fine-tuning") -------------------------------
    @property
    def needs_lengths(self) -> bool:
        """Whether decode() wants the sequence lengths of packed tokens (the adapter attends
        within a sequence)."""
        return self._adapter_module is not None or self._seqcorr is not None

    def tune(self, features, lengths, *, adapter: "_adapter.AdapterConfig | None" = None, steps: int = 300,
             tune_tables: bool = True, batch_tokens: int = 4096, lr: float = 2e-3, table_lr: float = 3e-4,
             tail=None, tail_weight: float = 0.0, progress: bool = True) -> dict[str, Any]:
        """Train a receiver-side context adapter (and, with ``tune_tables``, the decoder tables
        with it) on calibration ``features`` (N, C): the real tokens of sequences with
        ``lengths`` tokens each, in order. The encoder, its codebooks and the wire format are
        unchanged. ``tail`` (optional): a differentiable ``tail(hidden (B,T,C), mask (B,T)) ->
        (B, D)`` (e.g. the next stages of the model, frozen) whose output cosine is added to the
        loss with ``tail_weight``. Returns the training report (also kept in the config)."""
        import torch

        self._require_fit()
        if self.adapter:
            raise CodecError("this codec already has an adapter; tune a copy fitted without one")
        if self.sequence_correction:
            raise CodecError("tune() must come before fit_sequence_correction(): the correction is fitted on the adapted decode")
        if tail is not None and self.norm != "none":
            raise ValueError("a tail loss needs norm='none' (the adapter works in the aligned space)")
        x, _ = as_tokens(features)
        self._check_width(x.shape[1], self.center.shape[0])
        lens = _adapter.split_lengths(x.shape[0], lengths)
        cfg = adapter or _adapter.AdapterConfig()
        z, _, _, _ = self._align(x)
        codes = self._codes(self._project(z))  # what the encoder really sends
        dec = _adapter.TableDecoder(self.bias, [lv[2] for lv in self.levels], trainable=tune_tables)
        module = _adapter.build_adapter(x.shape[1], cfg)
        report = _adapter.train_adapter(module, dec, codes, z, lens, steps=steps, batch_tokens=batch_tokens, lr=lr,
                                        table_lr=table_lr, tail=tail, tail_weight=tail_weight, seed=self.seed,
                                        progress=progress)
        if tune_tables:
            with torch.no_grad():
                self.bias = dec.bias.detach().numpy().copy()
                tabs = [t.detach().numpy().copy() for t in dec.tables]
            if self.anchor_bits:
                self.anchor_tab = tabs.pop(0)
            self.tables = np.stack(tabs) if tabs else np.zeros((0, 1 << self.nbits, x.shape[1]), np.float32)
        self._adapter_module = _adapter.NumpyAdapter(x.shape[1], cfg, _adapter.adapter_arrays(module))
        self.adapter = {**cfg.as_dict(), "steps": report["steps"], "tables_tuned": bool(tune_tables),
                        "calibration_tokens": report["calibration_tokens"],
                        "calibration_sequences": report["calibration_sequences"], "tail_weight": float(tail_weight) if tail else 0.0}
        self._levels()
        self._mark_fitted()
        return report

    def fit_sequence_correction(self, features, lengths, *, bits_per_sequence: int = 192) -> "AlignedVQCodec":
        """Send each sequence's mean decode miss in ``bits_per_sequence`` more bits
        (:mod:`splitnet.codecs.sequence_correction`), fitted on calibration ``features`` (N, C), the
        real tokens of sequences of ``lengths`` tokens, in order. Comes last: after
        ``refine_decoder`` and ``tune``, whose decode it corrects. Changes the codebook hash."""
        self._require_fit()
        if self.sequence_correction:
            raise CodecError("this codec already has a sequence correction")
        if self.norm != "none":
            raise CodecError("a sequence correction needs norm='none' (it corrects the decoded channels directly)")
        x, _ = as_tokens(features)
        lens = _adapter.split_lengths(x.shape[0], lengths)
        miss = x - self._decoded(self.encoder_codes(x), lens)
        self._seqcorr = SequenceCorrection.fit(sequence_means(miss, lens), int(bits_per_sequence))
        self.sequence_correction = {"bits_per_sequence": self._seqcorr.bits_per_sequence,
                                    "components": int(self._seqcorr.bits.size), "calibration_sequences": int(lens.size)}
        self._mark_fitted()
        return self

    def _decoded(self, codes: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """What the receiver rebuilds from ``codes`` before the sequence correction: tables, then
        the adapter over each sequence (norm='none' space)."""
        out = self._reconstruct(codes)
        if self._adapter_module is not None and codes.shape[0]:
            out = _adapter.apply_adapter(self._adapter_module, out, lens)
        return out

    @staticmethod
    def _lengths(n: int, shape: tuple[int, ...], lengths) -> np.ndarray:
        if lengths is None and len(shape) == 3:  # a (B, T, C) tensor is B sequences of T tokens
            lengths = np.full(shape[0], shape[1])
        return _adapter.split_lengths(n, lengths)

    # -- encode / decode -------------------------------------------------------------------
    def encode(self, x, *, lengths=None) -> Payload:
        """Encode (..., C) features. ``lengths``: per-sequence token counts of packed (N, C)
        tokens, needed only with a sequence correction (None: one sequence; a (B, T, C) tensor is
        B sequences of T); the receiver must decode with the same lengths."""
        with one_blas_thread(math.prod(np.shape(x)[:-1])):
            return self._encode(x, lengths)

    def decode(self, payload: Payload, *, lengths=None) -> np.ndarray:
        """Rebuild the tensor. With an adapter or a sequence correction, ``lengths`` splits
        packed (N, C) tokens into sequences (None: one sequence; a (B, T, C) payload is B
        sequences of T tokens)."""
        with one_blas_thread(math.prod(payload.shape[:-1])):
            return self._decode(payload, lengths)

    def _encode(self, x, lengths) -> Payload:
        self._require_fit()
        t, shape = as_tokens(x)
        self._check_width(t.shape[1], self.center.shape[0])
        z, side, _, _ = self._align(t)
        codes = self._codes(self._project(z))
        parts: dict[str, np.ndarray] = {}
        if self._seqcorr is not None:  # the encoder runs the receiver's decoder to see what it misses
            lens = self._lengths(t.shape[0], shape, lengths)
            parts["s"] = self._seqcorr.encode(sequence_means(t - self._decoded(codes, lens), lens))
        w = BitWriter()
        huff = self._huffman if self.anchor_bits else None
        order1 = self._order1 if self.anchor_bits else None
        staged = bool(self._stage_models)  # residual indices range-coded under the anchor
        if self.anchor_bits and huff is None and order1 is None:
            w.add(codes[:, 0], self.anchor_bits)
        if self.stages and not staged:
            w.add(codes[:, 1 if self.anchor_bits else 0 :], self.nbits)
        if side is not None:
            w.add(side[0], self.side_bits)
            w.add(side[1], self.side_bits)
        if huff is not None:
            w.add_bits(huff.encode_bits(codes[:, 0]))  # variable-length anchor codes go last
        buf = w.getvalue()
        if order1 is not None:  # range-coded indices after the byte-aligned fixed fields
            enc = RangeEncoder()
            order1.encode_into(enc, codes[:, 0])
            for i, m in enumerate(self._stage_models):
                m.encode_into(enc, codes[:, 1 + i], codes[:, 0])
            buf = np.concatenate([buf, np.frombuffer(enc.finish(), dtype=np.uint8)])
        meta: dict[str, Any] = {}
        if self.entropy == "zlib":
            packed = zlib.compress(buf.tobytes(), 9)
            if len(packed) < buf.nbytes:
                buf, meta = np.frombuffer(packed, dtype=np.uint8), {"z": 1}
        return Payload(self.name, self.codebook_hash, shape, "float32", {"b": buf, **parts}, meta)

    def _decode(self, payload: Payload, lengths) -> np.ndarray:
        self._require_fit()
        n, c = check_payload(self, payload)
        self._check_width(c, self.center.shape[0])
        buf = part(payload, "b")
        huff = self._huffman if self.anchor_bits else None
        order1 = self._order1 if self.anchor_bits else None
        coded = huff is not None or order1 is not None  # the anchor index is not a fixed-width field
        staged = bool(self._stage_models)  # nor are residual indices with entropy="context"
        fields = [(n, 0 if coded else self.anchor_bits), (n * self.stages, self.nbits if self.stages and not staged else 0)]
        if self.norm == "token":
            fields += [(n, self.side_bits), (n, self.side_bits)]
        fixed_bytes = (sum(a * b for a, b in fields) + 7) // 8  # the bit-packed fields, byte-aligned
        if payload.meta.get("z"):
            want = fixed_bytes
            try:
                d = zlib.decompressobj()
                raw = d.decompress(np.ascontiguousarray(buf).tobytes(), want)
            except zlib.error as e:
                raise CodecError(f"alignedvq payload is not valid zlib data: {e}") from e
            if len(raw) != want or d.unconsumed_tail:
                raise CodecError(f"alignedvq payload inflates to the wrong size (want {want} bytes)")
            buf = np.frombuffer(raw, dtype=np.uint8)
        if order1 is not None:
            if buf.size < fixed_bytes:
                raise CodecError(f"alignedvq payload has {buf.size} bytes, its fixed fields need {fixed_bytes}")
            rdr = BitReader(np.ascontiguousarray(buf[:fixed_bytes], dtype=np.uint8), fields)
            dec = RangeDecoder(np.ascontiguousarray(buf[fixed_bytes:], dtype=np.uint8).tobytes())
            anchors = order1.decode_from(dec, n)
            vals = [anchors]
            if staged:
                vals.append(np.stack([m.decode_from(dec, n, anchors) for m in self._stage_models], axis=1) if n
                            else np.zeros((0, self.stages), np.int64))
            vals += [rdr.read() for _, width in fields if width]
            rd = iter(vals)
            read = lambda: next(rd)  # noqa: E731
        elif huff is not None:
            bits = np.unpackbits(np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1), bitorder="little")
            fixed, pos = read_fields(bits, fields)
            anchor, used = huff.decode_bits(bits[pos:], n)
            if (pos + used + 7) // 8 != buf.size:
                raise CodecError(f"alignedvq payload has {buf.size} bytes, its fields need {(pos + used + 7) // 8}")
            fixed.insert(0, anchor)
            rd = iter(fixed)
            read = lambda: next(rd)  # noqa: E731
        else:
            read = BitReader(buf, fields).read
        parts = []
        if self.anchor_bits:
            a = read()
            if a.size and a.max() >= self.anchor_cb.shape[0]:
                raise CodecError("alignedvq payload names an anchor beyond the codebook")
            parts.append(a[:, None])
        if self.stages:
            parts.append(read().reshape(n, self.stages))
        codes = np.concatenate(parts, axis=1).astype(np.int64) if parts else np.zeros((n, 0), np.int64)
        lens = self._lengths(n, payload.shape, lengths) if self.needs_lengths else np.array([n])
        out = self._decoded(codes, lens)
        if self._seqcorr is not None:
            corr = self._seqcorr.decode(part(payload, "s"), lens.size)
            out += np.repeat(corr, lens, axis=0)
        if self.norm == "token":
            r = self.side_range
            mu = self._dequantize_side(read(), float(r[0]), float(r[1]))
            sd = np.exp(self._dequantize_side(read(), float(r[2]), float(r[3])))
            out = out * sd[:, None] + mu[:, None]
        return out.reshape(payload.shape)
