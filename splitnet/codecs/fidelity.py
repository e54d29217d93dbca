"""Fidelity of a codec at a cut, on held-out inputs: at the cut and at the model's output.

At the cut: the mean cosine of each decoded feature vector with the original. At the output, the
task's own measure against the unsplit model (the same stages without the codec):

- classifiers (vision): top-1 agreement, top-5 overlap, KL(p_unsplit || p_codec) of the softmax,
  and top-1 agreement on the inputs whose unsplit top-1 probability is >= 0.5;
- encoders: cosine of the sentence embeddings;
- LMs: greedy (argmax) agreement per position, teacher-forced, and the perplexity change on the
  input's own next tokens.

Bytes are every byte of the payload on the wire (:attr:`Payload.nbytes`), per input, beside what
fp16 costs for the same tensor and the raw input (what cloud-only would send).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from splitnet.errors import CodecError

#: the measure --min-fidelity is compared with, per model kind
PRIMARY_MEASURE = {"vision": "top1_agreement", "encoder": "embedding_cosine", "decoder": "greedy_agreement"}


#: the unsplit model's top-1 probability from which an input counts as confident
CONFIDENT_P = 0.5


class FidelityBelowMinimum(CodecError):
    """A calibrated codec's held-out fidelity is below the asked minimum; nothing was written."""


@dataclass(frozen=True)
class CutFeatures:
    """What crosses the cut for one input, and the unsplit model's output for it."""

    hidden: np.ndarray  # (1, T, C) float32
    carry: dict[str, Any]  # other tensors that cross the cut (attention_mask), as torch tensors
    reference: Any  # the tail's output on the uncoded hidden (torch tensor)
    input_ids: np.ndarray | None  # LMs: the tokens, for perplexity
    raw_nbytes: int


@dataclass(frozen=True)
class CutFidelity:
    codec: str
    inputs: int
    cut_cosine: float
    task: dict[str, float]
    primary_measure: str
    primary_value: float
    wire_bytes_per_input: float
    fp16_bytes_per_input: float
    raw_bytes_per_input: float
    ratio_vs_fp16: float
    ratio_vs_raw: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def rounded(v):
            return round(v, 6) if isinstance(v, float) else {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) else v

        return {k: rounded(v) for k, v in asdict(self).items()}


def _output_tensor(out: Mapping[str, Any]):
    for k in ("logits", "embedding", "pooled", "output"):
        if k in out:
            return out[k]
    raise CodecError(f"the last stage returned {sorted(out)}; no logits or embedding to compare")


def cut_features(bm, cut: int, inputs: Iterable[tuple[Mapping[str, np.ndarray], int]], *, progress=None,
                 batch_size: int = 16) -> list[CutFeatures]:
    """Run blocks [0, cut) and the unsplit tail [cut, L) on every input ((first-stage inputs, raw
    bytes)); inputs of equal shapes (images) run in batches of ``batch_size``."""
    import torch

    head, tail = bm.stage(0, cut), bm.stage(cut, bm.num_blocks)
    all_logits = bm.kind == "decoder"
    out: list[CutFeatures] = []
    with torch.no_grad():
        for group in _batches(list(inputs), batch_size if bm.kind == "vision" else 1):
            tx = {k: torch.from_numpy(np.concatenate([np.asarray(x[k]) for x, _ in group])) for k in group[0][0]}
            mid = head(tx)
            hidden = mid["hidden"]
            carry = {k: v for k, v in mid.items() if k != "hidden"}
            ref = _output_tensor(tail({"hidden": hidden, **carry}, all_logits=all_logits))
            for i, (x, raw) in enumerate(group):
                ids = np.asarray(x["input_ids"]) if all_logits else None
                out.append(CutFeatures(hidden[i : i + 1].float().numpy(), {k: v[i : i + 1] for k, v in carry.items()},
                                       ref[i : i + 1], ids, int(raw)))
            if progress is not None:
                progress.update(len(group))
    return out


def _batches(items: list, size: int) -> list[list]:
    """Consecutive runs of items whose input shapes agree, at most ``size`` long."""
    groups: list[list] = []
    for it in items:
        shapes = {k: np.shape(v) for k, v in it[0].items()}
        if groups and len(groups[-1]) < size and {k: np.shape(v) for k, v in groups[-1][0][0].items()} == shapes:
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups


