"""Vector-quantisation codecs: faiss PQ and residual VQ baselines, and AlignedVQ.

Codebooks are learned with faiss (imported lazily, only for ``fit`` and beam-search encoding);
greedy encoding and all decoding are plain numpy so an edge stage needs no faiss. Indices are
bit-packed exactly (:mod:`splitnet.codecs.bitpack`), so ``nbits=12`` costs 12 bits per index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitnet.codecs.base import Codec, Payload
from splitnet.codecs.bitpack import BitReader, BitWriter
from splitnet.codecs.registry import register_codec
from splitnet.codecs.scalar import as_tokens, check_payload, part
from splitnet.errors import CodecError


def faiss_module():
    """The faiss module, or a CodecError saying how to install it (also for callers that set its threads)."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a declared dependency
        raise CodecError("fitting VQ codecs needs faiss; install it with `pip install faiss-cpu`") from e
    return faiss


_faiss = faiss_module


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _subsample(x: np.ndarray, max_n: int, seed: int) -> np.ndarray:
    if max_n and x.shape[0] > max_n:
        idx = np.random.default_rng(seed).choice(x.shape[0], max_n, replace=False)
        x = x[np.sort(idx)]
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    return int(value)


def _codebook_array(arrays: dict[str, np.ndarray], name: str, count: int, nbits: int, width: str) -> np.ndarray:
    """``arrays[name]`` as float32 (count, 2**nbits, width), or ValueError naming the shape the config needs."""
    a = np.ascontiguousarray(arrays[name], dtype=np.float32)
    if a.ndim != 3 or a.shape[:2] != (count, 1 << nbits):
        raise ValueError(f"{name} have shape {a.shape}, config needs ({count}, {1 << nbits}, {width})")
    return a


