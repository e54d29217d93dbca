"""lm: stdlib-gpt split into an edge part and a cloud part, each cut codec vs fp16 and cloud-only.

For each cut and codec setting, on text the model never saw (its held-out stdlib files,
:mod:`splitnet.bench.lm_data`), with codecs calibrated on windows of its training files only:

- perplexity, teacher-forced, of the split model against the unsplit model on the same windows;
- greedy agreement over ``--new-tokens`` (32) generated tokens: the split model generates freely
  (its own tokens fed back, KV caches on both sides, one message per decode step), and is compared
  position by position with the unsplit model's greedy continuation of the same prompt (see
  ``definitions`` in the JSON);
- bytes per prompt token in prefill and per decoded token, as framed wire bytes of the forward
  messages the edge sends (:mod:`splitnet.bench.lm_split`), and the codec payload's share of them;
  beside fp16 and the cloud-only baseline (the token ids sent to a cloud stage instead, and the
  raw text bytes), all in the same run.

No timing: see ``splitnet bench e2e`` / ``bench pipeline`` for latency.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

#: codec settings "name[:key=value/key=value]"; ``anchors=1`` is the bench's own key (alignedvq:
#: fit an anchor codebook on the calibration token ids)
DEFAULT_CODECS = ("fp16", "int8", "int4", "topk:k=32", "pq:m=48/nbits=8", "rvq:stages=4/nbits=8", "rvq:stages=8/nbits=8",
                  "rvq:stages=16/nbits=8", "rvq:stages=32/nbits=8", "rvq:stages=40/nbits=8", "alignedvq:stages=8/nbits=8",
                  "alignedvq:stages=4/nbits=8/anchors=1", "alignedvq:stages=8/nbits=8/anchors=1",
                  "alignedvq:stages=32/nbits=8/anchors=1/entropy=context")
QUICK_CODECS = ("fp32", "fp16", "int8", "rvq:stages=2/nbits=6", "alignedvq:stages=2/nbits=6/anchors=1")
DEFAULT_CUTS = (2,)
#: the issue's bar (#17)
GOAL_RATIO_VS_FP16 = 8.0
GOAL_PPL_INCREASE_PCT = 1.0
GOAL_GREEDY = 0.99

DEFINITIONS = {
    "greedy_positional_agreement": "over every prompt and every one of the new_tokens positions: the fraction where the split model's "
                                   "free-running greedy token (its own earlier tokens fed back) equals the unsplit model's greedy token "
                                   "at that position; a divergence counts against every later position that differs",
    "greedy_identical_continuations": "the fraction of prompts whose new_tokens greedy tokens are identical in full",
    "greedy_common_prefix_fraction": "mean over prompts of (length of the common prefix of the two continuations) / new_tokens",
    "unsplit_margin_at_first_divergence": "for the continuations that diverge: the unsplit model's logit margin (top-1 minus "
                                          "top-2, nats) at the first position where the split model chose otherwise; near 0 = a near-tie",
    "greedy_ci95": "1.96 x the standard error of the per-prompt positional agreement over prompts (prompts are the independent units)",
    "teacher_forced_argmax_agreement": "on the perplexity windows, the fraction of positions whose argmax equals the unsplit model's "
                                       "(both fed the same true text)",
    "perplexity_change_pct": "100 x (exp(mean NLL split) / exp(mean NLL unsplit) - 1) over every next-token position of the "
                             "held-out perplexity windows",
    "message_bytes": "bytes of the framed forward message the edge sends (msgpack header incl. the ForwardHeader meta, the codec "
                     "entry and inline parts, plus raw frames): encode_message + message_nbytes, what a socket carries before ZMTP framing",
    "payload_bytes": "the codec payload's share of message_bytes, exact to the byte (runtime.cut_codec.cut_wire_nbytes): the full "
                     "entry under meta.codecs (codec name, codebook hash, shape, part descriptors, under the real tensor name "
                     "'hidden') with its frames, or in a cached request's later steps the compact form meta.cc = [vectors, bytes] "
                     "(key included); what the compact form leaves out was bound by the request's first step, which always "
                     "carries the full entry (codecs.framing)",
    "data_bytes": "the payload's arrays alone (codes, scales): what the quantizer emits, without the entry's codec name, hash, shape",
    "prefill": "the one message of the prompt's prompt_tokens tokens; per prompt token",
    "decode": "one message per decoded token fed back (new_tokens - 1 per prompt; the last token is never fed back); "
              "compact_fraction: the share of them whose codes went in the compact form (single-part codecs without side information)",
    "cloud_only": "the forward message that sends the token ids (int64, as the SDK does) to a cloud stage holding the whole model; "
                  "text_bytes is the raw UTF-8 text instead",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="CI size: 4 prompts of 32 tokens, 4 perplexity windows of 96, 24 calibration windows, fp32/fp16/int8/rvq/alignedvq")
    p.add_argument("--model", default="stdlib-gpt", help="an LM trained by `splitnet train-lm` (default stdlib-gpt)")
    p.add_argument("--cuts", help=f"comma-separated cuts (blocks on the edge) (default {','.join(map(str, DEFAULT_CUTS))})")
    p.add_argument("--codecs", help="comma-separated settings NAME[:KEY=VALUE/KEY=VALUE], e.g. 'int8,rvq:stages=16/nbits=8,"
                                    "alignedvq:stages=8/nbits=8/anchors=1/entropy=context' (default: fp16, int8, int4, topk, pq, rvq, alignedvq)")
    p.add_argument("--prompts", type=int, help="held-out prompts continued greedily (default 128; --quick 4)")
    p.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default 128; --quick 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt (default 32)")
    p.add_argument("--ppl-windows", type=int, help="held-out windows scored teacher-forced (default 64; --quick 4)")
    p.add_argument("--window-tokens", type=int, help="tokens per perplexity / calibration window (default: the model's context; --quick 96)")
    p.add_argument("--calibration-windows", type=int, help="training-text windows the codecs are fitted on (default 800; --quick 24)")
    p.add_argument("--max-train", type=int, default=100_000, help="calibration vectors the k-means / PQ / RVQ fits see (default 100000)")
    p.add_argument("--batch", type=int, default=32, help="prompts / windows per forward (each row is its own request and message; default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads (default 1: the machine is shared)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--seed", type=int, default=0)


def _settings(text: str) -> list[tuple[str, str, dict[str, Any], bool]]:
    """[(setting, codec name, codec config, anchors)]: every name and config checked before any work."""
    from splitnet.bench.codec_specs import parse_codec_spec
    from splitnet.codecs import make_codec

    out = []
    for spec in [s.strip() for s in text.split(",") if s.strip()]:
        name, config = parse_codec_spec(spec)
        anchors = bool(config.pop("anchors", 0))
        if anchors and name != "alignedvq":
            raise ValueError(f"codec setting {spec!r}: anchors=1 applies to alignedvq only")
        if name in ("pq", "rvq", "alignedvq"):
            config.setdefault("max_train", None)
        probe = {k: v for k, v in config.items() if v is not None}
        make_codec(name, **probe)  # unknown names and bad settings fail here
        out.append((spec, name, config, anchors))
    return out


def _r(v, nd=6):
    return round(float(v), nd) if v is not None and math.isfinite(float(v)) else None


def _progress(total: int, disabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench lm", file=sys.stderr, disable=disabled, leave=False)


def _nll(logits, ids: np.ndarray) -> tuple[float, int]:
    import torch

    labels = torch.from_numpy(np.ascontiguousarray(ids[1:], dtype=np.int64))
    return float(torch.nn.functional.cross_entropy(logits[:-1], labels, reduction="sum")), int(labels.numel())


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


def _reference(bm, data, new_tokens: int, batch: int, bar) -> dict[str, Any]:
    """The unsplit model on the held-out windows and prompts (in the same batches as the split model)."""
    from splitnet.bench.lm_split import UnsplitLM, greedy, teacher_forced

    ref = UnsplitLM(bm)
    nll, n, argmax = 0.0, 0, []
    for ws in _batches(data.perplexity, batch):
        logits, _ = teacher_forced(ref, ws)
        for w, lg in zip(ws, logits):
            a, k = _nll(lg, w)
            nll, n = nll + a, n + k
            argmax.append(lg.argmax(-1).numpy())
        bar.update(len(ws))
    continuations, margins = [], []
    for ps in _batches(data.prompts, batch):
        toks, margin, _ = greedy(ref, ps, new_tokens)
        continuations.append(toks)
        margins.append(margin)
        bar.update(len(ps))
    return {"nll": nll, "n": n, "ppl": math.exp(nll / n), "argmax": argmax, "continuations": np.concatenate(continuations),
            "margins": np.concatenate(margins)}


def _cloud_only(data, new_tokens: int, tokenizer) -> dict[str, Any]:
    from splitnet.bench.lm_split import cloud_only_nbytes

    P = data.prompts.shape[1]
    prefill = np.mean([cloud_only_nbytes(P, 0) / P for _ in data.prompts])
    decode = np.mean([cloud_only_nbytes(1, P + i) for i in range(new_tokens - 1)])
    text = np.mean([len(tokenizer.decode(list(p)).encode("utf-8")) / P for p in data.prompts])
    return {"what": "the token ids (int64, as the SDK sends them) in a forward message to a cloud stage holding the whole model",
            "prefill_message_bytes_per_token": _r(prefill, 3), "decode_message_bytes_per_token": _r(decode, 3),
            "text_bytes_per_token": _r(text, 4),
            "text_note": "the prompt's raw UTF-8 bytes, no framing: the least any sender of the text could send"}


def _calibration(bm, cut: int, windows: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float32 cut features of every position of the calibration windows, and their token ids."""
    import torch

    edge = bm.stage(0, cut)
    feats = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            h = edge({"input_ids": torch.from_numpy(windows[i : i + batch])})["hidden"]
            feats.append(h.float().reshape(-1, h.shape[-1]).numpy())
    return np.ascontiguousarray(np.concatenate(feats), dtype=np.float32), windows.reshape(-1)


