"""Cache EfficientNet-Lite0 cut features of the bundled-photo crops (calibration and held-out) to .npz.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/vision_frontier/cache_features.py --per-source 90 --cuts 15

Writes /tmp/vision/feat-ps{N}-cut{K}.npz with cal (Nc, T, C), held (Nh, T, C), held_logits (Nh, 1000),
held_jpeg_logits, jpeg_bytes, and the crop sources, so the codec studies compute features once.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-source", type=int, default=90)
    ap.add_argument("--cuts", default="15")
    ap.add_argument("--out", default="/tmp/vision")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from splitnet.bench import photos as P
    from splitnet.bench.vision import jpeg
    from splitnet.model import load_model
    from splitnet.model.efficientnet import to_pixel_values

    bm = load_model("efficientnet-lite0")
    crops = P.photo_crops(per_source=a.per_source, seed=0)
    cal, held = P.split_crops(crops, held_out_fraction=0.25, seed=0)
    cuts = [int(c) for c in a.cuts.split(",")]
    t0 = time.time()
    sets = {"cal": cal, "held": held}
    feats = {(s, c): [] for s in sets for c in cuts}
    logits = {"held": [], "held_jpeg": [], "cal": []}
    jpeg_bytes = []
    full = bm.full()
    stages = [bm.stage(0, cuts[0])] + [bm.stage(cuts[i - 1], cuts[i]) for i in range(1, len(cuts))]
    tail = bm.stage(cuts[-1], bm.num_blocks)
    with torch.no_grad():
        for s, items in sets.items():
            for i in range(0, len(items), 32):
                chunk = items[i : i + 32]
                px = [P.crop_pixels(c) for c in chunk]
                x = torch.from_numpy(np.stack([to_pixel_values(p) for p in px]))
                h = {"pixel_values": x}
                for st, c in zip(stages, cuts):
                    h = st(h)
                    feats[(s, c)].append(h["hidden"].numpy().astype(np.float32))
                    h = {"hidden": h["hidden"]}
                logits[s].append(tail(h)["logits"].numpy())
                if s == "held":
                    js = [jpeg(p, 90) for p in px]
                    jpeg_bytes.extend(n for n, _ in js)
                    xj = torch.from_numpy(np.stack([to_pixel_values(d) for _, d in js]))
                    logits["held_jpeg"].append(full({"pixel_values": xj})["logits"].numpy())
                print(f"{s} {i + len(chunk)}/{len(items)} {time.time() - t0:.0f}s", flush=True)
    for c in cuts:
        np.savez(f"{a.out}/feat-ps{a.per_source}-cut{c}.npz", cal=np.concatenate(feats[("cal", c)]), held=np.concatenate(feats[("held", c)]),
                 held_logits=np.concatenate(logits["held"]), cal_logits=np.concatenate(logits["cal"]),
                 held_jpeg_logits=np.concatenate(logits["held_jpeg"]), jpeg_bytes=np.asarray(jpeg_bytes),
                 held_sources=np.asarray([c.source for c in held]), cal_sources=np.asarray([c.source for c in cal]))
    print("done", time.time() - t0)


if __name__ == "__main__":
    main()
