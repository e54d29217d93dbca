"""Study: what stands between AlignedVQ and cosine >= 0.98 at >= 300x on MiniLM cut 2.

The codec issue's first bar asks for an honest ``ratio_vs_fp32 >= 300`` (about 41 bits per token
with headers and lengths) with a mean sentence-embedding cosine >= 0.98. The benchmark's best row is
anchor + 2x12 bit with the learned adapter (357x, cosine 0.964). This script runs the experiments
that tried to close the gap, on the same data as ``splitnet bench codec`` (calibration: train-split
docstrings + docstring-free stdlib source; evaluation: the first ``--eval-items`` held-out
docstrings), and prints one line per decode:

* ``predictive``: closed-loop prediction. The receiver's context adapter predicts every token's
  feature from the anchors (~ token ids) of the whole sequence; the encoder runs the same adapter and
  vector-quantizes only what it missed (residual VQ on ``x - P(anchors)``).
* ``metric``: the same, in the space of the tail's first-order sensitivity ``M = E[J^T J]`` (J: the
  sentence embedding's Jacobian w.r.t. one token's cut features), so that k-means and the adapter's
  loss weigh errors by what the next stages do with them.
* ``oracle``: upper bounds with exact information the receiver does not have (the per-sequence mean
  of the residual; exact [CLS]/[SEP] features).
* ``tail``: anchor + 2x12 with tables and adapter trained through the frozen next stages
  (``AlignedVQCodec.tune(tail=...)``), MSE + ``--tail-weight`` x (1 - cosine of the embeddings).
* ``order1``: bytes only: anchor codecs with the anchor index Huffman-coded vs range-coded under
  the previous anchor (``entropy="order1"``), and with ``--stages`` > 0 also the residual indices
  range-coded under the anchor (``entropy="context"``), counted as the bench counts them.
* ``conditional``: how many bits a residual stage's index needs under different contexts (fixed
  width, order 0, the previous stage's index, the anchor): ideal PPM-C code lengths on the
  evaluation tokens, from models fitted on the calibration tokens.
* ``seqmean``: ``--contexts`` anchors + ``--stages`` x12, learned; then each sequence's mean decode
  miss added back, exactly (oracle) and as quantized coefficients on the calibration misses'
  principal directions (what ``AlignedVQCodec.fit_sequence_correction`` sends).
* ``contexts``: anchor-only codecs (the ~1000x rows) with ``--contexts`` anchors per frequent token
  id (``anchor_contexts``), closed-form and learned; ``--cut 4`` for the cut where the plain anchor
  row misses the moonshot.

Run: ``python examples/codec_bar_study.py predictive`` (2-core VM: about 5 min; ``tail`` about
10 min). Results and their reading are in docs/codecs.md ("The 300x bar: what was tried").
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _load(args):
    from sklearn.linear_model import LogisticRegression

    from splitnet.bench.data.minilm_features import extract, token_ids
    from splitnet.bench.data.stdlib_docs import load_doc_task
    from splitnet.model import load_model

    task = load_doc_task(n_eval=3000)
    bm = load_model("minilm")
    extra = task.unlabelled_text(args.code_chunks) if args.calibration == "bench" else list(task.code_chunks[: args.code_chunks])
    cal_text = list(task.train_text) + extra
    tr = extract(bm, task.train_text, [args.cut], emb=True, tag="train", progress=True)
    ev = extract(bm, task.eval_text[: args.eval_items], [args.cut], emb=True, tag="eval", progress=True)
    code = extract(bm, extra, [args.cut], emb=False, tag="calibration" if args.calibration == "bench" else "code", progress=True)
    h = f"h{args.cut}"
    labels = np.array(task.train_label)
    if args.dev:  # score on the last --dev train docstrings (a random subset: the task shuffles), kept out of calibration and probe
        n_tr = len(task.train_text) - args.dev
        split = int(np.sum(tr["lens"][:n_tr]))
        probe = LogisticRegression(max_iter=3000, C=10.0).fit(tr["emb"][:n_tr], labels[:n_tr])
        return {
            "bm": bm, "probe": probe, "cut": args.cut,
            "cal": np.concatenate([tr[h][:split], code[h]]), "cal_lens": np.concatenate([tr["lens"][:n_tr], code["lens"]]),
            "cal_ids": token_ids(bm, list(task.train_text[:n_tr]) + extra),
            "x": tr[h][split:], "lens": tr["lens"][n_tr:], "emb": tr["emb"][n_tr:], "y": labels[n_tr:],
        }
    probe = LogisticRegression(max_iter=3000, C=10.0).fit(tr["emb"], labels)
    return {
        "bm": bm, "probe": probe, "cut": args.cut,
        "cal": np.concatenate([tr[h], code[h]]), "cal_lens": np.concatenate([tr["lens"], code["lens"]]),
        "cal_ids": token_ids(bm, cal_text),
        "x": ev[h], "lens": ev["lens"], "emb": ev["emb"], "y": np.array(task.eval_label[: args.eval_items]),
    }


class _Scorer:
    """Sentence-embedding cosine, probe accuracy change and relative token MSE of a decode."""

    def __init__(self, d):
        from splitnet.bench.data.minilm_features import run_tail

        self.d, self.run_tail, self.t0 = d, run_tail, time.perf_counter()
        self.base = d["probe"].predict(d["emb"]) == d["y"]

    def __call__(self, decoded: np.ndarray, name: str, bits: float | None = None) -> None:
        d = self.d
        emb = self.run_tail(d["bm"], d["cut"], decoded, d["lens"])
        cos = float(np.mean(np.sum(emb * d["emb"], axis=1) / np.linalg.norm(emb, axis=1)))
        dacc = 100 * float((d["probe"].predict(emb) == d["y"]).mean() - self.base.mean())
        x = d["x"]
        rel = float(((decoded - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        b = f"{bits:5.1f} bit/tok" if bits is not None else " " * 13
        print(f"{name:58s} {b}  cosine {cos:.4f}  d acc {dacc:+5.2f} pt  rel mse {rel:.4f}  "
              f"[{time.perf_counter() - self.t0:.0f} s]", flush=True)


def _anchor_predictor(d, cal, x, steps: int, max_train: int, tail=None, tail_weight: float = 0.0, stages: int = 0, progress=True):
    """Anchored AlignedVQ (closed-form tables), then tables + context adapter trained on ``cal``."""
    from splitnet.codecs import make_codec

    c = make_codec("alignedvq", stages=stages, nbits=12, refine=0, entropy="huffman", niter=10, max_train=max_train)
    c.fit(cal, progress=progress, anchor_labels=d["cal_ids"]).refine_decoder(cal, 2, progress=progress)
    closed = c.decode(c.encode(x))
    c.tune(cal, d["cal_lens"], steps=steps, tail=tail, tail_weight=tail_weight, batch_tokens=4096 if tail is None else 2048,
           progress=progress)
    return c, closed


def _predict(c, x, lens):
    """What the receiver predicts from the anchors alone: the anchor-only codec's decode
    (adapter over the anchor tables), per sequence."""
    return c.decode(c.encode(x), lengths=lens)


def _residual_rows(score, rc, re_, pred_ev, anchor_bits, max_train, back=lambda v: v, label=""):
    from splitnet.codecs import make_codec

    rvq = make_codec("alignedvq", stages=3, nbits=12, refine=0, niter=10, max_train=max_train).fit(rc, progress=False)
    for s in (1, 2, 3):
        c = rvq.truncated(s).refine_decoder(rc, 2, progress=False)
        p = c.encode(re_)
        score(back(pred_ev + c.decode(p)), f"{label}prediction + residual VQ {s}x12", anchor_bits + 8 * p.nbytes / re_.shape[0])


def predictive(d, args, score):
    c, closed = _anchor_predictor(d, d["cal"], d["x"], args.steps, args.max_train)
    bits = 8 * c.encode(d["x"]).nbytes / d["x"].shape[0]
    score(closed, "anchor only, closed-form tables", bits)
    pe = _predict(c, d["x"], d["lens"])
    score(pe, f"anchor -> context adapter prediction ({args.steps} steps)", bits)
    pc = _predict(c, d["cal"], d["cal_lens"])
    _residual_rows(score, d["cal"] - pc, d["x"] - pe, pe, bits, args.max_train)


def _sensitivity(d, n_seq: int = 256, probes: int = 8) -> np.ndarray:
    """M = E[J^T J] over calibration tokens, J = d(normalised embedding)/d(token features), by
    random projections; the 1/T of mean pooling is undone so long and short texts weigh alike."""
    import torch

    from splitnet.codecs.adapter import pad_sequences
    from splitnet.model.blocks import Stage

    bm, cal, lens = d["bm"], d["cal"], d["cal_lens"]
    tail = bm.stage(d["cut"], bm.num_blocks)
    offs = np.concatenate([[0], np.cumsum(lens)])
    pick = np.random.default_rng(0).choice(len(lens), min(n_seq, len(lens)), replace=False)
    torch.manual_seed(0)
    m_acc, n = torch.zeros(cal.shape[1], cal.shape[1], dtype=torch.float64), 0
    for i in range(0, len(pick), 32):
        idx = pick[i : i + 32]
        padded, real = pad_sequences(np.concatenate([cal[offs[j] : offs[j + 1]] for j in idx]), lens[idx])
        h = torch.from_numpy(padded).requires_grad_(True)  # (B, T, C)
        mask = torch.from_numpy(real.astype(np.int64))  # (B, T)
        emb = Stage.forward.__wrapped__(tail, {"hidden": h, "attention_mask": mask})["embedding"]  # the undecorated forward: gradients on
        for _ in range(probes):
            (g,) = torch.autograd.grad((emb * torch.randn_like(emb)).sum(), h, retain_graph=True)
            g = (g * mask[..., None] * mask.sum(1)[:, None, None])[mask.bool()].double()  # (n_tok, C)
            m_acc += g.T @ g
            n += g.shape[0]
    return (m_acc / n).numpy()


def metric(d, args, score):
    m = _sensitivity(d)
    lam, vec = np.linalg.eigh(m)
    print(f"sensitivity M: largest/median/smallest eigenvalue {lam[-1]:.3g} / {np.median(lam):.3g} / {lam[0]:.3g}")
    lam = 0.95 * lam / lam.mean() + 0.05  # keep every direction a little weight
    mu = d["cal"].mean(0)
    fwd, inv = vec * np.sqrt(lam), (vec / np.sqrt(lam)).T
    to_m = lambda v: ((v - mu) @ fwd).astype(np.float32)  # noqa: E731  Euclidean there = M-weighted here
    back = lambda v: (v @ inv + mu).astype(np.float32)  # noqa: E731
    cal_m, x_m = to_m(d["cal"]), to_m(d["x"])
    c, closed = _anchor_predictor(d, cal_m, x_m, args.steps, args.max_train)
    bits = 8 * c.encode(x_m).nbytes / x_m.shape[0]
    score(back(closed), "M-space: anchor only, closed-form tables", bits)
    pe = _predict(c, x_m, d["lens"])
    score(back(pe), f"M-space: anchor -> context adapter ({args.steps} steps)", bits)
    _residual_rows(score, cal_m - _predict(c, cal_m, d["cal_lens"]), x_m - pe, pe, bits, args.max_train, back, "M-space: ")


def oracle(d, args, score):
    c, _ = _anchor_predictor(d, d["cal"], d["x"], args.steps, args.max_train)
    pe, x, lens = _predict(c, d["x"], d["lens"]), d["x"], d["lens"]
    offs = np.concatenate([[0], np.cumsum(lens)])
    r = x - pe
    seq_mean = np.stack([r[offs[i] : offs[i + 1]].mean(0) for i in range(len(lens))])
    score(pe, "context adapter prediction")
    score(pe + np.repeat(seq_mean, lens, axis=0), "oracle: + exact per-sequence mean of the residual")
    ends = np.concatenate([offs[:-1], offs[1:] - 1])
    fixed = pe.copy()
    fixed[ends] = x[ends]
    score(fixed, "oracle: exact [CLS] and [SEP] features")


def tail(d, args, score):
    from splitnet.model.blocks import Stage

    stage = d["bm"].stage(d["cut"], d["bm"].num_blocks)
    for p in stage.parameters():
        p.requires_grad_(False)
    fn = lambda h, m: Stage.forward.__wrapped__(stage, {"hidden": h, "attention_mask": m})["embedding"]  # noqa: E731
    c, closed = _anchor_predictor(d, d["cal"], d["x"], args.steps, args.max_train, tail=fn, tail_weight=args.tail_weight,
                                  stages=args.stages)
    p = c.encode(d["x"])
    bits = 8 * p.nbytes / d["x"].shape[0]
    name = f"anchor + {args.stages}x12" if args.stages else "anchor only"
    score(closed, f"{name}, closed-form tables", bits)
    score(c.decode(p, lengths=d["lens"]), f"{name}, learned with tail loss x{args.tail_weight} ({args.steps} steps)", bits)


def contexts(d, args, score):
    """Anchor-only codecs with 1 or more context anchors per frequent token id, closed-form and learned."""
    from splitnet.codecs import make_codec

    for n_ctx in args.contexts:
        c = make_codec("alignedvq", stages=0, refine=0, entropy="huffman", niter=10, max_train=args.max_train,
                       anchor_contexts=n_ctx, anchor_context_points=args.context_points)
        c.fit(d["cal"], progress=False, anchor_labels=d["cal_ids"]).refine_decoder(d["cal"], 2, progress=False)
        p = c.encode(d["x"])
        bits = 8 * p.nbytes / d["x"].shape[0]
        label = f"anchors, {n_ctx} context(s) per id >= {2 * args.context_points} tokens ({c.anchor_cb.shape[0]} anchors)"
        score(c.decode(p), f"{label}, closed form", bits)
        c.tune(d["cal"], d["cal_lens"], steps=args.steps, batch_tokens=4096, progress=False)
        score(c.decode(c.encode(d["x"]), lengths=d["lens"]), f"{label}, learned ({args.steps} steps)", bits)
        _bench_ratios(d, c, label)


def _bench_ratios(d, c, label: str) -> None:
    """x fp32 as the bench counts it (messages of 64 sequences, lengths included), Huffman and order-1."""
    from splitnet.bench.codec import _codec_pass
    from splitnet.codecs import make_codec

    fp32 = _codec_pass(make_codec("fp32"), d["x"], d["lens"])["bytes_per_token"]
    rh = _codec_pass(c, d["x"], d["lens"])
    ro = _codec_pass(c.recoded("order1", d["cal"]), d["x"], d["lens"])
    assert np.array_equal(rh["decoded"], ro["decoded"]), "order-1 coding changed a decoded value"
    print(f"{label}: x{fp32 / rh['bytes_per_token']:.1f} fp32 with Huffman anchors, x{fp32 / ro['bytes_per_token']:.1f} with "
          f"order-1 anchors (bench counting; identical decodes)", flush=True)


def order1(d, args, score):
    """Bytes only: anchor codecs (``--contexts`` per id, ``--stages`` residual stages) with the
    anchor index Huffman-coded and order-1 range-coded, per message of 64 sequences and per request,
    as the bench counts them (sequence lengths included). Decodes are identical (checked)."""
    from splitnet.bench.codec import _codec_pass
    from splitnet.codecs import make_codec

    fp32 = _codec_pass(make_codec("fp32"), d["x"], d["lens"])
    for n_ctx in args.contexts:
        c = make_codec("alignedvq", stages=args.stages, nbits=12, refine=0, entropy="huffman", niter=10, max_train=args.max_train,
                       anchor_contexts=n_ctx, anchor_context_points=args.context_points)
        c.fit(d["cal"], progress=False, anchor_labels=d["cal_ids"])
        codes = c.encoder_codes(d["cal"])
        rows = [("huffman", _codec_pass(c, d["x"], d["lens"]))]
        for entropy in ("order1", "context") if args.stages else ("order1",):
            rows.append((entropy, _codec_pass(c.recoded(entropy, codes=codes), d["x"], d["lens"])))
            assert np.array_equal(rows[0][1]["decoded"], rows[-1][1]["decoded"]), f"{entropy} coding changed a decoded value"
        for name, r in rows:
            print(f"{n_ctx} context(s), {c.anchor_cb.shape[0]} anchors + {args.stages}x12, {name:7s}: "
                  f"{8 * r['bytes_per_token']:6.2f} bit/tok  x{fp32['bytes_per_token'] / r['bytes_per_token']:7.1f} fp32  "
                  f"per request x{fp32['bytes_per_token_per_request'] / r['bytes_per_token_per_request']:6.1f}  "
                  f"enc {r['encode_ms']:.2f} ms  dec {r['decode_ms']:.2f} ms per request", flush=True)


def _ppmc_bits(ctx_cal, sym_cal, ctx_ev, sym_ev, n_ctx: int, n_sym: int) -> tuple[float, float]:
    """Mean ideal code length (bits) of ``sym_ev`` under ``ctx_ev`` with the PPM-C model that
    ``splitnet.codecs.order1`` codes with, fitted on the calibration pairs; and the order-0 figure."""
    from splitnet.codecs.order1 import Order1Model

    m = Order1Model.fit(sym_cal, n_sym, ctx_cal, n_ctx)
    order0 = np.log2(m.unigram.sum()) - np.log2(m.unigram[sym_ev])
    return float(m.code_lengths(sym_ev, ctx_ev).mean()), float(order0.mean())


def conditional(d, args, score):
    """Bits per residual index under different contexts (no decoding: ideal code lengths)."""
    from splitnet.codecs import make_codec

    n_ctx = args.contexts[0]
    c = make_codec("alignedvq", stages=args.stages, nbits=12, refine=0, entropy="huffman", niter=10, max_train=args.max_train,
                   anchor_contexts=n_ctx, anchor_context_points=args.context_points)
    c.fit(d["cal"], progress=False, anchor_labels=d["cal_ids"])
    cc, ce = c.encoder_codes(d["cal"]), c.encoder_codes(d["x"])
    a, k = c.anchor_cb.shape[0], 1 << c.nbits
    print(f"{n_ctx} context(s), {a} anchors + {args.stages}x12; bits per index on the evaluation tokens (calibration in brackets)")
    for s in range(1, cc.shape[1]):
        under_anchor, order0 = _ppmc_bits(cc[:, 0], cc[:, s], ce[:, 0], ce[:, s], a, k)
        under_prev, _ = _ppmc_bits(cc[:, s - 1], cc[:, s], ce[:, s - 1], ce[:, s], a if s == 1 else k, k)
        in_sample, _ = _ppmc_bits(cc[:, 0], cc[:, s], cc[:, 0], cc[:, s], a, k)
        print(f"stage {s}: fixed 12  order-0 {order0:.2f}  under the previous index {under_prev:.2f}  "
              f"under the anchor {under_anchor:.2f} ({in_sample:.2f})", flush=True)


def seqmean(d, args, score):
    """8 ctx + ``--stages`` x12, learned; then a per-sequence correction: the mean over a sequence's
    tokens of what the adapted decode misses, exact (oracle) and quantized (PCA of the calibration
    sequences' means, ``k`` components at ``b`` bits, uniform over their calibration range)."""
    from splitnet.codecs import load_codec, make_codec, save_codec
    from splitnet.codecs.sequence_correction import sequence_means as _seq_means

    n_ctx = args.contexts[0]
    path = f"/tmp/study-{n_ctx}ctx-{args.stages}x12-{args.steps}-cut{args.cut}.codec"
    try:
        c = load_codec(path)
        print(f"loaded {path}", flush=True)
    except Exception:
        c = make_codec("alignedvq", stages=args.stages, nbits=12, refine=0, entropy="huffman", niter=10, max_train=args.max_train,
                       anchor_contexts=n_ctx, anchor_context_points=args.context_points)
        c.fit(d["cal"], progress=False, anchor_labels=d["cal_ids"]).refine_decoder(d["cal"], 2, progress=False)
        c.tune(d["cal"], d["cal_lens"], steps=args.steps, batch_tokens=4096, progress=True)
        save_codec(c, path)
    x, lens = d["x"], d["lens"]
    dec = c.decode(c.encode(x), lengths=lens)
    bits = 8 * c.encode(x).nbytes / x.shape[0]
    score(dec, f"{n_ctx} ctx + {args.stages}x12 learned ({args.steps} steps), Huffman bytes", bits)
    rep = np.repeat(np.arange(len(lens)), lens)
    m_ev = _seq_means(x - dec, lens)
    score(dec + m_ev[rep], "  + exact per-sequence mean of the miss (oracle)", None)
    dec_cal = c.decode(c.encode(d["cal"]), lengths=d["cal_lens"])
    m_cal = _seq_means(d["cal"] - dec_cal, d["cal_lens"])
    print(f"  miss energy: held-out {float(((x - dec) ** 2).mean()):.5f} (seq-mean part {float((m_ev[rep] ** 2).mean()):.5f}); "
          f"calibration {float(((d['cal'] - dec_cal) ** 2).mean()):.5f} (seq-mean part {float((m_cal.repeat(d['cal_lens'], 0) ** 2).mean()):.5f})",
          flush=True)
    cov = (m_cal.T.astype(np.float64) @ m_cal) / m_cal.shape[0]
    evals, evecs = np.linalg.eigh(cov)
    u = evecs[:, ::-1].astype(np.float32)
    per_tok = 42.3
    for k, b in ((16, 4), (32, 4), (64, 3), (64, 4), (128, 3)):
        coef_cal, coef_ev = m_cal @ u[:, :k], m_ev @ u[:, :k]
        lo, hi = np.quantile(coef_cal, 0.002, axis=0), np.quantile(coef_cal, 0.998, axis=0)
        step = (hi - lo) / ((1 << b) - 1)
        q = np.clip(np.round((coef_ev - lo) / step), 0, (1 << b) - 1) * step + lo
        score(dec + (q @ u[:, :k].T)[rep], f"  + PCA {k} x {b} bit per sequence (~{k * b / per_tok:.1f} bit/tok)", None)
        score(dec + (coef_ev @ u[:, :k].T)[rep], f"  + PCA {k} exact coefficients (oracle)", None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=["predictive", "metric", "oracle", "tail", "contexts", "order1", "conditional", "seqmean"])
    p.add_argument("--cut", type=int, default=2, help="MiniLM block the features leave (2 or 4)")
    p.add_argument("--contexts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4],
                   help="experiment 'contexts': anchors per frequent token id, comma-separated")
    p.add_argument("--context-points", type=int, default=20, help="experiment 'contexts': calibration tokens per context anchor")
    p.add_argument("--eval-items", type=int, default=1000, help="held-out docstrings scored (the first N of 3000)")
    p.add_argument("--dev", type=int, default=0,
                   help="score on this many train docstrings instead, left out of calibration and of the probe "
                        "(a dev split: choose settings here, not on the held-out docstrings)")
    p.add_argument("--calibration", choices=("study", "bench"), default="study",
                   help="calibration text beside the train docstrings: 'study' = --code-chunks source chunks (the "
                        "docs' tables), 'bench' = as `splitnet bench codec`: other packages' docstrings + the chunks")
    p.add_argument("--stages", type=int, default=2, help="experiments 'tail', 'order1', 'conditional': residual 12-bit stages after the anchor")
    p.add_argument("--code-chunks", type=int, default=800, help="docstring-free source chunks added to the calibration text")
    p.add_argument("--max-train", type=int, default=100_000, help="calibration tokens k-means sees (as the full bench)")
    p.add_argument("--steps", type=int, default=600, help="adapter training steps")
    p.add_argument("--tail-weight", type=float, default=10.0, help="weight of the tail-cosine loss (experiment 'tail')")
    args = p.parse_args()
    d = _load(args)
    print(f"calibration {d['cal'].shape[0]} tokens in {len(d['cal_lens'])} sequences; evaluation {d['x'].shape[0]} tokens "
          f"in {len(d['lens'])} docstrings", flush=True)
    globals()[args.experiment](d, args, _Scorer(d))


if __name__ == "__main__":
    main()