def _fit(name: str, config: dict, anchors: bool, feats: np.ndarray, labels: np.ndarray, max_train: int):
    from splitnet.codecs import make_codec

    cfg = {k: (max_train if (k == "max_train" and v is None) else v) for k, v in config.items()}
    codec = make_codec(name, **cfg)
    if not codec.needs_fit:
        return codec
    if anchors:
        return codec.fit(feats, progress=False, anchor_labels=labels)
    return codec.fit(feats, progress=False)


def _evaluate(bm, cut: int, codec, data, ref: dict, new_tokens: int, batch: int, bar) -> dict[str, Any]:
    """The split model with ``codec`` on the same windows and prompts as the reference."""
    from splitnet.bench.lm_split import SplitLM, greedy, teacher_forced

    split = SplitLM(bm, cut, codec)
    nll, n, agree, total = 0.0, 0, 0, 0
    cos_sum, cos_n = 0.0, 0
    ppl_payload, ppl_tokens = 0, 0
    refs = iter(ref["argmax"])
    for ws in _batches(data.perplexity, batch):
        logits, sent = teacher_forced(split, ws)
        for w, lg, s in zip(ws, logits, sent):
            ref_argmax = next(refs)
            a, k = _nll(lg, w)
            nll, n = nll + a, n + k
            agree += int((lg.argmax(-1).numpy() == ref_argmax).sum())
            total += ref_argmax.size
            ppl_payload, ppl_tokens = ppl_payload + s.payload_nbytes, ppl_tokens + s.tokens
        x, y = split.last_cut
        cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
        cos_sum, cos_n = cos_sum + float(cos.sum()), cos_n + cos.size
        bar.update(len(ws))
    per_prompt, identical, prefix = [], 0, []
    pre_msg, pre_pay, pre_dat, dec_msg, dec_pay, dec_dat, dec_n, dec_compact, dec_steps = [], [], [], 0, 0, 0, 0, 0, 0
    wants = iter(zip(ref["continuations"], ref["margins"]))
    split_margins = []  # the unsplit model's margin where each continuation first leaves it
    for ps in _batches(data.prompts, batch):
        toks, _, sents = greedy(split, ps, new_tokens)
        for got, sent in zip(toks, sents):
            want, margin = next(wants)
            eq = got == want
            per_prompt.append(float(eq.mean()))
            identical += int(eq.all())
            prefix.append(int(np.argmin(eq)) if not eq.all() else eq.size)
            if not eq.all():
                split_margins.append(float(margin[int(np.argmin(eq))]))
            pre_msg.append(sent[0].message_nbytes / sent[0].tokens)
            pre_pay.append(sent[0].payload_nbytes / sent[0].tokens)
            pre_dat.append(sent[0].data_nbytes / sent[0].tokens)
            for s in sent[1:]:
                dec_msg, dec_pay, dec_n = dec_msg + s.message_nbytes, dec_pay + s.payload_nbytes, dec_n + s.tokens
                dec_dat += s.data_nbytes
                dec_compact, dec_steps = dec_compact + int(s.compact), dec_steps + 1
        bar.update(len(ps))
    ppl = math.exp(nll / n)
    pp = np.asarray(per_prompt)
    ci = 1.96 * pp.std(ddof=1) / math.sqrt(pp.size) if pp.size > 1 else float("nan")
    return {
        "cut_cosine": _r(cos_sum / max(cos_n, 1)),
        "perplexity": {"unsplit": _r(ref["ppl"]), "split": _r(ppl), "change_pct": _r(100.0 * (ppl / ref["ppl"] - 1.0), 4)},
        "teacher_forced_argmax_agreement": _r(agree / max(total, 1)),
        "greedy": {"positional_agreement": _r(pp.mean()), "ci95": _r(ci), "identical_continuations": _r(identical / len(pp)),
                   "common_prefix_fraction": _r(np.mean(prefix) / new_tokens), "prompts": int(pp.size), "new_tokens": new_tokens,
                   "unsplit_margin_at_first_divergence": {"median": _r(np.median(split_margins), 4) if split_margins else None,
                                                          "max": _r(max(split_margins), 4) if split_margins else None}},
        "bytes": {
            "prefill": {"message_per_token": _r(np.mean(pre_msg), 3), "payload_per_token": _r(np.mean(pre_pay), 3),
                        "data_per_token": _r(np.mean(pre_dat), 3)},
            "decode": {"message_per_token": _r(dec_msg / max(dec_n, 1), 3), "payload_per_token": _r(dec_pay / max(dec_n, 1), 3),
                       "data_per_token": _r(dec_dat / max(dec_n, 1), 3), "compact_fraction": _r(dec_compact / max(dec_steps, 1), 4)},
            "perplexity_windows_payload_per_token": _r(ppl_payload / max(ppl_tokens, 1), 3),
        },
    }