def calibration_tokens(features: Sequence[CutFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """(N_tokens, C) features of real tokens and the per-input token counts."""
    rows, lens = [], []
    for f in features:
        h = f.hidden[0]
        mask = f.carry.get("attention_mask")
        if mask is not None:
            h = h[np.asarray(mask[0].cpu()) != 0]
        rows.append(h)
        lens.append(h.shape[0])
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32), np.asarray(lens, dtype=np.int64)


def evaluate_codec(bm, cut: int, codec, features: Sequence[CutFeatures], *, progress=None, batch_size: int = 16) -> CutFidelity:
    """Encode each held-out input's cut features with ``codec``, run the tail on the decoded ones,
    and compare with the unsplit model."""
    import torch

    from splitnet.codecs.registry import make_codec

    if not features:
        raise CodecError("no held-out inputs to measure fidelity on")
    tail = bm.stage(cut, bm.num_blocks)
    fp16 = make_codec("fp16")
    all_logits = bm.kind == "decoder"
    wire = fp16_bytes = raw = 0
    cos_sum, cos_n = 0.0, 0
    decoded_all: list[np.ndarray] = []
    for f in features:  # one payload per input: the bytes one request sends
        payload = codec.encode(f.hidden)
        decoded = np.asarray(codec.decode(payload), dtype=np.float32).reshape(f.hidden.shape)
        wire += payload.nbytes
        fp16_bytes += fp16.encode(f.hidden).nbytes
        raw += f.raw_nbytes
        a, b = f.hidden.reshape(-1, f.hidden.shape[-1]), decoded.reshape(-1, f.hidden.shape[-1])
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        cos_sum += float(cos.sum())
        cos_n += cos.size
        decoded_all.append(decoded)
    refs, tests, ids = [], [], []
    size = batch_size if bm.kind == "vision" else 1
    with torch.no_grad():
        for i in range(0, len(features), size):
            group = features[i : i + size]
            hidden = torch.from_numpy(np.concatenate(decoded_all[i : i + size]))
            carry = {k: torch.cat([f.carry[k] for f in group]) for k in group[0].carry}
            out = _output_tensor(tail({"hidden": hidden, **carry}, all_logits=all_logits)).float()
            refs.extend(f.reference.float() for f in group)
            tests.extend(out[j : j + 1] for j in range(len(group)))
            ids.extend(f.input_ids for f in group)
            if progress is not None:
                progress.update(len(group))
    task = task_measures(bm.kind, refs, tests, ids)
    primary = PRIMARY_MEASURE.get(bm.kind, "cut_cosine")
    n = len(features)
    cut_cos = cos_sum / max(cos_n, 1)
    return CutFidelity(
        codec=codec.name, inputs=n, cut_cosine=cut_cos, task=task, primary_measure=primary,
        primary_value=task.get(primary, cut_cos),
        wire_bytes_per_input=wire / n, fp16_bytes_per_input=fp16_bytes / n, raw_bytes_per_input=raw / n,
        ratio_vs_fp16=fp16_bytes / max(wire, 1), ratio_vs_raw=raw / max(wire, 1),
    )


def task_measures(kind: str, refs: list, tests: list, ids: list) -> dict[str, float]:
    """The output measures for a model kind (see the module docstring)."""
    import torch

    if kind == "decoder":
        agree = total = 0
        nll_ref = nll_test = 0.0
        n_nll = 0
        for r, t, x in zip(refs, tests, ids):
            r, t = r.reshape(-1, r.shape[-1]), t.reshape(-1, t.shape[-1])  # (T, V)
            agree += int((r.argmax(-1) == t.argmax(-1)).sum())
            total += r.shape[0]
            if x is not None and x.shape[-1] > 1:
                labels = torch.from_numpy(np.asarray(x).reshape(-1)[1:])
                nll_ref += float(torch.nn.functional.cross_entropy(r[:-1], labels, reduction="sum"))
                nll_test += float(torch.nn.functional.cross_entropy(t[:-1], labels, reduction="sum"))
                n_nll += labels.numel()
        out = {"greedy_agreement": agree / max(total, 1)}
        if n_nll:
            ppl_r, ppl_t = float(np.exp(nll_ref / n_nll)), float(np.exp(nll_test / n_nll))
            out.update({"perplexity_unsplit": ppl_r, "perplexity_codec": ppl_t, "perplexity_change_pct": 100.0 * (ppl_t / ppl_r - 1.0)})
        return out
    r, t = torch.cat(refs), torch.cat(tests)
    if kind == "encoder":
        return {"embedding_cosine": float(torch.nn.functional.cosine_similarity(r, t, dim=-1).mean())}
    return classifier_agreement(r, t)


def classifier_agreement(ref_logits, test_logits, k: int = 5) -> dict[str, float | None]:
    """top-1 agreement, top-k overlap (shared classes / k) and mean KL(p_ref || p_test) of (N, K) logits."""
    import torch

    ref_logits, test_logits = torch.as_tensor(ref_logits).float(), torch.as_tensor(test_logits).float()
    top1 = float((ref_logits.argmax(-1) == test_logits.argmax(-1)).float().mean())
    a, b = ref_logits.topk(k, dim=-1).indices, test_logits.topk(k, dim=-1).indices
    overlap = float((a[:, :, None] == b[:, None, :]).any(-1).float().sum(-1).mean() / k)
    lp, lq = ref_logits.log_softmax(-1), test_logits.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    # inputs the unsplit model is sure of (top-1 probability >= CONFIDENT_P): a flip there is codec
    # damage, not a coin toss between near-equal classes
    confident = lp.exp().max(-1).values >= CONFIDENT_P
    agree = ref_logits.argmax(-1) == test_logits.argmax(-1)
    return {"top1_agreement": top1, f"top{k}_overlap": overlap, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "confident_fraction": float(confident.float().mean()),
            "top1_agreement_confident": float(agree[confident].float().mean()) if bool(confident.any()) else None}