def _nearest(x: np.ndarray, cb: np.ndarray, cb_sqnorm: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the nearest row of ``cb`` (K, d) for every row of ``x`` (N, d)."""
    out = np.empty(x.shape[0], dtype=np.int64)
    for i in range(0, x.shape[0], chunk):
        xs = x[i : i + chunk]
        d2 = cb_sqnorm[None, :] - 2.0 * (xs @ cb.T)  # (n, K); ||x||^2 is constant per row
        out[i : i + chunk] = d2.argmin(axis=1)
    return out


class _FittedCodec(Codec):
    """A codec with learned state: hash, fit check, save/load through state()/from_state()."""

    needs_fit = True

    def __init__(self) -> None:
        self.fitted = False
        self._hash = ""

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def state(self):
        self._require_fit()
        return self._arrays(), self._config()

    @classmethod
    def from_state(cls, arrays, config):
        c = cls(**config)
        c._load_arrays({k: np.asarray(v) for k, v in arrays.items()})
        c._mark_fitted()
        return c

    def _mark_fitted(self) -> None:
        from splitnet.codecs.store import SHORT_HASH_HEX, content_hash

        self.fitted = True
        self._hash = content_hash(self._arrays(), self._config(), self.name)[:SHORT_HASH_HEX]

    @property
    def codebook_hash(self) -> str:
        return self._hash

    def _require_fit(self) -> None:
        if not self.fitted:
            raise CodecError(
                f"codec {self.name!r} is not fitted; call fit(calibration_features) or load it with "
                "splitnet.codecs.load_codec(path) (files come from `splitnet calibrate`)"
            )

    def _check_width(self, c: int, expected: int) -> None:
        if c != expected:
            raise CodecError(f"codec {self.name!r} was fitted on {expected} channels, got a tensor with {c}")


@register_codec
class PQCodec(_FittedCodec):
    """faiss ProductQuantizer: ``m`` sub-vectors, ``nbits`` bits each (m * nbits bits per token)."""

    name = "pq"

    def __init__(self, m: int = 8, nbits: int = 8, niter: int = 20, max_train: int = 200_000, seed: int = 0) -> None:
        super().__init__()
        self.m = _check_int("pq.m", m, 1, 4096)
        self.nbits = _check_int("pq.nbits", nbits, 1, 16)
        self.niter, self.max_train, self.seed = int(niter), int(max_train), int(seed)

    def _config(self):
        return {"m": self.m, "nbits": self.nbits, "niter": self.niter, "max_train": self.max_train, "seed": self.seed}

    def _arrays(self):
        return {"centroids": self.centroids}

    def _load_arrays(self, arrays):
        self.centroids = _codebook_array(arrays, "centroids", self.m, self.nbits, "dsub")  # (m, K, dsub)
        self._sq = (self.centroids**2).sum(-1)

    def fit(self, features, *, progress: bool = True):
        x, _ = as_tokens(features)
        d = x.shape[1]
        if d % self.m:
            raise ValueError(f"pq: {d} channels are not divisible into m={self.m} sub-vectors")
        x = _subsample(x, self.max_train, self.seed)
        faiss = _faiss()
        with _progress(1, f"pq fit m={self.m} nbits={self.nbits}", progress) as bar:
            pq = faiss.ProductQuantizer(d, self.m, self.nbits)
            pq.cp.niter = self.niter
            pq.cp.seed = self.seed
            pq.cp.max_points_per_centroid = max(256, x.shape[0] // (1 << self.nbits) + 1)
            pq.train(x)
            bar.update()
        cents = faiss.vector_to_array(pq.centroids).reshape(self.m, 1 << self.nbits, d // self.m)
        self._load_arrays({"centroids": cents})
        self._mark_fitted()
        return self

    def codes(self, t: np.ndarray) -> np.ndarray:
        m, k, dsub = self.centroids.shape
        xs = t.reshape(t.shape[0], m, dsub).transpose(1, 0, 2)  # (N, C) -> (m, N, dsub)
        d2 = self._sq[:, None, :] - 2.0 * np.matmul(xs, self.centroids.transpose(0, 2, 1))  # (m, N, K)
        return d2.argmin(axis=2).T  # (N, m)

    def encode(self, x) -> Payload:
        self._require_fit()
        t, shape = as_tokens(x)
        self._check_width(t.shape[1], self.centroids.shape[0] * self.centroids.shape[2])
        w = BitWriter()
        w.add(self.codes(t), self.nbits)
        return Payload(self.name, self.codebook_hash, shape, "float32", {"b": w.getvalue()})

    def decode(self, payload: Payload) -> np.ndarray:
        self._require_fit()
        n, c = check_payload(self, payload)
        m, k, dsub = self.centroids.shape
        self._check_width(c, m * dsub)
        codes = BitReader(part(payload, "b"), [(n * m, self.nbits)]).read().reshape(n, m)
        out = self.centroids[np.arange(m)[None, :], codes]  # (N, m, dsub)
        return out.reshape(payload.shape)


def _rq_from_codebooks(faiss, d: int, stages: int, nbits: int, codebooks: np.ndarray, beam: int):
    rq = faiss.ResidualQuantizer(d, stages, nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).ravel(), rq.codebooks)
    rq.is_trained = True
    rq.max_beam_size = beam
    return rq


def _unpack_faiss_codes(codes: np.ndarray, stages: int, nbits: int) -> np.ndarray:
    """faiss packs each vector's codes LSB-first into whole bytes; return (N, stages) indices."""
    bits = np.unpackbits(codes, axis=1, bitorder="little")[:, : stages * nbits]
    bits = bits.reshape(codes.shape[0], stages, nbits).astype(np.int64)
    return (bits << np.arange(nbits)).sum(-1)


@register_codec
class RVQCodec(_FittedCodec):
    """faiss ResidualQuantizer: ``stages`` codebooks of ``nbits`` bits, beam-search encoding."""

    name = "rvq"

    def __init__(self, stages: int = 2, nbits: int = 12, beam: int = 5, niter: int = 20, max_train: int = 200_000, seed: int = 0,
                 train_type: int = 0) -> None:
        """``train_type`` is faiss' ResidualQuantizer.train_type: 0 = one k-means per stage (default
        here), 1 = faiss' own default "progressive dim" (about log2(C) k-means runs per stage)."""
        super().__init__()
        self.train_type = _check_int("rvq.train_type", train_type, 0, 1)
        self.stages = _check_int("rvq.stages", stages, 1, 64)
        self.nbits = _check_int("rvq.nbits", nbits, 1, 16)
        self.beam = _check_int("rvq.beam", beam, 1, 256)
        self.niter, self.max_train, self.seed = int(niter), int(max_train), int(seed)
        self._rq = None

    def _config(self):
        return {"stages": self.stages, "nbits": self.nbits, "beam": self.beam, "niter": self.niter, "max_train": self.max_train,
                "seed": self.seed, "train_type": self.train_type}

    def _arrays(self):
        return {"codebooks": self.codebooks}

    def _load_arrays(self, arrays):
        self.codebooks = _codebook_array(arrays, "codebooks", self.stages, self.nbits, "C")  # (stages, K, C)
        self._rq = None

    def fit(self, features, *, progress: bool = True):
        x, _ = as_tokens(features)
        x = _subsample(x, self.max_train, self.seed)
        faiss = _faiss()
        with _progress(1, f"rvq fit {self.stages}x{self.nbits} bit", progress) as bar:
            rq = faiss.ResidualQuantizer(x.shape[1], self.stages, self.nbits)
            rq.max_beam_size = self.beam
            rq.train_type = self.train_type
            rq.cp.niter = self.niter
            rq.cp.seed = self.seed
            rq.cp.max_points_per_centroid = max(256, x.shape[0] // (1 << self.nbits) + 1)
            rq.train(x)
            bar.update()
        cbs = faiss.vector_to_array(rq.codebooks).reshape(self.stages, 1 << self.nbits, x.shape[1])
        self._load_arrays({"codebooks": cbs})
        self._mark_fitted()
        return self

    def truncated(self, stages: int) -> "RVQCodec":
        """The first ``stages`` codebooks as a codec of its own (residual codebooks are nested)."""
        self._require_fit()
        if not 1 <= stages <= self.stages:
            raise ValueError(f"stages must be in 1..{self.stages}")
        return type(self).from_state({"codebooks": self.codebooks[:stages].copy()}, {**self._config(), "stages": stages})

    def codes(self, t: np.ndarray) -> np.ndarray:
        if self._rq is None:
            self._rq = _rq_from_codebooks(_faiss(), t.shape[1], self.stages, self.nbits, self.codebooks, self.beam)
        return _unpack_faiss_codes(self._rq.compute_codes(t), self.stages, self.nbits)

    def encode(self, x) -> Payload:
        self._require_fit()
        t, shape = as_tokens(x)
        self._check_width(t.shape[1], self.codebooks.shape[2])
        w = BitWriter()
        w.add(self.codes(t), self.nbits)
        return Payload(self.name, self.codebook_hash, shape, "float32", {"b": w.getvalue()})

    def decode(self, payload: Payload) -> np.ndarray:
        self._require_fit()
        n, c = check_payload(self, payload)
        self._check_width(c, self.codebooks.shape[2])
        codes = BitReader(part(payload, "b"), [(n * self.stages, self.nbits)]).read().reshape(n, self.stages)
        out = self.codebooks[0][codes[:, 0]]
        for s in range(1, self.stages):
            out += self.codebooks[s][codes[:, s]]
        return out.reshape(payload.shape)