def _ratios(row: dict, fp16: dict, cloud: dict) -> None:
    b, f = row["bytes"], fp16["bytes"]
    row["ratio_vs_fp16"] = {f"{phase}_{kind}": _r(f[phase][f"{kind}_per_token"] / max(b[phase][f"{kind}_per_token"], 1e-9), 3)
                            for phase in ("prefill", "decode") for kind in ("data", "payload", "message")}
    row["vs_cloud_only_message"] = {phase: _r(b[phase]["message_per_token"] / cloud[f"{phase}_message_bytes_per_token"], 3)
                                    for phase in ("prefill", "decode")}
    ok_fid = (row["perplexity"]["change_pct"] <= GOAL_PPL_INCREASE_PCT and row["greedy"]["positional_agreement"] >= GOAL_GREEDY)
    rv = row["ratio_vs_fp16"]
    row["meets_fidelity_bar"] = bool(ok_fid)
    row["meets_bar"] = bool(ok_fid and rv["prefill_payload"] >= GOAL_RATIO_VS_FP16 and rv["decode_payload"] >= GOAL_RATIO_VS_FP16)
    row["meets_bar_in_prefill"] = bool(ok_fid and rv["prefill_payload"] >= GOAL_RATIO_VS_FP16)
    row["meets_bar_framed"] = bool(ok_fid and rv["prefill_message"] >= GOAL_RATIO_VS_FP16 and rv["decode_message"] >= GOAL_RATIO_VS_FP16)
    row["meets_bar_on_data_bytes_only"] = bool(ok_fid and rv["prefill_data"] >= GOAL_RATIO_VS_FP16 and rv["decode_data"] >= GOAL_RATIO_VS_FP16)


