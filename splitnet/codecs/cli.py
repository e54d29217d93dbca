"""``splitnet calibrate``: fit a codec on the user's own inputs at a cut, measure it, save it.

    splitnet calibrate --model efficientnet-lite0 --split-after 15 --codec pq --data photos/ --out cut15.codec
    splitnet calibrate --model minilm --split-after 2 --codec alignedvq --rate 2x12 --data notes.txt --out cut2.codec

``--data`` is a folder of images (vision models), a text file (encoders, LMs; one input per line)
or token ids (.npy, or a .txt of integers). Its inputs are split (``--held-out``, seeded) before
any work: the codec is fitted on the calibration part only, and the report gives, on the held-out
part, the cosine at the cut, the task's measure at the output (top-1 agreement / top-5 overlap / KL
for classifiers, embedding cosine for encoders, greedy agreement and perplexity change for LMs) and
the bytes on the wire against fp16 and the raw input. ``--min-fidelity X`` refuses to write a codec
whose held-out measure (top-1 agreement, embedding cosine or greedy agreement) is below X.
Writes ``OUT`` (safetensors) and ``OUT.json`` (manifest with the sha256 the runtime checks) and
prints a JSON summary.
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
    p = sub.add_parser("calibrate", help="fit a feature codec at a cut on your own inputs, report its held-out fidelity, save it")
    p.add_argument("--model", default="minilm", help="model name or directory (default minilm)")
    p.add_argument("--split-after", type=int, required=True, help="cut after this many blocks")
    p.add_argument("--codec", default="alignedvq", help="codec name (alignedvq, rvq, pq, int4, ...)")
    p.add_argument("--rate", help="VQ rate as STAGESxBITS (e.g. 3x12); topk: k=N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra codec config (repeatable), e.g. dim=128")
    p.add_argument("--data", metavar="PATH",
                   help="your inputs: a folder of images, a text file (one input per line), or token ids (.npy / .txt of integers)")
    p.add_argument("--held-out", type=float, default=0.2, metavar="FRACTION",
                   help="fraction of the inputs kept out of calibration to measure fidelity on (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-out split")
    p.add_argument("--max-inputs", type=int, help="use at most this many inputs of --data")
    p.add_argument("--max-tokens-per-input", type=int, default=256, help="truncate each text / id sequence to this many tokens")
    p.add_argument("--text-unit", choices=("line", "paragraph"), default="line", help="one input per line or per blank-line paragraph")
    p.add_argument("--min-fidelity", type=float, metavar="X",
                   help="refuse to write the codec when its held-out top-1 agreement (vision), embedding cosine (encoders) "
                        "or greedy agreement (LMs) is below X (0..1)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="calibration feature vectors (tokens, or map positions) to use")
    p.add_argument("--anchors", action="store_true",
                   help="alignedvq: add an anchor codebook of per-token-id mean features (ids used at fit only; text / token ids)")
    p.add_argument("--adapter-steps", type=int, default=0,
                   help="alignedvq: then train the receiver-side context adapter and decoder tables for N steps "
                        "on the same calibration sequences (0 = training-free decoder)")
    p.add_argument("--sequence-bits", type=int, default=0, metavar="B",
                   help="alignedvq: last, send each sequence's mean decode miss in B more bits per sequence "
                        "(AlignedVQ.fit_sequence_correction; 0 = none)")
    p.add_argument("--out", required=True, help="output codec file (a .json manifest is written next to it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (start and end lines only, on stderr)")
    p.set_defaults(func=_calibrate)


def _codec_config(args: argparse.Namespace) -> dict[str, Any]:
    """The codec's config from --rate/--set, with every option checked before any work."""
    config = parse_rate(args.codec, args.rate)
    for kv in args.set:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {kv!r}")
        config[k] = _coerce(v)
    if args.codec in ("alignedvq", "rvq", "pq"):
        config.setdefault("max_train", args.max_tokens)
    if int(config.get("anchor_contexts", 1)) > 1 and not args.anchors:
        raise ValueError("anchor_contexts needs --anchors (context anchors split the per-token-id anchors)")
    if config.get("entropy") in ("huffman", "order1", "context") and not args.anchors:
        raise ValueError(f"entropy={config['entropy']} codes the anchor index: it needs --anchors")
    if args.anchors and args.codec != "alignedvq":
        raise ValueError("--anchors applies to --codec alignedvq only")
    if args.sequence_bits and (args.codec != "alignedvq" or args.sequence_bits < 0):
        raise ValueError("--sequence-bits takes a positive bit count and applies to --codec alignedvq only")
    if args.adapter_steps and (args.codec != "alignedvq" or args.adapter_steps < 0):
        raise ValueError("--adapter-steps takes a positive step count and applies to --codec alignedvq only")
    if args.min_fidelity is not None and not 0.0 <= args.min_fidelity <= 1.0:
        raise ValueError(f"--min-fidelity is a fraction in 0..1, got {args.min_fidelity}")
    if not args.data:
        raise ValueError("calibrate needs your own inputs: --data PATH (a folder of images, a text file, or a .npy/.txt of "
                         "token ids); the stdlib-docstring benchmark calibrates its own codecs in `splitnet bench codec`")
    return config


