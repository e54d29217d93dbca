"""vision: EfficientNet-Lite0 (real ImageNet weights) split at a cut, each codec vs sending the JPEG q90.

On held-out 224x224 crops of the bundled photos (:mod:`splitnet.bench.photos`: whole photos never
seen at calibration, and unseen crops of the others), for each cut and codec: bytes on the wire
per image (every byte of the payload, :attr:`Payload.nbytes`) against the JPEG q90 of the same
224x224 crop (what cloud-only sends) and against fp16, the cosine at the cut, and the output's
top-1 agreement, top-5 overlap and KL against the unsplit model. The cloud-only baseline's own
fidelity is measured too: the model run on the decoded JPEG against the model on the original
pixels. Fitted codecs are calibrated on the calibration crops only. No timing here (see
``splitnet bench e2e`` for latency over shaped links).
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any

import numpy as np

#: codec settings "name[:key=value,...]" in the default and the quick run
DEFAULT_CODECS = ("fp16", "int8", "int4", "topk:k=16", "pq:m=16,nbits=8", "pq:m=32,nbits=8", "rvq:stages=2,nbits=8",
                  "rvq:stages=4,nbits=8", "alignedvq:stages=2,nbits=8")
QUICK_CODECS = ("fp16", "int8", "pq:m=8,nbits=6")
DEFAULT_CUTS = (8, 11, 15)
#: the issue's bar: cut bytes <= 5 % of the JPEG q90 at >= 99 % top-1 agreement
GOAL_BYTES_PCT_OF_JPEG = 5.0
GOAL_TOP1 = 0.99


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CI size: 6 crops per photo, cut 15, fp16/int8/pq (about a minute on 2 cores)")
    p.add_argument("--cuts", help=f"comma-separated cuts (blocks on the edge), 1..15 (default {','.join(map(str, DEFAULT_CUTS))}; --quick 15)")
    p.add_argument("--codecs", help="comma-separated settings NAME[:KEY=VALUE/...] with '/' between keys, e.g. 'int8,pq:m=16/nbits=8' "
                                    "(default: fp16, int8, int4, topk, pq, rvq, alignedvq settings)")
    p.add_argument("--per-source", type=int, help="crops per photo (default 40; --quick 6)")
    p.add_argument("--held-out-fraction", type=float, default=0.25, help="crops of the calibration photos held out too (default 0.25)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="the cloud-only baseline's JPEG quality (default 90)")
    p.add_argument("--seed", type=int, default=0)


def parse_codec_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pq:m=16,nbits=8' or 'pq:m=16/nbits=8' -> ('pq', {'m': 16, 'nbits': 8})."""
    name, _, rest = spec.partition(":")
    config: dict[str, Any] = {}
    for kv in filter(None, rest.replace("/", ",").split(",")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"codec setting {spec!r}: {kv!r} is not KEY=VALUE")
        try:
            config[k] = int(v)
        except ValueError:
            try:
                config[k] = float(v)
            except ValueError:
                config[k] = v
    return name.strip(), config


def _split_codecs(text: str) -> list[str]:
    # settings are separated by commas, except the commas inside one setting's KEY=VALUE list
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return [p.strip() for p in out if p.strip()]


def _r(v):
    return round(v, 6) if isinstance(v, float) else v