def _pareto(rows: list[dict]) -> None:
    """Mark, per cut, the settings no other setting beats on both decode payload bytes and greedy agreement."""
    for r in rows:
        b, g = r["bytes"]["decode"]["payload_per_token"], r["greedy"]["positional_agreement"]
        r["pareto"] = not any(o is not r and o["split_after"] == r["split_after"] and o["bytes"]["decode"]["payload_per_token"] <= b
                              and o["greedy"]["positional_agreement"] >= g
                              and (o["bytes"]["decode"]["payload_per_token"] < b or o["greedy"]["positional_agreement"] > g) for o in rows)


def alignedvq_place(rows: list[dict]) -> list[dict]:
    """Each AlignedVQ row against the best other codec at its cut that sends no more payload bytes
    per token (within 5 %), in prefill and per decoded token: which has the higher greedy agreement
    (beyond both 95 % intervals), with the teacher-forced argmax agreement and perplexity of both."""
    out = []
    for r in rows:
        if r["codec"] != "alignedvq":
            continue
        entry: dict[str, Any] = {"split_after": r["split_after"], "setting": r["setting"], "greedy": r["greedy"]["positional_agreement"],
                                 "ci95": r["greedy"]["ci95"], "teacher_forced_argmax_agreement": r["teacher_forced_argmax_agreement"],
                                 "ppl_change_pct": r["perplexity"]["change_pct"]}
        for phase in ("prefill", "decode"):
            mine = r["bytes"][phase]["payload_per_token"]
            rivals = [o for o in rows if o["codec"] not in ("alignedvq", "fp32") and o["split_after"] == r["split_after"]
                      and o["bytes"][phase]["payload_per_token"] <= 1.05 * mine]
            e: dict[str, Any] = {"payload_per_token": mine}
            if not rivals:
                e.update(best_baseline=None, verdict="no baseline at or under these bytes")
            else:
                best = max(rivals, key=lambda o: (o["greedy"]["positional_agreement"], o["teacher_forced_argmax_agreement"]))
                d = r["greedy"]["positional_agreement"] - best["greedy"]["positional_agreement"]
                noise = math.hypot(r["greedy"]["ci95"] or 0.0, best["greedy"]["ci95"] or 0.0)
                verdict = "beats" if d > noise else "loses to" if -d > noise else "level with (within the 95 % intervals)"
                e.update(best_baseline=best["setting"], baseline_payload_per_token=best["bytes"][phase]["payload_per_token"],
                         baseline_greedy=best["greedy"]["positional_agreement"],
                         baseline_teacher_forced_argmax_agreement=best["teacher_forced_argmax_agreement"],
                         baseline_ppl_change_pct=best["perplexity"]["change_pct"], verdict=f"{verdict} {best['setting']}")
            entry[phase] = e
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from splitnet.bench.lm_data import lm_data, python_matches
    from splitnet.codecs.vq import faiss_module
    from splitnet.errors import ConfigError
    from splitnet.model import load_model

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    faiss_module().omp_set_num_threads(max(1, args.threads))
    q = args.quick
    try:
        settings = _settings(args.codecs or ",".join(QUICK_CODECS if q else DEFAULT_CODECS))
    except ValueError as e:
        raise ConfigError(f"--codecs: {e}") from e
    if not any(name == "fp16" for _, name, _, _ in settings):
        settings.insert(0, ("fp16", "fp16", {}, False))  # the baseline is always measured in the same run
    cuts = [int(c) for c in args.cuts.split(",")] if args.cuts else list(DEFAULT_CUTS)
    bm = load_model(args.model)
    if bm.kind != "decoder":
        raise ConfigError(f"bench lm needs a decoder LM; {args.model} is a {bm.kind} model")
    if any(not 0 < c < bm.num_blocks for c in cuts):
        raise ConfigError(f"--cuts must be in 1..{bm.num_blocks - 1} for {args.model}, got {cuts}")
    context = int(bm.arch.config.get("n_positions", 256))
    n_prompts = args.prompts or (4 if q else 128)
    P = args.prompt_tokens or (32 if q else 128)
    W = args.window_tokens or (min(96, context) if q else context)
    if P + args.new_tokens > context or W > context or P < 1 or args.new_tokens < 2:
        raise ConfigError(f"prompt tokens ({P}) + new tokens ({args.new_tokens}) and window tokens ({W}) must fit the model's "
                          f"context of {context}, with at least 2 new tokens")
    data = lm_data(bm, context_tokens=W, calibration_windows=args.calibration_windows or (24 if q else 800),
                   perplexity_windows=args.ppl_windows or (4 if q else 64), prompts=n_prompts, prompt_tokens=P, seed=args.seed)
    shared = sorted(set(data.calibration_files) & set(data.evaluation_files))
    if shared:  # by construction impossible; checked because every fidelity figure depends on it
        raise ConfigError(f"calibration and evaluation share files {shared[:5]}")

    per_codec = len(data.perplexity) + len(data.prompts)
    bar = _progress(per_codec * (1 + len(cuts) * len(settings)), args.no_progress)
    ref = _reference(bm, data, args.new_tokens, args.batch, bar)
    cloud = _cloud_only(data, args.new_tokens, bm.tokenizer)
    rows: list[dict] = []
    for cut in cuts:
        needs_fit = any(_needs_fit(name) for _, name, _, _ in settings)
        feats, labels = _calibration(bm, cut, data.calibration) if needs_fit else (None, None)
        fp16_row = None
        cut_rows = []
        nested = _nested_rvq(settings)
        fitted: dict[str, Any] = {}
        for spec, name, config, anchors in settings:
            bar.set_postfix_str(f"cut {cut} {spec}")
            t0 = time.perf_counter()
            parent = nested.get(spec)
            if parent is not None:  # residual codebooks are nested: the first S codebooks of a deeper fit
                if parent not in fitted:
                    _, pname, pconfig, _ = next(x for x in settings if x[0] == parent)
                    fitted[parent] = _fit(pname, pconfig, False, feats, labels, args.max_train)
                codec = fitted[parent] if parent == spec else fitted[parent].truncated(int(config.get("stages", 2)))
            else:
                codec = _fit(name, config, anchors, feats, labels, args.max_train)
            fit_s = time.perf_counter() - t0
            row = {"split_after": cut, "setting": spec, "codec": name, "config": codec.state()[1], "anchors": anchors,
                   "fitted_as": f"the first {config.get('stages', 2)} codebooks of the {parent} fit" if parent not in (None, spec) else "its own fit",
                   "calibration_vectors": int(feats.shape[0]) if codec.needs_fit else 0, "fit_s": round(fit_s, 2),
                   **_evaluate(bm, cut, codec, data, ref, args.new_tokens, args.batch, bar)}
            row["eval_s"] = round(time.perf_counter() - t0 - fit_s, 2)
            if name == "fp16" and fp16_row is None:
                fp16_row = row
            cut_rows.append(row)
        for row in cut_rows:
            _ratios(row, fp16_row, cloud)
        rows.extend(cut_rows)
    bar.close()
    _pareto(rows)
    meeting = [r for r in rows if r["meets_bar"]]
    by_ratio = sorted((r for r in rows if min(r["ratio_vs_fp16"]["prefill_payload"], r["ratio_vs_fp16"]["decode_payload"]) >= GOAL_RATIO_VS_FP16),
                      key=lambda r: -r["greedy"]["positional_agreement"])
    return {
        "config": {"quick": bool(q), "model": args.model, "cuts": cuts, "codecs": [s for s, _, _, _ in settings], "prompts": n_prompts,
                   "prompt_tokens": P, "new_tokens": args.new_tokens, "perplexity_windows": len(data.perplexity), "window_tokens": W,
                   "calibration_windows": len(data.calibration), "max_train": args.max_train, "batch": args.batch, "threads": args.threads, "seed": args.seed},
        "data": {
            "calibration": f"{len(data.calibration)} windows of {W} tokens from the model's TRAINING files (train_lm's split, "
                           f"holdout_every={data.holdout_every}); codecs are fitted on their cut features only",
            "evaluation": f"{len(data.perplexity)} perplexity windows of {W} tokens and {len(data.prompts)} prompts of {P} tokens from "
                          "the model's HELD-OUT files (never trained on, never calibrated on)",
            "calibration_files": data.calibration_files, "evaluation_files": data.evaluation_files,
            "files_shared_by_calibration_and_evaluation": shared, "stdlib_root": data.stdlib_root,
            "model_trained_on_python": data.trained_python, "same_python_as_training": python_matches(data),
        },
        "definitions": DEFINITIONS,
        "reference_unsplit": {"perplexity": _r(ref["ppl"]), "positions_scored": ref["n"],
                              "greedy_margin_quantiles": {f"p{q}": _r(np.percentile(ref["margins"], q), 4) for q in (1, 5, 10, 50)},
                              "greedy_positions_with_margin_under_0.1": _r(float((ref["margins"] < 0.1).mean()), 4)},
        "baseline_cloud_only": cloud,
        "results": rows,
        "goal": {
            "bar": f">= {GOAL_RATIO_VS_FP16:g}x fewer bytes than fp16 (codec payload, in prefill and in decode), perplexity increase "
                   f"<= {GOAL_PPL_INCREASE_PCT:g} %, greedy positional agreement >= {GOAL_GREEDY:.0%} over {args.new_tokens} tokens",
            "met_by": [f"cut {r['split_after']} {r['setting']}" for r in meeting],
            "met_in_prefill_by": [f"cut {r['split_after']} {r['setting']}" for r in rows if r["meets_bar_in_prefill"]],
            "met_with_framed_message_bytes_by": [f"cut {r['split_after']} {r['setting']}" for r in rows if r["meets_bar_framed"]],
            "met_on_data_bytes_only_by": [f"cut {r['split_after']} {r['setting']}" for r in rows if r["meets_bar_on_data_bytes_only"]],
            "levels": "met_by counts the codec payload (its exact bytes in the forward message: full entry or compact codes) in prefill and per decoded token; met_in_prefill_by the prefill "
                      "payload only; met_with_framed_message_bytes_by whole forward messages; met_on_data_bytes_only_by leaves out the "
                      "payload's entry (codec name, hash, shape): NOT the bar, shown for what the quantizer alone achieves",
            "best_greedy_at_8x": [{"setting": f"cut {r['split_after']} {r['setting']}", "greedy": r["greedy"]["positional_agreement"],
                                    "ci95": r["greedy"]["ci95"], "ppl_change_pct": r["perplexity"]["change_pct"],
                                    "ratio_decode_payload": r["ratio_vs_fp16"]["decode_payload"]} for r in by_ratio[:5]],
        },
        "alignedvq_place": alignedvq_place(rows),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }


