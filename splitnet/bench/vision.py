"""vision: EfficientNet-Lite0 (real ImageNet weights) split at a cut, each codec vs sending the image.

On held-out 224x224 crops of the bundled photos (:mod:`splitnet.bench.photos`: whole photos never
seen at calibration, and unseen crops of the others), for each cut and codec: bytes on the wire
per image (every byte of the payload, :attr:`Payload.nbytes`) against the JPEG q90 of the same
224x224 crop (what cloud-only sends; the issue's bar is a percentage of it) and against fp16, the
cosine at the cut, and the output's top-1 agreement, top-5 overlap and KL against the unsplit
model, on all held-out crops and on the crops the unsplit model is sure of (top-1 p >= 0.5).

The baselines a user would pick instead are measured in the same run: cloud-only with the image as
JPEG and WebP at several qualities (the model run on the decoded image against the model on the
original pixels), so every split row also names the best image codec at or under its bytes. Each
cut reports the share of the model's multiply-accumulates that runs on the edge (a cut after
almost all of them is edge-only in disguise). Fitted codecs are calibrated on the calibration crops
only; ``transform`` codecs with ``metric=fisher`` get the tail's Fisher metric, also estimated on
the calibration crops (:mod:`splitnet.codecs.sensitivity`). No timing here (see
``splitnet bench e2e`` for latency over shaped links).
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time

import numpy as np

from splitnet.bench.codec_specs import parse_codec_spec, split_codec_specs

#: codec settings "name[:key=value,...]" in the default and the quick run
DEFAULT_CODECS = ("fp16", "int8", "int4", "pq:m=24,nbits=4", "rvq:stages=4,nbits=8", "rvq:stages=8,nbits=8", "alignedvq:stages=4,nbits=8",
                  "transform:step=0.5", "transform:step=1", "transform:step=1.5", "transform:step=2", "transform:step=3")
QUICK_CODECS = ("fp16", "int8", "pq:m=8,nbits=6", "transform:step=2")
DEFAULT_CUTS = (12, 15)
DEFAULT_JPEG_QUALITIES = (10, 30, 50, 90)
DEFAULT_WEBP_QUALITIES = (0, 10, 50)
#: the issue's bar: cut bytes <= 5 % of the JPEG q90 at >= 99 % top-1 agreement
GOAL_BYTES_PCT_OF_JPEG = 5.0
GOAL_TOP1 = 0.99


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CI size: 6 crops per photo, cut 15, fp16/int8/pq/transform, 3 image points (about a minute on 2 cores)")
    p.add_argument("--cuts", help=f"comma-separated cuts (blocks on the edge), 1..15 (default {','.join(map(str, DEFAULT_CUTS))}; --quick 15)")
    p.add_argument("--codecs", help="comma-separated settings NAME[:KEY=VALUE/...] with '/' or ',' between keys, e.g. 'int8,pq:m=16/nbits=8,transform:step=1.5' "
                                    f"(default: {', '.join(DEFAULT_CODECS)})")
    p.add_argument("--per-source", type=int, help="crops per photo (default 90: 1,170 crops; --quick 6)")
    p.add_argument("--held-out-fraction", type=float, default=0.25, help="crops of the calibration photos held out too (default 0.25)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="the JPEG quality the bar is a percentage of (default 90)")
    p.add_argument("--jpeg-qualities", help=f"cloud-only JPEG qualities measured (default {','.join(map(str, DEFAULT_JPEG_QUALITIES))}; --jpeg-quality is always one)")
    p.add_argument("--webp-qualities", help=f"cloud-only WebP qualities measured (default {','.join(map(str, DEFAULT_WEBP_QUALITIES))}; 'none' for none)")
    p.add_argument("--fisher-samples", type=int, default=4, help="labels sampled per calibration crop for the Fisher metric (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _ints(text: str | None, default: tuple[int, ...], what: str) -> list[int]:
    from splitnet.errors import ConfigError

    if text is None:
        return list(default)
    if text.strip().lower() == "none":
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def _r(v):
    return round(v, 6) if isinstance(v, float) else v


def image_codec(rgb: np.ndarray, fmt: str, quality: int) -> tuple[int, np.ndarray]:
    """(bytes of ``rgb`` (H, W, 3) uint8 as ``fmt`` ("JPEG" or "WEBP") at ``quality``, the decoded RGB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=quality)
    data = buf.getvalue()
    return len(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg(rgb: np.ndarray, quality: int) -> tuple[int, np.ndarray]:
    """(bytes of the JPEG at ``quality``, the decoded RGB) of an (H, W, 3) uint8 image."""
    return image_codec(rgb, "JPEG", quality)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vision", unit="crop", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _cut_pass(bm, cuts: list[int], crops, batch_size: int, bar, keep_refs: bool):
    """One pass of the edge blocks over ``crops``: the features at every cut ((N, T, C) float32 per
    cut) and the unsplit model's logits (the tail after the deepest cut), computed in chunks."""
    import torch

    from splitnet.bench import photos as P

    bounds = [0, *cuts]
    stages = [bm.stage(a, b) for a, b in zip(bounds, bounds[1:])]
    tail = bm.stage(cuts[-1], bm.num_blocks)
    feats: dict[int, list[np.ndarray]] = {c: [] for c in cuts}
    logits = []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            h = {"pixel_values": torch.from_numpy(P.pixel_values(crops[i : i + batch_size]))}
            for st, c in zip(stages, cuts):
                h = {"hidden": st(h)["hidden"]}
                feats[c].append(h["hidden"].float().numpy())
            if keep_refs:
                logits.append(tail(h)["logits"].float())
            bar.update(len(crops[i : i + batch_size]))
    return {c: np.concatenate(v) for c, v in feats.items()}, (torch.cat(logits) if keep_refs else None)


def _image_baselines(full, held_pixels: list[np.ndarray], ref_logits, points: list[tuple[str, int]], bar) -> tuple[list[dict], list[list[int]]]:
    """Cloud-only: each (format, quality) of every held-out crop, the unsplit model on the decoded
    image; and the bytes of every crop at every point."""
    import torch

    from splitnet.codecs.fidelity import classifier_agreement
    from splitnet.model.efficientnet import to_pixel_values

    out, per_image = [], []
    for fmt, q in points:
        nbytes, logits = [], []
        with torch.no_grad():
            for i in range(0, len(held_pixels), 32):
                coded = [image_codec(px, fmt, q) for px in held_pixels[i : i + 32]]
                nbytes.extend(n for n, _ in coded)
                x = torch.from_numpy(np.stack([to_pixel_values(d) for _, d in coded]))
                logits.append(full({"pixel_values": x})["logits"].float())
                bar.update(len(coded))
        b = np.asarray(nbytes, dtype=np.float64)
        per_image.append(nbytes)
        out.append({"format": fmt.lower(), "quality": q, "what": f"the 224x224 crop as {fmt} q{q} (PIL), the whole model in the cloud",
                    "bytes_per_image_mean": round(float(b.mean()), 1), "bytes_per_image_p50": float(np.median(b)),
                    "bytes_per_image_max": int(b.max()),
                    "fidelity": {k: _r(v) for k, v in classifier_agreement(ref_logits, torch.cat(logits)).items()}})
    return out, per_image


def _best_image_within(images: list[dict], nbytes: float) -> dict | None:
    """The cloud-only point with the highest top-1 agreement among those at or under ``nbytes`` per image."""
    fits = [b for b in images if b["bytes_per_image_mean"] <= nbytes]
    if not fits:
        return None
    b = max(fits, key=lambda b: (b["fidelity"]["top1_agreement"], -b["fidelity"]["kl_mean"]))
    return {"what": f"{b['format']} q{b['quality']}", "bytes_per_image_mean": b["bytes_per_image_mean"],
            "top1_agreement": b["fidelity"]["top1_agreement"], "top1_agreement_confident": b["fidelity"]["top1_agreement_confident"],
            "kl_mean": b["fidelity"]["kl_mean"]}


def wilson95(agree: float | None, n: int) -> list[float] | None:
    """The 95 % Wilson score interval [lo, hi] of a proportion ``agree`` measured on ``n`` inputs."""
    if agree is None or n <= 0:
        return None
    z2 = 1.959964**2
    mid = (agree + z2 / (2 * n)) / (1 + z2 / n)
    half = (z2**0.5 / (1 + z2 / n)) * ((agree * (1 - agree) / n + z2 / (4 * n * n)) ** 0.5)
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def _pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, bytes, loss) points no other point beats on both (fewer bytes, lower loss)."""
    keep = []
    for name, b, loss in sorted(points, key=lambda p: (p[1], p[2])):
        if not keep or loss < keep[-1][2]:
            keep.append((name, b, loss))
    return [n for n, _, _ in keep]


def run(args: argparse.Namespace) -> dict:
    from splitnet.bench import photos as P
    from splitnet.codecs import make_codec
    from splitnet.codecs.fidelity import CutFeatures, evaluate_codec
    from splitnet.codecs.sensitivity import output_fisher
    from splitnet.errors import ConfigError
    from splitnet.model import load_model

    t_start = time.perf_counter()
    cuts = sorted({int(c) for c in args.cuts.split(",")}) if args.cuts else ([15] if args.quick else list(DEFAULT_CUTS))
    specs = split_codec_specs(args.codecs) if args.codecs else list(QUICK_CODECS if args.quick else DEFAULT_CODECS)
    per_source = args.per_source or (6 if args.quick else 90)
    jpeg_q = _ints(args.jpeg_qualities, (10, 90) if args.quick else DEFAULT_JPEG_QUALITIES, "--jpeg-qualities")
    webp_q = _ints(args.webp_qualities, (10,) if args.quick else DEFAULT_WEBP_QUALITIES, "--webp-qualities")
    if not 1 <= args.jpeg_quality <= 100 or any(not 0 <= q <= 100 for q in jpeg_q + webp_q):
        raise ConfigError(f"image qualities must be 0..100 (--jpeg-quality 1..100), got {args.jpeg_quality}, {jpeg_q}, {webp_q}")
    if per_source < 2 or args.fisher_samples < 1:
        raise ConfigError(f"--per-source must be >= 2 and --fisher-samples >= 1, got {per_source}, {args.fisher_samples}")
    jpeg_q = sorted(set(jpeg_q) | {args.jpeg_quality})
    try:
        codecs = [(s, *parse_codec_spec(s)) for s in specs]
        probes = [make_codec(name, **config) for _, name, config in codecs]  # unknown names and bad settings fail here, before any work
    except ValueError as e:
        raise ConfigError(f"--codecs: {e}") from e
    bm = load_model("efficientnet-lite0")
    if any(not 0 < c < bm.num_blocks for c in cuts):
        raise ConfigError(f"--cuts must be in 1..{bm.num_blocks - 1}, got {cuts}")
    needs_fit = any(c.needs_fit for c in probes)
    needs_fisher = any(getattr(c, "metric", None) == "fisher" for c in probes)

    crops = P.photo_crops(per_source=per_source, seed=args.seed)
    cal, held = P.split_crops(crops, held_out_fraction=args.held_out_fraction, seed=args.seed)
    points = [("JPEG", q) for q in jpeg_q] + [("WEBP", q) for q in webp_q]
    work = len(held) * (1 + len(points) + len(cuts) * len(codecs)) + (len(cal) if needs_fit else 0) + (len(cal) * len(cuts) if needs_fisher else 0)
    bar = _progress(work, not args.no_progress)

    bar.set_postfix_str("features of the held-out crops")
    held_maps, ref_logits = _cut_pass(bm, cuts, held, 32, bar, keep_refs=True)
    held_pixels = [P.crop_pixels(c) for c in held]
    bar.set_postfix_str("cloud-only image codecs")
    images, image_bytes = _image_baselines(bm.full(), held_pixels, ref_logits, points, bar)
    del held_pixels
    i_base = points.index(("JPEG", args.jpeg_quality))
    base, raw_bytes = images[i_base], image_bytes[i_base]
    jpeg_mean = base["bytes_per_image_mean"]
    n_confident = int(round(base["fidelity"]["confident_fraction"] * len(held)))
    cal_maps = {}
    if needs_fit:
        bar.set_postfix_str("features of the calibration crops")
        cal_maps, _ = _cut_pass(bm, cuts, cal, 32, bar, keep_refs=False)

    rows: list[dict] = []
    skipped: list[dict] = []
    sensitivity: dict[int, dict] = {}
    for cut in cuts:
        side, _, ch = bm.arch.cut_shape(cut)
        feats = [CutFeatures(held_maps[cut][i : i + 1], {}, ref_logits[i : i + 1], None, raw_bytes[i]) for i in range(len(held))]
        cal_vectors = np.ascontiguousarray(cal_maps[cut].reshape(-1, ch)) if needs_fit else None
        sens = None
        if needs_fisher:
            bar.set_postfix_str(f"cut {cut}: Fisher metric on the calibration crops")
            t0 = time.perf_counter()
            sens = output_fisher(bm, cut, cal_maps[cut], samples=args.fisher_samples, seed=args.seed, progress=bar)
            sensitivity[cut] = {"inputs": sens.inputs, "samples_per_input": sens.samples_per_input, "s": round(time.perf_counter() - t0, 1),
                                "dc_weight": round(float(sens.frequency_weights[0]), 3)}
        for spec, name, config in codecs:
            codec = make_codec(name, **config)
            if name == "pq" and ch % int(config.get("m", 8)):
                skipped.append({"split_after": cut, "setting": spec, "why": f"pq m={config.get('m', 8)} does not divide the {ch} channels"})
                bar.update(len(held))
                continue
            bar.set_postfix_str(f"cut {cut}: {spec}")
            t0 = time.perf_counter()
            if name == "learned":  # distilled through the frozen tail, on the calibration maps only
                codec.fit(cal_maps[cut], progress=False, tail=bm.stage(cut, bm.num_blocks), channel_metric=sens.channel_metric,
                          frequency_weights=sens.frequency_weights)
            elif name == "transform":
                kw = {}
                if codec.metric == "fisher":
                    kw = {"channel_metric": sens.channel_metric, **({"frequency_weights": sens.frequency_weights} if codec.spatial == "dct" else {})}
                codec.fit(cal_maps[cut], progress=False, **kw)
            elif codec.needs_fit:
                codec.fit(cal_vectors, progress=False)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate_codec(bm, cut, codec, feats, progress=bar)
            eval_s = time.perf_counter() - t0
            pct = 100.0 * res.wire_bytes_per_input / jpeg_mean
            fid = {k: _r(v) for k, v in res.task.items()}
            rows.append({
                "split_after": cut, "cut_map": [side, side, ch], "edge_macs_pct": round(100 * bm.arch.edge_macs_fraction(cut), 1),
                "codec": name, "setting": spec, "config": codec.state()[1],
                "wire_bytes_per_image": round(res.wire_bytes_per_input, 1),
                "pct_of_jpeg": round(pct, 3),
                "ratio_vs_jpeg": round(res.ratio_vs_raw, 3),
                "ratio_vs_fp16": round(res.ratio_vs_fp16, 3),
                "cut_cosine": round(res.cut_cosine, 6),
                "fidelity": fid,
                "top1_wilson95": wilson95(fid["top1_agreement"], len(held)),
                "top1_confident_wilson95": wilson95(fid.get("top1_agreement_confident"), n_confident),
                "best_image_codec_within_bytes": _best_image_within(images, res.wire_bytes_per_input),
                "calibration_vectors": int(cal_vectors.shape[0]) if codec.needs_fit else 0,
                "fit_s": round(fit_s, 2), "encode_decode_tail_s": round(eval_s, 2),
                "meets_goal": bool(pct <= GOAL_BYTES_PCT_OF_JPEG and fid["top1_agreement"] >= GOAL_TOP1),
                "meets_goal_on_confident_crops": bool(pct <= GOAL_BYTES_PCT_OF_JPEG and (fid.get("top1_agreement_confident") or 0.0) >= GOAL_TOP1),
            })
    bar.close()
    meeting = [r for r in rows if r["meets_goal"]]
    bf = base["fidelity"]
    as_faithful = [r for r in rows if r["pct_of_jpeg"] <= GOAL_BYTES_PCT_OF_JPEG and r["fidelity"]["top1_agreement"] >= bf["top1_agreement"]
                   and r["fidelity"]["kl_mean"] <= bf["kl_mean"]]
    frontier = {f"cut {c}": _pareto([(r["setting"], r["wire_bytes_per_image"], r["fidelity"]["kl_mean"]) for r in rows if r["split_after"] == c])
                for c in cuts}
    frontier["cloud-only"] = _pareto([(f"{b['format']} q{b['quality']}", b["bytes_per_image_mean"], b["fidelity"]["kl_mean"]) for b in images])
    argv = sys.argv[1:]
    return {
        "command": "splitnet " + shlex.join(argv) if argv[:2] == ["bench", "vision"] else None,
        "config": {"quick": bool(args.quick), "model": "efficientnet-lite0", "cuts": cuts, "codecs": specs, "per_source": per_source,
                   "held_out_fraction": args.held_out_fraction, "jpeg_quality": args.jpeg_quality, "jpeg_qualities": jpeg_q,
                   "webp_qualities": webp_q, "fisher_samples": args.fisher_samples, "seed": args.seed},
        "data": {
            "photos": sorted(P.photos()), "crops": len(crops), "calibration_crops": len(cal), "held_out_crops": len(held),
            "held_out_photos": list(P.HELD_OUT_SOURCES),
            "held_out_crops_of_unseen_photos": sum(c.source in P.HELD_OUT_SOURCES for c in held),
            "held_out_confident_crops": n_confident,
        },
        "whole_photo_top5": P.whole_photo_predictions(bm),
        "baseline_cloud_only": {**base, "what": f"the 224x224 crop as JPEG q{args.jpeg_quality} (PIL, 4:2:0), the whole model in the cloud"},
        "baseline_image_codecs": images,
        "sensitivity": sensitivity,
        "results": rows,
        "skipped": skipped,
        "frontier_bytes_vs_kl": frontier,
        "goal": {
            "bar": f"cut bytes <= {GOAL_BYTES_PCT_OF_JPEG} % of the JPEG q{args.jpeg_quality} at top-1 agreement >= {GOAL_TOP1:.0%}",
            "met_by": [f"cut {r['split_after']} {r['setting']}" for r in meeting],
            "smallest_meeting": min(meeting, key=lambda r: r["wire_bytes_per_image"])["setting"] if meeting else None,
            "met_on_confident_crops_only_by": [f"cut {r['split_after']} {r['setting']}" for r in rows if r["meets_goal_on_confident_crops"]],
            "confident_crops_note": "crops whose unsplit top-1 probability is >= 0.5 (fidelity.confident_fraction of the held-out set)",
            "as_faithful_as_cloud_only_within_bar_bytes": [f"cut {r['split_after']} {r['setting']}" for r in as_faithful],
            "as_faithful_note": f"rows at <= {GOAL_BYTES_PCT_OF_JPEG} % of the JPEG q{args.jpeg_quality} bytes whose top-1 agreement and KL are "
                                f"at least as good as the JPEG q{args.jpeg_quality}'s own (cloud-only is not lossless either)",
        },
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def summarize(doc: dict) -> str:
    b = doc["baseline_cloud_only"]
    lines = [f"vision bench ({'quick' if doc['config']['quick'] else 'full'}), {doc['data']['held_out_crops']} held-out crops "
             f"({doc['data']['held_out_confident_crops']} confident), {doc['elapsed_s']:.0f} s"]
    for im in doc["baseline_image_codecs"]:
        f = im["fidelity"]
        lines.append(f"cloud-only {im['format']:4s} q{im['quality']:<3d} {im['bytes_per_image_mean']:9.1f} B  "
                     f"{100 * im['bytes_per_image_mean'] / b['bytes_per_image_mean']:7.2f} % of JPEG  top1 {f['top1_agreement']:.4f}  "
                     f"top5 {f['top5_overlap']:.4f}  KL {f['kl_mean']:.5f}  confident top1 {_nan(f.get('top1_agreement_confident')):.4f}")
    for r in doc["results"]:
        f = r["fidelity"]
        lines.append(f"cut {r['split_after']:2d} ({r['edge_macs_pct']:4.1f} % edge) {r['setting']:24s} {r['wire_bytes_per_image']:9.1f} B  "
                     f"{r['pct_of_jpeg']:7.2f} % of JPEG  cos {r['cut_cosine']:.4f}  top1 {f['top1_agreement']:.4f}  "
                     f"top5 {f['top5_overlap']:.4f}  KL {f['kl_mean']:.5f}  confident top1 {_nan(f.get('top1_agreement_confident')):.4f}"
                     f"{'  GOAL' if r['meets_goal'] else ''}")
    lines.append(f"goal ({doc['goal']['bar']}): {doc['goal']['met_by'] or 'not met'}; on confident crops only: "
                 f"{doc['goal']['met_on_confident_crops_only_by'] or 'not met'}")
    return "\n".join(lines)