def jpeg(rgb: np.ndarray, quality: int) -> tuple[int, np.ndarray]:
    """(bytes of the JPEG at ``quality``, the decoded RGB) of an (H, W, 3) uint8 image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    return len(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run(args: argparse.Namespace) -> dict:
    import torch

    from splitnet.bench import photos as P
    from splitnet.codecs import make_codec
    from splitnet.codecs.fidelity import calibration_tokens, classifier_agreement, cut_features, evaluate_codec
    from splitnet.model import load_model
    from splitnet.model.efficientnet import to_pixel_values

    t_start = time.perf_counter()
    cuts = [int(c) for c in args.cuts.split(",")] if args.cuts else ([15] if args.quick else list(DEFAULT_CUTS))
    specs = _split_codecs(args.codecs) if args.codecs else list(QUICK_CODECS if args.quick else DEFAULT_CODECS)
    per_source = args.per_source or (6 if args.quick else 40)
    codecs = [(s, *parse_codec_spec(s)) for s in specs]
    for s, name, config in codecs:
        make_codec(name, **config)  # unknown names and bad settings fail here, before any work
    bm = load_model("efficientnet-lite0")
    if any(not 0 < c < bm.num_blocks for c in cuts):
        raise ValueError(f"--cuts must be in 1..{bm.num_blocks - 1}, got {cuts}")
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be 1..100, got {args.jpeg_quality}")

    crops = P.photo_crops(per_source=per_source, seed=args.seed)
    cal, held = P.split_crops(crops, held_out_fraction=args.held_out_fraction, seed=args.seed)
    held_pixels = [P.crop_pixels(c) for c in held]
    jpegs = [jpeg(px, args.jpeg_quality) for px in held_pixels]
    held_inputs = [({"pixel_values": to_pixel_values(px)[None]}, nbytes) for px, (nbytes, _) in zip(held_pixels, jpegs)]
    needs_fit = any(make_codec(name, **config).needs_fit for _, name, config in codecs)

    # the cloud-only baseline: the unsplit model on the decoded JPEG vs on the original pixels
    full = bm.full()
    ref_logits, jpeg_logits = [], []
    with torch.no_grad():
        for i in range(0, len(held), 32):
            x = torch.from_numpy(np.stack([inp["pixel_values"][0] for inp, _ in held_inputs[i : i + 32]]))
            xj = torch.from_numpy(np.stack([to_pixel_values(dec) for _, dec in jpegs[i : i + 32]]))
            ref_logits.append(full({"pixel_values": x})["logits"])
            jpeg_logits.append(full({"pixel_values": xj})["logits"])
    jpeg_bytes = np.array([n for n, _ in jpegs], dtype=np.float64)
    cloud_only = {
        "what": f"the 224x224 crop as JPEG q{args.jpeg_quality} (PIL, 4:2:0), the whole model in the cloud",
        "bytes_per_image_mean": round(float(jpeg_bytes.mean()), 1),
        "bytes_per_image_p50": float(np.median(jpeg_bytes)),
        "bytes_per_image_max": int(jpeg_bytes.max()),
        "fidelity": {k: _r(v) for k, v in classifier_agreement(torch.cat(ref_logits), torch.cat(jpeg_logits)).items()},
    }

    rows: list[dict] = []
    skipped: list[dict] = []
    for cut in cuts:
        side, _, ch = bm.arch.cut_shape(cut)
        held_feats = cut_features(bm, cut, held_inputs)
        cal_vectors = None
        if needs_fit:
            cal_feats = []
            for i in range(0, len(cal), 64):  # a chunk at a time: pixels are not all kept
                chunk = cal[i : i + 64]
                cal_feats.extend(cut_features(bm, cut, [({"pixel_values": P.pixel_values([c])}, 0) for c in chunk]))
            cal_vectors, _ = calibration_tokens(cal_feats)
            del cal_feats
        for spec, name, config in codecs:
            codec = make_codec(name, **config)
            t0 = time.perf_counter()
            if name == "pq" and ch % int(config.get("m", 8)):
                skipped.append({"split_after": cut, "setting": spec, "why": f"pq m={config.get('m', 8)} does not divide the {ch} channels"})
                continue
            if codec.needs_fit:
                codec.fit(cal_vectors, progress=False)
            fit_s = time.perf_counter() - t0
            res = evaluate_codec(bm, cut, codec, held_feats)
            pct = 100.0 * res.wire_bytes_per_input / float(jpeg_bytes.mean())
            rows.append({
                "split_after": cut, "cut_map": [side, side, ch], "codec": name, "setting": spec, "config": codec.state()[1],
                "wire_bytes_per_image": round(res.wire_bytes_per_input, 1),
                "pct_of_jpeg": round(pct, 3),
                "ratio_vs_jpeg": round(res.ratio_vs_raw, 3),
                "ratio_vs_fp16": round(res.ratio_vs_fp16, 3),
                "cut_cosine": round(res.cut_cosine, 6),
                "fidelity": {k: _r(v) for k, v in res.task.items()},
                "calibration_vectors": int(cal_vectors.shape[0]) if codec.needs_fit else 0,
                "fit_s": round(fit_s, 2),
                "meets_goal": bool(pct <= GOAL_BYTES_PCT_OF_JPEG and res.task["top1_agreement"] >= GOAL_TOP1),
            })
    meeting = [r for r in rows if r["meets_goal"]]
    meeting_confident = [r for r in rows if r["pct_of_jpeg"] <= GOAL_BYTES_PCT_OF_JPEG
                         and (r["fidelity"].get("top1_agreement_confident") or 0.0) >= GOAL_TOP1]
    return {
        "config": {"quick": bool(args.quick), "model": "efficientnet-lite0", "cuts": cuts, "codecs": specs, "per_source": per_source,
                   "held_out_fraction": args.held_out_fraction, "jpeg_quality": args.jpeg_quality, "seed": args.seed},
        "data": {
            "photos": sorted(P.photos()), "crops": len(crops), "calibration_crops": len(cal), "held_out_crops": len(held),
            "held_out_photos": list(P.HELD_OUT_SOURCES),
            "held_out_crops_of_unseen_photos": sum(c.source in P.HELD_OUT_SOURCES for c in held),
        },
        "whole_photo_top5": P.whole_photo_predictions(bm),
        "baseline_cloud_only": cloud_only,
        "results": rows,
        "skipped": skipped,
        "goal": {
            "bar": f"cut bytes <= {GOAL_BYTES_PCT_OF_JPEG} % of the JPEG q{args.jpeg_quality} at top-1 agreement >= {GOAL_TOP1:.0%}",
            "met_by": [f"cut {r['split_after']} {r['setting']}" for r in meeting],
            "smallest_meeting": min(meeting, key=lambda r: r["wire_bytes_per_image"])["setting"] if meeting else None,
            "met_on_confident_crops_only_by": [f"cut {r['split_after']} {r['setting']}" for r in meeting_confident],
            "confident_crops_note": "crops whose unsplit top-1 probability is >= 0.5 (fidelity.confident_fraction of the held-out set)",
        },
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def summarize(doc: dict) -> str:
    b = doc["baseline_cloud_only"]
    lines = [f"vision bench ({'quick' if doc['config']['quick'] else 'full'}), {doc['data']['held_out_crops']} held-out crops, {doc['elapsed_s']:.0f} s",
             f"cloud-only JPEG: {b['bytes_per_image_mean']:.0f} B/image, top1 {b['fidelity']['top1_agreement']:.4f}, "
             f"confident top1 {_nan(b['fidelity'].get('top1_agreement_confident')):.4f} "
             f"({b['fidelity'].get('confident_fraction', float('nan')):.0%} of the crops confident)"]
    for r in doc["results"]:
        f = r["fidelity"]
        lines.append(f"cut {r['split_after']:2d} {r['setting']:26s} {r['wire_bytes_per_image']:9.1f} B  {r['pct_of_jpeg']:7.2f} % of JPEG  "
                     f"x{r['ratio_vs_fp16']:6.1f} vs fp16  cos {r['cut_cosine']:.4f}  top1 {f['top1_agreement']:.4f}  "
                     f"top5 {f['top5_overlap']:.4f}  KL {f['kl_mean']:.5f}  confident top1 {_nan(f.get('top1_agreement_confident')):.4f}{'  GOAL' if r['meets_goal'] else ''}")
    lines.append(f"goal ({doc['goal']['bar']}): {doc['goal']['met_by'] or 'not met'}")
    return "\n".join(lines)