def _nested_rvq(settings) -> dict[str, str]:
    """rvq settings that differ only in ``stages`` -> the deepest of them: faiss trains residual
    codebooks one stage at a time on what the earlier ones leave, so the first S codebooks of a
    deeper fit are the S-stage codec (:meth:`RVQCodec.truncated`), and one fit serves them all."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for spec, name, config, _ in settings:
        if name == "rvq":
            key = repr(sorted((k, v) for k, v in config.items() if k != "stages"))
            groups.setdefault(key, []).append((int(config.get("stages", 2)), spec))
    out = {}
    for members in groups.values():
        deepest = max(members)[1]
        out.update({spec: deepest for _, spec in members})
    return out


def _needs_fit(name: str) -> bool:
    from splitnet.codecs.registry import codec_class

    return codec_class(name).needs_fit


def summarize(doc: dict) -> str:
    c, b = doc["config"], doc["baseline_cloud_only"]
    lines = [f"bench lm ({'quick' if c['quick'] else 'full'}) {c['model']}: {c['prompts']} held-out prompts x {c['new_tokens']} greedy "
             f"tokens, {c['perplexity_windows']} windows; unsplit ppl {doc['reference_unsplit']['perplexity']:.4f}; {doc['elapsed_s']:.0f} s",
             f"cloud-only: prefill {b['prefill_message_bytes_per_token']:.1f} B/token, decode {b['decode_message_bytes_per_token']:.1f} "
             f"B/token (text {b['text_bytes_per_token']:.2f} B/token)",
             f"{'cut setting':52s} prefill B/tok: msg (payload) x fp16 | decode B/tok: msg (payload) x fp16 | ppl %   TF argmax  greedy (ci95) identical"]
    for r in doc["results"]:
        by, g, x = r["bytes"], r["greedy"], r["ratio_vs_fp16"]
        lines.append(f"{r['split_after']:3d} {r['setting']:48s} {by['prefill']['message_per_token']:7.1f} ({by['prefill']['payload_per_token']:6.1f}) "
                     f"{x['prefill_payload']:5.1f} | {by['decode']['message_per_token']:6.1f} ({by['decode']['payload_per_token']:6.1f}) "
                     f"{x['decode_payload']:5.1f} | {r['perplexity']['change_pct']:+7.3f} {r['teacher_forced_argmax_agreement']:.5f} "
                     f"{g['positional_agreement']:.4f} ({g['ci95']:.4f}) {g['identical_continuations']:.3f}"
                     f"{'  BAR' if r['meets_bar'] else '  BAR in prefill' if r['meets_bar_in_prefill'] else ''}{'  pareto' if r['pareto'] else ''}")
    goal = doc["goal"]
    lines.append(f"bar ({goal['bar']}): {goal['met_by'] or 'not met'}; in prefill: {goal['met_in_prefill_by'] or 'not met'}")
    for a in doc["alignedvq_place"]:
        lines.append(f"alignedvq cut {a['split_after']} {a['setting']}: prefill {a['prefill']['verdict']}; decode {a['decode']['verdict']}")
    return "\n".join(lines)
