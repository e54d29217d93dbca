"""MiniLM features at the cuts, for calibration and evaluation, cached as safetensors.

Texts are run in batches sorted by length (little padding); only real tokens are stored, as one
(N_tokens, C) array per cut plus per-text lengths, in the order of the input texts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np

from splitnet.bench.data.stdlib_docs import CACHE_DIR


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def extract(bm, texts: Sequence[str], cuts: Sequence[int], *, emb: bool, max_length: int = 128, batch: int = 64,
            tag: str = "", progress: bool = True) -> dict[str, np.ndarray]:
    """{"lens": (n,), "h<cut>": (N_tok, C) for each cut, "emb": (n, C) if emb} for ``texts``."""
    import torch
    from safetensors.numpy import load_file, save_file
    from tqdm.auto import tqdm

    cuts = sorted(set(int(c) for c in cuts))
    key = _key(bm.name, list(texts), cuts, emb, max_length, 2)
    path = CACHE_DIR / f"minilm_{tag}_{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    n = len(texts)
    lens = np.array([int(x) for x in bm.tokenize(list(texts), max_length=max_length)["attention_mask"].sum(1)])
    order = np.argsort(lens, kind="stable")
    bounds = [0, *cuts, bm.num_blocks] if emb else [0, *cuts]
    stages = [bm.stage(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    per_cut: dict[int, list[np.ndarray]] = {c: [None] * n for c in cuts}
    embs = np.zeros((n, bm.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for i in tqdm(range(0, n, batch), desc=f"minilm features {tag}", disable=not progress, leave=False):
            idx = order[i : i + batch]
            out = bm.tokenize([texts[j] for j in idx], max_length=max_length)
            mask = out["attention_mask"].bool().numpy()
            for s, st in enumerate(stages):
                out = st(out)
                if s < len(cuts):
                    h = out["hidden"].numpy()
                    for r, j in enumerate(idx):
                        per_cut[cuts[s]][j] = h[r][mask[r]]
            if emb:
                embs[idx] = out["embedding"].numpy()
    res = {"lens": lens.astype(np.int64)}
    for c in cuts:
        res[f"h{c}"] = np.ascontiguousarray(np.concatenate(per_cut[c]), dtype=np.float32)
    if emb:
        res["emb"] = embs
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_file(res, str(path))
    return res


def run_tail(bm, cut: int, tokens: np.ndarray, lens: np.ndarray, batch: int = 64) -> np.ndarray:
    """Embeddings from decoded real tokens (N_tok, C) of texts with ``lens`` real tokens each."""
    import torch

    tail = bm.stage(cut, bm.num_blocks)
    offs = np.concatenate([[0], np.cumsum(lens)])
    order = np.argsort(lens, kind="stable")
    out = np.zeros((len(lens), bm.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(lens), batch):
            idx = order[i : i + batch]
            t = int(lens[idx].max())
            h = np.zeros((len(idx), t, tokens.shape[1]), dtype=np.float32)  # (B, T, C), zero padding
            m = np.zeros((len(idx), t), dtype=np.int64)
            for r, j in enumerate(idx):
                h[r, : lens[j]] = tokens[offs[j] : offs[j + 1]]
                m[r, : lens[j]] = 1
            res = tail({"hidden": torch.from_numpy(h), "attention_mask": torch.from_numpy(m)})
            out[idx] = res["embedding"].numpy()
    return out


def token_ids(bm, texts: Sequence[str], max_length: int = 128, batch: int = 512) -> np.ndarray:
    """Input token ids of the real tokens of ``texts``, in the order :func:`extract` stores features."""
    out = []
    for i in range(0, len(texts), batch):
        b = bm.tokenize(list(texts[i : i + batch]), max_length=max_length)
        m = b["attention_mask"].bool().numpy()
        ids = b["input_ids"].numpy()
        out.extend(ids[r][m[r]] for r in range(len(m)))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