class _Progress:
    """A tqdm bar, or under --quiet one start and one end line on stderr."""

    def __init__(self, desc: str, total: int, quiet: bool):
        self.desc, self.quiet, self.t0 = desc, quiet, time.perf_counter()
        if quiet:
            print(f"splitnet calibrate: {desc}: {total} ...", file=sys.stderr, flush=True)
            self.bar = None
        else:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"splitnet calibrate: {self.desc}: done in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from splitnet.codecs import make_codec, save_codec
    from splitnet.codecs.fidelity import FidelityBelowMinimum, calibration_tokens, cut_features, evaluate_codec
    from splitnet.codecs.user_data import load_user_data
    from splitnet.errors import SplitnetError
    from splitnet.model import load_model

    try:
        config = _codec_config(args)
        codec = make_codec(args.codec, **config)
        t0 = time.perf_counter()
        bm = load_model(args.model)
        if not 0 < args.split_after < bm.num_blocks:
            raise ValueError(f"--split-after must be in 1..{bm.num_blocks - 1} for {args.model}")
        data = load_user_data(args.data, bm, held_out_fraction=args.held_out, seed=args.seed, max_items=args.max_inputs,
                              max_tokens_per_item=args.max_tokens_per_input, text_unit=args.text_unit)
        if args.anchors and data.kind == "images":
            raise ValueError("--anchors needs token ids (text or token-id data); images have none")
        bar = _Progress(f"features at cut {args.split_after} of {len(data.calibration)} calibration + {len(data.held_out)} held-out inputs",
                        len(data.calibration) + len(data.held_out), args.quiet)
        cal_feats = cut_features(bm, args.split_after, [(it.inputs, it.raw_nbytes) for it in data.calibration], progress=bar)
        held_feats = cut_features(bm, args.split_after, [(it.inputs, it.raw_nbytes) for it in data.held_out], progress=bar)
        bar.close()
        cal, cal_lens = calibration_tokens(cal_feats)
        n_seq = max(1, int(np.searchsorted(np.cumsum(cal_lens), args.max_tokens, side="right")))  # whole inputs only
        cal_lens = cal_lens[:n_seq]
        cal = cal[: int(cal_lens.sum())]
        t1 = time.perf_counter()
        if not args.quiet or codec.needs_fit:
            print(f"splitnet calibrate: fitting {codec.name} on {cal.shape[0]} feature vectors of width {cal.shape[1]}",
                  file=sys.stderr, flush=True)
        try:
            if args.anchors:
                ids = np.concatenate([_real_ids(it.inputs) for it in data.calibration])[: cal.shape[0]]
                codec.fit(cal, progress=not args.quiet, anchor_labels=ids)
            else:
                codec.fit(cal, progress=not args.quiet)
        except (RuntimeError, AssertionError) as e:  # faiss refuses too few training points this way
            raise ValueError(f"fitting {codec.name} on {cal.shape[0]} calibration vectors failed ({e}); give --data more inputs "
                             "or pick a smaller codebook (--rate)") from e
        tuning = codec.tune(cal, cal_lens, steps=args.adapter_steps, progress=not args.quiet) if args.adapter_steps else None
        if args.sequence_bits:
            codec.fit_sequence_correction(cal, cal_lens, bits_per_sequence=args.sequence_bits)
        t2 = time.perf_counter()
        bar = _Progress(f"fidelity on {len(held_feats)} held-out inputs", 3 * len(held_feats), args.quiet)
        report = evaluate_codec(bm, args.split_after, codec, held_feats, progress=bar)
        baselines = {name: evaluate_codec(bm, args.split_after, make_codec(name), held_feats, progress=bar).as_dict()
                     for name in ("fp16", "int8")}
        bar.close()
        if args.min_fidelity is not None and report.primary_value < args.min_fidelity:
            raise FidelityBelowMinimum(
                f"{codec.name} at cut {args.split_after}: held-out {report.primary_measure} {report.primary_value:.4f} is below "
                f"--min-fidelity {args.min_fidelity}; {args.out} not written. Try a higher rate (--rate), a later cut, or more --data"
            )
        manifest = save_codec(codec, args.out)
    except (ValueError, SplitnetError) as e:
        print(f"splitnet calibrate: error: {e}", file=sys.stderr)
        return 2
    summary = {
        "out": str(args.out), "manifest": str(manifest), "codec": codec.name, "config": codec.state()[1],
        "codebook_hash": codec.codebook_hash, "model": args.model, "split_after": args.split_after,
        "data": {"path": str(data.path), "kind": data.kind, "calibration_inputs": len(data.calibration),
                 "held_out_inputs": len(data.held_out), "seed": args.seed},
        "calibration_vectors": int(cal.shape[0]), "features_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2),
        "adapter_training": tuning,
        "held_out": report.as_dict(), "held_out_baselines": baselines,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _real_ids(inputs: dict) -> "Any":
    import numpy as np

    ids = np.asarray(inputs["input_ids"])[0]
    mask = inputs.get("attention_mask")
    return ids[np.asarray(mask)[0] != 0] if mask is not None else ids
