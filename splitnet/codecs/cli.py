"""``splitnet calibrate``: fit a codec on a model's features at a cut and save it.

    splitnet calibrate --model minilm --split-after 2 --codec alignedvq --rate 3x12 --out cut2.codec

Calibration text is the train split of the stdlib-docstring task, the docstrings of packages
outside its classes, and docstring-free stdlib source (never the benchmark's evaluation
docstrings). Writes ``OUT`` (safetensors) and ``OUT.json`` (manifest with the sha256 the runtime
checks) and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def parse_rate(codec: str, rate: str | None) -> dict[str, Any]:
    """'SxB' -> stages/m and nbits for VQ codecs; 'k=N' or 'N' for topk; nothing for scalar codecs."""
    if not rate:
        return {}
    r = rate.lower().replace("bit", "").replace("s", "") if codec != "topk" else rate
    try:
        if codec in ("alignedvq", "rvq", "pq"):
            a, sep, b = r.partition("x")
            key = "m" if codec == "pq" else "stages"
            if sep:
                return {key: int(a), "nbits": int(b)}
            return {key: 1, "nbits": int(a)}
        if codec == "topk":
            return {"k": int(rate.split("=")[-1])}
    except ValueError:
        pass
    raise ValueError(f"cannot read --rate {rate!r} for codec {codec!r}; use e.g. 3x12 (stages x bits) or k=32 for topk")


def _coerce(v: str) -> Any:
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a feature codec at a cut and save it (safetensors + JSON manifest)")
    p.add_argument("--model", default="minilm", help="model name or directory (default minilm)")
    p.add_argument("--split-after", type=int, required=True, help="cut after this many blocks")
    p.add_argument("--codec", default="alignedvq", help="codec name (alignedvq, rvq, pq, int4, ...)")
    p.add_argument("--rate", help="VQ rate as STAGESxBITS (e.g. 3x12); topk: k=N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra codec config (repeatable), e.g. dim=128")
    p.add_argument("--max-tokens", type=int, default=200_000, help="calibration tokens to use")
    p.add_argument("--anchors", action="store_true",
                   help="alignedvq: add an anchor codebook of per-token-id mean features (ids used at fit only)")
    p.add_argument("--adapter-steps", type=int, default=0,
                   help="alignedvq: then train the receiver-side context adapter and decoder tables for N steps "
                        "on the same calibration sequences (0 = training-free decoder)")
    p.add_argument("--sequence-bits", type=int, default=0, metavar="B",
                   help="alignedvq: last, send each sequence's mean decode miss in B more bits per sequence "
                        "(AlignedVQ.fit_sequence_correction; 0 = none)")
    p.add_argument("--out", required=True, help="output codec file (a .json manifest is written next to it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from splitnet.bench.data.minilm_features import extract, token_ids
    from splitnet.bench.data.stdlib_docs import load_doc_task
    from splitnet.codecs import make_codec, save_codec
    from splitnet.errors import SplitnetError
    from splitnet.model import load_model

    try:
        config = parse_rate(args.codec, args.rate)
        for kv in args.set:
            k, sep, v = kv.partition("=")
            if not sep:
                raise ValueError(f"--set needs KEY=VALUE, got {kv!r}")
            config[k] = _coerce(v)
        if args.codec in ("alignedvq", "rvq", "pq"):
            config.setdefault("max_train", args.max_tokens)
        codec = make_codec(args.codec, **config)
        if int(config.get("anchor_contexts", 1)) > 1 and not args.anchors:
            raise ValueError("anchor_contexts needs --anchors (context anchors split the per-token-id anchors)")
        if config.get("entropy") in ("huffman", "order1", "context") and not args.anchors:
            raise ValueError(f"entropy={config['entropy']} codes the anchor index: it needs --anchors")
        if args.sequence_bits and (args.codec != "alignedvq" or args.sequence_bits < 0):
            raise ValueError("--sequence-bits takes a positive bit count and applies to --codec alignedvq only")
        if args.adapter_steps and (args.codec != "alignedvq" or args.adapter_steps < 0):
            raise ValueError("--adapter-steps takes a positive step count and applies to --codec alignedvq only")
        t0 = time.perf_counter()
        bm = load_model(args.model)
        if not 0 < args.split_after < bm.num_blocks:
            raise ValueError(f"--split-after must be in 1..{bm.num_blocks - 1} for {args.model}")
        task = load_doc_task()
        texts = task.calibration_text(n_code=0)  # docstrings; source chunks below if more tokens are wanted
        tr = extract(bm, texts, [args.split_after], emb=False, tag="calibration", progress=not args.quiet)
        feats, lens = [tr[f"h{args.split_after}"]], [tr["lens"]]
        ids = [token_ids(bm, texts)]
        n = feats[0].shape[0]
        if n < args.max_tokens and codec.needs_fit:
            n_chunks = int((args.max_tokens - n) / 100) + 1  # code chunks average ~110 tokens
            code = task.code_chunks[:n_chunks]
            cf = extract(bm, code, [args.split_after], emb=False, tag="code", progress=not args.quiet)
            feats.append(cf[f"h{args.split_after}"])
            lens.append(cf["lens"])
            ids.append(token_ids(bm, code))
        lens_all = np.concatenate(lens)
        n_seq = int(np.searchsorted(np.cumsum(lens_all), args.max_tokens, side="right"))  # whole sequences only
        cal_lens = lens_all[:n_seq]
        cal = np.concatenate(feats)[: int(cal_lens.sum())]
        t1 = time.perf_counter()
        if args.anchors:
            if args.codec != "alignedvq":
                raise ValueError("--anchors applies to --codec alignedvq only")
            codec.fit(cal, progress=not args.quiet, anchor_labels=np.concatenate(ids)[: cal.shape[0]])
        else:
            codec.fit(cal, progress=not args.quiet)
        tuning = None
        if args.adapter_steps:
            tuning = codec.tune(cal, cal_lens, steps=args.adapter_steps, progress=not args.quiet)
        if args.sequence_bits:
            codec.fit_sequence_correction(cal, cal_lens, bits_per_sequence=args.sequence_bits)
        t2 = time.perf_counter()
        manifest = save_codec(codec, args.out)
    except (ValueError, SplitnetError) as e:
        print(f"splitnet calibrate: error: {e}", file=sys.stderr)
        return 2
    p = codec.encode(cal[:1000])
    summary = {
        "out": str(args.out), "manifest": str(manifest), "codec": codec.name, "config": codec.state()[1],
        "codebook_hash": codec.codebook_hash, "model": args.model, "split_after": args.split_after,
        "calibration_tokens": int(cal.shape[0]), "features_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2),
        "adapter_training": tuning, "wire_bytes_per_token_1000": p.nbytes / 1000, "ratio_vs_fp32_1000": (1000 * cal.shape[1] * 4) / p.nbytes,
    }
    print(json.dumps(summary, indent=2))
    return 0
